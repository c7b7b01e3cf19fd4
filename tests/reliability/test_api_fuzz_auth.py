"""Bad input and bad credentials, fuzzed: the served API with a bearer token configured.

The app is the real one (``raypipe.api.create_app``) with ``serve.auth_token_env`` naming a variable
that holds the token, around the real tiny-checkpoint ``Predictor``, called in-process over ASGI (no
Ray, no sockets). schemathesis generates requests for every operation of the app's own OpenAPI
schema (which it can only read with the token), valid and invalid (wrong types, missing and extra
fields, odd unicode, wrong content types). Each generated request is sent three times:

* with ``Authorization: Bearer <token>``: the answer is below 500 and never 401;
* with no ``Authorization`` header, and
* with a wrong one (another token, the token plus or minus a character, the token without the
  ``Bearer`` scheme, ``Basic`` credentials, an empty bearer): ``GET /health`` answers 200 (and any
  other method there what the token holder gets, 405), every other route and method 401 with
  ``WWW-Authenticate: Bearer`` and the documented error body, whatever the body is.
  A request that the token holder gets 400/413/415/422 for gets 401 without the token: the check
  comes before any parsing. A raw ASGI call shows it never even reads the body.
"""

from __future__ import annotations

import base64
import json
import os
import time
from collections import Counter

import pytest
from hypothesis import HealthCheck, settings

schemathesis = pytest.importorskip("schemathesis")

MAX_EXAMPLES = 300  # per API operation; each case is sent 3 times; about 10 s on 2 cores
TOKEN = "fuzz-token-5c1d0e8a9b7f"  # a fixed value: the generated cases do not depend on it
TOKEN_ENV = "RAYPIPE_TEST_FUZZ_AUTH_TOKEN"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
WRONG = {
    "other-token": "Bearer not-the-token",
    "token-plus-one": f"Bearer {TOKEN}x",
    "token-minus-one": f"Bearer {TOKEN[:-1]}",
    "no-scheme": TOKEN,
    "basic": "Basic " + base64.b64encode(f"user:{TOKEN}".encode()).decode(),
    "empty-bearer": "Bearer ",
}
OPEN_PATHS = {"/health"}
STATS: dict[str, Counter] = {k: Counter() for k in ("operations", "with_token", "no_header", "wrong_token",
                                                     "rejected_with_token_then_401")}
FAILURES: list[str] = []
T0: list[float] = []

# The app is built at import time (schemathesis reads its schema while collecting) and the real
# predictor is put into its slot by a fixture; see test_api_fuzz.py.
SLOT = None
APP = None


def _build_app():
    global SLOT, APP
    from raypipe.api import ModelSlot, create_app
    from raypipe.config import ServeConfig

    SLOT = ModelSlot()
    os.environ[TOKEN_ENV] = TOKEN  # read once, by create_app
    try:
        APP = create_app(SLOT, ServeConfig(max_texts=8, max_chars=200, auth_token_env=TOKEN_ENV))
    finally:
        os.environ.pop(TOKEN_ENV, None)
    return APP


# The schema itself is behind the token: loading it with the header is the first check.
schema = schemathesis.openapi.from_asgi("/openapi.json", _build_app(), headers=AUTH)


@pytest.fixture(scope="module")
def fuzzed_app(tiny_checkpoint):
    from raypipe.predict import Predictor

    if SLOT() is None:
        SLOT.install(Predictor.from_dir(tiny_checkpoint, device="cpu"), source=str(tiny_checkpoint))
    return APP


def _header(response, name: str) -> str | None:
    value = response.headers.get(name)  # schemathesis' responses hold a list per header
    return value[0] if isinstance(value, list) else value


def _check_401(response, what: str) -> None:
    assert response.status_code == 401, f"{what}: {response.status_code} {response.text[:200]}"
    assert _header(response, "www-authenticate") == "Bearer", what
    body = response.json()
    assert isinstance(body.get("error"), str) and "bearer token" in body["error"], (what, body)
    assert TOKEN not in response.text, what  # the error never echoes the expected token


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    database=None,  # nothing written to .hypothesis/ in the repo
    derandomize=True,  # the same cases every run: a CI failure reproduces locally
    suppress_health_check=list(HealthCheck),
)
def test_generated_requests_with_and_without_the_token(case, fuzzed_app):
    if not T0:
        T0.append(time.perf_counter())
    op = f"{case.method} {case.path}"
    n = sum(STATS["operations"].values())
    STATS["operations"][op] += 1
    assert "authorization" not in {k.lower() for k in (case.headers or {})}, case.headers

    # (a) the token holder: never a server error, never refused for the token
    authed = case.call(headers=AUTH)
    STATS["with_token"][authed.status_code] += 1
    if authed.status_code >= 500 or authed.status_code == 401:
        FAILURES.append(f"with token: {op} {authed.status_code}: {case.as_curl_command()}")
    assert authed.status_code < 500 and authed.status_code != 401, case.as_curl_command()
    if authed.status_code >= 400:
        body = authed.json()
        assert isinstance(body.get("error"), str) and body["error"], body

    # (b) no header, then one wrong credential (round robin): 401 on every route but /health
    wrong_name = list(WRONG)[n % len(WRONG)]
    for key, headers in (("no_header", None), ("wrong_token", {"Authorization": WRONG[wrong_name]})):
        response = case.call(headers=headers)
        STATS[key][response.status_code] += 1
        what = f"{key} ({wrong_name if headers else 'none'}): {op}"
        if case.path in OPEN_PATHS:  # the token changes nothing: GET is 200, other methods 405 either way
            ok = response.status_code == authed.status_code and (case.method != "GET" or response.status_code == 200)
            if not ok:
                FAILURES.append(f"{what} {response.status_code}")
            assert ok, what
            continue
        if response.status_code != 401:
            FAILURES.append(f"{what} {response.status_code}: {case.as_curl_command()}")
        _check_401(response, what)
        if key == "no_header" and 400 <= authed.status_code < 500:
            STATS["rejected_with_token_then_401"][authed.status_code] += 1


def test_fuzz_auth_summary():
    """Runs after the fuzz test in this module: how many cases were tried, and what came back."""
    total = sum(STATS["operations"].values())
    seconds = time.perf_counter() - T0[0] if T0 else 0.0
    summary = {
        "cases": total,
        "requests": 3 * total,
        "seconds": round(seconds, 1),
        "by_operation": dict(STATS["operations"]),
        "with_token_by_status": {str(k): v for k, v in sorted(STATS["with_token"].items())},
        "no_header_by_status": {str(k): v for k, v in sorted(STATS["no_header"].items())},
        "wrong_token_by_status": {str(k): v for k, v in sorted(STATS["wrong_token"].items())},
        # what the token holder got (4xx) for requests that got 401 without the token
        "with_token_4xx_became_401": {str(k): v for k, v in sorted(STATS["rejected_with_token_then_401"].items())},
        "server_errors_with_token": sum(v for k, v in STATS["with_token"].items() if k >= 500),
        "failures": len(FAILURES),
    }
    print("\nRELIABILITY fuzz_auth", json.dumps(summary))
    assert FAILURES == [], FAILURES[:5]
    assert STATS["operations"]["POST /predict"] >= 50, summary  # the route that matters was really fuzzed
    assert {200, 422} <= set(STATS["with_token"]), summary  # accepted and rejected requests were generated
    assert STATS["rejected_with_token_then_401"][422] > 0, summary  # bad bodies reached the auth check
    for key in ("no_header", "wrong_token"):  # 200/405 only on /health (checked per case above)
        assert STATS[key][401] > 0 and set(STATS[key]) <= {200, 401, 405}, summary


# Requests the generator does not make: routes outside the schema, bodies past the size limit,
# unparseable JSON, a wrong content type. Each: what the token holder gets, and 401 without it.
HUGE = b'{"texts": ["' + b"a" * 200_000 + b'"]}'
HAND_PICKED = [
    ("POST", "/predict", b"{not json", "application/json", 400),
    ("POST", "/predict", b"\xff\xfe{}", "application/json", 400),
    ("POST", "/predict", HUGE, "application/json", 413),
    ("POST", "/predict", b'{"texts": ["a"]}', "text/plain", 415),
    ("POST", "/predict", b'{"texts": []}', "application/json", 422),
    ("POST", "/predict", b'{"text": "fine"}', "application/json", 200),
    ("GET", "/predict", None, None, 405),
    ("GET", "/openapi.json", None, None, 200),
    ("GET", "/docs", None, None, 200),
    ("GET", "/redoc", None, None, 200),
    ("GET", "/no-such-route", None, None, 404),
    ("GET", "/ready", None, None, 200),
    ("GET", "/metadata", None, None, 200),
    ("GET", "/stats", None, None, 200),
]


@pytest.mark.parametrize("method, path, body, ctype, status", HAND_PICKED,
                         ids=[f"{m} {p} {s}" for m, p, _, _, s in HAND_PICKED])
def test_hand_picked_requests_need_the_token(fuzzed_app, method, path, body, ctype, status):
    from fastapi.testclient import TestClient

    headers = {"content-type": ctype} if ctype else {}
    with TestClient(fuzzed_app, raise_server_exceptions=False) as client:
        r = client.request(method, path, content=body, headers={**headers, **AUTH})
        assert r.status_code == status, r.text[:300]
        for name, value in [("no header", None), *WRONG.items()]:
            extra = {"Authorization": value} if value is not None else {}
            _check_401(client.request(method, path, content=body, headers={**headers, **extra}), name)
        assert client.get("/health").status_code == 200
        assert client.get("/health", headers={"Authorization": "Bearer wrong"}).status_code == 200


def _asgi_post(app, headers: list[tuple[bytes, bytes]], body: bytes) -> tuple[int, int]:
    """POST /predict straight through the ASGI interface; returns (status, times receive() was awaited)."""
    import asyncio

    reads = 0
    sent: list[dict] = []

    async def receive():
        nonlocal reads
        reads += 1
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/predict", "raw_path": b"/predict", "root_path": "", "query_string": b"",
        "headers": [(b"host", b"test"), (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()), *headers],
        "client": ("127.0.0.1", 1234), "server": ("test", 80),
    }
    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    return start["status"], reads


def test_without_the_token_the_body_is_never_read(fuzzed_app):
    """401 comes before the body is even received, so an unauthenticated client cannot make the
    server read (or buffer, or parse) anything; with the token the same request is read."""
    body = b'{"texts": ["' + b"x" * 5000 + b'", 1]}'
    assert _asgi_post(fuzzed_app, [], body) == (401, 0)
    assert _asgi_post(fuzzed_app, [(b"authorization", b"Bearer wrong")], body) == (401, 0)
    status, reads = _asgi_post(fuzzed_app, [(b"authorization", AUTH["Authorization"].encode())], body)
    assert (status, reads > 0) == (422, True)
