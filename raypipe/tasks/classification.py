"""Single-label classification: one class per text (or text pair); softmax + cross-entropy.

Targets are strings or integers (integers may be named through ``data.label_names``); the label
list is read from the training split, and a validation/test label the training split never had
is an error. Splits are stratified by class. Metrics: accuracy and macro-F1 (over the classes
present in the split) from a confusion matrix; a prediction is the most likely label, its
probability and every class's probability. Entailment (MNLI-style) is this task on pairs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel, Field

from raypipe.errors import DataError
from raypipe.tasks import Scores, _text


class ClassPrediction(BaseModel):
    label: str
    score: float = Field(description="Probability of `label`.")
    probabilities: dict[str, float] = Field(description="Class -> probability, most likely first.")


class ConfusionAccumulator:
    """Argmax predictions against true ids, reduced to a confusion matrix on ``compute``."""

    def __init__(self, labels: list[str]):
        self.labels = labels
        self.pred: list[Any] = []
        self.true: list[Any] = []

    def update(self, logits: Any, rows: Mapping[str, Any]) -> None:
        self.pred.append(logits.argmax(dim=-1).cpu().numpy())
        self.true.append(rows["labels"])

    def compute(self, loss: float, gather: Any) -> Scores:
        import numpy as np

        from raypipe import metrics as M

        pred = gather(np.concatenate(self.pred) if self.pred else np.zeros(0, np.int64))
        true = gather(np.concatenate(self.true) if self.true else np.zeros(0, np.int64))
        cm = M.confusion(true, pred, len(self.labels))
        s = M.from_confusion(cm, self.labels)
        return Scores(
            metrics={"loss": loss, "accuracy": s["accuracy"], "macro_f1": s["macro_f1"]},
            details={"confusion": cm.tolist(), "per_class": s["per_class"], "labels": self.labels},
        )


class ClassificationTask:
    name = "classification"
    metrics = {"loss": "min", "accuracy": "max", "macro_f1": "max"}
    default_metric = "macro_f1"
    model_class = "AutoModelForSequenceClassification"
    schema_keys = ("labels",)
    input_keys = _text.INPUT_KEYS
    sequence_keys = _text.SEQUENCE_KEYS
    prediction_model = ClassPrediction

    # --- data ---------------------------------------------------------------------------

    def examples(self, raw: Any, where: str, cfg: Any) -> Any:
        import pandas as pd

        _text.missing_columns(raw, where, [*_text.needed_columns(cfg), cfg.label_column])
        inputs = _text.text_inputs(raw, where, cfg)
        values = raw[cfg.label_column].reset_index(drop=True)
        bad = [i for i, v in enumerate(values) if not _text.is_label(v)]
        if bad:
            raise DataError.at(where, bad, f"missing or non-scalar label in column '{cfg.label_column}' "
                                           f"({values.iloc[bad[0]]!r})")
        names = _text.label_names(cfg)
        labels = [_text.name_label(v, names) for v in values]
        unnamed = [i for i, v in enumerate(labels) if v is None]
        if unnamed:
            raise DataError.at(where, unnamed, f"label {values.iloc[unnamed[0]]!r} is not an index into "
                                               f"data.label_names ({len(names or ())} names)")
        return pd.DataFrame({**{k: v.to_numpy() for k, v in inputs.items()}, _text.LABEL: labels})

    def schema(self, train: Any, cfg: Any) -> dict[str, Any]:
        labels = _text.ordered_labels(set(train[_text.LABEL]), _text.label_names(cfg))
        if len(labels) < 2:
            raise DataError(f"{cfg.path}: training data has {len(labels)} class(es) {labels}; need at least 2")
        return {"labels": labels, **_text.input_schema(train)}

    def check(self, frame: Any, schema: Mapping[str, Any], role: str, where: str) -> None:
        _text.unseen_error([[v] for v in frame[_text.LABEL]], set(schema["labels"]), role, where, list(schema["labels"]))

    def stratify_key(self, frame: Any) -> Any:
        return frame[_text.LABEL]

    def encode(self, tokenizer: Any, frame: Any, schema: Mapping[str, Any], max_length: int) -> dict[str, Any]:
        import numpy as np

        index = {label: i for i, label in enumerate(schema["labels"])}
        rows = _text.encode_inputs(tokenizer, frame, schema, max_length)
        rows["labels"] = np.asarray([index[v] for v in frame[_text.LABEL]], dtype=np.int64)
        return rows

    # --- model and metrics --------------------------------------------------------------

    def model_kwargs(self, schema: Mapping[str, Any]) -> dict[str, Any]:
        return _text.label_head(schema, "single_label_classification")

    def accumulator(self, schema: Mapping[str, Any], *, fit: bool) -> ConfusionAccumulator:
        return ConfusionAccumulator(list(schema["labels"]))

    # --- prediction ---------------------------------------------------------------------

    def inputs_of(self, frame: Any) -> list[Any]:
        return _text.inputs_of(frame)

    def check_inputs(self, inputs: Sequence[Any], schema: Mapping[str, Any]) -> list[Any]:
        return _text.check_inputs(inputs, schema)

    def probabilities(self, logits: Any) -> Any:
        import numpy as np

        z = logits - logits.max(axis=1, keepdims=True)
        e = np.exp(z)
        return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)

    def predict(self, model: Any, tokenizer: Any, inputs: Sequence[Any], schema: Mapping[str, Any], *,
                max_length: int, batch_size: int, top_k: int | None = None, **_: Any) -> list[dict[str, Any]]:
        logits = _text.forward_logits(model, tokenizer, inputs, schema, max_length=max_length, batch_size=batch_size)
        labels = list(schema["labels"])
        out = []
        for row in self.probabilities(logits):
            ranked = sorted(range(len(labels)), key=lambda j: -float(row[j]))
            if top_k is not None:
                ranked = ranked[:top_k]
            out.append({
                "label": labels[ranked[0]],
                "score": float(row[ranked[0]]),
                "probabilities": {labels[j]: float(row[j]) for j in ranked},
            })
        return out

    # --- people -------------------------------------------------------------------------

    def report(self, scores: Scores, schema: Mapping[str, Any]) -> list[str]:
        labels = list(schema["labels"])
        per_class, cm = scores.details["per_class"], scores.details["confusion"]
        width = max(5, *(len(label) for label in labels))
        lines = [f"  {'class':<{width}}  precision  recall  f1      support"]
        for label in labels:
            pc = per_class[label]
            lines.append(f"  {label:<{width}}  {pc['precision']:<9.4f}  {pc['recall']:<6.4f}  "
                         f"{pc['f1']:<6.4f}  {pc['support']:>7d}")
        lines += ["", "  confusion matrix (rows: true, columns: predicted)"]
        cell = max(len(str(max((max(r) for r in cm), default=0))), *(len(label) for label in labels))
        lines.append(f"  {'':<{width}}  " + " ".join(f"{label:>{cell}}" for label in labels))
        for label, row in zip(labels, cm):
            lines.append(f"  {label:<{width}}  " + " ".join(f"{n:>{cell}d}" for n in row))
        return lines

    def figures(self, scores: Scores, schema: Mapping[str, Any], title: str) -> dict[str, Any]:
        from raypipe.plots import confusion_matrix

        return {"confusion_matrix.png": confusion_matrix(scores.details["confusion"], list(schema["labels"]),
                                                         title=f"Confusion matrix: {title}")}

    def describe(self, prediction: Mapping[str, Any], schema: Mapping[str, Any]) -> str:
        return f"{prediction['label']} {prediction['score']:.3f}"

    def judge(self, target: Any, prediction: Mapping[str, Any], schema: Mapping[str, Any]) -> tuple[str, bool]:
        return str(target), prediction["label"] == target
