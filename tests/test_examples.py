"""Every shipped config validates, and every example script wires its arguments to the right stage.

The scripts run in-process exactly as `python examples/<script>.py ...` runs them (runpy, as
``__main__``), with the stage replaced by a recorder, so these tests need no Ray. The real run of an
example under `ray job submit` is tests/test_job_submit.py.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

import raypipe
from raypipe.cli import main as cli
from raypipe.config import load_config
from raypipe.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
CONFIGS = sorted((EXAMPLES / "configs").glob("*.yaml"))
SCRIPTS = ("train.py", "tune.py", "pipeline.py")
QUICKSTART = str(EXAMPLES / "configs" / "quickstart.yaml")


@pytest.fixture(autouse=True)
def data_dir(monkeypatch, tmp_path):
    """The task examples read their data from $RAYPIPE_DATA_DIR (real data lives outside the repo)."""
    monkeypatch.setenv("RAYPIPE_DATA_DIR", str(tmp_path / "data"))
    return tmp_path / "data"


def test_the_documented_configs_are_shipped():
    assert {"quickstart.yaml", "sst2_hub.yaml", "gpu.yaml", "csv.yaml", "goemotions.yaml", "stsb.yaml"} <= {
        p.name for p in CONFIGS
    }


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_is_valid(path, capsys):
    cfg = load_config(path)
    assert cfg.name and cfg.data.path and cfg.model.name
    assert cli(["validate", str(path)]) == 0
    assert "is a valid raypipe config" in capsys.readouterr().out


def test_configs_say_what_their_names_promise():
    sst2 = load_config(EXAMPLES / "configs" / "sst2_hub.yaml")
    assert (sst2.model.name, sst2.data.path) == ("distilbert-base-uncased", "stanfordnlp/sst2")
    assert sst2.data.text_columns == ["sentence"] and sst2.data.hf_split == "train"

    gpu = load_config(EXAMPLES / "configs" / "gpu.yaml")
    assert gpu.scaling.use_gpu is True and gpu.scaling.gpus_per_worker == 1
    assert gpu.train.precision == "bf16"
    assert gpu.train.batch_size > load_config(EXAMPLES / "configs" / "quickstart.yaml").train.batch_size

    csv = load_config(EXAMPLES / "configs" / "csv.yaml")
    assert csv.data.format == "csv" and csv.data.text_columns == ["title", "description"]
    assert csv.data.validation_path and csv.data.test_path


def test_task_examples_read_their_data_where_the_environment_says(data_dir):
    emo = load_config(EXAMPLES / "configs" / "goemotions.yaml")
    assert emo.task == "multi_label" and emo.train.metric == "val_micro_f1"
    assert emo.registry.promotion_metric == "test_micro_f1"
    assert emo.data.path == f"{data_dir}/goemotions/train.tsv"
    assert emo.data.label_names == f"{data_dir}/goemotions/emotions.txt"
    assert (emo.data.header, emo.data.quoting, emo.data.label_separator) == (False, "csv", ",")

    sts = load_config(EXAMPLES / "configs" / "stsb.yaml")
    assert sts.task == "regression" and sts.data.text_pair_column == "sentence2"
    assert sts.data.quoting == "none" and sts.train.metric == "val_pearson"
    assert sts.data.test_path == f"{data_dir}/stsb/dev.tsv"


def test_an_unset_data_variable_is_a_config_error_naming_it(monkeypatch, capsys):
    monkeypatch.delenv("RAYPIPE_DATA_DIR")
    with pytest.raises(ConfigError, match=r"data.path: environment variable RAYPIPE_DATA_DIR is not set"):
        load_config(EXAMPLES / "configs" / "stsb.yaml")
    assert cli(["validate", str(EXAMPLES / "configs" / "stsb.yaml")]) == 2
    assert "RAYPIPE_DATA_DIR" in capsys.readouterr().err
    # overrides instead of the variable work too
    cfg = load_config(EXAMPLES / "configs" / "stsb.yaml", ["data.path=/d/train.tsv", "data.test_path=/d/dev.tsv"])
    assert cfg.data.path == "/d/train.tsv"


# --------------------------------------------------------------------- example scripts


@pytest.fixture
def run_example(monkeypatch, capsys):
    """Run examples/<script> as __main__ with argv; return (exit code, stdout, stderr)."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    monkeypatch.delenv("RAYPIPE_STORAGE_PATH", raising=False)

    def run(script: str, *argv: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", [str(EXAMPLES / script), *argv])
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_path(str(EXAMPLES / script), run_name="__main__")
        out = capsys.readouterr()
        return exit_info.value.code, out.out, out.err

    return run


class Recorder:
    """Stands in for a stage: records the config and options it was called with."""

    best_checkpoint, best_run_id = "/sweep/best/checkpoint", "best-run-id"

    def __init__(self, raises: Exception | None = None):
        self.calls: list[tuple[object, dict]] = []
        self.raises = raises

    def __call__(self, cfg, **kwargs):
        self.calls.append((cfg, kwargs))
        if self.raises:
            raise self.raises
        return self

    def summary(self) -> str:
        return "RECORDED SUMMARY"


@pytest.fixture
def stages(monkeypatch):
    import raypipe.pipeline

    rec = {"train.py": Recorder(), "tune.py": Recorder(), "pipeline.py": Recorder(), "winner": []}
    monkeypatch.setattr(raypipe, "train", rec["train.py"])
    monkeypatch.setattr(raypipe, "tune", rec["tune.py"])
    monkeypatch.setattr(raypipe.pipeline, "run", rec["pipeline.py"])
    monkeypatch.setattr(raypipe.pipeline, "evaluate_and_register",
                        lambda cfg, checkpoint, **kw: rec["winner"].append((checkpoint, kw)))
    return rec


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_passes_config_overrides_and_smoke_test_to_its_stage(script, run_example, stages):
    quickstart = load_config(EXAMPLES / "configs" / "quickstart.yaml")
    code, out, _ = run_example(script, "--config", QUICKSTART, "train.lr=3e-5", "--smoke-test")
    assert code == 0
    assert "RECORDED SUMMARY" in out
    (cfg, _kwargs), = stages[script].calls
    assert cfg.train.lr == 3e-5  # the override
    assert cfg.train.epochs == 1 and cfg.data.max_samples == 200  # the smoke test
    assert cfg.tune.num_samples == min(quickstart.tune.num_samples, 2)
    assert cfg.model.name == quickstart.model.name  # the rest is the config's


def test_without_smoke_test_the_config_is_used_as_written(run_example, stages):
    assert run_example("train.py", "--config", QUICKSTART)[0] == 0
    (cfg, _), = stages["train.py"].calls
    assert cfg == load_config(EXAMPLES / "configs" / "quickstart.yaml")


def test_smoke_test_never_grows_a_run(run_example, stages):
    run_example("tune.py", "--config", QUICKSTART, "--smoke-test",
                "data.max_samples=50", "tune.num_samples=1")
    (cfg, _), = stages["tune.py"].calls
    assert (cfg.data.max_samples, cfg.tune.num_samples) == (50, 1)


def test_script_specific_options(run_example, stages):
    run_example("tune.py", "--config", QUICKSTART, "--resume")
    run_example("pipeline.py", "--config", QUICKSTART, "--no-serve")
    kwargs = stages["tune.py"].calls[0][1]
    assert kwargs["resume"] is True and kwargs["splits"].summary()  # the data, read once
    assert stages["pipeline.py"].calls[0][1] == {"serve": False}
    # the sweep's winner is evaluated and registered on the same splits, unless --no-register
    (checkpoint, kw), = stages["winner"]
    assert checkpoint == Recorder.best_checkpoint and kw["source_run_id"] == Recorder.best_run_id
    assert kw["splits"] is kwargs["splits"]
    run_example("tune.py", "--config", QUICKSTART, "--no-register")
    assert len(stages["winner"]) == 1 and len(stages["tune.py"].calls) == 2


def test_storage_path_comes_from_the_environment_a_cluster_sets(run_example, stages, monkeypatch):
    monkeypatch.setenv("RAYPIPE_STORAGE_PATH", "s3://bucket/raypipe")
    run_example("train.py", "--config", str(EXAMPLES / "configs" / "gpu.yaml"))
    run_example("train.py", "--config", str(EXAMPLES / "configs" / "gpu.yaml"), "storage_path=/mnt/shared/ray")
    assert [c.storage_path for c, _ in stages["train.py"].calls] == ["s3://bucket/raypipe", "/mnt/shared/ray"]


def test_a_raypipe_error_exits_2_with_its_message(run_example, monkeypatch):
    monkeypatch.setattr(raypipe, "train", Recorder(raises=ConfigError("scaling.use_gpu: no GPU here")))
    code, out, err = run_example("train.py", "--config", QUICKSTART)
    assert code == 2
    assert "train.py: error:" in err and "scaling.use_gpu: no GPU here" in err
    assert "Traceback" not in err + out


def test_bad_config_and_missing_data_fail_before_any_ray_work(run_example):
    code, _, err = run_example("pipeline.py", "--config", str(EXAMPLES / "configs" / "nope.yaml"))
    assert code == 2 and "does not exist" in err
    code, _, err = run_example("train.py", "--config", QUICKSTART, "train.epochs=0")
    assert code == 2 and "train.epochs" in err
    # csv.yaml points at files the user is meant to replace: the real stage says which is missing.
    code, _, err = run_example("train.py", "--config", str(EXAMPLES / "configs" / "csv.yaml"))
    assert code == 2 and "data/news/train.csv" in err


def test_sft_examples_read_alpaca_in_place_and_name_their_models(data_dir):
    tiny = load_config(EXAMPLES / "configs" / "alpaca_sft.yaml")
    hub = load_config(EXAMPLES / "configs" / "alpaca_sft_hub.yaml")
    for cfg in (tiny, hub):
        assert cfg.task == "sft" and cfg.data.path == f"{data_dir}/alpaca/alpaca_data.json"
        assert cfg.train.metric == "val_loss" and cfg.data.bad_rows == "skip"
    # the CPU example trains the tiny model examples/tiny_lm.py builds, in full (random init)
    assert tiny.model.name == "raypipe-work/tiny-lm" and tiny.model.peft is None
    assert "python examples/tiny_lm.py --out raypipe-work/tiny-lm" in (EXAMPLES / "configs" / "alpaca_sft.yaml").read_text()
    # the hub example: a real instruct model with LoRA on its attention projections
    assert hub.model.name == "Qwen/Qwen2.5-0.5B-Instruct"
    assert hub.model.peft is not None and hub.model.peft.target_modules == "auto"
    assert hub.train.gradient_checkpointing and hub.data.packing
