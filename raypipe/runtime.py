"""Joining or starting Ray, and fitting a run's resource request to what the cluster has."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from raypipe.errors import ConfigError

log = logging.getLogger("raypipe")

TRAIN_POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"  # Ray propagates it driver -> controller

WORKER_ENV = {
    "TOKENIZERS_PARALLELISM": "false",  # tokenizers' own threads fight torch's on small hosts
    "MLFLOW_DISABLE_TELEMETRY": "true",
    # Train V2 routes worker print() through a logger *and* the raw stream, so every progress
    # line reached the driver twice; plain stdout is forwarded by Ray exactly once.
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    # Train V2's controller looks at its workers every 2 s by default, and a worker's
    # ``report`` waits until the previous one has been collected (a queue of one): every
    # epoch and the run's start and end wait for that tick. On a tiny model an 8-epoch run
    # took 41.7 s at 2 s and 24.1 s at 0.25 s; 0.5 s costs the controller a few ms a second.
    TRAIN_POLL_ENV: "0.5",
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
    kwargs: dict[str, Any] = {"address": cfg.ray.address, "runtime_env": worker_runtime_env(),
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


def worker_runtime_env() -> dict[str, Any]:
    """The runtime env of every Ray process of a cluster raypipe starts or joins: its worker
    environment, and :func:`pin_cluster` run at the start of each worker process."""
    from raypipe import console

    return {"env_vars": {**WORKER_ENV, **console.worker_env()}, "worker_process_setup_hook": f"{__name__}.pin_cluster"}


def pin_cluster() -> None:
    """Worker-process setup hook: export the worker's own cluster as ``RAY_ADDRESS``.

    Ray's own actors look "the" cluster up again without an address — Ray Train's
    placement-group cleaner queries the State API, which scans the machine for GCS processes —
    and with a second local Ray on the machine (a notebook's, another sweep's) that lookup fails
    ("Found multiple active Ray instances"), or finds another cluster's current-cluster file,
    and the cleaner never frees a stopped run's placement group. A worker's own GCS is known.
    """
    import ray

    try:
        os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    except Exception:  # noqa: BLE001 - never fail a worker's start over this
        log.debug("raypipe: could not read the worker's GCS address", exc_info=True)


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


def free_resources() -> dict[str, float]:
    import ray

    return {k: float(v) for k, v in ray.available_resources().items() if k in ("CPU", "GPU")}


def held_by(limit: int = 6) -> str:
    """What holds the cluster's CPUs/GPUs now, in a few words: Ray's placement groups (Train and
    Tune runs) and actors (e.g. Serve replicas), largest first. Best effort: '' when unknown."""
    import ray

    holders: dict[str, float] = {}
    try:
        for pg in ray.util.placement_group_table().values():
            if pg.get("state") != "CREATED":
                continue
            cpu = sum(b.get("CPU", 0) for b in pg.get("bundles", {}).values())
            label = f"placement group {pg.get('name') or pg.get('placement_group_id', '')[:8]}"
            holders[label] = holders.get(label, 0) + cpu
    except Exception:  # noqa: BLE001
        pass
    try:
        from ray.util.state import list_actors

        gcs = ray.get_runtime_context().gcs_address
        for a in list_actors(address=gcs, filters=[("state", "=", "ALIVE")], limit=1000, timeout=10, detail=True):
            cpu = float((a.required_resources or {}).get("CPU", 0))
            if cpu and not a.placement_group_id:  # actors in a placement group are counted above
                holders[a.class_name] = holders.get(a.class_name, 0) + cpu
    except Exception:  # noqa: BLE001 - the State API needs the dashboard
        pass
    top = sorted(holders.items(), key=lambda kv: -kv[1])[:limit]
    return ", ".join(f"{name} {cpu:g} CPU" for name, cpu in top if cpu)


def room_for(per_replica: dict[str, float], count: int) -> tuple[bool, str]:
    """Whether ``count`` more actors of ``per_replica`` fit into what the cluster has free now,
    and a sentence saying what they need and what is free (and who holds the rest)."""
    free = free_resources()
    need = {k: v * count for k, v in per_replica.items() if v}
    fits = all(free.get(k, 0.0) + 1e-9 >= v for k, v in need.items())
    what = " + ".join(f"{v:g} {k}" for k, v in need.items())
    have = " + ".join(f"{free.get(k, 0.0):g} {k}" for k in need)
    held = held_by()
    noun = "the new replica needs" if count == 1 else f"the {count} new replicas need"
    return fits, f"{noun} {what}; the cluster has {have} free" + (f" (held by {held})" if held else "")


@contextmanager
def own_signal_handlers() -> Iterator[None]:
    """Give the caller back its SIGINT (and SIGUSR1) handlers after a Ray Train/Tune run.

    Ray Train's ``fit()`` installs a SIGINT handler that aborts *its* run and never removes it,
    and Ray Tune's stays until a signal arrives: after training, Ctrl-C in a notebook or in a
    ``raypipe`` process that goes on serving would call into a finished run instead of raising
    KeyboardInterrupt.
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread has (and can set) handlers
        return
    names = [n for n in ("SIGINT", "SIGUSR1") if hasattr(signal, n)]
    saved = {n: signal.getsignal(getattr(signal, n)) for n in names}
    try:
        yield
    finally:
        for n, handler in saved.items():
            if handler is not None:  # None: set from outside Python; cannot be restored
                signal.signal(getattr(signal, n), handler)


def _group_start_timeout_s() -> float:
    """Ray Train's wait for one worker group's placement (its env var, else its default)."""
    try:
        return float(os.environ.get("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "60"))
    except ValueError:
        return 60.0


def start_retries(cfg: Any) -> int:
    """Ray Train's ``controller_failure_limit`` for ``scaling.start_timeout_s``: Train waits
    for a worker group's placement a minute at a time and, by default, retries for ever."""
    import math

    if cfg.scaling.wait_for_resources:
        return -1
    return max(0, math.ceil(cfg.scaling.start_timeout_s / _group_start_timeout_s()) - 1)


def unplaced_workers(cfg: Any, exc: BaseException, use_gpu: bool) -> BaseException:
    """``exc`` in the user's words when it is Ray Train giving up on placing the workers."""
    seen, e = 0, exc
    while e is not None and seen < 10:
        if type(e).__name__ == "WorkerGroupStartupTimeoutError" or "WorkerGroupStartupTimeoutError" in str(e):
            break
        e, seen = e.__cause__ or e.__context__, seen + 1
    else:
        return exc
    if e is None:
        return exc
    _, room = room_for(worker_resources(cfg, use_gpu), cfg.scaling.num_workers)
    room = room.replace("replica", "worker")
    err = RuntimeError(
        f"the {cfg.scaling.num_workers} worker(s) could not be placed within "
        f"{cfg.scaling.start_timeout_s:g} s (scaling.start_timeout_s): {room}; free them (stop "
        "another run or Serve app), lower scaling.num_workers / cpus_per_worker, or set "
        "scaling.wait_for_resources: true on an autoscaling cluster"
    )
    err.__cause__ = exc
    return err
