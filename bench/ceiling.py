"""The machine's own limit beside every training benchmark: what the hardware can do at the
model's shapes, and how much of it each training side gets (model FLOPs utilisation, MFU).

Ceiling (``measure``), taken in the same process and run as the training it is compared with:

* dense matmul FLOP/s at the shapes a transformer layer multiplies — ``[tokens_per_batch, H] x
  [H, H]`` (the Q, K, V and output projections) and ``[tokens_per_batch, H] x [H, I]`` (the
  feed-forward, I = the intermediate size, 4H in BERT-style models) — in fp32 and, where torch
  has it on the device, bf16; combined into one *model-shape ceiling* weighted by how many FLOPs
  each shape does in a layer (4 H² : 2 H I). The best of a few timed bursts is kept: on a shared
  machine the best is the least disturbed measurement, and a ceiling is a best case.
* memory bandwidth from a large tensor copy (bytes read + bytes written, per second).
* CPU: measured with ``torch.set_num_threads`` set to the threads the training side gets (its
  CPU reservation), and restored afterwards.

Accounting (``utilisation``):

* model FLOPs = ``6 N T + 12 L H Σ len²``: N the non-embedding parameters (all but the
  ``nn.Embedding`` tables, so the pooler and the classification head are counted on every
  token, which overstates MiniLM's FLOPs by ~1.5%), T the *real* tokens processed (attention
  mask sum), 6 = forward (2) + backward (4) per weight per token; the second term is the
  attention scores and the weighted sum over values (4 L H len² forward, x3 with backward) for
  a row of ``len`` tokens. With LoRA the frozen base weights (``frozen_non_embedding_params``
  in the dims) count 4 instead of 6 (forward 2 + the input gradient 2; no weight gradient), and
  the optimiser's traffic counts the trainable parameters only (``trainable_params``). Padding
  is counted apart: the FLOPs spent on pad tokens (the same formula over each batch's padded
  width) are reported as the padding fraction and the "hardware" FLOP/s, never as model FLOPs.
* MFU = achieved model FLOP/s / the model-shape ceiling in the precision the side trains in.
* a time budget from those numbers (``budget``): the weight matmuls at the ceiling, the same for
  the pad tokens, the optimiser's memory traffic at the measured bandwidth (fused AdamW reads
  param, grad, both moments and writes param and both moments, clipping reads and scales the
  grads: ~40 bytes per fp32 parameter per step, embeddings included since their grads are
  dense); what is left is everything else — elementwise kernels (layer norm, GELU, softmax,
  dropout), small-kernel launches and Python/framework overhead. The largest share is what
  limits the row (``limit``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

OPTIMIZER_BYTES_PER_PARAM = 40  # fused AdamW (7 x 4 B) + clip_grad_norm_ (read, then scale: 3 x 4 B)
BANDWIDTH_MIB = {"cpu": 256, "cuda": 2048}
PEAK_SIDE = {"cpu": 2048, "cuda": 8192}  # a large square matmul: the device's dense peak, for context


# ----------------------------------------------------------------------------- model shape


def model_dims(model_dir: str, token_level: bool = False, num_labels: int = 2) -> dict[str, Any]:
    """Hidden/intermediate sizes, layers and parameter counts of the sequence- (or, with
    ``token_level``, token-) classification model on ``model_dir``, from its config alone (built
    on the meta device: no weights are read)."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoModelForTokenClassification

    cfg = AutoConfig.from_pretrained(model_dir, num_labels=num_labels)
    auto = AutoModelForTokenClassification if token_level else AutoModelForSequenceClassification
    with torch.device("meta"):
        model = auto.from_config(cfg)
    total = sum(p.numel() for p in model.parameters())
    emb = sum(p.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding)
              for p in m.parameters(recurse=False))
    return {"hidden": int(cfg.hidden_size), "intermediate": int(getattr(cfg, "intermediate_size", 4 * cfg.hidden_size)),
            "layers": int(cfg.num_hidden_layers), "params": int(total), "non_embedding_params": int(total - emb)}


# ----------------------------------------------------------------------------- tokens


def new_counts() -> dict[str, float]:
    return {"samples": 0, "steps": 0, "real_tokens": 0, "processed_tokens": 0, "real_sq": 0, "processed_sq": 0}


def add_batch(counts: dict[str, float], lengths: np.ndarray, width: int | None = None) -> None:
    """One batch of rows with real ``lengths`` padded to ``width`` (default: the longest row)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    width = int(lengths.max()) if width is None else int(width)
    counts["samples"] += len(lengths)
    counts["steps"] += 1
    counts["real_tokens"] += int(lengths.sum())
    counts["processed_tokens"] += len(lengths) * width
    counts["real_sq"] += int((lengths ** 2).sum())
    counts["processed_sq"] += len(lengths) * width * width


def merge(counts: Iterable[dict[str, float]]) -> dict[str, float]:
    out = new_counts()
    for c in counts:
        for k in out:
            out[k] += c.get(k, 0)
    return out


def raypipe_run_counts(lengths: np.ndarray, train_cfg: Any, workers: int, epochs: Sequence[int]) -> dict[str, float]:
    """``raypipe_epoch_counts`` for the given epochs of a run with this ``TrainConfig``."""
    return merge(raypipe_epoch_counts(lengths, batch_size=train_cfg.batch_size, seed=train_cfg.seed, epoch=e,
                                      workers=workers, grad_accum_steps=train_cfg.grad_accum_steps,
                                      length_grouping=train_cfg.length_grouping) for e in epochs)


def raypipe_epoch_counts(lengths: np.ndarray, *, batch_size: int, seed: int, epoch: int, workers: int = 1,
                         grad_accum_steps: int = 1, length_grouping: bool = True) -> dict[str, float]:
    """The tokens raypipe's loop processes in one epoch, replayed: the same per-(seed, epoch,
    rank) random stream and raypipe's own batching function (``raypipe.loop._batches``, length
    grouping, each batch trimmed to its longest row), on the same encoded row lengths. Exact in
    what a batch holds; the row order of each worker's shard is Ray Data's, so with several
    workers the shards here are contiguous slices, not necessarily the ones Ray handed out."""
    from raypipe.loop import _batches

    lengths = np.asarray(lengths)
    shards = np.array_split(np.arange(len(lengths)), workers)
    per_worker = min(len(s) for s in shards)  # the loop's equal step count on every worker
    out = []
    for rank, shard in enumerate(shards):
        rng = np.random.default_rng([seed, epoch, rank])
        keep = np.sort(rng.permutation(len(shard))[:per_worker])
        mine = lengths[shard][keep]
        c = new_counts()
        for sel in _batches(mine, batch_size, rng, length_grouping):
            add_batch(c, mine[sel])
        c["steps"] = math.ceil(c["steps"] / grad_accum_steps)
        out.append(c)
    return merge(out)


# ----------------------------------------------------------------------------- ceiling


@contextmanager
def torch_threads(n: int | None):
    import torch

    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _best_rate(fn, work: float, device: str, seconds: float, inner: int = 3) -> float:
    """Best work/s over timed bursts of ``inner`` calls, for about ``seconds`` after a warm-up."""
    for _ in range(2):
        fn()
    _sync(device)
    best, end = 0.0, time.perf_counter() + seconds
    while True:
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        _sync(device)
        best = max(best, inner * work / (time.perf_counter() - t0))
        if time.perf_counter() > end:
            return best


def matmul_rate(m: int, k: int, n: int, dtype: str, device: str = "cpu", seconds: float = 0.3) -> float:
    """FLOP/s of ``[m, k] @ [k, n]`` (2 m k n FLOPs per product)."""
    import torch

    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    a = torch.randn(m, k, device=device).to(dt)
    b = torch.randn(k, n, device=device).to(dt)
    out = torch.empty(m, n, device=device, dtype=dt)
    return _best_rate(lambda: torch.matmul(a, b, out=out), 2.0 * m * k * n, device, seconds)


def copy_bandwidth(device: str = "cpu", mib: int | None = None, seconds: float = 0.3) -> float:
    """Bytes/s of ``dst.copy_(src)`` on a tensor far larger than the caches (read + write)."""
    import torch

    n = (mib or BANDWIDTH_MIB.get(device.split(":")[0], 256)) * 2**20 // 4
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)
    return _best_rate(lambda: dst.copy_(src), 2.0 * n * 4, device, seconds, inner=2)


def bf16_support(device: str) -> str | None:
    """None when bf16 matmuls run on ``device``, else why not."""
    import torch

    if device.startswith("cuda"):
        return None if torch.cuda.is_bf16_supported() else "torch.cuda.is_bf16_supported() is False"
    try:
        torch.ones(8, 8, dtype=torch.bfloat16) @ torch.ones(8, 8, dtype=torch.bfloat16)
    except Exception as exc:  # an old build or an exotic CPU
        return f"{type(exc).__name__}: {exc}"
    return None


def snap(tokens_per_batch: float) -> int:
    """The nearest point of a grid of √2 steps (16, 23, 32, 45, 64, ... rounded to 8), so that
    nearby batch shapes share one measurement and repeated measurements meet at the same shape."""
    k = round(2 * math.log2(max(tokens_per_batch, 16.0)))
    return max(16, int(round(2 ** (k / 2) / 8.0)) * 8)


def _model_shape_rate(rates: dict[str, float], dims: dict[str, Any]) -> float:
    """One rate for a whole layer: its matmul FLOPs over the time they take at the measured rates."""
    h, i = dims["hidden"], dims["intermediate"]
    f_hh, f_hi = 4 * h * h, 2 * h * i
    return (f_hh + f_hi) / (f_hh / rates["hh"] + f_hi / rates["hi"])


def measure(dims: dict[str, Any], tokens_per_batch: Sequence[int], threads: Sequence[int | None] = (None,),
            device: str = "cpu", seconds: float = 0.3) -> dict[str, Any]:
    """The ceiling for every (threads, tokens per batch): fp32 and bf16 model-shape matmul FLOP/s,
    copy bandwidth, and a large square matmul (the device's dense peak, for context)."""
    import torch

    no_bf16 = bf16_support(device)
    h, i = dims["hidden"], dims["intermediate"]
    ms = sorted({snap(t) for t in tokens_per_batch})
    out: dict[str, Any] = {"device": device, "hidden": h, "intermediate": i, "bf16": "measured" if no_bf16 is None
                           else f"not supported: {no_bf16}", "by_threads": {}}
    for t in dict.fromkeys(threads):
        with torch_threads(t if not device.startswith("cuda") else None):
            entry: dict[str, Any] = {"threads": torch.get_num_threads() if not device.startswith("cuda") else None,
                                     "by_tokens": {}}
            for m in ms:
                shapes: dict[str, Any] = {}
                for dtype in ("fp32", "bf16"):
                    if dtype == "bf16" and no_bf16 is not None:
                        continue
                    rates = {"hh": matmul_rate(m, h, h, dtype, device, seconds),
                             "hi": matmul_rate(m, h, i, dtype, device, seconds)}
                    shapes[dtype] = {**rates, "model": _model_shape_rate(rates, dims)}
                entry["by_tokens"][str(m)] = shapes
            p = PEAK_SIDE.get(device.split(":")[0], 2048)
            entry["peak_fp32"] = matmul_rate(p, p, p, "fp32", device, seconds)
            if no_bf16 is None:
                entry["peak_bf16"] = matmul_rate(p, p, p, "bf16", device, seconds)
            entry["copy_bytes_per_s"] = copy_bandwidth(device, seconds=seconds)
        out["by_threads"][str(entry["threads"])] = entry
    return out


def best_of(*ceilings: dict[str, Any]) -> dict[str, Any]:
    """Several measurements of the same ceiling (start and end of a run) -> the best of each
    number; the originals are kept under ``measurements``."""
    import copy

    out = copy.deepcopy(ceilings[0])

    def walk(dst: dict[str, Any], src: dict[str, Any]) -> None:
        for k, v in src.items():
            if isinstance(v, dict) and isinstance(dst.get(k), dict):
                walk(dst[k], v)
            elif isinstance(v, float) and isinstance(dst.get(k), float):
                dst[k] = max(dst[k], v)
            elif k not in dst:
                dst[k] = v

    for c in ceilings[1:]:
        walk(out, c)
    out["measurements"] = list(ceilings)
    return out


def lookup(ceiling: dict[str, Any], threads: int | None, tokens_per_batch: float, dtype: str) -> dict[str, float]:
    """The measured entry nearest to a side's threads and mean tokens per batch."""
    by_t = ceiling["by_threads"]
    key = str(threads)
    if key not in by_t:  # a GPU entry is keyed "None"; otherwise the nearest thread count
        key = min(by_t, key=lambda k: abs(int(k) - threads) if k.isdigit() and threads else 0)
    entry = by_t[key]
    m = str(snap(tokens_per_batch))
    if m not in entry["by_tokens"]:  # measured elsewhere: the nearest shape
        m = min(entry["by_tokens"], key=lambda k: abs(math.log(int(k) / max(tokens_per_batch, 1.0))))
    shapes = entry["by_tokens"][m]
    rates = shapes.get(dtype) or shapes["fp32"]
    return {"threads": entry["threads"], "tokens_per_batch": int(m), "dtype": dtype if dtype in shapes else "fp32",
            "matmul_flops_per_s": rates["model"], "copy_bytes_per_s": entry["copy_bytes_per_s"],
            "peak_flops_per_s": entry.get(f"peak_{dtype}", entry["peak_fp32"])}


# ----------------------------------------------------------------------------- utilisation


def flops(dims: dict[str, Any], tokens: float, sum_sq: float) -> float:
    """Model FLOPs of a training pass over ``tokens`` (``sum_sq``: Σ row length²). A frozen
    weight (``frozen_non_embedding_params``, LoRA's base) needs no weight-gradient matmul in the
    backward pass: 4 FLOPs per weight per token instead of 6."""
    frozen = dims.get("frozen_non_embedding_params", 0)
    return ((6.0 * dims["non_embedding_params"] - 2.0 * frozen) * tokens
            + 12.0 * dims["layers"] * dims["hidden"] * sum_sq)


def utilisation(counts: dict[str, float], seconds: float, dims: dict[str, Any], ceiling: dict[str, Any],
                threads: int | None, dtype: str = "fp32") -> dict[str, Any]:
    """samples/s, tokens/s, padding, model FLOP/s and MFU of one side over ``seconds`` in which it
    processed ``counts``, against the ceiling for its threads and batch shape."""
    seconds = max(seconds, 1e-9)
    steps = max(counts["steps"], 1)
    ref = lookup(ceiling, threads, counts["processed_tokens"] / steps, dtype)
    model = flops(dims, counts["real_tokens"], counts["real_sq"])
    hardware = flops(dims, counts["processed_tokens"], counts["processed_sq"])
    out = {
        "samples_per_s": counts["samples"] / seconds,
        "tokens_per_s": counts["real_tokens"] / seconds,
        "processed_tokens_per_s": counts["processed_tokens"] / seconds,
        "padding_fraction": 1.0 - counts["real_tokens"] / max(counts["processed_tokens"], 1),
        "model_flops_per_s": model / seconds,
        "hardware_flops_per_s": hardware / seconds,
        "mfu": model / seconds / ref["matmul_flops_per_s"],
        "of_peak": model / seconds / ref["peak_flops_per_s"],
        "ceiling": ref,
        "counts": dict(counts),
        "seconds": seconds,
    }
    out["budget"] = budget(out, dims)
    return out


def budget(u: dict[str, Any], dims: dict[str, Any]) -> dict[str, float]:
    """Shares of the measured time: weight matmuls and attention on real tokens at the ceiling,
    the same on pad tokens, the optimiser's memory traffic at the copy bandwidth, and the rest."""
    ref, c, t = u["ceiling"], u["counts"], u["seconds"]
    compute = u["model_flops_per_s"] * t / ref["matmul_flops_per_s"]
    padding = (u["hardware_flops_per_s"] - u["model_flops_per_s"]) * t / ref["matmul_flops_per_s"]
    optimised = dims.get("trainable_params", dims["params"])  # LoRA: the optimiser sees the adapter only
    memory = c["steps"] * OPTIMIZER_BYTES_PER_PARAM * optimised / ref["copy_bytes_per_s"]
    shares = {"compute": compute / t, "padding": padding / t, "optimizer_memory": memory / t}
    shares["other"] = max(0.0, 1.0 - sum(shares.values()))
    # Elementwise kernels scale with the tokens processed, pad or not (Python per step does not):
    # with the rest split by tokens, pad tokens cost this much of the time (an upper bound).
    shares["padding_with_its_rest"] = u["padding_fraction"] * (1.0 - shares["optimizer_memory"])
    return shares


def limit(name: str, u: dict[str, Any], ncpu: int | None = None, slower_than: tuple[str, float] | None = None) -> str:
    """One sentence: what limits this row, from its numbers."""
    b = u["budget"]
    pad_all = b.get("padding_with_its_rest", b["padding"])
    weigh = {"compute": b["compute"], "padding": pad_all, "optimizer_memory": b["optimizer_memory"],
             "other": b["other"] * (1.0 - u["padding_fraction"])}  # the rest of the real tokens' time
    main = max(weigh, key=weigh.get)
    pct = {k: f"{100 * v:.0f}%" for k, v in b.items()}
    head = {
        "compute": f"compute: the matmuls alone, at the measured ceiling, fill {pct['compute']} of its time",
        "padding": f"padding: {100 * u['padding_fraction']:.0f}% of the tokens it processes are pad; their matmuls "
                   f"alone take {pct['padding']} of its time at the ceiling (the real tokens' {pct['compute']}), and up to "
                   f"~{100 * pad_all:.0f}% with their share of the non-matmul work, as far as that scales with tokens",
        "optimizer_memory": f"memory bandwidth: the optimiser's ~{OPTIMIZER_BYTES_PER_PARAM} B/parameter/step at the measured "
                            f"copy bandwidth take {pct['optimizer_memory']} of its time",
        "other": f"overhead outside the matmuls: {pct['other']} of its time is neither weight matmuls "
                 f"({pct['compute']}), padding ({pct['padding']}) nor optimiser traffic ({pct['optimizer_memory']}) — "
                 "elementwise kernels, small-kernel launches, Python/framework work and, on a shared machine, "
                 "waiting for a core",
    }[main]
    tail = [f"MFU {u['mfu']:.2f}"]
    thr = u["ceiling"]["threads"]
    if ncpu and thr and thr < ncpu:
        tail.append(f"on {thr} of the {ncpu} cores by its reservation")
    if slower_than and slower_than[1] > 1.05:
        tail.append(f"{slower_than[1]:.2f}× the time per sample of {slower_than[0]} for the same work")
    return f"{name} — {head}" + (f" ({'; '.join(tail)})" if tail else "") + "."


def fmt_rate(x: float, unit: str = "FLOP/s") -> str:
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M")):
        if x >= scale:
            return f"{x / scale:.1f} {prefix}{unit}"
    return f"{x:.0f} {unit}"


def summarise_sides(raw: dict[str, list[dict[str, Any]]], dims: dict[str, Any], ceiling: dict[str, Any],
                    threads: dict[str, int | None], dtype: str = "fp32", baseline: str | None = None,
                    ncpu: int | None = None, names: dict[str, str] | None = None) -> dict[str, Any]:
    """Per side, over its repeats (each run carries the ``counts`` and ``seconds`` of the window
    its samples/s is taken over): medians [min–max] of the throughput and utilisation figures,
    the median time budget, and the sentence saying what limits it."""
    from bench import common as C

    out: dict[str, Any] = {}
    for side, runs in raw.items():
        us = [utilisation(r["counts"], r["seconds"], dims, ceiling, threads.get(side), dtype)
              for r in runs if r.get("counts") and r.get("seconds")]
        if not us:
            continue
        keys = ("samples_per_s", "tokens_per_s", "processed_tokens_per_s", "padding_fraction",
                "model_flops_per_s", "hardware_flops_per_s", "mfu", "of_peak")
        row: dict[str, Any] = {k: C.stats(u[k] for u in us) for k in keys}
        row["budget"] = {k: C.stats(u["budget"][k] for u in us)["median"] for k in us[0]["budget"]}
        row["ceiling"] = us[0]["ceiling"]
        row["tokens_per_batch"] = us[0]["counts"]["processed_tokens"] / max(us[0]["counts"]["steps"], 1)
        out[side] = row
    base = out.get(baseline) if baseline else None
    for side, row in out.items():
        med = {k: v["median"] for k, v in row.items() if isinstance(v, dict) and "median" in v}
        med.update(budget=row["budget"], ceiling=row["ceiling"])
        slower = None
        if base is not None and side != baseline:
            slower = ((names or {}).get(baseline, baseline),
                      base["samples_per_s"]["median"] / max(row["samples_per_s"]["median"], 1e-9))
        row["limit"] = limit((names or {}).get(side, side), med, ncpu, slower)
    return out
