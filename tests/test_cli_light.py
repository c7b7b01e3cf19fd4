"""The CLI: light to import, every command listed, validate's exit codes and messages, offline predict."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

HEAVY = ("torch", "ray", "mlflow", "transformers")
COMMANDS = ("validate", "train", "tune", "evaluate", "register", "models", "serve", "predict", "run", "reproduce", "ui")
REPO = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


def _cli() -> list[str]:
    script = Path(sys.executable).parent / "raypipe"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "raypipe.cli"]


def raypipe(*args: str, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*_cli(), *args], capture_output=True, text=True, env=_env(), cwd=cwd, timeout=timeout
    )


def _heavy_after(code: str) -> list[str]:
    probe = code + f"\nimport sys, json; print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=_env(), timeout=60, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_importing_cli_and_package_is_light():
    assert _heavy_after("import raypipe.cli\nimport raypipe\nraypipe.cli.build_parser()") == []


def test_config_and_validate_stay_light(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("train:\n  lr: 0.001\n", encoding="utf-8")
    code = (
        "import contextlib, io\nimport raypipe.cli\nfrom raypipe.config import load_config\n"
        f"load_config({str(good)!r})\n"
        f"with contextlib.redirect_stdout(io.StringIO()):\n    assert raypipe.cli.main(['validate', {str(good)!r}]) == 0"
    )
    assert _heavy_after(code) == []


def test_help_lists_every_command():
    res = raypipe("--help")
    assert res.returncode == 0, res.stderr
    for cmd in COMMANDS:
        assert cmd in res.stdout, f"'{cmd}' missing from --help"
    res_mod = subprocess.run(
        [sys.executable, "-m", "raypipe.cli", "--help"], capture_output=True, text=True, env=_env(), timeout=60
    )
    assert res_mod.returncode == 0
    assert all(cmd in res_mod.stdout for cmd in COMMANDS)


def test_no_command_is_usage_error():
    res = raypipe()
    assert res.returncode == 2
    assert "usage" in res.stderr.lower()


def test_validate_good_config(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("name: demo\ntrain:\n  lr: 0.001\n  epochs: 2\n", encoding="utf-8")
    res = raypipe("validate", str(good))
    assert res.returncode == 0, res.stderr
    assert "OK" in res.stdout and str(good) in res.stdout


def test_validate_show_applies_overrides(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("train:\n  lr: 0.001\n", encoding="utf-8")
    res = raypipe("validate", str(good), "train.lr=3e-5", "data.text_columns=[title,body]", "--show")
    assert res.returncode == 0, res.stderr
    assert "train.lr = 3e-05" in res.stdout
    assert "data.text_columns = ['title', 'body']" in res.stdout


def test_validate_bad_config_lists_every_problem(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "train:\n  lr: -1\n  lrr: 3\nscaling:\n  num_workers: -2\ndata:\n  val_fraction: 2\n"
        "tune:\n  search_space:\n    train.nope: {choice: [1]}\n",
        encoding="utf-8",
    )
    res = raypipe("validate", str(bad))
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    for path in ("train.lr:", "train.lrr:", "scaling.num_workers:", "data.val_fraction:", "tune.search_space.train.nope"):
        assert path in res.stderr, f"{path} not reported:\n{res.stderr}"
    assert "5 problem(s)" in res.stderr and str(bad) in res.stderr
    assert "OK" not in res.stdout


def test_validate_bad_override_exits_2(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("{}\n", encoding="utf-8")
    res = raypipe("validate", str(good), "train.lr")
    assert res.returncode == 2
    assert "Traceback" not in res.stderr and "key.path=value" in res.stderr


def test_validate_missing_config_file(tmp_path):
    res = raypipe("validate", str(tmp_path / "missing.yaml"))
    assert res.returncode == 2
    assert "does not exist" in res.stderr and "Traceback" not in res.stderr


def test_validate_check_data_missing_label_column(tmp_path):
    csv = tmp_path / "d.csv"
    csv.write_text("text,category\nhello,a\nworld,b\n", encoding="utf-8")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data:\n  path: {csv}\n", encoding="utf-8")
    res = raypipe("validate", str(cfg), "--check-data")
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    assert "missing column(s) ['label']" in res.stderr
    assert "'category'" in res.stderr and str(csv) in res.stderr


def test_validate_check_data_good(tmp_path, toy_csv):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data:\n  path: {toy_csv}\n", encoding="utf-8")
    res = raypipe("validate", str(cfg), "--check-data")
    assert res.returncode == 0, res.stderr
    assert "3 classes" in res.stdout and "OK" in res.stdout


def test_predict_offline_from_checkpoint(tiny_checkpoint):
    labels = json.loads((Path(tiny_checkpoint) / "raypipe.json").read_text(encoding="utf-8"))["labels"]
    texts = ["the striker scored a goal", "a new phone chip", "bread and cheese"]
    res = raypipe("predict", "--model", str(tiny_checkpoint), *texts, timeout=180)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert len(lines) == len(texts)
    for line, text in zip(lines, texts):
        answer, shown = line.split("\t")
        label, score = answer.split(" ")
        assert label in labels
        assert 0.0 < float(score) <= 1.0
        assert shown == text


def test_predict_missing_checkpoint_exits_2(tmp_path, capsys):
    from raypipe.cli import (
        main,  # in-process: a subprocess would pay torch's import again
    )

    assert main(["predict", "--model", str(tmp_path / "nope"), "hello"]) == 2
    err = capsys.readouterr().err
    assert "raypipe predict: error:" in err and "is not a checkpoint directory (no such directory)" in err


def test_ui_starts_one_mlflow_server_process_unless_told_more(tmp_path, monkeypatch):
    """(The process itself and its loopback bind: tests/reliability/test_bind_defaults.py.)"""
    from raypipe import cli

    started: list[list[str]] = []
    monkeypatch.setattr(subprocess, "call", lambda cmd: started.append(cmd) or 0)
    config = tmp_path / "ui.yaml"
    config.write_text(f"workdir: {tmp_path / 'work'}\n", encoding="utf-8")
    for extra in ([], ["--workers", "3"]):
        assert cli.main(["ui", "-c", str(config), *extra]) == 0
    assert [cmd[cmd.index("--workers") + 1] for cmd in started] == ["1", "3"]
    assert all(cmd[cmd.index("--host") + 1] == "127.0.0.1" for cmd in started)
