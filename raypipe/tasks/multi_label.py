"""Multi-label classification: any number of labels per text (or pair), including none.

Targets are a list column (JSON, JSONL, Parquet, ``datasets``) or a delimited string
(``data.label_separator``, e.g. ``"joy,surprise"``); an empty list or empty string is a valid
example with no label. Integer ids can be named with ``data.label_names`` (e.g. GoEmotions'
``emotions.txt``). The head is one sigmoid per label trained with binary cross-entropy
(``problem_type="multi_label_classification"``); each output's bias starts at the logit of the
label's training frequency (``schema.priors``), not at 0.5 for every label.

Decision thresholds: every epoch, each label's threshold is chosen on the validation split to
maximise that label's F1 (a grid of 0.05 .. 0.95; 0.5 for a label with no positive example
there); the validation metrics are reported at those thresholds and the checkpoint stores them,
so held-out evaluation and serving use exactly what validation chose — the test split never
tunes anything. Metrics: micro-F1, macro-F1 (over labels present in the split), subset accuracy
(every label right), and per-label precision/recall/F1. Splits are stratified by each example's
rarest label, so rare labels reach validation and test.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel, Field

from raypipe.errors import DataError
from raypipe.tasks import Scores, _text

THRESHOLD_GRID = tuple(round(0.05 * i, 2) for i in range(1, 20))
NO_LABEL = "(none)"


class MultiLabelPrediction(BaseModel):
    labels: list[str] = Field(description="Labels whose score reaches their decision threshold.")
    scores: dict[str, float] = Field(description="Label -> probability, most likely first.")


def _f1(tp: Any, fp: Any, fn: Any) -> Any:
    import numpy as np

    denom = 2 * tp + fp + fn
    return np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)


def fit_thresholds(probs: Any, truth: Any) -> Any:
    """Per label, the grid threshold with the best F1 on these rows (ties: nearest to 0.5)."""
    import numpy as np

    grid = np.asarray(THRESHOLD_GRID)
    pred = probs[:, :, None] >= grid[None, None, :]  # rows x labels x thresholds
    t = truth[:, :, None].astype(bool)
    tp = (pred & t).sum(0)
    fp = (pred & ~t).sum(0)
    fn = (~pred & t).sum(0)
    f1 = _f1(tp, fp, fn)  # labels x thresholds
    closeness = -np.abs(grid - 0.5)[None, :] * 1e-6  # tie-break without changing a real maximum
    best = grid[np.argmax(f1 + closeness, axis=1)]
    return np.where(truth.sum(0) > 0, best, 0.5)


def scores_at(probs: Any, truth: Any, thresholds: Any, labels: list[str]) -> tuple[dict[str, float], dict[str, Any]]:
    import numpy as np

    pred = probs >= thresholds[None, :]
    t = truth.astype(bool)
    tp, fp, fn = (pred & t).sum(0), (pred & ~t).sum(0), (~pred & t).sum(0)
    support = t.sum(0)
    f1 = _f1(tp, fp, fn)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1), 0.0)
        recall = np.where(support > 0, tp / np.maximum(support, 1), 0.0)
    present = support > 0
    micro = float(_f1(tp.sum(), fp.sum(), fn.sum())) if len(probs) else 0.0
    metrics = {
        "micro_f1": micro,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "subset_accuracy": float((pred == t).all(axis=1).mean()) if len(probs) else 0.0,
    }
    per_label = {
        label: {"precision": float(precision[j]), "recall": float(recall[j]), "f1": float(f1[j]),
                "support": int(support[j]), "threshold": float(thresholds[j])}
        for j, label in enumerate(labels)
    }
    return metrics, per_label


class ThresholdAccumulator:
    def __init__(self, labels: list[str], thresholds: list[float] | None, fit: bool):
        self.labels, self.fit = labels, fit
        self.thresholds = thresholds
        self.probs: list[Any] = []
        self.truth: list[Any] = []

    def update(self, logits: Any, rows: Mapping[str, Any]) -> None:
        self.probs.append(logits.float().sigmoid().cpu().numpy())
        self.truth.append(rows["labels"])

    def compute(self, loss: float, gather: Any) -> Scores:
        import numpy as np

        k = len(self.labels)
        probs = gather(np.concatenate(self.probs) if self.probs else np.zeros((0, k), np.float32))
        truth = gather(np.concatenate(self.truth) if self.truth else np.zeros((0, k), np.float32))
        if self.fit:
            thresholds = fit_thresholds(probs, truth)
        else:
            thresholds = np.asarray(self.thresholds or [0.5] * k, dtype=np.float64)
        metrics, per_label = scores_at(probs, truth, thresholds, self.labels)
        return Scores(
            metrics={"loss": loss, **metrics},
            details={"per_label": per_label, "labels": self.labels},
            schema_update={"thresholds": [float(t) for t in thresholds]} if self.fit else {},
        )


class MultiLabelTask:
    name = "multi_label"
    metrics = {"loss": "min", "micro_f1": "max", "macro_f1": "max", "subset_accuracy": "max"}
    default_metric = "micro_f1"
    model_class = "AutoModelForSequenceClassification"
    schema_keys = ("labels", "thresholds")
    input_keys = _text.INPUT_KEYS
    sequence_keys = _text.SEQUENCE_KEYS
    prediction_model = MultiLabelPrediction

    # --- data ---------------------------------------------------------------------------

    def _label_set(self, v: Any, cfg: Any, names: tuple[str, ...] | None) -> tuple[str, ...] | str:
        """The labels of one row, or a string saying what is wrong with it."""
        sep = cfg.label_separator
        if isinstance(v, str):
            if sep is None:
                return (f"label {v!r} is a string; a multi-label target is a list, or set "
                        "data.label_separator (e.g. ',') to split strings")
            items: list[Any] = [p for p in (s.strip() for s in v.split(sep)) if p]
        elif v is None:
            items = []
        elif hasattr(v, "tolist") and not isinstance(v, (int, float)):  # numpy arrays from Parquet
            items = list(v.tolist())
        elif isinstance(v, (list, tuple)):
            items = list(v)
        else:
            return f"label {v!r} is not a list of labels (got {type(v).__name__})"
        out = []
        for item in items:
            if not _text.is_label(item):
                return f"label list holds {item!r}, which is not a label (a string or an integer)"
            named = _text.name_label(item, names)
            if named is None:
                return f"label {item!r} is not an index into data.label_names ({len(names or ())} names)"
            out.append(named)
        return tuple(sorted(set(out)))

    def examples(self, raw: Any, where: str, cfg: Any) -> Any:
        import pandas as pd

        _text.missing_columns(raw, where, [*_text.needed_columns(cfg), cfg.label_column])
        inputs = _text.text_inputs(raw, where, cfg)
        names = _text.label_names(cfg)
        sets = [self._label_set(v, cfg, names) for v in raw[cfg.label_column]]
        bad = [i for i, s in enumerate(sets) if isinstance(s, str)]
        if bad:
            raise DataError.at(where, bad, f"column '{cfg.label_column}': {sets[bad[0]]}")
        return pd.DataFrame({**{k: v.to_numpy() for k, v in inputs.items()}, _text.LABEL: sets})

    def schema(self, train: Any, cfg: Any) -> dict[str, Any]:
        seen = {label for labels in train[_text.LABEL] for label in labels}
        labels = _text.ordered_labels(seen, _text.label_names(cfg))
        if not labels:
            raise DataError(f"{cfg.path}: no training example has a label; a multi-label model needs at least one")
        counts = {label: 0 for label in labels}
        for row in train[_text.LABEL]:
            for label in row:
                counts[label] += 1
        priors = [round(counts[label] / max(len(train), 1), 6) for label in labels]
        return {"labels": labels, "thresholds": [0.5] * len(labels), "priors": priors, **_text.input_schema(train)}

    def check(self, frame: Any, schema: Mapping[str, Any], role: str, where: str) -> None:
        _text.unseen_error(list(frame[_text.LABEL]), set(schema["labels"]), role, where, list(schema["labels"]))

    def stratify_key(self, frame: Any) -> Any:
        from collections import Counter

        counts = Counter(label for labels in frame[_text.LABEL] for label in labels)
        return frame[_text.LABEL].map(lambda ls: min(ls, key=lambda x: (counts[x], x)) if ls else NO_LABEL)

    def encode(self, tokenizer: Any, frame: Any, schema: Mapping[str, Any], max_length: int) -> dict[str, Any]:
        import numpy as np

        index = {label: i for i, label in enumerate(schema["labels"])}
        rows = _text.encode_inputs(tokenizer, frame, schema, max_length)
        hot = np.zeros((len(frame), len(index)), dtype=np.float32)
        for r, labels in enumerate(frame[_text.LABEL]):
            hot[r, [index[label] for label in labels]] = 1.0
        rows["labels"] = hot
        return rows

    # --- model and metrics --------------------------------------------------------------

    def model_kwargs(self, schema: Mapping[str, Any]) -> dict[str, Any]:
        return _text.label_head(schema, "multi_label_classification")

    def init_head(self, model: Any, schema: Mapping[str, Any]) -> None:
        """Start each label's output at its training frequency (bias = logit(prior), as in the
        focal-loss paper): a fresh head at bias 0 says 0.5 for all 28 GoEmotions labels, and the
        first hundreds of steps only push every output down, which a CPU-sized run cannot spare."""
        import math

        import torch

        priors = schema.get("priors")
        if not priors:
            return
        heads = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features == len(priors)]
        if not heads or heads[-1].bias is None:
            return
        p = [min(max(float(x), 1e-4), 0.5) for x in priors]  # no label starts above even odds
        with torch.no_grad():
            heads[-1].bias.copy_(torch.tensor([math.log(x / (1.0 - x)) for x in p]))

    def accumulator(self, schema: Mapping[str, Any], *, fit: bool) -> ThresholdAccumulator:
        return ThresholdAccumulator(list(schema["labels"]), schema.get("thresholds"), fit)

    # --- prediction ---------------------------------------------------------------------

    def inputs_of(self, frame: Any) -> list[Any]:
        return _text.inputs_of(frame)

    def check_inputs(self, inputs: Sequence[Any], schema: Mapping[str, Any]) -> list[Any]:
        return _text.check_inputs(inputs, schema)

    def probabilities(self, logits: Any) -> Any:
        import numpy as np

        return (1.0 / (1.0 + np.exp(-logits))).astype(np.float32)

    def predict(self, model: Any, tokenizer: Any, inputs: Sequence[Any], schema: Mapping[str, Any], *,
                max_length: int, batch_size: int, top_k: int | None = None, **_: Any) -> list[dict[str, Any]]:
        logits = _text.forward_logits(model, tokenizer, inputs, schema, max_length=max_length, batch_size=batch_size)
        labels = list(schema["labels"])
        thresholds = schema.get("thresholds") or [0.5] * len(labels)
        out = []
        for row in self.probabilities(logits):
            ranked = sorted(range(len(labels)), key=lambda j: -float(row[j]))
            chosen = [labels[j] for j in ranked if row[j] >= thresholds[j]]
            shown = ranked[:top_k] if top_k is not None else ranked
            out.append({"labels": chosen, "scores": {labels[j]: float(row[j]) for j in shown}})
        return out

    # --- people -------------------------------------------------------------------------

    def report(self, scores: Scores, schema: Mapping[str, Any]) -> list[str]:
        per_label = scores.details["per_label"]
        labels = list(schema["labels"])
        width = max(5, *(len(label) for label in labels))
        lines = [f"  {'label':<{width}}  threshold  precision  recall  f1      support"]
        for label in labels:
            p = per_label[label]
            lines.append(f"  {label:<{width}}  {p['threshold']:<9.2f}  {p['precision']:<9.4f}  "
                         f"{p['recall']:<6.4f}  {p['f1']:<6.4f}  {p['support']:>7d}")
        return lines

    def figures(self, scores: Scores, schema: Mapping[str, Any], title: str) -> dict[str, Any]:
        from raypipe.plots import per_label_bars

        return {"per_label_f1.png": per_label_bars(scores.details["per_label"], title=f"Per-label F1: {title}")}

    def describe(self, prediction: Mapping[str, Any], schema: Mapping[str, Any]) -> str:
        return ",".join(prediction["labels"]) or NO_LABEL

    def judge(self, target: Any, prediction: Mapping[str, Any], schema: Mapping[str, Any]) -> tuple[str, bool]:
        return ",".join(target) or NO_LABEL, set(prediction["labels"]) == set(target)
