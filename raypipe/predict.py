"""Offline prediction from a checkpoint dir: no Ray, no HTTP, no registry.

Serving, evaluation, batch scoring and the MLflow pyfunc all call this same :class:`Predictor`,
so every path gives the same answers. What an answer looks like is the task's
(:mod:`raypipe.tasks`): ``{"label", "score", "probabilities"}`` for a classifier,
``{"labels", "scores"}`` for multi-label, ``{"value"}`` for regression. A ``models:/`` URI is
resolved to a local dir first, by :func:`raypipe.registry.load_predictor`.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from raypipe import tasks
from raypipe.errors import DataError


class Predictor:
    """Answers for one model. ``adapter`` names the LoRA adapter to activate on ``model`` when
    several adapters share it (multiplexed serving): every forward pass then holds ``lock``,
    so switching adapters never happens under another thread's forward pass."""

    def __init__(self, model: Any, tokenizer: Any, meta: dict[str, Any], device: str = "cpu", *,
                 adapter: str | None = None, lock: Any = None):
        self.adapter = adapter
        self.lock = lock
        self.model = model
        self.tokenizer = tokenizer
        self.meta = meta
        self.device = device
        task, schema = tasks.schema_of(meta)
        self.task = tasks.get(task)
        self.schema: dict[str, Any] = schema
        self.labels: list[str] = list(schema.get("labels") or [])
        self.max_length: int = int(meta.get("max_length", 512))

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str], device: str = "auto") -> Predictor:
        from raypipe.model import load_checkpoint, pick_device

        dev = pick_device(device)
        model, tokenizer, meta = load_checkpoint(path, device=dev)
        meta = {**meta, "path": str(Path(path).resolve())}
        return cls(model, tokenizer, meta, device=dev)

    @property
    def inputs(self) -> str:
        """What the model takes: ``text``, ``pair`` (two texts) or ``tokens`` (texts or word lists)."""
        return str(self.schema.get("inputs") or "text")

    @property
    def pair(self) -> bool:
        """Whether the model compares two texts (inputs are ``(a, b)`` pairs)."""
        return self.schema.get("inputs") == "pair"

    def check_inputs(self, inputs: Sequence[Any]) -> list[Any]:
        """The inputs as the model takes them, or a DataError saying what is wrong."""
        return self.task.check_inputs(inputs, self.schema)

    def check_texts(self, texts: Sequence[Any]) -> list[Any]:  # the name callers used before pairs
        return self.check_inputs(texts)

    def predict(self, inputs: Sequence[Any], top_k: int | None = None, batch_size: int = 64,
                **options: Any) -> list[dict[str, Any]]:
        """One answer per input (a text, or an ``(a, b)`` pair for a pair model; a prompt or a list
        of chat messages for an sft model, whose ``options`` may set ``max_new_tokens``)."""
        items = self.check_inputs(inputs)
        if top_k is not None:
            options["top_k"] = top_k
        with self._active():
            return self.task.predict(self.model, self.tokenizer, items, self.schema,
                                     max_length=self.max_length, batch_size=batch_size, **options)

    @contextlib.contextmanager
    def _active(self) -> Iterator[None]:
        if self.adapter is None:
            yield
            return
        with self.lock:
            self.model.set_adapter(self.adapter)
            yield

    def predict_proba(self, inputs: Sequence[Any], batch_size: int = 64) -> Any:
        """Class probabilities, shape (len(inputs), num_labels), float32 — for the tasks that
        have them (softmax for classification, one sigmoid per label for multi-label)."""
        probabilities = getattr(self.task, "probabilities", None)
        if probabilities is None:
            raise DataError(f"a {self.task.name} model has no class probabilities; use predict()")
        from raypipe.tasks._text import forward_logits

        items = self.check_inputs(inputs)
        with self._active():
            return probabilities(forward_logits(self.model, self.tokenizer, items, self.schema,
                                                max_length=self.max_length, batch_size=batch_size))

    def warmup_inputs(self) -> list[Any]:
        """A short and a maximal input: the first forward pass pays for lazy initialisation, and a
        model that cannot take its longest input should fail at load time, not under traffic."""
        short, long = "warm-up", "warm-up " * self.max_length
        return [(short, short), (long, long)] if self.pair else [short, long]


def check_finite(predictions: Any) -> None:
    """Raise when an answer holds NaN or inf anywhere (a broken model, e.g. after a bad swap)."""

    def walk(v: Any) -> None:
        if isinstance(v, float) and not math.isfinite(v):
            raise RuntimeError("the model returned NaN or inf")
        if isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, (list, tuple)):
            for x in v:
                walk(x)

    walk(predictions)
