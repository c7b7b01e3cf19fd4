"""Serving overload: a real Serve deployment of the tiny checkpoint with small
``max_ongoing_requests``/``max_queued_requests``, hammered by a separate process on 127.0.0.1.

Every request must get an answer: 200, or 503 with ``Retry-After`` (Serve's backpressure, which
raypipe configures to 503), quickly, never a client timeout or a dropped connection. Afterwards
the replica answers normally again.

About 60-90 s on 2 cores (Serve start-up dominates), hence ``slow``.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
import time

import httpx
import pytest

from raypipe.config import config_from_dict

pytestmark = [pytest.mark.slow, pytest.mark.ray]

CONCURRENCY = 64
DURATION_S = 15
CLIENT_TIMEOUT_S = 30

LOAD = textwrap.dedent("""
    import asyncio, json, sys, time
    import httpx

    url, concurrency, duration, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
    body = {"texts": ["the striker scored a late goal", "a startup ships new software",
                      "the chef made soup", "robot code internet"]}
    records = []

    async def client(c, stop_at):
        while time.monotonic() < stop_at:
            t = time.monotonic()
            try:
                r = await c.post(url + "/predict", json=body)
                records.append([r.status_code, time.monotonic() - t, r.headers.get("retry-after")])
            except httpx.HTTPError as exc:
                records.append([type(exc).__name__, time.monotonic() - t, None])

    async def main():
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(timeout=timeout, limits=limits) as c:
            stop_at = time.monotonic() + duration
            await asyncio.gather(*(client(c, stop_at) for _ in range(concurrency)))

    asyncio.run(main())
    print("RESULT " + json.dumps(records))
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else 0.0


def test_overload_from_another_process_gets_only_200_or_503_with_retry_after(ray_local, tiny_checkpoint, tmp_path):
    from ray import serve

    from raypipe.serve import deploy

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    cfg = config_from_dict({
        "workdir": str(tmp_path / "work"),
        "serve": {"port": port, "app_name": "rel-overload", "max_batch_size": 16,
                  "max_ongoing_requests": 2, "max_queued_requests": 4},
    })
    t0 = time.perf_counter()
    served = deploy(cfg, str(tiny_checkpoint), ready_timeout_s=180)
    startup_s = time.perf_counter() - t0
    try:
        out = subprocess.run(
            [sys.executable, "-c", LOAD, served.url, str(CONCURRENCY), str(DURATION_S), str(CLIENT_TIMEOUT_S)],
            capture_output=True, text=True, timeout=DURATION_S + CLIENT_TIMEOUT_S + 60,
        )
        lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
        assert lines, out.stderr[-3000:]
        records = json.loads(lines[-1].removeprefix("RESULT "))

        after = httpx.post(f"{served.url}/predict", json={"text": "after the storm"}, timeout=30)
        ready = httpx.get(f"{served.url}/ready", timeout=30)
    finally:
        serve.delete(served.app_name)
        serve.shutdown()  # leave the session's Ray without Serve, as the other tests expect

    codes = [r[0] for r in records]
    ok = [r for r in records if r[0] == 200]
    rejected = [r for r in records if r[0] == 503]
    summary = {
        "startup_s": round(startup_s, 1), "concurrency": CONCURRENCY, "duration_s": DURATION_S,
        "requests": len(records), "200": len(ok), "503": len(rejected),
        "other": len(records) - len(ok) - len(rejected),
        "rate_503": round(len(rejected) / max(len(records), 1), 3),
        "latency_200_p50_s": round(_pct([r[1] for r in ok], 0.5), 3),
        "latency_200_p99_s": round(_pct([r[1] for r in ok], 0.99), 3),
        "latency_503_p50_s": round(_pct([r[1] for r in rejected], 0.5), 3),
        "latency_503_max_s": round(max((r[1] for r in rejected), default=0.0), 3),
        "latency_max_s": round(max((r[1] for r in records), default=0.0), 3),
    }
    print("\nRELIABILITY overload", json.dumps(summary))
    assert set(codes) <= {200, 503}, summary  # no timeouts, no dropped connections, no 5xx but 503
    assert ok and rejected, summary  # it really was overloaded, and it kept serving
    assert all(r[2] == "1" for r in rejected), "every 503 carries Retry-After"
    assert summary["latency_max_s"] < CLIENT_TIMEOUT_S / 2, summary  # answered, not hanging
    assert after.status_code == 200 and ready.status_code == 200
