"""A plain PyTorch + transformers + peft SFT loop, no Ray: the baseline of benchmark 12.

It owns its data, model and process, and does the work per step that raypipe's loop does for
``task: sft``: a causal LM from ``from_pretrained`` with LoRA attached by ``peft`` (the same rank,
alpha, dropout and target modules), AdamW (fused) with decay groups, linear warm-up/decay,
gradient clipping, ``loss.item()`` per step, batches trimmed to their longest row. The loss is
transformers' own shifted cross-entropy over the response tokens (labels -100 elsewhere).

Encoding is its own, in the usual recipe: the conversation before the answer is rendered with
the tokenizer's chat template and the generation prompt, the answer is the rest of the rendered
conversation; both are tokenised separately and joined, labels masked on the prompt; cut at
``max_length`` and dropped when no answer token is left. With packing, examples are packed
first-fit into ``max_length`` rows (every 256 examples, as raypipe tokenises them), each
example's ``position_ids`` restarting at 0 and no attention mask (transformers then keeps
attention inside each example); without, rows are padded and batches grouped by length.

Token accounting (``add_batch``): real tokens = the rows' non-pad tokens, processed tokens =
rows × the batch's width; attention FLOPs are counted per example (Σ len² over the examples of a
packed row) against rows × width² computed.

    python -m bench.plain_sft MODEL_DIR --rows 256 --packing
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from bench.plain_loop import batches  # the same shuffled, length-grouped batches as the classification loop

IGNORE = -100
PACK_CHUNK = 256  # examples per packing pass (raypipe.data.TOKENIZE_ROWS: one tokenizer call)


# ----------------------------------------------------------------------------- data


def alpaca_messages(rec: Mapping[str, Any]) -> tuple[list[dict[str, str]], str] | None:
    """(user turn, answer) of one Alpaca record; None for a record without an answer."""
    instruction = (rec.get("instruction") or "").strip()
    extra = (rec.get("input") or "").strip()
    answer = rec.get("output") or ""
    if not instruction or not answer.strip():
        return None
    return [{"role": "user", "content": instruction + (f"\n\n{extra}" if extra else "")}], answer


def encode_example(tokenizer: Any, messages: list[dict[str, str]], answer: str) -> tuple[list[int], list[int]]:
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": answer}], tokenize=False)
    assert full.startswith(prompt), "the chat template does not render the prompt as a prefix"
    head = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    tail = tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"]
    return list(head) + list(tail), [IGNORE] * len(head) + list(tail)


def _first_fit(lengths: list[int], max_length: int) -> list[list[int]]:
    rows: list[list[int]] = []
    used: list[int] = []
    for i, n in enumerate(lengths):
        for r in range(len(rows)):
            if used[r] + n <= max_length:
                rows[r].append(i)
                used[r] += n
                break
        else:
            rows.append([i])
            used.append(n)
    return rows


def encode(tokenizer: Any, records: Iterable[Mapping[str, Any]], max_length: int, packing: bool) -> dict[str, np.ndarray]:
    """Alpaca records -> fixed-width arrays (input_ids, labels, length and attention_mask or
    position_ids), ``max_length`` wide; rows are trimmed per batch at training time."""
    fitted: list[tuple[list[int], list[int]] | None] = []  # None: no answer token within max_length
    for rec in records:
        conv = alpaca_messages(rec)
        if conv is None:
            continue
        ids, labels = encode_example(tokenizer, *conv)
        ids, labels = ids[:max_length], labels[:max_length]
        fitted.append((ids, labels) if any(x != IGNORE for x in labels[1:]) else None)
    examples: list[tuple[list[int], list[int]]] = []
    groups: list[list[int]] = []
    step = PACK_CHUNK if packing else max(len(fitted), 1)
    for start in range(0, len(fitted), step):
        chunk = [e for e in fitted[start:start + step] if e is not None]
        base = len(examples)
        examples += chunk
        if packing:
            groups += [[base + i for i in g] for g in _first_fit([len(e[0]) for e in chunk], max_length)]
        else:
            groups += [[base + i] for i in range(len(chunk))]
    n = len(groups)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = {"input_ids": np.full((n, max_length), pad, dtype=np.int32),
           "labels": np.full((n, max_length), IGNORE, dtype=np.int32),
           "length": np.zeros(n, dtype=np.int32)}
    if packing:
        out["position_ids"] = np.tile(np.arange(max_length, dtype=np.int32), (n, 1))
    else:
        out["attention_mask"] = np.zeros((n, max_length), dtype=np.int32)
    for r, group in enumerate(groups):
        at = 0
        for i in group:
            ids, labels = examples[i]
            out["input_ids"][r, at:at + len(ids)] = ids
            out["labels"][r, at:at + len(ids)] = labels
            if packing:
                out["position_ids"][r, at:at + len(ids)] = np.arange(len(ids))
            at += len(ids)
        out["length"][r] = at
        if packing:
            out["position_ids"][r, at:] = np.arange(max_length - at)
        else:
            out["attention_mask"][r, :at] = 1
    return out


def segments(rows: Mapping[str, np.ndarray], r: int) -> np.ndarray:
    """The example lengths in row ``r`` (one for an unpacked row)."""
    n = int(rows["length"][r])
    if "position_ids" not in rows:
        return np.array([n], dtype=np.int64)
    starts = np.flatnonzero(rows["position_ids"][r, :n] == 0)
    return np.diff(np.append(starts, n)).astype(np.int64)


# ----------------------------------------------------------------------------- accounting


def new_counts() -> dict[str, float]:
    return {"samples": 0, "examples": 0, "steps": 0, "real_tokens": 0, "processed_tokens": 0,
            "real_sq": 0, "processed_sq": 0}


def add_batch(counts: dict[str, float], rows: Mapping[str, np.ndarray], sel: np.ndarray) -> None:
    """One batch of rows ``sel``, trimmed to its longest row (what both loops feed the model)."""
    width = max(int(rows["length"][sel].max()), 1)
    segs = [segments(rows, int(r)) for r in sel]
    counts["samples"] += len(sel)
    counts["examples"] += sum(len(s) for s in segs)
    counts["steps"] += 1
    counts["real_tokens"] += int(rows["length"][sel].sum())
    counts["processed_tokens"] += len(sel) * width
    counts["real_sq"] += int(sum(int((s ** 2).sum()) for s in segs))
    counts["processed_sq"] += len(sel) * width * width


def to_device(rows: Mapping[str, np.ndarray], sel: np.ndarray, device: Any) -> dict[str, Any]:
    import torch

    width = max(int(rows["length"][sel].max()), 1)
    return {k: torch.from_numpy(rows[k][sel, :width].astype(np.int64)).to(device)
            for k in ("input_ids", "labels", "attention_mask", "position_ids") if k in rows}


# ----------------------------------------------------------------------------- training


def load_model(model_dir: str, lora: Mapping[str, Any] | None) -> Any:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True)
    model.config.use_cache = False  # no KV cache in training forward passes
    if lora:
        model = get_peft_model(model, LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                                                 target_modules=list(lora["target_modules"]), bias="none"))
    return model


def train(model_dir: str, rows: Mapping[str, np.ndarray], *, lora: Mapping[str, Any] | None, batch_size: int = 16,
          epochs: int = 3, lr: float = 2e-3, weight_decay: float = 0.0, warmup_ratio: float = 0.05,
          max_grad_norm: float | None = 1.0, seed: int = 42, group_by_length: bool = True,
          device: str = "cpu") -> dict[str, Any]:
    """Fine-tune and return per-epoch rows/s (training steps only) with the tokens processed."""
    import torch
    from transformers import get_linear_schedule_with_warmup
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    dev = torch.device(device)
    torch.manual_seed(seed)
    model = load_model(model_dir, lora).to(dev)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [p for p in trainable if p.ndim >= 2], "weight_decay": weight_decay},
                             {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0}],
                            lr=lr, fused=dev.type in ("cuda", "cpu"))
    total = math.ceil(len(rows["length"]) / batch_size) * epochs
    sched = get_linear_schedule_with_warmup(opt, int(warmup_ratio * total), total)
    model.train()
    out = []
    for epoch in range(1, epochs + 1):
        rng = np.random.default_rng([seed, epoch])
        counts = new_counts()
        t0, seen, loss_sum = time.perf_counter(), 0, 0.0
        for sel in batches(rows["length"], batch_size, rng, group_by_length):
            add_batch(counts, rows, sel)
            loss = model(**to_device(rows, sel, dev)).loss
            loss.backward()
            if max_grad_norm:
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            seen += len(sel)
            loss_sum += loss.item() * len(sel)
        elapsed = time.perf_counter() - t0
        out.append({"epoch": epoch, "seconds": elapsed, "samples": seen, "samples_per_s": seen / max(elapsed, 1e-9),
                    "tokens_per_s": counts["real_tokens"] / max(elapsed, 1e-9),
                    "train_loss": loss_sum / max(seen, 1), "counts": counts})
    return {"epochs": out, "trainable_params": sum(p.numel() for p in trainable),
            "total_params": sum(p.numel() for p in model.parameters()), "threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoTokenizer

    p = argparse.ArgumentParser(prog="python -m bench.plain_sft", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", help="a causal LM dir with a chat template (examples/tiny_lm.py)")
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/alpaca/alpaca_data.json"))
    p.add_argument("--rows", type=int, default=256, help="Alpaca records (the first ones)")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--packing", action="store_true")
    p.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    a = p.parse_args(argv)
    records = json.loads(Path(a.data).read_text(encoding="utf-8"))[: a.rows]
    rows = encode(AutoTokenizer.from_pretrained(a.model_dir), records, a.max_length, a.packing)
    lora = None if a.full else {"r": 8, "alpha": 16.0, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]}
    res = train(a.model_dir, rows, lora=lora, batch_size=a.batch_size, epochs=a.epochs)
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
