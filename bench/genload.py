"""Streaming load for the OpenAI routes (benchmark 12), run as its own process so it never shares
an event loop or a GIL with the server it measures.

    python -m bench.genload http://127.0.0.1:8124 --concurrency 8 --duration 10 --prompts prompts.jsonl

``concurrency`` clients each send ``POST /v1/chat/completions`` with ``stream: true`` (one user
turn, ``max_tokens`` fixed, ``temperature`` 0, usage asked for) back to back, after ``--warmup``
seconds that are not recorded, until ``--duration`` seconds or ``--max-requests`` requests have
passed. The prompts are taken in file order by all clients together, so every server sees the
same sequence. Per request: TTFT (time from sending to the first chunk that carries generated
text; the chat stream's opening role chunk, sent before any generation, does not count), total
latency and completion tokens (from the usage chunk). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

from bench.loadgen import percentile


async def _one(client: Any, model: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = None
    tokens = 0
    finish = None
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return {"ok": False, "why": f"HTTP {r.status_code}"}
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                break
            obj = json.loads(data)
            if "error" in obj:
                return {"ok": False, "why": "error event"}
            if obj.get("usage"):
                tokens = int(obj["usage"]["completion_tokens"])
            for choice in obj.get("choices") or []:
                if first is None and (choice.get("delta") or {}).get("content"):
                    first = time.perf_counter()
                finish = choice.get("finish_reason") or finish
    end = time.perf_counter()
    return {"ok": True, "ttft_ms": ((first or end) - t0) * 1000, "latency_ms": (end - t0) * 1000,
            "tokens": tokens, "finish": finish, "text_seen": first is not None}


async def drive(url: str, prompts: list[str], concurrency: int, duration: float, max_requests: int,
                warmup: float, timeout: float, max_tokens: int) -> dict[str, Any]:
    import httpx

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    done: list[dict[str, Any]] = []
    errors: dict[str, int] = {}
    state = {"next": 0, "sent": 0, "recording": False}

    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]

        async def worker(deadline: float) -> None:
            while time.perf_counter() < deadline and (not state["recording"] or state["sent"] < max_requests):
                recording = state["recording"]
                if recording:
                    state["sent"] += 1
                prompt = prompts[state["next"] % len(prompts)]
                state["next"] += 1
                try:
                    res = await _one(client, model, prompt, max_tokens)
                except httpx.HTTPError as exc:
                    res = {"ok": False, "why": type(exc).__name__}
                if recording:
                    if res["ok"]:
                        done.append(res)
                    else:
                        errors[res["why"]] = errors.get(res["why"], 0) + 1

        if warmup > 0:
            end = time.perf_counter() + warmup
            await asyncio.gather(*(worker(end) for _ in range(concurrency)))
        state["recording"], state["next"] = True, 0  # the recorded requests start at the first prompt
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(t0 + duration) for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
    ttft = sorted(r["ttft_ms"] for r in done)
    lat = sorted(r["latency_ms"] for r in done)
    tokens = sum(r["tokens"] for r in done)
    return {
        "concurrency": concurrency,
        "model": model,
        "max_tokens": max_tokens,
        "requests": len(done),
        "errors": errors,
        "seconds": elapsed,
        "rps": len(done) / elapsed if elapsed > 0 else 0.0,
        "completion_tokens": tokens,
        "tokens_per_request": tokens / len(done) if done else float("nan"),
        "output_tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0,
        "finished_by_length": sum(r["finish"] == "length" for r in done),
        "no_text": sum(not r["text_seen"] for r in done),
        "ttft_p50_ms": percentile(ttft, 50),
        "ttft_p90_ms": percentile(ttft, 90),
        "ttft_p99_ms": percentile(ttft, 99),
        "p50_ms": percentile(lat, 50),
        "p99_ms": percentile(lat, 99),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.genload")
    p.add_argument("url")
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--max-requests", type=int, default=2000)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--prompts", type=Path, required=True, help="JSON lines, one prompt string each")
    a = p.parse_args(argv)
    prompts = [json.loads(line) for line in a.prompts.read_text(encoding="utf-8").splitlines() if line.strip()]
    out = asyncio.run(drive(a.url.rstrip("/"), prompts, a.concurrency, a.duration, a.max_requests, a.warmup,
                            a.timeout, a.max_tokens))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
