"""The generation engine (raypipe/generation.py) on a tiny random-init Llama: one left-padded
KV-cache loop per batch must give every request what it would get alone, stop each request on
its own (stop strings, eos, max_tokens) and stream deltas that add up to the answer."""

from __future__ import annotations

import asyncio

import pytest

from raypipe.generation import Delta, GenerationEngine, SamplingParams, generate_batch

GREEDY = SamplingParams(max_tokens=12, temperature=0.0)
PROMPTS = ["Say hello.", "What colour is the sky? Tell me", "Name", "Which animal barks? A dog, or a cat, or a bird?"]


@pytest.fixture(scope="module")
def lm(tiny_lm_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # a 64-wide model: more threads only spin on a loaded machine
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval()
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    assert len({len(i) for i in ids}) == len(ids)  # really different lengths: real left padding
    yield model, tokenizer, ids
    torch.set_num_threads(before)


def test_batched_greedy_equals_each_prompt_alone(lm):
    model, tokenizer, ids = lm
    batched = generate_batch(model, tokenizer, ids, [GREEDY] * len(ids))
    alone = [generate_batch(model, tokenizer, [p], [GREEDY])[0] for p in ids]
    assert batched == alone
    assert all(c.prompt_tokens == len(p) for c, p in zip(batched, ids))
    assert any(c.text for c in batched)


def test_max_tokens_ends_with_length(lm):
    model, tokenizer, ids = lm
    out = generate_batch(model, tokenizer, [ids[1], ids[1]], [SamplingParams(max_tokens=3, temperature=0.0), GREEDY])
    assert (out[0].finish_reason, out[0].completion_tokens) == ("length", 3)
    assert out[1].completion_tokens == 12 and out[1].text.startswith(out[0].text)


def test_stop_string_cuts_the_text_and_only_that_request_stops(lm):
    model, tokenizer, ids = lm
    full = generate_batch(model, tokenizer, [ids[0]], [GREEDY])[0].text
    assert len(full) >= 6, full
    stop = full[3:5]  # a stop string the model really produces
    want = full[: full.index(stop)]
    deltas: list[Delta] = []
    out = generate_batch(model, tokenizer, [ids[0], ids[1]],
                         [SamplingParams(max_tokens=12, temperature=0.0, stop=("never-there", stop)), GREEDY],
                         [deltas.append, lambda d: None])
    assert out[0].text == want and out[0].finish_reason == "stop"
    assert "".join(d.text for d in deltas) == want  # no streamed piece of the stop string
    assert out[0].completion_tokens < 12
    assert out[1] == generate_batch(model, tokenizer, [ids[1]], [GREEDY])[0]  # its neighbour went on


def test_eos_ends_with_stop(lm):
    model, tokenizer, ids = lm
    first = generate_batch(model, tokenizer, [ids[2]], [SamplingParams(max_tokens=1, temperature=0.0)])[0]
    token = tokenizer(first.text, add_special_tokens=False)["input_ids"][0]
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [token]  # the model's first greedy token is now its eos
    try:
        out = generate_batch(model, tokenizer, [ids[2]], [GREEDY])[0]
    finally:
        model.generation_config.eos_token_id = saved
    assert (out.text, out.finish_reason, out.completion_tokens) == ("", "stop", 1)


def test_a_seed_makes_sampling_repeatable_batched_or_not(lm):
    model, tokenizer, ids = lm
    seeded = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=7)
    a = generate_batch(model, tokenizer, [ids[1]], [seeded])[0]
    b = generate_batch(model, tokenizer, ids, [GREEDY, seeded, GREEDY, GREEDY])[1]
    other = generate_batch(model, tokenizer, [ids[1]], [SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=8)])[0]
    assert a == b
    assert other.text != a.text


def test_engine_runs_a_lone_request_without_waiting_for_company(lm):
    """A 30 s batch wait is configured; one request at a time never waits for it."""
    model, tokenizer, ids = lm
    engine = GenerationEngine(max_batch_size=8, batch_wait_timeout_s=30.0)

    async def main() -> list:
        return [await asyncio.wait_for(engine.complete(model, tokenizer, p, GREEDY), 20) for p in ids[:2]]

    done = asyncio.run(main())
    assert [c.text for c in done] == [c.text for c in generate_batch(model, tokenizer, ids[:2], [GREEDY] * 2)]
    assert engine.batch_wait.alone == 2 and engine.batch_wait.waited == 0


def test_engine_batches_concurrent_requests_and_streams_deltas(lm):
    model, tokenizer, ids = lm
    batches: list[int] = []
    engine = GenerationEngine(max_batch_size=8, batch_wait_timeout_s=0.05, on_batch=lambda n, _s: batches.append(n))
    want = generate_batch(model, tokenizer, ids, [GREEDY] * len(ids))

    async def one(prompt: list[int]) -> list[Delta]:
        return [d async for d in engine.stream(model, tokenizer, prompt, GREEDY)]

    async def main() -> list[list[Delta]]:
        return await asyncio.gather(*(one(p) for p in ids))

    streams = asyncio.run(main())
    assert batches == [len(ids)]  # all four in one generation loop
    for deltas, w in zip(streams, want):
        assert "".join(d.text for d in deltas) == w.text
        assert deltas[-1].finish_reason == w.finish_reason and deltas[-1].completion_tokens == w.completion_tokens
        assert all(d.finish_reason is None for d in deltas[:-1])
    assert max(len(d) for d in streams) > 2  # text came out piece by piece, not at the end
