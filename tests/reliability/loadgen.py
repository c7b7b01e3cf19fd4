"""Steady HTTP load on ``POST /predict`` from a process of its own (the reliability tests' client).

    python loadgen.py <url> <concurrency> <duration_s> <client_timeout_s> <out.json> [texts_per_request]

``concurrency`` asyncio clients post in a closed loop (one request in flight each) until the
duration is over. Every request is recorded as ``[start, status, latency_s, retry_after]`` with
``start`` in Unix seconds (so a test can line requests up with what it did to the server) and
``status`` the HTTP code, or the exception's class name when no response came (timeout, dropped
connection). The records are written to ``out.json`` at the end. ``$RAYPIPE_TOKEN`` is sent as a
bearer token when set.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time

import httpx

TEXTS = ["the striker scored a late goal", "a startup ships new software", "the chef made soup",
         "robot code internet", "the coach praised the team", "bread and cheese for dinner"]


async def _client(c: httpx.AsyncClient, url: str, body: dict, stop_at: float, records: list) -> None:
    while time.monotonic() < stop_at:
        start, t = time.time(), time.monotonic()
        try:
            r = await c.post(url + "/predict", json=body)
            records.append([start, r.status_code, time.monotonic() - t, r.headers.get("retry-after")])
        except httpx.HTTPError as exc:
            records.append([start, type(exc).__name__, time.monotonic() - t, None])


async def _main(url: str, concurrency: int, duration: float, timeout: float, per_request: int) -> list:
    body = {"texts": [TEXTS[i % len(TEXTS)] for i in range(per_request)]}
    token = os.environ.get("RAYPIPE_TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    records: list = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=timeout, limits=limits, headers=headers) as c:
        stop_at = time.monotonic() + duration
        await asyncio.gather(*(_client(c, url, body, stop_at, records) for _ in range(concurrency)))
    return records


def main() -> int:
    url, concurrency, duration, timeout, out = sys.argv[1:6]
    per_request = int(sys.argv[6]) if len(sys.argv) > 6 else 4
    records = asyncio.run(_main(url, int(concurrency), float(duration), float(timeout), per_request))
    with open(out, "w") as f:
        json.dump(records, f)
    print(f"loadgen: {len(records)} requests in {duration} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
