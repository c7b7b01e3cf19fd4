"""The driver side of training: data -> encoded rows -> ``TorchTrainer`` -> MLflow run.

``run(cfg)`` is what ``raypipe train``, the notebook and every Tune trial call. It validates
everything it can (data, model source, resources) before any Ray work starts, then builds a
``TorchTrainer`` whose ``ScalingConfig`` alone decides CPU or GPU.
"""

from __future__ import annotations

import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raypipe.config import RaypipeConfig
from raypipe.data import HeldRows, Splits, load_splits, training_data
from raypipe.errors import TrainingError
from raypipe.model import read_meta, resolve_model_source
from raypipe.tracking import redact_config, redact_uri, ui_hint


@dataclass
class TrainResult:
    """What a training run leaves behind, handed to evaluation, registration and serving."""

    run_name: str
    run_path: str
    best_checkpoint: str | None
    metric: str
    best_value: float | None
    history: list[dict[str, float]] = field(default_factory=list)
    task: str = "classification"
    schema: dict[str, Any] = field(default_factory=dict)
    fingerprint: str | None = None
    mlflow_run_id: str | None = None
    tracking_uri: str | None = None
    early_stopped: bool = False

    @property
    def labels(self) -> list[str]:
        return list(self.schema.get("labels") or [])

    def summary(self) -> str:
        lines = [
            f"Training run {self.run_name}: {len(self.history)} epoch(s)"
            + (" (early stopped)" if self.early_stopped else ""),
            f"  best {self.metric}: {self.best_value:.4f}" if self.best_value is not None else "  no epoch finished",
            f"  best checkpoint:   {self.best_checkpoint}",
            f"  Ray run dir:       {self.run_path}",
        ]
        if self.mlflow_run_id:
            lines += [
                f"  MLflow run id:     {self.mlflow_run_id}",
                f"  MLflow store:      {redact_uri(self.tracking_uri or '')}",
            ]
        return "\n".join(lines)


def make_run_name(cfg: RaypipeConfig) -> str:
    # A fresh name per run: Train V2 resumes a run whose name already exists in storage.
    return f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}-{int(time.time() * 1000) % 1000:03d}"


def prepare_datasets(cfg: RaypipeConfig, splits: Splits) -> dict[str, Any]:
    """The encoded train/val splits: ``HeldRows`` (tokenised here) or Ray Datasets (on the cluster)."""
    source = resolve_model_source(cfg.model.name)
    return {
        name: training_data(frame, splits, source, cfg.data.max_length)
        for name, frame in (("train", splits.train), ("val", splits.val))
    }


def build_trainer(
    cfg: RaypipeConfig,
    splits: Splits,
    datasets: dict[str, Any],
    *,
    use_gpu: bool,
    run_name: str,
    callbacks: list[Any] | None = None,
    train_loop: Any = None,
    lineage: dict[str, Any] | None = None,
) -> Any:
    import ray.train
    from ray.train.torch import TorchTrainer

    from raypipe.loop import train_loop_per_worker
    from raypipe.runtime import TRAIN_POLL_ENV, WORKER_ENV, start_retries, worker_resources

    # Read from this process's environment when fit() starts the controller (a user's value wins;
    # a Ray started elsewhere, e.g. in a notebook, did not get raypipe's defaults).
    os.environ.setdefault(TRAIN_POLL_ENV, WORKER_ENV[TRAIN_POLL_ENV])

    tree = cfg.model_dump(mode="json")
    loop_config = {"cfg": tree, "schema": splits.schema, "fingerprint": splits.fingerprint,
                   "config_record": redact_config(tree),  # what checkpoints record: no credentials
                   **(lineage if lineage is not None else code_lineage())}
    loop_config["held"] = {k: v for k, v in datasets.items() if isinstance(v, HeldRows)}
    ray_datasets = {k: v for k, v in datasets.items() if not isinstance(v, HeldRows)}
    if cfg.scaling.num_workers == 0:
        loop_config["local_checkpoint_root"] = str(Path(cfg.resolved_storage_path) / run_name)
    return TorchTrainer(
        train_loop or train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.scaling.num_workers,
            use_gpu=use_gpu,
            resources_per_worker=worker_resources(cfg, use_gpu) if cfg.scaling.num_workers else None,
        ),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=cfg.resolved_storage_path,
            failure_config=ray.train.FailureConfig(
                max_failures=cfg.scaling.max_failures,
                # Ray retries a worker group that cannot be placed for ever; bound it.
                controller_failure_limit=start_retries(cfg),
            ),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.train.keep_checkpoints,
                checkpoint_score_attribute=cfg.train.metric,
                checkpoint_score_order=cfg.train.resolved_mode,
            ),
            callbacks=callbacks or None,
            worker_runtime_env={"env_vars": dict(WORKER_ENV)},
        ),
        datasets=ray_datasets or None,
    )


def local_dir(checkpoint: Any, into: Path) -> str:
    """A local path for a Ray checkpoint (downloaded when storage is remote, e.g. s3://)."""
    import pyarrow.fs

    if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
        return checkpoint.path
    into.mkdir(parents=True, exist_ok=True)
    return checkpoint.to_directory(str(into / Path(checkpoint.path).name))


def code_lineage() -> dict[str, Any]:
    """The commit (and dirty flag) of the code this process runs, for the checkpoint's record."""
    from raypipe.tracking import git_dirty, git_sha

    return {"git_sha": git_sha(), "git_dirty": git_dirty()}


def run(
    cfg: RaypipeConfig,
    *,
    splits: Splits | None = None,
    datasets: dict[str, Any] | None = None,
    callbacks: list[Any] | None = None,
    track: bool = True,
    run_name: str | None = None,
    train_loop: Any = None,
    lineage: dict[str, Any] | None = None,
) -> TrainResult:
    """Fine-tune as configured. ``track=False`` leaves logging to the caller (Tune does it).

    ``splits``/``datasets`` let a caller (a sweep) read and tokenise once for many runs.
    ``lineage``: the git commit/dirty flag to record (a sweep's trials get the driver's: a trial
    runs in a Ray worker, whose working directory need not be the user's checkout).
    ``train_loop`` replaces the worker function (default ``raypipe.loop.train_loop_per_worker``);
    a wrapper around the default is how fault-injection tests reach inside the workers.
    """
    # Everything that can be checked without Ray is checked first.
    cfg = cfg.with_absolute_paths()  # the workers do not share this process's directory
    if track:
        from raypipe.tracking import preflight_store

        preflight_store(cfg)  # before any work: results written into a Ray job's package are lost
    resolve_model_source(cfg.model.name)
    from raypipe.model import check_peft

    check_peft(cfg.model, cfg.task)  # model.peft against the architecture
    if splits is None:
        splits = load_splits(cfg.data, cfg.task)
        splits.measure_lengths(cfg.model.name, cfg.data.max_length)
        print(splits.report())

    from raypipe.runtime import check_fits, cpus_per_worker, ensure_ray, resolve_use_gpu

    ensure_ray(cfg)
    use_gpu = resolve_use_gpu(cfg)
    if cfg.scaling.num_workers > 0:
        check_fits(cfg, use_gpu)
        if track:  # (a sweep's trials stay quiet: the sweep says how it is laid out)
            auto = " (auto)" if cfg.scaling.cpus_per_worker == "auto" else ""
            print(f"[raypipe] scaling: {cfg.scaling.num_workers} worker(s) x {cpus_per_worker(cfg):g} CPU{auto}"
                  + (f" + {cfg.scaling.gpus_per_worker:g} GPU" if use_gpu else ""))
    run_name = run_name or make_run_name(cfg)
    datasets = datasets or prepare_datasets(cfg, splits)
    callbacks = list(callbacks or [])
    mlflow_run = None
    if track:
        from raypipe.tracking import start_training_run, train_callback

        mlflow_run = start_training_run(cfg, splits, run_name)

        callbacks.append(train_callback(cfg.resolved_tracking_uri, mlflow_run))
    trainer = build_trainer(
        cfg, splits, datasets, use_gpu=use_gpu, run_name=run_name, callbacks=callbacks, train_loop=train_loop,
        lineage=lineage,
    )
    t0 = time.perf_counter()
    from raypipe import console

    # Epoch lines for a tracked run on workers; a sweep's trials have Tune's board, local mode prints itself.
    watch = track and cfg.scaling.num_workers > 0 and "://" not in cfg.resolved_storage_path
    epochs = (console.EpochWatcher(str(Path(cfg.resolved_storage_path) / run_name), cfg.train.metric, cfg.train.epochs)
              if watch else nullcontext())
    from raypipe.runtime import own_signal_handlers

    try:
        with own_signal_handlers(), epochs:  # Ray Train's SIGINT handler would outlive the run
            result = trainer.fit()
    except Exception as exc:
        from raypipe.runtime import unplaced_workers

        exc = unplaced_workers(cfg, exc, use_gpu)
        outcome = _failed(cfg, run_name, exc)
        if mlflow_run:
            from raypipe.tracking import fail_training_run

            fail_training_run(cfg, mlflow_run, exc, outcome)
        raise TrainingError(
            f"training run {run_name} failed: {exc}\n"
            + (f"  best checkpoint so far: {outcome}" if outcome else "  no checkpoint was saved")
        ) from exc
    print(f"[raypipe] training finished in {time.perf_counter() - t0:.1f}s")
    out = _result(cfg, splits, run_name, result)
    if mlflow_run:
        from raypipe.tracking import finish_training_run

        finish_training_run(cfg, mlflow_run, out)
        out.mlflow_run_id = mlflow_run
        out.tracking_uri = cfg.resolved_tracking_uri
        print(f"[raypipe] open the MLflow UI: {ui_hint(cfg)}")
    return out


def _local_mode_checkpoints(cfg: RaypipeConfig, run_name: str) -> tuple[str | None, str | None]:
    """(best, latest) for a local-mode run, keeping best-k + latest as Ray does elsewhere."""
    root = Path(cfg.resolved_storage_path) / run_name
    dirs = sorted(root.glob("checkpoint_epoch_*"))
    if not dirs:
        return None, None
    sign = -1 if cfg.train.resolved_mode == "max" else 1
    ranked = sorted(dirs, key=lambda d: sign * read_meta(d)["metrics"][cfg.train.metric])
    for stale in set(dirs) - set(ranked[: cfg.train.keep_checkpoints]) - {dirs[-1]}:
        shutil.rmtree(stale)
    return str(ranked[0]), str(dirs[-1])


def _result(cfg: RaypipeConfig, splits: Splits, run_name: str, result: Any) -> TrainResult:
    metric, mode = cfg.train.metric, cfg.train.resolved_mode
    if cfg.scaling.num_workers == 0:
        best_dir, latest_dir = _local_mode_checkpoints(cfg, run_name)
        run_path = str(Path(cfg.resolved_storage_path) / run_name)
    else:
        best = result.get_best_checkpoint(metric, mode) if result.best_checkpoints else None
        cache = cfg.workdir_path / "checkpoints" / run_name
        best_dir = local_dir(best, cache) if best else None
        latest_dir = local_dir(result.checkpoint, cache) if result.checkpoint else best_dir
        run_path = str(result.path)
    latest_meta = read_meta(latest_dir) if latest_dir else {}
    best_meta = read_meta(best_dir) if best_dir else {}
    return TrainResult(
        run_name=run_name,
        run_path=run_path,
        best_checkpoint=best_dir,
        metric=metric,
        best_value=best_meta.get("metrics", {}).get(metric),
        history=latest_meta.get("history", []),
        task=splits.task,
        schema=best_meta.get("schema") or splits.schema,
        fingerprint=splits.fingerprint,
        early_stopped=bool(latest_meta.get("early_stopped")),
    )


def _failed(cfg: RaypipeConfig, run_name: str, exc: Exception) -> str | None:
    """The best checkpoint a failed run still has on storage, if any."""
    try:
        import ray.train

        from raypipe import console

        with console.hushed("ray.train"):  # raypipe reading its own run is no "run snapshot" news
            res = ray.train.Result.from_path(str(Path(cfg.resolved_storage_path) / run_name))
        best = res.get_best_checkpoint(cfg.train.metric, cfg.train.resolved_mode) if res.best_checkpoints else None
        return best.path if best else None
    except Exception:  # the run may have died before writing anything
        return None
