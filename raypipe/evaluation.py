"""Held-out evaluation of a checkpoint dir or ``models:/`` URI, for any task.

The model is the one serving loads (:class:`~raypipe.predict.Predictor`), the examples are
encoded by the model's task exactly as in training, and the metrics come from the task's
accumulator through :func:`raypipe.batches.evaluate_rows` — the code the training loop reports
its ``val_*`` metrics with. So ``test_macro_f1`` here means what ``val_macro_f1`` means there,
and what the promotion gate compares. Values fitted on validation (multi-label thresholds) are
the checkpoint's and are never re-fitted on test data.

The module is named ``evaluation`` (not ``evaluate``) so that importing it never shadows
``raypipe.evaluate``, the function.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raypipe import tasks
from raypipe.errors import DataError

_PROGRESS_ABOVE = 2000  # examples; smaller sets finish in seconds and need no progress lines


@dataclass
class EvalResult:
    """Metrics of one model on one data set."""

    metrics: dict[str, float]  # test_<metric>
    details: dict[str, Any]
    task: str
    schema: dict[str, Any]
    num_examples: int
    model_uri: str
    data: str
    fingerprint: str | None = None
    run_id: str | None = None
    model_meta: dict[str, Any] = field(default_factory=dict)
    examples: Any = field(default=None, repr=False, compare=False)  # the frame (an MLflow dataset input)

    # classifier views (the fields this result had before tasks existed)
    @property
    def labels(self) -> list[str]:
        return list(self.schema.get("labels") or [])

    @property
    def confusion(self) -> list[list[int]]:
        return self.details.get("confusion", [])

    @property
    def per_class(self) -> dict[str, dict[str, float]]:
        return self.details.get("per_class") or self.details.get("per_label") or {}

    @property
    def model_title(self) -> str:
        """The model as people name it: registered name and version, or the checkpoint's dir name."""
        meta = self.model_meta
        if meta.get("model_name"):
            return f"{meta['model_name']} v{meta.get('model_version')}"
        return Path(str(meta.get("path") or self.model_uri).rstrip("/")).name

    def scores(self) -> tasks.Scores:
        return tasks.Scores(metrics={tasks.strip_split(k): v for k, v in self.metrics.items()}, details=self.details)

    def summary(self) -> str:
        version = self.model_meta.get("model_version")
        what = self.model_uri + (f" (version {version})" if version and "@" in self.model_uri else "")
        fp = f", data fingerprint {self.fingerprint[:12]}" if self.fingerprint else ""
        shown = "   ".join(f"{tasks.strip_split(k)} {v:.4f}" for k, v in self.metrics.items())
        lines = [
            f"Evaluation of {what} ({self.task})",
            f"  on {self.data}: {self.num_examples} examples{fp}",
            f"  {shown}",
            "",
            *tasks.get(self.task).report(self.scores(), self.schema),
        ]
        if self.run_id:
            lines += ["", f"  MLflow run: {self.run_id}"]
        return "\n".join(lines)

    def figures(self) -> dict[str, Any]:
        """The task's figures (confusion matrix, per-label F1, predicted vs true), titled with
        the model's name and version."""
        return tasks.get(self.task).figures(self.scores(), self.schema, self.model_title)

    def plot(self) -> Any:
        """The task's main figure (for notebooks; the MLflow run already holds the PNGs)."""
        return next(iter(self.figures().values()))

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_uri": self.model_uri,
            "data": self.data,
            "task": self.task,
            "fingerprint": self.fingerprint,
            "num_examples": self.num_examples,
            "metrics": self.metrics,
            "schema": self.schema,
            **self.details,
            "model": {k: self.model_meta.get(k) for k in ("model_name", "model_version", "run_id")},
        }


def _load_data(cfg: Any, data_path: Any, task: str, splits: Any) -> tuple[Any, str, str | None]:
    """(examples, a description for people, fingerprint)."""
    from raypipe import data

    if data_path is not None:
        frame = data.read(os.fspath(data_path), cfg.data, role="evaluation", task=task)
        return frame, str(data_path), data.fingerprint({"evaluation": frame}, cfg.data, task)
    if splits is None:
        if not cfg.data.path:
            raise DataError(
                "nothing to evaluate on: pass a labelled file (--data / data_path=) or a config whose "
                "data.path is set (its test split is used)"
            )
        splits = data.load_splits(cfg.data, task)
    if len(splits.test) == 0:
        raise DataError(
            "the config's test split is empty: set data.test_fraction > 0 or data.test_path, "
            "or pass a labelled file with --data"
        )
    where = cfg.data.test_path or f"test split of {cfg.data.path}"
    return splits.test, where, splits.fingerprint


def _progress_printer(total: int, chunk: int, show: bool) -> Any:
    if not show:
        return None
    chunks = math.ceil(total / chunk)
    every = max(1, chunks // 10)
    start = time.monotonic()
    state = {"next": 1}

    def report(done: int) -> None:
        k = state["next"]
        if done >= min(total, k * chunk):
            state["next"] = k + 1
            if k % every == 0 or done == total:
                rate = done / max(time.monotonic() - start, 1e-9)
                print(f"evaluate: {done}/{total} examples ({100 * done // total}%), {rate:.0f} examples/s",
                      file=sys.stderr, flush=True)

    return report


def run(
    model: str | os.PathLike[str],
    cfg: Any = None,
    data_path: str | os.PathLike[str] | None = None,
    log_to_mlflow: bool = True,
    tracking_uri: str | None = None,
    *,
    batch_size: int | None = None,
    progress: bool | None = None,
    splits: Any = None,
) -> EvalResult:
    """Evaluate ``model`` (checkpoint dir or ``models:/`` URI) on ``data_path``, on ``splits.test``
    (the pipeline hands its splits forward) or on the config's test split; log an "evaluate"
    MLflow run with the metrics, the task's figures and a JSON report unless ``log_to_mlflow`` is
    False.

    ``tracking_uri`` (default: the config's) is both where ``models:/`` URIs are looked up and
    where the run is logged. ``progress`` defaults to on for more than 2,000 examples.
    """
    import torch

    from raypipe.batches import evaluate_rows
    from raypipe.config import RaypipeConfig
    from raypipe.registry import load_predictor

    cfg = cfg if cfg is not None else RaypipeConfig()
    if tracking_uri and tracking_uri != cfg.resolved_tracking_uri:
        cfg = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"tracking_uri": tracking_uri})})
    model_uri = os.fspath(model)
    predictor = load_predictor(model_uri, tracking_uri=cfg.resolved_tracking_uri)
    task = predictor.task
    frame, where, fingerprint = _load_data(cfg, data_path, task.name, splits)
    task.check(frame, predictor.schema, "evaluation", where)
    has_pair = "text_pair" in frame.columns
    if predictor.pair != has_pair:
        raise DataError(
            f"{where}: the model {'compares text pairs' if predictor.pair else 'takes single texts'} but the data "
            f"{'has' if has_pair else 'has no'} second text column; "
            + ("set data.text_pair_column" if predictor.pair else "unset data.text_pair_column")
        )

    rows = task.encode(predictor.tokenizer, frame, predictor.schema, predictor.max_length)
    size = batch_size or cfg.train.eval_batch_size
    n = len(rows["length"])
    show = progress if progress is not None else n > _PROGRESS_ABOVE
    scores = evaluate_rows(
        predictor.model, task, predictor.schema, rows,
        batch_size=size, device=torch.device(predictor.device), fit=False,
        progress=_progress_printer(n, size * 8, show),
    )
    held_out = getattr(task, "held_out", None)  # optional: a task's extra held-out scores (sft: generations)
    if held_out is not None:
        scores = held_out(predictor, frame, scores)
    result = EvalResult(
        metrics={f"test_{k}": float(v) for k, v in scores.metrics.items()},
        details=scores.details,
        task=task.name,
        schema=predictor.schema,
        num_examples=len(frame),
        model_uri=model_uri,
        data=where,
        fingerprint=fingerprint,
        model_meta=dict(predictor.meta),
        examples=frame,
    )
    if log_to_mlflow:
        from raypipe.tracking import log_evaluation

        result.run_id = log_evaluation(cfg, result)
    return result
