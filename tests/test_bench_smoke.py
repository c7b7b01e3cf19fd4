"""Smoke tests: every benchmark in bench/ runs end to end in its --quick form, so none rots.

These check that the harness works and produces well-formed results — never speed (timed
assertions on a shared 2-core machine would only flake). The numbers live in BENCHMARKS.md.
The Ray-based ones share the session's local Ray (``ray_local``) and use the tiny model.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SST2 = ROOT.parent / "shared" / "data" / "sst2"
needs_sst2 = pytest.mark.skipif(not (SST2 / "train.tsv").is_file(), reason="SST-2 not found beside the checkout")


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_plain_loop_trains_and_reports_per_epoch_throughput(tmp_path):
    from transformers import AutoTokenizer

    from bench import common as C
    from bench.plain_loop import tokenize, train

    src = C.model_source("tiny", tmp_path)
    texts = ["a fine film"] * 20 + ["a dull and tiresome film"] * 20
    rows = tokenize(AutoTokenizer.from_pretrained(src), texts, [1] * 20 + [0] * 20, 16)
    res = train(src, rows, num_labels=2, batch_size=8, epochs=2, lr=1e-3, val_rows=rows)
    assert [e["epoch"] for e in res["epochs"]] == [1, 2]
    assert all(_finite(e["samples_per_s"]) and e["samples"] == 40 for e in res["epochs"])
    assert 0.0 <= res["val_accuracy"] <= 1.0


def test_hf_trainer_baseline_runs(tmp_path):
    from bench import common as C
    from bench.hf_trainer import run_trainer

    src = C.model_source("tiny", tmp_path)
    texts = ["a fine film", "a dull and tiresome film"] * 16
    res = run_trainer(src, texts, [1, 0] * 16, texts[:8], [1, 0] * 4, num_labels=2, batch_size=8, epochs=1)
    assert _finite(res["samples_per_s"]) and 0.0 <= res["accuracy"] <= 1.0
    c = res["counts"]  # the training batches' tokens, counted in the collator
    assert c["samples"] == 32 and c["steps"] == 4 and 0 < c["real_tokens"] <= c["processed_tokens"]


def test_bare_server_and_load_generator(tmp_path):
    """The serving baseline and the load generator, as separate processes, for a second."""
    from bench import common as C
    from bench.serve import _wait_ready, loadgen

    src = C.model_source("tiny", tmp_path)
    ckpt = C.checkpoint_without_training(src, tmp_path, ["neg", "pos"], 32)
    port = C.free_port()
    proc = subprocess.Popen([sys.executable, "-m", "bench.bare_server", str(ckpt), "--port", str(port)],
                            env=C.bench_env(), cwd=ROOT)
    try:
        _wait_ready(f"http://127.0.0.1:{port}", 120, proc)
        texts = tmp_path / "texts.txt"
        texts.write_text("a fine film\na dull film\n")
        res = loadgen(f"http://127.0.0.1:{port}", 4, {"duration": 0.5, "warmup": 0.1, "max_requests": 50}, texts)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert res["requests"] > 0 and not res["errors"], res
    assert 0 < res["p50_ms"] <= res["p99_ms"]
    assert res["requests"] <= 50 + 4  # bounded: at most one in flight per client past the cap


def test_startup_quick(tmp_path):
    from bench import startup

    res = startup.run(quick=True, work=tmp_path)
    assert _finite(res["seconds"]["raypipe_help"]["median"])
    assert _finite(res["seconds"]["import_raypipe"]["median"])


def test_cli_and_report_render_without_touching_benchmarks_md(tmp_path):
    """`python -m bench startup --quick --out DIR` writes JSON; the report renders every row
    into a given file (never the real BENCHMARKS.md in a smoke run)."""
    from bench import report

    out = tmp_path / "results"
    before = (ROOT / "BENCHMARKS.md").read_text() if (ROOT / "BENCHMARKS.md").exists() else None
    subprocess.run([sys.executable, "-m", "bench", "startup", "--quick", "--out", str(out)], check=True,
                   cwd=ROOT, capture_output=True, timeout=300)
    result = json.loads((out / "startup.json").read_text())
    assert result["quick"] and result["machine"]["nproc"] >= 1
    doc = tmp_path / "B.md"
    doc.write_text("# B\n\n<!-- BEGIN AUTO startup -->\nold\n<!-- END AUTO startup -->\n\nprose stays\n")
    report.write(out, doc)
    text = doc.read_text()
    assert "raypipe --help" in text and "old" not in text and "prose stays" in text
    assert "<!-- BEGIN AUTO summary -->" in text
    after = (ROOT / "BENCHMARKS.md").read_text() if (ROOT / "BENCHMARKS.md").exists() else None
    assert before == after


# ----------------------------------------------------------------------- with a real Ray


@pytest.mark.ray
@needs_sst2
def test_data_quick(ray_local):
    from bench import data

    res = data.run(quick=True)
    assert all(_finite(v["median"]) for v in res["rows_per_s"].values())
    assert _finite(res["rows"][0]["ratio"]["median"])


@pytest.mark.ray
@needs_sst2
def test_train_quick(ray_local, tmp_path):
    from bench import train

    res = train.run(quick=True, work=tmp_path)
    assert set(res["samples_per_s"]) == {"plain", "local"}
    assert _finite(res["rows"][0]["ratio"]["median"])
    assert set(res["utilisation"]) == {"plain", "local"}  # MFU against the ceiling measured in the run
    assert all(0.0 < u["mfu"]["median"] <= 1.0 and u["limit"] for u in res["utilisation"].values())


# slow tier: a benchmark harness smoke run (30-150 s on 2 cores); `make test-slow`
@pytest.mark.slow
@pytest.mark.ray
@needs_sst2
def test_sst2_quick(ray_local, tmp_path):
    from bench import sst2

    res = sst2.run(quick=True, work=tmp_path)
    row = res["rows"][0]
    assert _finite(row["ratio"]["median"])
    assert 0.0 <= row["raypipe_acc"]["median"] <= 1.0 and 0.0 <= row["trainer_acc"]["median"] <= 1.0
    u = res["utilisation"]  # same rows on both sides: the replay and the collator count the same real tokens
    rp, hf = res["raw"]["raypipe"][0]["counts"], res["raw"]["hf_trainer"][0]["counts"]
    assert rp["real_tokens"] == hf["real_tokens"] and rp["processed_tokens"] <= hf["processed_tokens"]
    assert all(0.0 < u[k]["mfu"]["median"] <= 1.0 for k in ("raypipe", "hf_trainer"))


# slow tier: a benchmark harness smoke run (30-150 s on 2 cores); `make test-slow`
@pytest.mark.slow
@pytest.mark.ray
@needs_sst2
def test_tune_quick(ray_local, tmp_path):
    from bench import tune

    res = tune.run(quick=True, work=tmp_path)
    asha = res["sweeps"]["asha_loss"]
    assert asha["trials"] == 2 and 2 <= asha["trial_epochs"] <= 4
    assert 0.0 <= asha["best_acc"] <= 1.0


# slow tier: a benchmark harness smoke run (30-150 s on 2 cores); `make test-slow`
@pytest.mark.slow
@pytest.mark.ray
@needs_sst2
def test_serve_quick(ray_local, tmp_path):
    from bench import serve

    res = serve.run(quick=True, work=tmp_path)
    m = res["models"]["tiny"]
    for row in m["table"]:
        for name in res["settings"]["servers"]:
            assert row[name]["errors"] == 0 and _finite(row[name]["rps"]["median"])
    assert _finite(m["server_forward_ms"]["serve_batched"]["median"])
    from bench import report

    assert any("p50 / p99" in line for line in report.render_serve({**res, "wall_s": 1}))


GOEMOTIONS = ROOT.parent / "shared" / "data" / "goemotions"
needs_task_data = pytest.mark.skipif(not (GOEMOTIONS / "train.tsv").is_file() or not (SST2.parent / "stsb").is_dir(),
                                     reason="GoEmotions/STS-B not found beside the checkout")


# slow tier: a benchmark harness smoke run (30-150 s on 2 cores); `make test-slow`
@pytest.mark.slow
@needs_task_data
@pytest.mark.ray
def test_tasks_quick(ray_local, tmp_path):
    """The task benchmark's whole harness: the three example configs through pipeline.run and the
    Trainer baseline, on the tiny model, 200 training rows and the first 300 lines of the
    validation/test files."""
    from bench import tasks

    res = tasks.run(quick=True, work=tmp_path)
    emo, sts = res["tasks"]["goemotions"], res["tasks"]["stsb"]
    assert emo["task"] == "multi_label" and sts["task"] == "regression"
    assert emo["train_rows"] == 200 and emo["test_rows"] == 300 and sts["test_rows"] == 299  # STS-B: a header
    assert 0.0 <= emo["raypipe_test"]["test_micro_f1"] <= 1.0 and 0.0 <= emo["trainer_test"]["micro_f1"] <= 1.0
    assert -1.0 <= sts["trainer_test"]["pearson"] <= 1.0 and "test_spearman" in sts["raypipe_test"]
    assert all(_finite(t["ratio"]) for t in (emo, sts)) and emo["registered"].startswith("models:/")
    ner = res["tasks"]["conll2003"]
    assert ner["task"] == "token_classification" and ner["train_rows"] == 200 and len(ner["sweep"]) == 2
    assert 0.0 <= ner["raypipe_test"]["test_entity_f1"] <= 1.0 and 0.0 <= ner["trainer_test"]["entity_f1"] <= 1.0
    assert _finite(ner["ratio"]) and set(ner["trainer_per_type_f1"]) == {"LOC", "MISC", "ORG", "PER"}
    assert all(0.0 < t["utilisation"][side]["mfu"]["median"] <= 1.0
               for t in (emo, sts, ner) for side in ("raypipe", "hf_trainer"))


@pytest.mark.slow
def test_batch_quick(ray_local, tmp_path):
    from bench import batch

    r = batch.run(quick=True, work=tmp_path)
    assert set(r["rows_per_s"]) >= {"plain", "raypipe_1", "raypipe_2", "hf_pipeline", "raypipe_marginal"}
    assert all(v["median"] > 0 for v in r["rows_per_s"].values())
    assert [row["side"] for row in r["rows"]][0] == "raypipe_1 / plain"


def test_ceiling_and_mfu_of_a_real_training_epoch(tmp_path):
    """The machine's ceiling (matmul FLOP/s at the model's shapes, copy bandwidth) is measured
    and a real epoch of the plain loop lands inside it: MFU in (0, 1], budget shares summing to 1,
    a sentence saying what limits it. Seconds on the tiny model."""
    import torch
    from transformers import AutoTokenizer

    from bench import ceiling as K
    from bench import common as C
    from bench.plain_loop import tokenize, train

    src = C.model_source("tiny", tmp_path)
    dims = K.model_dims(src)
    assert dims["layers"] == 2 and dims["hidden"] == 32 and 0 < dims["non_embedding_params"] < dims["params"]
    texts = ["a fine film"] * 24 + ["a dull and tiresome film that goes on and on"] * 24
    rows = tokenize(AutoTokenizer.from_pretrained(src), texts, [1] * 24 + [0] * 24, 16)
    epoch = train(src, rows, num_labels=2, batch_size=8, epochs=1, lr=1e-3)["epochs"][-1]
    counts = epoch["counts"]
    assert counts["samples"] == 48 and counts["steps"] == 6
    assert counts["real_tokens"] == int(rows["length"].sum()) <= counts["processed_tokens"]

    threads = torch.get_num_threads()
    ceil = K.measure(dims, [counts["processed_tokens"] / counts["steps"]], [threads], seconds=0.05)
    entry = ceil["by_threads"][str(threads)]
    (shapes,) = entry["by_tokens"].values()
    assert all(_finite(v) for v in shapes["fp32"].values()) and _finite(entry["copy_bytes_per_s"])
    assert _finite(entry["peak_fp32"]) and ("bf16" in shapes or ceil["bf16"].startswith("not supported"))
    u = K.utilisation(counts, epoch["seconds"], dims, ceil, threads)
    assert 0.0 < u["mfu"] <= 1.0 and 0.0 <= u["padding_fraction"] < 1.0
    assert math.isclose(u["samples_per_s"], epoch["samples_per_s"], rel_tol=1e-6)
    shares = [u["budget"][k] for k in ("compute", "padding", "optimizer_memory", "other")]
    assert all(x >= 0 for x in shares) and (math.isclose(sum(shares), 1.0, rel_tol=1e-6) or shares[-1] == 0.0)
    assert K.limit("plain", u).startswith("plain — ")


def test_raypipe_token_replay_matches_the_rows():
    """raypipe's tokens are replayed with its own batching: every row once per epoch, each batch
    padded to its longest row (so never fewer processed than real tokens)."""
    import numpy as np

    from bench import ceiling as K

    lengths = np.random.default_rng(0).integers(3, 40, size=101)
    one = K.raypipe_epoch_counts(lengths, batch_size=8, seed=42, epoch=1)
    assert one["samples"] == 101 and one["steps"] == 13 and one["real_tokens"] == int(lengths.sum())
    assert one["real_tokens"] < one["processed_tokens"] < 101 * 39
    two = K.raypipe_epoch_counts(lengths, batch_size=8, seed=42, epoch=1, workers=2)
    assert two["samples"] == 100 and two["steps"] == 14  # equal shards of 50 rows: 7 steps each


# ----------------------------------------------------------------------- 12. SFT


def _alpaca_exists() -> bool:
    from bench.sft import ALPACA

    return ALPACA.is_file()


needs_alpaca = pytest.mark.skipif(not _alpaca_exists(), reason="Alpaca not found beside the checkout")


def test_sft_plain_loop_trains_on_raypipes_rows_and_counts_lora_flops(tmp_path, tiny_lm_dir):
    """bench/sft.py's baseline: the plain loop's own encoding gives exactly the rows raypipe's data
    path gives (packed and not, bad and over-long examples dropped alike), a replayed raypipe epoch
    and a plain epoch count the same real tokens, and the LoRA FLOP count matches the adapter
    raypipe builds. Seconds, no Ray."""
    import json

    from transformers import AutoTokenizer

    from bench import plain_sft as P
    from bench import sft
    from raypipe.config import config_from_dict
    from raypipe.model import build
    from tests.conftest import SFT_PAIRS

    records = [{"instruction": p, "input": "", "output": r} for p, r in SFT_PAIRS] * 3
    records += [{"instruction": "Say nothing.", "input": "", "output": ""},  # no answer: dropped
                {"instruction": "word " * 80, "input": "", "output": "Too long."}]  # no answer token fits
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in records))
    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    s = {"max_length": 48, "batch_size": 4, "epochs": 1, "num_workers": 0}
    for packing in (True, False):
        cfg = sft.raypipe_config(tmp_path, "t", tiny_lm_dir, train, train, s, packing)
        assert cfg.model.peft is not None and cfg.data.packing is packing  # the config's LoRA default
        plain = P.encode(tok, records, 48, packing)
        assert sft._same_rows(plain, sft.raypipe_rows(cfg))
        examples = sum(len(P.segments(plain, r)) for r in range(len(plain["length"])))
        assert examples == 18 and (len(plain["length"]) < 18) is packing
        replay = sft.replay_counts(plain, cfg.train, epoch=1)
        assert replay["real_tokens"] == int(plain["length"].sum()) <= replay["processed_tokens"]
        assert replay["samples"] == len(plain["length"]) and replay["examples"] == 18
    lora = sft.lora_settings(str(tiny_lm_dir))
    epoch = P.train(str(tiny_lm_dir), plain, lora=lora, batch_size=4, epochs=1)["epochs"][0]
    assert epoch["counts"]["real_tokens"] == replay["real_tokens"] and _finite(epoch["tokens_per_s"])

    dims = sft.lm_dims(str(tiny_lm_dir), lora)
    model, _ = build(config_from_dict({"task": "sft", "model": {"name": str(tiny_lm_dir)}}).model, {}, "sft")
    assert dims["lora_params"] == model.raypipe_adapter["trainable_params"] == dims["params"]
    assert dims["no_input_grad_params"] == 3 * 64 * 64  # layer 0's q/k/v read the frozen embeddings
    m = dims["matmul_params"]
    assert dims["flops_per_token"] == 2 * m + 2 * (m - 3 * 64 * 64) + 6 * dims["lora_params"] < 6 * m


# slow tier: a benchmark harness smoke run (30-150 s on 2 cores); `make test-slow`
@pytest.mark.slow
@pytest.mark.ray
@needs_alpaca
def test_sft_quick(ray_local, tmp_path):
    """The SFT benchmark's whole harness on a few Alpaca rows: four training sides (local mode),
    the ceiling and MFU, then the trained checkpoint on Ray Serve and on the bare server under
    streamed chat load from a separate process; and its report block and summary rows."""
    from bench import common as C
    from bench import report, sft

    res = sft.run(quick=True, work=tmp_path / "work")
    assert set(res["tokens_per_s"]) == set(sft.SIDES)
    assert all(_finite(v["median"]) for v in res["tokens_per_s"].values())
    assert all(d["same_rows_as_raypipe"] for d in res["data"].values())
    assert res["data"]["packed"]["real_tokens"] == res["data"]["padded"]["real_tokens"]
    assert res["data"]["packed"]["rows"] < res["data"]["padded"]["rows"]
    first = res["rows"][0]
    assert first["target"] == sft.TARGET and _finite(first["ratio"]["median"])
    assert all(0.0 <= p["share"] < 1.0 for p in res["packing"].values())
    assert set(res["utilisation"]) == set(sft.SIDES)
    assert all(_finite(u["mfu"]["median"]) and u["limit"] for u in res["utilisation"].values())
    gen = res["generation"]
    assert [row["concurrency"] for row in gen["table"]] == [1, 8]
    for row in gen["table"]:
        for name in ("bare", "serve"):
            x = row[name]
            assert x["errors"] == 0 and x["requests"] > 0 and _finite(x["rps"]["median"])
            assert 0 < x["ttft_p50_ms"]["median"] <= x["p50_ms"]["median"]  # first text before the end
            assert 0 < x["tokens_per_request"]["median"] <= res["settings"]["gen"]["max_tokens"]
    out = tmp_path / "results"
    C.save_result("sft", {**res, "wall_s": 1.0, "quick": True}, out)
    doc = tmp_path / "B.md"
    doc.write_text("# B\n\n<!-- BEGIN AUTO sft -->\nstale table\n<!-- END AUTO sft -->\n\nprose stays\n")
    report.write(out, doc)
    text = doc.read_text()
    assert "stale table" not in text and "prose stays" in text and "TTFT" in text and "MFU" in text
    assert "| 12. SFT tokens/s, raypipe / plain loop" in text

def _bench_sst2() -> Path:
    from bench import common as C

    return C.SST2_DIR  # beside the checkout, or $RAYPIPE_BENCH_SST2


# slow tier: a benchmark harness smoke run (~2-4 min on 2 busy cores); `make test-slow`
@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.skipif(not (_bench_sst2() / "train.tsv").is_file(), reason="SST-2 not found (RAYPIPE_BENCH_SST2)")
def test_lora_quick(ray_local, tmp_path):
    """LoRA vs full fine-tuning through raypipe's training, evaluation and registration, then two
    adapters on one deployment vs two full deployments under load (inside the session's 2-CPU
    Ray the serving sides take turns); the report renders it. Structure, never speed."""
    from bench import lora, report

    res = lora.run(quick=True, work=tmp_path)
    d = res["datasets"]["sst2"]
    full, lo = d["sides"]["full"], d["sides"]["lora"]
    for side in (full, lo):
        assert side["registered"].startswith("models:/") and 0.0 <= side["test"]["test_accuracy"] <= 1.0
        assert 0.0 <= side["test"]["test_macro_f1"] <= 1.0 and _finite(side["samples_per_s"])
        assert side["peak_rss"] and side["peak_rss"] > 100 * 2**20  # the Train worker was found and read
        assert side["checkpoint_size"]["weights"] > 0 and side["registered_size"]["total"] > 0
    assert lo["peft"]["r"] == 8 and full["peft"] is None
    assert lo["registered_size"]["weights"] * 20 < full["registered_size"]["weights"]  # adapter vs whole model
    p = d["params"]
    assert 0 < p["lora"]["lora"] < p["lora"]["trainable"] < p["full"]["trainable"]
    dims = res["model_dims"]["sst2"]["lora"]
    assert dims["frozen_non_embedding_params"] + dims["trainable_params"] == dims["non_embedding_params"]
    assert all(0.0 < d["utilisation"][s]["mfu"]["median"] <= 1.0 for s in ("full", "lora"))

    v = res["serving"]
    assert not v["together"]  # the session's Ray has 2 CPUs: one side at a time
    assert [m["id"] for m in v["models"]["lora"]] == ["lora-0", "lora-1"]
    expect = {"adapters_1": 1, "adapters_2": 2, "full": 2}
    for side, replicas in expect.items():
        (run,) = v["raw"][side]
        assert run["errors"] == {} and run["requests"] > 0 and run["memory"]["replicas"] == replicas
        assert all(n > 0 for n in run["by_target"].values()) and len(run["by_target"]) == 2
        assert run["memory"]["rss"] > 0 and 0 < run["memory"]["pss"] <= run["memory"]["rss"]
    assert _finite(v["ratios"]["adapters_1"]["rss"]["median"])
    assert [row["target"] for row in res["rows"]] == [lora.TARGET_SIZE_X, lora.TARGET_ACC_PT, lora.TARGET_MEMORY]

    lines = report.render_lora({**res, "wall_s": 1, "quick": True})
    assert any(line.startswith("| **sst2**") for line in lines) and any("1 deployment × 2 replicas" in x for x in lines)
    assert sum(line.startswith("| 11. ") for line in report.summary({"lora": res})) == 4
