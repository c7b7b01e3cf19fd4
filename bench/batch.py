"""Benchmark 9 — batch inference: ``raypipe predict --input`` on Ray Data vs in-process loops.

The same SST-2 train sentences, written once to a Parquet file, scored by the same untrained
MiniLM checkpoint (weights do not change the cost), max_length 128, 64 texts per forward pass,
on this machine's cores. Every side is timed end to end, model load included:

  plain        ``Predictor.from_dir`` + a loop of ``Predictor.predict`` over 1024-row chunks,
               torch on every core, no Ray (what raypipe's actors run, minus Ray Data).
  raypipe_1    ``raypipe.batch.run`` with one actor reserving every core (torch threads = cores):
               the Parquet read, the actor pool, the ordered write of a Parquet file with every
               input column + predictions, the rejection checks.
  raypipe_2    the same with two actors of one core each (the scaling from 1 to 2 actors).
  hf_pipeline  ``transformers.pipeline("text-classification")`` over the same rows, batch 64.
  raypipe_small  raypipe_1 on the first 1,000 rows: the job's fixed cost (actor process start,
               torch/transformers imports and model load in the actor, Ray Data start), so that
               ``raypipe_marginal`` = (N - 1000) / (T_N - T_1000) is its rate once that is paid.

Ray is started once, before the sides (a session's cost, not a job's).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from bench import common as C

TARGET = 0.9


def settings(quick: bool) -> dict[str, Any]:
    if quick:
        return {"rows": 2000, "model": "tiny", "max_length": 128, "batch_size": 64, "chunk": 1024, "repeats": 1}
    return {"rows": 20_000, "model": "minilm", "max_length": 128, "batch_size": 64, "chunk": 1024, "repeats": 2}


def run(quick: bool = False, repeats: int | None = None, work: Path | None = None) -> dict[str, Any]:
    import tempfile

    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from raypipe.batch import run as batch_run
    from raypipe.config import RaypipeConfig
    from raypipe.predict import Predictor

    s = settings(quick)
    s["repeats"] = repeats or s["repeats"]
    cores = os.cpu_count() or 2
    s["cores"] = cores
    work = work or Path(tempfile.mkdtemp(prefix="raypipe-bench-batch-"))
    frame = C.sst2_frame("train", n=s["rows"], seed=0)
    texts = list(frame["text"])
    src = work / "sst2.parquet"
    table = pa.table({"id": list(range(len(texts))), "text": texts, "label": list(frame["label"])})
    pq.write_table(table, src)
    small_rows = min(1000, len(texts) // 2)
    small = work / "sst2-small.parquet"
    pq.write_table(table.slice(0, small_rows), small)
    s["small_rows"] = small_rows
    ckpt = C.checkpoint_without_training(C.model_source(s["model"], work), work, ["0", "1"], s["max_length"])
    torch.set_num_threads(cores)

    def plain() -> float:
        t0 = time.perf_counter()
        p = Predictor.from_dir(ckpt, device="cpu")
        n = 0
        for i in range(0, len(texts), s["chunk"]):
            n += len(p.predict(texts[i : i + s["chunk"]], batch_size=s["batch_size"]))
        assert n == len(texts)
        return time.perf_counter() - t0

    def raypipe(actors: int, path: Path = src, rows: int = len(texts)):
        def side() -> float:
            out = work / f"scored-{actors}-{rows}.parquet"
            cfg = RaypipeConfig(workdir=str(work / "rp"), predict={"concurrency": actors, "batch_size": s["batch_size"]})
            t0 = time.perf_counter()
            r = batch_run(str(ckpt), str(path), str(out), cfg, overwrite=True, log_run=False, progress_every_s=60)
            dt = time.perf_counter() - t0
            assert r.rows_read == rows, r
            return dt
        return side

    def hf_pipeline() -> float:
        from transformers import pipeline

        t0 = time.perf_counter()
        pipe = pipeline("text-classification", model=str(ckpt), device="cpu")
        n = 0
        for i in range(0, len(texts), s["chunk"]):
            n += len(pipe(texts[i : i + s["chunk"]], batch_size=s["batch_size"], truncation=True,
                          max_length=s["max_length"]))
        assert n == len(texts)
        return time.perf_counter() - t0

    with C.ray_session(num_cpus=cores, dashboard=False):
        raypipe(1)()  # the first Ray Data job in a session also pays for imports in the workers
        raw = C.alternate({"plain": plain, "raypipe_1": raypipe(1), "raypipe_2": raypipe(2),
                           "hf_pipeline": hf_pipeline, "raypipe_small": raypipe(1, small, small_rows)},
                          s["repeats"], "batch")
    n = len(texts)
    rps = {k: [n / t for t in v] for k, v in raw.items() if k != "raypipe_small"}
    rps["raypipe_marginal"] = [(n - small_rows) / max(tb - ts, 1e-9)
                               for tb, ts in zip(raw["raypipe_1"], raw["raypipe_small"])]
    marginal = C.stats(a / b for a, b in zip(rps["raypipe_marginal"], rps["plain"]))
    ratio = C.stats(a / b for a, b in zip(rps["raypipe_1"], rps["plain"]))
    scaling = C.stats(a / b for a, b in zip(rps["raypipe_2"], rps["raypipe_1"]))
    vs_hf = C.stats(a / b for a, b in zip(rps["raypipe_1"], rps["hf_pipeline"]))
    return {
        "name": "batch",
        "title": "9. Batch inference: raypipe predict --input on Ray Data vs in-process loops",
        "command": "python -m bench batch" + (" --quick" if quick else ""),
        "settings": s,
        "machine": C.machine(),
        "raw_seconds": raw,
        "rows_per_s": {k: C.stats(v) for k, v in rps.items()},
        "fixed_cost_s": C.stats(raw["raypipe_small"]),
        "rows": [
            {"side": "raypipe_1 / plain", "ratio": ratio, "target": TARGET, "met": ratio["median"] >= TARGET},
            {"side": "raypipe_1 fixed cost removed / plain", "ratio": marginal, "target": None, "met": None},
            {"side": "raypipe_2 / raypipe_1", "ratio": scaling, "target": None, "met": None},
            {"side": "raypipe_1 / hf_pipeline", "ratio": vs_hf, "target": None, "met": None},
        ],
    }
