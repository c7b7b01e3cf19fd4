"""Secrets never leak: a real training run and registration whose config and environment hold
credentials, then a byte-level grep of everything they left behind.

Where the secrets sit, as a user would put them:
  * ``ray.address: ray://alice:<password>@127.0.0.1:10001`` (a Ray Client address with credentials).
    The test joins the session's local Ray first, so this address is never contacted.
  * ``serve.auth_token_env: RAYPIPE_REL_TOKEN`` with the bearer token in that variable.
  * ``MLFLOW_TRACKING_PASSWORD`` in the environment (what MLflow's HTTP auth reads).

What is grepped: every file under the workdir (the sqlite MLflow store and its WAL, the artifact
root, Ray Train's storage with the checkpoints, the model cache), the Ray session's log files, and
the captured stdout/stderr of the whole run.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.ray

RAY_PASSWORD = "rayPW-7f3c19e2d4"
TOKEN = "bearer-tok-0b5e8a61c2"
MLFLOW_PASSWORD = "mlflowPW-9d2a77f1e0"
SECRETS = (RAY_PASSWORD, TOKEN, MLFLOW_PASSWORD)


def grep_tree(root: Path, needles: tuple[str, ...]) -> tuple[int, list[str]]:
    """(files scanned, 'file: needle' for every hit), reading raw bytes."""
    hits, scanned = [], 0
    for path in root.rglob("*"):
        if not path.is_file() or path.is_symlink():
            continue
        try:
            data = path.read_bytes()
        except OSError:  # a log file rotated away meanwhile
            continue
        scanned += 1
        hits += [f"{path}: {n}" for n in needles if n.encode() in data]
    return scanned, hits


def test_training_and_registration_leave_no_secret_in_mlflow_checkpoints_or_logs(
    ray_local, tiny_config, monkeypatch, capfd
):
    from mlflow.tracking import MlflowClient

    from raypipe.config import config_from_dict
    from raypipe.registry import register_checkpoint
    from raypipe.training import run

    monkeypatch.setenv("RAYPIPE_REL_TOKEN", TOKEN)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", MLFLOW_PASSWORD)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    tree = tiny_config.model_dump(mode="json")
    tree["ray"]["address"] = f"ray://alice:{RAY_PASSWORD}@127.0.0.1:10001"
    tree["serve"]["auth_token_env"] = "RAYPIPE_REL_TOKEN"
    tree["scaling"]["num_workers"] = 0  # local mode: in-process, a few seconds
    tree["train"]["epochs"] = 1
    cfg = config_from_dict(tree)

    result = run(cfg)
    registered = register_checkpoint(result.best_checkpoint, cfg, name="rel-secrets",
                                     metrics={"test_macro_f1": 0.5})

    # The run really was logged (so there was something to leak), with the address redacted.
    client = MlflowClient(tracking_uri=cfg.resolved_tracking_uri)
    params = client.get_run(result.mlflow_run_id).data.params
    assert params["ray.address"] == "ray://***@127.0.0.1:10001"
    assert params["serve.auth_token_env"] == "RAYPIPE_REL_TOKEN"  # the variable's name, not its value
    assert registered.version == "1"
    artifacts = Path(client.download_artifacts(result.mlflow_run_id, "config.yaml", str(cfg.workdir_path.parent)))
    assert "ray://***@127.0.0.1:10001" in artifacts.read_text()  # redacted, not dropped
    artifacts.unlink()

    out = capfd.readouterr()
    log_hits = [f"captured {name}: {s}" for name, text in (("stdout", out.out), ("stderr", out.err))
                for s in SECRETS if s in text]
    scanned, store_hits = grep_tree(cfg.workdir_path, SECRETS)
    session = Path(ray_local._private.worker._global_node.get_session_dir_path())
    ray_scanned, ray_hits = grep_tree(session / "logs", SECRETS)
    print(f"\nRELIABILITY secrets: scanned {scanned} workdir files "
          f"({sum(p.stat().st_size for p in cfg.workdir_path.rglob('*') if p.is_file()) // 1024} KiB), "
          f"{ray_scanned} Ray log files, {len(out.out) + len(out.err)} chars of captured output; "
          f"hits: {len(store_hits) + len(ray_hits) + len(log_hits)}")
    assert (cfg.workdir_path / "mlflow.db").is_file() and scanned > 20
    assert store_hits + ray_hits + log_hits == []
