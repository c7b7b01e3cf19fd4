"""The OpenAI-compatible routes (raypipe/openai_api.py) of an SFT model, in-process: the official
``openai`` client against a real uvicorn server on 127.0.0.1 (no Ray), streaming included, plus
OpenAI's error shapes and the bearer token. Answers must equal the engine's own greedy output."""

from __future__ import annotations

import socket
import threading
import time
from types import SimpleNamespace

import httpx
import openai
import pytest

from tests.conftest import make_sft_checkpoint

TOKEN = "s3cret-token"
LIMITS = {"max_tokens": 24, "max_prompt_tokens": 40, "auth_token_env": "RAYPIPE_TEST_OPENAI_TOKEN"}
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello."}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(app, port: int):
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    return server, thread


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_lm_dir):
    import torch

    from raypipe.api import ModelSlot, create_app
    from raypipe.config import ServeConfig
    from raypipe.predict import Predictor

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # a 64-wide model: more threads only spin on a loaded machine
    mp = pytest.MonkeyPatch()
    mp.setenv(LIMITS["auth_token_env"], TOKEN)
    ckpt = make_sft_checkpoint(tmp_path_factory.mktemp("sft-api") / "chat-lm", tiny_lm_dir, seed=2, lora_scale=0.2)
    predictor = Predictor.from_dir(ckpt, device="cpu")
    slot = ModelSlot()
    slot.install(predictor, warm=False)
    port = _free_port()
    srv, thread = _serve(create_app(slot, ServeConfig(**LIMITS)), port)
    url = f"http://127.0.0.1:{port}"
    try:
        yield SimpleNamespace(url=url, predictor=predictor, model="chat-lm",
                              client=openai.OpenAI(base_url=f"{url}/v1", api_key=TOKEN, max_retries=0, timeout=60))
    finally:
        srv.should_exit = True
        thread.join(30)
        mp.undo()
        torch.set_num_threads(before)


def _greedy(predictor, prompt_ids: list[int], max_tokens: int, stop: tuple[str, ...] = ()):
    from raypipe.generation import SamplingParams, generate_batch

    return generate_batch(predictor.model, predictor.tokenizer, [prompt_ids],
                          [SamplingParams(max_tokens=max_tokens, temperature=0.0, stop=stop)])[0]


def test_chat_completion_is_the_templated_prompt_generated(server):
    from raypipe.tasks.sft import prompt_ids

    want = _greedy(server.predictor, prompt_ids(server.predictor.tokenizer, CHAT), 10)
    r = server.client.chat.completions.create(model=server.model, messages=CHAT, max_tokens=10, temperature=0)
    assert r.object == "chat.completion" and r.model == server.model
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want.text and r.choices[0].finish_reason == want.finish_reason
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (want.prompt_tokens, want.completion_tokens)
    assert r.usage.total_tokens == want.prompt_tokens + want.completion_tokens


def test_chat_stream_adds_up_to_the_answer_and_reports_usage(server):
    full = server.client.chat.completions.create(model=server.model, messages=CHAT, max_tokens=12, temperature=0)
    chunks = list(server.client.chat.completions.create(model=server.model, messages=CHAT, max_tokens=12,
                                                        temperature=0, stream=True,
                                                        stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # really streamed
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_completion_with_stop_and_stream_over_raw_sse(server):
    tok = server.predictor.tokenizer
    prompt = "What do bees make?"
    full = _greedy(server.predictor, tok(prompt, add_special_tokens=False)["input_ids"], 16)
    assert len(full.text) >= 5, full.text
    stop = full.text[1:3]
    r = server.client.completions.create(model=server.model, prompt=prompt, max_tokens=16, temperature=0, stop=[stop])
    assert r.choices[0].text == full.text[: full.text.index(stop)] and r.choices[0].finish_reason == "stop"
    # the wire format itself: data: lines of text_completion chunks, then data: [DONE]
    with httpx.stream("POST", f"{server.url}/v1/completions", headers={"Authorization": f"Bearer {TOKEN}"},
                      json={"model": server.model, "prompt": prompt, "max_tokens": 16, "temperature": 0,
                            "stream": True}, timeout=60) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in resp.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)
    import json

    events = [json.loads(line[6:]) for line in lines[:-1]]
    assert {e["object"] for e in events} == {"text_completion"}
    assert "".join(e["choices"][0]["text"] for e in events) == full.text
    assert events[-1]["choices"][0]["finish_reason"] == full.finish_reason


def test_seeded_sampling_repeats(server):
    ask = dict(model=server.model, prompt="Name a fruit.", max_tokens=12, temperature=1.0, top_p=0.95)
    a = server.client.completions.create(seed=11, **ask).choices[0].text
    b = server.client.completions.create(seed=11, **ask).choices[0].text
    c = server.client.completions.create(seed=12, **ask).choices[0].text
    assert a == b and a != c


def test_models_lists_the_served_model_and_unknown_models_are_404(server):
    assert [m.id for m in server.client.models.list().data] == [server.model]
    with pytest.raises(openai.NotFoundError) as err:
        server.client.chat.completions.create(model="gpt-4o", messages=CHAT)
    assert err.value.body["code"] == "model_not_found" and err.value.body["param"] == "model"
    assert "chat-lm" in err.value.body["message"]


@pytest.mark.parametrize("extra, param, code", [
    ({"n": 2}, "n", "invalid_value"),
    ({"logprobs": True}, "logprobs", "unsupported_parameter"),
    ({"max_tokens": 25}, "max_tokens", "invalid_value"),  # serve.max_tokens is 24
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "invalid_value"),
    ({"temperature": 3}, "temperature", "invalid_value"),
    ({"messages": [{"role": "user", "content": "word " * 60}]}, "messages", "context_length_exceeded"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages", "invalid_value"),
])
def test_bad_requests_are_400_in_openai_error_shape(server, extra, param, code):
    body = {"model": server.model, "messages": CHAT, **extra}
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {TOKEN}"},
                   timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, code), error
    assert error["message"]


def test_the_bearer_token_is_required(server):
    bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0, timeout=60)
    with pytest.raises(openai.AuthenticationError) as err:
        bad.models.list()
    assert err.value.body["code"] == "invalid_api_key"
    assert httpx.get(f"{server.url}/health", timeout=30).status_code == 200


def test_a_classifier_has_no_openai_routes(tiny_checkpoint):
    from fastapi.testclient import TestClient

    from raypipe.api import ModelSlot, create_app
    from raypipe.predict import Predictor

    slot = ModelSlot()
    slot.install(Predictor.from_dir(tiny_checkpoint, device="cpu"), warm=False)
    with TestClient(create_app(slot)) as client:
        r = client.post("/v1/completions", json={"model": "checkpoint", "prompt": "hi"})
    assert r.status_code == 404 and "classification" in r.json()["error"]["message"]


def test_predict_still_answers_for_a_language_model(server):
    """The pipeline's sample stage and the pyfunc path use /predict: a generation per prompt."""
    r = httpx.post(f"{server.url}/predict", json={"texts": ["Say hello."]}, headers={"Authorization": f"Bearer {TOKEN}"},
                   timeout=60)
    assert r.status_code == 200, r.text
    assert isinstance(r.json()["predictions"][0]["generation"], str)


def test_warm_up_and_health_probe_of_a_language_model_generate_only_a_token_or_two(server, monkeypatch):
    from raypipe.api import probe, warm_up

    seen: list[int] = []
    real = server.predictor.task.predict

    def spy(*args, **kwargs):
        seen.append(kwargs.get("max_new_tokens"))
        return real(*args, **kwargs)

    monkeypatch.setattr(server.predictor.task, "predict", spy)
    warm_up(server.predictor)
    probe(server.predictor)
    assert seen == [2, 2]
