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
    tree["tune"] = {"search_space": SPACE, "num_samples": 3, **tune}
    return config_from_dict(tree)


def _children(cfg, parent_id):
    client = MlflowClient(tracking_uri=cfg.resolved_tracking_uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    return client, client.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")


@pytest.fixture(scope="module")
def asha_sweep(ray_local, tmp_path_factory, tiny_model_dir, toy_csv):
    """One ASHA sweep of 3 trials (as many as run at once on 2 CPUs: one wave), its winner
    evaluated and registered as the pipeline does it;
    shared by the tests that check the sweep and the champion's lineage in MLflow."""
    from raypipe.data import load_splits
    from raypipe.pipeline import evaluate_and_register
    from raypipe.tuning import run

    base = tmp_path_factory.mktemp("asha")
    tiny = config_from_dict({
        "workdir": str(base / "work"),
        "name": "asha",
        "data": {"path": str(toy_csv), "max_length": 32},
        "model": {"name": str(tiny_model_dir)},
        "train": {"epochs": 3, "batch_size": 16, "lr": 3e-3, "warmup_ratio": 0.0},
        "scaling": {"num_workers": 1, "use_gpu": False, "cpus_per_worker": 0.5},
        "tracking": {"experiment": "asha-sweep"},
    })
    cfg = _sweep_cfg(tiny, scheduler={"type": "asha", "grace_period": 1, "reduction_factor": 2})
    result = run(cfg)
    splits = load_splits(cfg.data)
    evaluation, registration = evaluate_and_register(cfg, result.best_checkpoint, splits=splits,
                                                     source_run_id=result.best_run_id)
    return cfg, result, splits, evaluation, registration


def test_asha_sweep_logs_trials_under_a_parent_and_promotes_the_best(asha_sweep):
    from raypipe.predict import Predictor
    from raypipe.registry import load_predictor

    cfg, result, _splits, evaluation, registration = asha_sweep

    assert len(result.trials) == 3
    assert {t["status"] for t in result.trials} <= {"completed", "early_stopped"}
    client, children = _children(cfg, result.parent_run_id)
    assert len(children) == 3
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
    assert evaluation.metrics["test_accuracy"] > 0.5
    assert registration.run_id == result.best_run_id  # the model lives in the best trial's run
    champion = f"models:/{cfg.registry.model_name}@{cfg.registry.alias}"
    served = load_predictor(champion, tracking_uri=cfg.resolved_tracking_uri)
    local = Predictor.from_dir(result.best_checkpoint)
    texts = ["goal match team league", "chip software robot", "bread soup chef"]
    assert [p["label"] for p in served.predict(texts)] == [p["label"] for p in local.predict(texts)]
    assert served.meta["model_version"] == str(registration.version)


def test_the_champion_read_back_with_plain_mlflow_has_its_whole_lineage(asha_sweep):
    """What a user finds with MLflow's own client, starting from models:/name@champion: the trial
    run behind it with the whole config, versions, git and data tags, its dataset inputs, a
    LoggedModel with the test metrics and a signature, and a readable trial name."""
    import mlflow.pyfunc
    import pandas as pd

    from raypipe.config import flatten
    from raypipe.tracking import safe_params

    cfg, result, splits, evaluation, registration = asha_sweep
    uri = cfg.resolved_tracking_uri
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    name = cfg.registry.model_name
    mv = client.get_model_version_by_alias(name, "champion")
    run = client.get_run(mv.run_id)

    # The trial run holds the full resolved config (not only the searched keys).
    trial = next(t for t in result.trials if t["trial_id"] == result.best_trial)
    expected = safe_params(flatten(cfg.model_dump(mode="json")))
    for key in ("model.name", "data.path", "data.max_length", "train.epochs", "train.seed", "scaling.num_workers",
                "registry.model_name", "tracking.experiment"):
        assert run.data.params[key] == expected[key], key
    assert float(run.data.params["train.lr"]) == pytest.approx(trial["config"]["train.lr"])
    assert run.data.params["train.batch_size"] == str(trial["config"]["train.batch_size"])
    assert len(run.data.params) >= 40
    tags = run.data.tags
    assert tags["data.fingerprint"] == splits.fingerprint and tags["data.split_seed"] == str(cfg.data.split_seed)
    assert {"version.raypipe", "version.torch", "version.transformers", "version.ray", "version.mlflow"} <= set(tags)
    assert len(tags["git.sha"]) == 40 and tags["git.dirty"] in ("true", "false")
    assert tags["raypipe.stage"] == "trial" and tags["mlflow.parentRunId"] == result.parent_run_id
    # A readable name: <sweep>-tNN with the sampled values.
    assert run.info.run_name.startswith(f"{result.sweep_name}-t") and "lr=" in run.info.run_name
    assert "batch_size=" in run.info.run_name and "_trial_fn" not in run.info.run_name
    parent = client.get_run(result.parent_run_id)
    assert parent.data.tags["raypipe.best_run_id"] == mv.run_id
    assert set(parent.data.tags["raypipe.child_runs"].split(",")) == {
        r.info.run_id for r in _children(cfg, result.parent_run_id)[1]}

    # Dataset inputs: one per split, digest from the fingerprint, source the data path.
    inputs = {next(t.value for t in d.tags if t.key == "mlflow.data.context"): d.dataset for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"train", "validation", "test"}
    for ds in inputs.values():
        assert ds.digest == splits.fingerprint[:36] and str(cfg.data.path) in ds.source
        assert "text" in ds.schema
    eval_run = client.get_run(evaluation.run_id)
    assert [d.dataset.digest for d in eval_run.inputs.dataset_inputs] == [splits.fingerprint[:36]]

    # A LoggedModel, output of that run, with the test metrics and a signature; the version comes from it.
    model_id = mv.source.removeprefix("models:/")
    logged = client.get_logged_model(model_id)
    assert logged.source_run_id == mv.run_id
    assert model_id in {o.model_id for o in run.outputs.model_outputs}
    linked = {m.key: m.value for m in logged.metrics}
    assert linked["test_macro_f1"] == pytest.approx(evaluation.metrics["test_macro_f1"])
    assert {m.dataset_digest for m in logged.metrics} == {splits.fingerprint[:36]}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    assert model.metadata.get_input_schema() is not None and model.metadata.get_output_schema() is not None
    assert model.metadata.model_id == model_id
    out = model.predict(pd.DataFrame({"text": ["goal match team league"]}))
    assert list(out.columns)[:1] == ["label"]

    # The experiment opens on runs in the UI.
    assert client.get_experiment_by_name(cfg.tracking.experiment).tags["mlflow.experimentKind"] == "custom_model_development"


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


def test_the_trial_logger_that_tune_pickles_holds_no_rows_of_the_data(tmp_path):
    """Tune pickles its callbacks into the sweep's state (``tuner.pkl``). The trial logger keeps
    what the trial runs need from the splits (dataset inputs, data checks, sizes), never the
    frames: its pickle is the same size for 100 rows and 100x as many."""
    import ray.cloudpickle as cloudpickle

    from raypipe.data import load_splits
    from raypipe.tracking import trial_logger
    from tests.conftest import make_rows, write_csv

    sizes = {}
    for n in (100, 10_000):
        data = write_csv(tmp_path / f"rows-{n}.csv", make_rows(n, seed=n))
        cfg = config_from_dict({"workdir": str(tmp_path / "work"), "name": "pickled",
                                "data": {"path": str(data), "max_length": 32}})
        splits = load_splits(cfg.data)
        logger = trial_logger(cfg, "parent", "sweep", splits, lambda sampled, cfg=cfg: cfg)
        blob = cloudpickle.dumps(logger)
        assert splits.train["text"].iloc[0].encode() not in blob
        sizes[n] = len(blob)
    assert sizes[10_000] < sizes[100] * 1.2, sizes  # the frames would make it ~100x larger
