"""`ray job submit` of an example script to a real, private, token-authenticated local cluster.

The cluster is this test's alone: its own `--temp-dir` (so its address file never attracts
another test's bare `ray.init()`), free ports, and its own token file (RAY_AUTH_TOKEN_PATH), so
nothing reads or writes ~/.ray/auth_token. Teardown stops only the processes of this cluster
(its process group and their descendants); it never runs `ray stop`, which would stop every Ray
on the host.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop_process_group(pgid: int, grace_s: float = 5.0) -> None:
    """SIGTERM every process of the group and their descendants (Ray puts each worker in a group
    of its own), then SIGKILL what is left after ``grace_s``."""
    import psutil

    procs: dict[int, psutil.Process] = {}
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) != pgid:
                continue
            procs[p.pid] = p
            for child in p.children(recursive=True):
                procs[child.pid] = child
        except (ProcessLookupError, psutil.Error):
            continue
    for p in procs.values():
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(list(procs.values()), timeout=grace_s)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)


_STATUS = (
    "import sys; from ray.job_submission import JobSubmissionClient as C; "
    "print(C(sys.argv[1]).get_job_status(sys.argv[2]).value)"
)


class Cluster:
    """A running private head node: its env (token auth) and its job server address."""

    def __init__(self, root: Path, env: dict[str, str], dashboard_port: int):
        self.root, self.env = root, env
        self.dashboard = f"http://127.0.0.1:{dashboard_port}"

    def ray(self, *args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(
            [RAY, *args], cwd=REPO, env=env or self.env, capture_output=True, text=True, timeout=timeout
        )

    def job_status(self, job_id: str) -> str:
        """The job's status through the Python SDK, which authenticates the same way as the CLI."""
        out = subprocess.run([sys.executable, "-c", _STATUS, self.dashboard, job_id], env=self.env,
                             capture_output=True, text=True, timeout=60)
        return out.stdout.strip().splitlines()[-1] if out.stdout.strip() else out.stderr[-2000:]


@pytest.fixture
def cluster():
    # Short root: Ray's unix sockets live under it and a socket path must stay < 108 bytes.
    root = Path(tempfile.mkdtemp(prefix="rpj-", dir="/tmp"))
    token_file = root / "auth_token"
    token_file.write_text(secrets.token_hex(32))
    token_file.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_API_SERVER_ADDRESS")}
    env.update(
        # The job's entrypoint runs `python ...` with the cluster's PATH: make it this interpreter.
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(token_file),
        MLFLOW_DISABLE_TELEMETRY="true",
        TOKENIZERS_PARALLELISM="false",
        RAY_USAGE_STATS_ENABLED="0",
    )
    gcs, dash, client, agent = (_free_port() for _ in range(4))
    cmd = [
        RAY, "start", "--head", f"--port={gcs}", "--num-cpus=2",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
        f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
        f"--temp-dir={root / 'ray'}", "--disable-usage-stats",
    ]
    # A session of its own: every process the head starts shares this process group.
    proc = subprocess.Popen(cmd, env=env, cwd=root, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"ray start failed:\n{out[-3000:]}"
        # Its address file is in its own temp dir, not /tmp/ray where other clusters look.
        assert (root / "ray" / "ray_current_cluster").is_file()
        yield Cluster(root, env, dash)
    finally:
        _stop_process_group(proc.pid)
        shutil.rmtree(root, ignore_errors=True)


def _job_config(tmp_path: Path, tiny_model_dir: Path, toy_csv: Path) -> Path:
    cfg = {
        "workdir": str(tmp_path / "work"),
        "name": "jobsubmit",
        "data": {"path": str(toy_csv), "max_length": 32},
        "model": {"name": str(tiny_model_dir)},
        "train": {"epochs": 3, "batch_size": 16, "lr": 3e-3, "warmup_ratio": 0.0},
        "scaling": {"num_workers": 1, "cpus_per_worker": 0.5, "use_gpu": False},
        "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "job-submit"},
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_job_submit_runs_the_train_example_on_a_token_auth_cluster(cluster, tmp_path, tiny_model_dir, toy_csv):
    from mlflow.tracking import MlflowClient

    config = _job_config(tmp_path, tiny_model_dir, toy_csv)

    # Token auth is on: a client that is not given the token is turned away.
    anonymous = {k: v for k, v in cluster.env.items() if not k.startswith("RAY_AUTH")}
    denied = cluster.ray("job", "submit", "--address", cluster.dashboard, "--no-wait", "--", "echo", "hi",
                         env=anonymous)
    assert denied.returncode != 0
    assert "authentication token" in (denied.stdout + denied.stderr).lower()

    # The recipe from the README: RAY_AUTH_MODE=token plus the cluster's token, then submit.
    job_id = f"raypipe-test-{secrets.token_hex(4)}"
    t0 = time.perf_counter()
    submitted = cluster.ray(
        "job", "submit", "--address", cluster.dashboard, "--submission-id", job_id, "--working-dir", ".",
        "--", "python", "examples/train.py", "--config", str(config), "--smoke-test", "train.lr=4e-3",
        timeout=420,
    )
    logs = submitted.stdout + submitted.stderr
    assert cluster.job_status(job_id) == "SUCCEEDED", f"job did not succeed:\n{logs[-6000:]}"
    assert submitted.returncode == 0, logs[-6000:]
    print(f"job {job_id} took {time.perf_counter() - t0:.1f}s")
    assert "[raypipe] --smoke-test: epochs=1 max_samples=200" in logs
    assert "Training run jobsubmit-" in logs  # the example printed its summary

    # The job's run is in the MLflow store the config named, with its metrics and checkpoint.
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("job-submit")
    assert exp is not None
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`raypipe.stage` = 'train'")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["train.epochs"] == "1"  # --smoke-test reached the run
    assert run.data.params["train.lr"] == "0.004"  # so did the override
    assert {"val_loss", "val_accuracy", "val_macro_f1", "best_val_macro_f1"} <= set(run.data.metrics)
    assert "checkpoint" in {a.path for a in client.list_artifacts(run.info.run_id)}

    # The same job with the default (relative) workdir and no tracking URI would write its store
    # and checkpoints into Ray's throwaway copy of the working dir: it stops before training and
    # says how to give the job persistent places.
    relative = yaml.safe_load(config.read_text())
    relative.pop("workdir")
    relative["tracking"].pop("tracking_uri")
    rel_config = tmp_path / "relative.yaml"
    rel_config.write_text(yaml.safe_dump(relative))
    env = {k: v for k, v in cluster.env.items() if k not in ("MLFLOW_TRACKING_URI", "RAYPIPE_STORAGE_PATH")}
    rel_id = f"raypipe-test-{secrets.token_hex(4)}"
    refused = cluster.ray(
        "job", "submit", "--address", cluster.dashboard, "--submission-id", rel_id, "--working-dir", ".",
        "--", "python", "examples/train.py", "--config", str(rel_config), "--smoke-test", env=env, timeout=420,
    )
    rel_logs = refused.stdout + refused.stderr
    assert cluster.job_status(rel_id) == "FAILED", rel_logs[-4000:]
    assert "inside a Ray job's copy of the working dir" in rel_logs and "MLFLOW_TRACKING_URI" in rel_logs
    assert "Training run" not in rel_logs and "training finished" not in rel_logs
