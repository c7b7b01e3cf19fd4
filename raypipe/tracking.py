"""MLflow: where runs go, what they are tagged with, and what never gets logged (secrets).

The training-run logger (a Ray Train ``UserCallback``) lives here too; Tune trials are logged by
Ray's own ``MLflowLoggerCallback`` (see ``raypipe.tuning``), configured with the same helpers.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

SECRET_KEY = re.compile(r"(token|password|passwd|secret|api[_-]?key|credential)", re.I)
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
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    if exp is None:
        exp_id = client.create_experiment(
            cfg.tracking.experiment, artifact_location=cfg.resolved_artifact_location
        )
    else:
        exp_id = exp.experiment_id
    return client, exp_id


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
    if fingerprint:
        tags["data.fingerprint"] = fingerprint
    return tags


def git_sha(cwd: str | None = None) -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def ui_hint(cfg: Any) -> str:
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

        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            if metrics and metrics[0]:
                self.logger.log(metrics[0])  # rank 0's metrics are the run's metrics

        def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
            self.failures += 1
            first = next(iter(worker_exceptions.values()), None)
            client = self.logger._client()
            client.set_tag(run_id, "raypipe.worker_failures", str(self.failures))
            client.set_tag(run_id, "raypipe.last_worker_error", repr(first)[:4000])

    return MLflowEpochCallback()
