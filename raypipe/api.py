"""The HTTP API of a served model: a FastAPI app factory that knows nothing about Ray.

:func:`create_app` builds the app around a *predictor provider* (a zero-argument callable that
returns the :class:`~raypipe.predict.Predictor` to use right now, or ``None`` while none is
loaded). Ray Serve wraps the same app with ``@serve.ingress`` (see :mod:`raypipe.serve`) and
plugs its dynamic batching in through ``predict_fn``; tests use it directly with FastAPI's
``TestClient``.

Routes
    ``POST /predict``  ``{"texts": [...]}`` or ``{"text": "..."}`` (``{"pairs": [[a, b], ...]}`` for
                       a sentence-pair model; ``{"tokens": [[w1, w2, ...], ...]}``, pre-split
                       words, for a token-classification model), optional ``"top_k"``
                       -> ``{"predictions": [<the task's prediction>, ...], "model": {...}}``:
                       ``{"label", "score", "probabilities"}`` for a classifier,
                       ``{"labels", "scores"}`` for multi-label, ``{"value"}`` for regression,
                       ``{"entities": [{"type", "text", "start", "end", "score"}], "words", "tags"}``
                       for token classification.
                       ``/openapi.json`` describes the request and answer of the model loaded now.
    ``GET /health``    liveness: the process answers (never needs a token)
    ``GET /ready``     200 once a model is loaded *and* warmed up, 503 before
    ``GET /metadata``  model name/version/run, labels, max sequence length, limits, versions
    ``GET /stats``     batch sizes observed by this process (how to see that batching works)
    ``GET /docs``      OpenAPI UI (``/openapi.json`` for the schema)

Errors are JSON ``{"error": "<what to fix>", "problems": ["<one line per problem>"]}``:

    400  the body is not valid JSON (or not UTF-8)
    401  a bearer token is configured and the request lacks the right one
    413  the body is larger than the limits allow (checked before it is parsed)
    415  the content type is not ``application/json``
    422  valid JSON that breaks the schema or a limit: empty list, empty/whitespace text,
         a non-string item, more than ``serve.max_texts`` texts, a text over ``serve.max_chars``
         characters, an unknown field, ``top_k`` out of range, texts for a pair model (or
         pairs for a single-text model)
    503  no model loaded yet (with ``Retry-After``)

Nothing a client sends reaches the model before it passed every check above, and the work a
request can cause before it is rejected is bounded by the body limit.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from starlette.exceptions import HTTPException as StarletteHTTPException

from raypipe.config import ServeConfig
from raypipe.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from raypipe.generation import GenerationEngine
    from raypipe.predict import Predictor

logger = logging.getLogger(__name__)

PredictorProvider = Callable[[], "Predictor | None"]
# predict_fn(inputs) -> (one prediction dict per input, the Predictor that made them). Inputs are
# texts, or (a, b) pairs for a pair model. Returning the predictor lets the response name the
# model that really answered, even across a swap.
PredictFn = Callable[..., Awaitable[tuple[list[dict[str, Any]], "Predictor"]]]
# adapter_fn(model id) -> the Predictor of that served adapter, or ApiError 404 naming what is served.
AdapterFn = Callable[[str], Awaitable["Predictor"]]
MODEL_HEADER = "serve_multiplexed_model_id"  # Ray Serve routes by it to a replica that has the model

RETRY_AFTER_S = 1
_MAX_PROBLEMS = 10  # a 10k-item garbage list must not produce a 10k-line error


# ----------------------------------------------------------------------------- schema


def _limited(items: list[Any], what: str, limits: dict[str, Any], problems: list[str]) -> None:
    max_texts = limits.get("max_texts")
    if max_texts is not None and len(items) > max_texts:
        raise ValueError(f"{len(items)} {what} in one request; the limit is {max_texts}, split it up")
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ValueError("; ".join(problems[:3]) + more)


class PredictRequest(BaseModel):
    """Exactly one of ``texts`` (a list), ``text`` (one string) or ``pairs`` (for a sentence-pair
    model); ``top_k`` limits the per-label scores in the answer."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"texts": ["Shares rose after the results"], "top_k": 2}]},
    )

    texts: list[StrictStr] | None = Field(None, description="Texts to predict for (1..serve.max_texts).")
    text: StrictStr | None = Field(None, description="A single text; the same as texts=[text].")
    pairs: list[tuple[StrictStr, StrictStr]] | None = Field(
        None, description="Sentence pairs [text_a, text_b] (1..serve.max_texts), for a model trained on pairs."
    )
    tokens: list[list[StrictStr]] | None = Field(
        None, description="Pre-split words, one list per input (1..serve.max_texts), for a token-classification "
        "model; entity offsets then refer to the words joined by single spaces."
    )
    top_k: StrictInt | None = Field(
        None, ge=1, description="Return only the k highest per-label scores (classification, multi-label)."
    )
    model: StrictStr | None = Field(
        None, description="Which served model answers, when the server holds several LoRA adapters "
        "(`serve.adapters`), e.g. `bbc-lora/2`; the same as the `serve_multiplexed_model_id` header. "
        "Default: the deployment's model."
    )

    @field_validator("texts")
    @classmethod
    def _texts(cls, v: list[str] | None, info: ValidationInfo) -> list[str] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("the list is empty; send at least one text")
        limits = info.context or {}
        _limited(v, "texts", limits, [p for i, t in enumerate(v) if (p := _text_problem(t, f"texts[{i}]", limits))])
        return v

    @field_validator("pairs")
    @classmethod
    def _pairs(cls, v: list[tuple[str, str]] | None, info: ValidationInfo) -> list[tuple[str, str]] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("the list is empty; send at least one [text_a, text_b] pair")
        limits = info.context or {}
        problems = [p for i, pair in enumerate(v) for j, t in enumerate(pair)
                    if (p := _text_problem(t, f"pairs[{i}][{j}]", limits))]
        _limited(v, "pairs", limits, problems)
        return v

    @field_validator("tokens")
    @classmethod
    def _tokens(cls, v: list[list[str]] | None, info: ValidationInfo) -> list[list[str]] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("the list is empty; send at least one list of words")
        limits = info.context or {}
        problems = []
        for i, words in enumerate(v):
            if not words:
                problems.append(f"tokens[{i}] is an empty list of words")
                continue
            bad = next((j for j, w in enumerate(words) if not w.strip()), None)
            if bad is not None:
                problems.append(f"tokens[{i}][{bad}] is empty or whitespace only")
            elif p := _text_problem(" ".join(words), f"tokens[{i}]", limits):
                problems.append(p)
        _limited(v, "word lists", limits, problems)
        return v

    @field_validator("text")
    @classmethod
    def _text(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is not None and (problem := _text_problem(v, "text", info.context or {})):
            raise ValueError(problem)
        return v

    @model_validator(mode="after")
    def _one_of(self) -> PredictRequest:
        if sum(x is not None for x in (self.texts, self.text, self.pairs, self.tokens)) != 1:
            raise ValueError(
                'send exactly one of "texts" (a list of strings), "text" (a string), "pairs" (a list '
                'of [text_a, text_b]) or "tokens" (a list of word lists), e.g. {"texts": ["some text"]}'
            )
        return self

    def inputs(self) -> list[Any]:
        if self.pairs is not None:
            return [tuple(p) for p in self.pairs]
        if self.tokens is not None:
            return [list(t) for t in self.tokens]
        return self.texts if self.texts is not None else [self.text]  # type: ignore[list-item]


class TextRequest(BaseModel):
    """The request of a single-text model (``/openapi.json`` while one is served)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"texts": ["Shares rose after the results"]}]})
    texts: list[str] | None = PredictRequest.model_fields["texts"]
    text: str | None = PredictRequest.model_fields["text"]
    top_k: int | None = PredictRequest.model_fields["top_k"]


class PairRequest(BaseModel):
    """The request of a sentence-pair model (``/openapi.json`` while one is served)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "examples": [{"pairs": [["A man is playing a guitar.", "Someone plays an instrument."]]}]})
    pairs: list[tuple[str, str]] = Field(description=PredictRequest.model_fields["pairs"].description)
    top_k: int | None = PredictRequest.model_fields["top_k"]


class TokensRequest(BaseModel):
    """The request of a token-classification model (``/openapi.json`` while one is served)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "examples": [{"texts": ["Angela Merkel visited Paris on Monday."]},
                     {"tokens": [["Angela", "Merkel", "visited", "Paris", "."]]}]})
    texts: list[str] | None = PredictRequest.model_fields["texts"]
    text: str | None = PredictRequest.model_fields["text"]
    tokens: list[list[str]] | None = PredictRequest.model_fields["tokens"]


REQUESTS: dict[str, type[BaseModel]] = {"text": TextRequest, "pair": PairRequest, "tokens": TokensRequest}


def _text_problem(text: str, where: str, limits: dict[str, Any]) -> str | None:
    if not text.strip():
        return f"{where} is empty or whitespace only"
    try:
        # JSON may carry an unpaired surrogate ("\ud800"); the tokenizer cannot take it.
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"{where} is not valid Unicode: unpaired surrogate at character {exc.start}"
    max_chars = limits.get("max_chars")
    if max_chars is not None and len(text) > max_chars:
        return f"{where} has {len(text)} characters; the limit is {max_chars} (shorten or split it)"
    return None


class ModelInfo(BaseModel):
    name: str | None = Field(None, description="Registered model name (or checkpoint dir name).")
    version: str | None = Field(None, description="Registry version; null for a plain checkpoint dir.")
    run_id: str | None = Field(None, description="MLflow run that produced the model.")


class PredictResponse(BaseModel):
    """The answer of any model; ``/openapi.json`` shows the prediction shape of the task served."""

    predictions: list[dict[str, Any]] = Field(description="One per input, shaped by the model's task.")
    model: ModelInfo


def response_model(task: Any) -> type[BaseModel]:
    """``PredictResponse`` with the task's own prediction model (for the OpenAPI schema)."""
    from pydantic import create_model

    return create_model(
        f"{task.prediction_model.__name__}Response",
        predictions=(list[task.prediction_model], Field(description="One per input, in input order.")),
        model=(ModelInfo, ...),
    )


class Metadata(BaseModel):
    model: ModelInfo
    source: str | None = Field(None, description="The URI or dir the model was loaded from.")
    path: str | None = Field(None, description="Local checkpoint dir on the replica.")
    task: str = Field(description="What the model predicts: classification, multi_label, regression, ...")
    inputs: str = Field(description="'text' (send texts), 'pair' (send pairs) or 'tokens' (send texts or "
                        "word lists).")
    labels: list[str] = Field(description="The labels a label model predicts (empty otherwise).")
    max_length: int = Field(description="Tokens per text; longer texts are truncated.")
    raypipe_version: str
    checkpoint_raypipe_version: str | None = None
    data_fingerprint: str | None = Field(None, description="Fingerprint of the data the model was trained on "
                                         "(its MLflow dataset inputs' digest is the first 36 characters).")
    git_sha: str | None = Field(None, description="Commit of the code that trained the model "
                                "(null outside a git checkout).")
    git_dirty: bool | None = Field(None, description="Whether that checkout had uncommitted changes.")
    loaded_at: float | None = Field(None, description="Unix time the model was swapped in.")
    limits: dict[str, int]
    serving: dict[str, Any] = Field(default_factory=dict)


class ErrorResponse(BaseModel):
    error: str = Field(description="What went wrong and what to fix.")
    problems: list[str] = Field(default_factory=list, description="One line per problem found.")


_ERRORS = {
    code: {"model": ErrorResponse, "description": desc}
    for code, desc in {
        400: "Body is not valid JSON",
        401: "Missing or wrong bearer token",
        413: "Body too large",
        415: "Content type is not application/json",
        422: "Request breaks the schema or a limit",
        503: "Model not loaded yet, or the server is overloaded (see Retry-After)",
    }.items()
}


# ----------------------------------------------------------------------------- helpers


class ApiError(Exception):
    def __init__(self, status: int, error: str, problems: list[str] | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(error)
        self.status, self.error, self.problems, self.headers = status, error, problems or [], headers


def error_response(status: int, error: str, problems: list[str] | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body = ErrorResponse(error=error, problems=problems or []).model_dump()
    return JSONResponse(body, status_code=status, headers=headers)


def model_info(predictor: Predictor) -> ModelInfo:
    meta = predictor.meta
    name = meta.get("model_name")
    if name is None and meta.get("path"):
        name = os.path.basename(str(meta["path"]).rstrip("/"))
    version = meta.get("model_version")
    return ModelInfo(
        name=name,
        version=None if version is None else str(version),
        run_id=meta.get("run_id"),
    )


def _ids(info: ModelInfo) -> list[str]:
    """The names a request may use for a served model: ``name/version`` first."""
    if info.version is None:
        return [str(info.name)]
    return [f"{info.name}/{info.version}", f"models:/{info.name}/{info.version}"]


def top_k(prediction: dict[str, Any], k: int | None) -> dict[str, Any]:
    """Keep the k highest entries of every label -> score mapping in the answer (a classifier's
    ``probabilities``, a multi-label model's ``scores``). Stable sort: ties keep the Predictor's
    own order."""
    if k is None:
        return prediction
    out = dict(prediction)
    for key, value in prediction.items():
        if isinstance(value, dict) and all(isinstance(v, float) for v in value.values()):
            out[key] = dict(sorted(value.items(), key=lambda kv: -kv[1])[:k])
    return out


def ranks_labels(predictor: Predictor) -> bool:
    """Whether ``top_k`` means something for this model (its answers score each label)."""
    import typing

    return any(typing.get_origin(f.annotation) is dict for f in predictor.task.prediction_model.model_fields.values())


def max_body_bytes(cfg: ServeConfig) -> int:
    # Worst case for a valid request: every character JSON-escaped as \uXXXX (6 bytes) plus
    # quotes and commas per text, plus room for the keys and top_k.
    return cfg.max_texts * (cfg.max_chars * 6 + 8) + 4096


def warm_up(predictor: Predictor) -> None:
    """Run the model once at a short and at the full sequence length.

    The first forward pass pays for lazy initialisation (kernels, allocator, CUDA context);
    doing it here keeps that cost out of the first user's latency, and a model that cannot
    fit its longest input fails now rather than under traffic.
    """
    from raypipe.predict import check_finite

    check_finite(predictor.predict(predictor.warmup_inputs(), **_quick(predictor)))


def _quick(predictor: Predictor) -> dict[str, Any]:
    # A language model answers with a generation: two new tokens show it works (and that its
    # longest prompt fits) without a health check waiting for max_new_tokens of them.
    return {"max_new_tokens": 2} if "max_new_tokens" in predictor.schema else {}


def probe(predictor: Predictor) -> None:
    """A tiny real prediction whose answer must hold no NaN or inf (health checks)."""
    from raypipe.predict import check_finite

    check_finite(predictor.predict(predictor.warmup_inputs()[:1], **_quick(predictor)))


class ModelSlot:
    """The predictor being served, swapped atomically.

    A new predictor is loaded and warmed up *before* it replaces the old one, so requests
    keep being answered by the old model during a swap and never see a half-loaded one.
    Calling the slot returns the current predictor (``None`` until the first one is in),
    which makes it a predictor provider for :func:`create_app`.
    """

    def __init__(self) -> None:
        self._current: Predictor | None = None
        self._source: str | None = None
        self.loaded_at: float | None = None
        self._lock = threading.Lock()  # one swap at a time; readers never take it

    def __call__(self) -> Predictor | None:
        return self._current

    @property
    def source(self) -> str | None:
        return self._source

    def install(self, predictor: Predictor, source: str | None = None, warm: bool = True) -> Predictor:
        if warm:
            warm_up(predictor)
        with self._lock:
            self._source = source if source is not None else predictor.meta.get("path")
            self.loaded_at = time.time()
            self._current = predictor  # a single reference assignment: atomic for readers
        return predictor

    def load(self, loader: Callable[[], Predictor], source: str | None = None) -> Predictor:
        return self.install(loader(), source=source)


class BatchStats:
    """Counts of observed batch sizes (in texts); served at ``/stats``.

    On Ray Serve each replica keeps its own; the Prometheus histogram in :mod:`raypipe.serve`
    aggregates across replicas.
    """

    def __init__(self) -> None:
        self.batches = 0
        self.requests = 0
        self.texts = 0
        self.seconds = 0.0
        self.sizes: Counter[int] = Counter()

    def record(self, texts: int, requests: int, seconds: float) -> None:
        self.batches += 1
        self.requests += requests
        self.texts += texts
        self.seconds += seconds
        self.sizes[texts] += 1

    def snapshot(self) -> dict[str, Any]:
        return {
            "batches": self.batches,
            "requests": self.requests,
            "texts": self.texts,
            "batch_sizes": {str(k): v for k, v in sorted(self.sizes.items())},
            "max_batch_size_seen": max(self.sizes, default=0),
            "mean_batch_size": self.texts / self.batches if self.batches else 0.0,
            "mean_requests_per_batch": self.requests / self.batches if self.batches else 0.0,
            "inference_seconds": round(self.seconds, 6),
        }


def resolve_token(cfg: ServeConfig) -> str | None:
    """The bearer token, read from the env var that ``serve.auth_token_env`` names.

    Naming a variable that is unset is an error: a server the user meant to protect must not
    come up open.
    """
    if not cfg.auth_token_env:
        return None
    token = os.environ.get(cfg.auth_token_env, "")
    if not token.strip():
        raise ConfigError(
            f"serve.auth_token_env: the environment variable '{cfg.auth_token_env}' is not set "
            "(or empty) in the server's environment; set it to the bearer token clients must send"
        )
    return token


class _BearerAuth:
    """Pure ASGI middleware: every path except /health needs ``Authorization: Bearer <token>``.

    Middleware rather than a FastAPI dependency so that /docs and /openapi.json, which FastAPI
    adds outside the dependency system, are covered too.
    """

    def __init__(self, app: Any, token: str, open_paths: frozenset[str]):
        self.app = app
        self.expected = f"Bearer {token}".encode()
        self.open_paths = open_paths

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or _route_path(scope) in self.open_paths:
            await self.app(scope, receive, send)
            return
        got = dict(scope["headers"]).get(b"authorization", b"")
        # compare_digest: the time taken must not reveal how much of the token matched.
        if not hmac.compare_digest(got, self.expected):
            error = "missing bearer token" if not got else "wrong bearer token"
            message = f"{error}: send the header 'Authorization: Bearer <token>'"
            if _route_path(scope).startswith("/v1/"):  # OpenAI clients read OpenAI's error shape
                from raypipe.openai_api import error_body

                response = JSONResponse(error_body(message, code="invalid_api_key"), status_code=401,
                                        headers={"WWW-Authenticate": "Bearer"})
            else:
                response = error_response(401, message, headers={"WWW-Authenticate": "Bearer"})
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _route_path(scope: dict[str, Any]) -> str:
    # Behind a route prefix (Serve's root_path) the path may still carry the prefix.
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):] or "/"
    return path


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise ApiError(413, f"the body is {declared} bytes; the limit is {limit}",
                               ["send fewer or shorter texts per request"])
        except ValueError:
            raise ApiError(400, "invalid Content-Length header") from None
    # Chunked uploads carry no length: count while reading, stop at the limit.
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the body is larger than the limit of {limit} bytes",
                           ["send fewer or shorter texts per request"])
        chunks.append(chunk)
    return b"".join(chunks)


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def _problems(err: ValidationError) -> list[str]:
    out = []
    for e in err.errors(include_url=False, include_input=False):
        loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e["loc"]).lstrip(".")
        kind, msg = e["type"], e["msg"].removeprefix("Value error, ")
        if kind == "extra_forbidden":
            msg = (f"unknown field '{loc}': send \"texts\" (list of strings), \"text\" (a string), \"pairs\" "
                   "(list of [text_a, text_b]) or \"tokens\" (list of word lists), optionally \"top_k\"")
            out.append(msg)
            continue
        if kind == "string_type":
            msg = "must be a string"
        elif kind == "list_type":
            msg = ("must be a list of [text_a, text_b] pairs" if loc.startswith("pairs") else
                   "must be a list of word lists" if loc == "tokens" else "must be a list of strings")
        elif kind in ("tuple_type", "too_short", "too_long") and loc.startswith("pairs"):
            msg = "must be a pair [text_a, text_b] of two strings"
        elif kind == "int_type":
            msg = "must be an integer"
        elif kind == "greater_than_equal":
            msg = f"must be >= {e.get('ctx', {}).get('ge')}"
        # Our own validators already name the item (texts[3] ...); don't prefix it twice.
        out.append(msg if not loc or msg.startswith(loc) else f"{loc}: {msg}")
    return out


async def _default_predict(provider: PredictorProvider, stats: BatchStats, texts: list[Any],
                           adapter: Predictor | None = None) -> tuple[list[dict[str, Any]], Predictor]:
    predictor = adapter or provider()
    if predictor is None:
        raise ApiError(503, "the model is not loaded yet; retry shortly",
                       headers={"Retry-After": str(RETRY_AFTER_S)})
    start = time.perf_counter()
    # A worker thread keeps the event loop (and /health, /ready) responsive during inference.
    preds = await asyncio.to_thread(predictor.predict, texts)
    stats.record(len(texts), 1, time.perf_counter() - start)
    return preds, predictor


# ----------------------------------------------------------------------------- the app


def create_app(
    predictor_provider: PredictorProvider,
    serve_cfg: ServeConfig | None = None,
    *,
    predict_fn: PredictFn | None = None,
    stats: BatchStats | Callable[[], dict[str, Any]] | None = None,
    serving_info: Callable[[], dict[str, Any]] | None = None,
    source: Callable[[], str | None] | None = None,
    loaded_at: Callable[[], float | None] | None = None,
    adapter_fn: AdapterFn | None = None,
    generation: GenerationEngine | None = None,
    served_ids: Callable[[], list[str]] | None = None,
    hold: Callable[[Predictor], Any] | None = None,
    release: Callable[[Any], None] | None = None,
) -> FastAPI:
    """Build the FastAPI app.

    Args:
        predictor_provider: returns the Predictor to use now, or None while none is loaded
            (then /ready and /predict answer 503). A :class:`ModelSlot` is one.
        serve_cfg: limits and auth (defaults to ``ServeConfig()``).
        predict_fn: ``async (texts) -> (predictions, predictor)``; Ray Serve passes its batched
            path here. The default runs the provider's predictor in a worker thread.
        stats: a :class:`BatchStats` (or a callable returning a dict) for ``/stats``; the
            default path records into it.
        serving_info: extra fields for ``/metadata["serving"]`` (replica id, batching, ...).
        source, loaded_at: where the current model came from and when (for ``/metadata``);
            read from ``predictor_provider`` when it is a :class:`ModelSlot`.
        adapter_fn: ``async (model id) -> Predictor`` of another served LoRA adapter, chosen by
            a request's ``model`` field or ``serve_multiplexed_model_id`` header; without it a
            request that names a model other than the one served gets 404.
        generation: the :class:`~raypipe.generation.GenerationEngine` behind the OpenAI routes of
            a language model (:mod:`raypipe.openai_api`); default: one of its own.
        served_ids: the model ids ``GET /v1/models`` lists (default: the served model's).
        hold, release: bracket a generation request's use of an adapter (see :mod:`raypipe.serve`).
    """
    from raypipe import openai_api
    from raypipe.generation import GenerationEngine

    from raypipe import __version__

    cfg = serve_cfg or ServeConfig()
    token = resolve_token(cfg)
    body_limit = max_body_bytes(cfg)
    limits = {"max_texts": cfg.max_texts, "max_chars": cfg.max_chars}
    if stats is None:
        stats = BatchStats()
    if predict_fn is None:
        if not isinstance(stats, BatchStats):
            raise TypeError("the default predict path records into a BatchStats; pass one")
        default_stats = stats

        async def predict_fn(texts: list[Any], adapter: Predictor | None = None) -> tuple[list[dict[str, Any]], Predictor]:
            return await _default_predict(predictor_provider, default_stats, texts, adapter)

    if isinstance(predictor_provider, ModelSlot):
        slot = predictor_provider
        source = source or (lambda: slot.source)
        loaded_at = loaded_at or (lambda: slot.loaded_at)

    app = FastAPI(
        title="raypipe model server",
        version=__version__,
        description="Predictions of a raypipe model (the request and answer shapes below are the ones "
        "of the model loaded when this page was made). "
        "Send `Authorization: Bearer <token>` when the server has a token configured.",
    )
    if token is not None:
        app.add_middleware(_BearerAuth, token=token, open_paths=frozenset({"/health"}))

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.error, exc.problems, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        # The traceback goes to the server log, not to the client.
        logger.error("unexpected error while serving a request", exc_info=exc)
        return error_response(500, "internal error while predicting; see the server log")

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, "invalid request", [str(e.get("msg")) for e in exc.errors()])

    def current_or_503() -> Predictor:
        predictor = predictor_provider()
        if predictor is None:
            raise ApiError(503, "the model is not loaded yet; retry shortly",
                           headers={"Retry-After": str(RETRY_AFTER_S)})
        return predictor

    @app.get("/health", summary="Liveness: the server process answers")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", summary="Readiness: a model is loaded and warmed up",
             responses={503: {"description": "Still loading"}})
    async def ready() -> JSONResponse:
        predictor = predictor_provider()
        if predictor is None:
            return JSONResponse({"ready": False, "error": "the model is still loading"},
                                status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)})
        return JSONResponse({"ready": True, "model": model_info(predictor).model_dump()})

    @app.get("/metadata", response_model=Metadata, responses={503: _ERRORS[503]},
             summary="The model being served, its labels and the request limits")
    async def metadata() -> Metadata:
        predictor = current_or_503()
        meta = predictor.meta
        return Metadata(
            model=model_info(predictor),
            source=source() if source else meta.get("path"),
            path=meta.get("path"),
            task=predictor.task.name,
            inputs=predictor.inputs,
            labels=predictor.labels,
            max_length=predictor.max_length,
            raypipe_version=__version__,
            checkpoint_raypipe_version=meta.get("raypipe_version"),
            data_fingerprint=meta.get("data_fingerprint"),
            git_sha=meta.get("git_sha"),
            git_dirty=meta.get("git_dirty"),
            loaded_at=loaded_at() if loaded_at else None,
            limits={**limits, "max_body_bytes": body_limit},
            serving=serving_info() if serving_info else {},
        )

    @app.get("/stats", summary="Batch sizes observed by this server process (or replica)")
    async def batch_stats() -> dict[str, Any]:
        return stats.snapshot() if isinstance(stats, BatchStats) else stats()

    @app.post(
        "/predict",
        response_model=PredictResponse,
        responses={k: v for k, v in _ERRORS.items() if k != 401 or token is not None},
        summary="Predict for one or more texts (or sentence pairs)",
        # The body is read and parsed by hand (size limit first, then JSON, then the schema),
        # so declare the schema for the OpenAPI docs explicitly.
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": PredictRequest.model_json_schema()}},
            }
        },
    )
    async def predict(request: Request) -> PredictResponse:
        if not _is_json(request.headers.get("content-type", "")):
            raise ApiError(415, "send the body as JSON with 'Content-Type: application/json'",
                           [f"got content type {request.headers.get('content-type') or '(none)'!r}"])
        raw = await _read_body(request, body_limit)
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise ApiError(400, 'the body is not valid JSON; send e.g. {"texts": ["some text"]}',
                           [str(exc)[:200]]) from None
        if not isinstance(body, dict):
            raise ApiError(422, 'the body must be a JSON object, e.g. {"texts": ["some text"]}',
                           [f"got a JSON {type(body).__name__}"])
        try:
            req = PredictRequest.model_validate(body, context=limits)
        except ValidationError as err:
            problems = _problems(err)
            more = [f"... and {len(problems) - _MAX_PROBLEMS} more"] if len(problems) > _MAX_PROBLEMS else []
            raise ApiError(422, "; ".join(problems[:3]), problems[:_MAX_PROBLEMS] + more) from None
        predictor = current_or_503()
        chosen = req.model or request.headers.get(MODEL_HEADER) or None
        adapter = None
        if chosen is not None:
            if adapter_fn is None:
                served = model_info(predictor)
                if chosen not in _ids(served):
                    raise ApiError(404, f"model '{chosen}' is not served here; this server serves "
                                   f"{_ids(served)[0]} only", [f"model: leave it out or use {_ids(served)[0]}"])
            else:
                adapter = predictor = await adapter_fn(chosen)
        if predictor.pair and req.pairs is None:
            raise ApiError(422, 'this model compares two texts: send {"pairs": [["text a", "text b"], ...]}',
                           ["texts/text: not accepted by a sentence-pair model"])
        if not predictor.pair and req.pairs is not None:
            raise ApiError(422, 'this model takes single texts: send {"texts": ["some text"]}',
                           ["pairs: only a model trained on sentence pairs takes them"])
        if req.tokens is not None and predictor.inputs != "tokens":
            raise ApiError(422, 'this model takes texts: send {"texts": ["some text"]}',
                           ["tokens: only a token-classification model takes word lists"])
        if req.top_k is not None:
            if not ranks_labels(predictor):
                raise ApiError(422, f"top_k applies to models that score labels; this is a {predictor.task.name} model",
                               ["top_k: leave it out"])
            if req.top_k > len(predictor.labels):
                raise ApiError(422, f"top_k is {req.top_k} but the model has {len(predictor.labels)} classes",
                               [f"top_k: must be between 1 and {len(predictor.labels)}"])
        preds, used = await (predict_fn(req.inputs(), adapter) if adapter is not None else predict_fn(req.inputs()))
        return PredictResponse(predictions=[top_k(p, req.top_k) for p in preds], model=model_info(used))

    def own_ids() -> list[str]:
        predictor = predictor_provider()
        return [] if predictor is None else _ids(model_info(predictor))[:1]

    engine = generation or GenerationEngine(cfg.max_batch_size, cfg.batch_wait_timeout_s)
    openai_api.add_routes(app, predictor_provider, cfg, engine=engine, served_ids=served_ids or own_ids,
                          adapter_fn=adapter_fn, read_body=lambda request: _read_body(request, body_limit), api_error=ApiError,
                          hold=hold, release=release)

    base_openapi = app.openapi
    cached: dict[Any, dict[str, Any]] = {}

    def openapi() -> dict[str, Any]:
        """The schema of the model being served: its request (texts or pairs) and its answer."""
        predictor = predictor_provider()
        key = (predictor.task.name, predictor.inputs) if predictor is not None else None
        if key not in cached:
            app.openapi_schema = None
            doc = base_openapi()
            app.openapi_schema = None
            if predictor is not None:
                _describe_predict(doc, REQUESTS.get(predictor.inputs, TextRequest), response_model(predictor.task))
            cached[key] = doc
        return cached[key]

    app.openapi = openapi  # type: ignore[method-assign]

    return app


def _describe_predict(doc: dict[str, Any], request: type[BaseModel], response: type[BaseModel]) -> None:
    """Put the served model's own request and answer schemas on ``POST /predict``."""
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    refs = {}
    for model in (request, response):
        js = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(js.pop("$defs", {}))
        schemas[model.__name__] = js
        refs[model] = {"$ref": f"#/components/schemas/{model.__name__}"}
    op = next(v["post"] for k, v in doc["paths"].items() if k.endswith("/predict") and "post" in v)
    op["requestBody"] = {"required": True, "content": {"application/json": {"schema": refs[request]}}}
    op["responses"]["200"]["content"] = {"application/json": {"schema": refs[response]}}
