"""Tasks: the one place that knows what kind of model is being fine-tuned.

Every stage of raypipe (data, training loop, evaluation, registry, Predictor, pyfunc, HTTP API)
is written once and asks the configured :class:`Task` whatever depends on the kind of model —
how targets are read and checked, how rows are stratified, how an example becomes token ids,
which head and loss, which metrics (and whether lower or higher is better), how a prediction
looks. The stages never branch on a task's name. This is the shape of Ludwig's feature registry
and of transformers' ``SUPPORTED_TASKS``: a new task is one new module plus one line in
:data:`TASKS`.

Design
------
* A task is a plain class satisfying the :class:`Task` protocol; instances hold no state, so
  :func:`get` hands out one shared instance per name. Task modules import only the standard
  library and pydantic at module level (numpy, pandas, torch and transformers inside methods):
  the config validates metric names against the task registry, and ``raypipe --help`` must not
  pay for torch.
* The data a task works on is a pandas DataFrame of *examples* whose columns the task decides
  (``text`` [+ ``text_pair``] + ``label`` for the sequence-level tasks). Readers in
  :mod:`raypipe.data` return raw columns; :meth:`Task.examples` turns them into examples and is
  where bad targets are reported with file and row.
* :meth:`Task.schema` derives what the model needs to know from the training split (label list,
  target mean/std, whether inputs are sentence pairs, ...). The schema travels into every
  checkpoint's ``raypipe.json`` (``task`` + ``schema``), so a checkpoint alone is enough to
  predict; a checkpoint written before tasks existed has no ``task`` and reads as
  classification with its ``labels``.
* :meth:`Task.encode` turns examples into fixed-width numpy arrays (one row per example or, for
  windowed tasks, per window); ``input_keys`` are what the model's forward takes,
  ``sequence_keys`` the arrays trimmed to the longest row of each batch (dynamic padding), and
  any other array (ids, word maps) stays on the host for the accumulator.
* Metrics are computed by an :class:`Accumulator` fed with the model's logits batch by batch
  (the same code in the training loop's validation and in held-out evaluation, so
  ``val_macro_f1`` and ``test_macro_f1`` mean the same thing). ``compute`` receives a ``gather``
  function that concatenates an array across Ray Train workers. A task may fit part of its
  schema on the validation split (multi-label decision thresholds): ``compute`` returns that as
  ``schema_update`` and the checkpoint of that epoch stores it.
* Metric names are unprefixed in a task's ``metrics`` table (``macro_f1``) and prefixed by
  split where they are reported (``val_macro_f1``, ``test_macro_f1``); a name's direction
  (min/max) is the same in every task (:func:`direction`).
* :meth:`Task.predict` owns inference for a batch of inputs (tokenise, forward, postprocess), so
  generation or span decoding fit behind the same call; ``prediction_model`` is the pydantic
  model of one prediction (the ``/predict`` response items in OpenAPI, the pyfunc columns).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import import_module
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

if TYPE_CHECKING:  # pragma: no cover
    from pydantic import BaseModel

Direction = Literal["min", "max"]
Gather = Callable[[Any], Any]  # ndarray -> the same array concatenated over all workers

# name -> "module:Class". One line per task; the module holds everything else.
TASKS: dict[str, str] = {
    "classification": "raypipe.tasks.classification:ClassificationTask",
    "multi_label": "raypipe.tasks.multi_label:MultiLabelTask",
    "regression": "raypipe.tasks.regression:RegressionTask",
    "token_classification": "raypipe.tasks.token_classification:TokenClassificationTask",
    "sft": "raypipe.tasks.sft:SFTTask",
}
DEFAULT_TASK = "classification"


@dataclass
class Scores:
    """What an accumulator computes: unprefixed metrics, JSON-able details for reports and
    checkpoints (confusion matrix, per-label table, ...), and schema fitted on this split."""

    metrics: dict[str, float]
    details: dict[str, Any] = field(default_factory=dict)
    schema_update: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Accumulator(Protocol):
    def update(self, logits: Any, rows: Mapping[str, Any]) -> None:
        """One batch: the model's logits (a torch tensor) and the batch's encoded rows (numpy)."""

    def compute(self, loss: float, gather: Gather) -> Scores:
        """Metrics over everything seen, on every worker (``gather`` joins the workers' arrays)."""


@runtime_checkable
class Task(Protocol):
    name: str
    metrics: Mapping[str, Direction]  # unprefixed names: "loss", "accuracy", "macro_f1", ...
    default_metric: str  # unprefixed; train/tune use val_<it>, the promotion gate test_<it>
    model_class: str  # a transformers Auto class, e.g. "AutoModelForSequenceClassification"
    schema_keys: tuple[str, ...]  # what a checkpoint's schema must hold to be loadable
    input_keys: tuple[str, ...]
    sequence_keys: tuple[str, ...]
    prediction_model: type[BaseModel]

    # --- data ---
    def examples(self, raw: Any, where: str, cfg: Any) -> Any: ...
    def schema(self, train: Any, cfg: Any) -> dict[str, Any]: ...
    def check(self, frame: Any, schema: Mapping[str, Any], role: str, where: str) -> None: ...
    def stratify_key(self, frame: Any) -> Any: ...
    def encode(self, tokenizer: Any, frame: Any, schema: Mapping[str, Any], max_length: int) -> dict[str, Any]: ...

    # --- model and metrics ---
    # Optional (not part of the protocol check): ``init_head(model, schema)`` adjusts the fresh
    # head after ``from_pretrained`` (multi_label starts each output at its label's frequency);
    # ``prepare(model, tokenizer)`` runs after every build and load (sft: chat template, no KV
    # cache); ``held_out(predictor, frame, scores) -> Scores`` adds held-out-only scores (sft:
    # generations; a ``details["tables"]`` entry is logged as an MLflow table); ``epoch_metrics``
    # limits what train.metric/tune.metric may name; ``default_peft`` turns LoRA on unless
    # ``model.peft: false``; ``input_column`` names the pyfunc's input column.
    def model_kwargs(self, schema: Mapping[str, Any]) -> dict[str, Any]: ...
    def accumulator(self, schema: Mapping[str, Any], *, fit: bool) -> Accumulator: ...

    # --- prediction ---
    # Optional: ``long_inputs`` = "truncate" (the default: an input over max_length tokens is cut,
    # which batch prediction reports) or "windows" (the task splits long inputs itself).
    def inputs_of(self, frame: Any) -> list[Any]:
        """The model inputs of a frame of examples (what ``predict`` takes): texts, pairs, word lists."""

    def check_inputs(self, inputs: Sequence[Any], schema: Mapping[str, Any]) -> list[Any]: ...
    def predict(self, model: Any, tokenizer: Any, inputs: Sequence[Any], schema: Mapping[str, Any], *,
                max_length: int, batch_size: int, **options: Any) -> list[dict[str, Any]]: ...

    # --- people ---
    def report(self, scores: Scores, schema: Mapping[str, Any]) -> list[str]: ...
    def figures(self, scores: Scores, schema: Mapping[str, Any], title: str) -> dict[str, Any]: ...
    def describe(self, prediction: Mapping[str, Any], schema: Mapping[str, Any]) -> str:
        """One prediction in a few words (CLI lines, the pipeline's sample predictions)."""

    def judge(self, target: Any, prediction: Mapping[str, Any], schema: Mapping[str, Any]) -> tuple[str, bool]:
        """(the target in a few words, whether the prediction gets it right)."""


_INSTANCES: dict[str, Task] = {}


def names() -> list[str]:
    return list(TASKS)


def get(name: str | None) -> Task:
    """The task called ``name`` (None: the default), imported on first use."""
    name = name or DEFAULT_TASK
    if name not in TASKS:
        raise KeyError(f"unknown task '{name}'; known: {', '.join(TASKS)}")
    if name not in _INSTANCES:
        module, _, cls = TASKS[name].partition(":")
        _INSTANCES[name] = getattr(import_module(module), cls)()
    return _INSTANCES[name]


# Directions of every metric name any task reports. One table, so "rmse" means "lower is better"
# wherever it appears, and `train.mode: auto` needs no task to resolve.
_DIRECTIONS: dict[str, Direction] = {}


def direction(metric: str) -> Direction:
    """min/max for a (possibly split-prefixed) metric name, e.g. ``val_rmse`` -> ``min``."""
    if not _DIRECTIONS:
        for name in TASKS:
            _DIRECTIONS.update(get(name).metrics)
    base = strip_split(metric)
    if base in _DIRECTIONS:
        return _DIRECTIONS[base]
    return "min" if base.endswith("loss") else "max"


def strip_split(metric: str) -> str:
    for prefix in ("val_", "test_", "train_"):
        if metric.startswith(prefix):
            return metric[len(prefix):]
    return metric


def metric_names(task: str, split: str) -> list[str]:
    """What ``train.metric`` (split "val") or ``registry.promotion_metric`` ("test") may name."""
    return [f"{split}_{m}" for m in get(task).metrics]


def schema_of(meta: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """(task name, schema) from a checkpoint's ``raypipe.json``; old checkpoints (no ``task``)
    are classification models described by their ``labels``."""
    task = meta.get("task") or DEFAULT_TASK
    schema = dict(meta.get("schema") or {})
    if not schema and "labels" in meta:
        schema = {"labels": meta["labels"]}
    return task, schema


def schema_problem(task: str, schema: Mapping[str, Any]) -> str | None:
    """What is missing from a checkpoint's schema for ``task`` (None when it is complete)."""
    for key in get(task).schema_keys:
        value = schema.get(key)
        if key == "labels":
            if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
                return "no label list"
        elif value is None:
            return f"no '{key}' in its schema"
    return None
