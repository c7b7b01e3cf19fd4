"""Benchmark 12 — SFT (``task: sft``): training throughput vs a plain loop, packing, and
generation serving (Ray Serve vs bare uvicorn), on the tiny causal LM and real Alpaca rows.

Model: ``examples/tiny_lm.py`` (a 2-layer, 64-wide random-init Llama with a 512-token byte-level
BPE tokenizer trained on the first 2,000 Alpaca records, as examples/configs/alpaca_sft.yaml
builds it; no pretrained causal LM exists on these machines). Data: a fixed-seed sample of
``../shared/data/alpaca/alpaca_data.json`` (records with an answer), read in place; training,
validation and generation prompts are disjoint.

Part 1, training, sides run alternately (``common.alternate``) in one Ray session:
  raypipe_packed   ``training.run`` with examples/configs/alpaca_sft.yaml as it is but for the data
                   paths, the model path and ``model.peft`` left at the task's default (LoRA on):
                   packing on, max_length 256, batch 16, lr 2e-3, fp32; 1 worker x auto CPUs
  plain_packed     bench.plain_sft: plain PyTorch + transformers + peft, the same LoRA settings,
                   rows, batch, schedule; in this process (torch's default threads: all cores)
  raypipe_padded   as raypipe_packed with ``data.packing: false`` (padded rows grouped by length)
  plain_padded     as plain_packed without packing
Both sides train 3 epochs; the last is measured (training steps only: raypipe's own per-epoch
``samples_per_s``, the plain loop's epoch timed the same way; see bench/train.py for why not
epoch 2). Tokens are counted the same way on both sides: the plain loop counts the rows it feeds,
raypipe's rows are encoded by raypipe's own data path and its batches replayed with
``raypipe.loop._batches`` on the same (seed, epoch, rank) stream; the benchmark checks that the two
encodings are identical. Real tokens = non-pad tokens; padding is reported apart.

MFU: ``bench.ceiling`` (matmul FLOP/s at the model's shapes on each side's threads, measured in
this run) against model FLOPs per real token for LoRA training, where the frozen weights get no
weight gradient: 2 (forward) x every matmul weight + 2 (input gradient) x every matmul weight whose
input needs a gradient (all but the first layer's q/k/v projections, fed by the frozen embeddings)
+ 6 x the LoRA matrices, the tied lm_head counted as a matmul and the embedding lookup not; plus
attention 12 L H Σ len² over each example (not across the examples of a packed row). The
attention a packed row computes across its examples (masked) counts as padding work.

Part 2, packing: from the same runs, the share of pad tokens and real tokens/s with and without.

Part 3, generation: the checkpoint raypipe trained in part 1 (the last packed run's best: a LoRA
adapter on the tiny base) is served twice — ``raypipe.serve.deploy`` (Ray Serve, serve.* defaults:
one replica of 1 CPU, max_batch_size 32, 5 ms batch wait) and ``bench.bare_lm_server`` (one
uvicorn process, the same app and generation engine, 1 torch thread like the replica). Load comes
from ``bench.genload`` (its own process, httpx): streamed ``/v1/chat/completions``, a fixed
``max_tokens``, temperature 0, held-out Alpaca prompts in the same order for both servers, at
concurrency 1 and 8, the servers taking turns in rotating order per repeat.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import common as C



def _alpaca() -> Path:
    """$RAYPIPE_BENCH_ALPACA, else alpaca/alpaca_data.json under $RAYPIPE_DATA_DIR or the
    ``shared/data`` beside the checkout (for a git worktree: beside the main checkout)."""
    if os.environ.get("RAYPIPE_BENCH_ALPACA"):
        return Path(os.environ["RAYPIPE_BENCH_ALPACA"])
    roots = [Path(os.environ["RAYPIPE_DATA_DIR"])] if os.environ.get("RAYPIPE_DATA_DIR") else []
    roots.append(C.ROOT.parent / "shared" / "data")
    try:
        common = subprocess.run(["git", "rev-parse", "--path-format=absolute", "--git-common-dir"], cwd=C.ROOT,
                                capture_output=True, text=True, timeout=10).stdout.strip()
        if common:
            roots.append(Path(common).parent.parent / "shared" / "data")
    except (OSError, subprocess.SubprocessError):
        pass
    found = [r / "alpaca" / "alpaca_data.json" for r in roots if (r / "alpaca" / "alpaca_data.json").is_file()]
    return found[0] if found else roots[0] / "alpaca" / "alpaca_data.json"


ALPACA = _alpaca()
CONFIG = C.ROOT / "examples" / "configs" / "alpaca_sft.yaml"
TARGET = 0.9  # SFT tokens/s, raypipe / plain loop
SIDES = ["plain_packed", "raypipe_packed", "plain_padded", "raypipe_padded"]
LABELS = {"plain_packed": "plain loop, packing", "raypipe_packed": "raypipe, packing (the config)",
          "plain_padded": "plain loop, no packing", "raypipe_padded": "raypipe, no packing"}


def settings(quick: bool) -> dict[str, Any]:
    if quick:
        return {"train_rows": 24, "val_rows": 8, "prompts": 24, "tokenizer_rows": 200, "max_length": 128,
                "batch_size": 8, "epochs": 2, "repeats": 1, "num_workers": 0,
                "gen": {"concurrency": [1, 8], "duration": 1.0, "warmup": 0.3, "max_requests": 100,
                        "max_tokens": 8, "repeats": 1}}
    # Sized for ~10-15 minutes on 2 shared cores: 4 training runs of 3 epochs per repeat (the
    # Ray side adds ~30 s of start, validation and checkpoints per run), then the servers. The
    # model is tiny (~20-30k real tokens/s on 2 idle cores), so 768 examples (~110k tokens) keep
    # a measured epoch at several seconds, long against per-epoch noise.
    return {"train_rows": 768, "val_rows": 32, "prompts": 200, "tokenizer_rows": 2000, "max_length": None,
            "batch_size": None, "epochs": 3, "repeats": 2, "num_workers": 1,
            "gen": {"concurrency": [1, 8], "duration": 8.0, "warmup": 2.0, "max_requests": 2000,
                    "max_tokens": 32, "repeats": 2}}


# ----------------------------------------------------------------------------- data and model


def _sample(s: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[str]]:
    """Training records, validation records and generation prompts: disjoint, fixed seed."""
    from bench.plain_sft import alpaca_messages

    records = [r for r in json.loads(ALPACA.read_text(encoding="utf-8")) if alpaca_messages(r) is not None]
    pick = random.Random(0).sample(range(len(records)), s["train_rows"] + s["val_rows"] + s["prompts"])
    train = [records[i] for i in pick[: s["train_rows"]]]
    val = [records[i] for i in pick[s["train_rows"]: s["train_rows"] + s["val_rows"]]]
    prompts = [alpaca_messages(records[i])[0][0]["content"] for i in pick[s["train_rows"] + s["val_rows"]:]]
    return train, val, prompts


def _jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def build_tiny_lm(out: Path, limit: int) -> Path:
    """examples/tiny_lm.py, tokenizer trained on the first ``limit`` Alpaca records."""
    if (out / "config.json").is_file():
        return out
    import importlib.util

    spec = importlib.util.spec_from_file_location("tiny_lm", C.ROOT / "examples" / "tiny_lm.py")
    assert spec is not None and spec.loader is not None
    tiny_lm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny_lm)
    return tiny_lm.build(out, tiny_lm.texts_of(ALPACA, limit))


def lm_dims(model_dir: str, lora: dict[str, Any] | None) -> dict[str, Any]:
    """Shapes and FLOP accounting of the causal LM with LoRA (from its config, on the meta device).

    ``non_embedding_params`` is set so that ``bench.ceiling``'s 6 N per token gives the LoRA
    count in the module docstring; ``params`` (what the optimiser touches per step, for the
    memory budget) is the trainable parameters."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    linears = {n: m.weight.numel() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    matmul = sum(linears.values())
    total = sum(p.numel() for p in model.parameters())
    out: dict[str, Any] = {"hidden": int(cfg.hidden_size), "intermediate": int(cfg.intermediate_size),
                           "layers": int(cfg.num_hidden_layers), "vocab": int(cfg.vocab_size),
                           "total_params": int(total), "matmul_params": int(matmul)}
    if lora:
        targets = tuple(lora["target_modules"])
        adapted = [n for n in linears if n.rsplit(".", 1)[-1] in targets]
        mods = dict(model.named_modules())
        lora_params = sum(lora["r"] * (mods[n].in_features + mods[n].out_features) for n in adapted)
        # the first layer's q/k/v read the frozen embeddings: autograd computes no input gradient there
        no_input_grad = sum(v for n, v in linears.items() if re.search(r"layers\.0\.self_attn\.[qkv]_proj$", n))
        per_token = 2 * matmul + 2 * (matmul - no_input_grad) + 6 * lora_params
        out.update(lora_params=int(lora_params), no_input_grad_params=int(no_input_grad), params=int(lora_params),
                   formula="2 x matmul weights + 2 x those needing an input gradient + 6 x LoRA, per real token; "
                           "+ 12 L H len^2 per example")
    else:
        per_token = 6 * matmul
        out.update(params=int(total), formula="6 x matmul weights per real token + 12 L H len^2 per example")
    out["flops_per_token"] = int(per_token)
    out["non_embedding_params"] = per_token / 6.0
    return out


def lora_settings(model_dir: str) -> dict[str, Any]:
    """raypipe's LoRA defaults for this model (``model.peft`` unset for task sft)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from raypipe.adapters import resolve_targets
    from raypipe.config import PeftConfig

    p = PeftConfig()
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    return {"r": p.r, "alpha": p.alpha, "dropout": p.dropout, "target_modules": resolve_targets(skeleton, p.target_modules)}


def raypipe_config(work: Path, name: str, model: Path, train: Path, val: Path, s: dict[str, Any], packing: bool) -> Any:
    """examples/configs/alpaca_sft.yaml with this run's paths, LoRA at the task's default."""
    import yaml

    from raypipe.config import config_from_dict

    tree = yaml.safe_load(CONFIG.read_text(encoding="utf-8"))
    tree["model"].pop("peft", None)  # task sft: LoRA unless `model.peft: false`
    tree["model"]["name"] = str(model)
    tree.update(workdir=str(work / name), name=name)
    tree["data"].update(path=str(train), validation_path=str(val), test_path=str(val), max_samples=None,
                        packing=packing)
    tree["data"]["max_length"] = s["max_length"] or tree["data"]["max_length"]
    tree["train"].update(epochs=s["epochs"], keep_checkpoints=1)
    tree["train"]["batch_size"] = s["batch_size"] or tree["train"]["batch_size"]
    tree["scaling"].update(num_workers=s["num_workers"], use_gpu=False)
    tree["tracking"] = {**tree.get("tracking", {}), "log_checkpoint": False}
    return config_from_dict(tree)


def raypipe_rows(cfg: Any) -> dict[str, Any]:
    """The training rows exactly as ``training.run`` encodes them (load_splits, then the driver's
    tokenisation of ``to_ray_dataset``), as numpy arrays."""
    import numpy as np
    import pyarrow as pa

    from raypipe.data import Tokenize, _tokenised_blocks, load_splits
    from raypipe.model import resolve_model_source

    splits = load_splits(cfg.data, cfg.task)
    tok = Tokenize(resolve_model_source(cfg.model.name), cfg.data.max_length, splits.task, splits.schema)
    table = pa.concat_tables(_tokenised_blocks(splits.train.reset_index(drop=True), tok))
    out = {}
    for k in table.column_names:
        col = table.column(k).to_numpy(zero_copy_only=False)
        out[k] = np.stack(col) if col.dtype == object else np.asarray(col)
    return out


def replay_counts(rows: dict[str, Any], train_cfg: Any, epoch: int) -> dict[str, float]:
    """The tokens raypipe's loop processed in ``epoch`` (1 worker): its random stream and its own
    batching function on its encoded rows, counted by ``plain_sft.add_batch``."""
    import numpy as np

    from bench.plain_sft import add_batch, new_counts
    from raypipe.loop import _batches

    n = len(rows["length"])
    rng = np.random.default_rng([train_cfg.seed, epoch, 0])
    keep = np.sort(rng.permutation(n)[:n])
    counts = new_counts()
    for b in _batches(rows["length"][keep], train_cfg.batch_size, rng, train_cfg.length_grouping):
        add_batch(counts, rows, keep[b])
    return counts


def _same_rows(a: dict[str, Any], b: dict[str, Any]) -> bool:
    import numpy as np

    keys = set(a) - {"_example"}
    return keys == set(b) - {"_example"} and all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in keys)


# ----------------------------------------------------------------------------- run


def run(quick: bool = False, repeats: int | None = None, work: Path | None = None) -> dict[str, Any]:
    import torch
    from transformers import AutoTokenizer

    from bench import ceiling as K
    from bench import plain_sft as P
    from raypipe import training

    s = settings(quick)
    s["repeats"] = repeats or s["repeats"]
    s["gen"]["repeats"] = repeats or s["gen"]["repeats"]  # --repeats: the training sides and the servers
    work = work or Path(tempfile.mkdtemp(prefix="raypipe-bench-sft-"))
    ncpu = os.cpu_count() or 2
    t0 = time.perf_counter()
    model = build_tiny_lm(work / "tiny-lm", s["tokenizer_rows"])
    C.log(f"tiny LM built in {time.perf_counter() - t0:.1f}s")
    train_recs, val_recs, prompts = _sample(s)
    train_file, val_file = _jsonl(work / "train.jsonl", train_recs), _jsonl(work / "val.jsonl", val_recs)
    prompts_file = _jsonl(work / "prompts.jsonl", prompts)
    lora = lora_settings(str(model))
    dims = lm_dims(str(model), lora)

    cfgs = {p: raypipe_config(work, "probe", model, train_file, val_file, s, p) for p in (True, False)}
    tc = cfgs[True].train
    s.update(max_length=cfgs[True].data.max_length, batch_size=tc.batch_size, lr=tc.lr, warmup_ratio=tc.warmup_ratio,
             weight_decay=tc.weight_decay, precision=tc.precision, lora=lora, model_dir=str(model))
    tok = AutoTokenizer.from_pretrained(model)
    plain_rows = {p: P.encode(tok, train_recs, s["max_length"], p) for p in (True, False)}
    rp_rows = {p: raypipe_rows(cfgs[p]) for p in (True, False)}
    data = {("packed" if p else "padded"): {
        "rows": int(len(plain_rows[p]["length"])), "examples": int(sum(len(P.segments(plain_rows[p], r))
                                                                       for r in range(len(plain_rows[p]["length"])))),
        "real_tokens": int(plain_rows[p]["length"].sum()), "same_rows_as_raypipe": _same_rows(plain_rows[p], rp_rows[p]),
    } for p in (True, False)}
    C.log(f"data: {data}")

    counter = {"n": 0}
    checkpoints: list[str] = []

    def plain(packing: bool) -> Any:
        def side() -> dict[str, Any]:
            r = P.train(str(model), plain_rows[packing], lora=lora, batch_size=tc.batch_size, epochs=s["epochs"],
                        lr=tc.lr, weight_decay=tc.weight_decay, warmup_ratio=tc.warmup_ratio,
                        max_grad_norm=tc.max_grad_norm, seed=tc.seed, group_by_length=tc.length_grouping)
            last = r["epochs"][-1]
            return {"samples_per_s": last["samples_per_s"], "tokens_per_s": last["tokens_per_s"],
                    "epochs": [e["samples_per_s"] for e in r["epochs"]], "counts": last["counts"],
                    "seconds": last["seconds"], "train_loss": last["train_loss"],
                    "trainable_params": r["trainable_params"]}
        return side

    def ray(packing: bool) -> Any:
        def side() -> dict[str, Any]:
            from raypipe.model import read_meta

            counter["n"] += 1
            cfg = raypipe_config(work, f"sft{counter['n']}", model, train_file, val_file, s, packing)
            res = training.run(cfg)
            hist = res.history
            counts = replay_counts(rp_rows[packing], cfg.train, len(hist))
            seconds = counts["samples"] / hist[-1]["samples_per_s"]
            if packing and res.best_checkpoint:
                checkpoints.append(res.best_checkpoint)
            peft = (read_meta(res.best_checkpoint).get("peft") or {}) if res.best_checkpoint else {}
            return {"samples_per_s": hist[-1]["samples_per_s"], "tokens_per_s": counts["real_tokens"] / seconds,
                    "epochs": [h["samples_per_s"] for h in hist], "counts": counts, "seconds": seconds,
                    "train_loss": hist[-1]["train_loss"], "val_loss": hist[-1].get("val_loss"),
                    "trainable_params": peft.get("trainable_params")}
        return side

    sides = {"plain_packed": plain(True), "raypipe_packed": ray(True), "plain_padded": plain(False),
             "raypipe_padded": ray(False)}
    ray_threads = ncpu if s["num_workers"] else torch.get_num_threads()  # auto: a lone worker gets every core
    threads = {"plain_packed": torch.get_num_threads(), "plain_padded": torch.get_num_threads(),
               "raypipe_packed": ray_threads, "raypipe_padded": ray_threads}
    shapes = [int(plain_rows[p]["length"].max()) * tc.batch_size for p in (True, False)]
    shapes += [int(plain_rows[False]["length"].mean() * tc.batch_size)]

    def ceiling() -> dict[str, Any]:
        return K.measure(dims, shapes, sorted(set(threads.values())), seconds=0.1 if quick else 0.3)

    before = ceiling()
    with C.ray_session(num_cpus=ncpu):
        raw = C.alternate(sides, s["repeats"], "sft")
        ceil = K.best_of(before, ceiling())
        generation = _generation(checkpoints[-1], prompts_file, s, work) if checkpoints else {"error": "no checkpoint"}
    out = summarise(raw, s, data, dims, quick)
    out["ceiling"], out["threads"] = ceil, threads
    util = {}
    for pair, base in ((("plain_packed", "raypipe_packed"), "plain_packed"), (("plain_padded", "raypipe_padded"), "plain_padded")):
        util.update(K.summarise_sides({k: raw[k] for k in pair}, dims, ceil, threads, "fp32", baseline=base, ncpu=ncpu,
                                      names=LABELS))
    out["utilisation"] = {k: util[k] for k in SIDES if k in util}
    out["generation"] = generation
    out["rows"] += generation.get("rows", [])
    return out


def summarise(raw: dict[str, list[dict[str, Any]]], s: dict[str, Any], data: dict[str, Any], dims: dict[str, Any],
              quick: bool) -> dict[str, Any]:
    tps = {k: [r["tokens_per_s"] for r in v] for k, v in raw.items()}

    def ratio(a: str, b: str) -> dict[str, float]:
        return C.stats(x / y for x, y in zip(tps[a], tps[b]))

    def pad(side: str) -> dict[str, float]:
        c = raw[side][0]["counts"]  # the same rows every repeat; epochs differ only in batch order
        return {"pad_tokens": c["processed_tokens"] - c["real_tokens"], "processed_tokens": c["processed_tokens"],
                "real_tokens": c["real_tokens"], "steps": c["steps"], "rows": c["samples"],
                "share": 1.0 - c["real_tokens"] / max(c["processed_tokens"], 1),
                "attention_waste": 1.0 - c["real_sq"] / max(c["processed_sq"], 1)}

    packing = {side: pad(side) for side in SIDES}
    saved = 1.0 - packing["raypipe_packed"]["pad_tokens"] / max(packing["raypipe_padded"]["pad_tokens"], 1)
    main = ratio("raypipe_packed", "plain_packed")
    rows = [
        {"what": "SFT tokens/s, raypipe / plain loop (the config: packing, LoRA)", "ratio": main, "target": TARGET,
         "met": main["median"] >= TARGET},
        {"what": "SFT tokens/s, raypipe / plain loop (no packing, LoRA)", "ratio": ratio("raypipe_padded", "plain_padded"),
         "target": None, "met": None},
        {"what": "packing: pad tokens saved (raypipe, per epoch)", "value": saved,
         "detail": f"pad share {100 * packing['raypipe_padded']['share']:.1f}% → {100 * packing['raypipe_packed']['share']:.1f}%",
         "target": None, "met": None},
        {"what": "packing: real tokens/s, packed / not packed (raypipe)", "ratio": ratio("raypipe_packed", "raypipe_padded"),
         "target": None, "met": None},
        {"what": "packing: real tokens/s, packed / not packed (plain loop)", "ratio": ratio("plain_packed", "plain_padded"),
         "target": None, "met": None},
    ]
    return {
        "name": "sft",
        "title": "12. SFT: training throughput, packing and generation serving",
        "command": "python -m bench sft" + (" --quick" if quick else ""),
        "settings": s,
        "machine": C.machine(),
        "model_dims": dims,
        "data": data,
        "raw": raw,
        "tokens_per_s": {k: C.stats(v) for k, v in tps.items()},
        "samples_per_s": {k: C.stats(r["samples_per_s"] for r in v) for k, v in raw.items()},
        "packing": packing,
        "rows": rows,
    }


# ----------------------------------------------------------------------------- generation


def genload(url: str, c: int, g: dict[str, Any], prompts: Path) -> dict[str, Any]:
    cmd = [C.python(), "-m", "bench.genload", url, "--concurrency", str(c), "--duration", str(g["duration"]),
           "--warmup", str(g["warmup"]), "--max-requests", str(g["max_requests"]), "--max-tokens", str(g["max_tokens"]),
           "--prompts", str(prompts)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=C.bench_env(), cwd=C.ROOT,
                         timeout=g["duration"] + g["warmup"] + 300)
    if out.returncode != 0:
        raise RuntimeError(f"genload failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _in_process(ckpt: str, prompts: Path, max_tokens: int) -> dict[str, Any]:
    """The engine's own speed in this process on 1 thread: one prompt alone, and 8 together."""
    import torch

    from raypipe.generation import SamplingParams, generate_batch
    from raypipe.predict import Predictor
    from raypipe.tasks.sft import prompt_ids

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pred = Predictor.from_dir(ckpt, device="cpu")
        texts = [json.loads(x) for x in prompts.read_text(encoding="utf-8").splitlines()[:16]]
        ids = [prompt_ids(pred.tokenizer, [{"role": "user", "content": t}]) for t in texts]
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
        generate_batch(pred.model, pred.tokenizer, ids[:2], [params] * 2)  # warm-up
        one, tokens = [], []
        for p in ids[:8]:
            t0 = time.perf_counter()
            (c,) = generate_batch(pred.model, pred.tokenizer, [p], [params])
            one.append((time.perf_counter() - t0) * 1000)
            tokens.append(c.completion_tokens)
        t0 = time.perf_counter()
        eight = generate_batch(pred.model, pred.tokenizer, ids[8:16], [params] * len(ids[8:16]))
        batch_ms = (time.perf_counter() - t0) * 1000
        return {"one_request_ms": C.stats(one), "tokens_per_request": sum(tokens) / len(tokens),
                "prompt_tokens_mean": sum(len(p) for p in ids) / len(ids),
                "batch_of_8_ms": batch_ms, "batch_of_8_tokens": sum(c.completion_tokens for c in eight)}
    finally:
        torch.set_num_threads(before)


def _generation(ckpt: str, prompts: Path, s: dict[str, Any], work: Path) -> dict[str, Any]:
    """Serve app vs bare uvicorn on the trained checkpoint, inside run()'s Ray session."""
    from ray import serve

    from bench.serve import _get, _wait_ready
    from raypipe import serve as rserve
    from raypipe.config import config_from_dict

    g = s["gen"]
    in_process = _in_process(ckpt, prompts, g["max_tokens"])
    C.log(f"in-process generation: {in_process}")
    port = C.free_port()
    bare_url = f"http://127.0.0.1:{port}"
    bare = subprocess.Popen([C.python(), "-m", "bench.bare_lm_server", ckpt, "--port", str(port), "--threads", "1"],
                            env=C.bench_env(), cwd=C.ROOT)
    startup: dict[str, float] = {}
    raw: dict[str, dict[str, list[dict[str, Any]]]] = {}
    names = ["bare", "serve"]
    try:
        startup["bare_to_ready_s"] = _wait_ready(bare_url, 180, bare)
        cfg = config_from_dict({"workdir": str(work / "serve"), "serve": {"port": C.free_port(), "app_name": "sft-bench"}})
        t0 = time.perf_counter()
        served = rserve.deploy(cfg, ckpt, ready_timeout_s=300)
        startup["serve_deploy_s"] = time.perf_counter() - t0
        urls = {"bare": bare_url, "serve": served.url}
        try:
            for r in range(g["repeats"]):
                for c in g["concurrency"]:
                    order = names[(r + c) % 2:] + names[: (r + c) % 2]
                    for name in order:
                        before = _get(f"{urls[name]}/stats")
                        res = genload(urls[name], c, g, prompts)
                        after = _get(f"{urls[name]}/stats")
                        nb = after["batches"] - before["batches"]
                        res["mean_batch"] = (after["requests"] - before["requests"]) / nb if nb > 0 else None
                        raw.setdefault(name, {}).setdefault(str(c), []).append(res)
                        C.log(f"gen r{r + 1} c={c} {name}: {res['rps']:.2f} req/s TTFT p50 {res['ttft_p50_ms']:.0f} ms "
                              f"p50 {res['p50_ms']:.0f} ms, {res['tokens_per_request']:.1f} tok/req, "
                              f"errors {res['errors']}")
            batch_stats = {n: _get(f"{u}/stats") for n, u in urls.items()}
        finally:
            serve.shutdown()
    finally:
        bare.terminate()
        try:
            bare.wait(timeout=20)
        except subprocess.TimeoutExpired:
            bare.kill()

    table = []
    rows = []
    for c in g["concurrency"]:
        row: dict[str, Any] = {"concurrency": c}
        for name in names:
            runs = raw[name][str(c)]
            row[name] = {k: C.stats(x[k] for x in runs) for k in
                         ("rps", "ttft_p50_ms", "ttft_p99_ms", "p50_ms", "p99_ms", "output_tokens_per_s",
                          "tokens_per_request")}
            row[name]["mean_batch"] = C.stats(x["mean_batch"] for x in runs if x.get("mean_batch") is not None)
            row[name]["errors"] = sum(sum(x["errors"].values()) for x in runs)
            row[name]["requests"] = sum(x["requests"] for x in runs)
        row["rps_ratio"] = C.stats(a["rps"] / b["rps"] for a, b in zip(raw["serve"][str(c)], raw["bare"][str(c)]))
        row["ttft_delta_ms"] = C.stats(a["ttft_p50_ms"] - b["ttft_p50_ms"]
                                       for a, b in zip(raw["serve"][str(c)], raw["bare"][str(c)]))
        table.append(row)
        rows.append({"what": f"generation req/s at c={c}, Serve / bare", "ratio": row["rps_ratio"], "target": None,
                     "met": None})
        rows.append({"what": f"generation TTFT p50 at c={c}, Serve vs bare", "value_ms": (
            row["serve"]["ttft_p50_ms"], row["bare"]["ttft_p50_ms"]), "delta_ms": row["ttft_delta_ms"],
            "target": None, "met": None})
    return {"checkpoint": ckpt, "in_process": in_process, "startup": startup, "raw": raw, "table": table,
            "batch_stats": batch_stats, "rows": rows}


# ----------------------------------------------------------------------------- report


def render(r: dict[str, Any]) -> list[str]:
    """BENCHMARKS.md's auto block of section 12."""
    from bench import report as R

    s, d, dims = r["settings"], r["data"], r["model_dims"]
    lora = s.get("lora") or {}
    out = R.header(r) + [
        f"Tiny Llama ({dims['layers']} layers, hidden {dims['hidden']}, vocab {dims['vocab']}, "
        f"{dims['total_params']:,} parameters; LoRA r={lora.get('r')} on {', '.join(lora.get('target_modules', []))}: "
        f"{dims.get('lora_params', 0):,} trainable). {s['train_rows']} Alpaca examples, max_length {s['max_length']}, "
        f"batch {s['batch_size']}, lr {s['lr']}, fp32, {s['epochs']} epochs per run (the last measured), "
        f"{s['repeats']} alternating repeats; raypipe with {s['num_workers']} worker(s)"
        + (" (local mode: --quick)" if not s["num_workers"] else "") + ".", "",
        "Rows per epoch: " + "; ".join(f"{k}: {v['rows']} rows holding {v['examples']} examples, {v['real_tokens']:,} real "
                                       f"tokens, the same rows as raypipe's encoding: {'yes' if v['same_rows_as_raypipe'] else '**no**'}"
                                       for k, v in d.items()) + ".", "",
        "| side | real tokens/s | rows/s | pad share | attention computed but masked or pad | steps/epoch "
        "| final train loss |", "|---|---|---|---|---|---|---|",
    ]
    for side in SIDES:
        if side not in r["tokens_per_s"]:
            continue
        p = r["packing"][side]
        loss = C.stats(x["train_loss"] for x in r["raw"][side])
        out.append(f"| {LABELS[side]} | {C.fmt_num(r['tokens_per_s'][side], 0)} | {C.fmt_num(r['samples_per_s'][side], 1)} | "
                   f"{100 * p['share']:.1f}% | {100 * p['attention_waste']:.0f}% | {p['steps']} | {C.fmt_num(loss, 3)} |")
    out += ["", "| comparison | value | target | |", "|---|---|---|---|"]
    for row in r["rows"]:
        out.append(_row_line(row, R._yes))
    if r.get("utilisation"):
        out += ["", R.ceiling_line(r["ceiling"]), "",
                f"Over the last epoch of each run, against that ceiling. Model FLOPs per real token: {dims['flops_per_token']:,} "
                f"= 2 × {dims['matmul_params']:,} matmul weights (forward, lm_head included) + 2 × "
                f"{dims['matmul_params'] - dims.get('no_input_grad_params', 0):,} (input gradients; none for the first "
                f"layer's q/k/v) + 6 × {dims.get('lora_params', 0):,} LoRA weights (no weight gradient for frozen "
                "weights), plus attention 12·L·H·len² per example. A packed row's attention across its examples "
                "(masked, still computed) counts as padding. \"samples/s\" = rows/s.", ""]
        out += R.render_utilisation(r["utilisation"], LABELS)
    gen = r.get("generation") or {}
    if gen.get("table"):
        ip = gen["in_process"]
        g = s["gen"]
        out += ["", f"**Generation** (the checkpoint trained above, served; streamed /v1/chat/completions, "
                f"max_tokens {g['max_tokens']}, temperature 0, held-out Alpaca prompts in the same order for both "
                f"servers; {g['duration']} s per measurement after {g['warmup']} s warm-up, {g['repeats']} rotating "
                f"repeats). In-process engine on 1 thread: one request {C.fmt_num(ip['one_request_ms'], 0)} ms for "
                f"{ip['tokens_per_request']:.1f} tokens (prompts {ip['prompt_tokens_mean']:.0f} tokens), 8 together "
                f"{ip['batch_of_8_ms']:.0f} ms for {ip['batch_of_8_tokens']} tokens. Start-up: "
                + ", ".join(f"{k} {v:.1f} s" for k, v in gen["startup"].items()) + ".", "",
                "| c | server | req/s | TTFT p50 / p99 ms | latency p50 / p99 ms | output tokens/s | tokens/request "
                "| requests per generation batch | errors |", "|---|---|---|---|---|---|---|---|---|"]
        for row in gen["table"]:
            for name in ("bare", "serve"):
                x = row[name]
                label = "bare uvicorn" if name == "bare" else "Ray Serve"
                out.append(f"| {row['concurrency']} | {label} | {C.fmt_num(x['rps'], 2)} | "
                           f"{x['ttft_p50_ms']['median']:.0f} / {x['ttft_p99_ms']['median']:.0f} | "
                           f"{x['p50_ms']['median']:.0f} / {x['p99_ms']['median']:.0f} | "
                           f"{C.fmt_num(x['output_tokens_per_s'], 0)} | {x['tokens_per_request']['median']:.1f} | "
                           f"{C.fmt_num(x['mean_batch'], 2)} | {x['errors']} |")
    elif gen.get("error"):
        out += ["", f"Generation: not measured ({gen['error']})."]
    return out


def _row_line(row: dict[str, Any], yes: Any, target_first: bool = False) -> str:
    tgt = f"≥ {row['target']}×" if row.get("target") else "—"
    if "ratio" in row:
        val = C.fmt_ratio(row["ratio"])
    elif "value_ms" in row:
        a, b = row["value_ms"]
        val = f"{a['median']:.0f} vs {b['median']:.0f} ms (Serve − bare {C.fmt_num(row['delta_ms'], 0)} ms)"
    else:
        val = f"{100 * row['value']:.0f}%" + (f" ({row['detail']})" if row.get("detail") else "")
    cells = (tgt, val) if target_first else (val, tgt)
    return f"| {row['what']} | {cells[0]} | {cells[1]} | {yes(row['met'])} |"


def summary(r: dict[str, Any]) -> list[str]:
    """Rows of BENCHMARKS.md's summary table."""
    from bench import report as R

    out = []
    for row in r["rows"]:
        out.append("| 12. " + _row_line(row, R._yes, target_first=True)[2:])
    if r.get("utilisation"):
        out.append("| 12. SFT MFU (last epoch, LoRA FLOPs, vs the fp32 ceiling measured in the run) | — | "
                   + ", ".join(f"{k} {u['mfu']['median']:.3f}" for k, u in r["utilisation"].items()) + " | — |")
    return out
