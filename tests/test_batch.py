"""Batch inference on Ray Data (``raypipe predict --input``, :mod:`raypipe.batch`).

The Ray tests score generated files through the session's real local Ray with real checkpoints
of the tiny model and compare every row with ``Predictor.predict`` on the same inputs. The rest
are unit tests of the parts around it (column types, sizing, inputs, the atomic writer).
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from raypipe.errors import ConfigError, DataError

CLASSES_WORDS = ["goal match team", "chip robot software", "bread soup chef"]


def _texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    filler = "the a of and to in is it that was for on with as at by".split()
    return [" ".join(rng.choices(filler, k=rng.randint(2, 9)) + [rng.choice(CLASSES_WORDS)]) + f" #{i}"
            for i in range(n)]


def _checkpoint(tmp: Path, model_dir: Path, task: str, frame, max_length: int = 32, **data) -> Path:
    """An untrained checkpoint of ``task`` whose schema comes from ``frame`` like training's."""
    from raypipe import tasks
    from raypipe.config import RaypipeConfig
    from raypipe.model import build, save_checkpoint

    cfg = RaypipeConfig(task=task, model={"name": str(model_dir)}, data={"max_length": max_length, **data})
    schema = tasks.get(task).schema(frame, cfg.data)
    model, tokenizer = build(cfg.model, schema, task=task)
    return save_checkpoint(tmp / f"ckpt-{task}", model, tokenizer, {
        "task": task, "schema": schema, "max_length": max_length, "epoch": 0, "metrics": {},
        "config": cfg.model_dump(mode="json")})


# --------------------------------------------------------------------------- unit


def test_every_tasks_prediction_model_has_arrow_columns():
    import pyarrow as pa

    from raypipe import tasks
    from raypipe.batch import prediction_fields

    fields = {name: prediction_fields(tasks.get(name)) for name in tasks.names()}
    assert fields["classification"] == {"pred_label": pa.string(), "pred_score": pa.float64(),
                                        "pred_probabilities": pa.map_(pa.string(), pa.float64())}
    assert fields["multi_label"]["pred_labels"] == pa.list_(pa.string())
    assert fields["regression"] == {"pred_value": pa.float64()}
    entity = fields["token_classification"]["pred_entities"].value_type
    assert [f.name for f in entity] == ["type", "text", "start", "end", "score"]
    assert entity.field("start").type == pa.int64()


def test_sizing_defaults_follow_the_nodes_and_refuse_what_cannot_fit():
    from raypipe.batch import sizing
    from raypipe.config import PredictConfig

    one_node = [{"Alive": True, "Resources": {"CPU": 2.0}}]
    s = sizing(PredictConfig(), False, one_node)
    assert (s.actors, s.cpus, s.threads, s.batch_size, s.device) == (1, 2.0, 2, 64, "cpu")
    s = sizing(PredictConfig(concurrency=2), False, one_node)
    assert (s.actors, s.cpus, s.threads) == (2, 1.0, 1)
    three = [{"Alive": True, "Resources": {"CPU": 0.0}}] + [{"Alive": True, "Resources": {"CPU": 1.0}}] * 3
    assert sizing(PredictConfig(), False, three).actors == 3  # one per node with CPUs, not the head
    gpus = [{"Alive": True, "Resources": {"CPU": 8.0, "GPU": 2.0}}]
    s = sizing(PredictConfig(), True, gpus)
    assert (s.actors, s.gpus, s.batch_size, s.device) == (2, 1.0, 256, "cuda")
    with pytest.raises(ConfigError, match="predict.concurrency"):
        sizing(PredictConfig(concurrency=3), False, one_node)
    with pytest.raises(ConfigError, match="largest node"):
        sizing(PredictConfig(num_cpus=4), False, one_node)


def test_input_files_take_a_file_a_folder_or_a_glob_of_one_format(tmp_path):
    from raypipe.batch import input_files
    from raypipe.config import DataConfig

    d = DataConfig()
    for name in ("b.csv", "a.csv", ".hidden.csv", "notes.md"):
        (tmp_path / name).write_text("text\nx\n")
    files, fmt = input_files(str(tmp_path), d)
    assert [Path(f).name for f in files] == ["a.csv", "b.csv"] and fmt == "csv"
    files, _ = input_files(str(tmp_path / "*.csv"), d)
    assert [Path(f).name for f in files] == ["a.csv", "b.csv"]
    (tmp_path / "c.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(DataError, match="several formats"):
        input_files(str(tmp_path), d)
    with pytest.raises(DataError, match="no such file"):
        input_files(str(tmp_path / "missing.parquet"), d)
    with pytest.raises(DataError, match="matches no file"):
        input_files(str(tmp_path / "*.parquet"), d)


def test_a_missing_text_column_names_the_columns_there_are_and_the_option():
    from raypipe.batch import plan_columns
    from raypipe.config import DataConfig

    with pytest.raises(DataError, match=r"no column 'text'.*columns: body, id.*--text-column"):
        plan_columns("in.csv", ["body", "id"], DataConfig(), "text")
    with pytest.raises(DataError, match="compares two texts.*--pair-column"):
        plan_columns("in.csv", ["text", "id"], DataConfig(), "pair")
    plan = plan_columns("in.csv", ["tokens", "x"], DataConfig(), "tokens")
    assert plan.kind == "tokens" and plan.tokens_column == "tokens"


def test_reason_kinds_group_rejections_without_their_details():
    from raypipe.batch import reason_kind

    assert reason_kind("longer than max_length (312 tokens > 128)") == "longer than max_length"
    assert reason_kind("empty text in 'text'") == "empty text"
    assert reason_kind("empty text in 'a', 'b'") == "empty text"
    assert reason_kind("'text' is int, not a text") == "is int, not a text"


def test_the_writer_renames_only_a_complete_file_and_cleans_up_a_failed_one(tmp_path):
    import pyarrow as pa

    from raypipe.batch import _Writer

    out = tmp_path / "scored.csv"
    table = pa.table({"text": ["a", "b"], "pred_probabilities": pa.array(
        [{"x": 0.75, "y": 0.25}, None], pa.map_(pa.string(), pa.float64()))})
    w = _Writer(out, "csv")
    w.write(table)
    assert not out.exists() and w.tmp.exists()  # nothing under the final name while writing
    w.commit()
    import csv

    rows = list(csv.DictReader(out.open()))
    assert [r["text"] for r in rows] == ["a", "b"]
    assert json.loads(rows[0]["pred_probabilities"]) == {"x": 0.75, "y": 0.25}  # nested -> JSON in a cell
    assert rows[1]["pred_probabilities"] == ""
    assert not w.tmp.exists()
    w = _Writer(tmp_path / "failed.parquet", "parquet")
    w.write(table)
    w.abort()
    assert list(tmp_path.iterdir()) == [out]


def test_an_existing_output_is_not_replaced_without_overwrite(tmp_path, tiny_checkpoint):
    from raypipe.batch import run
    from raypipe.config import RaypipeConfig

    src = tmp_path / "in.csv"
    src.write_text("text\nhello\n")
    out = tmp_path / "out.csv"
    out.write_text("keep me\n")
    with pytest.raises(ConfigError, match="exists; pass --overwrite"):
        run(str(tiny_checkpoint), str(src), str(out), RaypipeConfig(workdir=str(tmp_path / "w")))
    with pytest.raises(ConfigError, match=r"\.parquet, \.csv, \.tsv or \.jsonl"):
        run(str(tiny_checkpoint), str(src), str(tmp_path / "out.xlsx"), RaypipeConfig(workdir=str(tmp_path / "w")))
    assert out.read_text() == "keep me\n"


def test_the_scorer_gives_every_task_the_predictors_answers(tmp_path, tiny_model_dir):
    """The actor class without Ray: each task's columns hold exactly what Predictor.predict says."""
    import pandas as pd
    import pyarrow as pa

    from raypipe.batch import Plan, _Scorer
    from raypipe.predict import Predictor

    texts = _texts(40)
    cases = {
        "multi_label": (pd.DataFrame({"text": texts, "label": [["a"], ["b"], ["a", "b"], []] * 10}),
                        Plan("text", ["text"]), {"text": texts}),
        "regression": (pd.DataFrame({"text": texts, "text_pair": texts[::-1], "label": [float(i) for i in range(40)]}),
                       Plan("pair", ["text"], pair_column="text_pair"), {"text": texts, "text_pair": texts[::-1]}),
        "token_classification": (
            pd.DataFrame({"tokens": [t.split() for t in texts], "label": [["O"] * (len(t.split()) - 1) + ["B-X"]
                                                                       for t in texts]}),
            Plan("tokens", [], tokens_column="tokens"), {"tokens": [t.split() for t in texts]}),
    }
    for task, (frame, plan, columns) in cases.items():
        ckpt = _checkpoint(tmp_path, tiny_model_dir, task, frame, window_stride=8)
        scorer = _Scorer(str(ckpt), str(ckpt), None, "cpu", 1, plan.__dict__, 8, "reject")
        out = scorer(pa.table(columns))
        predictor = Predictor.from_dir(ckpt, device="cpu")
        inputs = list(zip(columns["text"], columns["text_pair"])) if plan.kind == "pair" else next(iter(columns.values()))
        expected = predictor.predict(inputs)
        for key in expected[0]:
            got = out.column(f"pred_{key}").to_pylist()
            if isinstance(expected[0][key], dict):  # a map column comes back as (key, value) pairs
                got = [dict(g) for g in got]
            if key in ("value",):
                assert got == pytest.approx([e[key] for e in expected], abs=1e-5), task
            elif key == "scores":
                for g, e in zip(got, expected):
                    assert g == pytest.approx(e[key], abs=1e-5), task
            elif key != "entities":
                assert got == [e[key] for e in expected], (task, key)
        assert out.column("reject_reason").null_count == 40


# --------------------------------------------------------------------------- on Ray




@pytest.mark.ray
def test_twenty_thousand_parquet_rows_come_back_once_in_order_as_the_predictor_scores_them(
    ray_local, tmp_path, tiny_checkpoint, capsys
):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from mlflow.tracking import MlflowClient

    from raypipe.batch import run
    from raypipe.config import RaypipeConfig
    from raypipe.predict import Predictor

    n = 20_000
    texts: list = _texts(n)
    bad = {17: "", 905: "   ", 4321: None, 12000: "goal " * 60}  # empty, blank, null, too long (60 > 32 tokens)
    for i, t in bad.items():
        texts[i] = t
    src = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(n)], "text": texts}), src, row_group_size=3000)
    cfg = RaypipeConfig(workdir=str(tmp_path / "work"), predict={"concurrency": 2})
    out = tmp_path / "scored.parquet"
    result = run(str(tiny_checkpoint), str(src), str(out), cfg, progress_every_s=0.0)

    got = pq.read_table(out)
    assert got.num_rows == n
    assert got.column("id").to_pylist() == [f"r{i}" for i in range(n)]  # every row once, in input order
    assert got.column("row_id").to_pylist() == list(range(n))
    reasons = got.column("reject_reason").to_pylist()
    assert {i for i, r in enumerate(reasons) if r is not None} == set(bad)
    assert reasons[12000] == "longer than max_length (62 tokens > 32)"
    assert reasons[17].startswith("empty text") and reasons[4321].startswith("no text")
    assert (result.rows_read, result.rows_scored, result.rows_rejected) == (n, n - 4, 4)
    assert result.first_rejected[0] == "in.parquet row 18: empty text in 'text'"
    assert len(result.rows_per_node) == 1 and sum(result.rows_per_node.values()) == n

    good = [i for i in range(n) if i not in bad]
    expected = Predictor.from_dir(tiny_checkpoint, device="cpu").predict([texts[i] for i in good])
    labels, scores = got.column("pred_label").to_pylist(), got.column("pred_score").to_pylist()
    assert [labels[i] for i in good] == [e["label"] for e in expected]
    assert max(abs(scores[i] - e["score"]) for i, e in zip(good, expected)) < 1e-5
    assert all(labels[i] is None for i in bad)

    client = MlflowClient(tracking_uri=cfg.resolved_tracking_uri)
    run_ = client.get_run(result.mlflow_run_id)
    assert run_.data.tags["raypipe.stage"] == "batch_predict"
    assert run_.data.metrics["rows_rejected"] == 4 and run_.data.metrics["rows_read"] == n
    assert run_.data.metrics["rows_per_s"] > 0
    text = capsys.readouterr().out
    assert "rows/s" in text and "4 rejected" in text and str(out) in text
    assert "Execution plan" not in text and "ActorPoolMapOperator" not in text


@pytest.mark.ray
def test_a_bad_row_mid_file_fails_the_job_with_its_file_and_row_and_writes_nothing(ray_local, tmp_path, tiny_checkpoint):
    from raypipe.batch import run
    from raypipe.config import RaypipeConfig

    src = tmp_path / "in.jsonl"
    lines = [json.dumps({"text": t}) for t in _texts(50)]
    lines[30] = '{"text": "unterminated'
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.jsonl"
    with pytest.raises(DataError, match=r"in\.jsonl: line 31 is not valid JSON"):
        run(str(tiny_checkpoint), str(src), str(out), RaypipeConfig(workdir=str(tmp_path / "w")), log_run=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]  # no output, no part file


@pytest.mark.ray
def test_raypipe_predict_scores_a_registered_model_over_csv_files_with_name_and_version(
    ray_local, tmp_path, tiny_checkpoint
):
    """The CLI in its own process (a second driver on the session's Ray, as `raypipe predict`
    against a running cluster), a models:/ URI, a glob of two TSV files without a header."""
    import csv

    from raypipe.config import RaypipeConfig
    from raypipe.registration import run as register

    cfg = RaypipeConfig(workdir=str(tmp_path / "work"), registry={"model_name": "batch-tiny"})
    reg = register(str(tiny_checkpoint), cfg, metrics={"test_macro_f1": 0.5}, force=True)
    texts = _texts(30)
    for part in (0, 1):
        with open(tmp_path / f"part{part}.tsv", "w", newline="") as f:
            w = csv.writer(f, delimiter="\t")
            for i in range(15):
                w.writerow([f"id{part}-{i}", texts[part * 15 + i] if i != 3 else ""])
    config = tmp_path / "cfg.yaml"
    config.write_text(json.dumps({"workdir": str(tmp_path / "work"), "ray": {"num_cpus": 2, "include_dashboard": False},
                                  "data": {"header": False, "columns": ["id", "body"]}}))
    out = tmp_path / "scored.csv"
    proc = subprocess.run(
        [sys.executable, "-m", "raypipe.cli", "predict", "--model", f"models:/batch-tiny/{reg.version}",
         "--input", str(tmp_path / "part*.tsv"), "--output", str(out), "--text-column", "body",
         "-c", str(config), f"ray.address={ray_local.get_runtime_context().gcs_address}"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader(out.open()))
    assert [r["id"] for r in rows] == [f"id{p}-{i}" for p in (0, 1) for i in range(15)]
    assert {r["model_name"] for r in rows} == {"batch-tiny"} and {r["model_version"] for r in rows} == {str(reg.version)}
    assert {Path(r["source_file"]).name for r in rows} == {"part0.tsv", "part1.tsv"}
    assert [r["id"] for r in rows if r["reject_reason"]] == ["id0-3", "id1-3"]
    assert json.loads(rows[0]["pred_probabilities"]).keys() == {"food", "sport", "tech"}
    assert "30 rows read, 28 scored, 2 rejected" in proc.stdout
    assert "part0.tsv row 4: empty text in 'body'" in proc.stdout


@pytest.mark.ray
def test_token_classification_scores_word_lists_from_jsonl(ray_local, tmp_path, tiny_model_dir):
    import pandas as pd
    import pyarrow.parquet as pq  # noqa: F401

    from raypipe.batch import run
    from raypipe.config import RaypipeConfig
    from raypipe.predict import Predictor

    words = [t.split() for t in _texts(60)]
    frame = pd.DataFrame({"tokens": words, "label": [["O"] * (len(w) - 1) + ["B-X"] for w in words]})
    ckpt = _checkpoint(tmp_path, tiny_model_dir, "token_classification", frame, max_length=16, window_stride=4)
    src = tmp_path / "sents.jsonl"
    long = ("goal " * 40).split()  # longer than max_length: windows, not a rejection
    rows = [{"n": i, "tokens": w} for i, w in enumerate(words)] + [{"n": 60, "tokens": long}, {"n": 61, "tokens": []}]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "ents.jsonl"
    result = run(str(ckpt), str(src), str(out), RaypipeConfig(workdir=str(tmp_path / "w")), log_run=False)
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [g["n"] for g in got] == list(range(62))
    assert result.rows_rejected == 1 and got[61]["reject_reason"] == "no words in 'tokens'"
    expected = Predictor.from_dir(ckpt, device="cpu").predict(words + [long])
    assert [g["pred_tags"] for g in got[:61]] == [e["tags"] for e in expected]
    assert len(got[60]["pred_tags"]) == 40


def test_overlong_texts_are_rejected_by_default_and_scored_truncated_when_asked(tiny_checkpoint):
    import pyarrow as pa

    from raypipe.batch import Plan, _Scorer
    from raypipe.predict import Predictor

    table = pa.table({"text": ["goal match", "goal " * 60]})  # 62 tokens > max_length 32
    plan = Plan("text", ["text"]).__dict__
    rejected = _Scorer(str(tiny_checkpoint), str(tiny_checkpoint), None, "cpu", 1, plan, 8, "reject")(table)
    assert rejected.column("reject_reason").to_pylist() == [None, "longer than max_length (62 tokens > 32)"]
    assert rejected.column("pred_label").to_pylist()[1] is None
    truncated = _Scorer(str(tiny_checkpoint), str(tiny_checkpoint), None, "cpu", 1, plan, 8, "truncate")(table)
    assert truncated.column("reject_reason").to_pylist() == [None, None]
    assert truncated.column("_truncated").to_pylist() == [False, True]
    expected = Predictor.from_dir(tiny_checkpoint, device="cpu").predict(["goal match", "goal " * 60])
    assert truncated.column("pred_label").to_pylist() == [e["label"] for e in expected]


def test_batch_usage_errors_exit_2_with_what_to_give(tmp_path, capsys):
    from raypipe.cli import main

    assert main(["predict", "--model", "m", "--input", str(tmp_path / "in.csv")]) == 2
    assert "--model, --input and --output" in capsys.readouterr().err
    assert main(["predict", "--model", "m", "--input", "a.csv", "--output", "o.csv", "stray text"]) == 2
    assert "key.path=value overrides" in capsys.readouterr().err


def test_an_sft_model_answers_every_prompt_of_a_jsonl_file_as_its_predictor_does(ray_local, tmp_path, tiny_lm_dir):
    """``raypipe predict --input`` on a causal LM: one greedy answer per prompt, in input order,
    the same text the offline Predictor generates; an empty prompt is a rejected row, not a crash."""
    from raypipe.batch import run
    from raypipe.config import RaypipeConfig
    from raypipe.predict import Predictor
    from tests.conftest import make_sft_checkpoint

    ckpt = make_sft_checkpoint(tmp_path / "sft", tiny_lm_dir, seed=3)
    prompts = [f"Say something about number {i}." for i in range(12)]
    src = tmp_path / "prompts.jsonl"
    rows = [{"id": i, "prompt": p} for i, p in enumerate(prompts)] + [{"id": 12, "prompt": ""}]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "answers.jsonl"
    result = run(str(ckpt), str(src), str(out), RaypipeConfig(workdir=str(tmp_path / "w")), log_run=False)
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [g["id"] for g in got] == list(range(13))
    assert result.rows_rejected == 1 and got[12]["reject_reason"]
    expected = Predictor.from_dir(ckpt, device="cpu").predict(prompts)
    answers = [{k: v for k, v in g.items() if k.startswith("pred_")} for g in got[:12]]
    assert answers == [{f"pred_{k}": v for k, v in e.items()} for e in expected], (answers[:2], expected[:2])
