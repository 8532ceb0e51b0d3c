"""An OpenAI-compatible HTTP server over one Generator (the public API), on FastAPI and uvicorn.

    collocate serve --model qwen2.5-coder-1.5b --heads runs/q15 --port 8000 --api-key KEY
    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="KEY")
    client.chat.completions.create(model="qwen2.5-coder-1.5b", messages=[...], extra_body={"mode": "verify"})

POST /v1/chat/completions and /v1/completions (with `stream`: server-sent events), GET /v1/models,
/v1/models/{id}, /health and /metrics (Prometheus). Beyond OpenAI's fields, the body may set any of
collocate's decoding options (options.DecodeConfig: `mode`, `tree_size`, `threshold`, ...); `usage` adds
`tau` (tokens per forward pass) and `steps`.

Requests take turns on the one engine, first come first served. At most `max_queue` wait behind the one
it runs; past that a request gets 429 at once, and one that waited `request_timeout` seconds gets 503, each
with Retry-After. Answers run a few steps per thread hop, so a client that goes away (streaming or not)
frees the engine within a few steps. Bad input gets an OpenAI-style JSON error with a 4xx status (a body
over `max_body` bytes: 413), fields that would change the answer and that collocate cannot honour are
refused by name, and the server keeps serving. With an API key, every /v1 route needs
`Authorization: Bearer KEY` (401 otherwise); /health and /metrics stay open. One access-log line a request
goes to stderr.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import math
import signal
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, create_model
from starlette.exceptions import HTTPException as StarletteHTTPException

from .api import Generator, TextStream
from .decode import DecodeConfig, DecodeResult
from .errors import BundleError, DecodeError
from .options import api_fields, from_request

FINISH = {"eos": "stop", "stop": "stop", "length": "length"}
ROLES = ("system", "developer", "user", "assistant")
# OpenAI fields that would change the answer and that collocate does not do, with the values that ask for
# nothing (those pass): anything else is refused by name, never silently ignored
REFUSED = {"tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []), "function_call": (None, "none"),
           "response_format": (None, {"type": "text"}), "logit_bias": (None, {}), "logprobs": (None, False),
           "top_logprobs": (None, 0), "echo": (None, False), "suffix": (None, ""), "best_of": (None, 1),
           "presence_penalty": (None, 0), "frequency_penalty": (None, 0), "n": (None, 1)}
WHY = {"n": "n must be 1: collocate returns one answer per request", "logprobs": "logprobs are not supported",
       "presence_penalty": "presence and frequency penalties are not supported",
       "frequency_penalty": "presence and frequency penalties are not supported",
       "tools": "tools (function calling) are not supported", "tool_choice": "tool_choice is not supported (no tools)"}
STEP_SECONDS = 0.02  # an answer runs this long per thread hop between checks for a client gone away


@dataclass
class ServeConfig:
    """The server's own settings (decoding options come with each request)."""
    name: str  # the model name clients ask for
    default_max_tokens: int = 256  # a request without max_tokens: at most this many (and what the context holds)
    max_queue: int = 16  # requests that may wait for the engine behind the one it runs; past that: 429
    request_timeout: float = 600.0  # seconds a request may wait for the engine; past that: 503
    max_body: int = 4 << 20  # bytes of a request body; past that: 413 (a 32K-token prompt is ~130 KB)
    api_key: str | None = None  # every /v1 route needs it as a Bearer token


class ApiError(Exception):
    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.param, self.code, self.headers = status, param, code, headers


class OpenAIFields(BaseModel):
    """OpenAI's fields that are not decoding options, beside those in REFUSED (refused unless they ask for
    nothing); those that cannot change the answer (user, metadata, ...) are ignored."""
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    stream: bool = False
    stream_options: dict | None = None


# with the fields it refuses (REFUSED) and every DecodeConfig field the server takes (options.py: OpenAI's
# own names for temperature, top_p, seed and stop, with OpenAI's defaults; collocate's mode, tree_size, ...)
Options = create_model("Options", __base__=OpenAIFields, **{name: (Any, None) for name in REFUSED}, **api_fields())


class ChatRequest(Options):
    messages: list[Any] = Field(min_length=1)


class CompletionRequest(Options):
    prompt: str | list[str] | list[int] | list[list[int]]  # (OpenAI's four forms: text or token ids, one or a list)


def decode_config(req: Options, cfg: ServeConfig, default_mode: str) -> DecodeConfig:
    """The request's DecodeConfig; what we cannot honour is a 400, never silently ignored."""
    for name, harmless in REFUSED.items():
        if getattr(req, name) not in harmless:
            raise ApiError(WHY.get(name, f"{name} is not supported by collocate (it would change the answer)"),
                           param=name)
    max_tokens = req.max_completion_tokens or req.max_tokens
    if max_tokens is not None and max_tokens <= 0:
        raise ApiError(f"max_tokens must be >= 1, got {max_tokens}", param="max_tokens")
    return from_request(req.model_dump(), mode=req.mode or default_mode,
                        max_new_tokens=max_tokens or cfg.default_max_tokens)


def check_text(text: str, param: str) -> str:
    if any(0xD800 <= ord(c) <= 0xDFFF for c in text):
        raise ApiError(f"{param} holds a lone UTF-16 surrogate, which is not text", param=param)
    return text


def message_text(content) -> str:
    """OpenAI content: a string, or a list of parts, every one of them text."""
    if isinstance(content, str):
        return check_text(content, "messages")
    if isinstance(content, list) and content:
        kinds = [p.get("type") if isinstance(p, dict) else type(p).__name__ for p in content]
        other = [k for k in kinds if k != "text"]
        if other:
            raise ApiError(f"message content of type '{other[0]}' is not supported: collocate reads text only",
                           param="messages")
        return check_text("".join(str(p.get("text", "")) for p in content), "messages")
    raise ApiError("each message's content must be a string or a list of text parts", param="messages")


def chat_messages(messages: list) -> list[dict]:
    out = []
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ApiError("each message needs a role and a content", param="messages")
        if m["role"] not in ROLES:
            raise ApiError(f"unknown message role '{m['role']}'; collocate takes {', '.join(ROLES)}", param="messages")
        out.append({"role": "system" if m["role"] == "developer" else m["role"], "content": message_text(m["content"])})
    return out


def error_body(message: str, status: int, param: str | None = None, code: str | None = None) -> dict:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def usage(n_prompt: int, r: DecodeResult) -> dict:
    return {"prompt_tokens": n_prompt, "completion_tokens": r.stats.new_tokens,
            "total_tokens": n_prompt + r.stats.new_tokens, "tau": round(r.stats.tau, 4), "steps": r.stats.steps}


def completion_body(kind: str, rid: str, model: str, r: DecodeResult, n_prompt: int) -> dict:
    choice = {"index": 0, "finish_reason": FINISH[r.finish_reason]}
    if kind == "chat":
        choice["message"] = {"role": "assistant", "content": r.text}
    else:
        choice.update(text=r.text, logprobs=None)
    return {"id": rid, "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": int(time.time()), "model": model, "choices": [choice], "usage": usage(n_prompt, r)}


def chunk(kind: str, rid: str, model: str, text: str | None, finish: str | None, *, first: bool = False) -> dict:
    """One server-sent event's body: a chat delta (the first one names the role) or a completion's text."""
    if kind == "chat":
        delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
    else:
        choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
    return {"id": rid, "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
            "created": int(time.time()), "model": model, "choices": [choice]}


def sse(body) -> str:
    return f"data: {json.dumps(body)}\n\n"


class Metrics:
    """What /metrics exports, in one registry per server (Prometheus text format)."""

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("collocate_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        self.waiting = Gauge("collocate_queue_depth", "requests waiting for the engine", registry=r)
        self.running = Gauge("collocate_requests_running", "requests the engine is answering", registry=r)
        self.ttft = Histogram("collocate_time_to_first_token_seconds", "from arrival to the first answer text",
                              buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 300), registry=r)
        self.latency = Histogram("collocate_request_seconds", "from arrival to the last token",
                                 buckets=(.05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 300, 900), registry=r)
        self.tok_s = Histogram("collocate_decode_tokens_per_second", "an answer's tokens over its decoding time",
                               buckets=(10, 25, 50, 100, 200, 400, 800, 1600, 3200), registry=r)
        self.tau = Histogram("collocate_tokens_per_step", "an answer's tokens per backbone pass (tau: the accepted "
                             "tokens of a step)", buckets=(1, 1.25, 1.5, 2, 2.5, 3, 3.5, 4, 5, 6, 8, 16), registry=r)
        self.prompt_tokens = Counter("collocate_prompt_tokens", "prompt tokens of answered requests", registry=r)
        self.completion_tokens = Counter("collocate_completion_tokens", "tokens answered", registry=r)

    def answered(self, n_prompt: int, r: DecodeResult, arrived: float) -> None:
        self.latency.observe(time.perf_counter() - arrived)
        self.prompt_tokens.inc(n_prompt)
        self.completion_tokens.inc(r.stats.new_tokens)
        self.tau.observe(r.stats.tau)
        if r.stats.seconds > 0:
            self.tok_s.observe(r.stats.tok_per_s)


class ClientGone(Exception):
    """The client hung up: the answer stops and the engine is freed."""


class Service:
    """The one engine, its admission and its queue: requests are checked first, then take turns on it."""

    def __init__(self, generator: Generator, cfg: ServeConfig, metrics: Metrics):
        self.generator, self.cfg, self.metrics = generator, cfg, metrics
        self.default_mode = "verify" if generator.decoder.bundle is not None else "ar"
        self.lock = asyncio.Lock()  # waiters are served first come, first served
        self.admitted = 0  # requests admitted and not yet answered (the one running and those waiting)
        self.mean_seconds = 1.0  # a recent request's time on the engine, for Retry-After
        self.tokenizing = threading.Lock()  # (a tokenizer is used by one thread at a time)

    async def encode(self, fn, arg, *, param: str) -> list[int]:
        """fn(arg), tokenizing in a worker thread, so that a large prompt does not stall the event loop."""
        def run():
            with self.tokenizing:
                return fn(arg)
        try:
            return await anyio.to_thread.run_sync(run)
        except DecodeError as e:
            raise ApiError(str(e), param=param) from None

    def check(self, req: Options, ids: list[int]) -> DecodeConfig:
        """Everything that can be refused is refused here, before the request waits for the engine."""
        if req.model and req.model != self.cfg.name:
            raise ApiError(f"model '{req.model}' is not served here; this server serves '{self.cfg.name}'",
                           404, "model", "model_not_found")
        try:
            cfg = decode_config(req, self.cfg, self.default_mode)
            self.generator.decoder.validate(ids, cfg)
            self.generator.decoder.rule_for(cfg)
        except (DecodeError, BundleError, ValueError) as e:
            raise ApiError(str(e)) from None
        capacity, asked = self.generator.decoder.backend.capacity, req.max_completion_tokens or req.max_tokens
        if asked is not None and len(ids) + asked > capacity:  # (without max_tokens: what fits, then "length")
            raise ApiError(f"this server's context holds {capacity} tokens (collocate serve --max-len N); the "
                           f"prompt has {len(ids)} and max_tokens asks for {asked} more: ask for at most "
                           f"{capacity - len(ids)}", param="max_tokens")
        return cfg

    def retry_after(self) -> dict:
        return {"Retry-After": str(max(1, math.ceil(self.mean_seconds * max(self.admitted, 1))))}

    def admit(self) -> None:
        if self.admitted > self.cfg.max_queue:
            raise ApiError(f"the server is busy: {self.admitted} requests are ahead of this one, and at most "
                           f"{self.cfg.max_queue} may wait (collocate serve --max-queue); retry later", 429,
                           code="rate_limit_exceeded", headers=self.retry_after())
        self.admitted += 1
        self.metrics.waiting.inc()

    def leave(self) -> None:
        self.admitted -= 1

    async def engine(self) -> float:
        """Wait for the engine (at most request_timeout seconds); returns when it was taken."""
        try:
            await asyncio.wait_for(self.lock.acquire(), self.cfg.request_timeout)
        except asyncio.TimeoutError:
            raise ApiError(f"the request waited {self.cfg.request_timeout:g} s for the engine "
                           "(collocate serve --request-timeout); retry later", 503, code="timeout",
                           headers=self.retry_after()) from None
        finally:
            self.metrics.waiting.dec()
        self.metrics.running.inc()
        return time.perf_counter()

    def free(self, taken: float) -> None:
        self.mean_seconds = 0.8 * self.mean_seconds + 0.2 * (time.perf_counter() - taken)
        self.metrics.running.dec()
        self.lock.release()

    async def answer(self, req: Options, ids: list[int], request: Request, kind: str):
        arrived = request.state.arrived
        cfg = self.check(req, ids)
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        self.admit()
        if req.stream:
            include_usage = bool((req.stream_options or {}).get("include_usage"))
            return StreamingResponse(self.events(ids, cfg, request, kind, rid, include_usage),
                                     media_type="text/event-stream")
        try:
            taken = await self.engine()
        except ApiError:
            self.leave()
            raise
        r = await self.session(taken, ids, cfg, request, lambda text: None)
        self.metrics.answered(len(ids), r, arrived)
        request.state.log = log_fields(len(ids), r)
        return JSONResponse(completion_body(kind, rid, self.cfg.name, r, len(ids)))

    async def session(self, taken: float, ids: list[int], cfg: DecodeConfig, request: Request, on_text):
        """An answer on the engine taken; the engine is freed only once its last step has returned."""
        try:
            return await self.run(ids, cfg, request, on_text)
        finally:
            self.free(taken)
            self.leave()

    async def run(self, ids: list[int], cfg: DecodeConfig, request: Request, on_text) -> DecodeResult:
        """The answer, a few steps per thread hop; a client gone away ends it (ClientGone) at the next hop."""
        steps = self.generator.decoder.stream(ids, cfg)
        text = TextStream(self.generator.tokenizer, cfg.stop)
        first = True
        try:
            while True:
                if await request.is_disconnected():
                    raise ClientGone
                pieces, result = await anyio.to_thread.run_sync(advance, steps, text)
                if pieces and first:
                    self.metrics.ttft.observe(time.perf_counter() - request.state.arrived)
                    first = False
                for piece in pieces:
                    await on_text(piece) if asyncio.iscoroutinefunction(on_text) else on_text(piece)
                if result is not None:
                    return result
        finally:
            steps.close()

    async def events(self, ids, cfg, request: Request, kind: str, rid: str, include_usage: bool):
        """The answer as server-sent events; a client that has gone away ends it at the next hop. An error
        after the events began (a timeout in the queue) is sent as an event, as OpenAI's servers do."""
        model, queue, task = self.cfg.name, asyncio.Queue(), None
        try:
            try:
                taken = await self.engine()
            except ApiError as e:
                yield sse(error_body(str(e), e.status, e.param, e.code))
                return
            # the answer runs as a task of its own, which frees the engine when its last step returns, however
            # this generator ends (a client gone cancels it here, and the task stops at its next hop)
            task = asyncio.ensure_future(self.session(taken, ids, cfg, request, queue.put))
            if kind == "chat":
                yield sse(chunk(kind, rid, model, None, None, first=True))
            while not (task.done() and queue.empty()):
                getter = asyncio.ensure_future(queue.get())
                await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield sse(chunk(kind, rid, model, getter.result(), None))
                else:
                    getter.cancel()
            try:
                r = task.result()
            except ClientGone:
                return
            except Exception as e:  # noqa: BLE001  (the status line is sent: say it in the stream)
                yield sse(error_body(f"{type(e).__name__}: {e}", 500))
                return
            yield sse(chunk(kind, rid, model, None, FINISH[r.finish_reason]))
            if include_usage:
                yield sse({**chunk(kind, rid, model, None, None), "choices": [], "usage": usage(len(ids), r)})
            yield "data: [DONE]\n\n"
            self.metrics.answered(len(ids), r, request.state.arrived)
            request.state.log = log_fields(len(ids), r)
        finally:
            if task is None:
                self.leave()
            elif not task.done():
                task.cancel()


def advance(steps, text: TextStream) -> tuple[list[str], DecodeResult | None]:
    """Run the decode for about STEP_SECONDS (at least one step): the new text pieces, and the result at the end."""
    pieces, start = [], time.perf_counter()
    while True:
        try:
            piece = text.add(next(steps))
        except StopIteration as end:
            rest = text.rest()
            return pieces + ([rest] if rest else []), end.value
        if piece:
            pieces.append(piece)
        if time.perf_counter() - start >= STEP_SECONDS:
            return pieces, None


def log_fields(n_prompt: int, r: DecodeResult) -> str:
    return f"prompt {n_prompt} completion {r.stats.new_tokens} tau {r.stats.tau:.2f} finish {r.finish_reason}"


class BodyTooLarge(Exception):
    pass


def guard(app, cfg: ServeConfig, metrics: Metrics):
    """The ASGI app around FastAPI: 413 for a body over max_body (read no further), the arrival time, one
    access-log line a request, and the requests counter by route and status (the app's own fixed paths;
    any other path counts as "other")."""
    routes = {r.path for r in app.routes if "{" not in r.path}

    async def send_json(send, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
        await send({"type": "http.response.body", "body": data})

    async def wrapped(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)
        arrived, status, seen = time.perf_counter(), [500], [0]
        scope.setdefault("state", {})["arrived"] = arrived
        route = scope["path"] if scope["path"] in routes else "other"

        async def limited():
            message = await receive()
            if message["type"] == "http.request":
                seen[0] += len(message.get("body", b""))
                if seen[0] > cfg.max_body:
                    raise BodyTooLarge
            return message

        async def watched(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        too_large = error_body(f"the request body is over {cfg.max_body} bytes (collocate serve --max-body)", 413)
        length = dict(scope["headers"]).get(b"content-length", b"0")
        try:
            if length.isdigit() and int(length) > cfg.max_body:
                status[0] = 413
                await send_json(send, 413, too_large)
            else:
                await app(scope, limited, watched)
        except BodyTooLarge:
            status[0] = 413
            await send_json(send, 413, too_large)
        finally:
            metrics.requests.labels(route, str(status[0])).inc()
            client = (scope.get("client") or ("-",))[0]
            extra = scope["state"].get("log", "")
            print(f"collocate: {client} \"{scope['method']} {scope['path']}\" {status[0]} "
                  f"{time.perf_counter() - arrived:.3f}s {extra}".rstrip(), file=sys.stderr, flush=True)

    return wrapped


def add_error_handlers(app: FastAPI) -> None:
    """Every error as OpenAI's JSON: 4xx for the request's fault, 500 for ours; the server goes on."""
    @app.exception_handler(ApiError)
    async def api_error(_, e: ApiError):
        return JSONResponse(error_body(str(e), e.status, e.param, e.code), status_code=e.status, headers=e.headers)

    @app.exception_handler(ClientGone)
    async def client_gone(_, e: ClientGone):  # (nobody reads it; 499 is how servers log a client that left)
        return Response(status_code=499)

    @app.exception_handler(DecodeError)
    async def decode_error(_, e: DecodeError):
        return JSONResponse(error_body(str(e), 400), status_code=400)

    @app.exception_handler(Exception)
    async def server_error(_, e: Exception):
        return JSONResponse(error_body(f"{type(e).__name__}: {e}", 500), status_code=500)

    @app.exception_handler(RequestValidationError)
    async def bad_request(_, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        msg = "malformed JSON body" if first.get("type") == "json_invalid" else \
            f"{where or 'body'}: {first.get('msg', 'invalid request')}"
        return JSONResponse(error_body(msg, 400, where or None), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, e: StarletteHTTPException):
        return JSONResponse(error_body(str(e.detail), e.status_code), status_code=e.status_code)


def build_app(generator: Generator, *, name: str | None = None, default_max_tokens: int = 256,
              config: ServeConfig | None = None):
    """The server around one Generator (an ASGI app). Its decoder runs one request at a time."""
    cfg = config or ServeConfig(name=name, default_max_tokens=default_max_tokens)
    metrics = Metrics()
    service = Service(generator, cfg, metrics)
    started = int(time.time())
    app = FastAPI(title="collocate", version="1")
    app.state.service = service
    add_error_handlers(app)

    def authorized(request: Request) -> None:
        if cfg.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {cfg.api_key}".encode()):
            raise ApiError("missing or incorrect API key: send Authorization: Bearer KEY", 401,
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    v1 = [Depends(authorized)]
    model_card = {"id": cfg.name, "object": "model", "created": started, "owned_by": "collocate"}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": cfg.name, "queue": max(service.admitted - 1, 0)}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=v1)
    async def models():
        return {"object": "list", "data": [model_card]}

    @app.get("/v1/models/{model_id:path}", dependencies=v1)
    async def model(model_id: str):
        if model_id != cfg.name:
            raise ApiError(f"model '{model_id}' is not served here; this server serves '{cfg.name}'", 404,
                           "model", "model_not_found")
        return model_card

    @app.post("/v1/chat/completions", dependencies=v1)
    async def chat(req: ChatRequest, request: Request):
        ids = await service.encode(generator.encode_messages, chat_messages(req.messages), param="messages")
        return await service.answer(req, ids, request, "chat")

    @app.post("/v1/completions", dependencies=v1)
    async def completions(req: CompletionRequest, request: Request):
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            if len(prompt) != 1:
                raise ApiError("prompt must be one text or one list of token ids (a list of one is accepted)",
                               param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, list):  # token ids, as the model reads them (no template, nothing added)
            vocab = generator.decoder.model.get_input_embeddings().num_embeddings
            if not prompt or not all(0 <= t < vocab for t in prompt):
                raise ApiError(f"a prompt of token ids needs at least one, each in 0..{vocab - 1}", param="prompt")
            return await service.answer(req, prompt, request, "completion")
        if not prompt.strip():
            raise ApiError("prompt is empty", param="prompt")
        check_text(prompt, "prompt")
        ids = await service.encode(lambda text: generator.encode(text, chat=False), prompt, param="prompt")
        return await service.answer(req, ids, request, "completion")

    outer = guard(app, cfg, metrics)
    outer.state = app.state  # (what tests and callers read: app.state.service)
    return outer


def serve(generator: Generator, config: ServeConfig, *, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run the server until SIGINT/SIGTERM; in-flight requests get up to 30 s to finish. The port is bound
    before anything is said or captured, so a busy port is a one-line error."""
    import uvicorn

    server_config = uvicorn.Config(build_app(generator, config=config), host=host, port=port, log_level="warning",
                                   timeout_graceful_shutdown=30)
    try:
        sock = server_config.bind_socket()
    except (OSError, SystemExit) as e:  # (uvicorn exits on a bind failure after logging it)
        raise ValueError(f"cannot listen on {host}:{port} ({e}): is another server there? choose --port") from None
    dec = generator.decoder
    start, default_mode = time.perf_counter(), server_config.app.state.service.default_mode
    for temperature in (0.0, 1.0):  # every graph of the default mode, greedy and sampled, before the first client
        dec.prepare(DecodeConfig(mode=default_mode, temperature=temperature))
    if dec.backend.captures:
        print(f"collocate: captured {len(dec.backend.graphs)} graphs for {dec.backend.capacity} tokens of context "
              f"in {time.perf_counter() - start:.0f} s", flush=True)
    heads = f"heads k={dec.bundle.k}, {dec.bundle.config.drafter}" if dec.bundle is not None else "no heads"
    auth = "; API key required" if config.api_key else ""
    print(f"collocate: serving '{config.name}' ({heads}; engine {dec.backend.describe()}; default mode "
          f"{default_mode}; context {dec.backend.capacity}{auth}) at http://{host}:{port}/v1", flush=True)
    # uvicorn shuts down gracefully on SIGTERM, then raises the signal again with the previous handler in
    # place; by then every request is answered, so that handler just lets the process end with status 0
    signal.signal(signal.SIGTERM, lambda *_: None)
    uvicorn.Server(server_config).run(sockets=[sock])
