"""raypipe: fine-tune, track, tune, register and serve Hugging Face transformers models on Ray.

``import raypipe`` stays light: torch, ray and mlflow load only when a stage that needs them
runs. The stage functions below are thin entry points; the work lives in ``raypipe.training``,
``raypipe.tuning``, ``raypipe.evaluation`` and ``raypipe.pipeline`` (module names differ from the
function names so that importing a module never shadows the function of the same name).
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:  # pragma: no cover
    from raypipe.config import RaypipeConfig


def train(cfg: RaypipeConfig, **kwargs: Any) -> Any:
    """Fine-tune on Ray Train and log to MLflow; returns a ``TrainResult``."""
    return import_module("raypipe.training").run(cfg, **kwargs)


def tune(cfg: RaypipeConfig, **kwargs: Any) -> Any:
    """Hyperparameter search on Ray Tune; returns a ``TuneResult``."""
    return import_module("raypipe.tuning").run(cfg, **kwargs)


def evaluate(model: str, cfg: RaypipeConfig | None = None, **kwargs: Any) -> Any:
    """Held-out metrics for a checkpoint dir or ``models:/`` URI."""
    return import_module("raypipe.evaluation").run(model, cfg, **kwargs)


def register(checkpoint: str, cfg: RaypipeConfig, **kwargs: Any) -> Any:
    """Register a checkpoint dir in the MLflow Model Registry and run the promotion gate."""
    return import_module("raypipe.registration").run(checkpoint, cfg, **kwargs)


def load_predictor(model: str, tracking_uri: str | None = None, **kwargs: Any) -> Any:
    """A ``Predictor`` for a checkpoint dir or a ``models:/name@alias`` URI."""
    return import_module("raypipe.registry").load_predictor(model, tracking_uri=tracking_uri, **kwargs)


def batch_predict(model: str, input: str, output: str, cfg: RaypipeConfig | None = None, **kwargs: Any) -> Any:
    """Score a file, folder or glob of CSV/TSV/JSON/JSONL/Parquet with a checkpoint dir or a
    ``models:/`` URI on Ray Data into ``output``; returns a ``BatchResult``."""
    return import_module("raypipe.batch").run(model, input, output, cfg, **kwargs)


_LAZY = {
    "load_config": "raypipe.config",
    "RaypipeConfig": "raypipe.config",
    "ConfigError": "raypipe.errors",
    "RaypipeError": "raypipe.errors",
    "Predictor": "raypipe.predict",
}

__all__ = ["__version__", "train", "tune", "evaluate", "register", "load_predictor", "batch_predict", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'raypipe' has no attribute {name!r}")
