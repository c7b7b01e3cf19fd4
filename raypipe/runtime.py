"""Joining or starting Ray, and fitting a run's resource request to what the cluster has."""

from __future__ import annotations

import logging
import os
from typing import Any

from raypipe.errors import ConfigError

log = logging.getLogger("raypipe")

WORKER_ENV = {
    "TOKENIZERS_PARALLELISM": "false",  # tokenizers' own threads fight torch's on small hosts
    "MLFLOW_DISABLE_TELEMETRY": "true",
    # Train V2 routes worker print() through a logger *and* the raw stream, so every progress
    # line reached the driver twice; plain stdout is forwarded by Ray exactly once.
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
}


def ensure_ray(cfg: Any) -> bool:
    """Use the Ray that is already initialised, else join/start one as ``cfg.ray`` says.

    Address resolution is Ray's own (``$RAY_ADDRESS``, then a running local cluster, then a new
    one), so the same code works on a laptop, under ``ray job submit`` and on ``ray up`` clusters.
    Returns True when this call connected (so the caller owns the shutdown).
    """
    import ray

    if ray.is_initialized():
        return False
    for k, v in WORKER_ENV.items():
        os.environ.setdefault(k, v)
    kwargs: dict[str, Any] = {"address": cfg.ray.address, "runtime_env": {"env_vars": dict(WORKER_ENV)}}
    # address "local" always starts a new local Ray, so the options for a new one apply to it.
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    joining = bool(address) and address != "local"
    if not joining:
        kwargs.update(
            num_cpus=cfg.ray.num_cpus,
            include_dashboard=cfg.ray.include_dashboard,
            dashboard_host=cfg.ray.dashboard_host,
        )
    ctx = ray.init(**kwargs)
    url = getattr(ctx, "dashboard_url", None)
    resources = ray.cluster_resources()
    print(
        f"[raypipe] Ray ready: {int(resources.get('CPU', 0))} CPU, {int(resources.get('GPU', 0))} GPU"
        + (f"; dashboard http://{url}" if url else "")
    )
    return True


def resolve_use_gpu(cfg: Any) -> bool:
    """``auto`` -> whether the cluster has a GPU; ``true`` without one fails fast (Ray would
    otherwise wait forever for a GPU that never comes)."""
    import ray

    gpus = ray.cluster_resources().get("GPU", 0)
    want = cfg.scaling.use_gpu
    if want == "auto":
        return gpus > 0
    if want and gpus <= 0 and not cfg.scaling.wait_for_resources:
        raise ConfigError(
            "scaling.use_gpu: true, but the Ray cluster has no GPU (use auto or false; on an "
            "autoscaling cluster set scaling.wait_for_resources: true)"
        )
    return bool(want)


def worker_resources(cfg: Any, use_gpu: bool) -> dict[str, float]:
    res = {"CPU": cfg.scaling.cpus_per_worker}
    if use_gpu:
        res["GPU"] = cfg.scaling.gpus_per_worker
    return res


def check_fits(cfg: Any, use_gpu: bool, extra_cpu: float = 0.0) -> None:
    """Fail fast when the workers cannot be placed on the cluster as it is now (Ray would wait
    forever), unless ``scaling.wait_for_resources`` says more nodes are on their way."""
    import ray

    if cfg.scaling.wait_for_resources:
        return
    total = ray.cluster_resources()
    need_cpu = cfg.scaling.num_workers * cfg.scaling.cpus_per_worker + extra_cpu
    if need_cpu > total.get("CPU", 0):
        raise ConfigError(
            f"scaling: {cfg.scaling.num_workers} worker(s) x {cfg.scaling.cpus_per_worker} CPU"
            f"{f' + {extra_cpu} for the trial driver' if extra_cpu else ''} = {need_cpu:g} CPU, but the "
            f"cluster has {total.get('CPU', 0):g}; lower scaling.cpus_per_worker or num_workers"
        )
