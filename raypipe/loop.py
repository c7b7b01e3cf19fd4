"""The worker side of training: one loop, readable top to bottom.

``train_loop_per_worker(config)`` runs inside each Ray Train worker (or in-process in local
mode, ``num_workers=0``). It differs from a plain PyTorch loop only where Ray needs it to:
the data is this worker's share of the rows the driver put in Ray's object store
(``raypipe.data.HeldRows``; ``ray.train.get_dataset_shard`` for rows tokenised on the
cluster), the model is wrapped by
``prepare_model``, progress leaves through ``ray.train.report`` with a checkpoint, and a
restarted worker group picks up from ``ray.train.get_checkpoint()``.
"""

from __future__ import annotations

import math
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch

from raypipe import tasks
from raypipe.batches import evaluate_rows, num_rows
from raypipe.batches import to_device as _to_device  # looked up per batch (tests/reliability wrap it)
from raypipe.config import RaypipeConfig, config_from_dict
from raypipe.model import build, load_train_state, restore, save_checkpoint


def _dist() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _all_reduce(t: torch.Tensor, op: Any = None) -> torch.Tensor:
    if _dist():
        # gloo and nccl both accept the tensor on the device the process group uses
        torch.distributed.all_reduce(t, op=op or torch.distributed.ReduceOp.SUM)
    return t


def _gather(a: np.ndarray) -> np.ndarray:
    """This worker's array joined with every other worker's (rank order)."""
    if not _dist():
        return a
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, a)
    return np.concatenate(out)


def _collect(shard: Any) -> dict[str, np.ndarray]:
    """Pull this worker's shard into memory once: token ids are small, and owning them lets us
    batch by length every epoch without paying Ray Data's iteration cost per step."""
    parts: dict[str, list[np.ndarray]] = {}
    for batch in shard.iter_batches(batch_size=2048, batch_format="numpy"):
        for k, v in batch.items():
            parts.setdefault(k, []).append(v)
    if not parts:
        return {"length": np.zeros(0, dtype=np.int32)}
    return {k: np.concatenate(v) for k, v in parts.items()}


def _batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator, group: bool) -> list[np.ndarray]:
    """Shuffled batches; with ``group``, rows of similar length share a batch (less padding),
    while the order of batches stays random."""
    idx = rng.permutation(len(lengths))
    if group:
        window = batch_size * 50
        idx = np.concatenate(
            [chunk[np.argsort(lengths[chunk], kind="stable")] for chunk in np.split(idx, range(window, len(idx), window))]
        ) if len(idx) else idx
    batches = [idx[i : i + batch_size] for i in range(0, len(idx), batch_size)]
    rng.shuffle(batches)
    return batches


def resolve_precision(requested: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None for fp32, whether a GradScaler is needed)."""
    if requested == "fp32" or (requested == "auto" and device.type != "cuda"):
        return None, False
    if requested == "bf16" or (requested == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16, False
    return torch.float16, device.type == "cuda"


def _improved(value: float, best: float | None, mode: str, min_delta: float) -> bool:
    if best is None:
        return True
    return value < best - min_delta if mode == "min" else value > best + min_delta


def _threads_for_reservation() -> None:
    """torch threads = the worker's CPU reservation, rounded. (Ray sets ``floor(cpus)``, which
    would give a sweep's worker at 2 - 0.01 CPU, the trial driver holding 0.01, one thread.)"""
    ctx = ray.get_runtime_context()
    if ctx.worker.mode != ray.WORKER_MODE:  # local mode: the loop runs in the driver
        return
    cpus = ctx.get_assigned_resources().get("CPU")
    if cpus:
        torch.set_num_threads(max(1, round(cpus)))


def train_loop_per_worker(config: dict[str, Any]) -> None:
    _threads_for_reservation()
    cfg: RaypipeConfig = config_from_dict(config["cfg"])
    task = tasks.get(cfg.task)
    schema: dict[str, Any] = config["schema"]
    tc = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one "Writing model shards" bar per epoch is noise
    log = print if rank == 0 else (lambda *a, **k: None)

    # --- model: fresh from the configured source, or the latest checkpoint after a restart ---
    torch.manual_seed(tc.seed)
    model, tokenizer = build(cfg.model, schema, cfg.task)
    state: dict[str, Any] | None = None
    resumed = ray.train.get_checkpoint()
    if resumed is not None:
        with resumed.as_directory() as d:
            model = restore(model, d, cfg.task)
            state = load_train_state(d)
    if tc.gradient_checkpointing:
        from raypipe.model import enable_gradient_checkpointing

        enable_gradient_checkpointing(model)
    model = ray.train.torch.prepare_model(model)

    # --- data: this worker's shards, held in memory; equal step counts on every worker ---
    held = config.get("held") or {}  # splits the driver tokenised (raypipe.data.HeldRows)
    train_rows, val_rows = (held[name].take(rank, world) if name in held else _collect(ray.train.get_dataset_shard(name))
                            for name in ("train", "val"))
    n_rows = torch.tensor(num_rows(train_rows), device=device)
    _all_reduce(n_rows, torch.distributed.ReduceOp.MIN if _dist() else None)
    rows_per_worker = int(n_rows.item())  # DDP needs every worker to take the same steps
    batches_per_epoch = math.ceil(rows_per_worker / tc.batch_size)
    if batches_per_epoch == 0:
        raise ValueError(f"worker {rank} received no training rows; use fewer workers or more data")
    steps_per_epoch = math.ceil(batches_per_epoch / tc.grad_accum_steps)
    total_steps = steps_per_epoch * tc.epochs

    # --- optimisation: AdamW (fused where available), linear warmup then decay, AMP ---
    from transformers import get_linear_schedule_with_warmup

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and p.requires_grad]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 and p.requires_grad]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=tc.lr,
        # Fused on CPU too (torch >= 2.4): on MiniLM (2 cores, batch 32 x 16 tokens) the unfused
        # step takes ~137 ms, the fused one ~19 ms, ~20% of a whole training step (BENCHMARKS.md).
        fused=device.type in ("cuda", "cpu"),
    )
    scheduler = get_linear_schedule_with_warmup(optimizer, int(tc.warmup_ratio * total_steps), total_steps)
    amp, needs_scaler = resolve_precision(tc.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=needs_scaler)

    start_epoch, best, bad_epochs, history = 1, None, 0, []
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_epoch = int(state["epoch"]) + 1
        best, bad_epochs = state["best"], int(state["bad_epochs"])
        history = list(state["history"])
        log(f"[raypipe] resumed from the checkpoint of epoch {start_epoch - 1}")
        stopped = bool(tc.early_stopping and bad_epochs >= tc.early_stopping.patience)
        if (start_epoch > tc.epochs or stopped) and history:
            # Nothing left to train (the run ended right after its last checkpoint): report the
            # final metrics again so whoever listens (Tune) sees the run's result.
            ray.train.report(history[-1])
            return
    if start_epoch == 1:
        log(
            f"[raypipe] {world} worker(s) on {device.type}, {rows_per_worker} rows/worker, "
            f"{steps_per_epoch} steps/epoch, precision {amp or 'fp32'}"
        )

    mode = tc.resolved_mode
    for epoch in range(start_epoch, tc.epochs + 1):
        if tc.early_stopping and bad_epochs >= tc.early_stopping.patience:
            break
        # Seeds depend on (seed, epoch, rank) so a resumed epoch replays exactly.
        torch.manual_seed(tc.seed * 100_003 + epoch * 101 + rank)
        rng = np.random.default_rng([tc.seed, epoch, rank])
        # Every worker uses rows_per_worker rows (the smallest shard) so all take the same steps.
        keep = np.sort(rng.permutation(num_rows(train_rows))[:rows_per_worker])
        batches = [keep[b] for b in _batches(train_rows["length"][keep], tc.batch_size, rng, tc.length_grouping)]

        model.train()
        t0, seen, loss_sum = time.perf_counter(), 0, 0.0
        last_print = t0
        for i, sel in enumerate(batches):
            batch = _to_device(task, train_rows, sel, device)
            final_micro = (i + 1) % tc.grad_accum_steps == 0 or i + 1 == len(batches)
            sync = nullcontext() if final_micro or not hasattr(model, "no_sync") else model.no_sync()
            with sync:
                with torch.autocast(device.type, dtype=amp) if amp else nullcontext():
                    loss = model(**batch).loss
                scaler.scale(loss / tc.grad_accum_steps).backward()
            if final_micro:
                if tc.max_grad_norm:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), tc.max_grad_norm)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
            seen += len(sel)
            loss_sum += loss.item() * len(sel)
            now = time.perf_counter()
            if now - last_print > 30:
                log(f"[raypipe] epoch {epoch} step {i + 1}/{len(batches)} loss {loss_sum / seen:.4f} "
                    f"({seen * world / (now - t0):.1f} samples/s)")
                last_print = now
        elapsed = time.perf_counter() - t0

        totals = torch.tensor([loss_sum, float(seen)], dtype=torch.float64, device=device)
        _all_reduce(totals)
        scores = evaluate_rows(model, task, schema, val_rows, batch_size=tc.eval_batch_size, device=device,
                               amp=amp, fit=True, all_reduce=_all_reduce, gather=_gather)
        metrics = {
            "epoch": epoch,
            "train_loss": float(totals[0] / max(totals[1], 1)),
            **{f"val_{k}": float(v) for k, v in scores.metrics.items()},
            "lr": scheduler.get_last_lr()[0],
            "samples_per_s": float(totals[1]) / max(elapsed, 1e-9),
        }
        value = metrics[tc.metric]
        if _improved(value, best, mode, tc.early_stopping.min_delta if tc.early_stopping else 0.0):
            best, bad_epochs = value, 0
        else:
            bad_epochs += 1
        history.append(metrics)
        shown = "  ".join(f"val_{k} {v:.4f}" for k, v in scores.metrics.items())
        log(
            f"[raypipe] epoch {epoch}/{tc.epochs}  train_loss {metrics['train_loss']:.4f}  {shown}  "
            f"{metrics['samples_per_s']:.1f} samples/s  {elapsed:.1f}s"
        )
        stop = bool(tc.early_stopping and bad_epochs >= tc.early_stopping.patience)
        # Local mode (num_workers=0) persists nothing itself, so write straight to storage there.
        local_root = config.get("local_checkpoint_root")
        with tempfile.TemporaryDirectory() as tmp:
            target = Path(local_root) / f"checkpoint_epoch_{epoch:04d}" if local_root else Path(tmp)
            checkpoint = None
            if rank == 0:
                save_checkpoint(
                    target, model, tokenizer,
                    {
                        "task": task.name,
                        # what this epoch fitted on validation (e.g. thresholds) goes with its weights
                        "schema": {**schema, **scores.schema_update},
                        "max_length": cfg.data.max_length,
                        "epoch": epoch,
                        "metrics": metrics,
                        "history": history,
                        "details": scores.details,
                        "early_stopped": stop,
                        "data_fingerprint": config.get("fingerprint"),
                        "git_sha": config.get("git_sha"),
                        "git_dirty": config.get("git_dirty"),
                        "config": config.get("config_record", config["cfg"]),
                    },
                    train_state={
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "scaler": scaler.state_dict(),
                        "epoch": epoch,
                        "best": best,
                        "bad_epochs": bad_epochs,
                        "history": history,
                    },
                )
                checkpoint = ray.train.Checkpoint.from_directory(str(target))
            ray.train.report(metrics, checkpoint=checkpoint)
        if stop:
            log(f"[raypipe] early stopping: {tc.metric} has not improved for {bad_epochs} epoch(s)")
            break



