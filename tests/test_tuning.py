"""Sweeps on a real local Ray: every trial is a training run, logged as an MLflow child run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from raypipe.config import config_from_dict

pytestmark = pytest.mark.ray

SPACE = {"train.lr": {"loguniform": [2e-3, 1.5e-2]}, "train.batch_size": {"choice": [16, 32]}}


def _sweep_cfg(tiny_config, **tune):
    tree = tiny_config.model_dump(mode="json")
    tree["train"]["epochs"] = 3
    tree["tune"] = {"search_space": SPACE, "num_samples": 4, **tune}
    return config_from_dict(tree)


def _children(cfg, parent_id):
    client = MlflowClient(tracking_uri=cfg.resolved_tracking_uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    return client, client.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")


def test_asha_sweep_logs_trials_under_a_parent_and_promotes_the_best(ray_local, tiny_config):
    from raypipe.data import load_splits
    from raypipe.pipeline import evaluate_and_register
    from raypipe.predict import Predictor
    from raypipe.registry import load_predictor
    from raypipe.tuning import run

    cfg = _sweep_cfg(tiny_config, scheduler={"type": "asha", "grace_period": 1, "reduction_factor": 2})
    result = run(cfg)

    assert len(result.trials) == 4
    assert {t["status"] for t in result.trials} <= {"completed", "early_stopped"}
    client, children = _children(cfg, result.parent_run_id)
    assert len(children) == 4
    for child in children:
        assert {"train.lr", "train.batch_size"} <= set(child.data.params)
        assert child.data.tags["raypipe.trial_status"] in ("completed", "early_stopped")
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "val_macro_f1")]
        assert steps == list(range(1, len(steps) + 1)) and steps  # one value per epoch, no repeats
        if child.data.tags["raypipe.trial_status"] == "completed":
            assert len(steps) == cfg.train.epochs
    parent = client.get_run(result.parent_run_id)
    assert "train.lr" in parent.data.params["tune.search_space"]
    assert parent.data.tags["raypipe.best_trial"] == result.best_trial
    assert "plots/sweep.png" in {a.path for a in client.list_artifacts(result.parent_run_id, "plots")}

    # The winner, evaluated on the test split and registered as after a single run, holds the alias.
    evaluation, registration = evaluate_and_register(cfg, result.best_checkpoint, splits=load_splits(cfg.data),
                                                     source_run_id=result.best_run_id)
    assert evaluation.metrics["test_accuracy"] > 0.5
    assert registration.run_id == result.best_run_id  # the model lives in the best trial's run
    champion = f"models:/{cfg.registry.model_name}@{cfg.registry.alias}"
    served = load_predictor(champion, tracking_uri=cfg.resolved_tracking_uri)
    local = Predictor.from_dir(result.best_checkpoint)
    texts = ["goal match team league", "chip software robot", "bread soup chef"]
    assert [p["label"] for p in served.predict(texts)] == [p["label"] for p in local.predict(texts)]
    assert served.meta["model_version"] == str(registration.version)


def _finished_trials(sweep_root: Path) -> list[Path]:
    """Train run dirs of trials that Tune's saved experiment state already lists as TERMINATED."""
    import json

    done = []
    for state in sweep_root.glob("experiment_state*.json"):
        try:
            trials = json.loads(state.read_text())["trial_data"]
        except (ValueError, KeyError, OSError):
            continue  # being rewritten right now
        for trial_json, _ in trials:
            t = json.loads(trial_json)
            if t.get("status") == "TERMINATED":
                done.append(sweep_root.parent / f"{sweep_root.name}_trial_{t['trial_id']}")
    return done


# slow tier: two sweep drivers in their own Ray (171 s on 2 cores); `make test-slow`
@pytest.mark.slow
def test_resume_after_the_sweep_driver_is_killed_skips_finished_trials(tiny_config, tmp_path):
    tree = tiny_config.model_dump(mode="json")
    tree["train"]["epochs"] = 2
    tree["tune"] = {
        "name": "resumable",
        "search_space": {"train.lr": {"grid": [3e-3, 5e-3, 8e-3]}},
        "search_alg": "grid",
        "scheduler": {"type": "fifo"},
        "max_concurrent_trials": 1,
    }
    # Its own new Ray ("local"), never a cluster some other process left registered in /tmp/ray.
    tree["ray"] = {"address": "local", "num_cpus": 2, "include_dashboard": False}
    tree["tracking"] = {"tracking_uri": f"sqlite:///{tmp_path / 'work' / 'mlflow.db'}"}
    cfg = config_from_dict(tree)
    cfg_file = tmp_path / "sweep.yaml"
    cfg_file.write_text(yaml.safe_dump(tree))
    sweep_root = Path(cfg.resolved_storage_path) / "resumable"

    # The sweep driver runs in its own session so that killing it takes its own Ray along.
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    log = (tmp_path / "sweep.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "raypipe.cli", "tune", str(cfg_file)],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env,
    )
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not _finished_trials(sweep_root):
            assert proc.poll() is None, "the sweep ended before it could be interrupted:\n" + (
                tmp_path / "sweep.log"
            ).read_text()[-3000:]
            time.sleep(1)
        finished = _finished_trials(sweep_root)
        assert finished, "no trial finished within 300 s"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    before = {d: sorted(p.name for p in d.glob("checkpoint_*")) for d in finished}

    # The resumed sweep runs as a user runs it - `raypipe tune --resume`, its own process and its
    # own Ray - so nothing an earlier test left in the shared test Ray can hold its resources.
    resumed = subprocess.run([sys.executable, "-m", "raypipe.cli", "tune", str(cfg_file), "--resume", "--no-register"],
                             capture_output=True, text=True, env=env, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]

    assert len(set(_finished_trials(sweep_root))) == 3  # every trial completed (state files of both drivers)
    for d, names in before.items():  # finished trials were not trained again
        assert sorted(p.name for p in d.glob("checkpoint_*")) == names
    client = MlflowClient(tracking_uri=cfg.resolved_tracking_uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    children = [r for r in client.search_runs([exp.experiment_id]) if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 3  # no duplicate trial runs
    assert len({c.data.tags["mlflow.parentRunId"] for c in children}) == 1  # under the one sweep run
    for child in children:
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "val_loss")]
        assert sorted(steps) == [1, 2]


def test_a_sweep_refuses_local_mode_before_any_ray_work(tiny_config):
    from raypipe.errors import ConfigError
    from raypipe.tuning import run

    tree = tiny_config.model_dump(mode="json")
    tree["scaling"]["num_workers"] = 0
    tree["tune"] = {"search_space": SPACE}
    with pytest.raises(ConfigError, match="scaling.num_workers: a sweep needs at least 1 worker"):
        run(config_from_dict(tree))


def test_optuna_search_alg_is_a_real_optuna_searcher(tiny_config):
    from ray.tune.search.optuna import OptunaSearch

    from raypipe.tuning import _search_alg

    tree = tiny_config.model_dump(mode="json")
    tree["tune"] = {"search_space": SPACE, "search_alg": "optuna"}
    searcher = _search_alg(config_from_dict(tree), "val_macro_f1", "max")
    assert isinstance(searcher, OptunaSearch)
    assert searcher.metric == "val_macro_f1" and searcher.mode == "max"


def test_a_sweep_with_relative_paths_keeps_its_runs_under_the_drivers_workdir(
    ray_local, tiny_config, tmp_path, monkeypatch
):
    """A config as users write it (``workdir: raypipe-work``, ``data.path: data.csv``), run from
    its directory: Tune runs each trial in a directory of its own, so the trials must get
    absolute paths, or their Train runs land inside Tune's trial dirs and the sweep cannot find
    its best checkpoint (the quickstart failed so)."""
    import shutil

    from raypipe.tuning import run

    monkeypatch.chdir(tmp_path)
    shutil.copy(tiny_config.data.path, tmp_path / "data.csv")
    tree = tiny_config.model_dump(mode="json")
    tree["workdir"] = "raypipe-work"
    tree["data"]["path"] = "data.csv"
    tree["train"]["epochs"] = 1
    tree["tune"] = {"num_samples": 1, "search_space": {"train.lr": {"choice": [3e-3]}}}
    cfg = config_from_dict(tree)

    result = run(cfg)

    runs = tmp_path / "raypipe-work" / "ray_results"
    assert result.best_checkpoint and Path(result.best_checkpoint).is_relative_to(tmp_path / "raypipe-work")
    assert [p.name for p in runs.glob(f"{result.sweep_name}_trial_*")]  # the trial's Train run is here
    session = Path(ray_local._private.worker._global_node.get_session_dir_path())
    assert [p for p in session.rglob("raypipe-work") if result.sweep_name in str(p)] == []  # not in Tune's dirs
