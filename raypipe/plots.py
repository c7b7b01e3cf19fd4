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
    """One panel for losses, one for accuracy / macro-F1, per epoch."""
    plt = _plt()
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_score) = plt.subplots(1, 2, figsize=(10, 4))
    for key, style in (("train_loss", "o-"), ("val_loss", "s-")):
        if any(key in h for h in history):
            ax_loss.plot(epochs, [h.get(key) for h in history], style, label=key)
    for key, style in (("val_accuracy", "o-"), ("val_macro_f1", "s-")):
        if any(key in h for h in history):
            ax_score.plot(epochs, [h.get(key) for h in history], style, label=key)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_score.set(xlabel="epoch", ylabel="score", title="validation", ylim=(0, 1.02))
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
