"""Classification metrics from a confusion matrix (pure numpy, shared by training, evaluation
and tuning so every stage reports the same numbers)."""

from __future__ import annotations

from typing import Any

import numpy as np


def confusion(y_true: Any, y_pred: Any, num_labels: int) -> np.ndarray:
    """Rows are true classes, columns predicted classes."""
    cm = np.zeros((num_labels, num_labels), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)), 1)
    return cm


def from_confusion(cm: Any, labels: list[str] | None = None) -> dict[str, Any]:
    """accuracy, macro_f1 and per-class precision/recall/f1/support.

    A class never predicted has precision 0 (not NaN), as in scikit-learn's zero_division=0.
    """
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        recall = np.where(support > 0, tp / support, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    total = cm.sum()
    present = support > 0
    names = labels or [str(i) for i in range(len(tp))]
    return {
        "accuracy": float(tp.sum() / total) if total else 0.0,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "per_class": {
            names[i]: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i in range(len(tp))
        },
    }
