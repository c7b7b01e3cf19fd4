"""Turn ``bench/results/*.json`` into the tables of BENCHMARKS.md.

Only the blocks between ``<!-- BEGIN AUTO name -->`` and ``<!-- END AUTO name -->`` are
rewritten; the prose around them (what limits each number, profiles, decisions) is kept.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from bench import common as C

DOC = C.ROOT / "BENCHMARKS.md"


def _yes(met: Any) -> str:
    return "—" if met is None else ("**met**" if met else "**missed**")


def machine_line(r: dict[str, Any]) -> str:
    m = r.get("machine", {})
    v = m.get("versions", {})
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ""
    load = "/".join(str(x) for x in m.get("load_avg_at_start", []))
    return (f"Machine: {m.get('nproc')} × {m.get('cpu')}, {m.get('ram_gib')} GiB RAM{gpu}; load average at start "
            f"{load} (shared machine). Date {m.get('date')}, commit {m.get('git')}. Versions: Python {v.get('python')}, "
            f"torch {v.get('torch')}, transformers {v.get('transformers')}, ray {v.get('ray')}, "
            f"tokenizers {v.get('tokenizers')}, fastapi {v.get('fastapi')}, uvicorn {v.get('uvicorn')}. "
            f"Wall time of the benchmark: {r.get('wall_s', '?')} s.")


def header(r: dict[str, Any]) -> list[str]:
    quick = " (**--quick smoke numbers, not results**)" if r.get("quick") else ""
    return [f"Command: `{r['command']}`{quick}", "", machine_line(r), ""]


def ceiling_line(c: dict[str, Any]) -> str:
    """The measured ceiling in one paragraph: per thread count, the model-shape matmul FLOP/s in
    fp32 (and bf16), the copy bandwidth and the dense peak."""
    from bench.ceiling import fmt_rate

    dev = c.get("device", "cpu")
    parts = []
    for t, e in c["by_threads"].items():
        where = f"{t} thread{'s' if t != '1' else ''}" if t != "None" else dev
        shapes = []
        for m, sh in e["by_tokens"].items():
            txt = f"{fmt_rate(sh['fp32']['model'])} fp32"
            if "bf16" in sh:
                ratio = sh["bf16"]["model"] / sh["fp32"]["model"]
                txt += f", {fmt_rate(sh['bf16']['model'])} bf16 ({ratio:.1f}× fp32{'; slower' if ratio < 1 else ''})"
            shapes.append(f"{txt} at {m} tokens per batch")
        peak = f"dense peak ({'8192' if dev.startswith('cuda') else '2048'}³) {fmt_rate(e['peak_fp32'])} fp32" + (
            f" / {fmt_rate(e['peak_bf16'])} bf16" if "peak_bf16" in e else "")
        parts.append(f"**{where}**: " + "; ".join(shapes) + f"; copy {fmt_rate(e['copy_bytes_per_s'], 'B/s')}; {peak}")
    n = len(c.get("measurements", [c]))
    when = ("two passes, before and after the sides, the best kept where both measured a shape" if n == 2 else
            "one pass, after the sides" if n == 1 else f"{n} passes, the best kept per shape")
    return (f"Ceiling (`bench/ceiling.py`, measured in this run — {when}: "
            f"matmuls [tokens, {c['hidden']}] × [{c['hidden']}, {c['hidden']}] and [{c['hidden']}, {c['intermediate']}], "
            "weighted as in a layer): " + " — ".join(parts) + ".")


def render_utilisation(u: dict[str, Any], labels: dict[str, str] | None = None) -> list[str]:
    """Throughput beside the machine's limit, one row per side, then one sentence per side on
    what limits it."""
    from bench.ceiling import fmt_rate

    labels = labels or {}
    out = ["| side | samples/s | tokens/s (real) | padding | model FLOP/s | ceiling (its threads, shapes, precision) "
           "| MFU | time: matmuls / padding / optimiser memory / other |", "|---|---|---|---|---|---|---|---|"]
    for side, row in u.items():
        c, b = row["ceiling"], row["budget"]
        thr = f"{c['threads']} thread{'s' if c['threads'] > 1 else ''}, " if c.get("threads") else ""
        out.append(
            f"| {labels.get(side, side)} | {C.fmt_num(row['samples_per_s'])} | {C.fmt_num(row['tokens_per_s'], 0)} | "
            f"{100 * row['padding_fraction']['median']:.0f}% | {fmt_rate(row['model_flops_per_s']['median'])} | "
            f"{fmt_rate(c['matmul_flops_per_s'])} ({thr}{c['tokens_per_batch']} tok, {c['dtype']}) | "
            f"{C.fmt_num(row['mfu'], 2)} | {100 * b['compute']:.0f} / {100 * b['padding']:.0f} / "
            f"{100 * b['optimizer_memory']:.0f} / {100 * b['other']:.0f}% |")
    out += ["", "What limits each row (from the numbers above):", ""]
    out += [f"* {row['limit']}" for row in u.values()]
    return out


def utilisation_block(r: dict[str, Any], labels: dict[str, str], window: str) -> list[str]:
    """The ceiling and the utilisation table of a result that has them (older results do not)."""
    if not r.get("utilisation"):
        return ["", "MFU: not in this result (measured from the next run of this benchmark on)."]
    return ["", ceiling_line(r["ceiling"]), "", f"Over {window}, against that ceiling (model FLOPs: "
            f"6 × {r['model_dims']['non_embedding_params']:,} non-embedding parameters per real token + attention; "
            "MFU = model FLOP/s / the ceiling for the side's threads and batch shape; the time shares are what the "
            "matmuls, the pad tokens and the optimiser's memory traffic would take at the ceiling, and the rest):",
            ""] + render_utilisation(r["utilisation"], labels)


def render_train(r: dict[str, Any]) -> list[str]:
    s = r["settings"]
    out = header(r) + [
        f"Model {s['model']}, {s['rows']} rows × {s['max_length']} tokens (every row full), batch {s['batch_size']}, "
        f"fp32, {s['epochs']} epochs per run, {s['repeats']} alternating repeats.", "",
        "| side | samples/s, median [min–max] |", "|---|---|",
    ]
    for k, v in r["samples_per_s"].items():
        out.append(f"| {k} | {C.fmt_num(v)} |")
    out += ["", "| comparison | epoch | ratio, median [min–max] | target | |", "|---|---|---|---|---|"]
    for row in r["rows"]:
        tgt = f"≥ {row['target']}×" if row.get("target") else "—"
        ep = {"last": f"{s['epochs']} (last)", "1": "1 (before any report)"}.get(row.get("epoch", "last"), row.get("epoch"))
        out.append(f"| {row['side']} / {row['baseline']} | {ep} | {C.fmt_ratio(row['ratio'])} | {tgt} | {_yes(row['met'])} |")
    return out + utilisation_block(r, {}, "the last epoch of each run")


def render_sst2(r: dict[str, Any]) -> list[str]:
    s, row = r["settings"], r["rows"][0]
    return header(r) + [
        f"Model {s['model']}, {s.get('train_rows_actual')} SST-2 train sentences, {s.get('dev_rows_actual')} dev, "
        f"{s['epochs']} epoch(s), batch {s['batch_size']}, lr {s['lr']}, max_length {s['max_length']}, fp32; "
        f"raypipe with {s['num_workers']} worker(s) × {s['cpus_per_worker']} CPU; {s['repeats']} alternating repeats.", "",
        "| side | samples/s | dev accuracy |", "|---|---|---|",
        f"| raypipe | {C.fmt_num(row['raypipe_sps'])} | {C.fmt_num(row['raypipe_acc'], 4)} |",
        f"| HF Trainer (DataCollatorWithPadding) | {C.fmt_num(row['trainer_sps'])} | {C.fmt_num(row['trainer_acc'], 4)} |",
        "",
        "| comparison | value | target | |", "|---|---|---|---|",
        f"| samples/s raypipe / Trainer | {C.fmt_ratio(row['ratio'])} | ≥ {row['target']}× (CPU), accuracy within 0.5 pt | {_yes(row['met'])} |",
        f"| dev accuracy raypipe − Trainer | {row['acc_delta_pt']:+.2f} pt (medians) | ≥ −0.5 pt | |",
    ] + utilisation_block(r, {"raypipe": "raypipe", "hf_trainer": "HF Trainer"}, "the whole run")


def render_data(r: dict[str, Any]) -> list[str]:
    s = r["settings"]
    rps = r["rows_per_s"]
    out = header(r) + [
        f"{s.get('rows_actual')} SST-2 train sentences, MiniLM tokenizer, max_length {s['max_length']}, "
        f"{s['repeats']} alternating repeats. Ray Data fixed cost per call (≈{s['small_rows']} rows): "
        f"{C.fmt_num(r['fixed_cost_s'], 2)} s.", "",
        "| side | rows/s, median [min–max] |", "|---|---|",
        f"| plain `Tokenize` in-process | {C.fmt_num(rps['plain'], 0)} |",
        *([f"| raypipe `to_ray_dataset` (driver tokenises, end to end) | {C.fmt_num(rps['raypipe'], 0)} |"]
          if "raypipe" in rps else []),
        f"| Ray Data `map_batches` path (end to end) | {C.fmt_num(rps['ray_data'], 0)} |",
        f"| Ray Data path, fixed cost removed | {C.fmt_num(rps['ray_marginal'], 0)} |",
        "", "| comparison | ratio | target | |", "|---|---|---|---|",
    ]
    for row in r["rows"]:
        tgt = f"≥ {row['target']}×" if row.get("target") else "—"
        out.append(f"| {row['side']} / plain | {C.fmt_ratio(row['ratio'])} | {tgt} | {_yes(row['met'])} |")
    return out


def render_serve(r: dict[str, Any]) -> list[str]:
    s = r["settings"]
    names = s["servers"]
    out = header(r) + [
        f"One SST-2 dev sentence per request; {s['duration']} s per measurement after {s['warmup']} s warm-up, "
        f"≤ {s['max_requests']} requests; {s['repeats']} rotating repeats. Checkpoints are untrained "
        "(raypipe.model.build + save_checkpoint). Forward = the model's own time per call inside each "
        "server (/stats at c=1); overhead = p50 − forward.", "",
    ]
    for model, m in r["models"].items():
        fw = m["server_forward_ms"]
        out += [
            f"**{model}** (max_length {m['checkpoint']['max_length']}). Forward per call: "
            + ", ".join(f"{n} {C.fmt_num(v, 2)} ms" for n, v in fw.items())
            + "; in-process, one sentence: " + ", ".join(
                f"{k.replace('_ms', '').replace('_', ' ')} {C.fmt_num(v, 2)} ms" for k, v in m["forward_in_process"].items())
            + ". Start-up: " + ", ".join(f"{k} {v:.1f} s" for k, v in m["startup"].items()) + ". "
            + "Mean texts per model call over the run: " + ", ".join(
                f"{n} {st['mean_batch_size']:.2f} (max {st['max_batch_size_seen']})" for n, st in m["batch_stats"].items())
            + ".", "",
            "| c | " + " | ".join(f"{n} req/s" for n in names) + " | "
            + " | ".join(f"{n} p50 / p99 ms" for n in names) + " | "
            + " | ".join(f"{n} / bare" for n in names if n != "bare") + " |",
            "|---" * (1 + 2 * len(names) + len(names) - 1) + "|",
        ]
        for row in m["table"]:
            cells = [str(row["concurrency"])]
            cells += [C.fmt_num(row[n]["rps"]) for n in names]
            cells += [f"{row[n]['p50_ms']['median']:.1f} / {row[n]['p99_ms']['median']:.1f}"
                      + (f" ({row[n]['errors']} err)" if row[n]["errors"] else "") for n in names]
            cells += [C.fmt_ratio(row[f"{n}_vs_bare"]) for n in names if n != "bare"]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    out += ["| target | value | |", "|---|---|---|"]
    for row in r["rows"]:
        if "ratio" in row:
            tgt = f" ≥ {row['target']}×" if row.get("target") else ""
            out.append(f"| {row['what']}{tgt} | {C.fmt_ratio(row['ratio'])} | {_yes(row['met'])} |")
        else:
            tgt = f" ≤ {row['target']} ms" if row.get("target") else ""
            val = C.fmt_num(row["value"], 1) + " ms" if row.get("value") and row["value"].get("n") else "n/a"
            out.append(f"| {row['what']}{tgt} | {val} | {_yes(row['met'])} |")
    return out


def render_tune(r: dict[str, Any]) -> list[str]:
    s = r["settings"]
    out = header(r) + [
        f"Tiny BERT, {s['train_rows']} SST-2 train sentences, {'full dev set' if not s['dev_rows'] else s['dev_rows']} "
        f"as validation, {s['epochs']} epochs per trial, grid lr {s['lrs']} × batch {s['batch_sizes']} "
        f"({len(s['lrs']) * len(s['batch_sizes'])} trials), ASHA grace {s['grace_period']}, reduction factor "
        f"{s['reduction_factor']}; 1 worker × 0.5 CPU per trial. {r.get('note', '')}", "",
        "| sweep | scheduler, rung metric | trials | trial-epochs | epochs per trial | best val accuracy "
        "| trial-epochs until FIFO's best −0.5 pt | wall s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, sw in r["sweeps"].items():
        metric = sw.get("metric", "") if sw.get("scheduler") == "asha" else "—"
        out.append(f"| {name} | {sw.get('scheduler', name)}, {metric} | {sw['trials']} | {sw['trial_epochs']} | "
                   f"{sw['epochs_per_trial']} | {sw['best_acc']:.4f} | {sw.get('to_target') or 'never'} | {sw['wall_s']:.0f} |")
    out += ["", "| comparison | value | target | |", "|---|---|---|---|"]
    for row in r["rows"]:
        tgt = f"≤ {row['target']:.0%}" if row.get("target") else "—"
        out.append(f"| {row['what']} | {row['value']:.0%} | {tgt} | {_yes(row['met'])} |")
    return out


def render_startup(r: dict[str, Any]) -> list[str]:
    sec = r["seconds"]
    labels = {
        "python_pass": "`python -c pass` (interpreter floor)",
        "raypipe_help": "`raypipe --help`",
        "import_raypipe": "`python -c 'import raypipe'`",
        "import_raypipe_predict": "`python -c 'import raypipe.predict, torch, transformers'`",
        "import_raypipe_serve": "`python -c 'import raypipe.serve'` (ray.serve, fastapi)",
        "serve_cold_start": "`raypipe serve CKPT` (tiny) → first 200 from /ready (Ray + Serve + replica + load)",
        "quickstart": "`raypipe run examples/configs/quickstart.yaml` end to end",
    }
    out = header(r) + [f"Fresh process each time, {r['settings']['repeats']} alternating repeats.", "",
                       "| what | seconds, median [min–max] | target | |", "|---|---|---|---|"]
    for k, label in labels.items():
        if k in sec:
            tgt, met = ("< 0.5 s", r["rows"][0]["met"]) if k == "raypipe_help" else ("—", None)
            out.append(f"| {label} | {C.fmt_num(sec[k], 2)} | {tgt} | {_yes(met)} |")
    if "quickstart" not in sec:
        manual = r.get("quickstart_manual")  # a figure measured by hand, kept in the result file
        value = (f"{manual['seconds']} ({manual['how']}; opt-in here: " if manual else "TODO-lead (opt-in: ")
        out.append("| `raypipe run examples/configs/quickstart.yaml` end to end | " + value
                   + "`RAYPIPE_BENCH_QUICKSTART=1 python -m bench startup`) | — | — |")
    return out


def render_tasks(r: dict[str, Any]) -> list[str]:
    out = header(r)
    for name, t in r["tasks"].items():
        rp, hf = t["raypipe_test"], t["trainer_test"]
        out += [f"**{name}** ({t['task']}): {t['train_rows']} train / {t['val_rows']} validation / "
                f"{t['test_rows']} test rows, {t['epochs']} epoch(s), batch {t['batch_size']}, lr {t['lr']}, "
                f"max_length {t['max_length']}; the whole `raypipe run` took {t['pipeline_wall_s']:.0f} s "
                "(" + ", ".join(f"{k} {v:.0f} s" for k, v in t["stage_seconds"].items()) + ").", ""]
        if t["task"] == "multi_label":
            at = t["raypipe_at_0.5"]
            out += ["| side | samples/s | test micro-F1 | test macro-F1 | subset accuracy |", "|---|---|---|---|---|",
                    f"| raypipe (thresholds fitted on validation) | {t['raypipe_samples_per_s']:.1f} | "
                    f"{rp['test_micro_f1']:.4f} | {rp['test_macro_f1']:.4f} | {rp['test_subset_accuracy']:.4f} |",
                    f"| raypipe, same model at threshold 0.5 | — | {at['micro_f1']:.4f} | {at['macro_f1']:.4f} | "
                    f"{at['subset_accuracy']:.4f} |",
                    f"| HF Trainer (multi_label_classification, 0.5) | {t['trainer_samples_per_s']:.1f} | "
                    f"{hf['micro_f1']:.4f} | {hf['macro_f1']:.4f} | {hf['subset_accuracy']:.4f} |"]
        elif t["task"] == "token_classification":
            types = sorted(t["trainer_per_type_f1"])
            rp_types = t.get("raypipe_per_type_f1", {})
            out += ["| side | samples/s | test entity F1 | precision | recall | word accuracy | "
                    + " | ".join(f"{k} F1" for k in types) + " |", "|---" * (6 + len(types)) + "|",
                    f"| raypipe (windows, stride) | {t['raypipe_samples_per_s']:.1f} | {rp['test_entity_f1']:.4f} | "
                    f"{rp['test_entity_precision']:.4f} | {rp['test_entity_recall']:.4f} | {rp['test_token_accuracy']:.4f} | "
                    + " | ".join(f"{rp_types.get(k, float('nan')):.4f}" for k in types) + " |",
                    f"| HF Trainer (run_ner recipe, truncation) | {t['trainer_samples_per_s']:.1f} | "
                    f"{hf['entity_f1']:.4f} | {hf['entity_precision']:.4f} | {hf['entity_recall']:.4f} | "
                    f"{hf['token_accuracy']:.4f} | " + " | ".join(f"{t['trainer_per_type_f1'][k]:.4f}" for k in types) + " |"]
            if t.get("sweep"):
                out += ["", "Sweep (ASHA on validation entity F1): " + "; ".join(
                    f"lr {tr['config'].get('train.lr')}: {tr['status']} after {tr['epochs']} epoch(s)" for tr in t["sweep"])
                    + f"; the Trainer ran at the champion's lr {t['lr']}."]
        else:
            out += ["| side | samples/s | test Pearson | test Spearman | test RMSE |", "|---|---|---|---|---|",
                    f"| raypipe (standardised target) | {t['raypipe_samples_per_s']:.1f} | {rp['test_pearson']:.4f} | "
                    f"{rp['test_spearman']:.4f} | {rp['test_rmse']:.4f} |",
                    f"| HF Trainer (regression, raw target) | {t['trainer_samples_per_s']:.1f} | {hf['pearson']:.4f} | "
                    f"{hf['spearman']:.4f} | {hf['rmse']:.4f} |"]
        out += ["", f"samples/s raypipe / Trainer: **{t['ratio']:.2f}×**. Registered {t['registered']} "
                f"({t['promotion']}).", ""]
        if t.get("utilisation"):
            out += utilisation_block(t, {"raypipe": "raypipe", "hf_trainer": "HF Trainer"}, "each side's training run")[1:] + [""]
        else:
            out += [f"MFU: not measured in this result ({t.get('measured', 'an older run')}); the next run of "
                    "`python -m bench tasks` records it.", ""]
        if t.get("http_samples"):
            out += ["Sample predictions of the served champion over HTTP:", "", "| input | predicted | true |",
                    "|---|---|---|"]
            for smp in t["http_samples"]:
                text = smp["input"].replace("|", "\\|")[:70]
                out.append(f"| {text} | {smp['predicted']} | {smp['expected']} |")
            out.append("")
    return out


def render_batch(r: dict[str, Any]) -> list[str]:
    s = r["settings"]
    rps = r["rows_per_s"]
    out = header(r) + [
        f"{s['rows']:,} SST-2 train sentences in one Parquet file, untrained {s['model']} checkpoint, "
        f"max_length {s['max_length']}, {s['batch_size']} texts per forward pass, {s['cores']} cores; each side "
        f"end to end with its model load; {s['repeats']} alternating repeats.", "",
        "| side | rows/s, median [min–max] |", "|---|---|",
        f"| plain loop of `Predictor.predict` (1024-row chunks, torch on every core) | {C.fmt_num(rps['plain'], 0)} |",
        f"| `raypipe predict --input`, 1 actor × {s['cores']} CPU (Parquet in, Parquet out) | {C.fmt_num(rps['raypipe_1'], 0)} |",
        f"| `raypipe predict --input`, 2 actors × {max(1, s['cores'] // 2)} CPU | {C.fmt_num(rps['raypipe_2'], 0)} |",
        f"| transformers `pipeline(\"text-classification\")`, batch {s['batch_size']} | {C.fmt_num(rps['hf_pipeline'], 0)} |",
        f"| raypipe 1 actor, fixed cost removed ({s['small_rows']:,}-row job: {C.fmt_num(r['fixed_cost_s'], 1)} s) | "
        f"{C.fmt_num(rps['raypipe_marginal'], 0)} |",
        "", "| comparison | ratio | target | |", "|---|---|---|---|",
    ]
    for row in r["rows"]:
        tgt = f"≥ {row['target']}×" if row.get("target") else "—"
        out.append(f"| {row['side']} | {C.fmt_ratio(row['ratio'])} | {tgt} | {_yes(row['met'])} |")
    return out


def render_gpu(r: dict[str, Any]) -> list[str]:
    """Section 7's tables from ``gpu.json``: per training part, samples/s and MFU against the
    card's ceiling measured in the same run."""
    out = header(r)
    st = r["settings"]
    names = {"plain_eager": "plain loop (eager)", "plain_compiled": "plain loop (torch.compile)",
             "raypipe_1w": "raypipe, 1 worker", "hf_trainer": "HF Trainer", "plain_grouped": "plain loop, length-grouped",
             "raypipe": "raypipe"}
    for shape, res in (r["parts"].get("g1") or {}).items():
        if not isinstance(res, dict) or "utilisation" not in res:
            out += [f"**g1 {shape}**: {res.get('error', res) if isinstance(res, dict) else res}", ""]
            continue
        skipped = [f"{k} {v}" for k, v in res.items() if isinstance(v, str) and v.startswith("skipped")]
        out += [f"**g1 throughput, {shape}** ({st['rows']} synthetic 128-token rows, batch {st['batch_size']}, "
                f"{st['amp']}, 2 epochs, the last one measured)" + (f"; {'; '.join(skipped)}" if skipped else "") + "."]
        out += utilisation_block(res, names, "the last epoch") + [""]
    g2 = r["parts"].get("g2") or {}
    if "utilisation" in g2:
        skipped = f"; raypipe {g2['raypipe']}" if isinstance(g2.get("raypipe"), str) else ""
        out += [f"**g2 SST-2** ({st['sst2_rows']} sentences, batch {st['sst2_batch']}, {st['amp']}, 1 epoch){skipped}."]
        out += utilisation_block(g2, names, "the epoch") + [""]
    elif g2:
        out += [f"**g2 SST-2**: {g2.get('skipped') or g2.get('error')}", ""]
    return out


def _mib(x: float | None) -> str:
    return "n/a" if not x else f"{x / 2**20:.1f} MiB" if x < 2**30 else f"{x / 2**30:.2f} GiB"


def _size(x: float) -> str:
    return f"{x / 2**20:.2f} MB" if x < 100 * 2**20 else f"{x / 2**20:.0f} MB"


def render_lora(r: dict[str, Any]) -> list[str]:
    """Section 11: per dataset, full fine-tuning vs LoRA at each side's swept lr (sizes,
    samples/s, peak RSS, test scores, MFU), then the four models served both ways."""
    s = r["settings"]
    lo = s["lora"]
    out = header(r) + [
        f"Model {s['model']}, fp32, raypipe `training.run` with 1 worker × {s['cpus']} CPU; LoRA r={lo['r']}, "
        f"alpha={lo['alpha']} on the attention query/value projections, the head trained in full. Each side sweeps "
        f"its lrs (full {', '.join(f'{x:g}' for x in s['lrs']['full'])}; LoRA "
        f"{', '.join(f'{x:g}' for x in s['lrs']['lora'])}) and keeps the one with the best validation macro-F1; that "
        "run's best checkpoint is evaluated once on the test split and registered. samples/s: training steps only, "
        "the picked run; peak RSS: the Ray Train worker process (VmHWM). The training part took "
        f"{r['training_wall_s']:.0f} s, the serving part {r['serving']['wall_s']:.0f} s.", "",
        "| dataset (train / val / test rows, epochs, batch, tokens) | side | lr (val macro-F1) | trainable parameters "
        "| checkpoint on disk (weights) | registered version (weights) | samples/s | peak RSS | test accuracy "
        "| test macro-F1 | MFU |", "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, d in r["datasets"].items():
        rows = d["rows"]
        what = (f"**{name}** ({rows['train']} / {rows['val']} / {rows['test']}, {d['epochs']} ep, batch "
                f"{d['batch_size']}, ≤ {d['max_length']})")
        for side in ("full", "lora"):
            x, pc = d["sides"][side], d.get("params", {}).get(side, {})
            cs, rs = x["checkpoint_size"], x["registered_size"]
            u = d.get("utilisation", {}).get(side)
            mfu = C.fmt_num(u["mfu"], 2) if u else "—"
            out.append(
                f"| {what if side == 'full' else ''} | {'full fine-tuning' if side == 'full' else 'LoRA'} | "
                f"{x['lr']:g} ({x['best_val']:.4f}) | {pc.get('trainable', 0):,} | {_size(cs['total'])} "
                f"({_size(cs['weights'])}) | {_size(rs['total'])} ({_size(rs['weights'])}) | {x['samples_per_s']:.1f} | "
                f"{_mib(x['peak_rss'])} | {x['test']['test_accuracy']:.4f} | {x['test']['test_macro_f1']:.4f} | {mfu} |")
    out += ["", "| dataset | registered version, full / LoRA | checkpoint on disk, full / LoRA (weights alone) "
            "| LoRA − full: test accuracy / macro-F1 | samples/s LoRA / full (neighbouring runs) "
            "| peak RSS LoRA / full |", "|---|---|---|---|---|---|"]
    for name, d in r["datasets"].items():
        sx, dp = d["size_x"], d["delta_pt"]
        out.append(f"| {name} | {sx['registered']:.0f}× | {sx['checkpoint']:.0f}× ({sx['checkpoint_weights']:.0f}×) | "
                   f"{dp['accuracy']:+.2f} / {dp['macro_f1']:+.2f} pt | {C.fmt_ratio(d['sps_ratio'])} | "
                   f"{C.fmt_ratio(d['rss_ratio'])} |")
    out += ["", "Sweeps (validation macro-F1 of each run's best epoch; samples/s): " + "; ".join(
        f"{name} {side} " + ", ".join(f"lr {t['lr']:g} {t['best_val']:.4f} ({t['samples_per_s']:.1f}/s)"
                                      for t in d["trials"][side])
        for name, d in r["datasets"].items() for side in ("full", "lora")) + "."]
    if r.get("ceiling"):
        out += ["", ceiling_line(r["ceiling"]), ""]
        for name, d in r["datasets"].items():
            dims = r["model_dims"][name]
            fl, ll = dims["full"], dims["lora"]
            out += [f"**{name}**, every run of the sweep, against that ceiling (model FLOPs per real token: full "
                    f"6 × {fl['non_embedding_params']:,} non-embedding parameters; LoRA 6 × "
                    f"{ll['trainable_params']:,} trained (LoRA matrices, head) + 4 × {ll['frozen_non_embedding_params']:,} "
                    "frozen (forward + input gradient, no weight gradient); + attention on both; the optimiser's "
                    "memory share counts the trained parameters):", ""]
            out += render_utilisation(d["utilisation"], {"full": "full fine-tuning", "lora": "LoRA"}) + [""]
    v = r["serving"]
    n = len(v["models"]["lora"])
    labels = {"adapters_1": f"{n} LoRA adapters, 1 deployment × 1 replica",
              "adapters_2": f"{n} LoRA adapters, 1 deployment × 2 replicas",
              "full": f"{n} full models, {n} deployments × 1 replica"}
    sv = s["serve"]
    out += [f"Serving: {n} SST-2 models per side (" + "; ".join(
        f"{m['id']}: {m['run']} epoch {m['epoch']}, lr {m['lr']:g}" for side in ("lora", "full")
        for m in v["models"][side]) + f"). Load from a separate process, c={sv['concurrency']}, request k to model "
        f"k mod {n}, one SST-2 dev sentence per request, {sv['duration']:g} s after {sv['warmup']:g} s warm-up, "
        f"{sv['repeats']} rotating repeat(s); memory read after each load run. "
        + ("All sides up at once (one Ray with more logical CPUs than cores: a replica reserves 1 CPU)."
           if v["together"] else "Sides deployed one at a time (the Ray in use has too few CPUs for all at once)."), "",
        "| side | req/s | p50 / p99 ms | replica RSS, summed | replica PSS, summed | texts per forward pass "
        "(a replica's /stats, since it started) | errors |",
        "|---|---|---|---|---|---|---|"]
    for side, row in v["table"].items():
        out.append(f"| {labels.get(side, side)} | {C.fmt_num(row['rps'])} | {row['p50_ms']['median']:.0f} / "
                   f"{row['p99_ms']['median']:.0f} | {_mib(row['rss']['median'])} | {_mib(row['pss']['median'])} | "
                   f"{row['mean_batch']['median']:.2f} | {row['errors']} |")
    out += ["", "| comparison, per repeat | replica RSS | replica PSS | req/s |", "|---|---|---|---|"]
    for side, ratio in v["ratios"].items():
        out.append(f"| {labels.get(side, side)} / {labels['full']} | {C.fmt_ratio(ratio['rss'])} | "
                   f"{C.fmt_ratio(ratio['pss'])} | {C.fmt_ratio(ratio['rps'])} |")
    out += ["", "| target | value | |", "|---|---|---|"]
    for row in r["rows"]:
        val = row["value"]
        if isinstance(val, dict) and "median" in val:
            shown, tgt = C.fmt_ratio(val), f"≤ {row['target']}×"
        elif isinstance(val, dict):
            shown, tgt = " / ".join(f"{x:+.2f}" for x in val.values()) + " pt", f"≥ −{row['target']:g} pt"
        else:
            shown, tgt = f"{val:.0f}×", f"≥ {row['target']:g}×"
        out.append(f"| {row['what']}, {tgt} | {shown} | {_yes(row['met'])} |")
    return out


RENDER = {"gpu": render_gpu, "batch": render_batch, "tasks": render_tasks, "train": render_train, "sst2": render_sst2, "data": render_data, "serve": render_serve,
          "tune": render_tune, "startup": render_startup}
RENDER["lora"] = render_lora


def render_sft(r: dict[str, Any]) -> list[str]:
    from bench import sft

    return sft.render(r)


RENDER["sft"] = render_sft


def summary(results: dict[str, dict[str, Any]]) -> list[str]:
    out = ["| benchmark | target | result | |", "|---|---|---|---|"]
    t = results.get("train")
    if t:
        for row in t["rows"]:
            if row.get("target"):
                out.append(f"| 1. train {row['side']} vs plain loop | ≥ {row['target']}× | {C.fmt_ratio(row['ratio'])} | {_yes(row['met'])} |")
        for row in t["rows"]:
            if not row.get("target"):
                ep = " (epoch 1)" if row.get("epoch") == "1" else ""
                out.append(f"| 1. train {row['side']} vs {row['baseline']}{ep} | — | {C.fmt_ratio(row['ratio'])} | — |")
        if t.get("utilisation"):
            out.append("| 1. train MFU (last epoch, vs the fp32 matmul ceiling measured in the run) | — | "
                       + ", ".join(f"{k} {u['mfu']['median']:.2f}" for k, u in t["utilisation"].items()) + " | — |")
    s = results.get("sst2")
    if s:
        row = s["rows"][0]
        out.append(f"| 2. SST-2 raypipe vs HF Trainer (CPU) | ≥ 1.5×, acc ±0.5 pt | {C.fmt_ratio(row['ratio'])}, "
                   f"acc {row['acc_delta_pt']:+.2f} pt | {_yes(row['met'])} |")
        if s.get("utilisation"):
            u = s["utilisation"]
            out.append(f"| 2. SST-2 MFU, raypipe / HF Trainer (padding) | — | {u['raypipe']['mfu']['median']:.2f} "
                       f"({100 * u['raypipe']['padding_fraction']['median']:.0f}% pad) / {u['hf_trainer']['mfu']['median']:.2f} "
                       f"({100 * u['hf_trainer']['padding_fraction']['median']:.0f}% pad) | — |")
    d = results.get("data")
    if d:
        for row in d["rows"]:
            what = {"raypipe": "raypipe tokenisation into a Ray Dataset", "ray_data": "Ray Data map_batches path",
                    "ray_marginal": "Ray Data path, fixed cost removed"}.get(row["side"], row["side"])
            tgt = f"≥ {row['target']}×" if row.get("target") else "—"
            out.append(f"| 3. {what} vs plain | {tgt} | {C.fmt_ratio(row['ratio'])} | {_yes(row['met'])} |")
    v = results.get("serve")
    if v:
        for row in v["rows"]:
            if row and row.get("target") is not None:
                val = C.fmt_ratio(row["ratio"]) if "ratio" in row else (
                    C.fmt_num(row["value"], 1) + " ms" if row.get("value") and row["value"].get("n") else "n/a")
                tgt = f"≥ {row['target']}×" if "ratio" in row else f"≤ {row['target']} ms"
                out.append(f"| 4. {row['what']} | {tgt} | {val} | {_yes(row['met'])} |")
    u = results.get("tune")
    if u:
        for row in u["rows"]:
            if row.get("target"):
                out.append(f"| 5. {row['what']} | ≤ {row['target']:.0%} | {row['value']:.0%} | {_yes(row['met'])} |")
    k = results.get("tasks")
    if k:
        for name, t in k["tasks"].items():
            key, other = {"multi_label": ("test_micro_f1", "micro_f1"),
                          "token_classification": ("test_entity_f1", "entity_f1")}.get(t["task"], ("test_pearson", "pearson"))
            out.append(f"| 8. {name} raypipe vs HF Trainer (CPU) | — | {t['ratio']:.2f}× samples/s, {key} "
                       f"{t['raypipe_test'][key]:.3f} vs {t['trainer_test'][other]:.3f} | — |")
            if t.get("utilisation"):
                u = t["utilisation"]
                out.append(f"| 8. {name} MFU, raypipe / HF Trainer | — | {u['raypipe']['mfu']['median']:.2f} / "
                           f"{u['hf_trainer']['mfu']['median']:.2f} | — |")
    lo = results.get("lora")
    if lo:
        for row in lo["rows"]:
            val = row["value"]
            if isinstance(val, dict) and "median" in val:
                out.append(f"| 11. {row['what']} | ≤ {row['target']}× memory | {C.fmt_ratio(val)} | {_yes(row['met'])} |")
            elif isinstance(val, dict):
                shown = " / ".join(f"{x:+.2f}" for x in val.values())
                out.append(f"| 11. {row['what']} | within {row['target']:g} pt | {shown} pt | {_yes(row['met'])} |")
            else:
                out.append(f"| 11. {row['what']} | ≥ {row['target']:g}× smaller | {val:.0f}× | {_yes(row['met'])} |")
        rps = lo["serving"]["ratios"]["adapters_1"]["rps"]
        out.append(f"| 11. req/s at c={lo['settings']['serve']['concurrency']}, adapters on 1 replica / "
                   f"full deployments | — | {C.fmt_ratio(rps)} | — |")
    b = results.get("batch")
    if b:
        row = b["rows"][0]
        out.append(f"| 9. batch `raypipe predict --input`, 1 actor, vs plain Predictor loop | ≥ {row['target']}× | "
                   f"{C.fmt_ratio(row['ratio'])} | {_yes(row['met'])} |")
        out.append(f"| 9. batch, 1 actor, fixed cost removed, vs plain | — | {C.fmt_ratio(b['rows'][1]['ratio'])} | — |")
        out.append(f"| 9. batch, 2 actors vs 1 | — | {C.fmt_ratio(b['rows'][2]['ratio'])} | — |")
    st = results.get("startup")
    if st:
        sec = st["seconds"]
        out.append(f"| 6. `raypipe --help` | < 0.5 s | {C.fmt_num(sec['raypipe_help'], 2)} s | {_yes(st['rows'][0]['met'])} |")
        if "serve_cold_start" in sec:
            out.append(f"| 6. Serve cold start to /ready | — | {C.fmt_num(sec['serve_cold_start'], 1)} s | — |")
    sf = results.get("sft")
    if sf:
        from bench import sft as _sft

        out += _sft.summary(sf)
    g = results.get("gpu")
    if g and not g.get("quick") and g.get("machine", {}).get("gpu"):
        for shape, res in (g["parts"].get("g1") or {}).items():
            for side, u in (res.get("utilisation") or {}).items() if isinstance(res, dict) else ():
                out.append(f"| 7. GPU g1 {shape} {side} | — | {C.fmt_num(u['samples_per_s'], 0)} samples/s, "
                           f"MFU {C.fmt_num(u['mfu'], 2)} | — |")
    else:
        out.append("| 7. GPU | see section 7 | not run (no GPU lent to this session) | — |")
    if any(r.get("quick") for r in results.values()):
        out.append("")
        out.append("Some of these results come from `--quick` runs: smoke numbers only.")
    return out


def replace_block(text: str, name: str, lines: list[str]) -> str:
    block = f"<!-- BEGIN AUTO {name} -->\n" + "\n".join(lines) + f"\n<!-- END AUTO {name} -->"
    pat = re.compile(rf"<!-- BEGIN AUTO {re.escape(name)} -->.*?<!-- END AUTO {re.escape(name)} -->", re.S)
    if pat.search(text):
        return pat.sub(lambda _m: block, text)
    return text.rstrip("\n") + f"\n\n## {name}\n\n{block}\n"


def write(out_dir: Path, doc: Path = DOC) -> Path:
    results = C.load_results(out_dir)
    text = doc.read_text(encoding="utf-8") if doc.exists() else "# Benchmarks\n"
    for name, render in RENDER.items():
        if name in results:
            text = replace_block(text, name, render(results[name]))
    text = replace_block(text, "summary", summary(results))
    doc.write_text(text, encoding="utf-8")
    C.log(f"updated {doc}")
    return doc
