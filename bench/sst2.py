"""Benchmark 2 — real short text: SST-2 with MiniLM, raypipe vs the Hugging Face Trainer.

Both sides train on the same stratified subsample of SST-2 train (raypipe's own
``load_splits``, so the rows are identical), for the same number of epochs, with the same
batch size, learning rate, warm-up, weight decay, clipping, seed and precision, and are scored
on the full GLUE dev set (872 sentences). The Trainer uses ``DataCollatorWithPadding`` (dynamic
padding) with random batches; raypipe uses its length-grouped batches trimmed per batch.

samples/s counts training steps only on both sides (raypipe: its per-epoch metric; Trainer:
``train_samples_per_second``); Ray start-up and evaluation are excluded on both.

Beside them, the machine's ceiling (``bench.ceiling``), measured in this run before the first
side (at raypipe's batch shape) and after the last (at both sides' shapes), and each side's
tokens (the Trainer's counted in its collator, raypipe's replayed from the same rows with its
own batching function), padding, model FLOP/s and MFU.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from bench import common as C

TARGET_CPU = 1.5
ACC_TOLERANCE = 0.005


def settings(quick: bool) -> dict[str, Any]:
    if quick:
        return {"model": "tiny", "train_rows": 256, "dev_rows": 128, "epochs": 1, "batch_size": 32,
                "lr": 1e-3, "max_length": 64, "repeats": 1, "num_workers": 1, "cpus_per_worker": 1}
    return {"model": "minilm", "train_rows": 2000, "dev_rows": None, "epochs": 1, "batch_size": 32,
            "lr": 1e-4, "max_length": 64, "repeats": 2, "num_workers": 1,
            "cpus_per_worker": os.cpu_count() or 2}


def run(quick: bool = False, repeats: int | None = None, work: Path | None = None) -> dict[str, Any]:
    import torch
    from transformers import AutoTokenizer

    from bench import ceiling as K
    from bench.hf_trainer import run_trainer
    from raypipe import tasks, training
    from raypipe.config import config_from_dict
    from raypipe.data import load_splits

    s = settings(quick)
    s["repeats"] = repeats or s["repeats"]
    work = work or Path(tempfile.mkdtemp(prefix="raypipe-bench-sst2-"))
    src = C.model_source(s["model"], work)
    dev_path = C.SST2_DIR / "dev.tsv"
    if s["dev_rows"]:  # quick: a slice of dev, written beside the run (never into the repo)
        C.sst2_frame("dev", n=s["dev_rows"]).rename(columns={"text": "sentence"}).to_csv(
            work / "dev.tsv", sep="\t", index=False)
        dev_path = work / "dev.tsv"
    counter = {"n": 0}

    def cfg(name: str) -> Any:
        return config_from_dict({
            "workdir": str(work / name), "name": name,
            "data": {"path": str(C.SST2_DIR / "train.tsv"), "text_columns": ["sentence"],
                     "validation_path": str(dev_path), "test_path": str(dev_path),
                     "max_samples": s["train_rows"], "max_length": s["max_length"], "split_seed": 42},
            "model": {"name": src},
            "train": {"epochs": s["epochs"], "batch_size": s["batch_size"], "lr": s["lr"],
                      "warmup_ratio": 0.1, "weight_decay": 0.01, "max_grad_norm": 1.0, "seed": 42,
                      "precision": "fp32", "keep_checkpoints": 1, "metric": "val_accuracy"},
            "scaling": {"num_workers": s["num_workers"], "cpus_per_worker": s["cpus_per_worker"],
                        "use_gpu": False},
            "tracking": {"log_checkpoint": False},
        })

    splits = load_splits(cfg("probe").data)
    train_texts, train_ids = list(splits.train["text"]), [int(x) for x in splits.label_ids(splits.train)]
    dev_texts, dev_ids = list(splits.val["text"]), [int(x) for x in splits.label_ids(splits.val)]
    s["train_rows_actual"], s["dev_rows_actual"] = len(train_texts), len(dev_texts)
    probe = cfg("probe")
    lengths = tasks.get(probe.task).encode(AutoTokenizer.from_pretrained(src), splits.train, splits.schema,
                                           s["max_length"])["length"]
    dims = K.model_dims(src, num_labels=len(splits.labels))
    threads = {"raypipe": int(s["cpus_per_worker"]), "hf_trainer": torch.get_num_threads()}

    def raypipe_side() -> dict[str, Any]:
        counter["n"] += 1
        res = training.run(cfg(f"sst2-{counter['n']}"), splits=splits)
        h = res.history
        total_sps = len(h) / sum(1.0 / e["samples_per_s"] for e in h)  # equal epochs: harmonic mean
        counts = K.raypipe_run_counts(lengths, probe.train, s["num_workers"], range(1, len(h) + 1))
        return {"samples_per_s": total_sps, "accuracy": h[-1]["val_accuracy"], "counts": counts,
                "seconds": counts["samples"] / total_sps}

    def trainer_side() -> dict[str, Any]:
        r = run_trainer(src, train_texts, train_ids, dev_texts, dev_ids, num_labels=len(splits.labels),
                        max_length=s["max_length"], batch_size=s["batch_size"], epochs=s["epochs"],
                        lr=s["lr"], warmup_ratio=0.1, weight_decay=0.01, seed=42)
        return {**r, "seconds": r["counts"]["samples"] / r["samples_per_s"]}

    def ceiling(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
        shapes = [r["counts"]["processed_tokens"] / r["counts"]["steps"] for v in runs.values() for r in v]
        return K.measure(dims, shapes, sorted(set(threads.values())), seconds=0.1 if quick else 0.3)

    first = K.raypipe_run_counts(lengths, probe.train, s["num_workers"], [1])
    before = ceiling({"raypipe": [{"counts": first}]})
    with C.ray_session(num_cpus=os.cpu_count() or 2):
        raw = C.alternate({"raypipe": raypipe_side, "hf_trainer": trainer_side}, s["repeats"], "sst2")
    ceil = K.best_of(before, ceiling(raw))
    ratio = C.stats(a["samples_per_s"] / b["samples_per_s"] for a, b in zip(raw["raypipe"], raw["hf_trainer"]))
    acc_rp = C.stats(r["accuracy"] for r in raw["raypipe"])
    acc_hf = C.stats(r["accuracy"] for r in raw["hf_trainer"])
    acc_delta = acc_rp["median"] - acc_hf["median"]
    util = K.summarise_sides(raw, dims, ceil, threads, "fp32", ncpu=os.cpu_count(),
                             names={"raypipe": "raypipe", "hf_trainer": "HF Trainer"})
    return {
        "name": "sst2",
        "title": "2. SST-2 (short real text): raypipe vs Hugging Face Trainer",
        "command": "python -m bench sst2" + (" --quick" if quick else ""),
        "settings": s,
        "machine": C.machine(),
        "raw": raw,
        "model_dims": dims, "ceiling": ceil, "threads": threads, "utilisation": util,
        "rows": [{
            "ratio": ratio, "target": TARGET_CPU, "met": ratio["median"] >= TARGET_CPU and acc_delta >= -ACC_TOLERANCE,
            "raypipe_sps": C.stats(r["samples_per_s"] for r in raw["raypipe"]),
            "trainer_sps": C.stats(r["samples_per_s"] for r in raw["hf_trainer"]),
            "raypipe_acc": acc_rp, "trainer_acc": acc_hf, "acc_delta_pt": 100 * acc_delta,
        }],
    }
