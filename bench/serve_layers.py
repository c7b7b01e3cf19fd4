"""Where a served request's milliseconds go: one layer of Ray Serve's request path at a time.

    python -m bench.serve_layers [--model tiny|minilm] [--repeats 2] [--modes a,b,...]

Each mode runs in a process of its own with a fresh private Ray (Serve reads its request-path
switches from the environment when its controller and replicas start), deploys raypipe's app on
the same untrained checkpoint (``raypipe.serve.deploy``, raypipe's defaults unless the mode says
otherwise) and drives it from a separate load process (``bench.loadgen``) at 1 and 32 clients;
``bare`` is ``bench.bare_server`` (one uvicorn process, the same FastAPI app and Predictor, no
Ray). Modes take turns in every repeat. At one client, a mode's p50 minus the model's own time
per call inside that server (``/stats``) is what the serving stack adds; the differences between
modes that differ in one switch are that switch's share:

    bare              uvicorn + the app + the Predictor: the floor
    direct            Serve's direct ingress, user code on the replica's loop, the client on the
                      replica's own port: Serve's replica wrapper without the proxy
    direct_thread     the same with user code on its own thread (Serve's default): + the hop
    proxy_unbatched   raypipe's app through Serve's proxy, serve.max_batch_size 1
    proxy             raypipe's default deployment (adaptive batch wait)
    proxy_grpc        + RAY_SERVE_PROXY_USE_GRPC=1 (proxy -> replica over gRPC)
    proxy_optimized   + RAY_SERVE_THROUGHPUT_OPTIMIZED=1 (direct ingress off): user code and
                      router on their loops, buffered request logs, no log lines to stderr

Writes ``bench/results/serve_layers.json`` and prints a Markdown table (BENCHMARKS.md section 4).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import common as C

_OFF = {"RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0", "RAY_SERVE_PORT_QUARANTINE_S": "0"}
MODES: dict[str, dict[str, Any]] = {
    "bare": {},
    "direct": {"env": {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1", "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
                       **_OFF}, "client": "replica"},
    "direct_thread": {"env": {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1", **_OFF}, "client": "replica"},
    "proxy_unbatched": {"serve": {"max_batch_size": 1}},
    "proxy": {},
    "proxy_grpc": {"env": {"RAY_SERVE_PROXY_USE_GRPC": "1"}},
    "proxy_optimized": {"env": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"}},
}
LABELS = ["negative", "positive"]
MAX_LENGTH = {"tiny": 64, "minilm": 128}


def _measure(url: str, concurrency: list[int], s: dict[str, Any], texts: Path) -> dict[str, Any]:
    from bench.serve import _get, loadgen

    out: dict[str, Any] = {}
    for c in concurrency:
        before = _get(f"{url}/stats")
        res = loadgen(url, c, s, texts)
        after = _get(f"{url}/stats")
        batches = after["batches"] - before["batches"]
        res["forward_ms"] = (after["inference_seconds"] - before["inference_seconds"]) / max(batches, 1) * 1000
        res["texts_per_call"] = (after["texts"] - before["texts"]) / max(batches, 1)
        out[str(c)] = res
        C.log(f"  c={c}: {res['rps']:.1f} req/s p50 {res['p50_ms']:.1f} ms (forward {res['forward_ms']:.2f} ms, "
              f"{res['texts_per_call']:.2f} texts/call) errors {res['errors']}")
    return out


def one_mode(mode: str, work: Path, model: str, concurrency: list[int], s: dict[str, Any]) -> dict[str, Any]:
    """Runs in its own process (``--one``): the mode's environment is set before Ray starts."""
    spec = MODES[mode]
    os.environ.update(spec.get("env", {}))
    texts = work / "texts.txt"
    ckpt = C.checkpoint_without_training(C.model_source(model, work), work, LABELS, MAX_LENGTH[model])
    if mode == "bare":
        from bench.serve import _wait_ready

        port = C.free_port()
        proc = subprocess.Popen([C.python(), "-m", "bench.bare_server", str(ckpt), "--port", str(port)],
                                env=C.bench_env(), cwd=C.ROOT)
        try:
            _wait_ready(f"http://127.0.0.1:{port}", 180, proc)
            return {"url": "bare", "load": _measure(f"http://127.0.0.1:{port}", concurrency, s, texts)}
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    with C.ray_session(num_cpus=os.cpu_count() or 2):
        from raypipe import serve as rserve
        from raypipe.config import config_from_dict

        port = C.free_port()
        cfg = config_from_dict({"workdir": str(work / f"w-{mode}"), "serve": {"port": port, **spec.get("serve", {})}})
        t0 = time.perf_counter()
        served = rserve.deploy(cfg, str(ckpt), ready_timeout_s=300)
        deploy_s = time.perf_counter() - t0
        url = served.url
        if spec.get("client") == "replica":  # the replica's own HTTP port (direct ingress)
            from ray.serve.context import _get_global_client

            groups = _get_global_client().get_serve_details().get("target_groups") or []
            ports = {t["port"] for g in groups for t in g.get("targets", [])
                     if "HTTP" in str(g.get("protocol", "")).upper()} - {port}
            if len(ports) != 1:
                raise RuntimeError(f"{mode}: expected one replica HTTP port, Serve lists {groups}")
            url = f"http://127.0.0.1:{ports.pop()}"
        try:
            return {"url": url.replace(str(port), "PROXY"), "deploy_s": round(deploy_s, 1),
                    "load": _measure(url, concurrency, s, texts)}
        finally:
            served.shutdown()


def run(model: str, repeats: int, modes: list[str], duration: float) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="raypipe-bench-serve-layers-"))
    (work / "texts.txt").write_text("\n".join(C.sst2_frame("dev")["text"]) + "\n", encoding="utf-8")
    C.checkpoint_without_training(C.model_source(model, work), work, LABELS, MAX_LENGTH[model])
    settings = {"duration": duration, "warmup": 1.0, "max_requests": 4000, "concurrency": [1, 32]}
    raw: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    for r in range(repeats):
        order = modes[r % len(modes):] + modes[: r % len(modes)]
        for mode in order:
            C.log(f"repeat {r + 1}: {mode}")
            proc = subprocess.run([C.python(), "-m", "bench.serve_layers", "--one", mode, "--work", str(work),
                                   "--model", model, "--settings", json.dumps(settings)],
                                  capture_output=True, text=True, env=C.bench_env(), cwd=C.ROOT, timeout=900)
            sys.stderr.write("".join(ln + "\n" for ln in proc.stderr.splitlines() if ln.startswith("[bench]")))
            if proc.returncode != 0:
                raise RuntimeError(f"{mode} failed:\n{proc.stderr[-4000:]}")
            raw[mode].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return {"name": "serve_layers", "command": f"python -m bench.serve_layers --model {model} --repeats {repeats}",
            "machine": C.machine(), "settings": settings, "model": model, "max_length": MAX_LENGTH[model],
            "modes": modes, "raw": raw, "table": table(raw, modes)}


def table(raw: dict[str, list[dict[str, Any]]], modes: list[str]) -> list[dict[str, Any]]:
    rows = []
    for mode in modes:
        runs = raw[mode]
        row: dict[str, Any] = {"mode": mode}
        for c in ("1", "32"):
            row[f"rps_c{c}"] = C.stats(x["load"][c]["rps"] for x in runs)
            row[f"p50_c{c}"] = C.stats(x["load"][c]["p50_ms"] for x in runs)
            row[f"vs_bare_c{c}"] = C.stats(a["load"][c]["rps"] / b["load"][c]["rps"]
                                           for a, b in zip(runs, raw["bare"])) if "bare" in raw else None
        row["forward_c1"] = C.stats(x["load"]["1"]["forward_ms"] for x in runs)
        row["added_c1"] = C.stats(x["load"]["1"]["p50_ms"] - x["load"]["1"]["forward_ms"] for x in runs)
        row["texts_per_call_c32"] = C.stats(x["load"]["32"]["texts_per_call"] for x in runs)
        rows.append(row)
    return rows


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [f"Command: `{result['command']}`", "",
             f"Machine: {m['nproc']} × {m['cpu']}, {m['ram_gib']} GiB RAM; load average at start "
             f"{'/'.join(str(x) for x in m['load_avg_at_start'])}. Date {m['date']}, commit {m['git']}. "
             f"Model: {result['model']} (max_length {result['max_length']}), untrained checkpoint; "
             f"{result['settings']['duration']:g} s per measurement after 1 s warm-up; median [min–max] of the repeats.", "",
             "| mode | c=1 req/s | p50 ms | forward ms | added over forward, ms | c=32 req/s | / bare at c=32 | texts per call at c=32 |",
             "|---|---|---|---|---|---|---|---|"]

    def f(st: dict[str, float] | None, fmt: str = "{:.1f}") -> str:
        if not st:
            return "—"
        return f"{fmt.format(st['median'])} [{fmt.format(st['min'])}–{fmt.format(st['max'])}]"

    for row in result["table"]:
        lines.append(f"| {row['mode']} | {f(row['rps_c1'])} | {f(row['p50_c1'])} | {f(row['forward_c1'], '{:.2f}')} | "
                     f"{f(row['added_c1'])} | {f(row['rps_c32'])} | {f(row['vs_bare_c32'], '{:.2f}')}× | "
                     f"{f(row['texts_per_call_c32'], '{:.2f}')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.serve_layers", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MAX_LENGTH), default="tiny")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--duration", type=float, default=3.0, help="seconds per measurement (after 1 s warm-up)")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--out", type=Path, default=C.RESULTS_DIR)
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--settings", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.one:
        s = json.loads(a.settings)
        print(json.dumps(one_mode(a.one, a.work, a.model, s["concurrency"], s)))
        return 0
    modes = [m for m in a.modes.split(",") if m]
    unknown = set(modes) - set(MODES)
    if unknown:
        p.error(f"unknown modes {sorted(unknown)}; known {list(MODES)}")
    result = run(a.model, a.repeats, modes, a.duration)
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / f"serve_layers_{a.model}.json"
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    C.log(f"wrote {path}")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
