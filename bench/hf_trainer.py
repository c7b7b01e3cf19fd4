"""The Hugging Face ``Trainer`` baseline of benchmark 2 (and of the GPU run).

Dynamic padding with ``DataCollatorWithPadding`` and the Trainer's defaults otherwise
(random sampling — no length grouping —, its default fused AdamW, linear schedule), so it
stands for what a user gets from the textbook recipe.
"""

from __future__ import annotations

import tempfile
import time
from typing import Any

import numpy as np

from bench.ceiling import add_batch, new_counts


class CountingCollator:
    """A Trainer collator that counts the real and padded tokens of every batch it builds (the
    FLOP accounting of bench.ceiling); the batches themselves are the wrapped collator's."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.counts = inner, new_counts()

    def __call__(self, features: list[dict[str, Any]]) -> Any:
        batch = self.inner(features)
        mask = batch["attention_mask"]
        add_batch(self.counts, mask.sum(1).numpy(), mask.shape[1])
        return batch


def run_trainer(
    model_dir: str,
    train_texts: list[Any],
    train_labels: list[Any],
    eval_texts: list[Any],
    eval_labels: list[Any],
    *,
    num_labels: int,
    max_length: int = 128,
    batch_size: int = 32,
    epochs: int = 1,
    lr: float = 1e-4,
    warmup_ratio: float = 0.1,
    weight_decay: float = 0.01,
    seed: int = 42,
    bf16: bool = False,
    use_cpu: bool = True,
    group_by_length: bool = False,
    compile: bool = False,
    problem_type: str = "single_label_classification",
    return_predictions: bool = False,
) -> dict[str, Any]:
    """Train and evaluate. Texts are strings, or (a, b) tuples for sentence pairs (tokenised as
    pairs). ``problem_type`` is transformers' own: ``single_label_classification`` (int labels),
    ``multi_label_classification`` (a 0/1 float vector per row: sigmoid + BCE) or ``regression``
    (a float per row, ``num_labels=1``: MSE on the raw target, the textbook recipe)."""
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def encode(texts: list[str], labels: list[int]) -> list[dict[str, Any]]:
        # A plain list of feature dicts is a valid torch Dataset for the Trainer (no `datasets`
        # needed, which the GPU image lacks); the collator pads each batch to its longest row.
        if texts and isinstance(texts[0], (tuple, list)):
            enc = tokenizer([a for a, _ in texts], [b for _, b in texts], truncation=True, max_length=max_length)
        else:
            enc = tokenizer(list(texts), truncation=True, max_length=max_length)
        keys = list(enc.keys())
        cast = {"single_label_classification": int, "regression": float}.get(problem_type, lambda y: [float(v) for v in y])
        return [{**{k: enc[k][i] for k in keys}, "labels": cast(y)} for i, y in enumerate(labels)]

    train_ds, eval_ds = encode(train_texts, train_labels), encode(eval_texts, eval_labels)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_dir, num_labels=num_labels, ignore_mismatched_sizes=True, use_safetensors=True,
        problem_type=problem_type,
    )

    def metrics(pred: Any) -> dict[str, float]:
        if problem_type != "single_label_classification":
            return {}
        return {"accuracy": float((np.argmax(pred.predictions, axis=-1) == pred.label_ids).mean())}

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=batch_size,
            per_device_eval_batch_size=64,
            num_train_epochs=epochs,
            learning_rate=lr,
            warmup_steps=warmup_ratio,
            weight_decay=weight_decay,
            max_grad_norm=1.0,
            seed=seed,
            bf16=bf16,
            use_cpu=use_cpu,
            eval_strategy="no",
            save_strategy="no",
            logging_strategy="no",
            report_to="none",
            disable_tqdm=True,
            dataloader_num_workers=0,
            train_sampling_strategy="group_by_length" if group_by_length else "random",
            torch_compile=compile,
        )
        collator = CountingCollator(DataCollatorWithPadding(tokenizer))
        trainer = Trainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                          data_collator=collator, compute_metrics=metrics)
        t0 = time.perf_counter()
        out_train = trainer.train()
        wall = time.perf_counter() - t0
        counts = dict(collator.counts)  # the training batches only: evaluation follows
        if return_predictions:
            pred = trainer.predict(eval_ds)
            ev = {f"eval_{k[5:]}" if k.startswith("test_") else k: v for k, v in pred.metrics.items()}
        else:
            ev = trainer.evaluate()
    m = out_train.metrics
    out = {
        "samples_per_s": float(m["train_samples_per_second"]),
        "train_runtime_s": float(m["train_runtime"]),
        "train_wall_s": wall,
        "train_loss": float(m.get("train_loss", float("nan"))),
        "counts": counts,
    }
    if "eval_accuracy" in ev:
        out["accuracy"] = float(ev["eval_accuracy"])
    if return_predictions:
        out["predictions"] = np.asarray(pred.predictions)
    return out


def run_token_trainer(
    model_dir: str,
    train_words: list[list[str]],
    train_tags: list[list[int]],
    eval_words: list[list[str]],
    *,
    num_labels: int,
    max_length: int = 128,
    batch_size: int = 32,
    epochs: int = 1,
    lr: float = 1e-4,
    warmup_ratio: float = 0.1,
    weight_decay: float = 0.01,
    seed: int = 42,
    use_cpu: bool = True,
) -> dict[str, Any]:
    """The token-classification recipe of transformers' ``run_ner.py``: words tokenised with
    ``is_split_into_words`` and truncated to ``max_length``, the tag on each word's first
    sub-token (-100 elsewhere), ``DataCollatorForTokenClassification``. Returns samples/s and one
    predicted tag id per eval word (a word lost to truncation is predicted 0, i.e. ``O``)."""
    from transformers import (
        AutoModelForTokenClassification,
        AutoTokenizer,
        DataCollatorForTokenClassification,
        Trainer,
        TrainingArguments,
    )
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def encode(words: list[list[str]], tags: list[list[int]] | None) -> tuple[list[dict[str, Any]], Any]:
        enc = tokenizer(words, is_split_into_words=True, truncation=True, max_length=max_length)
        rows = []
        for i in range(len(words)):
            labels, prev = [], None
            for w in enc.word_ids(i):
                labels.append(-100 if w is None or w == prev else (tags[i][w] if tags is not None else 0))
                prev = w
            rows.append({**{k: enc[k][i] for k in enc.keys()}, "labels": labels})
        return rows, enc

    train_ds, _ = encode(train_words, train_tags)
    eval_ds, eval_enc = encode(eval_words, None)
    model = AutoModelForTokenClassification.from_pretrained(
        model_dir, num_labels=num_labels, ignore_mismatched_sizes=True, use_safetensors=True)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=batch_size, per_device_eval_batch_size=64,
            num_train_epochs=epochs, learning_rate=lr, warmup_steps=warmup_ratio, weight_decay=weight_decay,
            max_grad_norm=1.0, seed=seed, use_cpu=use_cpu, eval_strategy="no", save_strategy="no",
            logging_strategy="no", report_to="none", disable_tqdm=True, dataloader_num_workers=0,
        )
        collator = CountingCollator(DataCollatorForTokenClassification(tokenizer))
        trainer = Trainer(model=model, args=args, train_dataset=train_ds, data_collator=collator)
        t0 = time.perf_counter()
        out_train = trainer.train()
        wall = time.perf_counter() - t0
        counts = dict(collator.counts)
        logits = trainer.predict(eval_ds).predictions
    best = np.asarray(logits).argmax(-1)
    predictions = []
    for i, words in enumerate(eval_words):
        tags, prev = [0] * len(words), None
        for pos, w in enumerate(eval_enc.word_ids(i)):
            if w is not None and w != prev:
                tags[w] = int(best[i, pos])
            prev = w
        predictions.append(tags)
    m = out_train.metrics
    return {"samples_per_s": float(m["train_samples_per_second"]), "train_runtime_s": float(m["train_runtime"]),
            "train_wall_s": wall, "train_loss": float(m.get("train_loss", float("nan"))), "predictions": predictions,
            "counts": counts}
