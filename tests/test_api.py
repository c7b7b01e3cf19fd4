"""The HTTP API without Ray: the real app, the real Predictor on the tiny checkpoint."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
from fastapi.testclient import TestClient

from raypipe.api import ModelSlot, create_app
from raypipe.config import ServeConfig
from raypipe.errors import ConfigError, RaypipeError
from raypipe.predict import Predictor

LIMITS = ServeConfig(max_texts=4, max_chars=50)
TEXTS = ["the team won the cup match", "a new chip for the phone", "soup and bread for dinner"]


@pytest.fixture(scope="module")
def predictor(tiny_checkpoint) -> Predictor:
    return Predictor.from_dir(tiny_checkpoint, device="cpu")


@pytest.fixture(scope="module")
def client(predictor) -> TestClient:
    slot = ModelSlot()
    slot.install(predictor)
    return TestClient(create_app(slot, LIMITS))


def test_predict_matches_the_offline_predictor(client, predictor):
    r = client.post("/predict", json={"texts": TEXTS})
    assert r.status_code == 200, r.text
    body = r.json()
    offline = predictor.predict(TEXTS)
    assert [p["label"] for p in body["predictions"]] == [p["label"] for p in offline]
    for got, want in zip(body["predictions"], offline):
        assert got["score"] == pytest.approx(want["score"], abs=1e-6)
        assert got["probabilities"].keys() == want["probabilities"].keys()
        assert list(got["probabilities"].values()) == pytest.approx(list(want["probabilities"].values()), abs=1e-6)
    # A plain checkpoint dir has no registry version; the name is the dir's.
    assert body["model"] == {"name": "checkpoint", "version": None, "run_id": None}


def test_single_text_and_top_k(client, predictor):
    one = client.post("/predict", json={"text": TEXTS[0], "top_k": 2}).json()["predictions"]
    want = predictor.predict([TEXTS[0]], top_k=2)
    assert len(one) == 1 and one[0]["label"] == want[0]["label"]
    assert list(one[0]["probabilities"]) == list(want[0]["probabilities"])


# (body bytes or JSON value, content type, expected status, words the error must contain)
BAD_INPUTS = {
    "malformed JSON": (b'{"texts": ["a"', "application/json", 400, "not valid JSON"),
    "not UTF-8": (b'{"texts": ["\xff\xfe"]}', "application/json", 400, "not valid JSON"),
    "nested too deep": (b"[" * 3000, "application/json", 400, "not valid JSON"),
    "wrong content type": (b'{"texts": ["a"]}', "text/plain", 415, "application/json"),
    "no content type": (b'{"texts": ["a"]}', "", 415, "application/json"),
    "form post": (b"texts=a", "application/x-www-form-urlencoded", 415, "application/json"),
    "empty list": ({"texts": []}, None, 422, "empty"),
    "empty text": ({"texts": ["ok", ""]}, None, 422, "texts[1] is empty"),
    "whitespace text": ({"text": " \n\t "}, None, 422, "whitespace"),
    "non-string item": ({"texts": ["ok", 3]}, None, 422, "texts[1]: must be a string"),
    "null item": ({"texts": [None]}, None, 422, "must be a string"),
    "nested list item": ({"texts": [["a"]]}, None, 422, "must be a string"),
    "texts is a string": ({"texts": "abc"}, None, 422, "list of strings"),
    "too many texts": ({"texts": ["a"] * 5}, None, 422, "limit is 4"),
    "text too long": ({"texts": ["x" * 51]}, None, 422, "limit is 50"),
    "unknown field": ({"texts": ["a"], "temperature": 1}, None, 422, "unknown field 'temperature'"),
    "both text and texts": ({"texts": ["a"], "text": "b"}, None, 422, "exactly one"),
    "neither": ({}, None, 422, "exactly one"),
    "body is a list": (["a"], None, 422, "JSON object"),
    "top_k zero": ({"texts": ["a"], "top_k": 0}, None, 422, "top_k"),
    "top_k above classes": ({"texts": ["a"], "top_k": 4}, None, 422, "3 classes"),
    "top_k not int": ({"texts": ["a"], "top_k": "2"}, None, 422, "integer"),
    "body too large": ({"texts": ["x" * 10_000]}, None, 413, "limit"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gets_a_4xx_that_says_what_to_fix_and_the_app_keeps_answering(client, case):
    payload, content_type, status, words = BAD_INPUTS[case]
    if content_type is None:
        payload, content_type = json.dumps(payload).encode(), "application/json"
    headers = {"content-type": content_type} if content_type else {}
    r = client.post("/predict", content=payload, headers=headers)
    assert r.status_code == status, r.text
    body = r.json()
    assert words in body["error"] + " ".join(body["problems"])
    assert client.post("/predict", json={"texts": ["still answering"]}).status_code == 200


def test_a_chunked_body_over_the_limit_is_cut_off_while_reading(client):
    def chunks():  # no Content-Length: the server must count as it reads
        for _ in range(100):
            yield b"x" * 1000

    r = client.post("/predict", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert client.post("/predict", json={"text": "still answering"}).status_code == 200


def test_a_garbage_list_reports_a_bounded_number_of_problems(tiny_checkpoint, predictor):
    slot = ModelSlot()
    slot.install(predictor, warm=False)
    c = TestClient(create_app(slot, ServeConfig(max_texts=64)))
    r = c.post("/predict", json={"texts": list(range(60))})
    assert r.status_code == 422
    assert len(r.json()["problems"]) <= 11


def test_bearer_token_guards_every_route_but_health(monkeypatch, predictor):
    monkeypatch.setenv("RAYPIPE_TEST_TOKEN", "s3cret-token")
    slot = ModelSlot()
    slot.install(predictor, warm=False)
    c = TestClient(create_app(slot, ServeConfig(auth_token_env="RAYPIPE_TEST_TOKEN")))
    good = {"Authorization": "Bearer s3cret-token"}

    assert c.get("/health").status_code == 200
    for method, path in [("post", "/predict"), ("get", "/ready"), ("get", "/metadata"),
                         ("get", "/stats"), ("get", "/docs"), ("get", "/openapi.json")]:
        r = getattr(c, method)(path, json={"texts": ["a"]}) if method == "post" else c.get(path)
        assert r.status_code == 401, path
        assert r.headers["www-authenticate"] == "Bearer"
        assert "Authorization: Bearer" in r.json()["error"]
    for wrong in ("Bearer s3cret-tokeN", "Bearer ", "s3cret-token", "Basic s3cret-token"):
        assert c.get("/ready", headers={"Authorization": wrong}).status_code == 401, wrong
    assert c.post("/predict", json={"texts": ["a"]}, headers=good).status_code == 200
    assert c.get("/metadata", headers=good).status_code == 200
    assert c.get("/docs", headers=good).status_code == 200


def test_a_token_variable_that_is_not_set_refuses_to_start_open(monkeypatch):
    monkeypatch.delenv("RAYPIPE_UNSET_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="RAYPIPE_UNSET_TOKEN"):
        create_app(ModelSlot(), ServeConfig(auth_token_env="RAYPIPE_UNSET_TOKEN"))


def test_ready_is_false_until_the_warm_up_has_finished(tiny_checkpoint):
    predictor = Predictor.from_dir(tiny_checkpoint, device="cpu")
    real = predictor.predict
    in_warm_up, release = threading.Event(), threading.Event()

    def gated(texts, **kw):  # the warm-up is a real prediction; hold it until we have looked
        in_warm_up.set()
        release.wait(30)
        return real(texts, **kw)

    predictor.predict = gated
    slot = ModelSlot()
    c = TestClient(create_app(slot, LIMITS))
    assert c.get("/health").status_code == 200
    r = c.get("/ready")
    assert r.status_code == 503 and r.json()["ready"] is False and r.headers["retry-after"]
    assert c.post("/predict", json={"text": "too early"}).status_code == 503
    assert c.get("/metadata").status_code == 503

    loader = threading.Thread(target=slot.install, args=(predictor,))
    loader.start()
    assert in_warm_up.wait(30)
    assert c.get("/ready").status_code == 503  # loaded, but still warming up
    release.set()
    loader.join(30)
    predictor.predict = real
    r = c.get("/ready")
    assert r.status_code == 200 and r.json()["ready"] is True
    assert c.post("/predict", json={"text": "now"}).status_code == 200


def test_metadata_describes_model_and_limits(client, tiny_checkpoint):
    from raypipe import __version__

    m = client.get("/metadata").json()
    assert m["model"] == {"name": "checkpoint", "version": None, "run_id": None}
    assert m["labels"] == ["food", "sport", "tech"]
    assert m["max_length"] == 32
    assert m["raypipe_version"] == __version__
    assert m["path"] == m["source"] == str(tiny_checkpoint.resolve())
    assert m["limits"]["max_texts"] == 4 and m["limits"]["max_chars"] == 50
    assert m["loaded_at"] <= time.time()


def test_registry_metadata_is_reported(predictor):
    # What a models:/ URI adds to Predictor.meta (from the registry) shows up in responses.
    registered = Predictor(predictor.model, predictor.tokenizer,
                           {**predictor.meta, "model_name": "clf", "model_version": 7, "run_id": "abc123"})
    slot = ModelSlot()
    slot.install(registered, warm=False)
    c = TestClient(create_app(slot, LIMITS))
    want = {"name": "clf", "version": "7", "run_id": "abc123"}
    assert c.post("/predict", json={"text": "x"}).json()["model"] == want
    assert c.get("/metadata").json()["model"] == want


def test_stats_count_the_batches_of_the_default_path(predictor):
    slot = ModelSlot()
    slot.install(predictor, warm=False)
    c = TestClient(create_app(slot, LIMITS))
    c.post("/predict", json={"texts": TEXTS})
    c.post("/predict", json={"text": "one"})
    s = c.get("/stats").json()
    assert s["batches"] == 2 and s["texts"] == 4 and s["batch_sizes"] == {"1": 1, "3": 1}


def _schema(spec: dict, node: dict) -> dict:
    """Follow a local ``$ref`` of an OpenAPI document."""
    while "$ref" in node:
        node = spec["components"]["schemas"][node["$ref"].rsplit("/", 1)[-1]]
    return node


def test_openapi_documents_the_predict_schema(client):
    spec = client.get("/openapi.json").json()
    op = spec["paths"]["/predict"]["post"]
    body = _schema(spec, op["requestBody"]["content"]["application/json"]["schema"])
    assert {"texts", "text", "top_k"} <= set(body["properties"]) and "pairs" not in body["properties"]
    answer = _schema(spec, op["responses"]["200"]["content"]["application/json"]["schema"])
    item = _schema(spec, answer["properties"]["predictions"]["items"])
    assert set(item["properties"]) == {"label", "score", "probabilities"}  # the classifier's answer
    assert {"400", "413", "415", "422", "503"} <= set(op["responses"])
    assert client.get("/docs").status_code == 200


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_http_client_against_a_real_server(predictor):
    """predict_http over real HTTP (uvicorn): answers, and errors carry the server's message."""
    import uvicorn

    from raypipe.client import predict_http

    slot = ModelSlot()
    slot.install(predictor, warm=False)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(slot, LIMITS), host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        url = f"http://127.0.0.1:{port}"
        out = predict_http(url, TEXTS, top_k=1)
        assert [p["label"] for p in out["predictions"]] == [p["label"] for p in predictor.predict(TEXTS)]
        assert all(len(p["probabilities"]) == 1 for p in out["predictions"])
        with pytest.raises(RaypipeError, match=r"422: .*texts\[0\] is empty"):
            predict_http(url, [""])
    finally:
        server.should_exit = True
        thread.join(10)
    with pytest.raises(RaypipeError, match="cannot reach"):
        predict_http(url, ["a"], timeout=2)
