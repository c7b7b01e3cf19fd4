"""Many LoRA adapters served from one base model in one Ray Serve deployment (`serve.adapters`).

Three adapter checkpoints on the tiny base, each with its own classification head (different
seeds, so their answers differ): ``lora-a`` is the deployment's own model, ``mux-b`` is registered
in a real sqlite MLflow store and served as ``models:/mux-b/1``, ``lora-c`` is a checkpoint dir.
A replica holds at most one extra adapter (``max_adapters_per_replica: 1``), so switching between
b and c evicts and reloads through Serve's multiplexing LRU. Every answer over real HTTP must
equal the offline Predictor of the adapter the request named.
"""

from __future__ import annotations

import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from raypipe.config import config_from_dict
from raypipe.predict import Predictor

pytestmark = pytest.mark.ray

LABELS = ["business", "sport", "tech"]
TEXTS = ["the striker scored a late goal", "a startup ships new software", "markets fell on the news"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lora_checkpoints(tmp_path_factory, tiny_model_dir) -> dict[str, Path]:
    import torch

    from raypipe.config import RaypipeConfig
    from raypipe.model import build, save_checkpoint

    cfg = RaypipeConfig(model={"name": str(tiny_model_dir), "peft": {"r": 4, "alpha": 8}})
    root = tmp_path_factory.mktemp("lora-mux")
    out = {}
    for seed, name in enumerate(["lora-a", "lora-b", "lora-c"], start=1):
        torch.manual_seed(seed)
        model, tokenizer = build(cfg.model, {"labels": LABELS})
        with torch.no_grad():  # a LoRA update of its own too (peft starts B at zero)
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.5)
        out[name] = save_checkpoint(root / name, model, tokenizer, {
            "labels": LABELS, "max_length": 32, "epoch": 0, "metrics": {},
            "config": cfg.model_dump(mode="json"),
        })
    return out


def _offline(path: Path) -> list[dict]:
    return Predictor.from_dir(path, device="cpu").predict(TEXTS)


@pytest.fixture(scope="module")
def mux(ray_local, lora_checkpoints, tmp_path_factory):
    from raypipe.registration import register_checkpoint
    from raypipe.serve import deploy

    cfg = config_from_dict({
        "workdir": str(tmp_path_factory.mktemp("mux-work")),
        "serve": {"port": _free_port(), "app_name": "lora-mux", "max_batch_size": 8,
                  "adapters": ["models:/mux-b/1", str(lora_checkpoints["lora-c"])],
                  "max_adapters_per_replica": 1},
    })
    version = register_checkpoint(lora_checkpoints["lora-b"], cfg, name="mux-b", metrics={"test_macro_f1": 0.5})
    assert version.version == "1"
    served = deploy(cfg, str(lora_checkpoints["lora-a"]), ready_timeout_s=180)
    want = {k: _offline(p) for k, p in lora_checkpoints.items()}
    try:
        yield SimpleNamespace(url=served.url, want=want)
    finally:
        served.shutdown()


def _predict(url: str, model: str | None = None, *, header: bool = False) -> httpx.Response:
    body: dict = {"texts": TEXTS}
    headers = {}
    if model is not None and header:
        headers["serve_multiplexed_model_id"] = model
    elif model is not None:
        body["model"] = model
    return httpx.post(f"{url}/predict", json=body, headers=headers, timeout=60)


def _same(got: list[dict], want: list[dict]) -> bool:
    return all(
        g["label"] == w["label"]
        and all(abs(g["probabilities"][k] - v) < 1e-5 for k, v in w["probabilities"].items())
        for g, w in zip(got, want, strict=True)
    )


def test_the_adapters_really_answer_differently(mux):
    a, b, c = (mux.want[k] for k in ("lora-a", "lora-b", "lora-c"))
    assert not _same(a, b) and not _same(b, c) and not _same(a, c)


def test_each_request_is_answered_by_the_adapter_it_names(mux):
    plain = _predict(mux.url)
    assert plain.status_code == 200, plain.text
    assert _same(plain.json()["predictions"], mux.want["lora-a"])
    assert plain.json()["model"]["name"] == "lora-a"
    # b and c alternate through a one-slot LRU: every switch evicts one and loads the other.
    for model, key, header in [("mux-b/1", "lora-b", True), ("lora-c", "lora-c", False),
                               ("models:/mux-b/1", "lora-b", False), ("lora-c", "lora-c", True),
                               ("lora-a", "lora-a", False)]:
        r = _predict(mux.url, model, header=header)
        assert r.status_code == 200, (model, r.text)
        assert _same(r.json()["predictions"], mux.want[key]), (model, r.json())
    named = _predict(mux.url, "mux-b/1").json()["model"]  # the answer says which version answered
    assert (named["name"], named["version"]) == ("mux-b", "1") and named["run_id"]


def test_concurrent_requests_for_different_adapters_each_get_their_own_answer(mux):
    asks = [None, "mux-b/1", "lora-c", "lora-a"] * 6
    keys = {None: "lora-a", "mux-b/1": "lora-b", "lora-c": "lora-c", "lora-a": "lora-a"}
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda m: _predict(mux.url, m), asks))
    for model, r in zip(asks, answers):
        assert r.status_code == 200, (model, r.text)
        assert _same(r.json()["predictions"], mux.want[keys[model]]), model


def test_an_unknown_model_is_a_404_that_lists_the_served_ones(mux):
    r = _predict(mux.url, "lora-z")
    assert r.status_code == 404, r.text
    text = r.text
    assert "lora-z" in text and "mux-b/1" in text and "lora-c" in text and "lora-a" in text
    meta = httpx.get(f"{mux.url}/metadata", timeout=30).json()
    assert meta["serving"]["adapters"] == ["mux-b/1", "lora-c"]  # the ids a request uses


def test_an_evicted_adapter_is_deleted_only_after_the_requests_holding_it():
    """Serve's LRU may evict an adapter while a request that already chose it waits for its
    batch: the deletion waits for that request (no Ray: the service's own bookkeeping)."""
    from raypipe.serve import ModelService, _LoadedAdapter

    deleted: list[str] = []
    model = SimpleNamespace(peft_config={"raypipe_1": 1}, delete_adapter=deleted.append)
    svc = ModelService({"max_batch_size": 8})
    predictor = SimpleNamespace(adapter="raypipe_1", model=model)
    loaded = _LoadedAdapter(predictor, svc._evict)
    held = svc._hold(predictor)
    loaded.__del__()  # what Serve calls on eviction
    svc._infer.submit(lambda: None).result()
    assert loaded.evicted and deleted == []  # still in use
    svc._release(held)
    svc._infer.submit(lambda: None).result()
    assert deleted == ["raypipe_1"]
    loaded.__del__()  # Python's own finaliser later: nothing twice
    svc._infer.submit(lambda: None).result()
    assert deleted == ["raypipe_1"]
