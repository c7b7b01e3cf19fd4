"""The task seam: multi-label, regression and sentence pairs through data, model, metrics,
Predictor, pyfunc and the HTTP API — without Ray (the end-to-end runs are in test_pipeline_tasks).

Checkpoints here are the tiny random-init BERT with a head for each task; where a number matters
it is computed by hand in the test.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient

from raypipe import tasks
from raypipe.config import DataConfig, ServeConfig, config_from_dict
from raypipe.data import load_splits, read
from raypipe.errors import CheckpointError, ConfigError, DataError, RegistryError

EMOTIONS = ["joy", "anger", "fear", "surprise"]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def _multi_rows(n: int) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        chosen = sorted(rng.choice(EMOTIONS[:3], size=i % 3, replace=False).tolist())
        rows.append({"text": f"text number {i} " + " ".join(chosen), "label": chosen})
    return rows


def _checkpoint(tmp: Path, tiny_model_dir: Path, task: str, schema: dict) -> Path:
    import torch

    from raypipe.config import ModelConfig
    from raypipe.model import build, save_checkpoint

    torch.manual_seed(0)
    model, tokenizer = build(ModelConfig(name=str(tiny_model_dir)), schema, task)
    return save_checkpoint(tmp / f"{task}-ckpt", model, tokenizer,
                           {"task": task, "schema": schema, "max_length": 32, "epoch": 1, "metrics": {}})


# --------------------------------------------------------------------------- the registry


def test_every_task_is_registered_with_metrics_and_directions():
    assert tasks.names() == ["classification", "multi_label", "regression", "token_classification", "sft"]
    for name in tasks.names():
        t = tasks.get(name)
        assert isinstance(t, tasks.Task) and t.name == name
        assert t.default_metric in t.metrics and t.metrics["loss"] == "min"
    assert tasks.direction("val_rmse") == "min" and tasks.direction("test_pearson") == "max"
    assert tasks.direction("val_macro_f1") == "max" and tasks.direction("val_loss") == "min"
    assert tasks.direction("val_entity_f1") == "max"


def test_config_metrics_follow_the_task_and_are_checked_against_it():
    reg = config_from_dict({"task": "regression"})
    assert (reg.train.metric, reg.tune.metric, reg.registry.promotion_metric) == ("val_rmse", "val_rmse", "test_rmse")
    assert reg.train.resolved_mode == "min" and reg.tune.resolved_mode == "min"
    ml = config_from_dict({"task": "multi_label", "train": {"metric": "val_macro_f1"}})
    assert ml.train.metric == "val_macro_f1" and ml.registry.promotion_metric == "test_micro_f1"
    with pytest.raises(ConfigError) as err:
        config_from_dict({"task": "regression", "train": {"metric": "val_accuracy"},
                          "registry": {"promotion_metric": "test_macro_f1"}})
    text = str(err.value)
    assert "train.metric: 'val_accuracy' is not a metric of task 'regression'" in text
    assert "registry.promotion_metric: 'test_macro_f1'" in text and "test_spearman" in text
    with pytest.raises(ConfigError, match="unknown task 'ner'"):
        config_from_dict({"task": "ner"})


# --------------------------------------------------------------------------- multi-label data


def test_multi_label_reads_list_columns_and_empty_sets(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": ["joy", "fear"]}, {"text": "b", "label": []},
                                           {"text": "c", "label": ["joy"]}])
    frame = read(str(path), DataConfig(), task="multi_label")
    assert list(frame["label"]) == [("fear", "joy"), (), ("joy",)]


def test_multi_label_delimited_ids_named_from_a_file_like_goemotions(tmp_path):
    """GoEmotions' layout: TSV, no header, CSV-quoted texts, comma-separated ids into emotions.txt."""
    names = tmp_path / "emotions.txt"
    names.write_text("\n".join(EMOTIONS), encoding="utf-8")  # no trailing newline, as the real file
    tsv = tmp_path / "train.tsv"
    tsv.write_text('"He said ""hi"" to me"\t0,3\tid1\nplain text\t2\tid2\n"quoted, with comma"\t\tid3\n',
                   encoding="utf-8")
    cfg = DataConfig(header=False, columns=["text", "label", "id"], quoting="csv", label_separator=",",
                     label_names=str(names))
    frame = read(str(tsv), cfg, task="multi_label")
    assert list(frame["text"]) == ['He said "hi" to me', "plain text", "quoted, with comma"]
    assert list(frame["label"]) == [("joy", "surprise"), ("fear",), ()]


@pytest.mark.parametrize(
    ("label", "cfg", "message"),
    [
        ("joy", {}, r"row 2: column 'label': label 'joy' is a string; .*data.label_separator"),
        (7, {}, r"row 2: column 'label': label 7 is not a list of labels"),
        ([1.5], {}, r"row 2: column 'label': label list holds 1.5"),
        ([9], {"label_names": EMOTIONS}, r"row 2: column 'label': label 9 is not an index into data.label_names \(4 names\)"),
    ],
)
def test_multi_label_bad_targets_name_file_and_row(tmp_path, label, cfg, message):
    first = [0] if "label_names" in cfg else ["joy"]  # a good row first
    path = _jsonl(tmp_path / "bad.jsonl", [{"text": "a", "label": first}, {"text": "b", "label": label}])
    with pytest.raises(DataError, match=message) as err:
        read(str(path), DataConfig(**cfg), task="multi_label")
    assert str(path) in str(err.value)


def test_multi_label_unknown_validation_label_and_stratified_split(tmp_path):
    train = _jsonl(tmp_path / "train.jsonl", _multi_rows(90))
    val = _jsonl(tmp_path / "val.jsonl", [{"text": "x", "label": ["joy"]}, {"text": "y", "label": ["surprise"]}])
    with pytest.raises(DataError, match=r"val.jsonl: row 2: validation label 'surprise' never occurs in the training data"):
        load_splits(DataConfig(path=str(train), validation_path=str(val)), "multi_label")
    splits = load_splits(DataConfig(path=str(train), val_fraction=0.2, test_fraction=0.2), "multi_label")
    assert splits.schema["labels"] == ["anger", "fear", "joy"] and splits.schema["thresholds"] == [0.5] * 3
    for part in (splits.val, splits.test):  # stratified by rarest label: every label and "no label" in each
        seen = {x for labels in part["label"] for x in labels}
        assert seen == {"anger", "fear", "joy"} and any(len(ls) == 0 for ls in part["label"])
    assert len(splits.train) + len(splits.val) + len(splits.test) == 90


def test_fit_thresholds_pick_each_labels_best_f1():
    from raypipe.tasks.multi_label import fit_thresholds, scores_at

    probs = np.array([[0.9, 0.2], [0.6, 0.35], [0.3, 0.3], [0.1, 0.9]], dtype=np.float32)
    truth = np.array([[1, 0], [1, 1], [0, 1], [0, 1]], dtype=np.float32)
    t = fit_thresholds(probs, truth)
    # label 0: any threshold in (0.3, 0.6] separates perfectly; nearest 0.5 wins -> 0.5
    # label 1: positives score 0.35, 0.3, 0.9 and the negative 0.2: the best F1 (1.0) needs t in (0.2, 0.3]
    assert t[0] == pytest.approx(0.5) and 0.2 < t[1] <= 0.3
    metrics, per_label = scores_at(probs, truth, t, ["a", "b"])
    assert metrics["micro_f1"] == pytest.approx(1.0) and metrics["subset_accuracy"] == pytest.approx(1.0)
    at_half, _ = scores_at(probs, truth, np.array([0.5, 0.5]), ["a", "b"])
    # at 0.5 label b finds 1 of 3 positives: tp=3 (2 a + 1 b), fp=0, fn=2 -> micro-F1 = 6/8
    assert at_half["micro_f1"] == pytest.approx(6 / 8) and at_half["subset_accuracy"] == pytest.approx(0.5)
    assert per_label["b"]["threshold"] == pytest.approx(t[1]) and per_label["b"]["support"] == 3


# --------------------------------------------------------------------------- regression data and metrics


@pytest.mark.parametrize(("value", "shown"), [("high", "'high'"), ("nan", "'nan'"), ("inf", "'inf'"), ("", "''")])
def test_regression_targets_must_be_finite_numbers(tmp_path, value, shown):
    path = tmp_path / "r.csv"
    path.write_text(f"text,score\ngood one,1.5\nbad one,{value}\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"r.csv: row 2: target {shown} in column 'score' is not a finite number"):
        read(str(path), DataConfig(label_column="score"), task="regression")


def test_regression_schema_standardises_and_stratifies_by_decile(tmp_path):
    path = tmp_path / "r.csv"
    rows = "\n".join(f"text {i},{i / 10}" for i in range(100))
    path.write_text("text,score\n" + rows + "\n", encoding="utf-8")
    splits = load_splits(DataConfig(path=str(path), label_column="score", val_fraction=0.1, test_fraction=0.1),
                         "regression")
    y = splits.train["label"].to_numpy()
    assert splits.schema["mean"] == pytest.approx(y.mean()) and splits.schema["std"] == pytest.approx(y.std())
    assert splits.schema["min"] == pytest.approx(y.min()) and splits.schema["target"] == "score"
    # one value from each decile in val: its values spread over the whole range
    assert len(splits.val) == 10 and sorted((splits.val["label"] // 1).astype(int)) == list(range(10))


def test_regression_metrics_by_hand():
    from raypipe.tasks.regression import pearson, spearman

    a, b = np.array([1.0, 2.0, 3.0, 4.0]), np.array([1.0, 3.0, 2.0, 5.0])
    # pearson: cov / (sd sd) with means 2.5 and 2.75
    num = sum((x - 2.5) * (y - 2.75) for x, y in zip(a, b))
    den = math.sqrt(sum((x - 2.5) ** 2 for x in a) * sum((y - 2.75) ** 2 for y in b))
    assert pearson(a, b) == pytest.approx(num / den)
    assert spearman(a, b) == pytest.approx(0.8)  # ranks 1 2 3 4 vs 1 3 2 4: 1 - 6*2/(4*15)
    assert spearman(a, np.array([2.0, 2.0, 1.0, 3.0])) == pytest.approx(pearson([1, 2, 3, 4], [2.5, 2.5, 1, 4]))


# --------------------------------------------------------------------------- sentence pairs


def test_pairs_are_tokenised_as_pairs_not_glued(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    path = tmp_path / "p.tsv"
    path.write_text("a\tb\tlabel\nthe cat sat\ta dog ran\tyes\nhello there\tgeneral\tno\n", encoding="utf-8")
    cfg = DataConfig(text_columns=["a"], text_pair_column="b")
    frame = read(str(path), cfg)
    assert list(frame.columns) == ["text", "text_pair", "label"]
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    schema = {"labels": ["no", "yes"], "inputs": "pair"}
    rows = tasks.get("classification").encode(tok, frame, schema, 16)
    ids = rows["input_ids"][0][: rows["length"][0]].tolist()
    assert ids == tok("the cat sat", "a dog ran")["input_ids"]  # [CLS] a [SEP] b [SEP]
    assert ids.count(tok.sep_token_id) == 2 and rows["token_type_ids"][0][: rows["length"][0]].max() == 1


def test_a_missing_pair_column_names_the_columns_there_are(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("a,label\nx,yes\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"missing column\(s\) \['b'\]; it has \['a', 'label'\]"):
        read(str(path), DataConfig(text_columns=["a"], text_pair_column="b"))


# --------------------------------------------------------------------------- models, Predictor, pyfunc, API


@pytest.fixture(scope="module")
def multi_ckpt(tmp_path_factory, tiny_model_dir) -> Path:
    schema = {"labels": EMOTIONS[:3], "thresholds": [0.4, 0.5, 0.99], "inputs": "text"}
    return _checkpoint(tmp_path_factory.mktemp("ml"), tiny_model_dir, "multi_label", schema)


@pytest.fixture(scope="module")
def pair_reg_ckpt(tmp_path_factory, tiny_model_dir) -> Path:
    schema = {"target": "score", "mean": 2.5, "std": 1.5, "min": 0.0, "max": 5.0, "inputs": "pair"}
    return _checkpoint(tmp_path_factory.mktemp("reg"), tiny_model_dir, "regression", schema)


def test_multi_label_predictions_use_the_checkpoints_thresholds(multi_ckpt):
    from raypipe.predict import Predictor

    p = Predictor.from_dir(multi_ckpt, device="cpu")
    texts = ["happy day", "a scary night", "nothing"]
    out = p.predict(texts)
    probs = p.predict_proba(texts)
    for row, answer in zip(probs, out):
        assert list(answer["scores"]) == [EMOTIONS[j] for j in np.argsort(-row, kind="stable")]
        assert answer["labels"] == [lbl for lbl, s in answer["scores"].items()
                                    if s >= dict(zip(EMOTIONS[:3], [0.4, 0.5, 0.99]))[lbl]]
    top = p.predict(texts, top_k=1)[0]["scores"]
    assert top == {EMOTIONS[int(np.argmax(probs[0]))]: pytest.approx(float(probs[0].max()))}


def test_regression_predictions_are_in_the_targets_unit(pair_reg_ckpt):
    import torch

    from raypipe.predict import Predictor

    p = Predictor.from_dir(pair_reg_ckpt, device="cpu")
    pairs = [("a man plays guitar", "someone plays music"), ("the sky", "a cat")]
    enc = p.tokenizer([a for a, _ in pairs], [b for _, b in pairs], padding=True, return_tensors="pt")
    with torch.no_grad():
        raw = p.model(**enc).logits[:, 0].numpy()
    got = [x["value"] for x in p.predict(pairs)]
    assert got == pytest.approx(list(raw * 1.5 + 2.5), abs=1e-5)  # de-standardised
    with pytest.raises(DataError, match="this model compares two texts"):
        p.predict(["just one text"])
    with pytest.raises(DataError, match="no class probabilities"):
        p.predict_proba(pairs)


def test_old_checkpoints_without_a_task_read_as_classification(tiny_checkpoint, tmp_path):
    import shutil

    from raypipe.model import read_meta
    from raypipe.predict import Predictor

    old = tmp_path / "old"
    shutil.copytree(tiny_checkpoint, old)
    meta = json.loads((old / "raypipe.json").read_text())
    meta.pop("task", None), meta.pop("schema", None)
    (old / "raypipe.json").write_text(json.dumps(meta))
    assert read_meta(old)["task"] == "classification" and read_meta(old)["schema"] == {"labels": meta["labels"]}
    assert Predictor.from_dir(old, device="cpu").predict(["goal"])[0]["label"] in meta["labels"]
    meta["task"] = "summarisation"
    (old / "raypipe.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="task 'summarisation', which this raypipe does not know"):
        read_meta(old)


def _openapi_item(spec: dict, code: str = "200") -> tuple[dict, dict]:
    def follow(node: dict) -> dict:
        while "$ref" in node:
            node = spec["components"]["schemas"][node["$ref"].rsplit("/", 1)[-1]]
        return node

    op = spec["paths"]["/predict"]["post"]
    body = follow(op["requestBody"]["content"]["application/json"]["schema"])
    answer = follow(op["responses"][code]["content"]["application/json"]["schema"])
    return body, follow(answer["properties"]["predictions"]["items"])


def test_api_serves_a_pair_regression_model_and_documents_it(pair_reg_ckpt):
    from raypipe.api import ModelSlot, create_app
    from raypipe.predict import Predictor

    predictor = Predictor.from_dir(pair_reg_ckpt, device="cpu")
    slot = ModelSlot()
    slot.install(predictor)
    c = TestClient(create_app(slot, ServeConfig(max_texts=3, max_chars=40)))
    pairs = [["a man plays guitar", "someone plays music"], ["x", "y"]]
    r = c.post("/predict", json={"pairs": pairs})
    assert r.status_code == 200, r.text
    assert [p["value"] for p in r.json()["predictions"]] == pytest.approx(
        [x["value"] for x in predictor.predict([tuple(p) for p in pairs])], abs=1e-5)
    bad = {
        "texts to a pair model": ({"texts": ["one text"]}, "this model compares two texts"),
        "a pair of three": ({"pairs": [["a", "b", "c"]]}, "pair"),
        "an empty second text": ({"pairs": [["a", " "]]}, "pairs[0][1] is empty"),
        "too many pairs": ({"pairs": [["a", "b"]] * 4}, "4 pairs in one request; the limit is 3"),
        "top_k on regression": ({"pairs": pairs, "top_k": 1}, "top_k applies to models that score labels"),
    }
    for case, (body, words) in bad.items():
        r = c.post("/predict", json=body)
        assert r.status_code == 422 and words in json.dumps(r.json()), (case, r.text)
    request, item = _openapi_item(c.get("/openapi.json").json())
    assert set(request["properties"]) == {"pairs", "top_k"} and request["required"] == ["pairs"]
    assert set(item["properties"]) == {"value"}
    meta = c.get("/metadata").json()
    assert meta["task"] == "regression" and meta["inputs"] == "pair" and meta["labels"] == []


def test_api_serves_a_multi_label_model_and_a_text_model_refuses_pairs(multi_ckpt):
    from raypipe.api import ModelSlot, create_app
    from raypipe.predict import Predictor

    slot = ModelSlot()
    slot.install(Predictor.from_dir(multi_ckpt, device="cpu"))
    c = TestClient(create_app(slot, ServeConfig()))
    answer = c.post("/predict", json={"texts": ["what a day"], "top_k": 2}).json()["predictions"][0]
    assert set(answer) == {"labels", "scores"} and len(answer["scores"]) == 2
    r = c.post("/predict", json={"pairs": [["a", "b"]]})
    assert r.status_code == 422 and "this model takes single texts" in r.text
    request, item = _openapi_item(c.get("/openapi.json").json())
    assert {"texts", "text", "top_k"} == set(request["properties"])
    assert set(item["properties"]) == {"labels", "scores"}


def test_pyfunc_signature_and_answers_per_task(pair_reg_ckpt, multi_ckpt, tmp_path):
    import mlflow.pyfunc

    from raypipe.predict import Predictor
    from raypipe.pyfunc import save

    reg = mlflow.pyfunc.load_model(str(save(pair_reg_ckpt, tmp_path / "reg")))
    assert len(reg.metadata.get_input_schema().input_types()) == 2
    assert reg.metadata.get_output_schema().input_names() == ["value"]
    pairs = [["a man plays guitar", "someone plays music"], ["x", "y"]]
    want = [p["value"] for p in Predictor.from_dir(pair_reg_ckpt, device="cpu").predict([tuple(p) for p in pairs])]
    for given in (pairs, pd.DataFrame({"text": [a for a, _ in pairs], "text_pair": [b for _, b in pairs]})):
        assert list(reg.predict(given)["value"]) == pytest.approx(want, abs=1e-5)
    ml = mlflow.pyfunc.load_model(str(save(multi_ckpt, tmp_path / "ml")))
    out = ml.predict(["happy", "sad"])
    assert list(out.columns) == ["labels", "scores"] and set(out["scores"][0]) == set(EMOTIONS[:3])


# --------------------------------------------------------------------------- registry


def test_the_gate_knows_lower_is_better_and_a_model_name_holds_one_task(tmp_path, pair_reg_ckpt, tiny_checkpoint):
    from raypipe.registration import register_checkpoint

    cfg = config_from_dict({"workdir": str(tmp_path / "w"), "task": "regression"})
    first = register_checkpoint(pair_reg_ckpt, cfg, name="sts", metrics={"test_rmse": 0.80})
    worse = register_checkpoint(pair_reg_ckpt, cfg, name="sts", metrics={"test_rmse": 0.95})
    better = register_checkpoint(pair_reg_ckpt, cfg, name="sts", metrics={"test_rmse": 0.70})
    assert first.decision.promoted and not worse.decision.promoted and better.decision.promoted
    assert "lower is better" in worse.decision.reason
    assert better.decision.previous_version == first.version
    with pytest.raises(RegistryError, match="'sts' holds regression models .* a classification model"):
        register_checkpoint(tiny_checkpoint, cfg.model_copy(update={"task": "classification"}), name="sts",
                            metrics={"test_macro_f1": 0.5, "test_rmse": 0.1})


def test_declared_label_names_are_the_models_labels_even_when_training_lacks_one(tmp_path):
    from raypipe.data import load_splits

    rows = [{"text": f"text {i}", "label": [i % 2]} for i in range(40)] + [{"text": "rare", "label": [3]}]
    train, dev = tmp_path / "train.jsonl", tmp_path / "dev.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows[:40]), encoding="utf-8")
    dev.write_text("".join(json.dumps(r) + "\n" for r in rows[-5:]), encoding="utf-8")
    cfg = DataConfig(path=str(train), validation_path=str(dev), label_names=EMOTIONS)
    splits = load_splits(cfg, "multi_label")
    assert splits.schema["labels"] == list(EMOTIONS)  # 'surprise' (id 3) never occurs in train
    with pytest.raises(DataError, match="never occurs in the training data"):
        load_splits(DataConfig(path=str(train), validation_path=str(dev)), "multi_label")


def test_multi_label_head_starts_each_output_at_its_label_frequency(tiny_model_dir):
    """A fresh sigmoid head at bias 0 says 0.5 for every label; raypipe starts it at the prior."""
    from raypipe.model import build

    cfg = config_from_dict({"task": "multi_label", "model": {"name": str(tiny_model_dir)}})
    train = pd.DataFrame({"text": ["x"] * 10, "label": [["a"], ["a", "b"]] + [["c"]] * 8})
    schema = tasks.get("multi_label").schema(train, cfg.data)
    assert schema["priors"] == [0.2, 0.1, 0.8]
    model, _ = build(cfg.model, schema, "multi_label")
    bias = model.classifier.bias.detach().tolist()
    assert bias == pytest.approx([math.log(0.2 / 0.8), math.log(0.1 / 0.9), 0.0], abs=1e-5)  # capped at 0.5
