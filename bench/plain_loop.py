"""A plain PyTorch fine-tuning loop, no Ray: the baseline of benchmark 1 (and of the GPU run).

It does the same work per step as ``raypipe.loop`` — AdamW with the same decay groups, linear
warm-up/decay, gradient clipping, optional autocast, length-grouped batches trimmed to their
longest row (dynamic padding) and ``loss.item()`` per step — but it owns its data, model and
process: no ``ray.train`` context, no dataset shards, no ``prepare_model``, no checkpoints.

    python -m bench.plain_loop --model minilm --rows 256 --max-length 32 --epochs 2
"""

from __future__ import annotations

import argparse
import json
import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np


def tokenize(tokenizer: Any, texts: list[str], labels: list[int], max_length: int) -> dict[str, np.ndarray]:
    enc = tokenizer(texts, truncation=True, max_length=max_length, padding="max_length", return_tensors="np")
    mask = enc["attention_mask"].astype(np.int32)
    return {
        "input_ids": enc["input_ids"].astype(np.int32),
        "attention_mask": mask,
        "length": mask.sum(axis=1).astype(np.int32),
        "labels": np.asarray(labels, dtype=np.int64),
    }


def batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator, group: bool) -> list[np.ndarray]:
    idx = rng.permutation(len(lengths))
    if group and len(idx):
        window = batch_size * 50
        idx = np.concatenate([c[np.argsort(lengths[c], kind="stable")]
                              for c in np.split(idx, range(window, len(idx), window))])
    out = [idx[i : i + batch_size] for i in range(0, len(idx), batch_size)]
    rng.shuffle(out)
    return out


def to_device(rows: dict[str, np.ndarray], sel: np.ndarray, device: Any) -> dict[str, Any]:
    import torch

    width = max(int(rows["length"][sel].max()), 1)
    return {
        "input_ids": torch.from_numpy(rows["input_ids"][sel, :width].astype(np.int64)).to(device, non_blocking=True),
        "attention_mask": torch.from_numpy(rows["attention_mask"][sel, :width].astype(np.int64)).to(device, non_blocking=True),
        "labels": torch.from_numpy(rows["labels"][sel]).to(device, non_blocking=True),
    }


def train(
    model_dir: str,
    rows: dict[str, np.ndarray],
    *,
    num_labels: int,
    batch_size: int = 16,
    epochs: int = 2,
    lr: float = 5e-5,
    weight_decay: float = 0.01,
    warmup_ratio: float = 0.1,
    max_grad_norm: float | None = 1.0,
    seed: int = 42,
    group_by_length: bool = True,
    device: str = "cpu",
    amp: str = "fp32",
    compile: bool = False,
    max_steps: int | None = None,
    fused: bool | None = None,
    val_rows: dict[str, np.ndarray] | None = None,
) -> dict[str, Any]:
    """Fine-tune and return per-epoch samples/s (training steps only, like raypipe's metric) and
    the tokens each epoch processed (real and padded)."""
    import torch
    from transformers import (
        AutoModelForSequenceClassification,
        get_linear_schedule_with_warmup,
    )
    from transformers.utils import logging as hf_logging

    from bench.ceiling import add_batch, new_counts

    dev = torch.device(device)
    torch.manual_seed(seed)
    hf_logging.set_verbosity_error()
    model = AutoModelForSequenceClassification.from_pretrained(
        model_dir, num_labels=num_labels, ignore_mismatched_sizes=True, use_safetensors=True
    ).to(dev)
    if compile:
        model = torch.compile(model)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr,
                            fused=dev.type in ("cuda", "cpu") if fused is None else fused)
    steps_per_epoch = math.ceil(len(rows["labels"]) / batch_size)
    total = steps_per_epoch * epochs
    sched = get_linear_schedule_with_warmup(opt, int(warmup_ratio * total), total)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    model.train()
    epoch_stats = []
    step = 0
    for epoch in range(1, epochs + 1):
        rng = np.random.default_rng([seed, epoch])
        t0, seen, loss_sum = time.perf_counter(), 0, 0.0
        counts = new_counts()  # real and padded tokens, for the FLOP accounting (bench.ceiling)
        for sel in batches(rows["length"], batch_size, rng, group_by_length):
            batch = to_device(rows, sel, dev)
            add_batch(counts, rows["length"][sel], batch["input_ids"].shape[1])
            with torch.autocast(dev.type, dtype=amp_dtype) if amp_dtype else nullcontext():
                loss = model(**batch).loss
            loss.backward()
            if max_grad_norm:
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            seen += len(sel)
            loss_sum += loss.item() * len(sel)
            step += 1
            if max_steps and step >= max_steps:
                break
        elapsed = time.perf_counter() - t0
        epoch_stats.append({"epoch": epoch, "seconds": elapsed, "samples": seen,
                            "samples_per_s": seen / max(elapsed, 1e-9), "train_loss": loss_sum / max(seen, 1),
                            "counts": counts})
        if max_steps and step >= max_steps:
            break
    out: dict[str, Any] = {"epochs": epoch_stats}
    if val_rows is not None:
        out["val_accuracy"] = accuracy(model, val_rows, 64, dev, amp_dtype)
    return out


def accuracy(model: Any, rows: dict[str, np.ndarray], batch_size: int, dev: Any, amp_dtype: Any = None) -> float:
    import torch

    model.eval()
    order = np.argsort(rows["length"], kind="stable")
    correct = 0
    with torch.inference_mode():
        for i in range(0, len(order), batch_size):
            b = to_device(rows, order[i : i + batch_size], dev)
            with torch.autocast(dev.type, dtype=amp_dtype) if amp_dtype else nullcontext():
                logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            correct += int((logits.argmax(-1) == b["labels"]).sum())
    model.train()
    return correct / max(len(order), 1)


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoTokenizer

    from bench.common import filled_texts, model_source

    p = argparse.ArgumentParser(prog="python -m bench.plain_loop", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="tiny | minilm | a model dir")
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--max-length", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--compile", action="store_true")
    p.add_argument("--no-fused", action="store_true", help="AdamW without the fused kernel")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    p.add_argument("--work", default="/tmp/raypipe-bench")
    a = p.parse_args(argv)
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    src = model_source(a.model, Path(a.work))
    texts, labels = filled_texts(a.rows, a.max_length, seed=1)
    rows = tokenize(AutoTokenizer.from_pretrained(src), texts, labels, a.max_length)
    res = train(src, rows, num_labels=2, batch_size=a.batch_size, epochs=a.epochs, device=a.device,
                amp=a.amp, compile=a.compile, fused=False if a.no_fused else None)
    res["threads"] = torch.get_num_threads()
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
