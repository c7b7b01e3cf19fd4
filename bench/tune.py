"""Benchmark 5 — tuning efficiency: ASHA vs FIFO on the same 8-trial grid.

Both sweeps run ``raypipe.tuning.run`` (it only sweeps, it never registers) over the same grid
of 8 configs (4 learning rates x 2 batch sizes), same data (an SST-2 subsample, full dev set as
validation), same epochs, tiny model. Counted from Tune's per-trial ``result.json``:

* trial-epochs: epochs trained, summed over trials (what a sweep costs);
* best: the best validation accuracy any trial reported at any epoch;
* to-target: trial-epochs spent, in the order the reports arrived, until some trial first
  reached FIFO's best accuracy -0.5 pt (FIFO, which trains everything to the end, defines
  "the best accuracy").

Target: ASHA's trial-epochs <= 40% of FIFO's, with its best within 0.5 pt of FIFO's.

ASHA runs twice, once comparing ``val_accuracy`` at its rungs and once ``val_loss``: early in
training most trials predict the majority class and tie at exactly the same accuracy (a tie is
never below ASHA's cutoff, so it is never stopped), while the loss ranks trials differently from
their final accuracy. Accuracy is what is scored either way: "best" and "to-target" read
``val_accuracy`` from every report.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from bench import common as C

TARGET = 0.40
TOL = 0.005


def settings(quick: bool) -> dict[str, Any]:
    if quick:
        return {"model": "tiny", "train_rows": 200, "dev_rows": 64, "epochs": 2, "max_length": 32,
                "lrs": [3e-4, 3e-3], "batch_sizes": [32], "grace_period": 1, "reduction_factor": 2,
                "sweeps": {"asha_loss": ("asha", "val_loss")}}
    return {"model": "tiny", "train_rows": 1000, "dev_rows": None, "epochs": 6, "max_length": 64,
            "lrs": [1e-4, 3e-4, 1e-3, 3e-3], "batch_sizes": [16, 32], "grace_period": 1,
            "reduction_factor": 2,
            "sweeps": {"fifo": ("fifo", "val_accuracy"), "asha_acc": ("asha", "val_accuracy"),
                       "asha_loss": ("asha", "val_loss")}}


def reports(sweep_path: str) -> list[dict[str, Any]]:
    out = []
    for f in Path(sweep_path).glob("*/result.json"):
        trial = f.parent.name
        for line in f.read_text().splitlines():
            if not line.strip():
                continue
            r = json.loads(line)
            if "epoch" in r and r.get("val_accuracy") is not None:
                out.append({"trial": trial, "epoch": int(r["epoch"]), "acc": float(r["val_accuracy"]),
                            "t": float(r.get("timestamp", 0)), "time_total_s": r.get("time_total_s"),
                            "config": r.get("config", {})})
    # A trial restarted by Tune could report an epoch twice; keep the first report of each.
    seen, uniq = set(), []
    for r in sorted(out, key=lambda r: (r["t"], r["trial"], r["epoch"])):
        if (r["trial"], r["epoch"]) not in seen:
            seen.add((r["trial"], r["epoch"]))
            uniq.append(r)
    return uniq


def to_target(reps: list[dict[str, Any]], target: float) -> int | None:
    for i, r in enumerate(reps, 1):
        if r["acc"] >= target:
            return i
    return None


def run(quick: bool = False, repeats: int | None = None, work: Path | None = None) -> dict[str, Any]:
    import time

    from raypipe import tuning
    from raypipe.config import config_from_dict

    s = settings(quick)
    work = work or Path(tempfile.mkdtemp(prefix="raypipe-bench-tune-"))
    src = C.model_source(s["model"], work)
    dev_path = C.SST2_DIR / "dev.tsv"
    if s["dev_rows"]:
        C.sst2_frame("dev", n=s["dev_rows"]).rename(columns={"text": "sentence"}).to_csv(
            work / "dev.tsv", sep="\t", index=False)
        dev_path = work / "dev.tsv"
    sweeps: dict[str, Any] = {}
    with C.ray_session(num_cpus=os.cpu_count() or 2, dashboard=True):
        for name, (sched, metric) in s["sweeps"].items():
            cfg = config_from_dict({
                "workdir": str(work / name), "name": f"tune-{name}",
                "data": {"path": str(C.SST2_DIR / "train.tsv"), "text_columns": ["sentence"],
                         "validation_path": str(dev_path), "test_path": str(dev_path),
                         "max_samples": s["train_rows"], "max_length": s["max_length"]},
                "model": {"name": src},
                "train": {"epochs": s["epochs"], "warmup_ratio": 0.0, "metric": metric,
                          "keep_checkpoints": 1, "precision": "fp32"},
                "scaling": {"num_workers": 1, "cpus_per_worker": 0.5, "use_gpu": False},
                "tracking": {"log_checkpoint": False},
                "tune": {"search_space": {"train.lr": {"grid": s["lrs"]}, "train.batch_size": {"grid": s["batch_sizes"]}},
                         "search_alg": "grid", "metric": metric, "name": f"sweep-{name}",
                         "scheduler": {"type": sched, "grace_period": s["grace_period"],
                                       "reduction_factor": s["reduction_factor"]}},
            })
            t0 = time.perf_counter()
            res = tuning.run(cfg)
            wall = time.perf_counter() - t0
            reps = reports(res.sweep_path)
            sweeps[name] = {
                "scheduler": sched, "metric": metric, "wall_s": wall, "trials": len(res.trials), "trial_epochs": len(reps),
                "best_acc": max((r["acc"] for r in reps), default=None),
                "epochs_per_trial": sorted(t["epochs"] for t in res.trials),
                "reports": reps,
            }
            C.log(f"tune {name}: {len(res.trials)} trials, {len(reps)} trial-epochs, "
                  f"best {sweeps[name]['best_acc']}, {wall:.0f}s")
    return result(s, sweeps, quick)


def result(s: dict[str, Any], sweeps: dict[str, Any], quick: bool) -> dict[str, Any]:
    ref = sweeps.get("fifo", next(iter(sweeps.values())))
    target_acc = ref["best_acc"] - TOL
    for sw in sweeps.values():
        sw["to_target"] = to_target(sw["reports"], target_acc)
    rows = []
    f = sweeps.get("fifo")
    for name, a in sweeps.items():
        if f is None or a["scheduler"] != "asha":
            continue
        frac = a["trial_epochs"] / f["trial_epochs"]
        within = a["best_acc"] >= f["best_acc"] - TOL
        rows.append({"what": f"{name} (ASHA on {a['metric']}) / FIFO trial-epochs, best within 0.5 pt",
                     "value": frac, "target": TARGET, "met": frac <= TARGET and within,
                     "asha_best": a["best_acc"], "fifo_best": f["best_acc"], "asha_within_tol": within})
    return {
        "name": "tune",
        "title": "5. Tuning efficiency: ASHA vs FIFO",
        "command": "python -m bench tune" + (" --quick" if quick else ""),
        "settings": s,
        "machine": C.machine(),
        "sweeps": sweeps,
        "rows": rows,
        "note": "one sweep per scheduler (trial-epoch counts are not timings; accuracy varies a little "
                "between runs because concurrent trials finish in a different order)",
    }
