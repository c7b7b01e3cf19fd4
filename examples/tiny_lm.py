"""Build a tiny random-init causal LM with a real tokenizer, offline, in a few seconds.

No pretrained causal LM can be downloaded on machines without the Hugging Face hub, so the SFT
example config, the tests and the benchmarks build one: a byte-level BPE tokenizer trained on the
given texts (the same kind of tokenizer GPT-2, Llama 3 and Qwen use) with a chat template, and a
two-layer Llama with random weights, saved as a plain transformers model directory (safetensors)
that ``model.name`` can point at::

    python examples/tiny_lm.py --out raypipe-work/tiny-lm --data ../shared/data/alpaca/alpaca.jsonl

Users with the hub point ``model.name`` at a real instruct model instead
(``examples/configs/alpaca_sft_hub.yaml``).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

SPECIAL = {"bos": "<|bos|>", "eos": "<|eos|>", "pad": "<|pad|>", "unk": "<|unk|>"}
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]

# A Jinja chat template in the common shape: each turn is <|role|>\ncontent<|end|>\n, the
# generation prompt opens an assistant turn. <|end|> is the token that closes a turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def texts_of(path: str | Path, limit: int | None = None) -> list[str]:
    """Every string value of a JSON/JSONL file of rows (Alpaca, prompt/response or messages)."""
    raw = Path(path).read_text(encoding="utf-8")
    rows = json.loads(raw) if raw.lstrip().startswith("[") else [json.loads(line) for line in raw.splitlines() if line.strip()]
    out: list[str] = []

    def walk(v: object) -> None:
        if isinstance(v, str):
            out.append(v)
        elif isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)

    for row in rows[:limit]:
        walk(row)
    return out


def build_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> object:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=SPECIAL["unk"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[SPECIAL["pad"], SPECIAL["bos"], SPECIAL["eos"], SPECIAL["unk"], *ROLE_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts) or ["hello world"], trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIAL["bos"], eos_token=SPECIAL["eos"], pad_token=SPECIAL["pad"], unk_token=SPECIAL["unk"],
        additional_special_tokens=ROLE_TOKENS,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build(out: str | Path, texts: Sequence[str] = (), *, vocab_size: int = 512, hidden: int = 64, layers: int = 2,
          heads: int = 4, max_positions: int = 512, seed: int = 0) -> Path:
    """Write a tokenizer trained on ``texts`` and a random-init Llama to ``out``; returns ``out``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(texts, vocab_size)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|end|>")],
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="directory to write the model to")
    p.add_argument("--data", action="append", default=[], help="JSON/JSONL rows to train the tokenizer on")
    p.add_argument("--limit", type=int, default=2000, help="rows per data file used for the tokenizer")
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    a = p.parse_args(argv)
    texts = [t for f in a.data for t in texts_of(f, a.limit)]
    path = build(a.out, texts, vocab_size=a.vocab_size, hidden=a.hidden, layers=a.layers)
    print(f"tiny causal LM written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
