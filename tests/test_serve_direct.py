"""Serve's direct ingress, raypipe's default (``serve.direct_ingress``): each replica answers HTTP on
a port of its own beside the proxy, on ``serve.host`` only, with the same app (validation,
limits, answers; the bearer token too, being the app's) as the proxy's URL; ``Served.direct_urls`` and the deploy messages name those URLs.

A Serve of its own: direct ingress is switched on when raypipe starts Serve, so the test stops
any Serve another module left running first, and stops its own at the end.
"""

from __future__ import annotations

import json
import socket

import httpx
import psutil
import pytest

from raypipe.config import config_from_dict

pytestmark = pytest.mark.ray


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listeners(port: int) -> set[str]:
    return {c.laddr.ip for c in psutil.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port}


def test_each_replica_answers_on_its_own_loopback_port_with_the_same_app(
    ray_local, tiny_checkpoint, tmp_path, capsys, monkeypatch
):
    from ray import serve

    from raypipe.predict import Predictor
    from raypipe.serve import deploy

    serve.shutdown()  # a Serve started elsewhere keeps its own (proxy-only) settings
    cfg = config_from_dict({"workdir": str(tmp_path / "work"), "serve": {
        "port": _free_port(), "app_name": "direct", "route_prefix": "/direct", "num_replicas": 2}})
    messages: list[str] = []
    served = deploy(cfg, str(tiny_checkpoint), ready_timeout_s=180, progress=messages.append)
    try:
        assert len(served.direct_urls) == 2 and served.url not in served.direct_urls
        for url in served.direct_urls:
            assert any(f"POST {url}/predict" in m for m in messages), messages
        texts = ["goal match team", "chip robot code"]
        want = [p["label"] for p in Predictor.from_dir(tiny_checkpoint).predict(texts)]
        replicas = set()
        for url in [served.url, *served.direct_urls]:
            r = httpx.post(f"{url}/predict", json={"texts": texts}, timeout=60)
            assert r.status_code == 200, r.text
            assert [p["label"] for p in r.json()["predictions"]] == want
            assert httpx.post(f"{url}/predict", json={"texts": []}, timeout=60).status_code == 422
            replicas.add(httpx.get(f"{url}/metadata", timeout=30).json()["serving"]["replica"])
        assert len(replicas) == 2  # one URL per replica (and the proxy's reaches one of them)
        from raypipe.cli import main as cli

        monkeypatch.delenv("RAYPIPE_TOKEN", raising=False)
        capsys.readouterr()
        assert cli(["predict", "--url", served.direct_urls[0], "--json", *texts]) == 0  # the CLI takes it too
        assert [p["label"] for p in json.loads(capsys.readouterr().out)] == want
        for url in served.direct_urls:
            port = int(url.rsplit(":", 1)[1].split("/")[0])
            assert _listeners(port) == {"127.0.0.1"}  # serve.host only: no 0.0.0.0, no ::
            # outside the app's route prefix the replica has nothing to say
            assert httpx.get(f"http://127.0.0.1:{port}/elsewhere", timeout=30).status_code == 404
    finally:
        serve.shutdown()
