"""Hyperparameter search on Ray Tune. Every trial *is* a training run: it calls
``raypipe.training.run`` with a Tune report callback (the Train V2 pattern), never a copy.

:func:`run` returns the sweep's :class:`TuneResult` (trials, the best trial's best checkpoint).
Evaluating that checkpoint on the held-out split and registering it is the caller's — the
pipeline and ``raypipe tune`` do it the same way as after a single training run
(:func:`raypipe.pipeline.evaluate_and_register`).
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raypipe.config import RaypipeConfig, config_from_dict, set_path
from raypipe.errors import ConfigError, TrainingError

SWEEP_FILE = "raypipe_sweep.json"
TRIAL_DRIVER_CPU = 0.01  # a trial's driver only waits on its TorchTrainer; it needs no core
# Keys whose change alters tokenisation: with any of them in the space, each trial tokenises.
_PER_TRIAL_DATA_KEYS = ("data.", "model.")


@dataclass
class TuneResult:
    sweep_name: str
    sweep_path: str
    metric: str
    mode: str
    best_trial: str | None
    best_config: dict[str, Any]
    best_value: float | None
    best_checkpoint: str | None
    trials: list[dict[str, Any]] = field(default_factory=list)
    parent_run_id: str | None = None

    @property
    def best_run_id(self) -> str | None:
        """The MLflow run of the best trial."""
        return next((t.get("mlflow_run_id") for t in self.trials if t["trial_id"] == self.best_trial), None)

    def summary(self) -> str:
        done = sum(t["status"] == "completed" for t in self.trials)
        stopped = sum(t["status"] == "early_stopped" for t in self.trials)
        lines = [
            f"Sweep {self.sweep_name}: {len(self.trials)} trial(s), {done} completed, {stopped} stopped early by the scheduler",
            f"  best trial:      {self.best_trial}  {self.metric}={self.best_value}" if self.best_trial else "  no trial finished",
            f"  best config:     {json.dumps(self.best_config)}",
            f"  best checkpoint: {self.best_checkpoint}",
            f"  sweep dir:       {self.sweep_path}   (resume with: raypipe tune <config> --resume)",
            f"  MLflow parent run: {self.parent_run_id}",
        ]
        return "\n".join(lines)


def param_space(cfg: RaypipeConfig) -> dict[str, Any]:
    """The config's search space as Ray Tune sampling objects, keyed by dotted path."""
    from ray import tune

    makers = {
        "choice": lambda a: tune.choice(a),
        "grid": lambda a: tune.grid_search(a),
        "uniform": lambda a: tune.uniform(*a),
        "loguniform": lambda a: tune.loguniform(*a),
        "randint": lambda a: tune.randint(*a),
        "quniform": lambda a: tune.quniform(*a),
    }
    return {path: makers[kind](arg) for path, spec in cfg.tune.search_space.items() for kind, arg in spec.items()}


def trial_config(base: dict[str, Any], sampled: dict[str, Any]) -> RaypipeConfig:
    tree = copy.deepcopy(base)
    for path, value in sampled.items():
        set_path(tree, path, value)
    return config_from_dict(tree, source="trial config")


def concurrency(cfg: RaypipeConfig, resources: dict[str, float], use_gpu: bool) -> tuple[int, str]:
    """How many trials fit at once, and why: each needs its driver plus its train workers."""
    if cfg.tune.max_concurrent_trials:
        return cfg.tune.max_concurrent_trials, "set by tune.max_concurrent_trials"
    workers = max(cfg.scaling.num_workers, 1)  # local mode still runs one loop
    cpu_need = TRIAL_DRIVER_CPU + workers * cfg.scaling.cpus_per_worker
    by_cpu = math.floor(resources.get("CPU", 0) / cpu_need + 1e-9)
    why = f"{resources.get('CPU', 0):g} CPU / {cpu_need:g} per trial = {by_cpu}"
    n = by_cpu
    if use_gpu:
        gpu_need = workers * cfg.scaling.gpus_per_worker
        by_gpu = math.floor(resources.get("GPU", 0) / gpu_need + 1e-9)
        why += f"; {resources.get('GPU', 0):g} GPU / {gpu_need:g} per trial = {by_gpu}"
        n = min(n, by_gpu)
    n = max(1, min(n, cfg.tune.num_samples * max(1, _grid_size(cfg))))
    return n, why


def _grid_size(cfg: RaypipeConfig) -> int:
    size = 1
    for spec in cfg.tune.search_space.values():
        if "grid" in spec:
            size *= len(spec["grid"])
    return size


def trial_count(cfg: RaypipeConfig) -> int:
    """How many trials the sweep runs: the grid's size times ``num_samples`` (once with the
    ``grid`` search algorithm, which expands every space itself)."""
    return (1 if cfg.tune.search_alg == "grid" else cfg.tune.num_samples) * max(1, _grid_size(cfg))


def _concrete_cpus(cfg: RaypipeConfig) -> RaypipeConfig:
    """``cpus_per_worker: auto`` in a sweep: the trials that can run at once share the nodes."""
    if cfg.scaling.cpus_per_worker != "auto":
        return cfg
    from raypipe.runtime import auto_cpus_per_worker, node_cpus

    trials = cfg.tune.num_samples * max(1, _grid_size(cfg))
    if cfg.tune.max_concurrent_trials:
        trials = min(trials, cfg.tune.max_concurrent_trials)
    workers = trials * cfg.scaling.num_workers
    cpus = auto_cpus_per_worker(workers, node_cpus(), overhead=TRIAL_DRIVER_CPU / cfg.scaling.num_workers)
    print(f"[raypipe] scaling: {cfg.scaling.num_workers} worker(s) x {cpus:g} CPU per trial (auto)")
    return cfg.model_copy(update={"scaling": cfg.scaling.model_copy(update={"cpus_per_worker": cpus})})


def _trial_fn(config: dict[str, Any], base: dict[str, Any], sweep_name: str, splits: Any, datasets: Any,
              lineage: dict[str, Any] | None = None) -> None:
    """One trial = one training run, reporting each epoch to Tune (so ASHA can stop it)."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from raypipe import training

    cfg = trial_config(base, config)
    trial_id = tune.get_context().get_trial_id()
    # A stable name per trial: when a resumed sweep restarts an unfinished trial, Train V2 finds
    # its run dir and continues from the trial's last checkpoint instead of starting over.
    training.run(
        cfg,
        splits=splits,
        datasets=datasets,
        callbacks=[TuneReportCallback()],
        track=False,
        run_name=f"{sweep_name}_trial_{trial_id}",
        lineage=lineage,
    )


def _latest_sweep(cfg: RaypipeConfig) -> Path:
    from ray import tune

    root = Path(cfg.resolved_storage_path)
    prefix = cfg.tune.name or f"{cfg.name}-sweep"
    candidates = sorted(
        (p for p in root.glob(f"{prefix}*") if (p / SWEEP_FILE).is_file() and tune.Tuner.can_restore(str(p))),
        key=lambda p: p.stat().st_mtime,
    )
    if not candidates:
        raise ConfigError(f"--resume: no interrupted sweep named {prefix}* under {root}")
    return candidates[-1]


def run(cfg: RaypipeConfig, *, resume: bool = False, splits: Any = None) -> TuneResult:
    """Run (or resume) the sweep described by ``cfg.tune``; ``splits`` (read once by the caller)
    are shared by every trial."""
    if not cfg.tune.search_space:
        raise ConfigError("tune.search_space is empty: give at least one key, e.g. train.lr: {loguniform: [1e-5, 1e-3]}")
    if cfg.scaling.num_workers == 0:
        raise ConfigError(
            "scaling.num_workers: a sweep needs at least 1 worker per trial (Ray Train's local mode "
            "cannot run inside a Tune trial); use 1"
        )
    if cfg.tune.search_alg == "grid" and any("grid" not in s for s in cfg.tune.search_space.values()):
        raise ConfigError("tune.search_alg: grid needs every search_space entry to be {grid: [...]}")
    if cfg.tune.search_alg == "optuna" and any("grid" in s for s in cfg.tune.search_space.values()):
        raise ConfigError("tune.search_alg: optuna cannot sample {grid: [...]}; use {choice: [...]}")
    from raypipe.data import load_splits
    from raypipe.model import resolve_model_source
    from raypipe.tracking import preflight_store

    cfg = cfg.with_absolute_paths()  # trials run in directories of their own
    preflight_store(cfg)  # before any work: results written into a Ray job's package are lost
    resolve_model_source(cfg.model.name)
    from raypipe.model import check_peft

    check_peft(cfg.model, cfg.task)  # model.peft against the architecture
    if splits is None:
        splits = load_splits(cfg.data, cfg.task)
        splits.measure_lengths(cfg.model.name, cfg.data.max_length)
        print(splits.report())

    import ray
    from ray import tune

    from raypipe import training
    from raypipe.runtime import ensure_ray, resolve_use_gpu
    from raypipe import console
    from raypipe.tracking import (
        configure,
        finish_sweep_run,
        log_data_checks,
        redact_config,
        start_sweep_run,
        trial_logger,
    )

    ensure_ray(cfg)
    use_gpu = resolve_use_gpu(cfg)
    client, exp_id = configure(cfg)
    if resume:
        sweep_path = _latest_sweep(cfg)
        state = json.loads((sweep_path / SWEEP_FILE).read_text())
        sweep_name, parent_run_id = sweep_path.name, state["parent_run_id"]
        print(f"[raypipe] resuming sweep {sweep_name}")
    else:
        sweep_name = cfg.tune.name or f"{cfg.name}-sweep-{time.strftime('%Y%m%d-%H%M%S')}"
        sweep_path = Path(cfg.resolved_storage_path) / sweep_name
        parent_run_id = start_sweep_run(cfg, client, exp_id, sweep_name, splits.fingerprint)
        log_data_checks(client, parent_run_id, splits)
        sweep_path.mkdir(parents=True, exist_ok=True)
        (sweep_path / SWEEP_FILE).write_text(json.dumps({"parent_run_id": parent_run_id}))

    if cfg.tune.scheduler.type == "asha" and not _state_api_available():
        print(
            "[raypipe] warning: the Ray dashboard is off, so the State API is missing; Ray Train "
            "needs it to free the workers of trials that ASHA stops early (set ray.include_dashboard: true)"
        )
    cfg = _concrete_cpus(cfg)
    n, why = concurrency(cfg, ray.cluster_resources(), use_gpu)
    print(f"[raypipe] running up to {n} trial(s) at once ({why})")
    shared_data = not any(p.startswith(_PER_TRIAL_DATA_KEYS) for p in cfg.tune.search_space)
    # Tokenise once for all trials unless the space changes tokenisation (model or data keys).
    datasets = training.prepare_datasets(cfg, splits) if shared_data else None
    trainable = tune.with_resources(
        tune.with_parameters(
            _trial_fn, base=cfg.model_dump(mode="json"), sweep_name=sweep_name, splits=splits, datasets=datasets,
            lineage=training.code_lineage(),  # the driver's checkout, not the trial actor's cwd
        ),
        {"cpu": TRIAL_DRIVER_CPU},
    )
    metric, mode = cfg.tune.metric, cfg.tune.resolved_mode
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    board = console.SweepBoard(metric, mode, cfg.train.epochs, trial_count(cfg), n)
    public = redact_config(cfg.model_dump(mode="json"))
    run_config = tune.RunConfig(
        name=sweep_name,
        storage_path=cfg.resolved_storage_path,
        # CSV/JSON given here and TUNE_DISABLE_AUTO_CALLBACK_LOGGERS below: Tune's results files
        # without its TensorBoard logger (and its "To visualize your results" hint): runs are in MLflow.
        # Tune pickles its callbacks into tuner.pkl: the trial logger's config is the redacted one.
        callbacks=[trial_logger(cfg, parent_run_id, sweep_name, splits,
                                lambda sampled: trial_config(public, sampled)),
                   CSVLoggerCallback(), JsonLoggerCallback(), console.tune_callback(board)],
        failure_config=tune.FailureConfig(max_failures=0),
        verbose=1 if console.verbose() else 0,  # Tune's status tables leave out the metric; the board has it
    )
    quiet = {"TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1", **console.tune_env()}
    saved_env = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_NAME",
                                                 *quiet)}
    os.environ.update(quiet)
    try:
        if resume:
            tuner = tune.Tuner.restore(str(sweep_path), trainable=trainable, resume_errored=True)
        else:
            tuner = tune.Tuner(
                trainable,
                param_space=param_space(cfg),
                tune_config=tune.TuneConfig(
                    metric=metric,
                    mode=mode,
                    num_samples=1 if cfg.tune.search_alg == "grid" else cfg.tune.num_samples,
                    scheduler=_scheduler(cfg),
                    search_alg=_search_alg(cfg, metric, mode),
                    max_concurrent_trials=n,
                ),
                run_config=run_config,
            )
        from raypipe.runtime import own_signal_handlers

        with own_signal_handlers(), board:  # Tune's SIGINT/SIGUSR1 handlers outlive the sweep
            grid = tuner.fit()
    finally:
        for k, v in saved_env.items():  # MLflowLoggerCallback exports these; don't leak them
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    result = _collect(cfg, grid, sweep_name, str(sweep_path), parent_run_id)
    finish_sweep_run(cfg, client, result)
    if result.best_checkpoint is None:
        errors = [t["error"] for t in result.trials if t["error"]]
        raise TrainingError(
            f"no trial of sweep {sweep_name} produced a checkpoint"
            + (f"; first error: {errors[0][:2000]}" if errors else "")
        )
    return result


def _state_api_available() -> bool:
    try:
        from ray._private.worker import (
            get_dashboard_url,  # ray.worker's copy warns of deprecation
        )

        return bool(get_dashboard_url())
    except Exception:
        return False


def _scheduler(cfg: RaypipeConfig) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    s = cfg.tune.scheduler
    if s.type == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr="epoch",
        # One past the last epoch: at max_t ASHA stops a trial, and a stopped trial's driver is
        # killed before its TorchTrainer can release its workers. Finishing on its own, it does.
        max_t=cfg.train.epochs + 1,
        grace_period=min(s.grace_period, cfg.train.epochs),
        reduction_factor=s.reduction_factor,
    )


def _search_alg(cfg: RaypipeConfig, metric: str, mode: str) -> Any:
    if cfg.tune.search_alg != "optuna":
        return None  # random sampling / grid expansion: Tune's built-in variant generator
    try:
        from ray.tune.search.optuna import OptunaSearch
    except ImportError:
        from raypipe.errors import MissingExtraError

        raise MissingExtraError("optuna", "optuna", "tune.search_alg: optuna") from None
    return OptunaSearch(metric=metric, mode=mode, seed=cfg.train.seed)


def _collect(cfg: RaypipeConfig, grid: Any, sweep_name: str, sweep_path: str, parent_run_id: str) -> TuneResult:
    import ray.train

    from raypipe import console

    metric, mode = cfg.tune.metric, cfg.tune.resolved_mode
    trials = []
    for res in grid:
        m = res.metrics or {}
        trial_id = m.get("trial_id") or Path(res.path).name
        epochs = int(m.get("epoch", 0))
        status = "error" if res.error else ("completed" if epochs >= cfg.train.epochs else "early_stopped")
        trials.append(
            {
                "trial_id": trial_id,
                "config": res.config or {},
                "status": status,
                "epochs": epochs,
                metric: m.get(metric),
                "train_run": str(Path(cfg.resolved_storage_path) / f"{sweep_name}_trial_{trial_id}"),
                "error": repr(res.error) if res.error else None,
            }
        )
    scored = [t for t in trials if t[metric] is not None]
    best = (min if mode == "min" else max)(scored, key=lambda t: t[metric]) if scored else None
    best_ckpt = None
    best_value = None
    if best:
        # Tune's own Result has no checkpoint in this pattern; the trial's Train run keeps its best-k.
        with console.hushed("ray.train"):  # raypipe reading its own finished run is no "run snapshot" news
            train_result = ray.train.Result.from_path(best["train_run"])
        ckpt = train_result.get_best_checkpoint(metric, mode) if train_result.best_checkpoints else None
        if ckpt is not None:
            from raypipe.training import local_dir

            best_ckpt = local_dir(ckpt, cfg.workdir_path / "checkpoints" / sweep_name)
            from raypipe.model import read_meta

            best_value = read_meta(best_ckpt)["metrics"].get(metric)
    return TuneResult(
        sweep_name=sweep_name,
        sweep_path=sweep_path,
        metric=metric,
        mode=mode,
        best_trial=best["trial_id"] if best else None,
        best_config=best["config"] if best else {},
        best_value=best_value,
        best_checkpoint=best_ckpt,
        trials=trials,
        parent_run_id=parent_run_id,
    )
