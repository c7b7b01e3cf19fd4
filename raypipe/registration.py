"""The register stage: a checkpoint becomes a new registered version, and the gate decides
whether it takes the alias.

Beside :mod:`raypipe.training`, :mod:`raypipe.tuning` and :mod:`raypipe.evaluation`: the
pipeline and ``raypipe register`` call :func:`run` with the checkpoint a training run or a sweep
produced. Order matters: the name and the checkpoint are checked, and a missing promotion metric
is computed (:func:`raypipe.evaluation.run` on the config's test split), before anything is
written to the registry, so a bad checkpoint or bad data leaves no empty model or stray version.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from raypipe.errors import CheckpointError, ConfigError
from raypipe.registry import (
    RegisterResult,
    add_version,
    check_model_name,
    check_task,
    clean_metrics,
)


def run(
    path: str | os.PathLike[str],
    cfg: Any,
    name: str | None = None,
    force: bool = False,
    metrics: dict[str, float] | None = None,
    source_run_id: str | None = None,
    fingerprint: str | None = None,
    evaluation: Any = None,
    data_checks: dict[str, Any] | None = None,
) -> RegisterResult:
    """Register the checkpoint dir ``path`` as a new version of ``name`` (default
    ``registry.model_name``) and run the promotion gate.

    ``metrics`` (or an :class:`~raypipe.evaluation.EvalResult` as ``evaluation``) carry the test
    metrics; without the gate's metric the checkpoint is evaluated on the config's test split.
    ``source_run_id`` (the training run) receives the model artifacts; without it a "register"
    run is created in ``cfg.tracking.experiment``. ``data_checks`` (the split's duplicate
    counts) become tags of the version.
    """
    from raypipe import __version__
    from raypipe.model import load_checkpoint
    from raypipe.pyfunc import save as save_pyfunc

    name = check_model_name(name or cfg.registry.model_name)
    ckpt = Path(path).expanduser()
    if not ckpt.is_dir():
        raise CheckpointError(f"checkpoint '{path}' is not a directory")
    ckpt = ckpt.resolve()
    _model, _tokenizer, meta = load_checkpoint(ckpt, device="cpu")  # everything must load
    check_task(cfg, name, meta["task"])
    metrics = clean_metrics({**(evaluation.metrics if evaluation is not None else {}), **(metrics or {})})
    eval_run_id = getattr(evaluation, "run_id", None)
    fingerprint = fingerprint or getattr(evaluation, "fingerprint", None)
    gate = cfg.registry.promotion_metric
    if gate not in metrics and cfg.data.path:
        from raypipe.evaluation import run as evaluate

        print(f"register: no {gate} given; evaluating {ckpt} on the config's test split for the promotion gate")
        evaluated = evaluate(str(ckpt), cfg, log_to_mlflow=True)
        metrics = {**evaluated.metrics, **metrics}
        fingerprint = fingerprint or evaluated.fingerprint
        eval_run_id = evaluated.run_id
    fingerprint = fingerprint or meta.get("data_fingerprint") or meta.get("fingerprint")

    def rescore(holder_version: str) -> tuple[float, str | None] | None:
        """The alias holder on this version's test data (the config's test split), for the gate
        when the holder was scored on other data; None when there is no such split."""
        if not cfg.data.path:
            return None
        from raypipe.evaluation import run as evaluate

        print(f"register: @{cfg.registry.alias} v{holder_version} was tested on other data; "
              "re-evaluating it on this test split for the promotion gate")
        again = evaluate(f"models:/{name}/{holder_version}", cfg, log_to_mlflow=False)
        value = again.metrics.get(gate)
        return None if value is None else (float(value), again.fingerprint)

    with tempfile.TemporaryDirectory(prefix="raypipe-register-") as tmp:
        model_dir = save_pyfunc(
            ckpt,
            Path(tmp) / "model",
            metadata={"raypipe_version": __version__, "task": meta["task"],
                      **({"labels": list(meta["schema"]["labels"])} if meta["schema"].get("labels") else {})},
        )
        return add_version(
            cfg, name, model_dir,
            checkpoint=str(ckpt), meta=meta, metrics=metrics, force=force,
            source_run_id=source_run_id, fingerprint=fingerprint, eval_run_id=eval_run_id,
            data_checks=data_checks, rescore=rescore,
        )


register_checkpoint = run  # the name this function had when it lived in raypipe.registry


def export(source: str | os.PathLike[str], output: str | os.PathLike[str], *, merge: bool = False,
           tracking_uri: str | None = None, overwrite: bool = False) -> Path:
    """Write a checkpoint (dir or ``models:/`` URI) as a plain transformers model dir that
    ``AutoModelFor*.from_pretrained`` and raypipe both load; an adapter is merged into its
    base (``merge=True``), so no peft is needed at inference. No training state is copied."""
    import shutil
    import tempfile

    from raypipe.adapters import merge as merge_adapter
    from raypipe.model import load_checkpoint, read_meta, save_checkpoint
    from raypipe.registry import resolve

    out = Path(output).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise ConfigError(f"export: '{out}' exists and is not empty; choose another --output or pass --overwrite")
    resolved = resolve(source, tracking_uri=tracking_uri)
    meta = read_meta(resolved.path)
    if meta.get("peft") and not merge:
        raise ConfigError(f"export: '{source}' is a LoRA adapter; pass --merge to fold it into its base "
                          "(or use the checkpoint dir as it is, with peft installed)")
    model, tokenizer, meta = load_checkpoint(resolved.path, device="cpu")
    record = {k: v for k, v in meta.items() if k not in ("peft", "path", "format_version", "raypipe_version")}
    if meta.get("peft"):
        model = merge_adapter(model)
        record["merged_from"] = {"source": str(source), "peft": meta["peft"],
                                 **({"model_name": resolved.name, "model_version": resolved.version}
                                    if resolved.name else {})}
    out.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))  # whole or nothing
    try:
        save_checkpoint(staged, model, tokenizer, record)
        if out.exists():
            shutil.rmtree(out)
        os.replace(staged, out)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return out
