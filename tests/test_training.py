"""Integration: real local Ray, a tiny random-init BERT with a real tokenizer, generated data."""

from __future__ import annotations

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from raypipe.config import config_from_dict
from raypipe.errors import ConfigError

pytestmark = pytest.mark.ray


def _cfg(tiny_config, **over):
    tree = tiny_config.model_dump(mode="json")
    for dotted, value in over.items():
        node = tree
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config_from_dict(tree)


def _runs(cfg):
    client = MlflowClient(tracking_uri=cfg.resolved_tracking_uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    return client, client.search_runs([exp.experiment_id]) if exp else []


@pytest.mark.slow  # the baseline run of tests/reliability/test_worker_kill.py is the same 2-worker run, checked per epoch
def test_two_worker_run_learns_and_logs_every_epoch(ray_local, tiny_config):
    from raypipe.data import load_splits
    from raypipe.metrics import from_confusion
    from raypipe.predict import Predictor
    from raypipe.training import run

    cfg = _cfg(tiny_config, scaling__num_workers=2, train__epochs=4)
    result = run(cfg)

    losses = [h["train_loss"] for h in result.history]
    assert [h["epoch"] for h in result.history] == [1, 2, 3, 4]
    assert losses[-1] < losses[0], losses
    assert result.best_value is not None and result.best_value > 0.6  # chance is 1/3

    client, runs = _runs(cfg)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run_id = runs[0].info.run_id
    assert run_id == result.mlflow_run_id
    for key in ("val_loss", "val_accuracy", "val_macro_f1", "train_loss"):
        assert [m.step for m in client.get_metric_history(run_id, key)] == [1, 2, 3, 4]
    params = runs[0].data.params
    assert params["train.lr"] == str(cfg.train.lr) and params["scaling.num_workers"] == "2"
    assert runs[0].data.tags["data.fingerprint"] == result.fingerprint
    assert runs[0].data.tags["version.ray"].startswith("2.")
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"checkpoint", "plots", "config.yaml", "schema.json"} <= artifacts  # the task and its schema
    assert {"checkpoint/model.safetensors", "checkpoint/raypipe.json"} <= {
        a.path for a in client.list_artifacts(run_id, "checkpoint")
    }
    assert {"plots/learning_curves.png", "plots/confusion_matrix.png"} <= {
        a.path for a in client.list_artifacts(run_id, "plots")
    }

    # The saved checkpoint, reloaded offline, reproduces the validation score the workers reported.
    splits = load_splits(cfg.data)
    pred = Predictor.from_dir(result.best_checkpoint, device="cpu")
    probs = pred.predict_proba(list(splits.val["text"]))
    y_true = splits.label_ids(splits.val).to_numpy()
    cm = np.zeros((3, 3), dtype=int)
    np.add.at(cm, (y_true, probs.argmax(1)), 1)
    assert from_confusion(cm)["macro_f1"] == pytest.approx(result.best_value, abs=1e-6)


def _loop_failing_in_epoch_2(rank: int, message: str, once_marker: str | None = None):
    """The real worker loop, except that worker ``rank`` raises just before reporting epoch 2
    (only the first time, when ``once_marker`` names a file to leave behind)."""

    def loop(config):
        import os

        import ray.train

        from raypipe.loop import train_loop_per_worker

        real_report = ray.train.report

        def report(metrics, checkpoint=None, **kw):
            if metrics["epoch"] == 2 and ray.train.get_context().get_world_rank() == rank:
                if once_marker is None or not os.path.exists(once_marker):
                    if once_marker:
                        open(once_marker, "w").close()
                    raise RuntimeError(message)
            return real_report(metrics, checkpoint=checkpoint, **kw)

        ray.train.report = report
        try:
            train_loop_per_worker(config)
        finally:
            ray.train.report = real_report

    return loop


# Slow tier: tests/reliability/test_worker_kill.py covers the same resume (and the exhausted-retries
# end) with a real SIGKILL in the default tier; these two raise a Python exception in the loop.
@pytest.mark.slow
def test_worker_failure_resumes_from_checkpoint_into_the_same_mlflow_run(ray_local, tiny_config, tmp_path, capfd):
    from raypipe.training import run

    marker = str(tmp_path / "failed-once")
    flaky_loop = _loop_failing_in_epoch_2(rank=1, message="injected failure in epoch 2", once_marker=marker)

    cfg = _cfg(tiny_config, scaling__num_workers=2, scaling__max_failures=1, train__epochs=3)
    result = run(cfg, train_loop=flaky_loop)

    assert (tmp_path / "failed-once").exists()
    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    client, runs = _runs(cfg)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run_id = runs[0].info.run_id
    assert runs[0].data.tags["raypipe.worker_failures"] == "1"
    assert "injected failure" in runs[0].data.tags["raypipe.last_worker_error"]
    for key in ("val_loss", "val_macro_f1"):
        assert sorted(m.step for m in client.get_metric_history(run_id, key)) == [1, 2, 3]
    assert "resumed from the checkpoint of epoch 1" in capfd.readouterr().out


@pytest.mark.slow
def test_exhausted_failures_end_the_mlflow_run_failed_with_the_error(ray_local, tiny_config):
    from raypipe.errors import TrainingError
    from raypipe.training import run

    always_fails_in_epoch_2 = _loop_failing_in_epoch_2(rank=0, message="disk on fire")

    cfg = _cfg(tiny_config, scaling__num_workers=1, scaling__max_failures=0, train__epochs=3)
    with pytest.raises(TrainingError, match="best checkpoint so far: .*checkpoint") as err:
        run(cfg, train_loop=always_fails_in_epoch_2)
    assert "disk on fire" in str(err.value)
    _, runs = _runs(cfg)
    assert len(runs) == 1 and runs[0].info.status == "FAILED"
    assert "disk on fire" in runs[0].data.tags["raypipe.error"]


def test_local_mode_trains_in_process_and_still_logs_metrics(ray_local, tiny_config):
    from raypipe.model import read_meta
    from raypipe.training import run

    cfg = _cfg(tiny_config, scaling__num_workers=0, train__epochs=3, train__keep_checkpoints=1)
    result = run(cfg)
    assert read_meta(result.best_checkpoint)["schema"]["labels"] == ["food", "sport", "tech"]
    client, runs = _runs(cfg)
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "val_loss")] == [1, 2, 3]
    from pathlib import Path

    kept = sorted(p.name for p in Path(result.run_path).glob("checkpoint_epoch_*"))
    assert len(kept) <= 2 and "checkpoint_epoch_0003" in kept  # best-1 plus the latest


def test_gpu_requested_without_gpu_fails_before_training(ray_local, tiny_config):
    from raypipe.training import run

    cfg = _cfg(tiny_config, scaling__use_gpu=True)
    with pytest.raises(ConfigError, match="scaling.use_gpu"):
        run(cfg)
    _, runs = _runs(cfg)
    assert runs == []  # nothing half-written


def test_cli_train_prints_summary(ray_local, tiny_config, tmp_path, capsys):
    import yaml

    from raypipe.cli import main

    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(tiny_config.model_dump(mode="json")))
    assert main(["train", str(path), "scaling.num_workers=0", "train.epochs=1"]) == 0
    out = capsys.readouterr().out
    assert "best val_macro_f1:" in out and "MLflow run id:" in out and "raypipe ui" in out


def _threads_probe(out_file: str):
    """The real loop; afterwards the worker writes its CPU reservation and torch's thread count."""

    def loop(config):
        import json

        import ray
        import torch

        from raypipe.loop import train_loop_per_worker

        train_loop_per_worker(config)
        with open(out_file, "w") as f:
            json.dump({"cpus": ray.get_runtime_context().get_assigned_resources().get("CPU"),
                       "threads": torch.get_num_threads()}, f)

    return loop


def test_auto_cpus_give_a_lone_worker_every_core_and_as_many_torch_threads(ray_local, tiny_config, tmp_path, capfd):
    import json

    from raypipe.training import run

    cfg = _cfg(tiny_config, scaling__num_workers=1, scaling__cpus_per_worker="auto", train__epochs=1)
    assert cfg.scaling.cpus_per_worker == "auto"
    out = tmp_path / "threads.json"
    run(cfg, train_loop=_threads_probe(str(out)))
    seen = json.loads(out.read_text())
    assert seen == {"cpus": 2.0, "threads": 2}, seen  # the session's Ray has 2 CPUs on one node
    assert "1 worker(s) x 2 CPU (auto)" in capfd.readouterr().out


def test_a_worker_reserving_just_under_2_cpus_still_gets_2_torch_threads(ray_local):
    """A sweep's lone trial reserves 2 - 0.01 CPU per worker beside its 0.01-CPU driver; Ray alone
    would give torch floor(1.99) = 1 thread. The worker loop rounds instead."""
    import ray

    @ray.remote(num_cpus=1.99)
    def threads() -> tuple[int, int]:
        import torch

        from raypipe.loop import _threads_for_reservation

        before = torch.get_num_threads()
        _threads_for_reservation()
        return before, torch.get_num_threads()

    assert ray.get(threads.remote()) == (1, 2)


def test_the_epoch_callback_opens_the_mlflow_store_as_it_reaches_the_controller(tmp_path):
    """Not in its first report: there it held up the controller's polling (and the workers)."""
    import cloudpickle
    from mlflow.tracking import MlflowClient

    from raypipe.tracking import train_callback

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    run_id = client.create_run(client.create_experiment("warm")).info.run_id
    client.log_metric(run_id, "val_loss", 0.5, step=1)  # as if a restarted controller took over
    cb = train_callback(uri, run_id)
    assert cb.logger._logged is None  # nothing opened in the driver
    remote = cloudpickle.loads(cloudpickle.dumps(cb))  # how Ray hands it to the controller
    remote._warming.join(timeout=120)
    assert remote.logger._logged == {1}  # read back before any report arrived
    remote.after_report(None, [{"epoch": 1, "val_loss": 0.4}], None)  # logged already: not twice
    remote.after_report(None, [{"epoch": 2, "val_loss": 0.3}], None)
    assert [m.step for m in client.get_metric_history(run_id, "val_loss")] == [1, 2]
