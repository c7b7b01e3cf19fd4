"""The console: raypipe's own progress only, every listed line of Ray noise gone at its cause,
the full log under the workdir, and ``-v`` / ``RAYPIPE_VERBOSE=1`` bringing Ray's output back."""

from __future__ import annotations

import io
import logging
import os
import re
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from raypipe import console

REPO = Path(__file__).resolve().parents[1]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != console.VERBOSE_ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- no Ray


def test_a_sweep_board_line_names_the_trial_the_metric_elapsed_time_and_an_eta():
    out = io.StringIO()
    board = console.SweepBoard("val_macro_f1", "max", epochs=2, trials=3, concurrency=2, live=False, stream=out)
    with board:
        board.trial_started("abc_00000", {"train.lr": 1e-4})
        board.trial_started("abc_00001", {"train.lr": 2e-4})
        board.trial_epoch("abc_00000", 1, 0.5)
        board.trial_epoch("abc_00001", 1, 0.25)
        board.trial_epoch("abc_00000", 2, 0.75)
        board.trial_done("abc_00000", "done")
        board.trial_done("abc_00001", "done")  # after 1 of 2 epochs: ASHA stopped it
    lines = out.getvalue().splitlines()
    assert len(lines) == 3  # one per trial epoch, nothing else
    assert re.fullmatch(r"\[raypipe\] trial abc_00000  epoch 1/2  val_macro_f1 0\.5000  elapsed \d+s  ETA \d+s", lines[0])
    assert "trial abc_00001  epoch 1/2  val_macro_f1 0.2500" in lines[1]
    assert board.rows["abc_00000"]["best"] == 0.75 and board.rows["abc_00001"]["status"] == "stopped early"
    assert "abc_00000" in str(board.table().columns[0]._cells)  # the live view's table has the same rows


def test_a_training_run_gets_one_line_per_epoch_from_the_checkpoints_it_writes(tmp_path, capsys):
    import json

    watcher = console.EpochWatcher(str(tmp_path), "val_macro_f1", epochs=3)
    assert watcher.poll() == []
    for epoch, value in ((1, 0.5), (2, 0.625)):
        ckpt = tmp_path / f"checkpoint_2026-12-07_00-0{epoch}-00.000000"
        ckpt.mkdir()
        (ckpt / "raypipe.json").write_text(json.dumps({"epoch": epoch, "metrics": {"val_macro_f1": value}}))
    lines = watcher.poll()
    assert [ln.split("  elapsed")[0] for ln in lines] == ["epoch 1/3  val_macro_f1 0.5000", "epoch 2/3  val_macro_f1 0.6250"]
    assert all("ETA" in ln for ln in lines) and watcher.poll() == []  # each epoch once
    assert capsys.readouterr().out.count("[raypipe] epoch") == 2


def test_an_epoch_whose_checkpoint_was_pruned_before_the_watcher_looked_still_gets_its_line(tmp_path, capsys):
    import json

    watcher = console.EpochWatcher(str(tmp_path), "val_pearson", epochs=3)
    history = [{"epoch": e, "val_pearson": v} for e, v in ((1, 0.5), (2, 0.75), (3, 0.875))]
    last = tmp_path / "checkpoint_2026-12-07_00-03-00.000000"  # keep_checkpoints=1: only epoch 3's is left
    last.mkdir()
    (last / "raypipe.json").write_text(json.dumps({"epoch": 3, "metrics": history[-1], "history": history}))
    assert [ln.split("  elapsed")[0] for ln in watcher.poll()] == [
        "epoch 1/3  val_pearson 0.5000", "epoch 2/3  val_pearson 0.7500", "epoch 3/3  val_pearson 0.8750"]
    assert watcher.poll() == [] and capsys.readouterr().out.count("[raypipe] epoch") == 3


def test_hushed_keeps_a_logger_below_warning_for_one_call_only(caplog):
    log = logging.getLogger("ray.train.v2.some.module")
    with caplog.at_level(logging.INFO, logger="ray.train"):
        with console.hushed("ray.train"):
            log.info("A run snapshot was found")
        log.info("after")
    assert "A run snapshot was found" not in caplog.text and "after" in caplog.text


def test_a_command_log_holds_what_the_driver_printed(tmp_path, capsys):
    from raypipe.config import config_from_dict

    cfg = config_from_dict({"workdir": str(tmp_path / "work"), "name": "logged"})
    with console.run_log(cfg, "run") as path:
        console.say("stage 1/1: something")
        logging.getLogger("raypipe.test").warning("a warning")
    assert path.parent == tmp_path / "work" / "logs" and path.name.startswith("run-logged-")
    text = path.read_text()
    assert "[raypipe] stage 1/1: something" in text and "a warning" in text
    assert "[raypipe] stage 1/1: something" in capsys.readouterr().out
    assert console.log_file() is None  # closed with the command


# --------------------------------------------------------------------------- a toy `raypipe run`

# Each line the issue lists as confusing, as it looked; none may reach the console by default.
NOISE = {
    "Tune status tables": re.compile(r"Trial status:|Current time:|Logical resource usage|[╭│╰]"),
    "Tune's results hint": re.compile(r"View detailed results here"),
    "TensorBoard hint": re.compile(r"To visualize your results with TensorBoard"),
    "Ray Data progress bars": re.compile(r"Running Dataset|row/s\]|Tasks: \d+; Actors:"),
    "Train controller INFO": re.compile(r"TrainController|Attempting to start training worker group"),
    "run snapshot message": re.compile(r"A run snapshot was found"),
    "raylet warnings": re.compile(r"\(raylet\)|PYTHON worker processes have been started"),
    "PreemptionWatcher": re.compile(r"PreemptionWatcher"),
    "Serve http_options": re.compile(r"New http_options"),
    "deprecated get_dashboard_url": re.compile(r"get_dashboard_url|DeprecationWarning"),
    "worker pid prefixes": re.compile(r"\(\w+ pid=\d+"),
    "Ray's INFO lines": re.compile(r"INFO worker\.py|Started a local Ray instance"),
    "MLflow's INFO lines": re.compile(r"INFO mlflow"),
    "progress bars": re.compile(r"Loading weights|Downloading artifacts|it/s\]"),
    "Tune's slow-step warnings": re.compile(r"may be a performance bottleneck"),
}


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory, tiny_model_dir, toy_csv):
    """`raypipe run` (no -v) of a 2-trial FIFO sweep on the tiny model, served, in a subprocess."""
    tmp = tmp_path_factory.mktemp("console")
    config = tmp / "toy.yaml"
    config.write_text(yaml.safe_dump({
        "workdir": str(tmp / "work"),
        "name": "toy",
        "ray": {"address": "local", "num_cpus": 2, "include_dashboard": False},
        "data": {"path": str(toy_csv), "max_length": 32, "max_samples": 150},
        "model": {"name": str(tiny_model_dir)},
        "train": {"epochs": 1, "batch_size": 16, "lr": 3e-3, "warmup_ratio": 0.0},
        "scaling": {"num_workers": 1, "cpus_per_worker": 0.5, "use_gpu": False},
        "tune": {"num_samples": 1, "search_space": {"train.lr": {"grid": [3e-3, 6e-3]}},
                 "scheduler": {"type": "fifo"}},
        "registry": {"model_name": "toy-console"},
        "serve": {"port": _free_port()},
    }))
    proc = subprocess.run([sys.executable, "-m", "raypipe.cli", "run", str(config)], cwd=tmp, env=_env(),
                          capture_output=True, text=True, timeout=600)
    return proc, tmp / "work"


@pytest.mark.ray
def test_the_default_console_of_a_run_is_short_and_has_none_of_the_listed_lines(toy_run):
    proc, _ = toy_run
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    found = {name: m.group(0) for name, pattern in NOISE.items() if (m := pattern.search(out))}
    assert not found, f"noise on the console: {found}\n{out}"
    lines = out.splitlines()
    assert len(lines) <= 60, out
    stages = re.findall(r"stage (\d)/(\d)", out)
    assert stages == [("1", "3"), ("2", "3"), ("3", "3")], stages
    assert "subsampled to 150 rows" in out  # as many as data.max_samples asked for
    epochs = [ln for ln in lines if re.search(r"\[raypipe\] trial \w+_\d+  epoch 1/1  val_macro_f1 \d\.\d{4}  "
                                             r"elapsed \S+  ETA \S+", ln)]
    assert len(epochs) == 2, out  # one line per trial epoch: 2 trials x 1 epoch
    assert "raypipe pipeline summary" in out


@pytest.mark.ray
def test_the_full_log_is_under_the_workdir_and_the_summary_says_where(toy_run):
    proc, work = toy_run
    logs = sorted((work / "logs").glob("run-toy-*.log"))
    assert len(logs) == 1
    assert f"full log        {logs[0]}" in proc.stdout
    text = logs[0].read_text()
    assert "[raypipe] stage 1/3" in text  # what the console showed
    assert re.search(r"\(RayTrainWorker pid=\d+\) \[raypipe\] 1 worker\(s\) on cpu", text)  # what the workers printed
    assert "TrainController" in text  # Ray's own lines are kept, off the console


@pytest.mark.ray
def test_the_sweep_trials_carry_the_data_checks(toy_run):
    from mlflow.tracking import MlflowClient

    _, work = toy_run
    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    exp = client.get_experiment_by_name("raypipe")
    trials = client.search_runs([exp.experiment_id], filter_string="tags.`raypipe.stage` = 'trial'")
    assert len(trials) == 2
    for run in trials:
        assert "data.check.test_in_train" in run.data.params and "data.check.labels.train" in run.data.params
        assert "data_check.txt" in {a.path for a in client.list_artifacts(run.info.run_id)}


# --------------------------------------------------------------------------- -v brings Ray back

_RAY_SCRIPT = textwrap.dedent("""
    import sys
    import ray
    from raypipe.config import config_from_dict
    from raypipe.runtime import ensure_ray

    cfg = config_from_dict({"workdir": sys.argv[1], "name": "v", "ray": {"address": "local", "num_cpus": 1,
                            "include_dashboard": False}})
    ensure_ray(cfg)

    @ray.remote
    def shout():
        print("hello from a ray worker", flush=True)
        import time; time.sleep(1.0)

    ray.get(shout.remote())
    import time; time.sleep(2.0)  # Ray forwards worker output asynchronously
    ray.shutdown()
""")


@pytest.mark.ray
def test_verbose_brings_rays_output_back(tmp_path):
    # The default's side of this (worker lines and Ray's INFO off the console, in the log file
    # instead) is the toy run's: NOISE's "worker pid prefixes" and "Ray's INFO lines", and the
    # RayTrainWorker line test_the_full_log_is_under_the_workdir_and_the_summary_says_where finds.
    proc = subprocess.run([sys.executable, "-c", _RAY_SCRIPT, str(tmp_path / "work")],
                          env=_env(**{console.VERBOSE_ENV: "1"}), capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert re.search(r"\(shout pid=\d+\)\S* hello from a ray worker", out), out  # (Ray colours the prefix)
    assert "Started a local Ray instance" in out, out
