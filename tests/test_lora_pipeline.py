"""`raypipe run` with LoRA on a real local Ray with two DDP workers: the registered version holds the adapter only,
its tags name the base, and MLflow's own pyfunc loader predicts with it."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow.tracking import MlflowClient

from raypipe.cli import main as cli

pytestmark = pytest.mark.ray


def test_raypipe_run_with_lora_registers_an_adapter_that_pyfunc_loads(ray_local, tmp_path, tiny_model_dir, toy_csv, capsys):
    cfg_path = tmp_path / "lora.yaml"
    cfg_path.write_text(yaml.safe_dump({
        "name": "e2e-lora", "workdir": str(tmp_path / "work"),
        "data": {"path": str(toy_csv), "max_length": 32},
        "model": {"name": str(tiny_model_dir), "peft": {"r": 8, "alpha": 16}},
        "train": {"epochs": 6, "batch_size": 16, "lr": 1e-2, "warmup_ratio": 0.0},
        # Two DDP workers: LoRA freezes most weights, which DDP must leave out of its all-reduce.
        "scaling": {"num_workers": 2, "use_gpu": False, "cpus_per_worker": 0.5},
        "registry": {"model_name": "e2e-lora", "alias": "champion"},
    }))
    assert cli(["run", str(cfg_path), "--no-serve"]) == 0, capsys.readouterr()
    out = capsys.readouterr().out
    from raypipe.config import load_config

    cfg = load_config(cfg_path)
    client = MlflowClient(tracking_uri=cfg.resolved_tracking_uri)
    version = client.get_model_version_by_alias("e2e-lora", "champion")
    assert version.tags["raypipe.base_model"] == str(tiny_model_dir), version.tags
    assert version.tags["raypipe.base_fingerprint"].startswith("sha256:")
    assert version.tags["raypipe.peft"] == "lora r=8"
    assert float(version.tags["test_accuracy"]) > 0.6, out  # chance is 1/3
    mlflow.set_tracking_uri(cfg.resolved_tracking_uri)
    local = Path(mlflow.artifacts.download_artifacts(version.source))
    names = {p.name for p in local.rglob("*")}
    assert "adapter_model.safetensors" in names and "model.safetensors" not in names
    size = sum(p.stat().st_size for p in local.rglob("*.safetensors"))
    assert size * 20 < (tiny_model_dir / "model.safetensors").stat().st_size
    # The data check's counts are on the training run (the toy set's random texts repeat a little).
    from raypipe.data import load_splits

    checks = load_splits(cfg.data).checks
    train_runs = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id],
                                    "tags.`raypipe.stage` = 'train'")
    assert train_runs and train_runs[0].data.params["data.check.test_in_train"] == str(checks["test_in_train"])
    assert json.loads(train_runs[0].data.params["data.check.removed"]) == {"train": 0, "val": 0, "test": 0}
    model = mlflow.pyfunc.load_model(f"models:/e2e-lora@champion")
    import pandas as pd

    answers = model.predict(pd.DataFrame({"text": ["goal team striker match league", "chip robot code phone"]}))
    assert list(answers["label"]) == ["sport", "tech"], answers
