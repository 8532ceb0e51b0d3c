"""An OpenAI-compatible HTTP server over one Generator (the public API), on FastAPI and uvicorn.

    collocate serve --model qwen2.5-coder-1.5b --heads runs/q15 --port 8000
    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")
    client.chat.completions.create(model="qwen2.5-coder-1.5b", messages=[...], extra_body={"mode": "verify"})

POST /v1/chat/completions and /v1/completions (with `stream`: server-sent events), GET /v1/models and
/health. Beyond OpenAI's fields, the body may set any of collocate's decoding options (options.DecodeConfig:
`mode`, `tree_size`, `threshold`, ...); `usage` adds `tau` (tokens per forward pass) and `steps`. Requests take turns on the one engine (an asyncio lock, first come first
served); a streamed answer runs one step per thread hop, so a client that goes away frees the engine at
the next step. Bad input gets an OpenAI-style JSON error with a 4xx status, and the server keeps serving.
"""
from __future__ import annotations

import asyncio
import json
import signal
import time
import uuid
from dataclasses import dataclass
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, create_model
from starlette.exceptions import HTTPException as StarletteHTTPException

from .api import Generator
from .bundle import BundleError
from .decode import DecodeConfig, DecodeError, DecodeResult
from .options import api_fields, from_request

FINISH = {"eos": "stop", "stop": "stop", "length": "length"}


class ApiError(Exception):
    def __init__(self, message: str, status: int = 400, param: str | None = None):
        super().__init__(message)
        self.status, self.param = status, param


class OpenAIFields(BaseModel):
    """The OpenAI fields that are not decoding options; OpenAI fields we do not act on and that cannot
    change the answer (user, metadata, ...) are ignored."""
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    stream: bool = False
    stream_options: dict | None = None
    n: int = 1
    logprobs: Any = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0


# and every DecodeConfig field the server takes (options.py: OpenAI's own names for temperature, top_p,
# seed and stop, with OpenAI's defaults; collocate's mode, tree_size, ... beside them)
Options = create_model("Options", __base__=OpenAIFields, **api_fields())


class ChatRequest(Options):
    messages: list[dict] = Field(min_length=1)


class CompletionRequest(Options):
    prompt: str | list[str]


@dataclass
class Served:
    generator: Generator
    name: str
    default_mode: str
    default_max_tokens: int = 256


def decode_config(req: Options, served: Served) -> DecodeConfig:
    """The request's DecodeConfig; what we cannot honour is a 400, never silently ignored."""
    if req.n != 1:
        raise ApiError("n must be 1: collocate returns one answer per request", param="n")
    if req.logprobs:
        raise ApiError("logprobs are not supported", param="logprobs")
    if req.presence_penalty or req.frequency_penalty:
        raise ApiError("presence and frequency penalties are not supported", param="presence_penalty")
    max_tokens = req.max_completion_tokens or req.max_tokens
    if max_tokens is not None and max_tokens <= 0:
        raise ApiError(f"max_tokens must be >= 1, got {max_tokens}", param="max_tokens")
    return from_request(req.model_dump(), mode=req.mode or served.default_mode,
                        max_new_tokens=max_tokens or served.default_max_tokens)


def usage(n_prompt: int, r: DecodeResult) -> dict:
    return {"prompt_tokens": n_prompt, "completion_tokens": r.stats.new_tokens,
            "total_tokens": n_prompt + r.stats.new_tokens, "tau": round(r.stats.tau, 4), "steps": r.stats.steps}


def message_text(content) -> str:
    """OpenAI content: a string, or a list of parts of which the text ones count."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    raise ApiError("each message's content must be a string or a list of text parts", param="messages")


def chat_messages(messages: list[dict]) -> list[dict]:
    out = []
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ApiError("each message needs a role and a content", param="messages")
        out.append({"role": m["role"], "content": message_text(m["content"])})
    return out


def error_body(message: str, status: int, param: str | None = None) -> dict:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


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


class Service:
    """The one engine and its queue: requests are checked first, then take turns on the decoder."""

    def __init__(self, served: Served):
        self.served, self.generator = served, served.generator
        self.lock = asyncio.Lock()  # waiters are served first come, first served

    def check(self, req: Options, ids: list[int]) -> DecodeConfig:
        """Everything that can be refused is refused here, before the engine is taken."""
        try:
            cfg = decode_config(req, self.served)
            self.generator.decoder.validate(ids, cfg)
            self.generator.decoder.rule_for(cfg)
        except (DecodeError, BundleError, ValueError) as e:
            raise ApiError(str(e)) from None
        capacity, asked = self.generator.decoder.backend.capacity, req.max_completion_tokens or req.max_tokens
        if asked is not None and len(ids) + asked > capacity:  # (without max_tokens: what fits, then "length")
            raise ApiError(f"this server's context holds {capacity} tokens (collocate serve --max-len N); the "
                           f"prompt has {len(ids)} and max_tokens asks for {asked} more: ask for at most "
                           f"{capacity - len(ids)}", param="max_tokens")
        if req.model and req.model != self.served.name:
            raise ApiError(f"model '{req.model}' is not served here; this server serves '{self.served.name}'",
                           404, "model")
        return cfg

    async def answer(self, req: Options, ids: list[int], request: Request, kind: str):
        cfg = self.check(req, ids)
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        if req.stream:
            include_usage = bool((req.stream_options or {}).get("include_usage"))
            return StreamingResponse(self.events(ids, cfg, request, kind, rid, include_usage),
                                     media_type="text/event-stream")
        async with self.lock:
            r = await anyio.to_thread.run_sync(lambda: self.generator.decoder.generate(ids, cfg))
        return JSONResponse(completion_body(kind, rid, self.served.name, r, len(ids)))

    async def events(self, ids, cfg, request: Request, kind: str, rid: str, include_usage: bool):
        """The answer as server-sent events, one engine step per thread hop; a client that has gone away
        ends it at the next step (the finally frees the engine)."""
        model = self.served.name
        async with self.lock:
            pieces = self.generator.stream(ids, cfg)
            try:
                if kind == "chat":
                    yield sse(chunk(kind, rid, model, None, None, first=True))
                while True:
                    if await request.is_disconnected():
                        return
                    done, value = await anyio.to_thread.run_sync(next_piece, pieces)
                    if done:
                        break
                    yield sse(chunk(kind, rid, model, value, None))
                yield sse(chunk(kind, rid, model, None, FINISH[value.finish_reason]))
                if include_usage:
                    yield sse({**chunk(kind, rid, model, None, None), "choices": [], "usage": usage(len(ids), value)})
                yield "data: [DONE]\n\n"
            finally:
                pieces.close()


def add_error_handlers(app: FastAPI) -> None:
    """Every error as OpenAI's JSON: 4xx for the request's fault, 500 for ours; the server goes on."""
    @app.exception_handler(ApiError)
    async def api_error(_, e: ApiError):
        return JSONResponse(error_body(str(e), e.status, e.param), status_code=e.status)

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


def build_app(generator: Generator, *, name: str, default_max_tokens: int = 256) -> FastAPI:
    """The server around one Generator. Its decoder runs one request at a time."""
    default_mode = "verify" if generator.decoder.bundle is not None else "ar"
    served = Served(generator, name, default_mode, default_max_tokens)
    service = Service(served)
    app = FastAPI(title="collocate", version="1")
    app.state.served = served
    add_error_handlers(app)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": name}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "collocate"}]}

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        try:
            ids = generator.encode_messages(chat_messages(req.messages))
        except DecodeError as e:
            raise ApiError(str(e), param="messages") from None
        return await service.answer(req, ids, request, "chat")

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        prompt = req.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise ApiError("prompt must be one string (a list of one is accepted)", param="prompt")
            prompt = prompt[0]
        if not prompt:
            raise ApiError("prompt is empty", param="prompt")
        return await service.answer(req, generator.encode(prompt, chat=False), request, "completion")

    return app


def next_piece(pieces) -> tuple[bool, Any]:
    """One step of a text stream: (False, text) or, at its end, (True, the DecodeResult)."""
    try:
        return False, next(pieces)
    except StopIteration as end:
        return True, end.value


def serve(generator: Generator, *, name: str, host: str = "127.0.0.1", port: int = 8000,
          default_max_tokens: int = 256) -> None:
    """Run the server until SIGINT/SIGTERM; in-flight requests get up to 30 s to finish."""
    import uvicorn

    app = build_app(generator, name=name, default_max_tokens=default_max_tokens)
    dec = generator.decoder
    start = time.perf_counter()
    for temperature in (0.0, 1.0):  # every graph of the default mode, greedy and sampled, before the first client
        dec.prepare(DecodeConfig(mode=app.state.served.default_mode, temperature=temperature))
    if dec.backend.captures:
        print(f"collocate: captured {len(dec.backend.graphs)} graphs for {dec.backend.capacity} tokens of context "
              f"in {time.perf_counter() - start:.0f} s", flush=True)
    heads = f"heads k={dec.bundle.k}, {dec.bundle.config.drafter}" if dec.bundle is not None else "no heads"
    print(f"collocate: serving '{name}' ({heads}; engine {dec.backend.describe()}; default mode "
          f"{app.state.served.default_mode}) at http://{host}:{port}/v1", flush=True)
    # uvicorn shuts down gracefully on SIGTERM, then raises the signal again with the previous handler in
    # place; by then every request is answered, so that handler just lets the process end with status 0
    signal.signal(signal.SIGTERM, lambda *_: None)
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=30)
