"""The MLflow pyfunc face of a raypipe checkpoint.

Registering a checkpoint also saves it as an MLflow ``python_function`` model so that tools
which only know MLflow (``mlflow.pyfunc.load_model("models:/name/3")``, ``mlflow models serve``,
batch scoring with ``spark_udf``) can use it without knowing raypipe's layout. The pyfunc is a
thin wrapper: it loads the same :class:`~raypipe.predict.Predictor` that serving and evaluation
use, so every path returns the same answers. Its signature comes from the task: the input is a
``text`` column (``text`` + ``text_pair`` for a pair model; ``prompt`` for an sft model), the
output one column per field of the task's prediction (``label``/``score``/``probabilities``,
``labels``/``scores``, ``value``, ``generation``).

Saved with MLflow's "models from code": the model dir holds a three-line Python entry file
instead of a cloudpickled object, so loading never unpickles anything; the weights themselves
are safetensors inside ``artifacts/checkpoint/``. Loading still imports ``raypipe`` (listed in
the model's requirements), as any pyfunc runs its own code.

Layout written by :func:`save`::

    <path>/MLmodel                   python_function flavor, loader = the code entry below
    <path>/raypipe_pyfunc_entry.py   `mlflow.models.set_model(RaypipeModel())`
    <path>/requirements.txt, python_env.yaml, conda.yaml
    <path>/artifacts/checkpoint/     the raypipe checkpoint (without train_state.pt)
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import mlflow.pyfunc

CHECKPOINT_ARTIFACT = "checkpoint"
ENTRY_FILE = "raypipe_pyfunc_entry.py"
# Files a training checkpoint may hold that a served model never needs (and which are not
# safetensors: train_state.pt is a torch pickle, so it must not travel into the registry).
EXCLUDED_FILES = frozenset({"train_state.pt"})

_ENTRY_CODE = '''\
"""MLflow "models from code" entry point written by raypipe: no pickles are loaded.

The model reads the safetensors checkpoint in artifacts/checkpoint with raypipe's Predictor.
"""
import mlflow

from raypipe.pyfunc import RaypipeModel

mlflow.models.set_model(RaypipeModel())
'''


# MLflow warns at class definition that predict() has no type hints; that is deliberate (see the
# class docstring). MLflow resets the warning filters inside its own check, so a filter cannot
# silence it: record the warnings raised while the class is defined and re-emit all others.
with warnings.catch_warnings(record=True) as _caught:

    class RaypipeModel(mlflow.pyfunc.PythonModel):
        """Any raypipe checkpoint as a pyfunc.

        ``predict`` takes a list of texts (or of ``[a, b]`` pairs for a pair model), a pandas
        Series of texts, or a DataFrame with a ``text`` column (and ``text_pair``), and returns
        a DataFrame with one row per input and one column per field of the task's prediction —
        the same fields :meth:`raypipe.predict.Predictor.predict` returns.

        The ``predict`` signature has no type hints on purpose: a ``list[str]`` hint makes MLflow
        reject Series input, and a named-column signature rejects plain lists.
        """

        def load_context(self, context: Any) -> None:
            from raypipe.predict import Predictor

            self.predictor = Predictor.from_dir(context.artifacts[CHECKPOINT_ARTIFACT])

        def predict(self, context, model_input, params=None):  # noqa: ANN001 - see class docstring
            import pandas as pd

            inputs = to_inputs(model_input, self.predictor)
            batch_size = int((params or {}).get("batch_size", 64))
            rows = self.predictor.predict(inputs, batch_size=batch_size)
            fields = list(self.predictor.task.prediction_model.model_fields)
            return pd.DataFrame({f: [r[f] for r in rows] for f in fields})

for _warning in _caught:
    if "type hints" not in str(_warning.message):
        warnings.warn_explicit(_warning.message, _warning.category, _warning.filename, _warning.lineno)
del _caught, _warning

RaypipeClassifier = RaypipeModel  # the class name that versions registered before tasks import


def to_inputs(model_input: Any, predictor: Any) -> list[Any]:
    """Accept the input shapes people hand a pyfunc; say exactly what is wrong otherwise."""
    import numpy as np
    import pandas as pd

    from raypipe.errors import DataError

    column = getattr(predictor.task, "input_column", "text")  # sft models take a `prompt` column
    if isinstance(model_input, pd.DataFrame):
        if column != "text" and column in model_input.columns:
            values = model_input[column].tolist()
        elif "text" in model_input.columns:
            if predictor.pair:
                if "text_pair" not in model_input.columns:
                    raise DataError("this model compares two texts: the DataFrame needs 'text' and 'text_pair' "
                                    f"columns; it has {list(model_input.columns)}")
                values: list[Any] = list(zip(model_input["text"].tolist(), model_input["text_pair"].tolist()))
            else:
                values = model_input["text"].tolist()
        elif predictor.pair and model_input.shape[1] == 2:  # what MLflow makes of a list of pairs
            values = list(zip(model_input.iloc[:, 0].tolist(), model_input.iloc[:, 1].tolist()))
        elif model_input.shape[1] == 1:  # what MLflow makes of a list (or JSON list in `models serve`)
            values = model_input.iloc[:, 0].tolist()
        else:
            raise DataError(
                f"a DataFrame input needs a 'text' column; it has {list(model_input.columns)}"
            )
    elif isinstance(model_input, (pd.Series, np.ndarray)):
        values = list(model_input.tolist())
    elif isinstance(model_input, str):
        values = [model_input]  # one text is unambiguous here, unlike Predictor's list API
    elif isinstance(model_input, (list, tuple)):
        values = list(model_input)
    else:
        raise DataError(
            f"cannot predict on {type(model_input).__name__}: pass a list of texts, a pandas "
            "Series, or a DataFrame with a 'text' column"
        )
    return predictor.check_inputs(values)


def _colspec_type(annotation: Any) -> Any:
    """A pydantic field's type as an MLflow signature type (str, float, list[str], dict[str, float])."""
    import typing

    from mlflow.types.schema import Array, DataType, Map

    scalar = {str: DataType.string, float: DataType.double, int: DataType.long, bool: DataType.boolean}
    if annotation in scalar:
        return scalar[annotation]
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is list and args and args[0] in scalar:
        return Array(scalar[args[0]])
    if origin is dict and len(args) == 2 and args[1] in scalar:
        return Map(scalar[args[1]])
    return None


def signature(task: Any, pair: bool) -> Any:
    """Inputs: one string column (two for a pair model); outputs: the task's prediction fields.

    The input columns are unnamed on purpose: MLflow enforces a named ``text`` column so strictly
    that a plain list or Series of texts is refused, while unnamed columns take a list, a Series,
    a list of pairs and a DataFrame with ``text`` (+ ``text_pair``) alike.
    """
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, DataType, Schema

    inputs = [ColSpec(DataType.string)] * (2 if pair else 1)
    outputs = []
    for name, f in task.prediction_model.model_fields.items():
        kind = _colspec_type(f.annotation)
        if kind is not None:
            outputs.append(ColSpec(kind, name))
    return ModelSignature(inputs=Schema(inputs), outputs=Schema(outputs) if outputs else None)


def input_example(pair: bool, task: Any = None) -> Any:
    import pandas as pd

    column = getattr(task, "input_column", "text")
    if column != "text":  # sft: a prompt column
        return pd.DataFrame({column: ["Say hello."]})
    row = {"text": ["an example text"]}
    if pair:
        row["text_pair"] = ["a second text"]
    return pd.DataFrame(row)


def pip_requirements(adapter: bool = False) -> list[str]:
    """Explicit requirements: MLflow's inference would import-trace the model and go looking for
    torchvision (see DESIGN.md). torch is pinned by its public version only, so a CUDA build
    (``+cu124``) and a CPU build (``+cpu``) both satisfy it."""
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    pkgs = ("raypipe", "mlflow", "torch", "transformers", "tokenizers", "safetensors", "pandas", "numpy")
    for pkg in (*pkgs, "peft") if adapter else pkgs:
        try:
            v = version(pkg).split("+", 1)[0]
        except PackageNotFoundError:
            reqs.append(pkg)
            continue
        reqs.append(f"{pkg}=={v}")
    return reqs


def _link_or_copy(src: str, dst: str) -> None:
    """Hard-link where possible: a real model's weights are hundreds of MB and are only read."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def save(checkpoint_dir: str | os.PathLike[str], path: str | os.PathLike[str], metadata: dict[str, Any] | None = None) -> Path:
    """Write the pyfunc model for ``checkpoint_dir`` at ``path`` (which must not exist yet),
    with the task's signature and an input example."""
    from raypipe import tasks
    from raypipe.model import read_meta

    meta = read_meta(checkpoint_dir)
    task = tasks.get(meta["task"])
    pair = meta["schema"].get("inputs") == "pair"
    out = Path(path)
    with tempfile.TemporaryDirectory(prefix="raypipe-pyfunc-") as tmp:
        staged = Path(tmp) / CHECKPOINT_ARTIFACT  # the dir name becomes artifacts/<name>
        shutil.copytree(
            checkpoint_dir,
            staged,
            ignore=lambda _d, names: [n for n in names if n in EXCLUDED_FILES],
            copy_function=_link_or_copy,
        )
        entry = Path(tmp) / ENTRY_FILE
        entry.write_text(_ENTRY_CODE, encoding="utf-8")
        mlflow.pyfunc.save_model(
            str(out),
            python_model=str(entry),
            artifacts={CHECKPOINT_ARTIFACT: str(staged)},
            pip_requirements=pip_requirements(adapter=bool(meta.get("peft"))),
            metadata=metadata,
            signature=signature(task, pair),
            input_example=input_example(pair, task),
        )
    return out
