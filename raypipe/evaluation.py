"""Held-out evaluation of a checkpoint dir or ``models:/`` URI.

The numbers come from :mod:`raypipe.metrics` (the same code training and tuning report with) and
the predictions from :class:`~raypipe.predict.Predictor` (the same code serving uses), so a
``test_macro_f1`` here is directly comparable to what the promotion gate and the server see.
Keys are ``test_accuracy``, ``test_macro_f1`` and ``test_loss``: the registry's promotion gate
reads the first two.

The module is named ``evaluation`` (not ``evaluate``) so that importing it never shadows
``raypipe.evaluate``, the function.
"""

from __future__ import annotations

import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from raypipe.errors import DataError

_PROGRESS_ABOVE = 2000  # texts; smaller sets finish in seconds and need no progress lines


@dataclass
class EvalResult:
    """Metrics of one model on one labelled data set."""

    metrics: dict[str, float]
    confusion: list[list[int]]
    labels: list[str]
    per_class: dict[str, dict[str, float]]
    num_examples: int
    model_uri: str
    data: str
    fingerprint: str | None = None
    run_id: str | None = None
    model_meta: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        version = self.model_meta.get("model_version")
        what = self.model_uri + (f" (version {version})" if version and "@" in self.model_uri else "")
        fp = f", data fingerprint {self.fingerprint[:12]}" if self.fingerprint else ""
        m = self.metrics
        lines = [
            f"Evaluation of {what}",
            f"  on {self.data}: {self.num_examples} examples{fp}",
            f"  accuracy {m['test_accuracy']:.4f}   macro-F1 {m['test_macro_f1']:.4f}   loss {m['test_loss']:.4f}",
            "",
        ]
        width = max(5, *(len(label) for label in self.labels))
        lines.append(f"  {'class':<{width}}  precision  recall  f1      support")
        for label in self.labels:
            pc = self.per_class[label]
            lines.append(
                f"  {label:<{width}}  {pc['precision']:<9.4f}  {pc['recall']:<6.4f}  {pc['f1']:<6.4f}  {pc['support']:>7d}"
            )
        lines += ["", "  confusion matrix (rows: true, columns: predicted)"]
        cell = max(len(str(max((max(r) for r in self.confusion), default=0))), *(len(label) for label in self.labels))
        lines.append(f"  {'':<{width}}  " + " ".join(f"{label:>{cell}}" for label in self.labels))
        for label, row in zip(self.labels, self.confusion):
            lines.append(f"  {label:<{width}}  " + " ".join(f"{n:>{cell}d}" for n in row))
        if self.run_id:
            lines += ["", f"  MLflow run: {self.run_id}"]
        return "\n".join(lines)

    def plot(self) -> Any:
        """The confusion-matrix figure (for notebooks; the MLflow run already holds the PNG)."""
        from raypipe.plots import confusion_matrix

        return confusion_matrix(self.confusion, self.labels, title=f"Confusion matrix: {self.model_uri}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_uri": self.model_uri,
            "data": self.data,
            "fingerprint": self.fingerprint,
            "num_examples": self.num_examples,
            "metrics": self.metrics,
            "labels": self.labels,
            "per_class": self.per_class,
            "confusion": self.confusion,
            "model": {k: self.model_meta.get(k) for k in ("model_name", "model_version", "run_id")},
        }


def _load_data(cfg: Any, data_path: str | os.PathLike[str] | None) -> tuple[Any, str, str]:
    """(DataFrame of text/label, a description for people, fingerprint)."""
    from raypipe import data

    if data_path is not None:
        frame = data.read(os.fspath(data_path), cfg.data, role="evaluation")
        return frame, str(data_path), data.fingerprint({"evaluation": frame}, cfg.data)
    if not cfg.data.path:
        raise DataError(
            "nothing to evaluate on: pass a labelled file (--data / data_path=) or a config whose "
            "data.path is set (its test split is used)"
        )
    splits = data.load_splits(cfg.data)
    if len(splits.test) == 0:
        raise DataError(
            "the config's test split is empty: set data.test_fraction > 0 or data.test_path, "
            "or pass a labelled file with --data"
        )
    where = cfg.data.test_path or f"test split of {cfg.data.path}"
    return splits.test, where, splits.fingerprint


def _predict(predictor: Any, texts: list[str], batch_size: int, progress: bool) -> Any:
    """Probabilities for every text, in the input order.

    Texts are sorted by length across the whole set (not only within a batch) so each batch pads
    to similar lengths; chunks of a few batches give progress lines on large sets.
    """
    import numpy as np

    n = len(texts)
    order = sorted(range(n), key=lambda i: len(texts[i]))
    probs = np.empty((n, len(predictor.labels)), dtype=np.float32)
    chunk = batch_size * 8
    chunks = math.ceil(n / chunk)
    every = max(1, chunks // 10)
    start_time = time.monotonic()
    for k, start in enumerate(range(0, n, chunk)):
        idx = order[start : start + chunk]
        probs[idx] = predictor.predict_proba([texts[i] for i in idx], batch_size=batch_size)
        if progress and ((k + 1) % every == 0 or k + 1 == chunks):
            done = min(n, start + chunk)
            rate = done / max(time.monotonic() - start_time, 1e-9)
            print(f"evaluate: {done}/{n} texts ({100 * done // n}%), {rate:.0f} texts/s", file=sys.stderr, flush=True)
    return probs


def run(
    model: str | os.PathLike[str],
    cfg: Any = None,
    data_path: str | os.PathLike[str] | None = None,
    log_to_mlflow: bool = True,
    tracking_uri: str | None = None,
    *,
    batch_size: int | None = None,
    progress: bool | None = None,
) -> EvalResult:
    """Evaluate ``model`` (checkpoint dir or ``models:/`` URI) on ``data_path`` or the config's
    test split; log an "evaluate" MLflow run with the metrics, confusion-matrix PNG and a
    per-class JSON unless ``log_to_mlflow`` is False.

    ``tracking_uri`` (default: the config's) is both where ``models:/`` URIs are looked up and
    where the run is logged. ``progress`` defaults to on for more than 2,000 texts.
    """
    import numpy as np

    from raypipe import metrics as M
    from raypipe.config import RaypipeConfig
    from raypipe.predict import Predictor

    cfg = cfg if cfg is not None else RaypipeConfig()
    if tracking_uri and tracking_uri != cfg.resolved_tracking_uri:
        cfg = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"tracking_uri": tracking_uri})})
    model_uri = os.fspath(model)
    predictor = Predictor.from_uri(model_uri, tracking_uri=cfg.resolved_tracking_uri)
    frame, where, fingerprint = _load_data(cfg, data_path)

    labels = list(predictor.labels)
    unknown = sorted(set(frame["label"]) - set(labels))
    if unknown:
        raise DataError(
            f"{where}: label(s) {unknown} are not known to the model, which predicts {labels}. "
            "Evaluate on data labelled with the model's classes (check data.label_column)."
        )
    texts = [str(t) for t in frame["text"]]
    show = progress if progress is not None else len(texts) > _PROGRESS_ABOVE
    probs = _predict(predictor, texts, batch_size or cfg.train.eval_batch_size, show)

    index = {label: i for i, label in enumerate(labels)}
    y_true = np.asarray([index[label] for label in frame["label"]], dtype=np.int64)
    y_pred = probs.argmax(axis=1)
    cm = M.confusion(y_true, y_pred, len(labels))
    scores = M.from_confusion(cm, labels)
    p_true = np.clip(probs[np.arange(len(y_true)), y_true], 1e-12, 1.0)
    result = EvalResult(
        metrics={
            "test_accuracy": scores["accuracy"],
            "test_macro_f1": scores["macro_f1"],
            "test_loss": float(-np.log(p_true).mean()),
        },
        confusion=cm.tolist(),
        labels=labels,
        per_class=scores["per_class"],
        num_examples=len(texts),
        model_uri=model_uri,
        data=where,
        fingerprint=fingerprint,
        model_meta=dict(predictor.meta),
    )
    if log_to_mlflow:
        result.run_id = _log(result, cfg)
    return result


def _metric_key(text: str) -> str:
    """MLflow metric names allow letters, digits, ``_ - . / space``; labels may hold anything."""
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", text)


def _log(result: EvalResult, cfg: Any) -> str:
    """One "evaluate" run through an explicit client (no fluent active run), so evaluation can
    be called from inside a pipeline's own MLflow run without nesting surprises."""
    from mlflow.entities import Metric, Param

    from raypipe.tracking import configure, redact_uri, safe_params, version_tags

    client, experiment_id = configure(cfg)
    tags = {**version_tags(cfg, result.fingerprint), "raypipe.stage": "evaluate"}
    run = client.create_run(experiment_id, run_name=f"{cfg.name}-evaluate", tags=tags)
    run_id = run.info.run_id
    try:
        meta = result.model_meta
        params = {
            "model_uri": redact_uri(result.model_uri),
            "model_path": meta.get("path"),
            "model_name": meta.get("model_name"),
            "model_version": meta.get("model_version"),
            "model_run_id": meta.get("run_id"),
            "data": result.data,
            "data.fingerprint": result.fingerprint,
            "num_examples": result.num_examples,
            "labels": ",".join(result.labels),
        }
        now = int(time.time() * 1000)
        metrics = dict(result.metrics)
        for label, pc in result.per_class.items():
            for key in ("precision", "recall", "f1"):
                metrics[_metric_key(f"test_{key}.{label}")] = pc[key]
        client.log_batch(
            run_id,
            metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
            params=[Param(k, v) for k, v in safe_params({k: v for k, v in params.items() if v is not None}).items()],
        )
        fig = result.plot()
        try:
            client.log_figure(run_id, fig, "evaluation/confusion_matrix.png")
        finally:
            import matplotlib.pyplot as plt

            plt.close(fig)
        client.log_dict(run_id, result.to_dict(), "evaluation/per_class.json")
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return run_id
