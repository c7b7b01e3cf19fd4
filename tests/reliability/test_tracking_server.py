"""The pipeline against a real ``mlflow server`` with MLflow's basic-auth app: a subprocess on
127.0.0.1 with a sqlite backend and ``--serve-artifacts`` (artifacts go through the server, never a
shared path), credentials from MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD.

Training runs in Ray Train's local mode (``scaling.num_workers: 0``), so every MLflow call is made
by this process, whose environment holds the credentials. The champion is then served from
``models:/srv-model@champion``: the Serve replica (a Ray worker that never saw this process's
environment, since the test's Ray was started before the credentials were set) resolves it through
the server with the deployer's credentials, handed to it as an init argument.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.ray

ADMIN_PASSWORD = "srvPW-4c1e9b7a52"
FLASK_KEY = "flaskKey-6e2d0c9b83"
REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``mlflow server --app-name basic-auth`` with its stores under a tmp dir; yields
    (url, store root, log file). The auth config (it holds the admin password) lives apart."""
    pytest.importorskip("flask_wtf", reason="mlflow[auth] (Flask-WTF) is part of the dev extra")
    import httpx

    root = tmp_path_factory.mktemp("mlflow-server")
    secret_dir = tmp_path_factory.mktemp("auth-config")
    ini = secret_dir / "basic_auth.ini"
    ini.write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = sqlite:///{root / 'basic_auth.db'}\n"
        f"admin_username = admin\nadmin_password = {ADMIN_PASSWORD}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    port = _free_port()
    log = root / "server.log"
    env = {**os.environ, "MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_DISABLE_TELEMETRY": "true",
           "MLFLOW_FLASK_SERVER_SECRET_KEY": FLASK_KEY}  # the auth app's CSRF key, required
    for k in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        env.pop(k, None)
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth",
             "--backend-store-uri", f"sqlite:///{root / 'server.db'}", "--serve-artifacts",
             "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1"],
            cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, f"mlflow server exited:\n{log.read_text()[-3000:]}"
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"mlflow server not up after 300 s:\n{log.read_text()[-3000:]}"
            time.sleep(1)
        yield url, root, log
    finally:
        import signal

        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def _config(tmp_path: Path, url: str, tiny_model_dir: Path, toy_csv: Path) -> Path:
    cfg = {
        "workdir": str(tmp_path / "work"),
        "name": "srv",
        "data": {"path": str(toy_csv), "max_length": 32},
        "model": {"name": str(tiny_model_dir)},
        "train": {"epochs": 2, "batch_size": 16, "lr": 3e-3, "warmup_ratio": 0.0},
        "scaling": {"num_workers": 0, "use_gpu": False},
        "tracking": {"tracking_uri": url, "experiment": "server-e2e"},
        "registry": {"model_name": "srv-model"},
        "serve": {"port": _free_port(), "app_name": "srv-e2e"},
    }
    path = tmp_path / "srv.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _cli(*args: str, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "raypipe.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_a_wrong_password_is_a_clear_error_before_any_training(server, tmp_path, tiny_model_dir, toy_csv):
    url, _root, _log = server
    cfg = _config(tmp_path, url, tiny_model_dir, toy_csv)
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_USERNAME": "admin",
           "MLFLOW_TRACKING_PASSWORD": "not-the-password"}
    out = _cli("train", str(cfg), env=env)
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-3000:]
    assert "refused the credentials of user 'admin'" in out.stderr and "MLFLOW_TRACKING_PASSWORD" in out.stderr
    assert "not-the-password" not in out.stdout + out.stderr
    assert "stage" not in out.stdout and "training finished" not in out.stdout  # nothing ran
    assert not (tmp_path / "work" / "ray_results").exists()

    # `raypipe ui` with a server configured points at the server instead of starting a UI.
    ui = _cli("ui", "--config", str(cfg), env=env, timeout=120)
    assert ui.returncode == 0 and url in ui.stdout


@pytest.mark.slow  # the whole pipeline through HTTP: ~3 min alone on 2 cores
def test_the_pipeline_against_a_basic_auth_tracking_server_leaves_no_secret(
    ray_local, server, tmp_path, tiny_model_dir, toy_csv, monkeypatch, capfd
):
    from mlflow.tracking import MlflowClient

    from raypipe.config import load_config
    from raypipe.pipeline import run
    from raypipe.registry import load_predictor
    from test_secrets import grep_tree

    url, root, log = server
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN_PASSWORD)
    cfg = load_config(str(_config(tmp_path, url, tiny_model_dir, toy_csv)), [])
    result = run(cfg, serve=False)
    assert result.registration.decision.promoted

    client = MlflowClient(tracking_uri=url, registry_uri=url)
    mv = client.get_model_version_by_alias("srv-model", "champion")
    assert mv.source.startswith("models:/m-")
    logged = client.get_logged_model(mv.source.removeprefix("models:/"))
    assert logged.artifact_location.startswith("mlflow-artifacts:")  # proxied through the server
    run_ = client.get_run(result.train.mlflow_run_id)
    assert run_.data.params["tracking.tracking_uri"] == url and "val_macro_f1" in run_.data.metrics
    assert {d.dataset.digest for d in run_.inputs.dataset_inputs} == {result.train.fingerprint[:36]}
    assert any((root / "artifacts").rglob("MLmodel")), "artifacts must land in the server's store"
    assert not (tmp_path / "work" / "mlartifacts").exists()

    # models:/ resolution through the server (what a Serve replica does with its tracking URI).
    predictor = load_predictor("models:/srv-model@champion", tracking_uri=url, device="cpu")
    assert predictor.meta["model_version"] == str(mv.version)
    assert predictor.predict(["goal match team league"])[0]["label"] in ("sport", "tech", "food")

    # A Serve replica resolves models:/ through the authenticated server itself, and /metadata
    # names the run, the data and the code behind the model.
    import httpx

    from raypipe.serve import deploy, shutdown

    served = deploy(cfg, "models:/srv-model@champion", ready_timeout_s=300)
    try:
        meta = httpx.get(f"{served.url}/metadata", timeout=60).json()
        answer = httpx.post(f"{served.url}/predict", json={"texts": ["goal match team league"]}, timeout=60)
    finally:
        shutdown("srv-e2e")
    assert meta["model"] == {"name": "srv-model", "version": str(mv.version), "run_id": mv.run_id}
    assert meta["data_fingerprint"] == result.train.fingerprint
    assert answer.status_code == 200 and answer.json()["model"]["version"] == str(mv.version)

    # Without credentials the same server refuses: the auth app is really on.
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME")
    with pytest.raises(Exception, match="(?i)unauthorized|401|credentials"):
        MlflowClient(tracking_uri=url).search_experiments()

    # The password is in no param, tag, artifact, log line or store file.
    out = capfd.readouterr()
    hits = [f"captured output: {ADMIN_PASSWORD}"] if ADMIN_PASSWORD in out.out + out.err else []
    scanned, store_hits = grep_tree(root, (ADMIN_PASSWORD, FLASK_KEY))
    work_scanned, work_hits = grep_tree(tmp_path / "work", (ADMIN_PASSWORD, FLASK_KEY))
    ray_logs = Path(ray_local._private.worker._global_node.get_session_dir_path()) / "logs"
    logs_scanned, log_hits = grep_tree(ray_logs, (ADMIN_PASSWORD, FLASK_KEY))  # Serve's and the replica's logs
    hits += log_hits
    assert scanned > 5 and log.is_file()
    hits += store_hits + work_hits
    print(f"\nRELIABILITY secrets-server: scanned {scanned} server files (store, artifacts, server log), "
          f"{work_scanned} workdir files, {logs_scanned} Ray log files, captured output; hits: {len(hits)}")
    assert hits == []
