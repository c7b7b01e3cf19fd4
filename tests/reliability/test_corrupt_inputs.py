"""Corrupt inputs end in a clear error and exit 2, with nothing half-written in the registry.

Each case runs the real CLI entry point (``raypipe.cli.main``) against a real sqlite MLflow store;
one case per command also runs the installed ``raypipe`` executable in a subprocess, so the exit
status is the process's own and stderr is checked for a traceback.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
MODEL = "rel-corrupt"


def _cli() -> list[str]:
    script = Path(sys.executable).parent / "raypipe"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "raypipe.cli"]


def raypipe_process(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([*_cli(), *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=180)


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_checkpoint):
    """A config file whose store already holds MODEL v1 (@champion)."""
    from raypipe.config import load_config
    from raypipe.registration import register_checkpoint

    root = tmp_path_factory.mktemp("corrupt-store")
    cfg_file = root / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump({"workdir": str(root / "work"), "registry": {"model_name": MODEL}}))
    cfg = load_config(cfg_file)
    result = register_checkpoint(tiny_checkpoint, cfg, metrics={"test_macro_f1": 0.5})
    assert result.version == "1" and result.decision.promoted
    return cfg_file


def snapshot(cfg_file: Path) -> dict:
    """Everything a failed command must leave as it was: models, versions, aliases, runs, files."""
    from mlflow.tracking import MlflowClient

    from raypipe.config import load_config

    cfg = load_config(cfg_file)
    uri = cfg.resolved_tracking_uri
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    models = {
        rm.name: {
            "aliases": dict(rm.aliases),
            "versions": sorted(mv.version for mv in client.search_model_versions(f"name='{rm.name}'")),
        }
        for rm in client.search_registered_models()
    }
    runs = sorted(
        (r.info.run_id, r.info.status)
        for exp in client.search_experiments()
        for r in client.search_runs([exp.experiment_id])
    )
    artifacts = sorted(str(p.relative_to(cfg.workdir_path)) for p in (cfg.workdir_path / "mlartifacts").rglob("*"))
    cache = sorted(str(p) for p in (cfg.workdir_path / "model-cache").rglob("*"))
    return {"models": models, "runs": runs, "artifacts": artifacts, "cache": cache}


def corrupt_copy(kind: str, good: Path, into: Path) -> Path:
    bad = into / f"ckpt-{kind}"
    shutil.copytree(good, bad)
    if kind == "truncated-weights":  # a copy or upload cut off halfway through the weights
        data = (bad / "model.safetensors").read_bytes()
        (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif kind == "empty-weights":  # disk full while writing
        (bad / "model.safetensors").write_bytes(b"")
    elif kind == "flipped-header":  # bytes damaged inside the safetensors JSON header
        data = bytearray((bad / "model.safetensors").read_bytes())
        data[10:40] = b"\xff" * 30
        (bad / "model.safetensors").write_bytes(bytes(data))
    elif kind == "missing-tokenizer":  # tokenizer files never copied
        for f in ("tokenizer.json", "vocab.txt", "tokenizer_config.json"):
            (bad / f).unlink(missing_ok=True)
    elif kind == "interrupted-copy":  # copy stopped before the meta file (written last by save_checkpoint)
        (bad / "raypipe.json").unlink()
    elif kind == "meta-cut":  # raypipe.json cut short
        text = (bad / "raypipe.json").read_text()
        (bad / "raypipe.json").write_text(text[: len(text) // 2])
    else:  # pragma: no cover
        raise ValueError(kind)
    return bad


KINDS = ["truncated-weights", "empty-weights", "flipped-header", "missing-tokenizer", "interrupted-copy", "meta-cut"]


@pytest.mark.parametrize("kind", KINDS)
def test_register_of_a_corrupt_checkpoint_exits_2_and_writes_nothing(store, tiny_checkpoint, tmp_path, capsys, kind):
    from raypipe.cli import main

    bad = corrupt_copy(kind, tiny_checkpoint, tmp_path)
    before = snapshot(store)
    code = main(["register", str(bad), "--config", str(store), "--force"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("raypipe register: error: ") and str(bad) in err, err
    assert "Traceback" not in err
    assert snapshot(store) == before  # no model, version, alias move, run or artifact left behind


def test_register_of_a_truncated_checkpoint_as_a_process(store, tiny_checkpoint, tmp_path):
    bad = corrupt_copy("truncated-weights", tiny_checkpoint, tmp_path)
    before = snapshot(store)
    res = raypipe_process("register", str(bad), "--config", str(store), "--name", "rel-new", cwd=tmp_path)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "cannot be loaded" in res.stderr and "Traceback" not in res.stderr, res.stderr[-2000:]
    after = snapshot(store)
    assert after == before and "rel-new" not in after["models"]


@pytest.mark.parametrize("uri, message", [
    ("models:/missing@champion", "no registered model named 'missing'; registered models: rel-corrupt"),
    (f"models:/{MODEL}@staging", "has no alias '@staging'; its aliases: @champion -> v1"),
    (f"models:/{MODEL}/9", "has no version 9; its versions: 1"),
    (f"models:/{MODEL}/Production", "is not a number"),
    ("models:/a/b/c", "cannot parse model URI"),
])
def test_predict_with_a_wrong_models_uri_exits_2(store, capsys, uri, message):
    from raypipe.cli import main

    before = snapshot(store)
    code = main(["predict", "--model", uri, "--config", str(store), "some text"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err and "Traceback" not in err, err
    assert snapshot(store) == before


def test_predict_missing_model_as_a_process(store, tmp_path):
    res = raypipe_process("predict", "--model", "models:/missing@champion", "--config", str(store), "x", cwd=tmp_path)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "no registered model named 'missing'" in res.stderr and "Traceback" not in res.stderr


def test_a_missing_store_is_exit_2_for_models_predict_and_evaluate_and_is_not_created(tmp_path, capsys):
    from raypipe.cli import main

    db = tmp_path / "typo" / "mlflow.db"
    override = f"workdir={tmp_path / 'typo'}"
    for argv in (
        ["models", override],
        ["predict", "--model", "models:/any@champion", "x", "--config", _cfg_file(tmp_path, override)],
        ["evaluate", "models:/any@champion", override, "--no-log"],
    ):
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 2, (argv, err)
        assert f"no MLflow store at {db}" in err and "Traceback" not in err, (argv, err)
        assert not db.exists() and not db.parent.exists(), argv  # nothing created by the attempt


def _cfg_file(tmp_path: Path, override: str) -> str:
    key, value = override.split("=", 1)
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump({key: value}))
    return str(path)


def test_models_on_a_missing_store_as_a_process(tmp_path):
    res = raypipe_process("models", f"workdir={tmp_path / 'nowhere'}", cwd=tmp_path)
    assert res.returncode == 2, (res.stdout, res.stderr[-2000:])
    assert "raypipe models: error: no MLflow store at" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "nowhere").exists()
