"""What a person sees while raypipe runs, and where everything else goes.

By default the console carries raypipe's own progress only: one line per stage, one line per
trial epoch (trial id, the optimised metric, elapsed time, an ETA; a live ``rich`` table when
stdout is a terminal), and the summary. Ray, Tune, Ray Data, Train, Serve, transformers and
MLflow keep only their WARNINGs and errors on the console; everything (their INFO lines, and
what Ray's worker processes print) goes to a log file under the workdir
(``<workdir>/logs/<command>-<name>-<time>.log``), which the summary names. ``raypipe -v`` or
``RAYPIPE_VERBOSE=1`` brings all of it back to the console.

Each kind of noise is turned off where it is made, not filtered by its text: Tune's status
tables by ``RunConfig(verbose=0)``, its TensorBoard hint by not installing the TBX logger, Ray
Data's progress bars by ``RAY_DATA_DISABLE_PROGRESS_BARS`` (driver and workers), the worker
processes' output by routing Ray's log stream into the log file instead of the console, and
library INFO lines by the level of the handlers those libraries install on the console.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

VERBOSE_ENV = "RAYPIPE_VERBOSE"
# Loggers of the libraries raypipe drives: their INFO lines are not a raypipe user's progress.
LIBRARIES = ("ray", "transformers", "mlflow", "alembic", "datasets", "peft", "filelock", "urllib3", "httpx",
             "httpcore", "torch", "fsspec")
# Read where each library starts (the driver, and Ray's workers through their runtime env): Ray
# Data's progress bars; MLflow's INFO lines ("Creating initial MLflow database tables") and its
# "Downloading artifacts" bars; the Hub's and transformers' bars ("Loading weights"); Tune's
# warning that one of its own steps took over 0.5 s, which any loaded laptop triggers.
QUIET_ENV = {
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    "MLFLOW_LOGGING_LEVEL": "WARNING",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TUNE_WARN_THRESHOLD_S": "60",
}
# Messages about what raypipe itself chose: Ray Data's "Progress bars disabled" (raypipe disables
# them) and Ray's advice to install ipywidgets for its rich notebook output (raypipe shows none).
_OWN_DOING = {"ray.data._internal.progress": logging.ERROR, "ray.widgets": logging.WARNING}
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_log_file: Path | None = None
_file_handler: logging.Handler | None = None
_lock = threading.Lock()


def verbose() -> bool:
    """``raypipe -v`` or ``RAYPIPE_VERBOSE=1``: every library's output on the console."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def set_verbose(flag: bool) -> None:
    # An environment variable, so that subprocesses (a notebook kernel, `ray job submit`) agree.
    if flag:
        os.environ[VERBOSE_ENV] = "1"


def say(message: str) -> None:
    """One line of raypipe's own progress."""
    print(f"[raypipe] {message}", flush=True)


def stage(number: int, total: int, what: str) -> None:
    say(f"stage {number}/{total}: {what}")


def setup_logging(verbose_flag: bool = False) -> None:
    """The CLI's logging: raypipe's INFO lines on the console, other libraries' from WARNING."""
    set_verbose(verbose_flag)
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if verbose_flag else logging.INFO)
    for old in [h for h in root.handlers if getattr(h, "raypipe_console", False)]:  # main() called again
        root.removeHandler(old)
    handler = logging.StreamHandler(sys.stderr)
    handler.raypipe_console = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    if not verbose():
        handler.addFilter(_own_or_warning)
    root.addHandler(handler)
    quiet_libraries()


def _own_or_warning(record: logging.LogRecord) -> bool:
    return record.name.startswith("raypipe") or record.levelno >= logging.WARNING


def quiet_libraries() -> None:
    """Keep the libraries' own console handlers at WARNING (their records still reach the log
    file). Idempotent; called again after each library import that installs handlers (Ray's
    init, Ray Data, Serve)."""
    for key, value in QUIET_ENV.items():
        if not verbose():
            os.environ.setdefault(key, value)
    if verbose():
        return
    for name, level in _OWN_DOING.items():
        logging.getLogger(name).setLevel(level)
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if not isinstance(logger, logging.Logger) or name.split(".")[0] not in LIBRARIES:
            continue
        for h in logger.handlers:
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                h.setLevel(max(h.level, logging.WARNING))
        if _file_handler is not None and not logger.propagate and _file_handler not in logger.handlers:
            logger.addHandler(_file_handler)
    if "ray.data" in sys.modules:
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False
    if "transformers" in sys.modules:  # imported before the environment above was set
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def tune_env() -> dict[str, str]:
    """For the duration of a sweep: Tune's classic output path, which honours ``verbose=0`` (the
    newer one prints its configuration table and "View detailed results here" regardless)."""
    return {} if verbose() else {"RAY_AIR_NEW_OUTPUT": "0"}


def worker_env() -> dict[str, str]:
    """Environment for Ray's worker processes (Ray Data runs inside Train workers too)."""
    return {} if verbose() else dict(QUIET_ENV)


def log_file() -> Path | None:
    """The log file of the command that is running, if any."""
    return _log_file


def open_log(workdir: Path, name: str) -> Path:
    """Start (or keep) the full log of this process under ``workdir/logs``."""
    global _log_file, _file_handler
    with _lock:
        if _log_file is not None:
            return _log_file
        folder = Path(workdir) / "logs"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.log"
        handler = logging.FileHandler(path, encoding="utf-8")
        handler.setFormatter(logging.Formatter(_FORMAT))
        handler.setLevel(logging.DEBUG)
        root = logging.getLogger()
        root.addHandler(handler)
        raypipe_logger = logging.getLogger("raypipe")
        if raypipe_logger.level == logging.NOTSET and root.level > logging.INFO:
            raypipe_logger.setLevel(logging.INFO)  # a notebook leaves the root at WARNING
        _log_file, _file_handler = path, handler
    quiet_libraries()
    return path


def close_log() -> None:
    global _log_file, _file_handler
    with _lock:
        if _file_handler is None:
            return
        for logger in [logging.getLogger(), *(v for v in logging.root.manager.loggerDict.values()
                                              if isinstance(v, logging.Logger))]:
            if _file_handler in logger.handlers:
                logger.removeHandler(_file_handler)
        _file_handler.close()
        _log_file, _file_handler = None, None


def write_log(text: str, raw: bool = False) -> None:
    """Append lines (``raw``: text as it comes) to the log file, not the console."""
    handler = _file_handler
    if handler is None or not isinstance(handler, logging.FileHandler) or handler.stream is None:
        return
    with _lock:
        try:
            handler.stream.write(text if raw or text.endswith("\n") else text + "\n")
            handler.stream.flush()
        except ValueError:  # closed meanwhile
            pass


class _Tee:
    """stdout/stderr that also writes to the log file."""

    def __init__(self, stream: TextIO):
        self._stream = stream

    def write(self, text: str) -> int:
        write_log(text, raw=True)
        return self._stream.write(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


@contextmanager
def run_log(cfg: Any, command: str) -> Iterator[Path]:
    """The full log of one command: logging records, what the driver prints, and the output of
    Ray's worker processes (routed here by :func:`quiet_ray`)."""
    workdir = Path(cfg.workdir_path)
    fresh = [d for d in (workdir, workdir / "logs") if not d.exists()]
    path = open_log(workdir, f"{command}-{cfg.name}")
    out, err = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _Tee(out), _Tee(err)  # type: ignore[assignment]
    try:
        yield path
    except Exception as exc:
        from raypipe.errors import RaypipeError

        if isinstance(exc, RaypipeError) and exc.exit_code == 2 and fresh:
            # A config or data error stopped the command before it did anything: leave no
            # workdir behind just for this log (the error is on the console).
            sys.stdout, sys.stderr = out, err
            close_log()
            path.unlink(missing_ok=True)
            for d in reversed(fresh):
                try:
                    d.rmdir()
                except OSError:  # something else was written there: keep it
                    break
        raise
    finally:
        sys.stdout, sys.stderr = out, err
        close_log()


def ray_init_kwargs() -> dict[str, Any]:
    """What :func:`raypipe.runtime.ensure_ray` passes to ``ray.init`` for the console."""
    # WARNING while Ray starts (its "Started a local Ray instance" INFO line); quiet_ray then
    # lets Ray's INFO records through to the log file again.
    return {"logging_level": logging.INFO if verbose() else logging.WARNING}


@contextmanager
def starting_ray(new_cluster: bool) -> Iterator[None]:
    """Around ``ray.init``: Ray 2.60 announces on every start of a new local Ray, as a WARNING,
    that it turned on token authentication by default; that default is what raypipe wants, so
    the announcement is not shown (``-v`` shows it). Joining a cluster, Ray's warnings about
    authentication (e.g. that it is off) stay."""
    if verbose() or not new_cluster:
        yield
        return
    with hushed("ray._private.authentication", level=logging.ERROR):
        yield


def quiet_ray(workdir: Path, name: str) -> None:
    """After ``ray.init`` in this process: the workers' stdout/stderr go to the log file (opened
    here when no command opened one, e.g. in a notebook) instead of the console."""
    try:
        import ray._private.worker as ray_worker
    except ImportError:
        ray_worker = None
    if verbose():
        if ray_worker is not None and ray_worker.print_to_stdstream is _to_log_file:
            ray_worker.print_to_stdstream = _RAY_PRINT.get("print", ray_worker.print_to_stdstream)
        return
    # Ray Data and Ray Train put INFO handlers on the console when first imported; every raypipe
    # run imports them anyway, so do it now (while Ray logs from WARNING, as ray.init left it)
    # and lower those handlers with the others; Ray's INFO records then reach the log file only.
    import ray.data  # noqa: F401
    import ray.train  # noqa: F401

    quiet_libraries()
    logging.getLogger("ray").setLevel(logging.INFO)
    if _log_file is None:
        open_log(workdir, name)
    try:  # Ray's driver-side streams (private: without them Ray's defaults stay)
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return
    if ray_worker is None:
        return
    # What the workers print (Train controller INFO lines, the workers' own progress, Ray Data's
    # warnings) and what the raylet pushes to the driver ("N PYTHON worker processes have been
    # started", which a 2-trial sweep on 2 CPUs always triggers) go to the log file.
    dispatcher.remove_handler("ray_print_logs")
    dispatcher.remove_handler("raypipe_log_file")
    dispatcher.add_handler("raypipe_log_file", _worker_lines_to_log)
    if ray_worker.print_to_stdstream is not _to_log_file:
        _RAY_PRINT["print"] = ray_worker.print_to_stdstream
        ray_worker.print_to_stdstream = _to_log_file


_RAY_PRINT: dict[str, Any] = {}


def _to_log_file(data: dict[str, Any], ignore_prefix: bool = False) -> None:
    _worker_lines_to_log(data)


def _worker_lines_to_log(data: dict[str, Any]) -> None:
    lines = data.get("lines", [])
    if data.get("pid") == "autoscaler":  # its status every few seconds; Ray's own printer keeps only events
        from ray._private.worker import filter_autoscaler_events

        lines = list(filter_autoscaler_events(lines))
    if not lines:
        return
    who = data.get("actor_name") or data.get("task_name") or "worker"
    prefix = f"({who} pid={data.get('pid')}{', stderr' if data.get('is_err') else ''}) "
    write_log("\n".join(prefix + line for line in lines))


@contextmanager
def hushed(*names: str, level: int = logging.WARNING) -> Iterator[None]:
    """These loggers below WARNING for one call: for messages that raypipe's own reads trigger
    (Ray Train's "A run snapshot was found ... delete the existing folder" when raypipe opens the
    results of a run it has just finished), which tell the user nothing."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(level)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


# --------------------------------------------------------------------------- sweep progress


class SweepBoard:
    """The sweep's progress, fed by Tune's driver-side callback: one line per trial epoch (or a
    live table on a terminal) with the trial id, the optimised metric, elapsed time and an ETA."""

    def __init__(self, metric: str, mode: str, epochs: int, trials: int, concurrency: int,
                 live: bool | None = None, stream: TextIO | None = None):
        self.metric, self.mode, self.epochs = metric, mode, max(epochs, 1)
        self.total_trials, self.concurrency = max(trials, 1), max(concurrency, 1)
        self.start = time.monotonic()
        self.rows: dict[str, dict[str, Any]] = {}
        self.stream = stream
        self.live_enabled = (sys.stdout.isatty() if live is None else live) and not verbose()
        self._live: Any = None

    # ---- events
    def trial_started(self, trial_id: str, config: dict[str, Any]) -> None:
        self.rows.setdefault(trial_id, {"status": "running", "epoch": 0, "value": None, "best": None,
                                        "start": time.monotonic(), "config": config, "epoch_s": []})
        self._refresh()

    def trial_epoch(self, trial_id: str, epoch: int, value: float | None) -> str:
        row = self.rows.get(trial_id) or self.rows.setdefault(
            trial_id, {"status": "running", "epoch": 0, "value": None, "best": None, "start": time.monotonic(),
                       "config": {}, "epoch_s": []})
        now = time.monotonic()
        last = row.get("last", row["start"])
        row["epoch_s"].append(now - last)
        row["last"] = now
        row["epoch"], row["value"] = epoch, value
        if value is not None and (row["best"] is None or (value < row["best"] if self.mode == "min" else value > row["best"])):
            row["best"] = value
        line = self.line(trial_id)
        if self._live is None:  # (through the command's log too)
            print(f"[raypipe] {line}", file=self.stream or sys.stdout, flush=True)
        else:
            write_log(f"[raypipe] {line}")
        self._refresh()
        return line

    def trial_done(self, trial_id: str, status: str) -> None:
        row = self.rows.get(trial_id)
        if row is not None:
            row["status"] = "stopped early" if status == "done" and row["epoch"] < self.epochs else status
        self._refresh()

    # ---- views
    def eta_s(self) -> float | None:
        times = [t for r in self.rows.values() for t in r["epoch_s"]]
        if not times:
            return None
        per_epoch = sum(times) / len(times)
        left = sum(self.epochs - r["epoch"] for r in self.rows.values() if r["status"] == "running")
        left += max(0, self.total_trials - len(self.rows)) * self.epochs
        return left * per_epoch / self.concurrency

    def line(self, trial_id: str) -> str:
        r = self.rows[trial_id]
        value = "n/a" if r["value"] is None else f"{r['value']:.4f}"
        eta = self.eta_s()
        return (f"trial {trial_id}  epoch {r['epoch']}/{self.epochs}  {self.metric} {value}  "
                f"elapsed {duration(time.monotonic() - self.start)}"
                + (f"  ETA {duration(eta)}" if eta is not None else ""))

    def table(self) -> Any:
        from rich.table import Table

        eta = self.eta_s()
        title = f"sweep: {len(self.rows)}/{self.total_trials} trials, elapsed {duration(time.monotonic() - self.start)}"
        if eta is not None:
            title += f", ETA {duration(eta)}"
        t = Table(title=title, title_justify="left")
        for col in ("trial", "status", "epoch", self.metric, "best", "config"):
            t.add_column(col)
        for tid, r in self.rows.items():
            t.add_row(tid, r["status"], f"{r['epoch']}/{self.epochs}",
                      "" if r["value"] is None else f"{r['value']:.4f}",
                      "" if r["best"] is None else f"{r['best']:.4f}",
                      ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r["config"].items()))
        return t

    def __enter__(self) -> SweepBoard:
        if self.live_enabled:
            from rich.console import Console
            from rich.live import Live

            self._live = Live(self.table(), console=Console(file=sys.__stdout__), refresh_per_second=2,
                              transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._live is not None:
            self._live.update(self.table())
            self._live.__exit__(*exc)
            self._live = None

    def _refresh(self) -> None:
        if self._live is not None:
            self._live.update(self.table())


def tune_callback(board: SweepBoard) -> Any:
    """A Ray Tune ``Callback`` (driver side) that feeds ``board``."""
    from ray.tune import Callback

    class SweepProgress(Callback):
        def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
            board.trial_started(trial.trial_id, dict(trial.config or {}))

        def on_trial_result(self, iteration: int, trials: list[Any], trial: Any, result: dict[str, Any],
                            **info: Any) -> None:
            if "epoch" in result:
                board.trial_epoch(trial.trial_id, int(result["epoch"]), result.get(board.metric))

        def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
            board.trial_done(trial.trial_id, "done")

        def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
            board.trial_done(trial.trial_id, "error")

    return SweepProgress()


# --------------------------------------------------------------------------- training progress


class EpochWatcher:
    """One line per epoch of a training run, read from the checkpoints it writes to local
    storage (``<run dir>/checkpoint_*/raypipe.json``): the workers' own prints stay in the log
    file, and nothing here depends on which process Ray Train reports in."""

    def __init__(self, run_dir: str, metric: str, epochs: int, interval_s: float = 1.0):
        self.run_dir, self.metric, self.epochs = Path(run_dir), metric, epochs
        self.interval_s = interval_s
        self.seen: set[int] = set()
        self.start = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="raypipe-epochs")

    def poll(self) -> list[str]:
        import json

        lines = []
        for meta in sorted(self.run_dir.glob("checkpoint_*/raypipe.json")):
            try:
                record = json.loads(meta.read_text(encoding="utf-8"))
            except (OSError, ValueError):  # being written, or pruned under us
                continue
            # Each checkpoint carries the run's history: an epoch whose own checkpoint Ray pruned
            # (keep_checkpoints) before this poll still gets its line.
            for row in record.get("history") or [record.get("metrics", {}) | {"epoch": record.get("epoch", 0)}]:
                epoch = int(row.get("epoch", 0))
                if epoch in self.seen or not epoch:
                    continue
                self.seen.add(epoch)
                value = row.get(self.metric)
                elapsed = time.monotonic() - self.start
                eta = elapsed / len(self.seen) * max(self.epochs - max(self.seen), 0)
                shown = "n/a" if value is None else f"{value:.4f}"
                lines.append(f"epoch {epoch}/{self.epochs}  {self.metric} {shown}  elapsed {duration(elapsed)}  "
                             f"ETA {duration(eta)}")
        for line in lines:
            say(line)
        return lines

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.poll()

    def __enter__(self) -> EpochWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.poll()
