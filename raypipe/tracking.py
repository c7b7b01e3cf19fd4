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


def safe_params(flat: dict[str, Any]) -> dict[str, str]:
    """Flattened config -> MLflow params with secrets removed and values as short strings."""
    out: dict[str, str] = {}
    for key, value in flat.items():
        if SECRET_KEY.search(key.rsplit(".", 1)[-1]) and not key.endswith("_env"):
            value = REDACTED
        elif isinstance(value, str) and "://" in value:
            value = redact_uri(value)
        text = str(value)
        out[key] = text if len(text) <= 6000 else text[:5997] + "..."
    return out


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
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
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
