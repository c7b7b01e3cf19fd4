"""Benchmark 4 — serving: raypipe's Ray Serve app (batching on and off) vs a bare uvicorn +
FastAPI process running the same Predictor and the same FastAPI app (``raypipe.api``).

Servers, all on 127.0.0.1, all up for the whole benchmark (idle ones cost ~nothing):
  bare                 python -m bench.bare_server CKPT (one process, no Ray, no batching)
  serve_batched        raypipe.serve.deploy(...)  raypipe's defaults (max_batch_size 32), route /b
  serve_unbatched      raypipe.serve.deploy(...)  serve.max_batch_size=1, route /u
  serve_batched_wait0  raypipe.serve.deploy(...)  batch_wait_timeout_s=0 (take what is queued), /w0
  serve_batched_wait5ms                           batch_wait_timeout_s=0.005, /w5
  serve_batched_quiet                             serve.access_log=false, /q
  serve_batched_quiet_wait0                       both, /q0
Load comes from a separate process (``python -m bench.loadgen``, async httpx), one sentence of
SST-2 dev per request, ``concurrency`` clients back to back, bounded in time and count. For each
concurrency the servers take turns (rotating order) in every repeat.

"Forward time" is the model's own time per call as each server measured it (``/stats``:
inference seconds / batches, at concurrency 1), so a server's p50 overhead = p50 - its forward
time. Two models: the tiny BERT (forward ~2 ms, so the framework's own cost shows) and MiniLM at
128 tokens (a real model, CPU-bound).
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import common as C

TARGET_RPS_C32 = 1.0
TARGET_P50_OVERHEAD_MS = 5.0
LABELS = ["negative", "positive"]
# Serve sides: route and the serve.* settings that differ from raypipe's defaults.
SERVE_SIDES: dict[str, tuple[str, dict[str, Any]]] = {
    "serve_batched": ("/b", {}),
    "serve_unbatched": ("/u", {"max_batch_size": 1}),
    "serve_batched_wait0": ("/w0", {"batch_wait_timeout_s": 0.0}),
    "serve_batched_wait5ms": ("/w5", {"batch_wait_timeout_s": 0.005}),
    "serve_batched_quiet": ("/q", {"access_log": False}),
    "serve_batched_quiet_wait0": ("/q0", {"access_log": False, "batch_wait_timeout_s": 0.0}),
}


def settings(quick: bool) -> dict[str, Any]:
    if quick:
        return {"models": {"tiny": 64}, "concurrency": [1, 8], "duration": 1.0, "warmup": 0.3,
                "max_requests": 500, "repeats": 1, "servers": ["bare", "serve_batched", "serve_direct"]}
    # tiny: the framework's own cost shows (forward ~2 ms); MiniLM at 128 tokens: a real model.
    return {"models": {"tiny": 64, "minilm": 128}, "concurrency": [1, 8, 32], "duration": 3.0, "warmup": 1.0,
            "max_requests": 4000, "repeats": 2,
            "servers": ["bare", "serve_batched", "serve_direct", "serve_unbatched", *_extra_sides()]}


def _extra_sides() -> list[str]:
    """More Serve sides to compare, e.g. RAYPIPE_BENCH_SERVE_SIDES=serve_batched_wait5ms."""
    names = [n for n in os.environ.get("RAYPIPE_BENCH_SERVE_SIDES", "").split(",") if n]
    unknown = set(names) - set(SERVE_SIDES)
    if unknown:
        raise SystemExit(f"RAYPIPE_BENCH_SERVE_SIDES: unknown {sorted(unknown)}; known {sorted(SERVE_SIDES)}")
    return names


def _get(url: str) -> Any:
    import httpx

    return httpx.get(url, timeout=10).json()


def _wait_ready(url: str, timeout: float, proc: subprocess.Popen | None = None) -> float:
    import httpx

    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before {url}/ready answered")
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return time.perf_counter() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url}/ready did not answer 200 in {timeout:.0f}s")


def loadgen(url: str, c: int, s: dict[str, Any], texts: Path) -> dict[str, Any]:
    cmd = [C.python(), "-m", "bench.loadgen", url, "--concurrency", str(c), "--duration", str(s["duration"]),
           "--max-requests", str(s["max_requests"]), "--warmup", str(s["warmup"]), "--texts", str(texts)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=C.bench_env(), cwd=C.ROOT,
                         timeout=s["duration"] + s["warmup"] + 120)
    if out.returncode != 0:
        raise RuntimeError(f"loadgen failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(quick: bool = False, repeats: int | None = None, work: Path | None = None,
        device: str = "cpu") -> dict[str, Any]:
    s = settings(quick)
    s["device"] = device
    if device == "cuda":  # one GPU: a second app's replica (1 GPU each) would never be placed
        s["servers"] = [n for n in s["servers"] if n in ("bare", "serve_batched", "serve_direct")]
    s["repeats"] = repeats or s["repeats"]
    work = work or Path(tempfile.mkdtemp(prefix="raypipe-bench-serve-"))
    texts = work / "texts.txt"
    texts.write_text("\n".join(C.sst2_frame("dev")["text"]) + "\n", encoding="utf-8")
    models = {}
    # One CPU per replica is an accounting figure (it also sets torch to one thread); the sides
    # take turns under load, so more replicas than cores are placed without competing.
    serve_sides = sum(1 for n in s["servers"] if n != "bare")
    with C.ray_session(num_cpus=max(os.cpu_count() or 2, serve_sides)):
        for model, max_length in s["models"].items():
            models[model] = _run_model(model, max_length, s, work, texts, device)
    rows = [{**row, "what": f"{model}: {row['what']}"} for model, m in models.items() for row in m["rows"] if row]
    return {
        "name": "serve",
        "title": "4. Serving: Ray Serve app vs bare uvicorn + FastAPI",
        "command": (f"RAYPIPE_BENCH_SERVE_SIDES={os.environ['RAYPIPE_BENCH_SERVE_SIDES']} "
                    if os.environ.get("RAYPIPE_BENCH_SERVE_SIDES") else "")
        + "python -m bench serve" + (" --quick" if quick else ""),
        "settings": s,
        "machine": C.machine(),
        "models": models,
        "rows": rows,
    }


def _run_model(model: str, max_length: int, s: dict[str, Any], work: Path, texts: Path,
               device: str) -> dict[str, Any]:
    src = C.model_source(model, work)
    ckpt = C.checkpoint_without_training(src, work, LABELS, max_length)

    # The model's own forward time in this process, for reference (2 threads and 1 thread).
    import torch

    from raypipe.predict import Predictor

    pred = Predictor.from_dir(ckpt, device=device)
    sample = C.sst2_frame("dev", n=40, seed=1)["text"].tolist()
    forward: dict[str, Any] = {}
    default_threads = torch.get_num_threads()
    for threads in sorted({default_threads, 1}, reverse=True):
        torch.set_num_threads(threads)
        pred.predict(sample[:4])
        times = []
        for t in sample:
            t0 = time.perf_counter()
            pred.predict([t])
            times.append((time.perf_counter() - t0) * 1000)
        forward[f"{threads}_threads_ms"] = C.stats(times)
    torch.set_num_threads(default_threads)
    del pred

    bare_port = C.free_port()
    bare_url = f"http://127.0.0.1:{bare_port}"
    bare = subprocess.Popen([C.python(), "-m", "bench.bare_server", str(ckpt), "--port", str(bare_port),
                             "--device", device],
                            env=C.bench_env(), cwd=C.ROOT)
    startup: dict[str, float] = {}
    raw: dict[str, dict[str, list[dict[str, Any]]]] = {}
    forwards: dict[str, list[float]] = {}  # the model's time per call inside each server, at c=1
    try:
        startup["bare_to_ready_s"] = _wait_ready(bare_url, 180, bare)
        from raypipe import serve as rserve
        from raypipe.config import config_from_dict

        serve_port = C.free_port()
        urls = {"bare": bare_url}
        if True:  # inside run()'s Ray session
            from ray import serve

            try:
                for name in s["servers"]:
                    if name in ("bare", "serve_direct"):  # serve_direct: serve_batched's replica URL
                        continue
                    route, opts = SERVE_SIDES[name]
                    cfg = config_from_dict({"workdir": str(work / f"w-{model}"), "serve": {
                        "port": serve_port, "app_name": name, "route_prefix": route, **opts,
                        "use_gpu": device == "cuda"}})
                    t0 = time.perf_counter()
                    served = rserve.deploy(cfg, str(ckpt), ready_timeout_s=300)
                    startup[f"{name}_deploy_s"] = time.perf_counter() - t0
                    urls[name] = served.url
                    C.log(f"{name} ready at {served.url} in {startup[f'{name}_deploy_s']:.1f}s")
                    if name == "serve_batched" and "serve_direct" in s["servers"]:
                        if served.direct_urls:
                            urls["serve_direct"] = served.direct_urls[0]  # the same replica, no proxy hop
                            C.log(f"serve_direct (serve_batched's replica) at {urls['serve_direct']}")
                        else:  # a Serve started before this benchmark, without direct ingress
                            C.log("serve_direct: no replica URL (Serve was running without direct ingress); skipped")
                            s["servers"].remove("serve_direct")
                for r in range(s["repeats"]):
                    for c in s["concurrency"]:
                        names = s["servers"]
                        order = names[(r + c) % len(names):] + names[: (r + c) % len(names)]
                        for name in order:
                            before = _get(f"{urls[name]}/stats") if c == 1 else None
                            res = loadgen(urls[name], c, s, texts)
                            if before is not None:
                                after = _get(f"{urls[name]}/stats")
                                nb = after["batches"] - before["batches"]
                                if nb > 0:
                                    fw = (after["inference_seconds"] - before["inference_seconds"]) / nb * 1000
                                    res["server_forward_ms"] = fw
                                    forwards.setdefault(name, []).append(fw)
                            raw.setdefault(name, {}).setdefault(str(c), []).append(res)
                            C.log(f"serve r{r + 1} c={c} {name}: {res['rps']:.1f} req/s p50 {res['p50_ms']:.1f} ms "
                                  f"p99 {res['p99_ms']:.1f} ms errors {res['errors']}")
                stats_after = {n: _get(f"{u}/stats") for n, u in urls.items()}
            finally:
                serve.shutdown()
    finally:
        bare.terminate()
        try:
            bare.wait(timeout=20)
        except subprocess.TimeoutExpired:
            bare.kill()

    table = []
    for c in s["concurrency"]:
        row: dict[str, Any] = {"concurrency": c}
        for name in s["servers"]:
            runs = raw[name][str(c)]
            row[name] = {"rps": C.stats(x["rps"] for x in runs), "p50_ms": C.stats(x["p50_ms"] for x in runs),
                         "p99_ms": C.stats(x["p99_ms"] for x in runs),
                         "errors": sum(sum(x["errors"].values()) for x in runs)}
            if name != "bare":
                row[f"{name}_vs_bare"] = C.stats(a["rps"] / b["rps"] for a, b in zip(runs, raw["bare"][str(c)]))
        table.append(row)
    c32 = next((r for r in table if r["concurrency"] == max(s["concurrency"])), None)
    c1 = next((r for r in table if r["concurrency"] == 1), None)
    fw = {n: C.stats(v) for n, v in forwards.items()}

    def over(name: str) -> dict[str, float] | None:
        if not c1 or name not in raw:
            return None
        return C.stats(x["p50_ms"] - x["server_forward_ms"] for x in raw[name]["1"] if "server_forward_ms" in x)

    overhead, bare_overhead, unbatched_overhead = over("serve_batched"), over("bare"), over("serve_unbatched")
    direct_overhead = over("serve_direct")
    return {
        "checkpoint": {"model": model, "max_length": max_length, "trained": False},
        "forward_in_process": forward,
        "server_forward_ms": fw,
        "startup": startup,
        "batch_stats": stats_after,
        "raw": raw,
        "table": table,
        "rows": [
            {"what": f"rps at c={c32['concurrency']}, batched Serve / bare", "ratio": c32["serve_batched_vs_bare"],
             "target": TARGET_RPS_C32, "met": c32["serve_batched_vs_bare"]["median"] >= TARGET_RPS_C32} if c32 else {},
            {"what": "Serve p50 overhead at c=1 (ms, p50 - replica forward)", "value": overhead,
             "target": TARGET_P50_OVERHEAD_MS,
             "met": overhead["median"] <= TARGET_P50_OVERHEAD_MS if overhead and overhead["n"] else None},
            {"what": f"rps at c={c32['concurrency']}, Serve at the replica's own URL (direct ingress) / bare",
             "ratio": c32["serve_direct_vs_bare"], "target": TARGET_RPS_C32,
             "met": c32["serve_direct_vs_bare"]["median"] >= TARGET_RPS_C32} if c32 and "serve_direct" in raw else {},
            {"what": "Serve at the replica's own URL: p50 overhead at c=1 (ms, p50 - replica forward)",
             "value": direct_overhead, "target": TARGET_P50_OVERHEAD_MS,
             "met": direct_overhead["median"] <= TARGET_P50_OVERHEAD_MS if direct_overhead and direct_overhead["n"]
             else None} if "serve_direct" in raw else {},
            {"what": "Serve (unbatched) p50 overhead at c=1 (ms)", "value": unbatched_overhead,
             "target": None, "met": None},
            {"what": "bare p50 overhead at c=1 (ms, p50 - its own forward)", "value": bare_overhead,
             "target": None, "met": None},
            *[row for name in s["servers"] if name not in ("bare", "serve_batched", "serve_unbatched", "serve_direct")
              for row in (
                  {"what": f"{name}: rps at c={c32['concurrency']} / bare", "ratio": c32[f"{name}_vs_bare"],
                   "target": None, "met": None} if c32 else {},
                  {"what": f"{name}: p50 overhead at c=1 (ms)", "value": over(name), "target": None, "met": None},
              )],
        ],
    }
