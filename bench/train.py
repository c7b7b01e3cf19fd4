"""Benchmark 1 — training throughput, steady state: raypipe ``train`` vs a plain PyTorch loop.

Same model, batch size, rows, precision (fp32 on CPU) and optimiser on both sides. Every row is
filled to ``max_length`` tokens (SST-2 sentences joined), so padding plays no part and the
numbers measure the framework, not the batching. Ray start-up and the ~20 s a TorchTrainer
spends before its loop begins are excluded: raypipe's own per-epoch ``samples_per_s`` metric
(training steps only) is read from the run's checkpoint history, and the plain loop times its
epochs the same way. The last of 3 epochs is the steady-state figure: epoch 1 is warm-up, and
epoch 2 shares the CPU with the one-off work that follows a run's *first* report (the Train
controller's first checkpoint registration and the driver's first MLflow logging: ~1 core for
~4 s, measured per process from /proc), which cost a 1-worker run on all cores ~20% of epoch 2.

Beside every side: the machine's own ceiling (``bench.ceiling``: fp32/bf16 matmul FLOP/s at the
model's shapes on the threads the side gets, and copy bandwidth), measured in this run before
the first side and after the last (the best of the two is kept), and each side's model FLOP/s
and MFU over the same last epoch. The plain loop counts its tokens; raypipe's are replayed from
the same rows with raypipe's own batching function (``ceiling.raypipe_epoch_counts``).

Sides, run alternately in one Ray session:
  plain         bench.plain_loop in this process (torch's default threads: all cores)
  ray_1w_auto   1 worker, scaling.cpus_per_worker=auto (the default: a lone worker gets every core)
  ray_1w_1cpu   1 worker, scaling.cpus_per_worker=1 (one core by reservation; the quickstart's
                setting before ``auto``)
  ray_2w        2 workers x 1 CPU (DDP over gloo)
  local         scaling.num_workers=0 (the loop in the driver process)
"""

from __future__ import annotations

import csv
import os
import tempfile
from pathlib import Path
from typing import Any

from bench import common as C

TARGET_1W = 0.95


def _write_csv(path: Path, texts: list[str], labels: list[int]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows(zip(texts, labels))
    return path


def settings(quick: bool) -> dict[str, Any]:
    if quick:
        return {"model": "tiny", "rows": 256, "val_rows": 32, "max_length": 32, "batch_size": 16,
                "epochs": 2, "repeats": 1, "sides": ["plain", "local"]}
    return {"model": "minilm", "rows": 256, "val_rows": 32, "max_length": 32, "batch_size": 16,
            "epochs": 3, "repeats": 2,
            "sides": ["plain", "ray_1w_auto", "ray_1w_1cpu", "ray_2w", "local"]}


def raypipe_config(work: Path, model_src: str, train_csv: Path, val_csv: Path, s: dict[str, Any],
                   num_workers: int, cpus_per_worker: float | str, name: str) -> Any:
    from raypipe.config import config_from_dict

    return config_from_dict({
        "workdir": str(work / name),
        "name": name,
        "data": {"path": str(train_csv), "validation_path": str(val_csv), "test_path": str(val_csv),
                 "max_length": s["max_length"]},
        "model": {"name": model_src},
        "train": {"epochs": s["epochs"], "batch_size": s["batch_size"], "lr": 5e-5, "warmup_ratio": 0.1,
                  "precision": "fp32", "keep_checkpoints": 1, "metric": "val_accuracy"},
        "scaling": {"num_workers": num_workers, "cpus_per_worker": cpus_per_worker, "use_gpu": False},
        "tracking": {"log_checkpoint": False},
    })


def side_threads(ncpu: int, driver_threads: int) -> dict[str, int]:
    """The torch threads each side trains with (its ceiling is measured on as many): the driver's
    default, or the worker's CPU reservation."""
    return {"plain": driver_threads, "ray_1w_auto": ncpu, "ray_1w_1cpu": 1,
            "ray_2w": 2,  # two 1-thread workers: against the 2-thread ceiling of the same 2 cores
            "local": driver_threads}


def run(quick: bool = False, repeats: int | None = None, work: Path | None = None) -> dict[str, Any]:
    import torch
    from transformers import AutoTokenizer

    from bench import ceiling as K
    from bench.plain_loop import tokenize
    from bench.plain_loop import train as plain_train
    from raypipe import training

    s = settings(quick)
    s["repeats"] = repeats or s["repeats"]
    work = work or Path(tempfile.mkdtemp(prefix="raypipe-bench-train-"))
    ncpu = os.cpu_count() or 2
    src = C.model_source(s["model"], work)
    texts, labels = C.filled_texts(s["rows"] + s["val_rows"], s["max_length"], seed=1)
    train_csv = _write_csv(work / "train.csv", texts[: s["rows"]], labels[: s["rows"]])
    val_csv = _write_csv(work / "val.csv", texts[s["rows"]:], labels[s["rows"]:])
    rows = tokenize(AutoTokenizer.from_pretrained(src), texts[: s["rows"]], labels[: s["rows"]], s["max_length"])
    counter = {"n": 0}
    dims = K.model_dims(src)
    threads = side_threads(ncpu, torch.get_num_threads())
    tokens_per_batch = [s["batch_size"] * s["max_length"]]  # every row full: one shape

    def ceiling() -> dict[str, Any]:
        return K.measure(dims, tokens_per_batch, sorted({threads[k] for k in s["sides"]}),
                         seconds=0.1 if quick else 0.3)

    def plain() -> dict[str, Any]:
        r = plain_train(src, rows, num_labels=2, batch_size=s["batch_size"], epochs=s["epochs"], lr=5e-5)
        last = r["epochs"][-1]
        return {"samples_per_s": last["samples_per_s"], "epochs": r["epochs"], "counts": last["counts"],
                "seconds": last["seconds"]}

    def ray_side(num_workers: int, cpus: float | str) -> Any:
        def side() -> dict[str, Any]:
            counter["n"] += 1
            cfg = raypipe_config(work, src, train_csv, val_csv, s, num_workers, cpus, f"bench{counter['n']}")
            res = training.run(cfg)
            hist = res.history
            counts = K.raypipe_run_counts(rows["length"], cfg.train, max(num_workers, 1), [len(hist)])
            return {"samples_per_s": hist[-1]["samples_per_s"], "epochs": [h["samples_per_s"] for h in hist],
                    "counts": counts, "seconds": counts["samples"] / hist[-1]["samples_per_s"]}
        return side

    all_sides = {
        "plain": plain,
        "ray_1w_auto": ray_side(1, "auto"),
        "ray_1w_1cpu": ray_side(1, 1.0),
        "ray_2w": ray_side(2, 1.0),
        "local": ray_side(0, 1.0),
    }
    before = ceiling()
    with C.ray_session(num_cpus=ncpu):
        raw = C.alternate({k: all_sides[k] for k in s["sides"]}, s["repeats"], "train")
    ceil = K.best_of(before, ceiling())
    out = summarise(raw, s, quick)
    out["model_dims"], out["ceiling"], out["threads"] = dims, ceil, threads
    out["utilisation"] = K.summarise_sides(raw, dims, ceil, threads, "fp32", baseline="plain", ncpu=ncpu,
                                           names={"plain": "the plain loop"})
    return out


def _epochs(r: dict[str, Any]) -> list[float]:
    return [e["samples_per_s"] if isinstance(e, dict) else e for e in r["epochs"]]


def summarise(raw: dict[str, list[dict[str, Any]]], s: dict[str, Any], quick: bool) -> dict[str, Any]:
    """Ratios from the raw runs: last epoch (steady state, the target) and epoch 1 (before the
    run's first report, so free of its one-off cost; warm-up is paid equally by both sides)."""
    sps = {k: [r["samples_per_s"] for r in v] for k, v in raw.items()}
    first = {k: [_epochs(r)[0] for r in v] for k, v in raw.items()}

    def ratios(table: dict[str, list[float]], a: str, b: str) -> dict[str, float] | None:
        if a not in table or b not in table:
            return None
        return C.stats(x / y for x, y in zip(table[a], table[b]))

    rows_out = []
    for side, base, target in (("ray_1w_auto", "plain", TARGET_1W), ("ray_1w_1cpu", "plain", None),
                               ("ray_2w", "ray_1w_1cpu", None), ("ray_2w", "ray_1w_auto", None),
                               ("local", "plain", None)):
        r = ratios(sps, side, base)
        if r is None:
            continue
        rows_out.append({"side": side, "baseline": base, "epoch": "last", "ratio": r, "target": target,
                         "met": None if target is None else r["median"] >= target,
                         "side_sps": C.stats(sps[side]), "baseline_sps": C.stats(sps[base])})
    for side in ("ray_1w_auto", "ray_1w_1cpu", "local"):
        r = ratios(first, side, "plain")
        if r is not None:
            rows_out.append({"side": side, "baseline": "plain", "epoch": "1", "ratio": r, "target": None,
                             "met": None, "side_sps": C.stats(first[side]), "baseline_sps": C.stats(first["plain"])})
    return {
        "name": "train",
        "title": "1. Training throughput (steady state)",
        "command": "python -m bench train" + (" --quick" if quick else ""),
        "settings": s,
        "machine": C.machine(),
        "raw": raw,
        "samples_per_s": {k: C.stats(v) for k, v in sps.items()},
        "first_epoch_samples_per_s": {k: C.stats(v) for k, v in first.items()},
        "rows": rows_out,
    }
