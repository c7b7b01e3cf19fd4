"""``raypipe reproduce``: a run's config rebuilt from its MLflow params, refused on changed data,
rerun and compared (tiny model, local-mode training, a real sqlite store)."""

from __future__ import annotations

import pytest
import yaml

from raypipe.config import config_from_dict, flatten
from raypipe.tracking import safe_params

pytestmark = pytest.mark.ray


def _cfg(tiny_config):
    tree = tiny_config.model_dump(mode="json")
    tree["scaling"]["num_workers"] = 0  # local mode: the driver trains, quick and deterministic
    tree["train"]["epochs"] = 2
    tree["data"]["text_columns"] = ["text"]
    return config_from_dict(tree).with_absolute_paths()


def test_the_config_comes_back_from_the_runs_params(tiny_config):
    from raypipe.reproduce import config_from_run

    cfg = _cfg(tiny_config)
    params = safe_params(flatten(cfg.model_dump(mode="json")))
    params.update({"data.train_size": "252", "data.num_labels": "3", "data.check.removed": "{}"})
    back = config_from_run(params)
    assert back.model_dump(mode="json") == cfg.model_dump(mode="json")


def test_reproduce_refuses_changed_data_then_reruns_within_half_a_point(ray_local, tiny_config, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from raypipe.cli import main
    from raypipe.training import run as train

    cfg = _cfg(tiny_config)
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    original = train(cfg)
    from raypipe.evaluation import run as evaluate

    evaluated = evaluate(original.best_checkpoint, cfg)
    client = MlflowClient(tracking_uri=cfg.resolved_tracking_uri)
    for k, v in evaluated.metrics.items():
        client.log_metric(original.mlflow_run_id, k, v)

    # Other data behind the same path: refused before any training, exit 2.
    client.set_tag(original.mlflow_run_id, "data.fingerprint", "0" * 64)
    assert main(["reproduce", original.mlflow_run_id, "--config", str(cfg_file)]) == 2
    err = capsys.readouterr().err
    assert "the data changed since run" in err and "--allow-data-change" in err
    assert len(client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])) == 2

    client.set_tag(original.mlflow_run_id, "data.fingerprint", original.fingerprint)
    assert main(["reproduce", original.mlflow_run_id, "--config", str(cfg_file)]) == 0
    out = capsys.readouterr().out
    assert f"Reproduction of run {original.mlflow_run_id}" in out and "test_macro_f1" in out
    again = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id],
                               filter_string=f"tags.`raypipe.reproduces` = '{original.mlflow_run_id}'")
    assert len(again) == 1
    new = {k: v for k, v in client.get_run(again[0].info.run_id).data.params.items()}
    assert new["train.lr"] == client.get_run(original.mlflow_run_id).data.params["train.lr"]
    line = next(x for x in out.splitlines() if x.strip().startswith("test_macro_f1"))
    assert abs(float(line.split()[-1])) <= 0.005, line
