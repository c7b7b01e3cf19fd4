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


def _secret_tree(tiny_config, monkeypatch) -> dict:
    """The config tree and environment with the secrets where a user would put them."""
    monkeypatch.setenv("RAYPIPE_REL_TOKEN", TOKEN)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", MLFLOW_PASSWORD)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    tree = tiny_config.model_dump(mode="json")
    tree["ray"]["address"] = f"ray://alice:{RAY_PASSWORD}@127.0.0.1:10001"
    tree["serve"]["auth_token_env"] = "RAYPIPE_REL_TOKEN"
    tree["train"]["epochs"] = 1
    return tree


def _grep_everything(cfg, ray_local, capfd) -> tuple[str, list[str]]:
    """Grep the workdir, the Ray session's logs and the captured output: (summary, hits)."""
    out = capfd.readouterr()
    log_hits = [f"captured {name}: {s}" for name, text in (("stdout", out.out), ("stderr", out.err))
                for s in SECRETS if s in text]
    scanned, store_hits = grep_tree(cfg.workdir_path, SECRETS)
    session = Path(ray_local._private.worker._global_node.get_session_dir_path())
    ray_scanned, ray_hits = grep_tree(session / "logs", SECRETS)
    size_kib = sum(p.stat().st_size for p in cfg.workdir_path.rglob("*") if p.is_file()) // 1024
    summary = (f"scanned {scanned} workdir files ({size_kib} KiB), {ray_scanned} Ray log files, "
               f"{len(out.out) + len(out.err)} chars of captured output; "
               f"hits: {len(store_hits) + len(ray_hits) + len(log_hits)}")
    assert scanned > 20, summary
    return summary, store_hits + ray_hits + log_hits


def test_training_and_registration_leave_no_secret_in_mlflow_checkpoints_or_logs(
    ray_local, tiny_config, monkeypatch, capfd
):
    from mlflow.tracking import MlflowClient

    from raypipe.config import config_from_dict
    from raypipe.registration import register_checkpoint
    from raypipe.training import run

    tree = _secret_tree(tiny_config, monkeypatch)
    tree["scaling"]["num_workers"] = 0  # local mode: in-process, a few seconds
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

    summary, hits = _grep_everything(cfg, ray_local, capfd)
    print(f"\nRELIABILITY secrets: {summary}")
    assert (cfg.workdir_path / "mlflow.db").is_file()
    assert hits == []


def test_a_sweep_leaves_no_secret_in_trials_registry_tune_state_or_logs(ray_local, tiny_config, monkeypatch, capfd):
    """The same secrets through a Tune sweep: the trials get the whole config from the sweep
    driver (``tune.with_parameters``), MLflowLoggerCallback logs each trial, Tune writes its
    experiment state, and the winner is evaluated and registered."""
    from mlflow.tracking import MlflowClient

    from raypipe.config import config_from_dict
    from raypipe.data import load_splits
    from raypipe.pipeline import evaluate_and_register
    from raypipe.tuning import run

    tree = _secret_tree(tiny_config, monkeypatch)
    tree["tune"] = {"num_samples": 1, "search_space": {"train.lr": {"choice": [3e-3]}}}
    cfg = config_from_dict(tree)

    result = run(cfg)
    splits = load_splits(cfg.data, cfg.task)
    _, registration = evaluate_and_register(cfg, result.best_checkpoint, splits=splits, source_run_id=result.best_run_id)

    client = MlflowClient(tracking_uri=cfg.resolved_tracking_uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) >= 2  # the sweep's parent run and its trial: there was something to leak
    assert client.get_run(result.parent_run_id).data.params["tune.num_samples"] == "1"
    assert registration.version == "1"  # the winner reached the registry too

    summary, hits = _grep_everything(cfg, ray_local, capfd)  # store, registry, checkpoints, Tune state
    print(f"\nRELIABILITY secrets-sweep: {summary}")
    assert any(p.name.startswith("experiment_state") for p in cfg.workdir_path.rglob("*"))  # Tune's state was grepped
    assert hits == []
