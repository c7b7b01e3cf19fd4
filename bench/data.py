"""Benchmark 3 — input pipeline: raypipe's tokenisation into a Ray Dataset vs the plain
tokenizer, same rows.

Sides, each timed end to end in a running Ray (tokenizer load included):
  raypipe     ``raypipe.data.to_ray_dataset`` as a training run calls it. For inputs up to
              ``IN_DRIVER_MAX_CELLS`` (SST-2 is far below) that tokenises in the driver and
              hands Ray Data finished Arrow blocks.
  ray_data    the same call forced onto the cluster path (``in_driver=False``):
              ``map_batches(Tokenize, batch_size=256, concurrency=1, num_cpus=0.5)`` +
              ``materialize()``, what raypipe does for inputs too large for the driver.
  plain       the same ``raypipe.data.Tokenize`` callable applied to the same rows in 256-row
              batches in this process, no Ray.

A small run of the cluster path (``ray_small``, a few hundred rows) estimates Ray Data's fixed
cost per call (actor start, tokenizer load in the actor, scheduling); ``ray_marginal`` is its
rows/s once that is paid: (N - n) / (T_N - T_n).
"""

from __future__ import annotations

import os
import time
from typing import Any

from bench import common as C

TARGET = 0.8


def settings(quick: bool) -> dict[str, Any]:
    if quick:
        return {"rows": 2000, "small_rows": 256, "max_length": 128, "repeats": 1}
    return {"rows": None, "small_rows": 256, "max_length": 128, "repeats": 3}  # None: all 67,349


def run(quick: bool = False, repeats: int | None = None) -> dict[str, Any]:
    import numpy as np

    from raypipe.data import Splits, Tokenize, to_ray_dataset

    s = settings(quick)
    s["repeats"] = repeats or s["repeats"]
    frame = C.sst2_frame("train", n=s["rows"], seed=0)
    s["rows_actual"] = len(frame)
    small = frame.iloc[: s["small_rows"]]
    splits = Splits(train=frame, val=frame.iloc[:1], test=frame.iloc[:1], schema={"labels": ["0", "1"]}, fingerprint="bench")
    src = C.minilm_dir()

    def ray_data(f: Any, in_driver: bool | None = False) -> Any:
        def side() -> float:
            t0 = time.perf_counter()
            ds = to_ray_dataset(f, splits, src, s["max_length"], in_driver=in_driver)
            n = ds.count()
            dt = time.perf_counter() - t0
            assert n == len(f), (n, len(f))
            return dt
        return side

    def plain() -> float:
        t0 = time.perf_counter()
        tok = Tokenize(src, s["max_length"], splits.task, splits.schema)
        out = [tok(frame.iloc[i : i + 256]) for i in range(0, len(frame), 256)]
        n = sum(len(b["labels"]) for b in out)
        np.concatenate([b["input_ids"] for b in out])  # the same one block materialize() leaves
        dt = time.perf_counter() - t0
        assert n == len(frame)
        return dt

    with C.ray_session(num_cpus=os.cpu_count() or 2):
        ray_data(small)()  # the first Ray Data call in a session also pays for module imports
        raw = C.alternate({"plain": plain, "raypipe": ray_data(frame, in_driver=None), "ray_data": ray_data(frame),
                           "ray_small": ray_data(small)}, s["repeats"], "data")
    n, n_small = len(frame), len(small)
    rps = {
        "plain": [n / t for t in raw["plain"]],
        "raypipe": [n / t for t in raw["raypipe"]],
        "ray_data": [n / t for t in raw["ray_data"]],
        "ray_marginal": [(n - n_small) / max(tb - ts, 1e-9) for tb, ts in zip(raw["ray_data"], raw["ray_small"])],
    }
    ratio = C.stats(r / p for r, p in zip(rps["raypipe"], rps["plain"]))
    cluster = C.stats(r / p for r, p in zip(rps["ray_data"], rps["plain"]))
    marginal = C.stats(r / p for r, p in zip(rps["ray_marginal"], rps["plain"]))
    return {
        "name": "data",
        "title": "3. Input pipeline: Ray Data tokenisation vs plain tokenizer",
        "command": "python -m bench data" + (" --quick" if quick else ""),
        "settings": s,
        "machine": C.machine(),
        "raw_seconds": raw,
        "rows_per_s": {k: C.stats(v) for k, v in rps.items()},
        "fixed_cost_s": C.stats(raw["ray_small"]),
        "rows": [
            {"side": "raypipe", "ratio": ratio, "target": TARGET, "met": ratio["median"] >= TARGET},
            {"side": "ray_data", "ratio": cluster, "target": None, "met": None},
            {"side": "ray_marginal", "ratio": marginal, "target": None, "met": None},
        ],
    }
