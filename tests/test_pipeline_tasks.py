"""`raypipe run` end to end for every task: the real CLI entry point on a tiny model, a real local
Ray, a real sqlite MLflow store, the champion served by Ray Serve and queried over real HTTP.

While the pipeline's own server is up (between its deploy and its shutdown) the tests put their
own HTTP questions to it: ``raypipe.client.predict_http`` — the call the pipeline makes for its
sample predictions — is wrapped so that, after answering the pipeline, it lets the test query the
same server with httpx. Nothing is mocked: the wrapper calls the real function.
"""

from __future__ import annotations

import json
import random
import socket
import subprocess
from pathlib import Path

import httpx
import mlflow
import pytest
import yaml
from mlflow.tracking import MlflowClient

from raypipe.cli import main as cli
from tests.conftest import CLASSES, FILLER, ner_sentences, write_conll

pytestmark = pytest.mark.ray

TAGS = sorted(CLASSES)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(tmp_path: Path, model_dir: Path, task: str, data: dict, train: dict, **extra) -> Path:
    tree = {
        "task": task,
        "name": f"e2e-{task}",
        "workdir": str(tmp_path / "work"),
        "data": {"max_length": 32, **data},
        "model": {"name": str(model_dir)},
        "train": {"batch_size": 16, "warmup_ratio": 0.0, **train},
        "scaling": {"num_workers": 1, "use_gpu": False, "cpus_per_worker": 0.5},
        "registry": {"model_name": f"e2e-{task}", "alias": "champion"},
        "serve": {"port": _free_port(), "max_batch_size": 8},
        **extra,
    }
    path = tmp_path / f"{task}.yaml"
    path.write_text(yaml.safe_dump(tree), encoding="utf-8")
    return path


@pytest.fixture
def http_probe(monkeypatch):
    """Runs ``probe(url)`` against the pipeline's live server right after its sample query."""
    import raypipe.client

    real = raypipe.client.predict_http
    seen: dict = {}

    def install(probe):
        def wrapped(url, inputs, **kw):
            answer = real(url, inputs, **kw)
            seen["pipeline_answer"] = answer
            seen["probe"] = probe(url)
            return answer

        monkeypatch.setattr(raypipe.client, "predict_http", wrapped)
        return seen

    return install


def _registered(cfg_path: Path):
    from raypipe.config import load_config

    cfg = load_config(cfg_path)
    client = MlflowClient(tracking_uri=cfg.resolved_tracking_uri)
    version = client.get_model_version_by_alias(cfg.registry.model_name, cfg.registry.alias)
    return cfg, client, version


# --------------------------------------------------------------------- multi-label


def _multi_label_rows(n: int, seed: int) -> list[dict]:
    """Each text carries the keywords of 0-2 topics; its labels are exactly those topics."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        k = [0, 1, 1, 2][i % 4]
        chosen = sorted(rng.sample(TAGS, k))
        words = rng.choices(FILLER, k=rng.randint(3, 6))
        for tag in chosen:
            words += rng.choices(CLASSES[tag], k=3)
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "topics": chosen})
    return rows


PROBE_TEXTS = ["goal team striker match league", "the of and to in", "a goal by the team chip robot code"]


def test_raypipe_run_multi_label_sweeps_with_asha_registers_and_serves(
    ray_local, tmp_path, tiny_model_dir, http_probe, capsys
):
    data = tmp_path / "topics.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _multi_label_rows(900, seed=1)), encoding="utf-8")
    cfg_path = _config(
        tmp_path, tiny_model_dir, "multi_label",
        {"path": str(data), "label_column": "topics", "val_fraction": 0.2, "test_fraction": 0.2},
        {"epochs": 10, "lr": 1e-3, "metric": "val_micro_f1"},
        tune={"num_samples": 1, "search_space": {"train.lr": {"grid": [1e-3, 3e-3]}},  # both rates, always
              "scheduler": {"type": "asha", "grace_period": 3, "reduction_factor": 2}},
        registry={"model_name": "e2e-topics", "alias": "champion", "promotion_metric": "test_micro_f1"},
    )

    def probe(url):
        with httpx.Client(base_url=url, timeout=30) as h:
            return {
                "predict": h.post("/predict", json={"texts": PROBE_TEXTS}).json(),
                "metadata": h.get("/metadata").json(),
                "openapi": h.get("/openapi.json").json(),
                "pairs_on_a_text_model": h.post("/predict", json={"pairs": [["a", "b"]]}).status_code,
            }

    seen = http_probe(probe)
    assert cli(["run", str(cfg_path)]) == 0
    out = capsys.readouterr().out
    assert "raypipe pipeline summary (multi_label)" in out and "sweep of 2 trial(s)" in out

    # MLflow: the trials are child runs with the task's metric per epoch; the champion is registered.
    cfg, client, version = _registered(cfg_path)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    runs = client.search_runs([exp.experiment_id])
    trials = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(trials) == 2 and all("val_micro_f1" in t.data.metrics for t in trials)
    assert version.tags["raypipe.task"] == "multi_label"
    test_f1 = float(version.tags["test_micro_f1"])
    assert test_f1 > 0.7, out

    # Real HTTP against the served champion: label sets with every label's score.
    probe_out = seen["probe"]
    sport, empty, both = probe_out["predict"]["predictions"]
    assert sport["labels"] == ["sport"], sport
    assert empty["labels"] == [], empty
    assert set(both["scores"]) == set(TAGS)
    assert set(list(both["scores"])[:2]) == {"sport", "tech"}, both  # most likely first
    meta = probe_out["metadata"]
    assert meta["task"] == "multi_label"
    # Lineage of the served model: its run, the data it trained on, the code that trained it.
    assert meta["model"]["run_id"] == version.run_id
    assert meta["data_fingerprint"] == version.tags["raypipe.data_fingerprint"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False).stdout.strip()
    assert meta["git_sha"] == (head or None) and meta["git_sha"] == client.get_run(version.run_id).data.tags.get("git.sha")
    assert probe_out["pairs_on_a_text_model"] == 422
    item = json.dumps(probe_out["openapi"]["components"]["schemas"])
    assert "Labels whose score reaches their decision threshold" in item

    # The thresholds were fitted on validation and travel with the model.
    from raypipe.registry import load_predictor

    predictor = load_predictor(f"models:/{cfg.registry.model_name}@champion", tracking_uri=cfg.resolved_tracking_uri)
    thresholds = predictor.schema["thresholds"]
    assert len(thresholds) == len(TAGS) and all(0.0 < t < 1.0 for t in thresholds)

    # pyfunc: the registered model predicts the same label sets.
    mlflow.set_tracking_uri(cfg.resolved_tracking_uri)
    py = mlflow.pyfunc.load_model(f"models:/{cfg.registry.model_name}@champion")
    frame = py.predict(PROBE_TEXTS)
    assert [list(x) for x in frame["labels"]] == [p["labels"] for p in probe_out["predict"]["predictions"]]

    # `raypipe evaluate` reports the task's metrics and plots; `raypipe predict` prints label sets.
    assert cli(["evaluate", f"models:/{cfg.registry.model_name}@champion", "--config", str(cfg_path)]) == 0
    ev = capsys.readouterr().out
    assert "micro_f1" in ev and "subset_accuracy" in ev and "threshold  precision" in ev
    eval_runs = client.search_runs([exp.experiment_id], filter_string="tags.`raypipe.stage` = 'evaluate'")
    assert len(eval_runs) == 2  # the pipeline's and this one
    for run in eval_runs:
        figures = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
        assert {"evaluation/per_label_f1.png", "evaluation/report.json"} <= figures, figures
    assert cli(["predict", "--model", f"models:/{cfg.registry.model_name}@champion", "--config", str(cfg_path),
                "bread soup chef recipe"]) == 0
    assert "food" in capsys.readouterr().out


# --------------------------------------------------------------------- regression on pairs


def _pair_rows(n: int, seed: int) -> list[tuple[str, str, float]]:
    """Two texts and a 0-5 score (the scale of STS-B) that needs both of them: 2.5 for each text
    about sport, plus a little noise. A model reading only the first text cannot fit it."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.choice(TAGS), rng.choice(TAGS)
        ta = " ".join(rng.choices(FILLER, k=3) + rng.choices(CLASSES[a], k=3))
        tb = " ".join(rng.choices(FILLER, k=3) + rng.choices(CLASSES[b], k=3))
        score = 2.5 * (a == "sport") + 2.5 * (b == "sport") + rng.uniform(-0.3, 0.3)
        rows.append((ta, tb, round(min(max(score, 0.0), 5.0), 3)))
    return rows


def test_raypipe_run_regression_on_sentence_pairs_serves_values_in_the_training_unit(
    ray_local, tmp_path, tiny_model_dir, http_probe, capsys
):
    data = tmp_path / "pairs.tsv"
    lines = ["sentence1\tsentence2\tscore"] + [f"{a}\t{b}\t{s}" for a, b, s in _pair_rows(600, seed=2)]
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    cfg_path = _config(
        tmp_path, tiny_model_dir, "regression",
        {"path": str(data), "text_columns": ["sentence1"], "text_pair_column": "sentence2", "label_column": "score",
         "val_fraction": 0.15, "test_fraction": 0.15},
        {"epochs": 8, "lr": 2e-3, "metric": "val_pearson"},
        registry={"model_name": "e2e-similarity", "alias": "champion", "promotion_metric": "test_pearson"},
    )
    both, one, none = (["goal match team", "league cup striker"], ["goal match team", "bread soup chef"],
                       ["chip robot code", "bread soup chef"])

    def probe(url):
        with httpx.Client(base_url=url, timeout=30) as h:
            return {
                "predict": h.post("/predict", json={"pairs": [both, one, none]}).json(),
                "text_on_a_pair_model": h.post("/predict", json={"texts": ["only one text"]}),
                "openapi": h.get("/openapi.json").json(),
            }

    seen = http_probe(probe)
    assert cli(["run", str(cfg_path)]) == 0
    out = capsys.readouterr().out
    assert "raypipe pipeline summary (regression)" in out and "served at" in out

    cfg, client, version = _registered(cfg_path)
    assert version.tags["raypipe.task"] == "regression"
    assert float(version.tags["test_pearson"]) > 0.8, out
    run = client.get_run(version.run_id)
    history = client.get_metric_history(version.run_id, "val_rmse")
    assert len(history) == cfg.train.epochs and "val_spearman" in run.data.metrics

    # Over HTTP: values in the 0-5 unit of the data, not the standardised one used in training.
    hi, mid, lo = (p["value"] for p in seen["probe"]["predict"]["predictions"])
    assert hi > 4.0 and lo < 1.0 and mid < hi - 1.0, (hi, mid, lo)
    bad = seen["probe"]["text_on_a_pair_model"]
    assert bad.status_code == 422 and "pairs" in bad.text
    assert "pairs" in json.dumps(seen["probe"]["openapi"]["paths"]["/predict"])

    # pyfunc with two string columns; `raypipe predict --pairs`.
    import pandas as pd

    mlflow.set_tracking_uri(cfg.resolved_tracking_uri)
    py = mlflow.pyfunc.load_model(f"models:/{cfg.registry.model_name}@champion")
    frame = py.predict(pd.DataFrame([both, none]))
    assert frame["value"].iloc[0] > frame["value"].iloc[1] + 3.0
    assert cli(["predict", "--model", f"models:/{cfg.registry.model_name}@champion", "--config", str(cfg_path),
                "--pairs", *both, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["value"] > 4.0


# --------------------------------------------------------------------- classification on pairs


# Slow tier since 2026-12-07 (~45 s), to keep CI under 30 min: the default tier runs sentence pairs
# end to end in the regression test above (pair tokenisation, `predict --pairs`) and classification
# end to end in every other pipeline test; this one is their combination.
@pytest.mark.slow
def test_raypipe_run_pair_classification_is_entailment_style_classification(ray_local, tmp_path, tiny_model_dir, capsys):
    data = tmp_path / "nli.csv"
    rows = [("premise,hypothesis,label")]
    for a, b, s in _pair_rows(480, seed=3):
        rows.append(f"{a},{b},{'both' if s > 4.0 else 'not both'}")  # both texts about sport
    data.write_text("\n".join(rows) + "\n", encoding="utf-8")
    cfg_path = _config(
        tmp_path, tiny_model_dir, "classification",
        {"path": str(data), "text_columns": ["premise"], "text_pair_column": "hypothesis"},
        {"epochs": 8, "lr": 2e-3},
    )
    assert cli(["run", str(cfg_path), "--no-serve"]) == 0
    out = capsys.readouterr().out
    assert "sentence pairs" in out
    cfg, client, version = _registered(cfg_path)
    assert float(version.tags["test_accuracy"]) > 0.8, out
    assert cli(["predict", "--model", f"models:/{cfg.registry.model_name}@champion", "--config", str(cfg_path),
                "--pairs", "goal match team", "league cup striker", "goal match team", "bread soup chef"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("both") and printed[1].startswith("not both"), printed


# --------------------------------------------------------------------- named entities


def test_raypipe_run_token_classification_serves_entities_whose_offsets_slice_the_input(
    ray_local, tmp_path, tiny_model_dir, http_probe, capsys
):
    train = write_conll(tmp_path / "train.txt", ner_sentences(500, seed=4, long_every=25))
    test = write_conll(tmp_path / "test.txt", ner_sentences(80, seed=5, long_every=10))
    cfg_path = _config(
        tmp_path, tiny_model_dir, "token_classification",
        {"path": str(train), "test_path": str(test), "val_fraction": 0.15, "test_fraction": 0.0,
         "window_stride": 8},
        {"epochs": 6, "lr": 3e-3},
        registry={"model_name": "e2e-ner", "alias": "champion", "promotion_metric": "test_entity_f1"},
    )
    texts = ["Gestern traf Zoë Müller in São Paulo die Leute von Acme Corp.",
             "the year of Omar Haddad and Kraków " * 8]  # the second is longer than max_length (32)

    def probe(url):
        with httpx.Client(base_url=url, timeout=30) as h:
            return {
                "texts": h.post("/predict", json={"texts": texts}).json(),
                "tokens": h.post("/predict", json={"tokens": [["Anna", "Schmidt", "visited", "Oslo"]]}).json(),
                "empty_word": h.post("/predict", json={"tokens": [["Anna", " "]]}),
                "metadata": h.get("/metadata").json(),
                "openapi": h.get("/openapi.json").json(),
            }

    seen = http_probe(probe)
    assert cli(["run", str(cfg_path)]) == 0
    out = capsys.readouterr().out
    assert "raypipe pipeline summary (token_classification)" in out and "served at" in out

    cfg, client, version = _registered(cfg_path)
    assert version.tags["raypipe.task"] == "token_classification"
    assert float(version.tags["test_entity_f1"]) > 0.8, out
    history = client.get_metric_history(version.run_id, "val_entity_f1")
    assert len(history) == cfg.train.epochs

    # Over HTTP: entities with offsets that slice each input to the entity text exactly.
    probe_out = seen["probe"]
    first, long = probe_out["texts"]["predictions"]
    for text, pred in zip(texts, (first, long)):
        for e in pred["entities"]:
            assert text[e["start"]:e["end"]] == e["text"], e
        assert len(pred["tags"]) == len(pred["words"])
    assert [(e["type"], e["text"]) for e in first["entities"]] == [
        ("PER", "Zoë Müller"), ("LOC", "São Paulo"), ("ORG", "Acme Corp")], first
    assert sum(e["text"] == "Omar Haddad" for e in long["entities"]) == 8  # windows stitched back per word
    (tokens_answer,) = probe_out["tokens"]["predictions"]
    assert [(e["type"], e["start"], e["end"]) for e in tokens_answer["entities"]] == [("PER", 0, 12), ("LOC", 21, 25)]
    bad = probe_out["empty_word"]
    assert bad.status_code == 422 and "tokens[0][1] is empty" in bad.text
    assert probe_out["metadata"]["inputs"] == "tokens" and "B-PER" in probe_out["metadata"]["labels"]
    schemas = json.dumps(probe_out["openapi"]["components"]["schemas"])
    assert "Character offset of the first character" in schemas and "TokensRequest" in schemas

    # pyfunc gives the same entities; `raypipe evaluate` prints the per-type table and logs plots.
    mlflow.set_tracking_uri(cfg.resolved_tracking_uri)
    py = mlflow.pyfunc.load_model(f"models:/{cfg.registry.model_name}@champion")
    frame = py.predict(texts[:1])
    assert [e["text"] for e in frame["entities"].iloc[0]] == ["Zoë Müller", "São Paulo", "Acme Corp"]
    assert cli(["evaluate", f"models:/{cfg.registry.model_name}@champion", "--config", str(cfg_path),
                "--data", str(test)]) == 0
    ev = capsys.readouterr().out
    assert "entity_f1" in ev and "word accuracy" in ev and "PER" in ev
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    run = client.search_runs([exp.experiment_id], filter_string="tags.`raypipe.stage` = 'evaluate'")[0]
    figures = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert {"evaluation/per_type_f1.png", "evaluation/confusion_matrix.png"} <= figures, figures


# --------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("task", "name", "good", "bad", "extra", "message"),
    [
        ("regression", "rows.csv", "text,label\nthe cat sat,1.0", "a fine day,very high", {},
         r"row 2: target 'very high' in column 'label' is not a finite number"),
        ("multi_label", "rows.jsonl", '{"text": "the cat sat", "label": ["a"]}', '{"text": "a fine day", "label": "a"}',
         {}, r"row 2: .*is a string; a multi-label target is a list, or set data.label_separator"),
        ("regression", "rows.csv", "text,label\nthe cat sat,1.0", "a fine day,2.5", {"text_pair_column": "sentence2"},
         r"sentence2"),
        ("token_classification", "rows.jsonl", '{"tokens": ["Paris"], "tags": ["B-LOC"]}',
         '{"tokens": ["in", "Oslo"], "tags": ["B-LOC"]}', {}, r"row 2: 2 words but 1 tags"),
    ],
    ids=["regression-non-number", "multi-label-not-a-list", "pair-column-missing", "ner-length-mismatch"],
)
def test_raypipe_run_with_bad_targets_exits_2_naming_file_and_row_and_writes_nothing(
    tmp_path, tiny_model_dir, capsys, task, name, good, bad, extra, message
):
    import re

    data = tmp_path / name
    repeat = good.splitlines()[-1]
    data.write_text(f"{good}\n{bad}\n" + f"{repeat}\n" * 20, encoding="utf-8")
    cfg_path = _config(tmp_path, tiny_model_dir, task, {"path": str(data), **extra}, {"epochs": 1, "lr": 1e-3})
    assert cli(["run", str(cfg_path)]) == 2
    err = capsys.readouterr().err
    assert str(data) in err and re.search(message, err), err
    work = tmp_path / "work"
    assert not (work / "mlflow.db").exists() and not (work / "ray_results").exists()
