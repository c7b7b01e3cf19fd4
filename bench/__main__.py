"""``python -m bench all|train|sst2|data|serve|tune|startup|tasks|batch|lora|gpu|report [--quick]``

Each benchmark runs its sides alternately and writes ``<out>/<name>.json``. A full run
(no ``--quick``) writes to ``bench/results/`` and regenerates the tables in BENCHMARKS.md;
``--quick`` runs every benchmark for a few seconds (the CI smoke test) and writes to a
temporary directory unless ``--out`` says otherwise. ``all`` runs each benchmark in its own
process, so one that fails (or leaves Ray state behind) does not take the others with it.
"""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import common as C

BENCHMARKS = {
    "train": "bench.train",
    "sst2": "bench.sst2",
    "data": "bench.data",
    "serve": "bench.serve",
    "tune": "bench.tune",
    "startup": "bench.startup",
    "tasks": "bench.tasks",
    "batch": "bench.batch",
    "lora": "bench.lora",
}
ORDER = ["startup", "data", "train", "sst2", "serve", "tune", "tasks", "batch", "lora"]
BENCHMARKS["sft"] = "bench.sft"  # 12. SFT: training vs a plain loop, packing, generation serving
ORDER.append("sft")


def run_one(name: str, quick: bool, repeats: int | None, out: Path) -> dict:
    mod = importlib.import_module(BENCHMARKS[name])
    t0 = time.perf_counter()
    result = mod.run(quick=quick, repeats=repeats)
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    result["quick"] = quick
    if repeats and "--repeats" not in result.get("command", ""):  # the command that made these numbers
        result["command"] = f"{result.get('command', 'python -m bench ' + name)} --repeats {repeats}"
    C.save_result(name, result, out)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["all", *BENCHMARKS, "gpu", "report"])
    p.add_argument("--quick", action="store_true", help="a few seconds per benchmark (smoke test)")
    p.add_argument("--repeats", type=int, help="alternating repeats (default: per benchmark)")
    p.add_argument("--out", type=Path, help="where the JSON results go (default: bench/results, "
                   "or a temporary dir with --quick)")
    p.add_argument("--no-report", action="store_true", help="do not rewrite BENCHMARKS.md")
    a, extra = p.parse_known_args(argv)
    if extra and a.what != "gpu":
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    out = a.out or (Path(tempfile.mkdtemp(prefix="raypipe-bench-quick-")) if a.quick else C.RESULTS_DIR)
    write_report = not a.quick and not a.no_report and out.resolve() == C.RESULTS_DIR.resolve()

    if a.what == "gpu":
        from bench import gpu

        return gpu.main(quick=a.quick, out=out, argv=extra)
    if a.what == "report":
        from bench import report

        report.write(out)
        return 0
    if a.what == "all":
        failed = []
        for name in ORDER:
            cmd = [sys.executable, "-m", "bench", name, "--out", str(out), "--no-report"]
            cmd += ["--quick"] if a.quick else []
            cmd += ["--repeats", str(a.repeats)] if a.repeats else []
            C.log(f"=== {' '.join(cmd[1:])}")
            t0 = time.perf_counter()
            rc = subprocess.call(cmd, env=C.bench_env())
            C.log(f"=== {name}: exit {rc} after {time.perf_counter() - t0:.0f}s")
            if rc != 0:
                failed.append(name)
        if write_report:
            from bench import report

            report.write(out)
        if failed:
            C.log(f"failed: {', '.join(failed)}")
        return 1 if failed else 0

    result = run_one(a.what, a.quick, a.repeats, out)
    print(json.dumps({k: v for k, v in result.items() if k in ("name", "rows", "wall_s")}, indent=1, default=str))
    if write_report:
        from bench import report

        report.write(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
