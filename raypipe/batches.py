"""Encoded rows -> batches on a device, and the evaluation pass over them. Torch, never Ray.

The training loop's validation and held-out evaluation (:mod:`raypipe.evaluation`) both call
:func:`evaluate_rows`, so ``val_*`` and ``test_*`` metrics are computed by the same code: the
task's encoding, the same batches, the task's accumulator.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch

from raypipe.model import unwrap
from raypipe.tasks import Scores, Task


def _identity(a: Any) -> Any:
    return a


def to_device(task: Task, rows: dict[str, np.ndarray], sel: np.ndarray, device: torch.device) -> dict[str, torch.Tensor]:
    """The model's inputs for rows ``sel``, trimmed to the longest of them: dynamic padding."""
    width = max(int(rows["length"][sel].max()), 1)
    out = {}
    for key in task.input_keys:
        if key not in rows:
            continue
        a = rows[key][sel]
        if key in task.sequence_keys:
            a = a[:, :width]
        if a.dtype == np.int32:  # ids are stored narrow; embeddings and losses want int64
            a = a.astype(np.int64)
        out[key] = torch.from_numpy(np.ascontiguousarray(a)).to(device, non_blocking=True)
    return out


def host_rows(rows: dict[str, np.ndarray], sel: np.ndarray) -> dict[str, np.ndarray]:
    """Rows ``sel`` of every array, for the accumulator (labels, targets, ids, word maps)."""
    return {k: v[sel] for k, v in rows.items()}


def num_rows(rows: dict[str, np.ndarray]) -> int:
    return len(rows["length"])


@torch.no_grad()
def evaluate_rows(
    model: Any,
    task: Task,
    schema: dict[str, Any],
    rows: dict[str, np.ndarray],
    *,
    batch_size: int,
    device: torch.device,
    amp: torch.dtype | None = None,
    fit: bool = False,
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    gather: Callable[[Any], Any] | None = None,
    progress: Callable[[int], None] | None = None,
) -> Scores:
    """The task's metrics (with ``loss``, the mean of the model's loss per row) over ``rows``.

    ``fit`` lets the task fit part of its schema on these rows (validation thresholds).
    Under Ray Train, ``all_reduce`` sums tensors and ``gather`` concatenates arrays across
    workers, so every worker computes the same numbers over the whole split. ``progress`` is
    called with the number of rows done after each batch.
    """
    bare = unwrap(model)  # no DDP in eval: no gradient sync to take part in
    was_training = bare.training
    bare.eval()
    acc = task.accumulator(schema, fit=fit)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    order = np.argsort(rows["length"], kind="stable")
    for start in range(0, len(order), batch_size):
        sel = order[start : start + batch_size]
        batch = to_device(task, rows, sel, device)
        with torch.autocast(device.type, dtype=amp) if amp else nullcontext():
            out = bare(**batch)
        loss_sum += out.loss.double() * len(sel)
        acc.update(out.logits, host_rows(rows, sel))
        if progress is not None:
            progress(start + len(sel))
    count = torch.tensor(float(len(order)), dtype=torch.float64, device=device)
    if all_reduce is not None:
        all_reduce(loss_sum)
        all_reduce(count)
    if was_training:
        bare.train()
    loss = float(loss_sum.item()) / max(float(count.item()), 1.0)
    return acc.compute(loss, gather or _identity)
