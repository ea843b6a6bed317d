"""The HTTP routes of `ctc-drafter serve` (FastAPI): OpenAI's chat and text completions, models, health, metrics.

A request is validated and tokenized here, then queued for the single decoding worker; its reply comes
back as one JSON body or as server-sent events (`data: {chunk}` ... `data: [DONE]`). Every error is an
OpenAI-style body {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from contextlib import asynccontextmanager

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import CTCDrafterError
from ..models.templates import build_prompt_ids
from .metrics import ServerMetrics
from .protocol import (APIError, ChatCompletionRequest, CompletionRequest, SamplingRequest, chunk_body, completion_body,
                       error_body, models_body, new_id, usage_chunk_body)
from .settings import ServeSettings
from .worker import DecodeWorker, Job, QueueFull, ShuttingDown

log = logging.getLogger(__name__)

CHAT, TEXT = "/v1/chat/completions", "/v1/completions"


def create_app(engine, settings: ServeSettings) -> FastAPI:
    """An app around a loaded engine; its lifespan starts the worker and, at shutdown, drains it."""
    metrics = ServerMetrics()
    worker = DecodeWorker(engine, settings.speculative, settings.max_queue, metrics)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start()
        yield
        await asyncio.to_thread(worker.stop)  # uvicorn has finished open responses; let queued work end too

    app = FastAPI(title="ctc-drafter", lifespan=lifespan)
    app.state.worker, app.state.metrics = worker, metrics
    _add_error_handlers(app, metrics)
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(_key_checker(settings.api_key))])

    @v1.get("/models")
    async def list_models():
        return models_body(settings.model_name, created)

    @v1.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        _check_model(body, settings)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            ids = build_prompt_ids(engine.base.tokenizer, messages, settings.template)
        except CTCDrafterError as e:
            raise APIError(400, str(e), param="messages")
        return await _answer(request, body, ids, chat=True, prompt_param="messages")

    @v1.post("/completions")
    async def completions(body: CompletionRequest, request: Request):
        _check_model(body, settings)
        return await _answer(request, body, _completion_prompt_ids(engine, body.prompt), chat=False,
                             prompt_param="prompt")

    async def _answer(request: Request, body: SamplingRequest, ids: list[int], chat: bool, prompt_param: str):
        _check_context(engine, ids, prompt_param)
        job = _new_job(request.url.path, body, ids, settings)
        try:
            worker.submit(job)
        except QueueFull:
            raise APIError(429, f"the server is busy: {worker.max_queue} requests are already waiting for the "
                                "decoder (it decodes one at a time); retry later", type="rate_limit_error",
                           code="queue_full")
        except ShuttingDown:
            raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
        reply_id, model = new_id("chatcmpl" if chat else "cmpl"), settings.model_name
        if body.stream:
            events = _sse_events(job, chat, reply_id, model, body.include_usage())
            return _EventStream(events, on_close=lambda: worker.cancel(job))
        kind, payload = await _terminal_event(worker, job, request)
        if kind == "done":
            return completion_body(chat, reply_id, model, payload)
        # the worker has counted these in the metrics already
        if kind == "error":
            return JSONResponse(payload.body(), status_code=payload.status)
        return Response(status_code=499)  # the client has gone: nobody reads this

    app.include_router(v1)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": settings.model_name, "queue_depth": worker.depth, "busy": worker.busy}

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(metrics.render(), media_type=metrics.content_type)

    return app


# ---- request checks ----------------------------------------------------------------------------


def _key_checker(api_key: str | None):
    async def check(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise APIError(401, "invalid or missing API key (send `Authorization: Bearer <key>`)",
                           code="invalid_api_key")
    return check


def _check_model(body: SamplingRequest, settings: ServeSettings) -> None:
    if body.model != settings.model_name:
        raise APIError(404, f"the model {body.model!r} does not exist; this server serves {settings.model_name!r}",
                       param="model", code="model_not_found")


def _completion_prompt_ids(engine, prompt: str | list[int]) -> list[int]:
    tokenizer = engine.base.tokenizer
    if isinstance(prompt, str):
        ids = list(tokenizer(prompt)["input_ids"]) if prompt else []
    else:
        vocab = engine.base.config.vocab_size
        if any(not 0 <= t < vocab for t in prompt):
            raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
        ids = list(prompt)
    if not ids:
        raise APIError(400, "empty prompt", param="prompt")
    return ids


def _check_context(engine, ids: list[int], param: str) -> None:
    limit = engine.base.max_length
    if len(ids) >= limit:
        raise APIError(400, f"this model's maximum context length is {limit} tokens, but the prompt has {len(ids)} "
                            "tokens (at least one must be left for the reply)", param=param,
                       code="context_length_exceeded")


def _new_job(endpoint: str, body: SamplingRequest, ids: list[int], s: ServeSettings) -> Job:
    def pick(value, default):
        return default if value is None else value

    return Job(endpoint=endpoint, prompt_ids=ids, max_tokens=pick(body.token_limit(), s.max_tokens),
               temperature=pick(body.temperature, s.temperature), top_p=pick(body.top_p, s.top_p),
               top_k=pick(body.top_k, s.top_k), seed=pick(body.seed, s.seed), stops=body.stops(),
               stream=bool(body.stream), loop=asyncio.get_running_loop())


# ---- replies -----------------------------------------------------------------------------------


async def _terminal_event(worker: DecodeWorker, job: Job, request: Request) -> tuple[str, object]:
    """("done", Finished), ("error", APIError) or ("cancelled", None) for a non-streaming job; a client that
    hangs up meanwhile cancels it."""
    watcher = asyncio.create_task(_cancel_on_disconnect(worker, job, request))
    try:
        while True:
            kind, payload = await job.events.get()
            if kind != "delta":
                return kind, payload
    finally:
        watcher.cancel()


async def _cancel_on_disconnect(worker: DecodeWorker, job: Job, request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
    worker.cancel(job)
    job.events.put_nowait(("cancelled", None))


def _sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


async def _sse_events(job: Job, chat: bool, reply_id: str, model: str, include_usage: bool):
    """The chunks of one streamed reply, then `data: [DONE]`."""
    if chat:
        yield _sse(chunk_body(chat, reply_id, model, first=True))
    while True:
        kind, payload = await job.events.get()
        if kind == "delta":
            yield _sse(chunk_body(chat, reply_id, model, text=payload))
            continue
        if kind == "done":
            last = chunk_body(chat, reply_id, model, finish_reason=payload.finish_reason)
            yield _sse({**last, "speculation": payload.speculation.model_dump()})
            if include_usage:
                yield _sse(usage_chunk_body(chat, reply_id, model, payload))
        elif kind == "error":
            yield _sse(payload.body())
        yield "data: [DONE]\n\n"
        return


class _EventStream(StreamingResponse):
    """Server-sent events that call `on_close` however the response ends. When the client disconnects,
    Starlette cancels the sending, possibly before the event generator has even started (so its own
    `finally` would never run); this frees the worker for the next request either way."""

    media_type = "text/event-stream"

    def __init__(self, content, on_close):
        super().__init__(content, headers={"Cache-Control": "no-cache"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()  # a no-op for a finished job


# ---- errors ------------------------------------------------------------------------------------


def _add_error_handlers(app: FastAPI, metrics: ServerMetrics) -> None:
    def reply(request: Request, err: APIError) -> JSONResponse:
        if request.url.path in (CHAT, TEXT):
            metrics.count(request.url.path, "rejected" if err.status == 429 else
                          "invalid" if err.status < 500 else "error")
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return reply(request, exc)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        return reply(request, _validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), type=kind), status_code=exc.status_code)


def _validation_error(exc: RequestValidationError) -> APIError:
    """Pydantic's first complaint as one OpenAI-style 400: 'messages: Field required' with param 'messages'."""
    err = exc.errors()[0]
    if err.get("type") == "json_invalid":
        return APIError(400, f"the body is not valid JSON: {err.get('ctx', {}).get('error', err['msg'])}",
                        code="invalid_json")
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    if not loc and err.get("type") != "missing":
        return APIError(400, "the request body must be a JSON object (Content-Type: application/json)")
    param = ".".join(loc) or None
    msg = err["msg"].removeprefix("Value error, ")
    return APIError(400, f"{param}: {msg}" if param else msg, param=param)
