"""`raypipe run` with task sft on a real local Ray: the tiny causal LM memorises a handful of
prompt/response pairs, held-out evaluation generates them back (exact match, ROUGE-L, the MLflow
table), the version is registered and MLflow's own pyfunc loader answers a prompt with it.
ONE pipeline run, shared by every assertion (module-scoped fixture)."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from raypipe.cli import main as cli
from tests.conftest import SFT_PAIRS

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def sft_run(ray_local, tmp_path_factory, tiny_lm_dir):
    import contextlib  # capsys is function-scoped: the module's one run captures its output by hand
    import io

    tmp = tmp_path_factory.mktemp("sft-e2e")
    # prompt/response rows for training (repeated: several steps per epoch), chat rows for
    # validation and test: the same pairs, so the test measures memorisation
    train = tmp / "train.jsonl"
    train.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in SFT_PAIRS * 8))
    held = tmp / "held.jsonl"
    held.write_text("".join(json.dumps({"messages": [{"role": "user", "content": p},
                                                     {"role": "assistant", "content": r}]}) + "\n"
                            for p, r in SFT_PAIRS))
    cfg_path = tmp / "sft.yaml"
    cfg_path.write_text(yaml.safe_dump({
        "task": "sft", "name": "e2e-sft", "workdir": str(tmp / "work"),
        "data": {"path": str(train), "validation_path": str(held), "test_path": str(held), "max_length": 48,
                 "packing": True, "max_new_tokens": 12, "generation_samples": 6},
        # full fine-tuning: a random-init model learns from scratch; LoRA is tests/test_sft.py's
        "model": {"name": str(tiny_lm_dir), "peft": False},
        "train": {"epochs": 12, "batch_size": 4, "lr": 5e-3, "warmup_ratio": 0.0, "weight_decay": 0.0},
        "scaling": {"num_workers": 1, "use_gpu": False, "cpus_per_worker": 1},
        "registry": {"model_name": "e2e-sft", "alias": "champion"},
    }))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli(["run", str(cfg_path), "--no-serve"])
    from raypipe.config import load_config

    return code, out.getvalue(), load_config(cfg_path)


def test_memorisation_run_reproduces_its_training_responses(sft_run):
    code, out, cfg = sft_run
    assert code == 0, out
    client = MlflowClient(tracking_uri=cfg.resolved_tracking_uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment).experiment_id
    (ev,) = client.search_runs([exp], "tags.`raypipe.stage` = 'evaluate'")
    m = ev.data.metrics
    assert m["test_exact_match"] >= 4 / 6, out
    assert m["test_rouge_l"] >= 0.8 and m["test_loss"] < 1.0 and m["test_perplexity"] < 3.0, m
    # the generations table: one row per sampled prompt, with the scores beside them
    local = Path(mlflow.artifacts.download_artifacts(run_id=ev.info.run_id, artifact_path="evaluation/generations.json",
                                                     tracking_uri=cfg.resolved_tracking_uri))
    table = json.loads(local.read_text())
    assert table["columns"] == ["prompt", "reference", "generation", "exact_match", "rouge_l"]
    rows = [dict(zip(table["columns"], r)) for r in table["data"]]
    assert {r["prompt"] for r in rows} == {p for p, _ in SFT_PAIRS}
    assert sum(r["exact_match"] for r in rows) == round(m["test_exact_match"] * 6)
    # validation loss and perplexity per epoch on the training run; the loss went down
    (tr,) = client.search_runs([exp], "tags.`raypipe.stage` = 'train'")
    history = client.get_metric_history(tr.info.run_id, "val_loss")
    assert len(history) == 12 and history[-1].value < history[0].value / 3
    assert "val_perplexity" in tr.data.metrics
    assert "test_exact_match" in out and "test_rouge_l" in out  # the pipeline summary shows them


def test_registered_sft_model_answers_a_prompt_through_mlflow_pyfunc(sft_run):
    code, out, cfg = sft_run
    assert code == 0, out
    mlflow.set_tracking_uri(cfg.resolved_tracking_uri)
    model = mlflow.pyfunc.load_model("models:/e2e-sft@champion")
    answers = model.predict(pd.DataFrame({"prompt": [p for p, _ in SFT_PAIRS[:3]]}))
    assert list(answers.columns) == ["generation"] and len(answers) == 3
    hits = sum(a.strip() == r for a, (_, r) in zip(answers["generation"], SFT_PAIRS[:3]))
    assert hits >= 2, answers
    sig = model.metadata.get_input_schema()
    assert sig is not None and [c.type.name for c in sig.inputs] == ["string"]
