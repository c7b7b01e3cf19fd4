"""Async HTTP load generator (httpx), run as its own process so it never shares an event loop
or a GIL with the server it measures.

    python -m bench.loadgen http://127.0.0.1:8123 --concurrency 8 --duration 5 --max-requests 4000

``concurrency`` clients each send ``POST /predict {"texts": [one sentence]}`` back to back,
after ``--warmup`` seconds that are not recorded, until ``--duration`` seconds or
``--max-requests`` requests have passed (both bounded). Prints one JSON object: requests,
errors, requests/s, latency percentiles in ms.

``--targets '[{"prefix": "/a"}, {"model": "m-2"}]'`` spreads the load evenly over several
models: request k goes to target k mod n, at ``URL + prefix + /predict`` and, with ``model``,
the ``serve_multiplexed_model_id`` header (a multiplexed adapter); the answer then counts the
requests per target (``by_target``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from pathlib import Path


def percentile(sorted_ms: list[float], q: float) -> float:
    if not sorted_ms:
        return float("nan")
    k = min(len(sorted_ms) - 1, max(0, round(q / 100 * (len(sorted_ms) - 1))))
    return sorted_ms[k]


async def drive(url: str, texts: list[str], concurrency: int, duration: float, max_requests: int,
                warmup: float, timeout: float, targets: list[dict] | None = None) -> dict:
    import httpx

    spread = targets or [{}]
    by_target = [0] * len(spread)

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    lat: list[float] = []
    errors: dict[str, int] = {}
    state = {"sent": 0, "recording": False, "next": 0}
    rng = random.Random(0)

    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout) as client:
        async def one() -> None:
            body = {"texts": [rng.choice(texts)]}
            k = state["next"] % len(spread)
            state["next"] += 1
            target = spread[k]
            headers = {"serve_multiplexed_model_id": target["model"]} if target.get("model") else None
            t0 = time.perf_counter()
            try:
                r = await client.post(f"{target.get('prefix', '')}/predict", json=body, headers=headers)
                ok, why = r.status_code == 200, f"HTTP {r.status_code}"
            except httpx.HTTPError as exc:
                ok, why = False, type(exc).__name__
            if state["recording"]:
                if ok:
                    lat.append((time.perf_counter() - t0) * 1000)
                    by_target[k] += 1
                else:
                    errors[why] = errors.get(why, 0) + 1

        async def worker(deadline: float) -> None:
            while time.perf_counter() < deadline and (not state["recording"] or state["sent"] < max_requests):
                if state["recording"]:
                    state["sent"] += 1
                await one()

        if warmup > 0:
            end = time.perf_counter() + warmup
            await asyncio.gather(*(worker(end) for _ in range(concurrency)))
        state["recording"] = True
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(t0 + duration) for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
    lat.sort()
    out = {
        "concurrency": concurrency,
        "requests": len(lat),
        "errors": errors,
        "seconds": elapsed,
        "rps": len(lat) / elapsed if elapsed > 0 else 0.0,
        "p50_ms": percentile(lat, 50),
        "p90_ms": percentile(lat, 90),
        "p99_ms": percentile(lat, 99),
        "mean_ms": sum(lat) / len(lat) if lat else float("nan"),
    }
    if targets:
        out["by_target"] = {str(t.get("model") or t.get("prefix") or i): n
                            for i, (t, n) in enumerate(zip(spread, by_target))}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.loadgen")
    p.add_argument("url")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--max-requests", type=int, default=5000)
    p.add_argument("--warmup", type=float, default=0.5)
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument("--texts", type=Path, help="one text per line (default: a few fixed sentences)")
    p.add_argument("--targets", type=json.loads, help='JSON list of {"prefix": ..., "model": ...}: '
                   "the load is spread evenly over them")
    a = p.parse_args(argv)
    texts = [t for t in a.texts.read_text(encoding="utf-8").splitlines() if t.strip()] if a.texts else [
        "a gorgeous , witty , seductive movie .",
        "the plot is nothing but boilerplate clichés from start to finish ,",
        "it 's a charming and often affecting journey .",
    ]
    out = asyncio.run(drive(a.url.rstrip("/"), texts, a.concurrency, a.duration, a.max_requests,
                            a.warmup, a.timeout, a.targets))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
