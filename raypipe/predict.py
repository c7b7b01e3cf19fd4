"""Offline prediction from a checkpoint dir or a ``models:/`` URI: no Ray, no HTTP.

Serving, evaluation and the MLflow pyfunc all call this same :class:`Predictor`, so every path
gives the same labels and scores.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from raypipe.errors import DataError


class Predictor:
    def __init__(self, model: Any, tokenizer: Any, meta: dict[str, Any], device: str = "cpu"):
        self.model = model
        self.tokenizer = tokenizer
        self.meta = meta
        self.device = device
        self.labels: list[str] = list(meta["labels"])
        self.max_length: int = int(meta.get("max_length", 512))

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str], device: str = "auto") -> Predictor:
        from raypipe.model import load_checkpoint, pick_device

        dev = pick_device(device)
        model, tokenizer, meta = load_checkpoint(path, device=dev)
        meta = {**meta, "path": str(Path(path).resolve())}
        return cls(model, tokenizer, meta, device=dev)

    @classmethod
    def from_uri(cls, uri: str, device: str = "auto", tracking_uri: str | None = None) -> Predictor:
        """A checkpoint dir, or ``models:/name@alias`` / ``models:/name/3`` from the registry."""
        if uri.startswith("models:/"):
            from raypipe.registry import resolve

            resolved = resolve(uri, tracking_uri=tracking_uri)
            pred = cls.from_dir(resolved.path, device=device)
            pred.meta.update(resolved.as_meta())
            return pred
        return cls.from_dir(uri, device=device)

    @staticmethod
    def check_texts(texts: Sequence[Any]) -> list[str]:
        if isinstance(texts, str):
            raise DataError("pass a list of texts, not a single string")
        out = []
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise DataError(f"text {i} is {type(t).__name__}, expected a string")
            if not t.strip():
                raise DataError(f"text {i} is empty or whitespace only")
            out.append(t)
        if not out:
            raise DataError("no texts given")
        return out

    def predict_proba(self, texts: Sequence[str], batch_size: int = 64) -> Any:
        """Class probabilities, shape (len(texts), num_labels), as a float32 numpy array."""
        import numpy as np
        import torch

        texts = self.check_texts(texts)
        # Sort by length so each batch pads only to its own longest text.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        probs = np.empty((len(texts), len(self.labels)), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                enc = self.tokenizer(
                    [texts[i] for i in idx],
                    truncation=True,
                    max_length=self.max_length,
                    padding=True,
                    return_tensors="pt",
                ).to(self.device)
                logits = self.model(**enc).logits.float()
                probs[idx] = torch.softmax(logits, dim=-1).cpu().numpy()
        return probs

    def predict(
        self, texts: Sequence[str], top_k: int | None = None, batch_size: int = 64
    ) -> list[dict[str, Any]]:
        """For each text: label, score, and the probability of every class (or the top k)."""
        probs = self.predict_proba(texts, batch_size=batch_size)
        return [self._describe(row, top_k) for row in probs]

    def _describe(self, row: Any, top_k: int | None) -> dict[str, Any]:
        ranked = sorted(range(len(self.labels)), key=lambda j: -float(row[j]))
        if top_k is not None:
            ranked = ranked[:top_k]
        best = ranked[0]
        return {
            "label": self.labels[best],
            "score": float(row[best]),
            "probabilities": {self.labels[j]: float(row[j]) for j in ranked},
        }
