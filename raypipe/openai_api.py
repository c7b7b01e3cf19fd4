"""OpenAI-compatible routes for a served language model (``task: sft``).

Added to every app of :func:`raypipe.api.create_app`; they answer only while the model being
served is a causal LM (any other model: 404 saying so).

    POST /v1/chat/completions   messages rendered with the tokenizer's chat template
                                (``add_generation_prompt=True``), then generated
    POST /v1/completions        a raw text prompt continued
    GET  /v1/models             the model ids a request's ``model`` may name (the served model and
                                any ``serve.adapters``)

``stream: true`` answers with server-sent events in OpenAI's chunk format, ending with
``data: [DONE]``. Honoured: ``max_tokens`` (``max_completion_tokens``), ``temperature``,
``top_p``, ``stop`` (up to 4 strings; the text is cut before the stop string), ``seed``,
``stream_options.include_usage``; ``n`` must be 1. Any other field (``logprobs``, ``tools``,
penalties, ...) is a 400, never silently ignored. Limits: ``serve.max_tokens`` output tokens
(also the default), ``serve.max_prompt_tokens`` prompt tokens, and prompt + output within the
model's context. Errors have OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``.

The routes are left out of ``/openapi.json``: their contract is OpenAI's published API, and the
schema (and the fuzzing driven by it) stays the one of the raypipe routes and their error shape.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError, field_validator

from raypipe.config import ServeConfig
from raypipe.generation import Delta, GenerationEngine, SamplingParams

if TYPE_CHECKING:  # pragma: no cover
    from raypipe.predict import Predictor

LM_TASK = "sft"
MAX_STOPS = 4


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind, self.headers = status, message, param, code, kind, headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.kind, self.param, self.code)


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# ----------------------------------------------------------------------------- schema


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: StrictStr = Field(description="A model id from GET /v1/models.")
    max_tokens: int | None = Field(None, ge=1, description="Most tokens to generate (default and limit: "
                                   "serve.max_tokens; 16 by default for /v1/completions).")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 is greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=1, description="Only 1 is supported.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(None, description=f"Up to {MAX_STOPS} strings that end the text.")
    seed: int | None = Field(None, description="Makes sampling repeatable.")
    user: str | None = Field(None, description="Accepted and ignored.")

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = [v] if isinstance(v, str) else v or []
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop sequences")
        if any(not s for s in stops):
            raise ValueError("a stop sequence is empty")
        return v

    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="The same as max_tokens.")


class CompletionRequest(_Request):
    prompt: str | list[str] = Field(description="One prompt (a list of one string is accepted).")

    @field_validator("prompt")
    @classmethod
    def _one(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and len(v) != 1:
            raise ValueError("send one prompt per request (n=1, no batches of prompts)")
        return v

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


_Request.model_rebuild()
ChatCompletionRequest.model_rebuild()
CompletionRequest.model_rebuild()


def _validation_error(err: ValidationError) -> OpenAIError:
    first = err.errors(include_url=False, include_input=False)[0]
    loc = [str(p) for p in first["loc"]]
    param = loc[0] if loc else None
    if first["type"] == "extra_forbidden":
        return OpenAIError(400, f"'{param}' is not supported by this server", param, "unsupported_parameter")
    where = "".join(f"[{p}]" if p.isdigit() else f".{p}" for p in loc).lstrip(".")
    msg = first["msg"].removeprefix("Value error, ")
    return OpenAIError(400, f"{where}: {msg}" if where else msg, param, "invalid_value")


# ----------------------------------------------------------------------------- routes

AdapterFn = Callable[[str], Awaitable["Predictor"]]


def add_routes(app: FastAPI, provider: Callable[[], Predictor | None], cfg: ServeConfig, *,
               engine: GenerationEngine, served_ids: Callable[[], list[str]],
               adapter_fn: AdapterFn | None, read_body: Callable[[Request], Awaitable[bytes]],
               api_error: type[Any], hold: Callable[[Predictor], Any] | None = None,
               release: Callable[[Any], None] | None = None) -> None:
    """Register the /v1 routes on ``app``. ``served_ids()`` lists the ids /v1/models shows (the
    first is the default model's); ``adapter_fn(id)`` returns the Predictor of a served LoRA
    adapter (or raises a 404 ``api_error``, raypipe.api's ApiError, passed in to keep this module
    free of an import cycle); ``read_body`` reads the body within the size limit.
    ``hold(predictor)`` / ``release(token)`` bracket a request's use of an adapter (Serve's LRU
    may evict it meanwhile; it is deleted once no request holds it)."""
    ApiError = api_error  # noqa: N806
    hold = hold or (lambda _p: None)
    release = release or (lambda _t: None)

    @app.exception_handler(OpenAIError)
    async def _openai_error(_: Request, exc: OpenAIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    def current() -> Predictor:
        predictor = provider()
        if predictor is None:
            raise OpenAIError(503, "the model is not loaded yet; retry shortly", kind="server_error",
                              code="model_not_ready", headers={"Retry-After": "1"})
        return predictor

    async def parse(request: Request, schema: type[_Request]) -> Any:
        try:
            raw = await read_body(request)
        except ApiError as exc:
            raise OpenAIError(exc.status, exc.error) from None
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise OpenAIError(400, "the body is not valid JSON") from None
        if not isinstance(body, dict):
            raise OpenAIError(400, "the body must be a JSON object")
        try:
            return schema.model_validate(body)
        except ValidationError as err:
            raise _validation_error(err) from None

    async def choose(model: str) -> Predictor:
        default = current()
        if model in served_ids() and adapter_fn is None:
            chosen = default
        elif adapter_fn is None:
            raise OpenAIError(404, f"The model '{model}' does not exist; this server serves "
                              f"{', '.join(served_ids())}", "model", "model_not_found")
        else:
            try:
                chosen = await adapter_fn(model)
            except ApiError as exc:
                if exc.status == 404:
                    raise OpenAIError(404, f"The model '{model}' does not exist; this server serves "
                                      f"{', '.join(served_ids())}", "model", "model_not_found") from None
                raise OpenAIError(exc.status, exc.error, "model") from None
        if chosen.task.name != LM_TASK:
            raise OpenAIError(404, f"'{model}' is a {chosen.task.name} model; the /v1 routes serve language "
                              f"models (task: {LM_TASK}); use POST /predict", "model", "model_not_found")
        return chosen

    def sampling(req: _Request, predictor: Predictor, prompt: list[int], prompt_param: str,
                 default_max: int) -> SamplingParams:
        max_tokens = getattr(req, "max_completion_tokens", None) or req.max_tokens
        param = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) else "max_tokens"
        if max_tokens is not None and max_tokens > cfg.max_tokens:
            raise OpenAIError(400, f"{param} is {max_tokens}; this server generates at most "
                              f"{cfg.max_tokens} tokens (serve.max_tokens)", param, "invalid_value")
        if not prompt:
            raise OpenAIError(400, "the prompt is empty", prompt_param, "invalid_value")
        if len(prompt) > cfg.max_prompt_tokens:
            raise OpenAIError(400, f"the prompt has {len(prompt)} tokens; the limit is {cfg.max_prompt_tokens} "
                              "(serve.max_prompt_tokens)", prompt_param, "context_length_exceeded")
        max_tokens = max_tokens or min(default_max, cfg.max_tokens)
        context = getattr(getattr(predictor.model, "config", None), "max_position_embeddings", None)
        if context is not None and len(prompt) + max_tokens > context:
            raise OpenAIError(400, f"the prompt ({len(prompt)} tokens) and max_tokens ({max_tokens}) exceed the "
                              f"model's context of {context} tokens", prompt_param, "context_length_exceeded")
        return SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                              seed=req.seed, stop=req.stops())

    def run(predictor: Predictor, prompt: list[int], params: SamplingParams) -> AsyncIterator[Delta]:
        return engine.stream(predictor.model, predictor.tokenizer, prompt, params,
                             activate=predictor._active if predictor.adapter is not None else None)

    def holding(predictor: Predictor, prepare: Callable[[], Any]) -> tuple[Any, Any]:
        """Hold ``predictor`` (before any await, so an adapter eviction cannot slip in between) and
        run ``prepare()``; the hold is released again if that fails."""
        held = hold(predictor)
        try:
            return held, prepare()
        except BaseException:
            release(held)
            raise

    async def collect(deltas: AsyncIterator[Delta], held: Any) -> tuple[str, Delta]:
        """The whole answer of a non-streamed request; the hold ends with it."""
        try:
            return await _collect(deltas)
        finally:
            release(held)

    @app.get("/v1/models", include_in_schema=False, summary="OpenAI API: the model ids requests may name")
    async def list_models() -> dict[str, Any]:
        predictor = current()
        created = int(predictor.meta.get("created") or 0)
        return {"object": "list", "data": [{"id": i, "object": "model", "created": created, "owned_by": "raypipe"}
                                           for i in served_ids()]}

    @app.post("/v1/chat/completions", include_in_schema=False, summary="OpenAI API: chat completion (stream: true for SSE)")
    async def chat(request: Request) -> Any:
        from raypipe.tasks.sft import prompt_ids

        req: ChatCompletionRequest = await parse(request, ChatCompletionRequest)
        predictor = await choose(req.model)

        def prepare() -> tuple[list[int], SamplingParams]:
            prompt = prompt_ids(predictor.tokenizer, [{"role": m.role, "content": m.text()} for m in req.messages])
            return prompt, sampling(req, predictor, prompt, "messages", cfg.max_tokens)

        held, (prompt, params) = holding(predictor, prepare)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        deltas = run(predictor, prompt, params)
        if req.stream:
            def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
                return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": req.model,
                        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

            return _sse_response(_stream(deltas, lambda d: chunk({"content": d.text}, None),
                                         lambda d: chunk({}, d.finish_reason), rid, created, req,
                                         "chat.completion.chunk", lambda: release(held),
                                         head=chunk({"role": "assistant", "content": ""}, None)))
        text, last = await collect(deltas, held)
        return {"id": rid, "object": "chat.completion", "created": created, "model": req.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "logprobs": None, "finish_reason": last.finish_reason}],
                "usage": _usage(last)}

    @app.post("/v1/completions", include_in_schema=False, summary="OpenAI API: text completion (stream: true for SSE)")
    async def completions(request: Request) -> Any:
        req: CompletionRequest = await parse(request, CompletionRequest)
        predictor = await choose(req.model)

        def prepare() -> tuple[list[int], SamplingParams]:
            text = req.text()
            prompt = list(predictor.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []
            return prompt, sampling(req, predictor, prompt, "prompt", 16)

        held, (prompt, params) = holding(predictor, prepare)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        deltas = run(predictor, prompt, params)
        if req.stream:
            def chunk(piece: str, finish: str | None) -> dict[str, Any]:
                return {"id": rid, "object": "text_completion", "created": created, "model": req.model,
                        "choices": [{"index": 0, "text": piece, "logprobs": None, "finish_reason": finish}]}

            return _sse_response(_stream(deltas, lambda d: chunk(d.text, None), lambda d: chunk("", d.finish_reason),
                                         rid, created, req, "text_completion", lambda: release(held)))
        out, last = await collect(deltas, held)
        return {"id": rid, "object": "text_completion", "created": created, "model": req.model,
                "choices": [{"index": 0, "text": out, "logprobs": None, "finish_reason": last.finish_reason}],
                "usage": _usage(last)}


def _usage(last: Delta) -> dict[str, int]:
    return {"prompt_tokens": last.prompt_tokens, "completion_tokens": last.completion_tokens,
            "total_tokens": last.prompt_tokens + last.completion_tokens}


async def _collect(deltas: AsyncIterator[Delta]) -> tuple[str, Delta]:
    parts, last = [], Delta("")
    try:
        async for d in deltas:
            parts.append(d.text)
            last = d
    except Exception as exc:  # noqa: BLE001 - the model failed: a 500 in OpenAI's shape
        raise OpenAIError(500, f"generation failed: {type(exc).__name__}", kind="server_error") from exc
    return "".join(parts), last


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _sse_response(events: AsyncIterator[str]) -> StreamingResponse:
    # no-cache / no buffering: proxies must pass each event on as it comes
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _stream(deltas: AsyncIterator[Delta], middle: Callable[[Delta], dict[str, Any]],
                  final: Callable[[Delta], dict[str, Any]], rid: str, created: int, req: _Request,
                  obj: str, done: Callable[[], None], head: dict[str, Any] | None = None) -> AsyncIterator[str]:
    """The chunks of one streamed answer, then the usage chunk if asked for, then [DONE].
    An error mid-stream (the status is already sent) becomes an error event. ``done()`` runs
    at the end, also when the client went away. ``head``: a first chunk (the chat role)."""
    try:
        if head is not None:
            yield _sse(head)
        async for d in deltas:
            if d.text:
                yield _sse(middle(d))
            if d.finish_reason is not None:
                yield _sse(final(d))
                if req.stream_options is not None and req.stream_options.include_usage:
                    yield _sse({"id": rid, "object": obj, "created": created, "model": req.model,
                                "choices": [], "usage": _usage(d)})
    except Exception as exc:  # noqa: BLE001
        yield _sse(error_body(f"generation failed: {type(exc).__name__}", "server_error"))
    finally:
        await deltas.aclose()  # type: ignore[attr-defined]  # a client gone: its row stops
        done()
    yield "data: [DONE]\n\n"
