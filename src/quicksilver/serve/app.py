"""The HTTP layer: validates, queues and streams; it never touches tensors.

Every error is OpenAI's ``{"error": {"message", "type", "param", "code"}}`` object: 400
for bad input (malformed JSON and wrong types included), 404 for an unknown model or
route, 408 for a body that arrives too slowly, 413 for a body over ``max_body_bytes``,
429 with ``Retry-After`` when ``max_batch + max_queue`` requests are in already, 500 for a
request that failed inside the engine (the server stays up and ``/health`` says so).

The event loop only parses, validates and queues: tokenizing and the chat template run in a
worker thread, detokenizing on the scheduler's, so ``/health`` answers whatever one client
sends. Every request has a disconnect watcher: a client that hangs up, streamed or not,
frees its batch row at the next step boundary.
"""

from __future__ import annotations

import asyncio
import json
import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import prompts
from . import protocol as P
from .limits import BodyLimits, uvicorn_options
from .scheduler import Event, GenerationRequest, QueueFull, Scheduler, SchedulerStopped

log = logging.getLogger(__name__)


@dataclass
class ServeSettings:
    """Limits of one server.

    Parameters
    ----------
    max_batch : int, default 8. Requests decoded together at most.
    max_queue : int, default 64. Requests waiting for a batch row at most; more get 429.
    max_tokens_limit : int, default 1024. Largest ``max_tokens`` a request may ask for.
    retry_after : int, default 1. Seconds a 429 asks the client to wait.
    max_body_bytes : int, default 4 MiB. Largest request body; a larger one gets 413 before it is read whole.
    read_timeout : float, default 30. Seconds a client has to send a request's head, and then its body (408).
    max_header_bytes : int, default 16 KiB. Largest request head (request line and headers): 414 or 431 past it.
    keep_alive : int, default 5. Seconds an idle keep-alive connection stays open.
    """

    max_batch: int = 8
    max_queue: int = 64
    max_tokens_limit: int = 1024
    retry_after: int = 1
    max_body_bytes: int = 4 << 20
    read_timeout: float = 30.0
    max_header_bytes: int = 16 << 10
    keep_alive: int = 5

    def __post_init__(self):
        for name, least in (("max_batch", 1), ("max_queue", 0), ("max_tokens_limit", 1), ("retry_after", 0), ("max_body_bytes", 1),
                            ("max_header_bytes", 1024), ("keep_alive", 1)):
            if getattr(self, name) < least:
                raise ValueError(f"{name.replace('_', '-')} must be at least {least}, got {getattr(self, name)}")
        if not 0 < self.read_timeout < float("inf"):
            raise ValueError(f"read-timeout must be a positive number of seconds, got {self.read_timeout}")

    def uvicorn_options(self) -> dict:
        """Keyword arguments for ``uvicorn.run`` that apply the head's limits (size, deadline, keep-alive)."""
        return uvicorn_options(self.read_timeout, self.max_header_bytes, self.keep_alive)


class APIError(Exception):
    """An error answered with OpenAI's error object."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: Optional[str] = None,
                 code: Optional[str] = None, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code, self.headers = status, message, type, param, code, headers


def _error_response(status: int, message: str, type: str, param=None, code=None, headers=None) -> JSONResponse:
    body = P.ErrorResponse(error=P.ErrorDetail(message=message, type=type, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "constrained-str", "constrained-list"}


def _validation_message(exc: RequestValidationError) -> tuple[str, Optional[str]]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    # Of a union's alternatives, the error that is not a plain type mismatch says what is wrong ("at most 4 items").
    first = next((e for e in errors if not str(e.get("type", "")).endswith("_type")), errors[0])
    if first.get("type") == "json_invalid":
        return f"malformed JSON body: {first.get('ctx', {}).get('error', first.get('msg'))}", None
    # pydantic names the member of a union it tried ("function-after[...]", "list[int]"): not a field
    loc = [str(p) for p in first.get("loc", ()) if p != "body" and not (isinstance(p, str) and ("[" in p or p in _TYPE_TAGS))]
    param = ".".join(loc) or None
    if param is None and first.get("type") in ("model_attributes_type", "dict_type"):
        return "the request body must be a JSON object (Content-Type: application/json)", None
    others = {str(e["loc"][1]) for e in errors if len(e.get("loc", ())) > 1} - {loc[0] if loc else ""}
    more = f" (and problems with {', '.join(sorted(others))})" if others else ""
    return (f"{param}: {first.get('msg')}" if param else str(first.get("msg"))) + more, param


class Metrics:
    """Prometheus metrics in a registry of the app's own (several apps may share a process)."""

    def __init__(self, scheduler: Scheduler):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.requests = Counter("quicksilver_requests", "HTTP requests by endpoint and status code", ["endpoint", "status"], registry=r)
        self.ttft = Histogram("quicksilver_time_to_first_token_seconds", "Time from queueing to the first token", registry=r,
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.request_tps = Histogram("quicksilver_request_tokens_per_second", "Tokens per second of each finished request", registry=r,
                                     buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000))
        s = scheduler
        gauges = {
            "quicksilver_queue_depth": ("Requests waiting for a batch row", lambda: s.queue_depth),
            "quicksilver_batch_size": ("Rows in the running decode batch", lambda: s.batch_size),
            "quicksilver_kv_bytes": ("Bytes held by the running rows' KV caches", lambda: s.kv_bytes),
            "quicksilver_kv_full_bytes": ("Bytes a full KV cache of the same tokens would hold", lambda: s.kv_full_bytes),
            "quicksilver_decode_tokens_per_second": ("Tokens per second of the last batched decode step", lambda: s.step_tokens_per_second),
            "quicksilver_generated_tokens_total": ("Tokens generated since start", lambda: s.generated_tokens),
            "quicksilver_failed_requests_total": ("Requests that failed inside the engine", lambda: s.failed),
            "quicksilver_cancelled_requests_total": ("Requests cancelled by their client", lambda: s.finished["cancelled"]),
        }
        for name, (doc, read) in gauges.items():
            Gauge(name, doc, registry=r).set_function(read)


ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")
_GONE = Event("gone")  # put on a request's event queue when its client hangs up


class _CountRequests:
    """Pure ASGI middleware counting responses by path and status (leaves streams and disconnects alone)."""

    def __init__(self, app, counter):
        self.app, self.counter = app, counter

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_counted(message):
            if message["type"] == "http.response.start":
                path = scope["path"] if scope["path"] in ENDPOINTS else "other"  # bounded label values
                self.counter.labels(path, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, send_counted)


def create_app(engine, tokenizer, model_name: str, settings: ServeSettings | None = None) -> FastAPI:
    """The OpenAI-compatible app serving one engine; its scheduler runs while the app does.

    Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (streamed with
    ``stream: true``), ``GET /v1/models``, ``GET /v1/models/{id}``, ``GET /health``,
    ``GET /metrics`` (the GET endpoints answer ``HEAD`` too).
    """
    settings = settings or ServeSettings()
    eos = tokenizer.eos_token_id
    scheduler = Scheduler(engine, tokenizer, settings.max_batch, settings.max_queue,
                          eos_token_ids=[eos] if isinstance(eos, int) else list(eos or []))
    metrics = Metrics(scheduler)
    context = engine.spec.max_positions
    bound = prompts.PromptBound(tokenizer, context)
    created = P.now()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler.start()
        try:
            yield
        finally:
            scheduler.stop()

    app = FastAPI(title="QuickSilver", lifespan=lifespan)
    app.state.scheduler, app.state.settings, app.state.metrics = scheduler, settings, metrics

    app.add_middleware(BodyLimits, max_bytes=settings.max_body_bytes, timeout=settings.read_timeout)
    app.add_middleware(_CountRequests, counter=metrics.requests)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return _error_response(exc.status, exc.message, exc.type, exc.param, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return _error_response(400, message, "invalid_request_error", param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        kind = {404: "not_found_error", 408: "timeout_error"}.get(exc.status_code, "invalid_request_error")
        return _error_response(exc.status_code, str(exc.detail), kind, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        log.exception("internal error")
        return _error_response(500, f"internal error ({type(exc).__name__})", "server_error")

    def check_request(body: P._Sampling) -> None:
        """The checks every endpoint makes before it tokenizes anything."""
        if body.model is not None and body.model != model_name:
            raise APIError(404, f"model {body.model!r} is not served here (this server serves {model_name!r})",
                           param="model", code="model_not_found")
        bad = body.unsupported()
        if bad:
            raise APIError(400, bad[1], param=bad[0])

    def check_fits(*texts: str) -> None:
        """Refuse, before tokenizing, text that cannot fit the context whatever its tokens."""
        if bound.too_long(*texts):
            n = sum(len(t.encode("utf-8")) for t in texts)
            raise APIError(400, f"prompt of {n} bytes does not fit the model's context of {context} tokens",
                           param="prompt", code="context_length_exceeded")

    def check_common(body: P._Sampling, prompt_len: int) -> int:
        """The request's max_tokens after the checks of its prompt's length."""
        if prompt_len == 0:
            raise APIError(400, "empty prompt", param="prompt")
        if prompt_len >= context:
            raise APIError(400, f"prompt of {prompt_len} tokens does not fit the model's context of {context}",
                           param="prompt", code="context_length_exceeded")
        max_tokens = body.max_tokens
        if max_tokens is None:  # as OpenAI's chat endpoint: up to the limit and the context
            max_tokens = min(settings.max_tokens_limit, context - prompt_len)
        if max_tokens < 1:
            raise APIError(400, f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens")
        if max_tokens > settings.max_tokens_limit:
            raise APIError(400, f"max_tokens {max_tokens} is above this server's limit of {settings.max_tokens_limit}",
                           param="max_tokens")
        if prompt_len + max_tokens > context:
            raise APIError(400, f"prompt of {prompt_len} tokens plus max_tokens {max_tokens} exceeds the model's context of {context}",
                           param="max_tokens", code="context_length_exceeded")
        return max_tokens

    def submit(body: P._Sampling, ids: list[int], max_tokens: int):
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()

        def on_event(event: Event) -> None:  # runs on the scheduler thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the loop has closed: nobody listens any more
                pass

        req = GenerationRequest(
            prompt_ids=ids, max_tokens=max_tokens, temperature=body.sampling_temperature, top_k=body.top_k,
            top_p=body.top_p if body.top_p < 1 else None, seed=body.seed, stop=body.stop_strings(), on_event=on_event,
        )
        try:
            scheduler.submit(req)
        except QueueFull as e:
            raise APIError(429, f"the server is busy: {e}; retry later", type="rate_limit_error", code="rate_limit_exceeded",
                           headers={"Retry-After": str(settings.retry_after)})
        except SchedulerStopped as e:
            raise APIError(503, str(e), type="server_error")
        return req, events

    def usage(req: GenerationRequest) -> P.Usage:
        n_prompt, n_out = len(req.prompt_ids), len(req.tokens)
        return P.Usage(prompt_tokens=n_prompt, completion_tokens=n_out, total_tokens=n_prompt + n_out)

    def observe(req: GenerationRequest) -> None:
        if req.time_to_first_token is not None:
            metrics.ttft.observe(req.time_to_first_token)
        if req.finished_at and req.first_token_at and len(req.tokens) > 1 and req.finished_at > req.first_token_at:
            metrics.request_tps.observe((len(req.tokens) - 1) / (req.finished_at - req.first_token_at))

    def watch_disconnect(http: Request, req: GenerationRequest, events: asyncio.Queue) -> asyncio.Task:
        """A task that cancels the request as soon as its client hangs up (the body is read already,
        so the next ASGI message is the disconnect)."""

        async def watch():
            while (await http.receive())["type"] != "http.disconnect":
                await asyncio.sleep(0.05)  # a server that repeats empty body messages: no busy loop
            if req.finish_reason is None:
                scheduler.cancel(req)
                events.put_nowait(_GONE)

        return asyncio.create_task(watch())

    async def collect(http: Request, req: GenerationRequest, events: asyncio.Queue) -> Optional[str]:
        """Wait for a non-streamed request to finish; None when its client went away (it is cancelled)."""
        watcher = watch_disconnect(http, req, events)
        try:
            while True:
                event = await events.get()
                if event is _GONE:
                    return None
                if event.kind == "error":
                    raise APIError(500, event.message, type="server_error")
                if event.kind == "done":
                    observe(req)
                    return req.text
        finally:  # also when this handler is cancelled
            watcher.cancel()
            if req.finish_reason is None:
                scheduler.cancel(req)

    def stream(req: GenerationRequest, events: asyncio.Queue, chunk, usage_chunk):
        """SSE events: ``chunk(text, finish_reason)`` per delta, then ``usage_chunk()`` if not None, then ``[DONE]``."""

        async def gen():
            try:
                first = chunk(None, None)
                if first is not None:
                    yield first
                while True:
                    event = await events.get()
                    if event.kind == "delta":
                        yield chunk(event.text, None)
                    elif event.kind == "done":
                        observe(req)
                        yield chunk(None, event.finish_reason, final=True)
                        if usage_chunk is not None:
                            yield usage_chunk()
                        break
                    else:  # an engine error mid-stream: OpenAI-style error event, then the end
                        yield json.dumps({"error": {"message": event.message, "type": "server_error", "param": None, "code": None}})
                        break
                yield "[DONE]"
            finally:  # a client that went away (the task is cancelled) frees its row
                if req.finish_reason is None:
                    scheduler.cancel(req)

        return EventSourceResponse(gen(), ping=15)

    @app.post("/v1/completions")
    async def completions(body: P.CompletionRequest, http: Request):
        if body.echo:
            raise APIError(400, "echo is not supported", param="echo")
        check_request(body)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise APIError(400, f"one prompt per request, got {len(prompt)}", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            check_fits(prompt)
            ids = await asyncio.to_thread(prompts.text_ids, tokenizer, prompt)
        else:
            ids = list(prompt)
        max_tokens = check_common(body, len(ids))  # the length first: a long list is refused before it is walked
        vocab = engine.spec.vocab_size
        if not isinstance(prompt, str) and any(not 0 <= t < vocab for t in ids):
            raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
        req, events = submit(body, ids, max_tokens)
        rid, t = P.new_id("cmpl"), P.now()
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)

            def chunk(text, finish, final=False):
                if text is None and not final:
                    return None
                c = P.Completion(id=rid, created=t, model=model_name,
                                 choices=[P.CompletionChoice(text=text or "", finish_reason=finish)])
                return c.model_dump_json(exclude={"usage"})

            def usage_chunk():  # OpenAI: an extra chunk with no choices, before [DONE]
                return P.Completion(id=rid, created=t, model=model_name, choices=[], usage=usage(req)).model_dump_json()

            return stream(req, events, chunk, usage_chunk if include_usage else None)
        text = await collect(http, req, events)
        if text is None:
            return Response(status_code=499)  # nginx's "client closed request": nobody reads it
        return P.Completion(id=rid, created=t, model=model_name,
                            choices=[P.CompletionChoice(text=text, finish_reason=req.finish_reason)], usage=usage(req))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: P.ChatCompletionRequest, http: Request):
        if not getattr(tokenizer, "chat_template", None):
            raise APIError(400, f"model {model_name!r} has no chat template: use /v1/completions", param="messages")
        if body.max_tokens is None and body.max_completion_tokens is not None:
            body.max_tokens = body.max_completion_tokens
        check_request(body)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        check_fits(*(m["content"] for m in messages))
        try:
            ids = await asyncio.to_thread(prompts.chat_ids, tokenizer, messages)
        except Exception as e:  # a template may refuse an order of roles
            raise APIError(400, f"the chat template refused these messages: {e}", param="messages")
        max_tokens = check_common(body, len(ids))
        req, events = submit(body, ids, max_tokens)
        rid, t = P.new_id("chatcmpl"), P.now()
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)

            def chunk(text, finish, final=False):
                if final:
                    choice = P.ChatChunkChoice(delta=P.Delta(), finish_reason=finish)
                elif text is None:  # the opening chunk names the role
                    choice = P.ChatChunkChoice(delta=P.Delta(role="assistant", content=""))
                else:
                    choice = P.ChatChunkChoice(delta=P.Delta(content=text))
                c = P.ChatCompletionChunk(id=rid, created=t, model=model_name, choices=[choice]).model_dump(exclude={"usage"})
                c["choices"][0]["delta"] = {k: v for k, v in c["choices"][0]["delta"].items() if v is not None}
                return json.dumps(c)

            def usage_chunk():
                return P.ChatCompletionChunk(id=rid, created=t, model=model_name, choices=[], usage=usage(req)).model_dump_json()

            return stream(req, events, chunk, usage_chunk if include_usage else None)
        text = await collect(http, req, events)
        if text is None:
            return Response(status_code=499)
        return P.ChatCompletion(
            id=rid, created=t, model=model_name, usage=usage(req),
            choices=[P.ChatChoice(message=P.AssistantMessage(content=text), finish_reason=req.finish_reason)],
        )

    @app.get("/v1/models")
    @app.head("/v1/models", include_in_schema=False)
    async def models():
        return P.ModelList(data=[P.ModelCard(id=model_name, created=created)])

    @app.get("/v1/models/{model_id:path}")
    @app.head("/v1/models/{model_id:path}", include_in_schema=False)
    async def model(model_id: str):  # the official client's models.retrieve; a local folder's name holds slashes
        if model_id != model_name:
            raise APIError(404, f"model {model_id!r} is not served here (this server serves {model_name!r})",
                           type="not_found_error", param="model", code="model_not_found")
        return P.ModelCard(id=model_name, created=created)

    @app.get("/health")
    @app.head("/health", include_in_schema=False)
    async def health():
        body = {
            "status": "ok" if scheduler.alive else "down",
            "model": model_name,
            "batch_size": scheduler.batch_size,
            "queue_depth": scheduler.queue_depth,
            "max_batch": settings.max_batch,
            "max_queue": settings.max_queue,
            "free_rows": scheduler.free_rows,
            "generated_tokens": scheduler.generated_tokens,
            "kv_bytes": scheduler.kv_bytes,
            "kv_full_bytes": scheduler.kv_full_bytes,
            "finished": scheduler.outcomes(),
            "failed_requests": scheduler.failed,
            "last_error": scheduler.last_error,
        }
        return JSONResponse(body, status_code=200 if scheduler.alive else 503)

    @app.get("/metrics")
    @app.head("/metrics", include_in_schema=False)
    async def prometheus_metrics():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
