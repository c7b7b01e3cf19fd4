"""Benchmark 6 — start-up: ``raypipe --help``, ``import raypipe``, Serve cold start to /ready,
and (opt-in, long) the quickstart end to end.

Each timing is a fresh process, repeated alternately with the interpreter's own start
(``python -c pass``) so the floor the machine imposes is visible next to each number.
Serve cold start: ``raypipe serve CKPT --port P ray.address=local`` until ``GET /ready``
answers 200 (Ray start, Serve start, replica, model load and warm-up), then SIGTERM.
The quickstart (opt-in with ``RAYPIPE_BENCH_QUICKSTART=1``, it takes many minutes):
``raypipe run examples/configs/quickstart.yaml workdir=<tmp> serve.port=<free> ray.address=local``
— tune, evaluate, register, serve, sample predictions, shut down — timed as one process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import common as C

TARGET_HELP_S = 0.5


def settings(quick: bool) -> dict[str, Any]:
    if quick:
        return {"repeats": 1, "serve_cold": 0, "quickstart": False}
    return {"repeats": 5, "serve_cold": 2, "quickstart": os.environ.get("RAYPIPE_BENCH_QUICKSTART") == "1"}


def _raypipe_bin() -> str:
    cand = Path(C.python()).parent / "raypipe"
    return str(cand) if cand.exists() else "raypipe"


def _timed(cmd: list[str], **kw: Any) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env=C.bench_env(), **kw)
    return time.perf_counter() - t0


def serve_cold_start(ckpt: Path, timeout: float = 300) -> float:
    import httpx

    port = C.free_port()
    url = f"http://127.0.0.1:{port}"
    t0 = time.perf_counter()
    proc = subprocess.Popen([_raypipe_bin(), "serve", str(ckpt), "--port", str(port), "ray.address=local"],
                            env=C.bench_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        while True:
            if time.perf_counter() - t0 > timeout:
                raise TimeoutError("raypipe serve did not become ready")
            if proc.poll() is not None:
                raise RuntimeError(f"raypipe serve exited with {proc.returncode}")
            try:
                if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                    return time.perf_counter() - t0
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGTERM)  # raypipe serve shuts Serve and its own Ray down
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def quickstart(work: Path) -> float:
    port = C.free_port()
    return _timed([_raypipe_bin(), "run", str(C.ROOT / "examples/configs/quickstart.yaml"),
                   f"workdir={work / 'qs'}", f"serve.port={port}", "ray.address=local"], cwd=work, timeout=3600)


def run(quick: bool = False, repeats: int | None = None, work: Path | None = None) -> dict[str, Any]:
    s = settings(quick)
    s["repeats"] = repeats or s["repeats"]
    work = work or Path(tempfile.mkdtemp(prefix="raypipe-bench-startup-"))
    py = C.python()
    sides = {
        "python_pass": lambda: _timed([py, "-c", "pass"]),
        "raypipe_help": lambda: _timed([_raypipe_bin(), "--help"]),
        "import_raypipe": lambda: _timed([py, "-c", "import raypipe"]),
        "import_raypipe_predict": lambda: _timed([py, "-c", "import raypipe.predict, torch, transformers"]),
        "import_raypipe_serve": lambda: _timed([py, "-W", "ignore", "-c", "import raypipe.serve"]),
    }
    raw = C.alternate(sides, s["repeats"], "startup")
    out: dict[str, Any] = {k: C.stats(v) for k, v in raw.items()}
    if s["serve_cold"]:
        ckpt = C.checkpoint_without_training(C.model_source("tiny", work), work, ["negative", "positive"], 64)
        raw["serve_cold_start"] = [serve_cold_start(ckpt) for _ in range(s["serve_cold"])]
        out["serve_cold_start"] = C.stats(raw["serve_cold_start"])
    if s["quickstart"]:
        raw["quickstart"] = [quickstart(work)]
        out["quickstart"] = C.stats(raw["quickstart"])
    help_s = out["raypipe_help"]
    manual = None  # keep a quickstart time measured by hand (see BENCHMARKS.md) across re-runs
    previous = C.RESULTS_DIR / "startup.json"
    if previous.is_file():
        try:
            manual = json.loads(previous.read_text()).get("quickstart_manual")
        except ValueError:
            manual = None
    return {
        "quickstart_manual": manual,
        "name": "startup",
        "title": "6. Start-up",
        "command": "python -m bench startup" + (" --quick" if quick else ""),
        "settings": s,
        "machine": C.machine(),
        "raw": raw,
        "seconds": out,
        "rows": [{"what": "raypipe --help wall time (s)", "value": help_s, "target": TARGET_HELP_S,
                  "met": help_s["median"] < TARGET_HELP_S}],
    }
