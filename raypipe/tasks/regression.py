"""Regression: one number per text (or text pair), e.g. a 0-5 similarity score (STS-B).

The target column must hold finite numbers (numeric strings are accepted; a non-number, NaN
or inf is an error naming the row). The model predicts a *standardised* target with MSE loss:
the training split's mean and standard deviation are stored in the checkpoint, and every
prediction and metric is in the target's original unit. ``val_loss`` is the MSE in standard
units. Metrics: RMSE, MAE, Pearson and Spearman correlation. Splits are stratified by decile of
the target so every split covers its range.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel, Field

from raypipe.errors import DataError
from raypipe.tasks import Scores, _text

_PLOT_POINTS = 2000  # points kept for the predicted-vs-true scatter


class RegressionPrediction(BaseModel):
    value: float = Field(description="The predicted target, in the unit of the training data.")


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, str):
        try:
            v = float(v.strip())
        except ValueError:
            return None
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def pearson(a: Any, b: Any) -> float:
    import numpy as np

    if len(a) < 2 or np.std(a) == 0 or np.std(b) == 0:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


def spearman(a: Any, b: Any) -> float:
    """Pearson on average ranks (ties share their mean rank), as scipy.stats.spearmanr."""
    import pandas as pd

    return pearson(pd.Series(a).rank().to_numpy(), pd.Series(b).rank().to_numpy())


class RegressionAccumulator:
    def __init__(self, mean: float, std: float):
        self.mean, self.std = mean, std
        self.pred: list[Any] = []
        self.true: list[Any] = []

    def update(self, logits: Any, rows: Mapping[str, Any]) -> None:
        self.pred.append(logits.float().reshape(-1).cpu().numpy() * self.std + self.mean)
        self.true.append(rows["target"])

    def compute(self, loss: float, gather: Any) -> Scores:
        import numpy as np

        pred = gather(np.concatenate(self.pred) if self.pred else np.zeros(0, np.float32)).astype(np.float64)
        true = gather(np.concatenate(self.true) if self.true else np.zeros(0, np.float32)).astype(np.float64)
        err = pred - true
        metrics = {
            "loss": loss,
            "rmse": float(np.sqrt(np.mean(err**2))) if len(err) else 0.0,
            "mae": float(np.mean(np.abs(err))) if len(err) else 0.0,
            "pearson": pearson(pred, true),
            "spearman": spearman(pred, true),
        }
        keep = np.random.default_rng(0).permutation(len(true))[:_PLOT_POINTS]
        details = {"n": int(len(true)), "sample": {"true": true[keep].round(4).tolist(),
                                                   "pred": pred[keep].round(4).tolist()}}
        return Scores(metrics=metrics, details=details)


class RegressionTask:
    name = "regression"
    metrics = {"loss": "min", "rmse": "min", "mae": "min", "pearson": "max", "spearman": "max"}
    default_metric = "rmse"
    model_class = "AutoModelForSequenceClassification"
    schema_keys = ("mean", "std")
    input_keys = _text.INPUT_KEYS
    sequence_keys = _text.SEQUENCE_KEYS
    prediction_model = RegressionPrediction

    # --- data ---------------------------------------------------------------------------

    def examples(self, raw: Any, where: str, cfg: Any) -> Any:
        import pandas as pd

        _text.missing_columns(raw, where, [*_text.needed_columns(cfg), cfg.label_column])
        inputs = _text.text_inputs(raw, where, cfg)
        values = raw[cfg.label_column].reset_index(drop=True)
        numbers = [_number(v) for v in values]
        bad = [i for i, x in enumerate(numbers) if x is None]
        if bad:
            raise DataError.at(where, bad, f"target {values.iloc[bad[0]]!r} in column '{cfg.label_column}' "
                                           "is not a finite number")
        return pd.DataFrame({**{k: v.to_numpy() for k, v in inputs.items()}, _text.LABEL: numbers})

    def schema(self, train: Any, cfg: Any) -> dict[str, Any]:
        import numpy as np

        y = train[_text.LABEL].to_numpy(dtype=np.float64)
        std = float(y.std()) if len(y) > 1 else 0.0
        return {
            "target": cfg.label_column,
            "mean": float(y.mean()),
            "std": std if std > 0 else 1.0,  # a constant target: predict it, don't divide by 0
            "min": float(y.min()),
            "max": float(y.max()),
            **_text.input_schema(train),
        }

    def check(self, frame: Any, schema: Mapping[str, Any], role: str, where: str) -> None:
        return None  # any finite number is a valid target, seen in training or not

    def stratify_key(self, frame: Any) -> Any:
        import pandas as pd

        y = frame[_text.LABEL]
        if y.nunique() < 2:
            return None
        return pd.qcut(y.rank(method="first"), q=min(10, len(y)), labels=False, duplicates="drop").astype(str)

    def encode(self, tokenizer: Any, frame: Any, schema: Mapping[str, Any], max_length: int) -> dict[str, Any]:
        import numpy as np

        rows = _text.encode_inputs(tokenizer, frame, schema, max_length)
        y = frame[_text.LABEL].to_numpy(dtype=np.float32)
        rows["labels"] = ((y - schema["mean"]) / schema["std"]).astype(np.float32)
        rows["target"] = y
        return rows

    # --- model and metrics --------------------------------------------------------------

    def model_kwargs(self, schema: Mapping[str, Any]) -> dict[str, Any]:
        return {"num_labels": 1, "problem_type": "regression",
                "id2label": {0: str(schema.get("target", "value"))}, "label2id": {str(schema.get("target", "value")): 0}}

    def accumulator(self, schema: Mapping[str, Any], *, fit: bool) -> RegressionAccumulator:
        return RegressionAccumulator(float(schema["mean"]), float(schema["std"]))

    # --- prediction ---------------------------------------------------------------------

    def inputs_of(self, frame: Any) -> list[Any]:
        return _text.inputs_of(frame)

    def check_inputs(self, inputs: Sequence[Any], schema: Mapping[str, Any]) -> list[Any]:
        return _text.check_inputs(inputs, schema)

    def predict(self, model: Any, tokenizer: Any, inputs: Sequence[Any], schema: Mapping[str, Any], *,
                max_length: int, batch_size: int, **_: Any) -> list[dict[str, Any]]:
        logits = _text.forward_logits(model, tokenizer, inputs, schema, max_length=max_length, batch_size=batch_size)
        values = logits.reshape(len(inputs), -1)[:, 0] * schema["std"] + schema["mean"]
        return [{"value": float(v)} for v in values]

    # --- people -------------------------------------------------------------------------

    def report(self, scores: Scores, schema: Mapping[str, Any]) -> list[str]:
        m = scores.metrics
        return [
            f"  target '{schema.get('target')}': training mean {schema['mean']:.4g}, std {schema['std']:.4g}, "
            f"range {schema.get('min', float('nan')):.4g} .. {schema.get('max', float('nan')):.4g}",
            f"  rmse {m['rmse']:.4f}   mae {m['mae']:.4f}   pearson {m['pearson']:.4f}   spearman {m['spearman']:.4f}",
        ]

    def figures(self, scores: Scores, schema: Mapping[str, Any], title: str) -> dict[str, Any]:
        from raypipe.plots import predicted_vs_true

        s = scores.details["sample"]
        return {"predicted_vs_true.png": predicted_vs_true(s["true"], s["pred"], title=f"Predicted vs true: {title}")}

    def describe(self, prediction: Mapping[str, Any], schema: Mapping[str, Any]) -> str:
        return f"{float(prediction['value']):.3f}"

    def judge(self, target: Any, prediction: Mapping[str, Any], schema: Mapping[str, Any]) -> tuple[str, bool]:
        value, true = float(prediction["value"]), float(target)
        span = float(schema.get("max", 1.0)) - float(schema.get("min", 0.0)) or 1.0
        # "right" for the pipeline's sample lines: within a tenth of the training range
        return f"{true:.3f}", abs(value - true) <= 0.1 * span
