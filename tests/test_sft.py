"""task sft: rows in three shapes, rendering and label masks, bad rows with file and row, packing
(packed logits equal unpacked ones), metrics, config switches, and the checkpoint contract that
serving relies on (Predictor.from_dir: .model, .tokenizer with a chat template, .meta["task"]).
No Ray here: tests/test_sft_pipeline.py runs the whole pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from raypipe import tasks
from raypipe.config import config_from_dict
from raypipe.errors import ConfigError, DataError
from raypipe.tasks import sft
from tests.conftest import SFT_PAIRS

TASK = tasks.get("sft")


def _cfg(tmp_path: Path, model: Path, path: Path, **data):
    return config_from_dict({"workdir": str(tmp_path / "w"), "task": "sft", "model": {"name": str(model)},
                             "data": {"path": str(path), "max_length": 64, **data}})


@pytest.fixture(scope="module")
def tok(tiny_lm_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_lm_dir))


def _examples(rows: list[dict], tmp_path: Path, name: str = "rows.jsonl"):
    from raypipe import data

    p = tmp_path / name
    p.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    cfg = config_from_dict({"task": "sft", "data": {"path": str(p)}})
    return data.read(str(p), cfg.data, task="sft"), p


def test_three_row_shapes_become_the_same_conversation(tmp_path):
    prompt_rows, _ = _examples([{"prompt": "Say hello.", "response": "Hello there!"}], tmp_path, "a.jsonl")
    alpaca_rows, _ = _examples([{"instruction": "Say hello.", "input": "", "output": "Hello there!"},
                                {"instruction": "Translate.", "input": "chat", "output": "cat"}], tmp_path, "b.jsonl")
    chat_rows, _ = _examples([{"messages": [{"role": "user", "content": "Say hello."},
                                            {"role": "assistant", "content": "Hello there!"}]}], tmp_path, "c.jsonl")
    for frame in (prompt_rows, alpaca_rows, chat_rows):
        assert list(frame["messages"][0]) == [{"role": "user", "content": "Say hello."}]
        assert frame["label"][0] == "Hello there!"
    # Alpaca's input follows the instruction after a blank line
    assert alpaca_rows["messages"][1][0]["content"] == "Translate.\n\nchat"
    assert TASK.inputs_of(alpaca_rows) == ["Say hello.", "Translate.\n\nchat"]


def test_labels_cover_exactly_the_response_tokens(tok):
    ids, labels = sft.tokens_and_labels(tok, [{"role": "user", "content": "Say hello."}], "Hello there!")
    prompt = sft.prompt_ids(tok, "Say hello.")
    assert ids[: len(prompt)] == prompt  # the training prompt is tokenised as generation sees it
    assert all(x == sft.IGNORE for x in labels[: len(prompt)])
    answer = labels[len(prompt):]
    assert answer == ids[len(prompt):] and all(x != sft.IGNORE for x in answer)
    # the response text plus the template's end-of-turn token, which teaches the model to stop
    assert tok.decode(answer).startswith("Hello there!<|end|>")


def test_multi_turn_chat_labels_every_assistant_turn(tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a fruit."},
            {"role": "assistant", "content": "An apple."}, {"role": "user", "content": "Another?"}]
    ids, labels = sft.tokens_and_labels(tok, msgs, "A pear.")
    learned = tok.decode([i for i, lab in zip(ids, labels) if lab != sft.IGNORE])
    assert "An apple." in learned and "A pear." in learned
    assert "Name a fruit" not in learned and "Be brief" not in learned and "Another" not in learned
    assert tok.decode(ids) == sft.render(tok, [*msgs, {"role": "assistant", "content": "A pear."}],
                                         generation_prompt=False)


def test_default_template_when_the_tokenizer_has_none(tiny_lm_dir):
    from transformers import AutoTokenizer

    bare = AutoTokenizer.from_pretrained(str(tiny_lm_dir))
    bare.chat_template = None
    sft.prepare_tokenizer(bare)
    assert bare.chat_template == sft.DEFAULT_CHAT_TEMPLATE
    text = sft.render(bare, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
                      generation_prompt=False)
    assert text == "<|user|>\nhi<|eos|>\n<|assistant|>\nyo<|eos|>\n"


@pytest.mark.parametrize("row, problem", [
    ({"prompt": "Say hello.", "response": ""}, "no response"),
    ({"prompt": "Say hello."}, "needs 'prompt' + 'response'"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "beep"}]}, "unknown role 'robot'"),
    ({"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "x"}]}, "empty content"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "last message must be the assistant"),
    ({"instruction": "", "input": "", "output": "x"}, "empty instruction"),
])
def test_bad_rows_name_file_and_row(tmp_path, row, problem):
    good = {k: v for k, v in row.items()}
    if "messages" in row:
        good = {"messages": [{"role": "user", "content": "ok"}, {"role": "assistant", "content": "fine"}]}
    elif "instruction" in row:
        good = {"instruction": "ok", "input": "", "output": "fine"}
    elif "response" in row:
        good = {"prompt": "ok", "response": "fine"}
    else:
        good = {"prompt": "ok"}
    with pytest.raises(DataError) as err:
        _examples([good, row], tmp_path)
    assert problem in str(err.value)
    if "needs" not in problem:
        assert f"{tmp_path / 'rows.jsonl'}: row 2:" in str(err.value)


def test_bad_rows_skip_drops_them_and_keeps_source_rows(tmp_path):
    from raypipe import data

    p = tmp_path / "rows.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in [
        {"instruction": "a", "input": "", "output": ""}, {"instruction": "b", "input": "", "output": "B"}]))
    cfg = config_from_dict({"task": "sft", "data": {"path": str(p), "bad_rows": "skip"}})
    frame = data.read(str(p), cfg.data, task="sft")
    assert list(frame["label"]) == ["B"] and list(frame["row"]) == [2]


def test_a_prompt_that_leaves_no_room_for_the_response_is_an_error(tmp_path, tok):
    frame, path = _examples([{"prompt": "ok", "response": "fine"},
                             {"prompt": "word " * 80, "response": "fine"}], tmp_path)
    with pytest.raises(DataError, match=rf"{path}: row 2: the prompt takes \d+ tokens, leaving no response"):
        TASK.encode(tok, frame, {"packing": False}, 32)
    skipped = TASK.encode(tok, frame, {"packing": False, "bad_rows": "skip"}, 32)
    assert len(skipped["length"]) == 1  # data.bad_rows: skip drops it instead
    # a long response is cut, not refused
    n = len(sft.prompt_ids(tok, "ok")) + 2
    rows = TASK.encode(tok, frame.iloc[:1], {"packing": False}, n)
    assert rows["length"].tolist() == [n]


def _frame():
    return pd.DataFrame({"messages": [[{"role": "user", "content": p}] for p, _ in SFT_PAIRS],
                         "label": [r for _, r in SFT_PAIRS]})


def test_packing_fills_rows_and_keeps_examples_apart(tiny_lm_dir, tok):
    """Packed logits equal unpacked logits for every example (attention stays inside each)."""
    import torch
    from transformers import AutoModelForCausalLM

    frame = _frame()
    plain = TASK.encode(tok, frame, {"packing": False}, 64)
    packed = TASK.encode(tok, frame, {"packing": True}, 64)
    assert len(packed["length"]) < len(plain["length"])  # several examples per row
    assert packed["labels"][packed["labels"] != sft.IGNORE].size == plain["labels"][plain["labels"] != sft.IGNORE].size
    assert "attention_mask" not in packed and "position_ids" not in plain

    model = AutoModelForCausalLM.from_pretrained(str(tiny_lm_dir))
    TASK.prepare(model, tok)
    model.eval()
    with torch.no_grad():
        per_example = []
        for r in range(len(plain["length"])):
            n = int(plain["length"][r])
            per_example.append(model(input_ids=torch.tensor(plain["input_ids"][r:r + 1, :n], dtype=torch.long)).logits[0])
        ids = torch.tensor(packed["input_ids"], dtype=torch.long)
        pos = torch.tensor(packed["position_ids"], dtype=torch.long)
        out = model(input_ids=ids, position_ids=pos).logits
    found = 0
    for r in range(len(packed["length"])):
        starts = [i for i in range(int(packed["length"][r])) if packed["position_ids"][r, i] == 0]
        ends = [*starts[1:], int(packed["length"][r])]
        for a, b in zip(starts, ends):
            seq = packed["input_ids"][r, a:b].tolist()
            k = next(i for i in range(len(plain["length"])) if plain["input_ids"][i, :int(plain["length"][i])].tolist() == seq)
            torch.testing.assert_close(out[r, a:b], per_example[k], atol=1e-5, rtol=1e-5)
            found += 1
    assert found == len(SFT_PAIRS)


def test_validation_loss_is_the_mean_over_response_tokens(tiny_lm_dir, tok):
    import torch
    from transformers import AutoModelForCausalLM

    from raypipe.batches import evaluate_rows

    model = AutoModelForCausalLM.from_pretrained(str(tiny_lm_dir))
    TASK.prepare(model, tok)
    frame = _frame()
    losses = {}
    for packing in (False, True):
        rows = TASK.encode(tok, frame, {"packing": packing}, 64)
        scores = evaluate_rows(model, TASK, {}, rows, batch_size=4, device=torch.device("cpu"))
        losses[packing] = scores.metrics["loss"]
        assert scores.metrics["perplexity"] == pytest.approx(np.exp(scores.metrics["loss"]))
    assert losses[True] == pytest.approx(losses[False], abs=1e-5)
    # the same number as the model's own loss over all examples at once (one row each, one batch)
    rows = TASK.encode(tok, frame, {"packing": False}, 64)
    with torch.no_grad():
        w = int(rows["length"].max())
        own = model(input_ids=torch.tensor(rows["input_ids"][:, :w], dtype=torch.long),
                    attention_mask=torch.tensor(rows["attention_mask"][:, :w], dtype=torch.long),
                    labels=torch.tensor(rows["labels"][:, :w], dtype=torch.long)).loss
    assert losses[False] == pytest.approx(float(own), rel=1e-4)


def test_rouge_l_and_exact_match():
    assert sft.rouge_l("the cat sat on the mat", "the cat sat on the mat") == 1.0
    assert sft.rouge_l("the cat sat", "dogs run") == 0.0
    # LCS "the cat the" (3) of 6 reference and 4 generated tokens: P 3/4, R 3/6
    assert sft.rouge_l("the cat sat on the mat", "the cat ate the") == pytest.approx(2 * 0.75 * 0.5 / 1.25)
    assert sft.exact_match("Four.", "  Four. ") == 1.0 and sft.exact_match("Four.", "four.") == 0.0


def test_config_lora_by_default_full_fine_tuning_by_switch(tmp_path, tiny_lm_dir):
    on = _cfg(tmp_path, tiny_lm_dir, tmp_path / "x.jsonl")
    assert on.model.peft is not None and on.train.metric == "val_loss" and on.registry.promotion_metric == "test_loss"
    off = config_from_dict({"task": "sft", "model": {"peft": False}})
    assert off.model.peft is None
    assert config_from_dict(off.model_dump()).model.peft is None  # what workers receive stays off
    assert config_from_dict({"model": {"peft": True}}).model.peft is not None
    assert config_from_dict({}).model.peft is None  # other tasks: full fine-tuning by default
    with pytest.raises(ConfigError, match="train.metric: 'val_rouge_l' is not a metric"):
        config_from_dict({"task": "sft", "train": {"metric": "val_rouge_l"}})
    assert config_from_dict({"task": "sft", "registry": {"promotion_metric": "test_rouge_l"}})


def test_lora_auto_targets_llama_attention(tiny_lm_dir):
    from raypipe.model import build, check_peft

    cfg = config_from_dict({"task": "sft", "model": {"name": str(tiny_lm_dir)}})
    check_peft(cfg.model, "sft")
    model, _ = build(cfg.model, {"max_new_tokens": 8}, "sft")
    info = model.raypipe_adapter
    assert info["target_modules"] == ["q_proj", "v_proj"] and info["modules_to_save"] == []
    assert 0 < info["trainable_params"] < info["total_params"] / 5


@pytest.mark.parametrize("peft", [True, False], ids=["lora", "full"])
def test_checkpoint_contract_for_serving(tmp_path, tiny_lm_dir, peft):
    """Predictor.from_dir on an sft checkpoint: a causal LM, a tokenizer with the chat template,
    meta task sft; it generates. Gradient checkpointing trains (LoRA needs input grads)."""
    import torch

    from raypipe.model import build, enable_gradient_checkpointing, save_checkpoint
    from raypipe.predict import Predictor

    cfg = config_from_dict({"task": "sft", "model": {"name": str(tiny_lm_dir), "peft": peft}})
    model, tokenizer = build(cfg.model, {"max_new_tokens": 8}, "sft")
    enable_gradient_checkpointing(model)
    model.train()
    rows = TASK.encode(tokenizer, _frame(), {"packing": False}, 64)
    batch = {k: torch.tensor(rows[k][:2, :20], dtype=torch.long) for k in ("input_ids", "attention_mask", "labels")}
    model(**batch).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)

    out = tmp_path / "ckpt"
    schema = TASK.schema(None, cfg.data)
    save_checkpoint(out, model, tokenizer, {"task": "sft", "schema": schema, "max_length": 64, "epoch": 1,
                                            "metrics": {}, "config": cfg.model_dump(mode="json")})
    p = Predictor.from_dir(out, device="cpu")
    assert p.meta["task"] == "sft"
    assert p.tokenizer.chat_template and "<|assistant|>" in p.tokenizer.chat_template
    from raypipe.adapters import is_adapter

    assert is_adapter(p.model) == peft and p.model.get_base_model().__class__.__name__ == "LlamaForCausalLM" \
        if peft else type(p.model).__name__ == "LlamaForCausalLM"
    assert hasattr(p.model, "generate")
    answers = p.predict(["Say hello.", [{"role": "user", "content": "Name a fruit."}]], max_new_tokens=5)
    assert [set(a) for a in answers] == [{"generation"}] * 2 and all(isinstance(a["generation"], str) for a in answers)
    with pytest.raises(DataError, match="unknown role"):
        p.predict([[{"role": "wizard", "content": "x"}]])
