"""An SFT model on a real Ray Serve deployment, talked to with the official ``openai`` client:
chat, completion and streaming, and two LoRA adapters on one base chosen by the request's
``model`` field (``serve.adapters``). Every answer must equal the offline greedy generation of
the checkpoint the request named, and concurrent requests must share generation loops."""

from __future__ import annotations

import socket
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import openai
import pytest

from raypipe.config import config_from_dict
from tests.conftest import make_sft_checkpoint

pytestmark = pytest.mark.ray

CHAT = [{"role": "user", "content": "What colour is the sky?"}]
PROMPT = "What do bees make?"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _offline(path, tokens: int) -> dict[str, str]:
    """Greedy answers of the checkpoint at ``path``, without Ray: the chat and the completion."""
    from raypipe.generation import SamplingParams, generate_batch
    from raypipe.predict import Predictor
    from raypipe.tasks.sft import prompt_ids

    p = Predictor.from_dir(path, device="cpu")
    ids = [prompt_ids(p.tokenizer, CHAT), p.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]]
    chat, completion = generate_batch(p.model, p.tokenizer, ids, [SamplingParams(max_tokens=tokens, temperature=0.0)] * 2)
    return {"chat": chat.text, "completion": completion.text}


@pytest.fixture(scope="module")
def lm_served(ray_local, tiny_lm_dir, tmp_path_factory):
    from raypipe.serve import deploy

    root = tmp_path_factory.mktemp("sft-serve")
    a = make_sft_checkpoint(root / "chat-a", tiny_lm_dir, seed=2, lora_scale=0.2)
    b = make_sft_checkpoint(root / "chat-b", tiny_lm_dir, seed=1, lora_scale=0.2)
    cfg = config_from_dict({
        "workdir": str(root / "work"),
        "serve": {"port": _free_port(), "app_name": "sft-openai", "adapters": [str(b)], "max_tokens": 32,
                  # a batch waits 0.1 s to fill, so that the concurrent requests below meet in one loop
                  "batch_wait_timeout_s": 0.1},
    })
    want = {"chat-a": _offline(a, 10), "chat-b": _offline(b, 10)}
    served = deploy(cfg, str(a), ready_timeout_s=240)
    try:
        yield SimpleNamespace(url=served.url, want=want,
                              client=openai.OpenAI(base_url=f"{served.url}/v1", api_key="none", max_retries=0, timeout=120))
    finally:
        served.shutdown()


def test_models_lists_the_model_and_its_adapter(lm_served):
    ids = [m.id for m in lm_served.client.models.list().data]
    assert "chat-a" in ids and "chat-b" in ids
    assert lm_served.want["chat-a"] != lm_served.want["chat-b"]  # the adapters really differ


def test_chat_completion_and_stream_from_the_served_model(lm_served):
    client, want = lm_served.client, lm_served.want["chat-a"]
    r = client.chat.completions.create(model="chat-a", messages=CHAT, max_tokens=10, temperature=0)
    assert r.choices[0].message.content == want["chat"]
    assert r.usage.completion_tokens == 10 or r.choices[0].finish_reason == "stop"
    stream = client.completions.create(model="chat-a", prompt=PROMPT, max_tokens=10, temperature=0, stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == want["completion"]
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_the_model_field_picks_the_adapter(lm_served):
    client = lm_served.client
    for model in ["chat-b", "chat-a", "chat-b"]:
        r = client.completions.create(model=model, prompt=PROMPT, max_tokens=10, temperature=0)
        assert r.choices[0].text == lm_served.want[model]["completion"], model
    chunks = list(client.chat.completions.create(model="chat-b", messages=CHAT, max_tokens=10, temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == lm_served.want["chat-b"]["chat"]
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="chat-z", prompt=PROMPT)
    assert err.value.body["code"] == "model_not_found" and "chat-b" in err.value.body["message"]


def test_concurrent_requests_share_generation_loops(lm_served):
    client = lm_served.client
    asks = ["chat-a", "chat-b"] * 6

    def ask(model: str) -> str:
        return client.completions.create(model=model, prompt=PROMPT, max_tokens=10, temperature=0).choices[0].text

    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(ask, asks))
    assert answers == [lm_served.want[m]["completion"] for m in asks]
    stats = httpx.get(f"{lm_served.url}/stats", timeout=30).json()
    assert stats["max_batch_size_seen"] > 1, stats  # requests waiting together ran in one loop
