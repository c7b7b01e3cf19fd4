"""Figures people would rather look at than read: learning curves and confusion matrices.

Uses matplotlib's Agg backend (no display needed); every function returns a Figure so the
notebook can show it inline and tracking can log it as an artifact.
"""

from __future__ import annotations

from typing import Any


def _plt() -> Any:
    import matplotlib

    if matplotlib.get_backend().lower() not in ("agg",) and "inline" not in matplotlib.get_backend():
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def learning_curves(history: list[dict[str, float]], title: str = "Learning curves") -> Any:
    """One panel for losses, one for the task's other validation metrics, per epoch."""
    plt = _plt()
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_score) = plt.subplots(1, 2, figsize=(10, 4))
    for key, style in (("train_loss", "o-"), ("val_loss", "s-")):
        if any(key in h for h in history):
            ax_loss.plot(epochs, [h.get(key) for h in history], style, label=key)
    scores = [k for k in dict.fromkeys(k for h in history for k in h) if k.startswith("val_") and k != "val_loss"]
    for key, style in zip(scores, ["o-", "s-", "^-", "d-", "v-", "x-"] * 3):
        ax_score.plot(epochs, [h.get(key) for h in history], style, label=key)
    values = [h[k] for h in history for k in scores if isinstance(h.get(k), (int, float))]
    unit = bool(values) and all(0.0 <= v <= 1.0 for v in values)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_score.set(xlabel="epoch", ylabel="score", title="validation", **({"ylim": (0, 1.02)} if unit else {}))
    for ax in (ax_loss, ax_score):
        ax.grid(alpha=0.3)
        ax.legend()
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def confusion_matrix(cm: Any, labels: list[str], title: str = "Confusion matrix") -> Any:
    """Counts with row-normalised colour, true classes on rows."""
    import numpy as np

    plt = _plt()
    cm = np.asarray(cm)
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    size = max(4.0, 0.6 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", color="white" if norm[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return fig


def sweep(trials: list[dict[str, Any]], params: list[str], metric: str) -> Any:
    """One scatter per searched key: value vs the trial's metric; early-stopped trials hollow."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(params), figsize=(4.2 * len(params), 3.6), squeeze=False)
    for ax, key in zip(axes[0], params):
        for status, marker in (("completed", "o"), ("early_stopped", "x"), ("error", "^")):
            pts = [(t["config"].get(key), t[metric]) for t in trials if t["status"] == status and t.get(metric) is not None]
            if not pts:
                continue
            xs = [str(x) if isinstance(x, str) else x for x, _ in pts]
            ax.scatter(xs, [y for _, y in pts], marker=marker, label=status)
        if key.endswith(("lr", "weight_decay")) and all(isinstance(t["config"].get(key), (int, float)) for t in trials):
            ax.set_xscale("log")
        ax.set(xlabel=key, ylabel=metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Sweep: {metric} by hyperparameter")
    fig.tight_layout()
    return fig


def per_label_bars(per_label: dict[str, dict[str, float]], title: str = "Per-label F1") -> Any:
    """F1 per label, sorted, with each label's support (multi-label tasks have many labels)."""
    plt = _plt()
    items = sorted(per_label.items(), key=lambda kv: kv[1]["f1"])
    fig, ax = plt.subplots(figsize=(8, max(3.0, 0.28 * len(items) + 1)))
    ys = range(len(items))
    ax.barh(list(ys), [v["f1"] for _, v in items], color="tab:blue")
    ax.set_yticks(list(ys), [f"{k} ({v['support']})" for k, v in items], fontsize=8)
    ax.set(xlim=(0, 1), xlabel="F1 at the label's threshold (support in brackets)", title=title)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


def predicted_vs_true(true: list[float], pred: list[float], title: str = "Predicted vs true") -> Any:
    """A scatter with the identity line, and the residuals' histogram (regression tasks)."""
    import numpy as np

    plt = _plt()
    t, p = np.asarray(true, dtype=float), np.asarray(pred, dtype=float)
    fig, (ax, ax_res) = plt.subplots(1, 2, figsize=(10, 4))
    ax.scatter(t, p, s=8, alpha=0.5)
    lo, hi = (float(min(t.min(), p.min())), float(max(t.max(), p.max()))) if len(t) else (0.0, 1.0)
    ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="prediction = truth")
    ax.set(xlabel="true", ylabel="predicted", title="predicted vs true")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax_res.hist(p - t, bins=30, color="tab:orange")
    ax_res.set(xlabel="predicted - true", ylabel="examples", title="residuals")
    fig.suptitle(title)
    fig.tight_layout()
    return fig
