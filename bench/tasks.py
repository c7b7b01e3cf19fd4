"""Benchmark 8 — the tasks beyond single-label classification, on real data: GoEmotions
(multi-label, 28 emotions), STS-B (sentence-pair regression, 0-5) and CoNLL-2003 (named
entities), raypipe vs the Hugging Face ``Trainer``.

The raypipe side is the whole pipeline a user runs — ``pipeline.run`` on the shipped example
config (``examples/configs/goemotions.yaml``, ``stsb.yaml``): read and split, train, evaluate on
the held-out test file, register the champion, serve it and query it over HTTP. The Trainer side
fine-tunes the same MiniLM on the *same* training rows (raypipe's ``load_splits``, handed to
both) for the same epochs, batch size, learning rate, warm-up and seed, with transformers' own
``problem_type`` (``multi_label_classification``: sigmoid + BCE, threshold 0.5; ``regression``:
MSE on the raw score) and ``DataCollatorWithPadding``, and is scored on the same test rows with
the same metric formulas. samples/s counts training steps only on both sides.

Beside each task, the machine's ceiling (``bench.ceiling``), measured right after that task's two
sides at both sides' batch shapes, and each side's tokens (the Trainer's counted in its collator,
raypipe's replayed from the same rows — windows for CoNLL — with its own batching function),
padding, model FLOP/s and MFU over the training run.

For GoEmotions raypipe's test F1 is given twice: with the per-label thresholds it fits on the
validation file (what it serves) and at a flat 0.5 (what the Trainer recipe uses), so the effect
of the thresholds and that of the training are told apart.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import common as C

DATA_DIR = C.ROOT.parent / "shared" / "data"
EXAMPLES = C.ROOT / "examples" / "configs"
TASKS = ("goemotions", "stsb", "conll2003")


def settings(quick: bool) -> dict[str, Any]:
    if quick:
        return {"model": "tiny", "epochs": 1, "max_samples": 200, "serve": False, "eval_lines": 300}
    return {"model": "minilm", "epochs": None, "max_samples": None, "serve": True,  # None: the example's
            "eval_lines": None}


# ----------------------------------------------------------------------------- metrics


def f1_scores(probs: Any, truth: Any, thresholds: Any) -> dict[str, float]:
    """micro/macro F1 and subset accuracy of label sets (the formulas of raypipe's multi_label task)."""
    import numpy as np

    pred = probs >= np.asarray(thresholds)[None, :]
    truth = truth.astype(bool)
    tp = (pred & truth).sum(0).astype(float)
    fp = (pred & ~truth).sum(0).astype(float)
    fn = (~pred & truth).sum(0).astype(float)

    def f1(tp: Any, fp: Any, fn: Any) -> Any:
        d = 2 * tp + fp + fn
        return np.where(d > 0, 2 * tp / np.maximum(d, 1), 0.0)

    return {"micro_f1": float(f1(tp.sum(), fp.sum(), fn.sum())), "macro_f1": float(f1(tp, fp, fn).mean()),
            "subset_accuracy": float((pred == truth).all(1).mean())}


def correlations(pred: Any, truth: Any) -> dict[str, float]:
    import numpy as np
    import pandas as pd

    pred, truth = np.asarray(pred, dtype=float), np.asarray(truth, dtype=float)
    return {"pearson": float(np.corrcoef(pred, truth)[0, 1]),
            "spearman": float(pd.Series(pred).corr(pd.Series(truth), method="spearman")),
            "rmse": float(np.sqrt(np.mean((pred - truth) ** 2)))}


# ----------------------------------------------------------------------------- one task


def _config(name: str, s: dict[str, Any], work: Path) -> tuple[Any, str]:
    from raypipe.config import load_config

    os.environ.setdefault("RAYPIPE_DATA_DIR", str(DATA_DIR))
    src = C.model_source(s["model"], work)
    overrides = [f"workdir={work / name}", f"model.name={src}", f"serve.port={C.free_port()}"]
    if s["epochs"]:
        overrides.append(f"train.epochs={s['epochs']}")
    if s["max_samples"]:
        overrides.append(f"data.max_samples={s['max_samples']}")
    if s["model"] == "tiny":
        overrides.append("train.lr=1e-3")
    cfg = load_config(EXAMPLES / f"{name}.yaml", overrides)
    if s["eval_lines"]:  # quick: the opening lines of the validation/test files, beside the run
        for key in ("validation_path", "test_path"):
            path = getattr(cfg.data, key)
            if path:
                lines = Path(path).read_text(encoding="utf-8").splitlines(keepends=True)[: s["eval_lines"]]
                short = work / f"{name}-{key}{Path(path).suffix}"
                short.write_text("".join(lines), encoding="utf-8")
                overrides.append(f"data.{key}={short}")
        cfg = load_config(EXAMPLES / f"{name}.yaml", overrides)
    return cfg, src


def run_task(name: str, s: dict[str, Any], work: Path) -> dict[str, Any]:
    import numpy as np

    from bench.hf_trainer import run_trainer
    from raypipe import pipeline, tasks
    from raypipe.data import load_splits
    from raypipe.predict import Predictor

    cfg, src = _config(name, s, work)
    cfg = cfg.with_absolute_paths()
    splits = load_splits(cfg.data, cfg.task)
    inputs = tasks.get(cfg.task).inputs_of  # texts, (a, b) pairs, or word lists

    t0 = time.perf_counter()
    res = pipeline.run(cfg, serve=s["serve"], samples=6)
    pipeline_wall = time.perf_counter() - t0
    h = res.train.history if res.train is not None else []  # a sweep: see _ner
    rp_sps = len(h) / sum(1.0 / e["samples_per_s"] for e in h) if h else float("nan")
    test_in = inputs(splits.test)
    out: dict[str, Any] = {
        "task": cfg.task, "train_rows": len(splits.train), "val_rows": len(splits.val), "test_rows": len(splits.test),
        "epochs": cfg.train.epochs, "batch_size": cfg.train.batch_size, "lr": cfg.train.lr,
        "max_length": cfg.data.max_length, "raypipe_samples_per_s": rp_sps, "raypipe_epochs": len(h),
        "pipeline_wall_s": pipeline_wall,
        "stage_seconds": res.stage_seconds, "raypipe_test": dict(res.evaluation.metrics),
        "registered": res.registration.uri if res.registration else None,
        "promotion": res.registration.decision.reason if res.registration else None,
        "http_samples": res.samples,
    }

    if cfg.task == "token_classification":
        out = _ner(cfg, src, splits, res, out)
        return _with_utilisation(out, cfg, src, splits, s)
    if cfg.task == "multi_label":
        labels = list(splits.schema["labels"])
        index = {label: j for j, label in enumerate(labels)}

        def onehot(frame: Any) -> Any:
            m = np.zeros((len(frame), len(labels)), dtype=np.float32)
            for i, row in enumerate(frame["label"]):
                for label in row:
                    m[i, index[label]] = 1.0
            return m

        truth = onehot(splits.test)
        probs = Predictor.from_dir(res.train.best_checkpoint, device="cpu").predict_proba(test_in)
        out["raypipe_at_0.5"] = f1_scores(probs, truth, [0.5] * len(labels))
        train_y, test_y, problem = [list(r) for r in onehot(splits.train)], [list(r) for r in truth], \
            "multi_label_classification"
    else:
        train_y, test_y, problem = [float(v) for v in splits.train["label"]], [float(v) for v in splits.test["label"]], \
            "regression"
    hf = run_trainer(src, inputs(splits.train), train_y,
                     test_in, test_y, num_labels=len(train_y[0]) if problem != "regression" else 1,
                     max_length=cfg.data.max_length, batch_size=cfg.train.batch_size, epochs=cfg.train.epochs,
                     lr=cfg.train.lr, warmup_ratio=cfg.train.warmup_ratio, weight_decay=cfg.train.weight_decay,
                     seed=cfg.train.seed, problem_type=problem, return_predictions=True)
    pred = hf.pop("predictions")
    if problem == "regression":
        out["trainer_test"] = correlations(pred.reshape(-1), test_y)
    else:
        out["trainer_test"] = f1_scores(1.0 / (1.0 + np.exp(-pred)), np.asarray(test_y), [0.5] * len(test_y[0]))
    out["trainer_samples_per_s"] = hf["samples_per_s"]
    out["trainer_counts"] = hf["counts"]
    out["ratio"] = rp_sps / hf["samples_per_s"]
    return _with_utilisation(out, cfg, src, splits, s)


def _with_utilisation(out: dict[str, Any], cfg: Any, src: str, splits: Any, s: dict[str, Any]) -> dict[str, Any]:
    """The ceiling, measured now (right after this task's two sides), and both sides' tokens,
    model FLOP/s and MFU over their training run. raypipe's epochs are ``out['raypipe_epochs']``
    (a sweep's champion may have stopped early), its tokens replayed on its own encoded rows."""
    import torch
    from transformers import AutoTokenizer

    from bench import ceiling as K
    from raypipe import runtime, tasks

    lengths = tasks.get(cfg.task).encode(AutoTokenizer.from_pretrained(src), splits.train, splits.schema,
                                         cfg.data.max_length)["length"]
    workers = max(cfg.scaling.num_workers, 1)
    train_cfg = cfg.train.model_copy(update=out.get("raypipe_train_overrides", {}))  # a sweep's champion
    counts = K.raypipe_run_counts(lengths, train_cfg, workers, range(1, out["raypipe_epochs"] + 1))
    raw = {"raypipe": [{"counts": counts, "seconds": counts["samples"] / out["raypipe_samples_per_s"]}],
           "hf_trainer": [{"counts": out["trainer_counts"],
                           "seconds": out["trainer_counts"]["samples"] / out["trainer_samples_per_s"]}]}
    threads = {"raypipe": max(1, round(runtime.cpus_per_worker(cfg))) if cfg.scaling.num_workers
               else torch.get_num_threads(), "hf_trainer": torch.get_num_threads()}
    dims = K.model_dims(src, token_level=cfg.task == "token_classification", num_labels=len(splits.schema.get("labels") or [1]))
    shapes = [r[0]["counts"]["processed_tokens"] / max(r[0]["counts"]["steps"], 1) for r in raw.values()]
    ceil = K.measure(dims, shapes, sorted(set(threads.values())), seconds=0.1 if s["model"] == "tiny" else 0.3)
    out.update(model_dims=dims, ceiling=ceil, threads=threads, utilisation=K.summarise_sides(
        raw, dims, ceil, threads, "fp32", ncpu=os.cpu_count(), names={"raypipe": "raypipe", "hf_trainer": "HF Trainer"}))
    return out


def _ner(cfg: Any, src: str, splits: Any, res: Any, out: dict[str, Any]) -> dict[str, Any]:
    """CoNLL-2003: the Trainer gets the champion trial's learning rate (the sweep picked it on
    validation), the same training sentences, epochs and batch size; both sides are scored on the
    whole test file with seqeval strict (IOB2). raypipe's samples/s is the champion trial's."""
    from mlflow.tracking import MlflowClient

    from bench.hf_trainer import run_token_trainer
    from raypipe.tasks.token_classification import score_tags

    labels = list(splits.schema["labels"])
    index = {t: i for i, t in enumerate(labels)}
    lr = float((res.tune.best_config if res.tune else {}).get("train.lr", cfg.train.lr))
    if res.tune is not None:
        client = MlflowClient(tracking_uri=cfg.resolved_tracking_uri)
        history = client.get_metric_history(res.tune.best_run_id, "samples_per_s")
        out["raypipe_samples_per_s"] = len(history) / sum(1.0 / m.value for m in history)
        out["raypipe_epochs"] = len(history)
        out["raypipe_train_overrides"] = {k[len("train."):]: v for k, v in res.tune.best_config.items()
                                          if k.startswith("train.")}
        out["sweep"] = [{k: t.get(k) for k in ("trial_id", "config", "status", "epochs", cfg.tune.metric)}
                        for t in res.tune.trials]
    out["lr"] = lr
    hf = run_token_trainer(src, [list(w) for w in splits.train["tokens"]],
                           [[index[t] for t in tags] for tags in splits.train["label"]],
                           [list(w) for w in splits.test["tokens"]], num_labels=len(labels),
                           max_length=cfg.data.max_length, batch_size=cfg.train.batch_size, epochs=cfg.train.epochs,
                           lr=lr, warmup_ratio=cfg.train.warmup_ratio, weight_decay=cfg.train.weight_decay,
                           seed=cfg.train.seed)
    truth = [list(t) for t in splits.test["label"]]
    pred = [[labels[i] for i in p] for p in hf.pop("predictions")]
    scores = score_tags(truth, pred, labels, str(splits.schema["scheme"]))
    out["trainer_test"] = {k: v for k, v in scores.metrics.items() if k != "loss"}
    out["raypipe_per_type_f1"] = {k: v["f1"] for k, v in res.evaluation.details["per_type"].items()}
    out["trainer_per_type_f1"] = {k: v["f1"] for k, v in scores.details["per_type"].items()}
    out["trainer_samples_per_s"] = hf["samples_per_s"]
    out["trainer_counts"] = hf["counts"]
    out["ratio"] = out["raypipe_samples_per_s"] / hf["samples_per_s"]
    out["long_test_sentences"] = int(sum(len(w) > cfg.data.max_length // 2 for w in splits.test["tokens"]))
    return out


def run(quick: bool = False, repeats: int | None = None, work: Path | None = None) -> dict[str, Any]:
    """``RAYPIPE_BENCH_TASKS=conll2003`` (comma-separated) reruns only those tasks; the others keep
    their last full results from ``bench/results/tasks.json`` (each task's ratio is measured within
    its own run, and each says when)."""
    import json

    s = settings(quick)
    work = work or Path(tempfile.mkdtemp(prefix="raypipe-bench-tasks-"))
    only = [n for n in os.environ.get("RAYPIPE_BENCH_TASKS", "").split(",") if n] or list(TASKS)
    previous = C.RESULTS_DIR / "tasks.json"
    results = {}
    if not quick and set(only) != set(TASKS) and previous.exists():
        results = {n: t for n, t in json.loads(previous.read_text())["tasks"].items() if n in TASKS}
    with C.ray_session(num_cpus=os.cpu_count() or 2):
        for name in only:
            t0 = time.perf_counter()
            results[name] = run_task(name, s, work)
            results[name]["measured"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
            C.log(f"tasks {name}: {time.perf_counter() - t0:.0f}s")
    results = {n: results[n] for n in TASKS if n in results}
    return {
        "name": "tasks",
        "title": "8. Multi-label, pair regression and named entities on real data: raypipe vs Hugging Face Trainer",
        "command": "python -m bench tasks" + (" --quick" if quick else ""),
        "settings": s,
        "machine": C.machine(),
        "tasks": results,
        "rows": [{"task": n, "ratio": {"median": r["ratio"], "min": r["ratio"], "max": r["ratio"], "n": 1}}
                 for n, r in results.items()],
    }
