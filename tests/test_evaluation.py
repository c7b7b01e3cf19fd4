"""raypipe.evaluation on real checkpoints, a real MLflow sqlite store and real files.

Two hand-made models make the expected numbers knowable: a "constant" checkpoint whose
classifier always answers one class (its metrics follow from the label counts alone), and the
tiny BERT trained for a few seconds in plain torch (checked against an independent, loop-based
computation of accuracy and macro-F1).
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import make_rows, write_csv

from raypipe.errors import CheckpointError, DataError, RegistryError
from raypipe.evaluation import run
from raypipe.predict import Predictor

# --------------------------------------------------------------------------- helpers (also used by test_registry)


@contextmanager
def _one_torch_thread():
    """Small models train several times faster single-threaded on a busy 2-core machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def make_constant_checkpoint(src: Path, dst: Path, answer: str) -> Path:
    """A copy of the checkpoint at ``src`` whose classifier always picks ``answer``: zero weights
    and a large bias on that class, so its predictions (and metrics) are known in advance."""
    import torch

    from raypipe.model import load_checkpoint, save_checkpoint

    model, tokenizer, meta = load_checkpoint(src)
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.zero_()
        model.classifier.bias[meta["labels"].index(answer)] = 10.0
    return save_checkpoint(dst, model, tokenizer, meta)


def train_tiny_checkpoint(cfg, dst: Path, epochs: int = 5) -> Path:
    """The tiny BERT fine-tuned on the config's train split in plain torch (no Ray), saved with
    a train_state.pt like a real training checkpoint. Learns the keyword classes in ~3 s."""
    import torch

    from raypipe.data import load_splits
    from raypipe.model import build, save_checkpoint

    splits = load_splits(cfg.data)
    torch.manual_seed(0)
    model, tokenizer = build(cfg.model, splits.schema)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    texts = list(splits.train["text"])
    y = torch.tensor(splits.label_ids(splits.train).to_numpy())
    model.train()
    with _one_torch_thread():
        for epoch in range(epochs):
            perm = torch.randperm(len(texts), generator=torch.Generator().manual_seed(epoch))
            for start in range(0, len(texts), 16):
                idx = perm[start : start + 16]
                enc = tokenizer([texts[i] for i in idx], truncation=True, max_length=32, padding=True, return_tensors="pt")
                loss = model(**enc, labels=y[idx]).loss
                opt.zero_grad()
                loss.backward()
                opt.step()
    model.eval()
    meta = {
        "labels": splits.labels,
        "max_length": cfg.data.max_length,
        "epoch": epochs,
        "metrics": {},
        "data_fingerprint": splits.fingerprint,
        "config": cfg.model_dump(mode="json"),
    }
    return save_checkpoint(dst, model, tokenizer, meta, train_state={"epoch": torch.tensor(epochs)})


def module_config(tmp_path_factory, tiny_model_dir, toy_csv, name: str):
    """Like conftest's tiny_config, for module-scoped fixtures (which cannot use tmp_path)."""
    from raypipe.config import config_from_dict

    return config_from_dict(
        {
            "workdir": str(tmp_path_factory.mktemp(name) / "work"),
            "data": {"path": str(toy_csv), "max_length": 32},
            "model": {"name": str(tiny_model_dir)},
        }
    )


def config_file(cfg, path: Path) -> Path:
    """The config as YAML, for the CLI."""
    import yaml

    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")), encoding="utf-8")
    return path


def hand_metrics(y_true: list[str], y_pred: list[str], labels: list[str]) -> tuple[float, float]:
    """Accuracy and macro-F1 by the textbook definitions, with plain loops (independent of
    raypipe.metrics). Macro-F1 averages over the classes present in y_true."""
    accuracy = sum(t == p for t, p in zip(y_true, y_pred)) / len(y_true)
    f1s = []
    for c in labels:
        if c not in y_true:
            continue
        tp = sum(t == c and p == c for t, p in zip(y_true, y_pred))
        fp = sum(t != c and p == c for t, p in zip(y_true, y_pred))
        fn = sum(t == c and p != c for t, p in zip(y_true, y_pred))
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1s.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
    return accuracy, sum(f1s) / len(f1s)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def always_sport(tmp_path_factory, tiny_checkpoint) -> Path:
    return make_constant_checkpoint(tiny_checkpoint, tmp_path_factory.mktemp("const") / "ckpt", "sport")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir, toy_csv) -> Path:
    cfg = module_config(tmp_path_factory, tiny_model_dir, toy_csv, "train-eval")
    return train_tiny_checkpoint(cfg, tmp_path_factory.mktemp("trained") / "ckpt")


def _mlflow_client(cfg):
    from mlflow.tracking import MlflowClient

    uri = cfg.resolved_tracking_uri
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


# --------------------------------------------------------------------------- metrics


def test_metrics_equal_hand_computation_on_known_case(tiny_config, always_sport, tmp_path):
    # 2 food, 3 sport, 1 tech; the model always says "sport".
    rows = [("bread soup", "food"), ("cheese chef", "food"), ("goal", "sport"), ("match team", "sport"),
            ("league cup", "sport"), ("chip code", "tech")]
    data = write_csv(tmp_path / "known.csv", rows)

    result = run(str(always_sport), tiny_config, data_path=data, log_to_mlflow=False)

    # sport: precision 3/6, recall 3/3, F1 = 2*0.5*1/1.5 = 2/3; food and tech: F1 0.
    assert result.metrics["test_accuracy"] == pytest.approx(3 / 6)
    assert result.metrics["test_macro_f1"] == pytest.approx((0 + 2 / 3 + 0) / 3)
    assert result.labels == ["food", "sport", "tech"]
    assert result.confusion == [[0, 2, 0], [0, 3, 0], [0, 1, 0]]
    assert result.per_class["sport"] == pytest.approx({"precision": 0.5, "recall": 1.0, "f1": 2 / 3, "support": 3})
    assert result.per_class["food"]["support"] == 2 and result.per_class["food"]["f1"] == 0.0
    assert result.num_examples == 6
    assert result.run_id is None  # log_to_mlflow=False
    assert not Path(tiny_config.workdir_path / "mlflow.db").exists()


def test_metrics_equal_independent_computation_on_trained_model(tiny_config, trained):
    from raypipe.data import load_splits

    # batch_size=4 -> chunks of 32 texts: the 36 test texts span two chunks, so a mistake in
    # putting length-sorted predictions back into input order would show here.
    result = run(str(trained), tiny_config, log_to_mlflow=False, batch_size=4)

    test = load_splits(tiny_config.data).test
    predicted = [p["label"] for p in Predictor.from_dir(trained).predict(list(test["text"]))]
    accuracy, macro_f1 = hand_metrics(list(test["label"]), predicted, result.labels)
    assert result.num_examples == len(test) == 36
    assert result.metrics["test_accuracy"] == pytest.approx(accuracy)
    assert result.metrics["test_macro_f1"] == pytest.approx(macro_f1)
    assert sum(map(sum, result.confusion)) == 36
    assert result.metrics["test_accuracy"] > 0.8, "the trained tiny model should have learned the keywords"


def test_summary_is_a_readable_per_class_table(tiny_config, always_sport, tmp_path):
    data = write_csv(tmp_path / "d.csv", [("goal", "sport"), ("soup", "food"), ("chip", "tech")])
    text = run(str(always_sport), tiny_config, data_path=data, log_to_mlflow=False).summary()
    lines = text.splitlines()
    assert "accuracy 0.3333" in text and "macro_f1 0.1667" in text
    header = next(i for i, line in enumerate(lines) if "precision" in line)
    assert [line.split()[0] for line in lines[header + 1 : header + 4]] == ["food", "sport", "tech"]
    assert lines[header + 2].split() == ["sport", "0.3333", "1.0000", "0.5000", "1"]
    assert "confusion matrix" in text


# --------------------------------------------------------------------------- MLflow logging


def test_evaluate_logs_run_with_metrics_plot_and_report_json(tiny_config, trained, tmp_path):
    result = run(str(trained), tiny_config)

    client = _mlflow_client(tiny_config)
    logged = client.get_run(result.run_id)
    assert logged.info.status == "FINISHED"
    assert logged.data.tags["raypipe.stage"] == "evaluate"
    assert logged.data.metrics["test_accuracy"] == pytest.approx(result.metrics["test_accuracy"])
    assert logged.data.metrics["test_macro_f1"] == pytest.approx(result.metrics["test_macro_f1"])
    assert "test_f1.sport" in logged.data.metrics
    assert logged.data.params["data.fingerprint"] == result.fingerprint
    assert logged.data.params["model_uri"] == str(trained)

    files = {f.path for f in client.list_artifacts(result.run_id, "evaluation")}
    assert files == {"evaluation/confusion_matrix.png", "evaluation/report.json"}
    png = Path(client.download_artifacts(result.run_id, "evaluation/confusion_matrix.png", str(tmp_path)))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
    report = json.loads(Path(client.download_artifacts(result.run_id, "evaluation/report.json", str(tmp_path))).read_text())
    assert report["confusion"] == result.confusion
    assert report["per_class"]["tech"]["support"] == result.per_class["tech"]["support"]


def test_evaluate_a_registered_model_by_uri(tiny_config, trained):
    from raypipe.registration import register_checkpoint

    reg = register_checkpoint(trained, tiny_config, name="eval-uri", metrics={"test_macro_f1": 0.5})
    by_uri = run("models:/eval-uri@champion", tiny_config, log_to_mlflow=False)
    by_dir = run(str(trained), tiny_config, log_to_mlflow=False)

    assert by_uri.metrics == pytest.approx(by_dir.metrics)
    assert by_uri.model_meta["model_name"] == "eval-uri"
    assert by_uri.model_meta["model_version"] == reg.version
    assert f"models:/eval-uri@champion (version {reg.version})" in by_uri.summary()


def test_progress_lines_for_large_sets(tiny_config, always_sport, tmp_path, capsys):
    data = write_csv(tmp_path / "many.csv", make_rows(24))
    # batch_size=1 -> chunks of 8 texts -> 3 chunks, one progress line each.
    run(str(always_sport), tiny_config, data_path=data, log_to_mlflow=False, batch_size=1, progress=True)
    err = capsys.readouterr().err
    assert [line.split(" examples")[0] for line in err.splitlines() if line.startswith("evaluate:")] == [
        "evaluate: 8/24", "evaluate: 16/24", "evaluate: 24/24"
    ]


# --------------------------------------------------------------------------- bad input


def test_labels_unknown_to_the_model_raise_data_error_naming_them(tiny_config, always_sport, tmp_path):
    data = write_csv(tmp_path / "other.csv", [("election vote", "politics"), ("goal", "sport"), ("rain", "weather")])
    with pytest.raises(DataError, match=r"\['politics', 'weather'\] are not known to the model.*\['food', 'sport', 'tech'\]"):
        run(str(always_sport), tiny_config, data_path=data, log_to_mlflow=False)


def test_no_data_anywhere_raises_data_error(always_sport, tmp_path):
    from raypipe.config import config_from_dict

    cfg = config_from_dict({"workdir": str(tmp_path / "w")})
    with pytest.raises(DataError, match="nothing to evaluate on"):
        run(str(always_sport), cfg, log_to_mlflow=False)


def test_bad_model_references_raise_clear_errors(tiny_config, tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        run(str(tmp_path / "nope"), tiny_config, log_to_mlflow=False)
    with pytest.raises(RegistryError, match="no MLflow store"):
        run("models:/whatever@champion", tiny_config, log_to_mlflow=False)


# --------------------------------------------------------------------------- CLI


def test_cli_evaluate_prints_summary_and_logs(tiny_config, trained, tmp_path, capsys):
    from raypipe.cli import main

    cfg_file = config_file(tiny_config, tmp_path / "cfg.yaml")
    assert main(["evaluate", str(trained), "--config", str(cfg_file)]) == 0
    out = capsys.readouterr().out
    assert f"Evaluation of {trained}" in out and "macro_f1" in out and "MLflow run:" in out
    runs = _mlflow_client(tiny_config).search_runs(
        [_mlflow_client(tiny_config).get_experiment_by_name("raypipe").experiment_id]
    )
    assert [r.data.tags["raypipe.stage"] for r in runs] == ["evaluate"]


def test_cli_evaluate_no_log_writes_no_run(tiny_config, always_sport, tmp_path, capsys):
    from raypipe.cli import main

    cfg_file = config_file(tiny_config, tmp_path / "cfg.yaml")
    assert main(["evaluate", str(always_sport), "--config", str(cfg_file), "--no-log"]) == 0
    assert "MLflow run:" not in capsys.readouterr().out
    assert not (tiny_config.workdir_path / "mlflow.db").exists()


def test_cli_evaluate_bad_uri_exits_2_with_message(tiny_config, trained, tmp_path, capsys):
    from raypipe.cli import main
    from raypipe.registration import register_checkpoint

    register_checkpoint(trained, tiny_config, name="cli-eval", metrics={"test_macro_f1": 0.5})
    cfg_file = config_file(tiny_config, tmp_path / "cfg.yaml")
    assert main(["evaluate", "models:/cli-eval@nosuchalias", "--config", str(cfg_file)]) == 2
    err = capsys.readouterr().err
    assert "has no alias '@nosuchalias'" in err and "@champion -> v1" in err
    assert main(["evaluate", "models:/cli-eval/banana", "--config", str(cfg_file)]) == 2
