"""Text generation for served causal LMs: batched, streamed, each request stopping on its own.

Two layers:

* :func:`generate_batch` — the loop, synchronous and runnable without a server: the prompts are
  left-padded into one batch and decoded together with a KV cache (transformers' ``cache``), one
  forward pass per new token for the whole batch. Each request has its own sampling settings
  (temperature, top_p, a ``torch.Generator`` seeded by its ``seed``), its own stop strings and
  ``max_tokens``, and stops alone: a finished row is fed padding until the last one is done.
  Text comes out as deltas through a callback as soon as it is safe to show (no half of a
  multi-byte character, nothing that may turn out to be the start of a stop string).
* :class:`GenerationEngine` — the async side for a server: requests arrive on the event loop,
  a batcher collects what waits (up to ``max_batch_size``, ``batch_wait_timeout_s`` to fill),
  runs :func:`generate_batch` on an executor thread, and hands each request an async iterator of
  :class:`Delta`. Requests for different models (LoRA adapters) go into different batches.

Left padding with explicit ``position_ids`` makes a row's logits the same as when it runs alone
(up to float rounding), so batching does not change greedy answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

from raypipe.batching import BatchWait


@dataclass(frozen=True)
class SamplingParams:
    """One request's settings. ``temperature`` 0 is greedy; ``seed`` makes sampling repeatable."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass
class Delta:
    """A piece of one request's output. The last one has ``finish_reason`` ("stop" or
    "length") and the final token counts; its ``text`` may be empty."""

    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class Completion:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


def stop_token_ids(model: Any, tokenizer: Any) -> set[int]:
    """Token ids that end a generation: the tokenizer's eos and the model's generation config
    eos (chat models often end a turn with their own token, e.g. ``<|end|>``/``<|eot_id|>``)."""
    ids: set[int] = set()
    for value in (getattr(tokenizer, "eos_token_id", None),
                  getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


def _held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters of ``text`` could still become a stop string (or are half
    of a multi-byte character, which byte-level tokenizers decode as U+FFFD)."""
    hold = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:n]):
                hold = n
                break
    # An unfinished UTF-8 character is at most 3 bytes, each decoded as one U+FFFD for now; more
    # of them are bytes that are invalid for good (a model may emit those) and are shown.
    hold = max(hold, min(3, len(text) - len(text.rstrip("\ufffd"))))
    return hold


class _Row:
    """One request's decoding state inside a batch."""

    def __init__(self, params: SamplingParams, prompt_tokens: int, emit: Callable[[Delta], None],
                 device: Any, cancelled: Callable[[], bool]):
        import torch

        self.params = params
        self.prompt_tokens = prompt_tokens
        self.emit = emit
        self.cancelled = cancelled
        self.ids: list[int] = []
        self.sent = 0  # characters of the decoded text already emitted
        self.done = False
        self.generator = None
        if params.temperature > 0:
            self.generator = torch.Generator(device=device)
            if params.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(params.seed)

    def finish(self, text: str, reason: str) -> None:
        self.done = True
        self.emit(Delta(text[self.sent:], reason, self.prompt_tokens, len(self.ids)))

    def advance(self, token: int, tokenizer: Any, eos: set[int]) -> None:
        """Take the next token; emit what is safe to show; finish on eos/stop/max_tokens."""
        if self.cancelled():
            self.done = True
            return
        if token in eos:
            self.ids.append(token)  # counted, never shown
            self.finish(tokenizer.decode(self.ids[:-1], skip_special_tokens=True), "stop")
            return
        self.ids.append(token)
        text = tokenizer.decode(self.ids, skip_special_tokens=True)
        cuts = [i for s in self.params.stop if (i := text.find(s, max(0, self.sent - len(s)))) != -1]
        if cuts:
            self.finish(text[: min(cuts)], "stop")
            return
        if len(self.ids) >= self.params.max_tokens:
            self.finish(text, "length")
            return
        safe = len(text) - _held_back(text, self.params.stop)
        if safe > self.sent:
            self.emit(Delta(text[self.sent:safe]))
            self.sent = safe


def _sample(logits: Any, row: _Row) -> int:
    import torch

    p = row.params
    if p.temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / p.temperature, dim=-1)
    if p.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # keep the smallest set whose mass reaches top_p (always at least the top token)
        keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < p.top_p
        sorted_probs = sorted_probs * keep
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=row.generator))


def generate_batch(model: Any, tokenizer: Any, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams],
                   emit: Sequence[Callable[[Delta], None]] | None = None, *, device: Any = None,
                   cancelled: Sequence[Callable[[], bool]] | None = None) -> list[Completion]:
    """Generate for every prompt (token ids) in one loop; returns one :class:`Completion` each.

    ``emit[i]`` receives request i's deltas as they come (its last one carries the finish
    reason); ``cancelled[i]()`` true drops request i from the work (a client that went away).
    """
    import torch

    n = len(prompts)
    if n == 0:
        return []
    if device is None:
        device = next(model.parameters()).device
    collected: list[list[Delta]] = [[] for _ in range(n)]

    def sink(i: int) -> Callable[[Delta], None]:
        def put(delta: Delta) -> None:
            collected[i].append(delta)
            if emit is not None:
                emit[i](delta)
        return put

    never = lambda: False  # noqa: E731
    rows = [_Row(params[i], len(prompts[i]), sink(i), device, cancelled[i] if cancelled else never) for i in range(n)]
    eos = stop_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (min(eos) if eos else 0)

    width = max(len(p) for p in prompts)
    input_ids = torch.full((n, width), pad, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding: every row's last token is at the same index
        if len(p):
            input_ids[i, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
            mask[i, width - len(p):] = 1
    input_ids, mask = input_ids.to(device), mask.to(device)
    # Positions count real tokens only, so a padded row sees the positions it would see alone.
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    past = None
    steps = max(r.params.max_tokens for r in rows)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for _ in range(steps):
                out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                            cache=past, use_cache=True, logits_to_keep=1)
                past = out.cache
                logits = out.logits[:, -1, :]
                next_ids = torch.full((n,), pad, dtype=torch.long)
                for i, row in enumerate(rows):
                    if row.done:
                        continue
                    token = _sample(logits[i], row)
                    row.advance(token, tokenizer, eos)
                    next_ids[i] = token
                if all(r.done for r in rows):
                    break
                input_ids = next_ids.unsqueeze(1).to(device)
                positions = positions[:, -1:] + 1
                mask = torch.cat([mask, torch.ones((n, 1), dtype=mask.dtype, device=device)], dim=1)
    finally:
        if was_training:
            model.train()
    return [Completion("".join(d.text for d in ds), ds[-1].finish_reason or "stop" if ds else "stop",
                       rows[i].prompt_tokens, len(rows[i].ids)) for i, ds in enumerate(collected)]


# --------------------------------------------------------------------------- async engine


@dataclass
class _Pending:
    model: Any
    tokenizer: Any
    activate: Callable[[], contextlib.AbstractContextManager[Any]]
    prompt: list[int]
    params: SamplingParams
    queue: asyncio.Queue[Delta | BaseException]
    loop: asyncio.AbstractEventLoop
    cancelled: threading.Event = field(default_factory=threading.Event)


class GenerationEngine:
    """Batches concurrent generation requests of one process (a Serve replica) and streams.

    ``executor``: where the loop runs (the replica's single inference thread, shared with
    ``/predict``); ``None`` uses asyncio's default executor. ``on_batch(requests, seconds)`` is
    told about each finished batch (stats, metrics).
    """

    def __init__(self, max_batch_size: int = 8, batch_wait_timeout_s: float = 0.005,
                 executor: Executor | None = None,
                 on_batch: Callable[[int, float], None] | None = None):
        self.max_batch_size = max_batch_size
        self.batch_wait_timeout_s = batch_wait_timeout_s
        self.executor = executor
        self.on_batch = on_batch
        # A batch waits batch_wait_timeout_s for company only while requests overlap.
        self.batch_wait = BatchWait(batch_wait_timeout_s)
        self._wait_s = 0.0  # the wait the latest arrival asked for
        self._waiting: list[_Pending] = []
        self._runner: asyncio.Task[None] | None = None

    async def stream(self, model: Any, tokenizer: Any, prompt: Sequence[int], params: SamplingParams, *,
                     activate: Callable[[], contextlib.AbstractContextManager[Any]] | None = None) -> AsyncIterator[Delta]:
        """The request's deltas as they are generated (the last one has ``finish_reason``).

        ``activate()`` is entered around the whole loop of the batch (a LoRA adapter's switch);
        closing the iterator early cancels the request.
        """
        loop = asyncio.get_running_loop()
        item = _Pending(model, tokenizer, activate or contextlib.nullcontext, list(prompt), params,
                        asyncio.Queue(), loop)
        self._wait_s = self.batch_wait.arrive()
        self._waiting.append(item)
        if self._runner is None or self._runner.done() or self._runner.get_loop() is not loop:
            self._runner = loop.create_task(self._run())
        try:
            while True:
                got = await item.queue.get()
                if isinstance(got, BaseException):
                    raise got
                yield got
                if got.finish_reason is not None:
                    return
        finally:
            self.batch_wait.leave()
            item.cancelled.set()  # a client gone mid-stream frees its row

    async def complete(self, model: Any, tokenizer: Any, prompt: Sequence[int], params: SamplingParams, *,
                       activate: Callable[[], contextlib.AbstractContextManager[Any]] | None = None) -> Completion:
        parts, last = [], Delta("")
        async for delta in self.stream(model, tokenizer, prompt, params, activate=activate):
            parts.append(delta.text)
            last = delta
        return Completion("".join(parts), last.finish_reason or "stop", last.prompt_tokens, last.completion_tokens)

    async def _run(self) -> None:
        """Take what waits, one batch (of one model) at a time, until nothing waits."""
        loop = asyncio.get_running_loop()
        while self._waiting:
            if len(self._waiting) < self.max_batch_size and self._wait_s > 0:
                await asyncio.sleep(self._wait_s)
            first = self._waiting[0]
            batch = [p for p in self._waiting if p.model is first.model and p.activate == first.activate]
            batch = batch[: self.max_batch_size]
            self._waiting = [p for p in self._waiting if p not in batch]
            batch = [p for p in batch if not p.cancelled.is_set()]
            if batch:
                await loop.run_in_executor(self.executor, self._generate, batch)

    def _generate(self, batch: list[_Pending]) -> None:
        import time

        def emitter(p: _Pending) -> Callable[[Delta], None]:
            return lambda delta: p.loop.call_soon_threadsafe(p.queue.put_nowait, delta)

        start = time.perf_counter()
        try:
            with batch[0].activate():
                generate_batch(batch[0].model, batch[0].tokenizer, [p.prompt for p in batch],
                               [p.params for p in batch], [emitter(p) for p in batch],
                               cancelled=[p.cancelled.is_set for p in batch])
        except Exception as exc:  # every request of the batch gets the error, none hangs
            for p in batch:
                p.loop.call_soon_threadsafe(p.queue.put_nowait, exc)
            return
        if self.on_batch is not None:
            self.on_batch(len(batch), time.perf_counter() - start)

