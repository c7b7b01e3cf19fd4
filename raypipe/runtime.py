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
    one), so the same code works on a laptop, under ``ray job submit`` and on ``ray up`` clusters,
    except that an address nothing answers at is never joined (see the README's ``ray.address``).
    Returns True when this call connected (so the caller owns the shutdown).
    """
    from raypipe import console

    console.quiet_libraries()  # before Ray starts: its env (progress bars) and console handlers
    import ray

    if ray.is_initialized():
        return False
    env = {**WORKER_ENV, **console.worker_env()}
    for k, v in env.items():
        os.environ.setdefault(k, v)
    kwargs: dict[str, Any] = {"address": cfg.ray.address, "runtime_env": {"env_vars": env},
                              **console.ray_init_kwargs()}
    # address "local" always starts a new local Ray, so the options for a new one apply to it.
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address and address not in ("local", "auto") and not _answers(address):
        where = "ray.address" if cfg.ray.address else "$RAY_ADDRESS"
        raise ConfigError(
            f"{where} is {address}, but no Ray cluster answers there (is it up? `ray status "
            f"--address {address}`); set ray.address: local (or unset both) to start a local Ray"
        )
    if not address:
        # Ray would join the last cluster `ray start` wrote down on this machine, even one that
        # was killed since; it then retries a dead GCS for ever. Start a fresh local Ray instead.
        last = _last_local_cluster()
        if last and not _answers(last):
            print(f"[raypipe] the Ray cluster last started on this machine ({last}) no longer answers; "
                  "starting a new local Ray (ray.address names another one to join)")
            kwargs["address"] = "local"
    joining = bool(address) and address != "local"
    if not joining:
        kwargs.update(
            num_cpus=cfg.ray.num_cpus,
            include_dashboard=cfg.ray.include_dashboard,
            dashboard_host=cfg.ray.dashboard_host,
        )
    with console.starting_ray(new_cluster=not joining):
        ctx = ray.init(**kwargs)
    console.quiet_ray(cfg.workdir_path, cfg.name)  # workers' output to the log file, not the console
    url = getattr(ctx, "dashboard_url", None)
    resources = ray.cluster_resources()
    print(
        f"[raypipe] Ray ready: {int(resources.get('CPU', 0))} CPU, {int(resources.get('GPU', 0))} GPU"
        + (f"; dashboard http://{url}" if url else "")
    )
    return True


def _last_local_cluster() -> str | None:
    """The GCS address in Ray's current-cluster file (written by ``ray start``), if any."""
    try:
        from ray._private.utils import read_ray_address  # private; absent means: leave it to Ray

        return read_ray_address()
    except Exception:  # noqa: BLE001
        return None


def _answers(address: str, timeout_s: float = 2.0) -> bool:
    """Whether something accepts a TCP connection at ``host:port`` (Ray's GCS). Addresses that
    are not host:port (``ray://``, ``auto``) are left to Ray."""
    import socket

    if "://" in address or ":" not in address:
        return True
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return True
    except (OSError, ValueError):
        return False


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


def auto_cpus_per_worker(workers: int, node_cpus: list[float], overhead: float = 0.0) -> float:
    """The most whole CPUs per worker with which ``workers`` workers still fit onto nodes with
    ``node_cpus`` CPUs (a worker cannot span nodes), at least 1; less ``overhead`` when something
    else takes that much beside each worker (a sweep's trial driver). The worker loop gives torch
    ``round(cpus)`` threads, so 1.99 CPU still means 2 threads."""
    workers = max(workers, 1)
    for c in range(int(max(node_cpus, default=1)), 1, -1):
        if sum(int(n // c) for n in node_cpus) >= workers:
            return c - overhead
    return 1.0 - overhead


def node_cpus() -> list[float]:
    import ray

    return [float(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")]


def cpus_per_worker(cfg: Any) -> float:
    """``scaling.cpus_per_worker`` as a number (``auto`` resolved against the running cluster)."""
    v = cfg.scaling.cpus_per_worker
    if v != "auto":
        return float(v)
    return auto_cpus_per_worker(max(cfg.scaling.num_workers, 1), node_cpus())


def worker_resources(cfg: Any, use_gpu: bool) -> dict[str, float]:
    res = {"CPU": cpus_per_worker(cfg)}
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
    per_worker = cpus_per_worker(cfg)
    need_cpu = cfg.scaling.num_workers * per_worker + extra_cpu
    if need_cpu > total.get("CPU", 0):
        raise ConfigError(
            f"scaling: {cfg.scaling.num_workers} worker(s) x {per_worker:g} CPU"
            f"{f' + {extra_cpu} for the trial driver' if extra_cpu else ''} = {need_cpu:g} CPU, but the "
            f"cluster has {total.get('CPU', 0):g}; lower scaling.cpus_per_worker or num_workers"
        )
