"""raypipe.registry and raypipe.pyfunc against a real MLflow sqlite store (no mocks).

"Better" and "worse" models are real: the tiny BERT trained for a few seconds in plain torch,
and a constant checkpoint that always answers "sport" (macro-F1 1/6 on the balanced toy test
split). Where a test needs exact gate arithmetic it passes metrics explicitly instead.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from test_evaluation import (
    config_file,
    make_constant_checkpoint,
    module_config,
    train_tiny_checkpoint,
)

from raypipe import __version__
from raypipe.errors import CheckpointError, DataError, RegistryError
from raypipe.predict import Predictor
from raypipe.registration import register_checkpoint
from raypipe.registry import list_models, load_predictor, promote, resolve

TEXTS = ["goal match team league", "software chip code", "bread soup chef", "the a of and"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir, toy_csv) -> Path:
    cfg = module_config(tmp_path_factory, tiny_model_dir, toy_csv, "train-reg")
    return train_tiny_checkpoint(cfg, tmp_path_factory.mktemp("trained") / "ckpt")


@pytest.fixture(scope="module")
def always_sport(tmp_path_factory, tiny_checkpoint) -> Path:
    return make_constant_checkpoint(tiny_checkpoint, tmp_path_factory.mktemp("const") / "ckpt", "sport")


@pytest.fixture(scope="module")
def store_cfg(tmp_path_factory, tiny_model_dir, toy_csv):
    """One store shared by the tests that each use their own model name (creating a sqlite
    store runs MLflow's migrations, about a second each)."""
    return module_config(tmp_path_factory, tiny_model_dir, toy_csv, "shared-store")


def client_for(cfg):
    from mlflow.tracking import MlflowClient

    uri = cfg.resolved_tracking_uri
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def registry_state(cfg) -> set[tuple[str, str]]:
    """Every (model, version) in the store, plus (model, "") for each model: what a failed
    registration must leave unchanged."""
    if not (cfg.workdir_path / "mlflow.db").exists():
        return set()
    client = client_for(cfg)
    state = set()
    for rm in client.search_registered_models():
        state.add((rm.name, ""))
        state |= {(rm.name, str(mv.version)) for mv in client.search_model_versions(f"name='{rm.name}'")}
    return state


def champion(cfg, name: str, alias: str = "champion") -> str | None:
    version = client_for(cfg).get_registered_model(name).aliases.get(alias)
    return None if version is None else str(version)


# --------------------------------------------------------------------------- register + resolve


def test_register_creates_tagged_version_and_champion_resolves_to_identical_predictor(store_cfg, trained):
    result = register_checkpoint(
        trained, store_cfg, name="reg-basic", metrics={"test_accuracy": 0.9, "test_macro_f1": 0.88}, fingerprint="fp123"
    )

    assert (result.name, result.version, result.uri) == ("reg-basic", "1", "models:/reg-basic/1")
    mv = client_for(store_cfg).get_model_version("reg-basic", "1")
    assert mv.run_id == result.run_id
    assert mv.source == result.source and mv.source.startswith("models:/m-")  # an MLflow 3 LoggedModel
    logged = client_for(store_cfg).get_logged_model(mv.source.removeprefix("models:/"))
    assert logged.source_run_id == result.run_id and str(logged.status) in ("READY", "LoggedModelStatus.READY")
    assert {m.key: m.value for m in logged.metrics} == {"test_accuracy": 0.9, "test_macro_f1": 0.88}
    assert mv.tags["raypipe.source_run"] == result.run_id
    assert float(mv.tags["test_accuracy"]) == 0.9 and float(mv.tags["test_macro_f1"]) == 0.88
    assert mv.tags["raypipe.data_fingerprint"] == "fp123"
    assert mv.tags["raypipe.version"] == __version__
    assert mv.tags["raypipe.promotion"] == "promoted"
    assert champion(store_cfg, "reg-basic") == "1"
    run = client_for(store_cfg).get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["raypipe.registered_as"] == "models:/reg-basic/1"

    resolved = resolve("models:/reg-basic@champion", tracking_uri=store_cfg.resolved_tracking_uri)
    assert (resolved.name, resolved.version, resolved.alias, resolved.run_id) == ("reg-basic", "1", "champion", result.run_id)
    assert not (Path(resolved.path) / "train_state.pt").exists(), "optimizer state must not reach the registry"
    assert (Path(trained) / "train_state.pt").exists()

    original = Predictor.from_dir(trained, device="cpu").predict_proba(TEXTS)
    from_registry = Predictor.from_dir(resolved.path, device="cpu").predict_proba(TEXTS)
    assert abs(original - from_registry).max() < 1e-6

    via_uri = load_predictor("models:/reg-basic/1", device="cpu", tracking_uri=store_cfg.resolved_tracking_uri)
    assert via_uri.meta["model_name"] == "reg-basic" and via_uri.meta["model_version"] == "1"
    assert via_uri.meta["run_id"] == result.run_id

    summary = result.summary()
    assert "models:/reg-basic/1" in summary and "promoted to @champion" in summary


def test_resolve_reuses_the_downloaded_copy(store_cfg, trained):
    register_checkpoint(trained, store_cfg, name="reg-cache", metrics={"test_macro_f1": 0.5})
    uri = store_cfg.resolved_tracking_uri
    first = resolve("models:/reg-cache/1", tracking_uri=uri)
    weights = Path(first.path) / "model.safetensors"
    before = (weights.stat().st_ino, weights.stat().st_mtime_ns)

    again = resolve("models:/reg-cache@champion", tracking_uri=uri)
    latest = resolve("models:/reg-cache/latest", tracking_uri=uri)

    assert again.path == latest.path == first.path
    assert (weights.stat().st_ino, weights.stat().st_mtime_ns) == before  # not downloaded again
    assert Path(first.path).is_relative_to(store_cfg.workdir_path / "model-cache")
    assert not [p for p in Path(first.path).parent.parent.iterdir() if p.name.startswith(".download-")]


def test_local_checkpoint_dir_resolves_to_itself(trained):
    resolved = resolve(str(trained))
    assert resolved.path == str(Path(trained).resolve())
    assert resolved.as_meta() == {"model_name": None, "model_version": None, "run_id": None}


def test_register_into_the_training_run_keeps_earlier_versions_intact(store_cfg, trained, always_sport):
    client = client_for(store_cfg)
    experiment = client.get_experiment_by_name(store_cfg.tracking.experiment)
    if experiment is None:
        from raypipe.tracking import configure

        _, experiment_id = configure(store_cfg)
    else:
        experiment_id = experiment.experiment_id
    training_run = client.create_run(experiment_id, run_name="pretend-training").info.run_id

    first = register_checkpoint(trained, store_cfg, name="reg-src", metrics={"test_macro_f1": 0.9}, source_run_id=training_run)
    second = register_checkpoint(always_sport, store_cfg, name="reg-src", metrics={"test_macro_f1": 0.1}, source_run_id=training_run)

    assert first.run_id == second.run_id == training_run
    # Each version is a LoggedModel of its own, output of the training run (MLflow 3).
    assert first.source.startswith("models:/m-") and second.source.startswith("models:/m-")
    assert first.source != second.source
    outputs = {o.model_id for o in client.get_run(training_run).outputs.model_outputs}
    assert outputs >= {first.source.removeprefix("models:/"), second.source.removeprefix("models:/")}
    uri = store_cfg.resolved_tracking_uri
    one = load_predictor("models:/reg-src/1", device="cpu", tracking_uri=uri).predict(TEXTS)
    assert [p["label"] for p in one] == [p["label"] for p in Predictor.from_dir(trained).predict(TEXTS)]
    two = load_predictor("models:/reg-src/2", device="cpu", tracking_uri=uri).predict(TEXTS)
    assert {p["label"] for p in two} == {"sport"}

    with pytest.raises(RegistryError, match="source run 'nope' does not exist"):
        register_checkpoint(trained, store_cfg, name="reg-src", metrics={"test_macro_f1": 0.9}, source_run_id="nope")
    assert ("reg-src", "3") not in registry_state(store_cfg)


# --------------------------------------------------------------------------- promotion gate


def test_gate_keeps_champion_against_worse_moves_for_better_and_for_force(store_cfg, trained, always_sport):
    name = "reg-gate"
    v1 = register_checkpoint(trained, store_cfg, name=name, metrics={"test_macro_f1": 0.60})
    assert v1.decision.promoted and v1.decision.previous_version is None

    worse = register_checkpoint(always_sport, store_cfg, name=name, metrics={"test_macro_f1": 0.40})
    assert not worse.decision.promoted
    assert (worse.decision.previous_version, worse.decision.previous_value) == ("1", 0.60)
    assert "does not beat @champion v1 (0.6000)" in worse.decision.reason
    assert champion(store_cfg, name) == "1"
    tags = client_for(store_cfg).get_model_version(name, worse.version).tags
    assert tags["raypipe.promotion"] == "rejected" and tags["raypipe.promotion_reason"] == worse.decision.reason

    equal = register_checkpoint(always_sport, store_cfg, name=name, metrics={"test_macro_f1": 0.60})
    assert not equal.decision.promoted, "a tie is not an improvement"

    better = register_checkpoint(trained, store_cfg, name=name, metrics={"test_macro_f1": 0.75})
    assert better.decision.promoted and "beats @champion v1" in better.decision.reason
    assert champion(store_cfg, name) == better.version

    forced = register_checkpoint(always_sport, store_cfg, name=name, metrics={"test_macro_f1": 0.10}, force=True)
    assert forced.decision.promoted and forced.decision.forced and forced.decision.reason.startswith("forced")
    assert champion(store_cfg, name) == forced.version
    assert client_for(store_cfg).get_model_version(name, forced.version).tags["raypipe.promotion"] == "promoted"


def test_gate_min_improvement_and_custom_alias(store_cfg, trained):
    cfg = store_cfg.model_copy(update={"registry": store_cfg.registry.model_copy(
        update={"alias": "prod", "min_improvement": 0.05, "promotion_metric": "test_accuracy"})})
    name = "reg-margin"
    register_checkpoint(trained, cfg, name=name, metrics={"test_accuracy": 0.80, "test_macro_f1": 0.1})
    small = register_checkpoint(trained, cfg, name=name, metrics={"test_accuracy": 0.84, "test_macro_f1": 0.99})
    assert not small.decision.promoted and "by more than 0.05" in small.decision.reason
    big = register_checkpoint(trained, cfg, name=name, metrics={"test_accuracy": 0.86})
    assert big.decision.promoted
    aliases = client_for(cfg).get_registered_model(name).aliases
    assert {a: str(v) for a, v in aliases.items()} == {"prod": big.version}


def test_register_without_metrics_evaluates_and_the_better_model_wins(tiny_config, trained, always_sport):
    const = register_checkpoint(always_sport, tiny_config, name="reg-eval")
    # Balanced 3-class test split, always "sport": accuracy 1/3, macro-F1 (0 + 0.5 + 0) / 3.
    assert const.metrics["test_accuracy"] == pytest.approx(1 / 3)
    assert const.metrics["test_macro_f1"] == pytest.approx(1 / 6)
    assert const.decision.promoted and const.eval_run_id
    client = client_for(tiny_config)
    assert {f.path for f in client.list_artifacts(const.eval_run_id, "evaluation")} >= {"evaluation/confusion_matrix.png"}
    tags = client.get_model_version("reg-eval", "1").tags
    assert tags["raypipe.eval_run"] == const.eval_run_id and tags["raypipe.data_fingerprint"] == const.fingerprint

    good = register_checkpoint(trained, tiny_config, name="reg-eval")
    assert good.metrics["test_macro_f1"] > 0.8
    assert good.decision.promoted and champion(tiny_config, "reg-eval") == good.version

    again = register_checkpoint(always_sport, tiny_config, name="reg-eval")
    assert not again.decision.promoted and champion(tiny_config, "reg-eval") == good.version


def test_register_without_metric_or_data_cannot_gate(tiny_checkpoint, tmp_path):
    from raypipe.config import config_from_dict

    cfg = config_from_dict({"workdir": str(tmp_path / "w")})
    result = register_checkpoint(tiny_checkpoint, cfg, name="reg-nogate")
    assert not result.decision.promoted and "cannot gate" in result.decision.reason and "--force" in result.decision.reason
    assert champion(cfg, "reg-nogate") is None
    assert "not promoted" in result.summary()

    forced = register_checkpoint(tiny_checkpoint, cfg, name="reg-nogate", force=True)
    assert forced.decision.promoted and champion(cfg, "reg-nogate") == forced.version


def test_promote_keeps_a_champion_that_has_no_score(store_cfg, trained):
    no_data = store_cfg.model_copy(update={"data": store_cfg.data.model_copy(update={"path": None})})
    first = register_checkpoint(trained, no_data, name="reg-unscored", force=True)  # unscored, forced in
    assert first.metrics == {} and champion(store_cfg, "reg-unscored") == "1"
    register_checkpoint(trained, no_data, name="reg-unscored")  # unscored: cannot gate
    decision = promote(client_for(store_cfg), "reg-unscored", "2", "test_macro_f1", 0.99)
    assert not decision.promoted and "has no test_macro_f1 tag" in decision.reason
    assert champion(store_cfg, "reg-unscored") == "1"
    assert client_for(store_cfg).get_model_version("reg-unscored", "2").tags["test_macro_f1"] == "0.99"


# --------------------------------------------------------------------------- pyfunc


def test_pyfunc_loads_with_plain_mlflow_and_matches_predictor(store_cfg, trained, monkeypatch, request, tmp_path):
    import mlflow
    import pandas as pd
    from mlflow.exceptions import MlflowException
    from mlflow.types import DataType

    register_checkpoint(trained, store_cfg, name="reg-pyfunc", metrics={"test_macro_f1": 0.9})
    uri = store_cfg.resolved_tracking_uri
    # mlflow.set_*_uri export env vars; monkeypatch puts them back, the finalizer resets mlflow.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
    request.addfinalizer(lambda: (mlflow.set_tracking_uri(None), mlflow.set_registry_uri(None)))
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)

    model = mlflow.pyfunc.load_model("models:/reg-pyfunc/1")

    expected = Predictor.from_dir(trained, device="cpu").predict(TEXTS)
    for given in (TEXTS, pd.Series(TEXTS), pd.DataFrame({"text": TEXTS, "other": 1})):
        out = model.predict(given)
        assert list(out.columns) == ["label", "score", "probabilities"]
        assert list(out["label"]) == [e["label"] for e in expected]
        assert list(out["score"]) == pytest.approx([e["score"] for e in expected], abs=1e-6)
        assert set(out["probabilities"][0]) == {"food", "sport", "tech"}
    # The signature's input is one string column: MLflow refuses anything else before raypipe runs.
    assert model.metadata.get_input_schema().input_types() == [DataType.string]
    with pytest.raises(MlflowException, match="string"):
        model.predict(pd.DataFrame({"a": [1.5]}))
    with pytest.raises(DataError, match="empty"):
        model.predict(["goal", "  "])

    # No pickles anywhere in the registered model; weights are safetensors.
    local = Path(mlflow.artifacts.download_artifacts("models:/reg-pyfunc/1", dst_path=str(tmp_path / "m")))
    files = [p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()]
    assert "artifacts/checkpoint/model.safetensors" in files and "raypipe_pyfunc_entry.py" in files
    assert not [f for f in files if f.endswith((".pkl", ".pt", ".bin", ".pickle"))]
    requirements = (local / "requirements.txt").read_text().split()
    assert f"raypipe=={__version__}" in requirements and any(r.startswith("torch==") for r in requirements)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("models:/", "cannot parse model URI"),
        ("models:/reg-bad", "cannot parse model URI"),
        ("models:/reg-bad/Production", "is not a number"),
        ("runs:/abc/model", "unsupported model URI"),
        ("models:/no-such-model@champion", "no registered model named 'no-such-model'; registered models: .*reg-bad"),
        ("models:/reg-bad@staging", r"no alias '@staging'; its aliases: @champion -> v1"),
        ("models:/reg-bad/7", "has no version 7; its versions: 1"),
    ],
)
def test_bad_uris_raise_registry_error(store_cfg, trained, uri, message):
    if ("reg-bad", "1") not in registry_state(store_cfg):
        register_checkpoint(trained, store_cfg, name="reg-bad", metrics={"test_macro_f1": 0.5})
    with pytest.raises(RegistryError, match=message):
        resolve(uri, tracking_uri=store_cfg.resolved_tracking_uri)


def test_missing_store_is_a_registry_error_and_is_not_created(tmp_path):
    db = tmp_path / "nowhere" / "mlflow.db"
    with pytest.raises(RegistryError, match="no MLflow store at .*nowhere.*--config"):
        resolve("models:/anything@champion", tracking_uri=f"sqlite:///{db}")
    assert not db.exists()


def _corrupt(kind: str, good: Path, tmp_path: Path) -> Path:
    if kind == "missing dir":
        return tmp_path / "does-not-exist"
    bad = tmp_path / "bad-ckpt"
    shutil.copytree(good, bad)
    if kind == "no weights":
        (bad / "model.safetensors").unlink()
    elif kind == "garbage meta":
        (bad / "raypipe.json").write_text("{not json", encoding="utf-8")
    elif kind == "truncated weights":
        data = (bad / "model.safetensors").read_bytes()
        (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif kind == "labels mismatch":
        meta = json.loads((bad / "raypipe.json").read_text())
        (bad / "raypipe.json").write_text(json.dumps({**meta, "labels": ["a", "b"]}))
    return bad


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("missing dir", "is not a directory"),
        ("no weights", "incomplete: missing model.safetensors"),
        ("garbage meta", "raypipe.json' is corrupt"),
        ("truncated weights", "cannot be loaded"),
        ("labels mismatch", "3 outputs but raypipe.json describes 2 .classification, 2 labels."),
    ],
)
def test_corrupt_checkpoint_raises_and_registers_nothing(store_cfg, trained, tmp_path, kind, message):
    register_checkpoint(trained, store_cfg, name=f"reg-before-{kind.replace(' ', '-')}", metrics={"test_macro_f1": 0.5})
    before = registry_state(store_cfg)
    runs_before = len(client_for(store_cfg).search_runs([client_for(store_cfg).get_experiment_by_name("raypipe").experiment_id]))

    with pytest.raises(CheckpointError, match=message):
        register_checkpoint(_corrupt(kind, trained, tmp_path), store_cfg, name="reg-corrupt")

    assert registry_state(store_cfg) == before
    assert len(client_for(store_cfg).search_runs([client_for(store_cfg).get_experiment_by_name("raypipe").experiment_id])) == runs_before


def test_bad_name_and_bad_eval_data_register_nothing(tiny_config, trained, tmp_path):
    with pytest.raises(RegistryError, match="may not contain"):
        register_checkpoint(trained, tiny_config, name="team/model")
    with pytest.raises(RegistryError, match="must not be empty"):
        register_checkpoint(trained, tiny_config, name=" ")
    # The gate needs an evaluation; data whose labels the model does not know stops it first.
    from conftest import write_csv

    other = write_csv(tmp_path / "other.csv", [(f"text {i}", lab) for i, lab in enumerate(["x", "y"] * 30)])
    cfg = tiny_config.model_copy(update={"data": tiny_config.data.model_copy(update={"path": str(other)})})
    with pytest.raises(DataError, match=r"\['x', 'y'\] are not known to the model"):
        register_checkpoint(trained, cfg, name="reg-baddata")
    assert registry_state(tiny_config) == set()


def test_bad_metric_value_is_rejected_before_writing(tiny_config, trained):
    with pytest.raises(RegistryError, match="metric 'test_macro_f1' must be a number"):
        register_checkpoint(trained, tiny_config, name="reg-nan", metrics={"test_macro_f1": "high"})
    assert registry_state(tiny_config) == set()


# --------------------------------------------------------------------------- listing


def test_list_models_shows_versions_aliases_metrics_and_runs(tiny_config, trained, always_sport):
    a = register_checkpoint(trained, tiny_config, name="list-a", metrics={"test_accuracy": 0.91, "test_macro_f1": 0.9})
    b = register_checkpoint(always_sport, tiny_config, name="list-a", metrics={"test_accuracy": 0.33, "test_macro_f1": 0.17})
    register_checkpoint(trained, tiny_config, name="list-b", metrics={"test_macro_f1": 0.5})

    table = list_models(tiny_config)
    lines = table.splitlines()
    assert lines[0].split()[:5] == ["MODEL", "VERSION", "ALIASES", "test_accuracy", "test_macro_f1"]
    row_v1 = next(line for line in lines if line.startswith("list-a") and line.split()[1] == "1")
    row_v2 = next(line for line in lines if line.startswith("list-a") and line.split()[1] == "2")
    assert row_v1.split()[2:6] == ["@champion", "0.9100", "0.9000", "promoted"] and a.run_id in row_v1
    assert row_v2.split()[2:6] == ["-", "0.3300", "0.1700", "rejected"] and b.run_id in row_v2
    assert any(line.startswith("list-b") for line in lines)

    only_b = list_models(tiny_config, name="list-b")
    assert "list-b" in only_b and "list-a" not in only_b
    with pytest.raises(RegistryError, match="no registered model named 'nope'; registered models: list-a, list-b"):
        list_models(tiny_config, name="nope")


def test_list_models_on_a_missing_store_says_so_without_creating_it(tiny_config):
    text = list_models(tiny_config)
    assert "No registered models" in text and "raypipe register" in text
    assert not (tiny_config.workdir_path / "mlflow.db").exists()


# --------------------------------------------------------------------------- CLI


def test_cli_register_and_models(tiny_config, trained, tmp_path, capsys):
    from raypipe.cli import main

    cfg_file = str(config_file(tiny_config, tmp_path / "cfg.yaml"))
    assert main(["register", str(trained), "--config", cfg_file, "--name", "cli-reg"]) == 0
    out = capsys.readouterr().out
    assert "Registered 'cli-reg' version 1" in out and "models:/cli-reg/1" in out and "promoted to @champion" in out

    assert main(["register", str(trained), "--config", cfg_file, "--name", "cli-reg"]) == 0
    out = capsys.readouterr().out
    assert "version 2" in out and "not promoted" in out  # same model, same score: a tie

    assert main(["register", str(trained), "--config", cfg_file, "--name", "cli-reg", "--force"]) == 0
    assert "forced" in capsys.readouterr().out

    assert main(["models", "--config", cfg_file]) == 0
    out = capsys.readouterr().out
    assert out.count("cli-reg") == 3 and "@champion" in out

    assert main(["register", str(tmp_path / "missing"), "--config", cfg_file]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert main(["models", "--config", cfg_file, "--name", "nope"]) == 2


def test_cli_predict_with_models_uri(tiny_config, trained, tmp_path, capsys):
    from raypipe.cli import main

    register_checkpoint(trained, tiny_config, name="cli-pred", metrics={"test_macro_f1": 0.9})
    cfg_file = str(config_file(tiny_config, tmp_path / "cfg.yaml"))
    assert main(["predict", "--model", "models:/cli-pred@champion", "--config", cfg_file, "--json", *TEXTS[:2]]) == 0
    got = json.loads(capsys.readouterr().out)
    expected = Predictor.from_dir(trained).predict(TEXTS[:2])
    assert [g["label"] for g in got] == [e["label"] for e in expected]
    assert main(["predict", "--model", "models:/cli-pred@nope", "--config", cfg_file, "x"]) == 2


def test_default_tracking_uri_follows_env(monkeypatch, tmp_path):
    from raypipe.registry import default_tracking_uri

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/x.db")
    assert default_tracking_uri() == f"sqlite:///{tmp_path}/x.db"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.chdir(tmp_path)
    assert default_tracking_uri() == f"sqlite:///{Path(os.getcwd()).resolve() / 'raypipe-work' / 'mlflow.db'}"


# --------------------------------------------------------------------------- like with like, races


def test_gate_reevaluates_a_champion_scored_on_other_data_before_comparing(store_cfg, trained, always_sport):
    """The holder claims 0.99 on some other test set; on this version's test split it is the
    constant model (macro-F1 1/6), so the trained challenger wins — the gate compared like with like."""
    first = register_checkpoint(always_sport, store_cfg, name="reg-fair", metrics={"test_macro_f1": 0.99},
                                fingerprint="other-data")
    assert first.decision.promoted
    challenger = register_checkpoint(trained, store_cfg, name="reg-fair")  # evaluated on the config's test split
    assert challenger.fingerprint != "other-data" and challenger.metrics["test_macro_f1"] > 0.8
    assert challenger.decision.promoted, challenger.decision.reason
    assert "re-evaluated on this test split" in challenger.decision.reason
    assert challenger.decision.previous_value == pytest.approx(1 / 6)
    assert champion(store_cfg, "reg-fair") == challenger.version


def test_gate_refuses_when_the_champion_was_scored_on_other_data_and_cannot_be_rescored(store_cfg, trained):
    no_data = store_cfg.model_copy(update={"data": store_cfg.data.model_copy(update={"path": None})})
    first = register_checkpoint(trained, no_data, name="reg-otherdata", metrics={"test_macro_f1": 0.5}, fingerprint="a")
    second = register_checkpoint(trained, no_data, name="reg-otherdata", metrics={"test_macro_f1": 0.9}, fingerprint="b")
    assert first.decision.promoted and not second.decision.promoted
    assert "tested on other data" in second.decision.reason and "--force" in second.decision.reason
    assert champion(store_cfg, "reg-otherdata") == first.version


def test_two_registrations_racing_for_the_alias_only_one_wins_and_the_other_is_told(store_cfg, trained):
    """Two registrations of equally good versions start at the same moment against an alias
    nobody holds yet: without serialisation both would see "no holder" and both would claim it.
    (Threads of one process: the alias lock is a file lock, which excludes them exactly as it
    excludes two processes.)"""
    from tests.conftest import run_together

    results = run_together(lambda: register_checkpoint(trained, store_cfg, name="reg-race",
                                                       metrics={"test_macro_f1": 0.5}, fingerprint="same"),
                           2, timeout=600)
    winners = [r for r in results if r.decision.promoted]
    losers = [r for r in results if not r.decision.promoted]
    assert len(winners) == 1 and len(losers) == 1, [r.decision.reason for r in results]
    assert champion(store_cfg, "reg-race") == winners[0].version  # never the loser
    assert (f"@champion stays on v{winners[0].version}" in losers[0].decision.reason
            or "lost the race" in losers[0].decision.reason)
    tags = client_for(store_cfg).get_model_version("reg-race", losers[0].version).tags
    assert tags["raypipe.promotion"] == "rejected"
