"""The only MLflow Model Registry code in raypipe: add versions, promote, resolve, list.

Registering a checkpoint as a stage (evaluate it if needed, package it as a pyfunc, add the
version, run the gate) is :mod:`raypipe.registration`; this module only talks to the registry.

Layout of a registered version (one copy of the weights, inside the run that registered it)::

    <run artifacts>/model/                     the version's ``source``; an MLflow pyfunc model
        MLmodel, raypipe_pyfunc_entry.py, requirements.txt, python_env.yaml, conda.yaml
        artifacts/checkpoint/                  the raypipe checkpoint (no train_state.pt):
            model.safetensors, config.json, tokenizer files, raypipe.json

So ``mlflow.pyfunc.load_model("models:/name/3")`` works for MLflow-only tools, while
:func:`resolve` downloads only ``artifacts/checkpoint/`` and hands raypipe's own
:class:`~raypipe.predict.Predictor` a plain checkpoint dir: serving never executes registry code
or unpickles anything, it reads safetensors and JSON.

The version is created with ``MlflowClient.create_model_version(source=<artifact uri>)``:
``mlflow.register_model`` on a plain artifact folder fails and leaves an empty registered model
behind (DESIGN.md), and ``mlflow.pyfunc.log_model`` in MLflow 3 writes to a separate
"logged model" location and needs the fluent active run, which the pipeline may already hold.
Every call here goes through an explicit ``MlflowClient``, so no global MLflow run state is
touched.

Version tags (what ``raypipe models`` shows and the promotion gate reads): the task's test
metrics (``test_accuracy``, ``test_macro_f1``, ``test_rmse``, ... when known),
``raypipe.task``, ``raypipe.source_run``, ``raypipe.data_fingerprint``, ``raypipe.version``,
``raypipe.checkpoint``, ``raypipe.labels`` (label tasks), ``raypipe.eval_run``,
``raypipe.promotion`` (promoted|rejected) and ``raypipe.promotion_reason``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from raypipe.errors import CheckpointError, RegistryError

MODEL_ARTIFACT_PATH = "model"
TAG_SOURCE_RUN = "raypipe.source_run"
TAG_FINGERPRINT = "raypipe.data_fingerprint"
TAG_RAYPIPE_VERSION = "raypipe.version"
TAG_CHECKPOINT = "raypipe.checkpoint"
TAG_LABELS = "raypipe.labels"
TAG_TASK = "raypipe.task"
TAG_EVAL_RUN = "raypipe.eval_run"
TAG_PEFT = "raypipe.peft"  # an adapter version: its method, and the base it needs
TAG_BASE_MODEL = "raypipe.base_model"
TAG_BASE_FINGERPRINT = "raypipe.base_fingerprint"
TAG_PROMOTION = "raypipe.promotion"
TAG_PROMOTION_REASON = "raypipe.promotion_reason"

_URI_HELP = "use models:/NAME@ALIAS, models:/NAME/VERSION (a number or 'latest'), or a checkpoint dir"
_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>[^/@]+))$")
_CACHE_ENV = "RAYPIPE_MODEL_CACHE"


@dataclass
class ResolvedModel:
    """A model URI turned into a local checkpoint dir, plus where it came from."""

    path: str
    name: str | None = None
    version: str | None = None
    run_id: str | None = None
    alias: str | None = None

    def as_meta(self) -> dict[str, Any]:
        """The lineage fields ``Predictor.meta`` (and so ``/metadata``) reports."""
        return {"model_name": self.name, "model_version": self.version, "run_id": self.run_id}


@dataclass
class PromotionDecision:
    """What the promotion gate decided and why; ``reason`` is meant to be printed as is."""

    promoted: bool
    reason: str
    previous_version: str | None = None
    previous_value: float | None = None
    alias: str = "champion"
    metric: str | None = None
    value: float | None = None
    forced: bool = False


@dataclass
class RegisterResult:
    """A new registered version and the gate's decision about it."""

    name: str
    version: str
    run_id: str
    source: str
    checkpoint: str
    decision: PromotionDecision
    metrics: dict[str, float] = field(default_factory=dict)
    fingerprint: str | None = None
    eval_run_id: str | None = None

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    @property
    def alias_uri(self) -> str:
        return f"models:/{self.name}@{self.decision.alias}"

    def summary(self) -> str:
        shown = "  ".join(f"{k}={v:.4f}" for k, v in sorted(self.metrics.items())) or "(none)"
        verdict = f"promoted to @{self.decision.alias}" if self.decision.promoted else f"not promoted to @{self.decision.alias}"
        lines = [
            f"Registered '{self.name}' version {self.version}",
            f"  URI:        {self.uri}",
            f"  checkpoint: {self.checkpoint}",
            f"  MLflow run: {self.run_id}" + (f" (evaluation run {self.eval_run_id})" if self.eval_run_id else ""),
            f"  metrics:    {shown}",
            f"  promotion:  {verdict}: {self.decision.reason}",
        ]
        if self.decision.promoted:
            lines.append(f"  serve it:   raypipe serve {self.alias_uri}")
        return "\n".join(lines)


# --------------------------------------------------------------------------- stores and clients


def default_tracking_uri() -> str:
    """Where a bare ``models:/`` URI is looked up: $MLFLOW_TRACKING_URI, else raypipe's default
    store (``sqlite:///raypipe-work/mlflow.db`` under the current dir), the same place a config
    with default settings writes to."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    from raypipe.config import RaypipeConfig

    return RaypipeConfig().resolved_tracking_uri


def _sqlite_file(uri: str) -> Path | None:
    if uri.startswith("sqlite:///"):
        return Path(uri.removeprefix("sqlite:///"))
    return None


def _store_missing(uri: str) -> bool:
    db = _sqlite_file(uri)
    return db is not None and not db.is_file()


def _client(tracking_uri: str) -> Any:
    """A client on an existing store. Opening a sqlite URI creates an empty database, which
    would turn a typo in a path into a silent "model not found"; refuse instead."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    if _store_missing(tracking_uri):
        raise RegistryError(
            f"no MLflow store at {_sqlite_file(tracking_uri)}: nothing has been registered there. "
            "Pass the config used to register (--config), or set MLFLOW_TRACKING_URI / "
            "tracking.tracking_uri to the store that holds the model."
        )
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def _is_not_found(exc: Exception) -> bool:
    return getattr(exc, "error_code", None) == "RESOURCE_DOES_NOT_EXIST"


def _mlflow_error(action: str, tracking_uri: str, exc: Exception) -> RegistryError:
    from raypipe.tracking import redact_uri

    msg = getattr(exc, "message", None) or str(exc)
    return RegistryError(f"{action} failed on the MLflow store {redact_uri(tracking_uri)}: {msg}")


def _all_registered_models(client: Any) -> Iterator[Any]:
    token = None
    while True:
        page = client.search_registered_models(max_results=200, page_token=token)
        yield from page
        token = page.token
        if not token:
            return


def _versions(client: Any, name: str) -> list[Any]:
    quoted = name.replace("'", "\\'")
    found = list(client.search_model_versions(f"name='{quoted}'"))
    return sorted(found, key=lambda mv: int(mv.version), reverse=True)


def _registered_model(client: Any, name: str) -> Any:
    """The registered model, or a RegistryError naming the models that do exist."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException as exc:
        if not _is_not_found(exc):
            raise
    names = sorted(rm.name for rm in _all_registered_models(client))
    known = ", ".join(names[:20]) + (" ..." if len(names) > 20 else "") if names else "none yet"
    raise RegistryError(
        f"no registered model named '{name}'; registered models: {known}. "
        "Register one with `raypipe register <checkpoint>`."
    ) from None


def check_model_name(name: str) -> str:
    """MLflow's own rules, checked up front so a bad name fails before anything is written."""
    if not isinstance(name, str) or not name.strip():
        raise RegistryError("registered model name must not be empty (registry.model_name or --name)")
    if any(c in name for c in "/:@") or name != name.strip():
        raise RegistryError(
            f"registered model name '{name}' may not contain '/', ':' or '@' or surrounding spaces "
            "(they would make models:/ URIs ambiguous)"
        )
    return name


# --------------------------------------------------------------------------- resolve


def parse_models_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/name@alias`` -> (name, alias, None); ``models:/name/3`` -> (name, None, "3")."""
    m = _MODELS_URI.match(uri)
    if not m:
        raise RegistryError(f"cannot parse model URI '{uri}': {_URI_HELP}")
    version = m.group("version")
    if version is not None and not (version.isdigit() or version == "latest"):
        raise RegistryError(
            f"'{uri}': version '{version}' is not a number; {_URI_HELP} "
            "(stages like 'Production' are deprecated in MLflow; use an alias such as @champion)"
        )
    return m.group("name"), m.group("alias"), version


def _find_version(client: Any, name: str, alias: str | None, version: str | None) -> Any:
    from mlflow.exceptions import MlflowException

    rm = _registered_model(client, name)
    if alias is not None:
        aliases = dict(getattr(rm, "aliases", {}) or {})
        if alias not in aliases:
            have = ", ".join(f"@{a} -> v{v}" for a, v in sorted(aliases.items())) or "none"
            raise RegistryError(
                f"model '{name}' has no alias '@{alias}'; its aliases: {have}. "
                f"Use models:/{name}/VERSION, or register a checkpoint with the override "
                f"registry.alias={alias} (the promotion gate sets the alias)."
            )
        version = str(aliases[alias])
    versions = _versions(client, name)
    if not versions:
        raise RegistryError(f"model '{name}' has no versions yet; register a checkpoint first")
    if version == "latest":
        return versions[0]
    try:
        return client.get_model_version(name, str(version))
    except MlflowException as exc:
        if not _is_not_found(exc):
            raise
    have = ", ".join(str(mv.version) for mv in versions)
    raise RegistryError(f"model '{name}' has no version {version}; its versions: {have}") from None


def cache_root(tracking_uri: str) -> Path:
    """Downloaded versions live next to the sqlite store (so a workdir is self-contained and a
    test's tmp dir cleans up after itself); for remote stores in the user cache dir.
    ``$RAYPIPE_MODEL_CACHE`` overrides both (e.g. a fast local disk on a Serve node)."""
    if os.environ.get(_CACHE_ENV):
        return Path(os.environ[_CACHE_ENV]).expanduser()
    db = _sqlite_file(tracking_uri)
    if db is not None:
        return db.resolve().parent / "model-cache"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "raypipe" / "models"


def _checkpoint_subpath(mlmodel_file: Path) -> str:
    """Where the pyfunc keeps the checkpoint, read from MLmodel rather than assumed, so a model
    saved by a later raypipe with a different artifact layout still resolves."""
    import yaml

    try:
        doc = yaml.safe_load(mlmodel_file.read_text(encoding="utf-8")) or {}
        return str(doc["flavors"]["python_function"]["artifacts"]["checkpoint"]["path"])
    except (KeyError, TypeError, yaml.YAMLError):
        return ""


def _artifact_source(mv: Any, tracking_uri: str) -> str:
    """Where a version's files are: a LoggedModel's artifact location (``models:/<model id>``
    sources, MLflow 3) or the run artifact folder older versions point at."""
    source = str(mv.source).rstrip("/")
    model_id = getattr(mv, "model_id", None) or (source.removeprefix("models:/") if source.startswith("models:/m-") else None)
    if source.startswith("models:/") and model_id:
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=tracking_uri).get_logged_model(model_id).artifact_location.rstrip("/")
    return source


def _download(mv: Any, tracking_uri: str) -> Path:
    """Fetch a version's checkpoint once; later calls (and other Serve replicas on the node)
    reuse it. The cache key includes the store and the version's source, so a re-created store
    whose "version 1" is a different model never gets a stale copy. Downloads land in a private
    temp dir and are renamed into place, so a half-finished download is never seen as complete."""
    import mlflow.artifacts

    from raypipe.model import META_FILE, read_meta

    key = hashlib.sha256(f"{tracking_uri}|{mv.name}|{mv.version}|{mv.source}|{mv.run_id}".encode()).hexdigest()[:12]
    safe_name = re.sub(r"[^A-Za-z0-9._-]", "_", mv.name)
    root = cache_root(tracking_uri) / safe_name
    final = root / f"v{mv.version}-{key}"
    checkpoint = final / "checkpoint"
    if (checkpoint / META_FILE).is_file():
        return checkpoint
    root.mkdir(parents=True, exist_ok=True)
    staging = root / f".download-{uuid.uuid4().hex}"
    source = _artifact_source(mv, tracking_uri)
    try:
        staging.mkdir()
        try:
            mlmodel = mlflow.artifacts.download_artifacts(
                artifact_uri=f"{source}/MLmodel", dst_path=str(staging / "meta"), tracking_uri=tracking_uri
            )
        except Exception as exc:  # noqa: BLE001 - any failure means the same thing to the user
            raise RegistryError(
                f"version {mv.version} of '{mv.name}' (source {source}) has no readable MLmodel file: "
                f"it was not registered by raypipe, or its artifacts are gone ({exc})"
            ) from None
        sub = _checkpoint_subpath(Path(mlmodel))
        if not sub:
            raise RegistryError(
                f"version {mv.version} of '{mv.name}' is not a raypipe model: its MLmodel has no "
                "'checkpoint' artifact (register checkpoints with `raypipe register`)"
            )
        try:
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=f"{source}/{sub}", dst_path=str(staging / "dl"), tracking_uri=tracking_uri
            )
        except Exception as exc:  # noqa: BLE001
            raise RegistryError(f"cannot download the checkpoint of '{mv.name}' v{mv.version}: {exc}") from None
        try:
            read_meta(local)
        except CheckpointError as exc:
            raise RegistryError(f"'{mv.name}' v{mv.version} holds a broken checkpoint: {exc}") from None
        (staging / "out").mkdir()
        if Path(local).resolve().is_relative_to(staging.resolve()):
            shutil.move(local, staging / "out" / "checkpoint")
        else:  # an artifact repo may hand back its own local files: never move those
            shutil.copytree(local, staging / "out" / "checkpoint")
        try:
            os.rename(staging / "out", final)
        except OSError:
            if not (checkpoint / META_FILE).is_file():  # not a lost race with another process
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return checkpoint


def resolve(uri: str | os.PathLike[str], tracking_uri: str | None = None) -> ResolvedModel:
    """A checkpoint dir as is, or a ``models:/`` URI downloaded (once) to a local checkpoint dir.

    ``tracking_uri`` defaults to :func:`default_tracking_uri`; pass the config's
    ``resolved_tracking_uri`` so the CLI and the library look in the same store.
    """
    from raypipe.model import read_meta

    text = os.fspath(uri)
    if not text.startswith("models:/"):
        if "://" in text or text.startswith(("models:", "runs:")):
            raise RegistryError(f"unsupported model URI '{text}': {_URI_HELP}")
        path = Path(text).expanduser()
        if not path.is_dir():
            raise CheckpointError(f"'{text}' is not a checkpoint directory (no such directory) and not a models:/ URI")
        read_meta(path)
        return ResolvedModel(path=str(path.resolve()))
    name, alias, version = parse_models_uri(text)
    tracking_uri = tracking_uri or default_tracking_uri()
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    try:
        mv = _find_version(client, name, alias, version)
        path = _download(mv, tracking_uri)
    except MlflowException as exc:
        raise _mlflow_error(f"resolving '{text}'", tracking_uri, exc) from None
    return ResolvedModel(path=str(path), name=name, version=str(mv.version), run_id=mv.run_id, alias=alias)


def load_predictor(uri: str | os.PathLike[str], tracking_uri: str | None = None, device: str = "auto") -> Any:
    """A :class:`~raypipe.predict.Predictor` for a checkpoint dir or a ``models:/`` URI, whose
    ``meta`` names the registered model, version and run it came from."""
    from raypipe.predict import Predictor

    resolved = resolve(uri, tracking_uri=tracking_uri)
    predictor = Predictor.from_dir(resolved.path, device=device)
    if resolved.name is not None:
        predictor.meta.update(resolved.as_meta())
    return predictor


# --------------------------------------------------------------------------- promotion


def _as_float(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _alias_holder(client: Any, name: str, alias: str) -> Any:
    rm = client.get_registered_model(name)
    version = (getattr(rm, "aliases", {}) or {}).get(alias)
    return client.get_model_version(name, str(version)) if version is not None else None


def alias_lock(tracking_uri: str, name: str, alias: str, timeout_s: float = 600.0) -> Any:
    """Serialises promotions to one alias on one store. A file lock next to a sqlite (or file)
    store covers every process on the machine; a tracking server has no lock to take, so
    :func:`promote` also re-checks the alias before and after moving it (compare-and-set)."""
    from contextlib import nullcontext

    db = _sqlite_file(tracking_uri)
    if db is None and tracking_uri.startswith("file:"):
        db = Path(tracking_uri.removeprefix("file://").removeprefix("file:")) / "registry"
    if db is None:
        return nullcontext()
    from filelock import FileLock

    key = hashlib.sha256(f"{name}@{alias}".encode()).hexdigest()[:12]
    db.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(db.parent / f".{db.name}.alias-{key}.lock"), timeout=timeout_s)


def promote(
    client: Any,
    name: str,
    version: str | int,
    metric_name: str,
    value: float | None,
    alias: str = "champion",
    min_improvement: float = 0.0,
    force: bool = False,
    fingerprint: str | None = None,
    rescore: Any = None,
) -> PromotionDecision:
    """Move ``alias`` to ``version`` only if it beats the current holder on ``metric_name``
    (higher for scores, lower for losses and errors such as ``test_rmse``).

    The holder's score is read from its own version tag, so the comparison survives restarts and
    works for versions registered by other machines. A holder without that tag cannot be compared
    and is kept (the safe choice); ``force`` moves the alias regardless. The decision is tagged
    on the version so ``raypipe models`` and the MLflow UI show why a version is (not) serving.

    Like with like: when the holder was tested on other data than the challenger (their
    ``raypipe.data_fingerprint`` tags differ), its score is not comparable. ``rescore(version)``
    (given by :func:`raypipe.registration.run`) re-evaluates the holder on the challenger's test
    split and returns ``(value, fingerprint)``; without it, or when that fails, the gate refuses
    and says why.

    Two registrations racing for the alias: hold :func:`alias_lock` around the call; in addition
    the holder is re-read just before the alias moves (a changed holder means deciding again) and
    the alias is read back after (a lost race is reported as not promoted).
    """
    version = str(version)
    value = _as_float(value)
    if value is not None:
        client.set_model_version_tag(name, version, metric_name, repr(value))
    for _attempt in range(5):
        holder = _alias_holder(client, name, alias)
        promoted, reason, prev_version, prev_value = _decide(
            client, name, version, metric_name, value, alias, min_improvement, force, holder, fingerprint, rescore
        )
        if not (promoted and prev_version != version):
            break
        now = _alias_holder(client, name, alias)
        if (str(now.version) if now is not None else None) != prev_version:
            continue  # someone moved the alias while we decided: decide again against the new holder
        client.set_registered_model_alias(name, alias, version)
        after = _alias_holder(client, name, alias)
        if after is None or str(after.version) != version:
            promoted, reason = False, (
                f"lost the race for @{alias}: another registration moved it to "
                f"v{after.version if after is not None else '?'} at the same time; @{alias} is not on v{version}"
            )
        break
    else:
        promoted, reason = False, f"@{alias} kept moving while v{version} was gated; try again"
    client.set_model_version_tag(name, version, TAG_PROMOTION, "promoted" if promoted else "rejected")
    client.set_model_version_tag(name, version, TAG_PROMOTION_REASON, reason)
    return PromotionDecision(
        promoted=promoted,
        reason=reason,
        previous_version=prev_version,
        previous_value=prev_value,
        alias=alias,
        metric=metric_name,
        value=value,
        forced=force and promoted and prev_version != version,
    )


def _decide(client: Any, name: str, version: str, metric_name: str, value: float | None, alias: str,
            min_improvement: float, force: bool, holder: Any, fingerprint: str | None,
            rescore: Any) -> tuple[bool, str, str | None, float | None]:
    from raypipe.tasks import direction

    lower = direction(metric_name) == "min"
    prev_version = str(holder.version) if holder is not None else None
    prev_value = _as_float(holder.tags.get(metric_name)) if holder is not None else None
    note = ""
    holder_fp = (holder.tags or {}).get(TAG_FINGERPRINT) if holder is not None else None
    if (holder is not None and prev_version != version and not force and value is not None
            and fingerprint and holder_fp and holder_fp != str(fingerprint)):
        rescored = None
        if rescore is not None:
            try:
                rescored = rescore(prev_version)
            except Exception as exc:  # noqa: BLE001 - reported in the reason
                note = f" ({type(exc).__name__}: {str(exc)[:200]})"
        if rescored is None or rescored[1] != str(fingerprint):
            return False, (
                f"cannot compare with @{alias} v{prev_version}: it was tested on other data (fingerprint "
                f"{holder_fp[:12]}, this version {str(fingerprint)[:12]}) and could not be re-evaluated on this "
                f"version's test split{note}; @{alias} unchanged. Use --force to promote anyway."
            ), prev_version, prev_value
        prev_value = float(rescored[0])
        note = f" (v{prev_version} re-evaluated on this test split, fingerprint {str(fingerprint)[:12]})"
    prev_text = (
        f"v{prev_version} ({metric_name}={prev_value:.4f})" if prev_value is not None else f"v{prev_version}"
    ) if holder is not None else "no previous holder"
    value_text = f"{metric_name}={value:.4f}" if value is not None else f"no {metric_name}"

    if prev_version == version:
        return True, f"v{version} already holds @{alias}", prev_version, prev_value
    if force:
        return True, f"forced: @{alias} moved to v{version} ({value_text}); was {prev_text}", prev_version, prev_value
    if value is None:
        return False, (
            f"cannot gate v{version}: it has no {metric_name} (pass the metric, or set data.path so "
            f"it is evaluated on the test split); @{alias} unchanged ({prev_text}). "
            "Use --force to promote anyway."
        ), prev_version, prev_value
    if holder is None:
        return True, f"no version held @{alias}; v{version} ({value_text}) takes it", prev_version, prev_value
    if prev_value is None:
        return False, (
            f"@{alias} holder v{prev_version} has no {metric_name} tag to compare against, so it is "
            f"kept; evaluate it or use --force"
        ), prev_version, prev_value
    if (prev_value - value if lower else value - prev_value) > min_improvement:
        return True, (
            f"{metric_name} {value:.4f} beats @{alias} v{prev_version} ({prev_value:.4f}) by "
            f"{value - prev_value:+.4f} (needed {'<' if lower else '>'} {-min_improvement if lower else min_improvement:g})"
            + note
        ), prev_version, prev_value
    return False, (
        f"{metric_name} {value:.4f} does not beat @{alias} v{prev_version} ({prev_value:.4f}) by "
        f"more than {min_improvement:g} ({'lower' if lower else 'higher'} is better); "
        f"@{alias} stays on v{prev_version}" + note
    ), prev_version, prev_value


# --------------------------------------------------------------------------- register


def _log_model(client: Any, cfg: Any, run_id: str, model_dir: str | os.PathLike[str], *, meta: dict[str, Any],
               metrics: dict[str, float], fingerprint: str | None) -> str:
    """The pyfunc as an MLflow 3 LoggedModel of ``run_id`` (the Models tab of the run and the
    experiment): created with the model's name, its files uploaded to the model's own artifact
    location, its MLmodel naming the model id, output of the run, the test metrics linked to it
    (and to the test split's dataset), READY. Returns the model id.

    The client API rather than ``mlflow.pyfunc.log_model(name=...)``: that one reads the fluent
    tracking URI and experiment, which a notebook or a pipeline may hold for something else."""
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus
    from mlflow.models import Model

    from raypipe.tracking import dataset_digest

    run = client.get_run(run_id)
    logged = client.create_logged_model(
        run.info.experiment_id,
        name=MODEL_ARTIFACT_PATH,
        source_run_id=run_id,
        params={k: v for k, v in run.data.params.items()} or None,
        tags={TAG_TASK: meta["task"], **({TAG_FINGERPRINT: str(fingerprint)} if fingerprint else {})},
        model_type=f"raypipe-{meta['task']}",
    )
    model_id = logged.model_id
    mlmodel = Path(model_dir) / "MLmodel"
    doc = Model.load(str(mlmodel))
    doc.model_id, doc.run_id, doc.artifact_path, doc.model_uuid = model_id, run_id, logged.artifact_location, model_id
    doc.save(str(mlmodel))
    client.log_model_artifacts(model_id, str(model_dir))
    client.log_outputs(run_id, models=[LoggedModelOutput(model_id, step=0)])
    link = {"dataset_name": f"{cfg.name}-test", "dataset_digest": dataset_digest(fingerprint)} if fingerprint else {}
    for key, value in metrics.items():
        client.log_metric(run_id, key, value, model_id=model_id, **link)
    client.finalize_logged_model(model_id, LoggedModelStatus.READY)
    return model_id


def clean_metrics(metrics: dict[str, Any] | None) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in (metrics or {}).items():
        if value is None:
            continue
        number = _as_float(value)
        if number is None or number != number:
            raise RegistryError(f"metric '{key}' must be a number, got {value!r}")
        out[str(key)] = number
    return out


def check_task(cfg: Any, name: str, task: str) -> None:
    """A registered model holds one kind of model: a regression version must not take the alias
    of a classifier (clients of ``models:/name@champion`` expect one answer shape)."""
    uri = cfg.resolved_tracking_uri
    if _store_missing(uri):
        return
    client = _client(uri)
    for mv in _versions(client, name)[:1]:
        other = (mv.tags or {}).get(TAG_TASK, "classification")
        if other != task:
            raise RegistryError(
                f"registered model '{name}' holds {other} models (version {mv.version}); this checkpoint is "
                f"a {task} model. Register it under another name (registry.model_name or --name)."
            )


def add_version(
    cfg: Any,
    name: str,
    model_dir: str | os.PathLike[str],
    *,
    checkpoint: str,
    meta: dict[str, Any],
    metrics: dict[str, float],
    force: bool = False,
    source_run_id: str | None = None,
    fingerprint: str | None = None,
    eval_run_id: str | None = None,
    data_checks: dict[str, Any] | None = None,
    rescore: Any = None,
) -> RegisterResult:
    """Log ``model_dir`` (an MLflow model dir) as a LoggedModel of the source run (or of a new
    "register" run), create a version of ``name`` from it, tag it, and run the promotion gate
    (``rescore``: see :func:`promote`)."""
    from mlflow.exceptions import MlflowException

    from raypipe import __version__
    from raypipe.tracking import configure, version_tags

    uri = cfg.resolved_tracking_uri
    try:
        client, experiment_id = configure(cfg)
        if source_run_id is not None:
            try:
                client.get_run(source_run_id)
            except MlflowException:
                raise RegistryError(f"source run '{source_run_id}' does not exist in the MLflow store {uri}") from None
    except MlflowException as exc:
        raise _mlflow_error("opening the registry", uri, exc) from None

    own_run = source_run_id is None
    run_id: str | None = source_run_id
    model_id: str | None = None
    created_model = False
    version: str | None = None
    gate = cfg.registry.promotion_metric
    try:
        if own_run:
            run = client.create_run(
                experiment_id,
                run_name=f"{cfg.name}-register",
                tags={**version_tags(cfg, fingerprint), "raypipe.stage": "register", TAG_CHECKPOINT: checkpoint},
            )
            run_id = run.info.run_id
        model_id = _log_model(client, cfg, run_id, model_dir, meta=meta, metrics=metrics, fingerprint=fingerprint)
        source = f"models:/{model_id}"
        try:
            client.create_registered_model(name, description=f"{meta['task']} model registered by raypipe.")
            created_model = True
        except MlflowException as exc:
            if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
                raise
        labels = meta["schema"].get("labels")
        tags = {
            TAG_SOURCE_RUN: run_id,
            TAG_RAYPIPE_VERSION: __version__,
            TAG_CHECKPOINT: checkpoint,
            TAG_TASK: meta["task"],
            **({TAG_LABELS: ",".join(map(str, labels))[:5000]} if labels else {}),
            **{k: repr(v) for k, v in metrics.items() if k.startswith("test_") and k != "test_loss"},
        }
        if fingerprint:
            tags[TAG_FINGERPRINT] = str(fingerprint)
        peft = meta.get("peft")
        if peft:  # the version holds the adapter only; say what it needs to run
            base = peft.get("base") or {}
            tags[TAG_PEFT] = f"{peft.get('method', 'lora')} r={peft.get('r')}"
            tags[TAG_BASE_MODEL] = str(base.get("name")) + (f"@{base['revision']}" if base.get("revision") else "")
            tags[TAG_BASE_FINGERPRINT] = str(base.get("fingerprint"))
        if eval_run_id:
            tags[TAG_EVAL_RUN] = eval_run_id
        if data_checks:  # what the test score is worth: how much of the test set training saw
            tags["raypipe.data.test_in_train"] = f"{data_checks['test_in_train']}/{data_checks['rows']['test']}"
            tags["raypipe.data.dedupe"] = str(data_checks["dedupe"])
            if data_checks.get("test_overlap_warning"):  # above data.test_overlap_threshold
                tags["raypipe.data.test_overlap_warning"] = f"{data_checks['test_overlap_share']:.1%} of the test set occurs in training"
        mv = client.create_model_version(name, source=source, run_id=run_id, tags=tags, model_id=model_id)
        version = str(mv.version)
        client.set_logged_model_tags(model_id, {"mlflow.modelVersions": json.dumps([{"name": name, "version": version}])})
        client.set_tag(run_id, "raypipe.registered_as", f"models:/{name}/{version}")
        with alias_lock(uri, name, cfg.registry.alias):
            decision = promote(
                client,
                name,
                version,
                gate,
                metrics.get(gate),
                alias=cfg.registry.alias,
                min_improvement=cfg.registry.min_improvement,
                force=force,
                fingerprint=fingerprint,
                rescore=rescore,
            )
    except BaseException as exc:
        if own_run and run_id is not None:
            _quietly(client.set_terminated, run_id, "FAILED")
        if created_model and version is None:
            _quietly(client.delete_registered_model, name)  # leave no empty model behind
        if model_id is not None and version is None:
            _quietly(client.finalize_logged_model, model_id, "FAILED")
        if isinstance(exc, MlflowException):
            raise _mlflow_error(f"registering '{name}'", uri, exc) from None
        raise
    if own_run:
        client.set_terminated(run_id, "FINISHED")
    return RegisterResult(
        name=name,
        version=version,
        run_id=run_id,
        source=source,
        checkpoint=checkpoint,
        decision=decision,
        metrics=metrics,
        fingerprint=fingerprint,
        eval_run_id=eval_run_id,
    )


def _quietly(fn: Any, *args: Any) -> None:
    """Cleanup after a failure must not hide the failure itself."""
    try:
        fn(*args)
    except Exception:  # noqa: BLE001
        pass


# --------------------------------------------------------------------------- list


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths)), *(fmt.format(*r) for r in rows)]
    return "\n".join(line.rstrip() for line in lines)


def list_models(cfg: Any, name: str | None = None, missing_ok: bool = True) -> str:
    """A table of registered versions: aliases, gate metrics, promotion decision, source run.

    A missing store is a friendly note, or with ``missing_ok=False`` (the CLI) a RegistryError.
    """
    from mlflow.exceptions import MlflowException

    from raypipe.tracking import redact_uri

    uri = cfg.resolved_tracking_uri
    if _store_missing(uri) and missing_ok:
        return (
            f"No registered models: there is no MLflow store at {_sqlite_file(uri)} yet.\n"
            "Register a checkpoint with `raypipe register <checkpoint dir> --config <config>`."
        )
    if name is not None:
        check_model_name(name)
    client = _client(uri)
    try:
        models = [_registered_model(client, name)] if name else sorted(_all_registered_models(client), key=lambda m: m.name)
        rows = []
        versions = {rm.name: _versions(client, rm.name) for rm in models}
        # One column per test metric any listed version carries, in the order tasks report them.
        tagged = {k for vs in versions.values() for mv in vs for k in (mv.tags or {}) if k.startswith("test_")}
        metric_cols = sorted(tagged, key=lambda k: (_metric_order(k), k))
        for rm in models:
            by_version: dict[str, list[str]] = {}
            for alias, v in (getattr(rm, "aliases", {}) or {}).items():
                by_version.setdefault(str(v), []).append(f"@{alias}")
            for mv in versions[rm.name]:
                tags = mv.tags or {}
                created = datetime.fromtimestamp(mv.creation_timestamp / 1000).strftime("%Y-%m-%d %H:%M")
                rows.append(
                    [
                        rm.name,
                        str(mv.version),
                        " ".join(sorted(by_version.get(str(mv.version), []))) or "-",
                        *(_fmt_metric(tags.get(k)) for k in metric_cols),
                        tags.get(TAG_PROMOTION, "-"),
                        tags.get(TAG_TASK, "classification"),
                        mv.run_id or "-",
                        created,
                    ]
                )
    except MlflowException as exc:
        raise _mlflow_error("listing models", uri, exc) from None
    if not rows:
        return f"No registered models in {redact_uri(uri)}."
    table = _table(["MODEL", "VERSION", "ALIASES", *metric_cols, "PROMOTION", "TASK", "SOURCE RUN", "CREATED"], rows)
    return f"{table}\n\nStore: {redact_uri(uri)}   Use models:/NAME/VERSION or models:/NAME@ALIAS."


def _metric_order(key: str) -> int:
    from raypipe import tasks

    base = tasks.strip_split(key)
    for name in tasks.names():
        order = list(tasks.get(name).metrics)
        if base in order:
            return order.index(base)
    return len(key)


def _fmt_metric(value: Any) -> str:
    number = _as_float(value)
    return f"{number:.4f}" if number is not None else "-"


__all__ = [
    "PromotionDecision",
    "RegisterResult",
    "ResolvedModel",
    "cache_root",
    "check_model_name",
    "default_tracking_uri",
    "list_models",
    "parse_models_uri",
    "add_version",
    "load_predictor",
    "promote",
    "resolve",
]
