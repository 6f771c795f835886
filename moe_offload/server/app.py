"""The HTTP side: FastAPI routes over one GenerationWorker.

Routes: GET / (the chat page), GET /health, GET /metrics, GET /v1/models[/{id}], POST /v1/chat/completions,
POST /v1/completions. Bodies are parsed here (not by FastAPI's body parameters) so that invalid JSON, a wrong
type and an unknown field all come back as OpenAI's 400 with one line naming the field, whatever the
Content-Type. A request waits for its first event before answering, so an error found when generation starts is
still a plain 4xx/5xx rather than a broken stream; a streamed answer is server-sent events ending in
`data: [DONE]`. While a request waits or streams, its client's disconnect is watched: a client gone cancels its
job (worker.py), which stops the generation after the current token.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from dataclasses import dataclass
from importlib import resources
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from .errors import ApiError, error_body, validation_message
from .metrics import Metrics
from .prepare import Served, prepare_chat, prepare_completion
from .schemas import ChatRequest, CompletionRequest
from .worker import SHUTDOWN_MESSAGE, Delta, Done, Failed, GenerationWorker, Job, QueueFull, ShuttingDown

log = logging.getLogger("moe_offload.server")
MAX_BODY_BYTES = 16 << 20
PROMETHEUS_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass
class Service:
    served: Served
    worker: GenerationWorker
    metrics: Metrics
    api_key: str | None = None
    created: int = 0


def create_app(service: Service) -> FastAPI:
    """The ASGI app; the caller starts and closes service.worker."""
    app = FastAPI(title="moe-offload", docs_url=None, redoc_url=None, openapi_url=None)
    served, metrics = service.served, service.metrics
    page = resources.files(__package__).joinpath("static/chat.html").read_text(encoding="utf-8")

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, err: HTTPException) -> JSONResponse:
        message = f"no route {request.method} {request.url.path}" if err.status_code == 404 else str(err.detail)
        return JSONResponse(error_body(err.status_code, message), status_code=err.status_code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        message, param = validation_message(list(err.errors()))
        return JSONResponse(error_body(400, message, param), status_code=400)

    @app.exception_handler(Exception)
    async def _bug(request: Request, err: Exception) -> JSONResponse:
        log.error("request %s %s failed", request.method, request.url.path, exc_info=err)
        return JSONResponse(error_body(500, "internal server error (the server's log has the details)"), 500)

    def authorize(request: Request) -> None:
        if service.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), service.api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send the header Authorization: Bearer <key>",
                           code="invalid_api_key")

    @app.get("/", response_class=HTMLResponse)
    async def chat_page() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": served.name, "queued": service.worker.queued(),
                "queue_size": service.worker.queue_size}

    @app.get("/metrics")
    async def get_metrics(request: Request) -> PlainTextResponse:
        authorize(request)
        text = metrics.render(service.worker.queued(), service.worker.queue_size)
        return PlainTextResponse(text, media_type=PROMETHEUS_TYPE)

    def model_card() -> dict[str, Any]:
        return {"id": served.name, "object": "model", "created": service.created, "owned_by": "moe-offload",
                "context_length": served.context}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        authorize(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str, request: Request) -> dict[str, Any]:
        authorize(request)
        if name != served.name:
            raise ApiError(404, f"model {name!r} not found: this server serves {served.name!r}", "model",
                           "model_not_found")
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await handle(request, ChatRequest, prepare_chat, ChatShape, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await handle(request, CompletionRequest, prepare_completion, CompletionShape, "completions")

    async def handle(request: Request, schema, prepare, shape, endpoint: str) -> Response:
        try:
            authorize(request)
            body = await parse(request, schema)
            job = prepare(served, body)
        except ApiError:
            metrics.count_request(endpoint, "rejected")
            raise
        return await respond(request, job, body, shape(served.name), endpoint)

    async def respond(request: Request, job: Job, body, shape, endpoint: str) -> Response:
        job.bind()
        try:
            service.worker.submit(job)
        except QueueFull:
            metrics.count_request(endpoint, "rejected")
            raise ApiError(429, f"the server is busy: {service.worker.queue_size} requests are already waiting "
                                f"(batch-1 decode runs one at a time); try again later",
                           code="rate_limit_exceeded") from None
        except ShuttingDown:
            raise ApiError(503, SHUTDOWN_MESSAGE) from None
        watcher = asyncio.ensure_future(wait_for_disconnect(request))
        first = await next_event(job, watcher)
        if first is None:
            return cancelled(job, endpoint, watcher)
        if isinstance(first, Failed):
            watcher.cancel()
            metrics.count_request(endpoint, "rejected" if first.status < 500 else "error")
            return JSONResponse(error_body(first.status, first.message), status_code=first.status)
        if body.stream:
            return StreamingResponse(sse(job, first, watcher, shape, body.wants_usage_chunk(), endpoint),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        pieces: list[str] = []
        event = first
        while isinstance(event, Delta):
            pieces.append(event.text)
            event = await next_event(job, watcher)
        if event is None:
            return cancelled(job, endpoint, watcher)
        watcher.cancel()
        if isinstance(event, Failed):
            metrics.count_request(endpoint, "rejected" if event.status < 500 else "error")
            return JSONResponse(error_body(event.status, event.message), status_code=event.status)
        metrics.count_request(endpoint, "ok")
        return JSONResponse(shape.whole("".join(pieces), event))

    def cancelled(job: Job, endpoint: str, watcher: asyncio.Future) -> Response:
        job.cancel()
        watcher.cancel()
        metrics.count_request(endpoint, "cancelled")
        return Response(status_code=499)  # nobody reads it: the client is gone

    async def sse(job: Job, first: Delta | Done, watcher: asyncio.Future, shape, usage_chunk: bool,
                  endpoint: str) -> AsyncIterator[str]:
        finished = False
        try:
            yield frame(shape.start())
            event = first
            while isinstance(event, Delta):
                yield frame(shape.delta(event.text))
                event = await next_event(job, watcher)
            if event is None:  # the client went away
                return
            if isinstance(event, Failed):
                metrics.count_request(endpoint, "error")
                yield frame(error_body(event.status, event.message))
            else:
                yield frame(shape.end(event.finish_reason))
                if usage_chunk:
                    yield frame(shape.usage_chunk(event))
                metrics.count_request(endpoint, "ok")
            finished = True
            yield "data: [DONE]\n\n"
        finally:  # also when the server's send fails or the task is cancelled on a disconnect
            watcher.cancel()
            if not finished:
                job.cancel()
                metrics.count_request(endpoint, "cancelled")

    return app


async def parse(request: Request, model):
    """The body as `model`, or a 400 naming what is wrong (invalid JSON, a wrong type, an unknown field)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise ApiError(413, f"request body over {MAX_BODY_BYTES >> 20} MiB")
    raw = await request.body()
    try:
        return model.model_validate_json(raw)
    except ValidationError as err:
        errors = err.errors()
        if errors and errors[0].get("type") == "json_invalid":
            detail = errors[0].get("ctx", {}).get("error", "")
            raise ApiError(400, f"the request body is not valid JSON: {detail}".rstrip(": ")) from None
        message, param = validation_message(errors)
        raise ApiError(400, message, param) from None


async def wait_for_disconnect(request: Request) -> None:
    """Returns when the client has gone (the ASGI server delivers http.disconnect once the body is read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def next_event(job: Job, watcher: asyncio.Future) -> Delta | Done | Failed | None:
    """The job's next event, or None once the client has disconnected."""
    getter = asyncio.ensure_future(job.events.get())
    done, _ = await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
    if getter in done:
        return getter.result()
    getter.cancel()
    return None


def frame(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def usage(done: Done) -> dict[str, int]:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens}


class _Shape:
    """One response's JSON objects (OpenAI's shapes); ids and the creation time are fixed per response."""

    prefix = object_name = chunk_name = ""

    def __init__(self, model: str):
        self.model = model
        self.id = f"{self.prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _envelope(self, name: str, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {"id": self.id, "object": name, "created": self.created, "model": self.model,
                "system_fingerprint": None, "choices": choices, **extra}

    def usage_chunk(self, done: Done) -> dict[str, Any]:
        return self._envelope(self.chunk_name, [], usage=usage(done))


class ChatShape(_Shape):
    prefix, object_name, chunk_name = "chatcmpl", "chat.completion", "chat.completion.chunk"

    def whole(self, text: str, done: Done) -> dict[str, Any]:
        message = {"role": "assistant", "content": text, "refusal": None}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": done.finish_reason}
        return self._envelope(self.object_name, [choice], usage=usage(done))

    def _chunk(self, delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
        return self._envelope(self.chunk_name, [{"index": 0, "delta": delta, "logprobs": None,
                                                 "finish_reason": finish}])

    def start(self) -> dict[str, Any]:
        return self._chunk({"role": "assistant", "content": ""}, None)

    def delta(self, text: str) -> dict[str, Any]:
        return self._chunk({"content": text}, None)

    def end(self, finish_reason: str) -> dict[str, Any]:
        return self._chunk({}, finish_reason)


class CompletionShape(_Shape):
    prefix, object_name, chunk_name = "cmpl", "text_completion", "text_completion"

    def whole(self, text: str, done: Done) -> dict[str, Any]:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": done.finish_reason}
        return self._envelope(self.object_name, [choice], usage=usage(done))

    def _chunk(self, text: str, finish: str | None) -> dict[str, Any]:
        return self._envelope(self.chunk_name, [{"index": 0, "text": text, "logprobs": None,
                                                 "finish_reason": finish}])

    def start(self) -> dict[str, Any]:
        return self._chunk("", None)

    def delta(self, text: str) -> dict[str, Any]:
        return self._chunk(text, None)

    def end(self, finish_reason: str) -> dict[str, Any]:
        return self._chunk("", finish_reason)
