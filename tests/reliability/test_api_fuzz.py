"""Bad input, fuzzed: schemathesis drives the served FastAPI app from its own OpenAPI schema.

The app is the real one (``raypipe.api.create_app``) around the real tiny-checkpoint
``Predictor``, called in-process over ASGI (no Ray, no sockets). Every generated request, valid
or not (schemathesis mixes schema-conforming and schema-violating cases: wrong types, missing
and extra fields, odd unicode, huge numbers), must be answered below 500: a bad request is the
client's fault and must be named as such (400/413/415/422), never crash the server.
"""

from __future__ import annotations

import json
import time
from collections import Counter

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402

MAX_EXAMPLES = 300  # per API operation; the whole fuzz run takes about 5-10 s on 2 cores
STATS: dict[str, Counter] = {"codes": Counter(), "operations": Counter()}
SERVER_ERRORS: list[str] = []
T0: list[float] = []


# The OpenAPI schema does not depend on the model, so the app is built at import time (schemathesis
# reads its schema while collecting) and the real predictor is put into its slot by a fixture.
# (schemathesis.pytest.from_fixture would be the lazy way, but it breaks on pytest 9.)
SLOT = None
APP = None


def _build_app():
    global SLOT, APP
    from raypipe.api import ModelSlot, create_app
    from raypipe.config import ServeConfig

    SLOT = ModelSlot()
    # Small limits, so the generator reaches the 413/422 limit paths, not only the schema.
    APP = create_app(SLOT, ServeConfig(max_texts=8, max_chars=200))
    return APP


schema = schemathesis.openapi.from_asgi("/openapi.json", _build_app())


@pytest.fixture(scope="module")
def fuzzed_app(tiny_checkpoint):
    from raypipe.predict import Predictor

    if SLOT() is None:
        SLOT.install(Predictor.from_dir(tiny_checkpoint, device="cpu"), source=str(tiny_checkpoint))
    return APP


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    database=None,  # nothing written to .hypothesis/ in the repo
    derandomize=True,  # the same cases every run: a CI failure reproduces locally
    suppress_health_check=list(HealthCheck),
)
def test_no_generated_request_gets_a_server_error(case, fuzzed_app):
    if not T0:
        T0.append(time.perf_counter())
    response = case.call()
    op = f"{case.method} {case.path}"
    STATS["codes"][response.status_code] += 1
    STATS["operations"][op] += 1
    if response.status_code >= 500:
        SERVER_ERRORS.append(f"{op} {response.status_code}: {case.as_curl_command()}")
    assert response.status_code < 500, case.as_curl_command()
    if response.status_code >= 400:  # every rejection says what to fix, in the documented shape
        body = response.json()
        assert isinstance(body.get("error"), str) and body["error"], body


def test_fuzz_summary():
    """Runs after the fuzz test in this module: how many cases were tried, and what came back."""
    total = sum(STATS["operations"].values())
    seconds = time.perf_counter() - T0[0] if T0 else 0.0
    summary = {
        "cases": total,
        "seconds": round(seconds, 1),
        "by_operation": dict(STATS["operations"]),
        "by_status": {str(k): v for k, v in sorted(STATS["codes"].items())},
        "server_errors": len(SERVER_ERRORS),
    }
    print("\nRELIABILITY fuzz", json.dumps(summary))
    assert SERVER_ERRORS == []
    assert STATS["operations"]["POST /predict"] >= 50, summary  # the route that matters was really fuzzed
    assert {200, 422} <= set(STATS["codes"]), summary  # both accepted and rejected requests were generated


# Inputs that a JSON body can carry but hypothesis' default text strategy never generates.
@pytest.mark.parametrize("body, status", [
    (b'{"text": "\\ud800"}', 422),  # a lone surrogate: valid JSON, not encodable as UTF-8
    (b'{"texts": ["fine", "x \\udfff y"]}', 422),
    (b'{"text": "\\u0000 nul"}', 200),
    (b'{"text": "a", "top_k": 100000000000000000000000000000}', 422),
    (b'{"text": "a", "top_k": 1e400}', 422),
    (b'{"text": "a", "top_k": NaN}', 422),
    (b'{"texts": ' + b"[" * 2000 + b"]" * 2000 + b"}", 400),  # nested past the JSON parser's depth
    (b"\xff\xfe{}", 400),
])
def test_hand_picked_hostile_bodies(fuzzed_app, body, status):
    from fastapi.testclient import TestClient

    with TestClient(fuzzed_app, raise_server_exceptions=False) as client:
        r = client.post("/predict", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
