"""The OpenAI-compatible HTTP server (SPEC §6): an adapter from the OpenAI schema to `Engine`.

`create_app(engine)` builds a FastAPI app whose lifespan starts one engine loop (`AsyncEngine`) and
stops it gracefully. Handlers parse and validate the body themselves (strict pydantic), so every
bad request gets OpenAI's error JSON with the right status (400/401/404/413/429/503), never
FastAPI's 422 or a 500. `minimind serve` is `run(args)`.

Guard rails against one client hurting the others: a request's sequences (prompts x n) are one
job, admitted fairly with other requests' and capped in rows (`--max-request-rows`); a client that
hangs up aborts all of them; prompts are bounded in characters before they are tokenized, and
tokenized off the event loop; request heads and bodies have deadlines and open connections a cap
(`infer.connections`). SIGINT/SIGTERM drains: new requests get 503, running ones get a grace
period, then end with finish_reason "length" and `[DONE]` (or a 503 error when not streaming).
"""

import asyncio
import base64
import gc
import hmac
import json
import logging
import signal
import socket
import struct
import sys
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from infer.async_engine import AsyncEngine, EngineStopped, QueueFull, RequestFailed
from infer.connections import (
    BODY_TIMEOUT,
    HEADER_TIMEOUT,
    ConnectionGuard,
    GracefulServer,
    ServerThread,
    log_to_stderr,
    uvicorn_config,
)
from infer.engine import ContextLengthError, Delta, Engine
from infer.protocol import ChatRequest, CompletionRequest, EmbeddingRequest
from infer.sampling import SamplingParams
from infer.think import ThinkSplitter, split_reasoning
from infer.tokens import token_table
from infer.tuning import engine_threads, usable_cores

MAX_BODY_BYTES = 4 * 1024 * 1024
GRACE = 10.0  # seconds a shutdown lets running sequences finish

log = logging.getLogger(__name__)


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


def _validation_error(e: ValidationError) -> APIError:
    errors = e.errors(include_url=False)
    if errors[0]["type"] == "json_invalid":
        return APIError(400, f"the body is not valid JSON: {errors[0]['msg']}", code="invalid_json")
    # a union reports an error per branch, the first being its first branch's ("prompt": [] -> "Input should
    # be a valid string"); of the first field's errors, report the branch that got furthest into the value
    field = errors[0]["loc"][:1]
    err = max((er for er in errors if er["loc"][:1] == field), key=_progress)
    where = ".".join(_path(err["loc"]))
    msg = err["msg"].removeprefix("Value error, ")  # a ValueError from one of our validators
    return APIError(400, f"{where}: {msg}" if where else msg, param=where or None, code="invalid_value")


def _path(loc) -> list[str]:
    """Field names and indices only: a union's branch shows in `loc` as its type ("stop.list[str].1")."""
    return [str(p) for p in loc if isinstance(p, int) or p.isidentifier() and p not in _TYPE_NAMES]


def _progress(err) -> tuple:
    """Deeper, then at later indices, then past the type check: ties go to the earlier error (max keeps it)."""
    path = _path(err["loc"])
    return len(path), [int(p) for p in path if p.isdigit()], not err["type"].endswith("_type")


_TYPE_NAMES = {"str", "int", "float", "bool", "list", "dict", "none"}


def run_name(ckpt) -> str:
    """The served model id: a run's name for DIR/step-N, else the checkpoint directory's name."""
    path = Path(ckpt).resolve()
    return path.parent.name if path.name.startswith("step-") else path.name


def create_app(engine: Engine, model_name: str = "minimind", api_key: str | None = None, max_queue: int = 256,
               max_body_bytes: int = MAX_BODY_BYTES, max_prompt_chars: int | None = None,
               log_interval: float = 10.0, threads: int | None = None) -> FastAPI:
    """`max_prompt_chars`: longer prompts are refused before tokenizing (default: the most characters
    that could fit the context). `log_interval`: seconds between throughput lines under load.
    `threads`: torch threads, set from the engine thread when it starts (default: left as they are;
    `minimind serve` passes `infer.tuning.engine_threads`)."""
    loop_engine = AsyncEngine(engine, max_queue=max_queue, log_interval=log_interval, threads=threads)
    expected_auth = f"Bearer {api_key}".encode() if api_key is not None else None

    @asynccontextmanager
    async def lifespan(app):
        loop_engine.start()
        for line in (_layout(engine, threads or torch.get_num_threads()), engine.dtype_report,
                     engine.warmup_report, engine.graphs_report):
            if line:
                log.info(line)
        yield
        await asyncio.to_thread(loop_engine.stop)

    app = FastAPI(title="minimind", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = loop_engine
    _add_error_handlers(app)
    if expected_auth is not None:
        app.add_middleware(_KeyCheck, expected=expected_auth)
    _add_routes(app, engine, loop_engine, _Handlers(engine, loop_engine, model_name, max_prompt_chars), max_body_bytes)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Every error as OpenAI's error JSON: ours (APIError), starlette's 404/405, and any other as a 500."""

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):
        msg = f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405) else str(exc.detail)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return APIError(exc.status_code, msg, code=code).response()

    @app.exception_handler(Exception)
    async def _internal(request, exc):
        return APIError(500, f"internal error: {exc!r}", type_="server_error").response()


async def _body_of(request: Request, max_body_bytes: int) -> bytes:
    """The request's body, refused (413) past `max_body_bytes` whatever its Content-Length says."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
        raise APIError(413, f"request body over {max_body_bytes} bytes", code="body_too_large")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body_bytes:
                raise APIError(413, f"request body over {max_body_bytes} bytes", code="body_too_large")
            chunks.append(chunk)
    except ClientDisconnect:  # gone, or dropped for a body too slow (infer.connections): nobody reads this
        raise APIError(499, "the client closed the connection before its body arrived",
                       code="client_closed") from None
    return b"".join(chunks)


def _add_routes(app: FastAPI, engine: Engine, loop_engine: AsyncEngine, handlers: "_Handlers",
                max_body_bytes: int) -> None:
    """The endpoints: /health, /v1/models[/NAME], /v1/chat/completions, /v1/completions, /v1/embeddings."""

    @app.get("/health")
    async def health():
        if not loop_engine.alive:
            why = "the server is shutting down" if loop_engine.draining else "the engine is not running"
            raise APIError(503, why, type_="server_error", code="unavailable")
        return {"status": "ok", "running": len(engine.running), "waiting": len(engine.waiting)}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [handlers.model_card()]}

    @app.get("/v1/models/{name}")
    async def model(name: str):
        handlers.check_model(name)
        return handlers.model_card()

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await handlers.chat(_parse(ChatRequest, await _body_of(request, max_body_bytes)), request)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handlers.completions(_parse(CompletionRequest, await _body_of(request, max_body_bytes)), request)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        return await handlers.embeddings(_parse(EmbeddingRequest, await _body_of(request, max_body_bytes)), request)


class _KeyCheck:
    """401 for a /v1/ request without `Authorization: Bearer KEY`. Plain ASGI, not starlette's
    BaseHTTPMiddleware: that costs each request a task group and streams, and a flood of requests
    that never finish their bodies multiplies it."""

    def __init__(self, app, expected: bytes):
        self.app, self.expected = app, expected

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
            # constant time: a byte-by-byte compare would leak how much of a guessed key is right
            if not hmac.compare_digest(given, self.expected):
                response = APIError(401, "missing or wrong API key (expected 'Authorization: Bearer KEY')",
                                    type_="authentication_error", code="invalid_api_key").response()
                return await response(scope, receive, send)
        return await self.app(scope, receive, send)


def _parse(model, body: bytes):
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        raise _validation_error(e) from None


class _Handlers:
    """The endpoints' logic: schema -> engine jobs -> OpenAI responses or SSE chunks."""

    def __init__(self, engine: Engine, loop_engine: AsyncEngine, model_name: str, max_prompt_chars: int | None):
        self.engine, self.loop, self.name = engine, loop_engine, model_name
        self.created = int(time.time())
        self.max_prompt_chars = max_prompt_chars or engine.max_len * _longest_token_bytes(engine.tokenizer)

    def _check_prompt_size(self, chars: int, param: str) -> None:
        """Refuse before tokenizing: a megabyte prompt costs seconds of CPU only to be found too long."""
        if chars > self.max_prompt_chars:
            raise APIError(400, f"the prompt has {chars} characters; this server takes at most "
                                f"{self.max_prompt_chars} (max_prompt_chars: its {self.engine.max_len}-token "
                                f"context)", param=param, code="context_length_exceeded")

    def model_card(self) -> dict:
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "minimind",
                "max_model_len": self.engine.max_len}

    def check_model(self, name: str) -> None:
        if name != self.name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {self.name!r}",
                           param="model", code="model_not_found")

    def _max_new(self, requested: int | None, prompt_len: int) -> int:
        room = self.engine.max_len - prompt_len
        if room <= 0 or (requested is not None and requested > room):
            asked = f" plus {requested} to generate" if requested is not None else ""
            raise APIError(400, f"this model's context is {self.engine.max_len} tokens; the prompt has "
                                f"{prompt_len}{asked}", param="messages", code="context_length_exceeded")
        return room if requested is None else requested

    def _submit(self, pairs: list[tuple[list[int], list]], label: str, stream: bool):
        try:
            return self.loop.submit_many(pairs, label, stream=stream)
        except ContextLengthError as e:
            raise APIError(400, str(e), code="context_length_exceeded") from None
        except ValueError as e:
            raise APIError(400, str(e), code="invalid_value") from None
        except QueueFull as e:
            raise APIError(429, str(e), type_="rate_limit_error", code="queue_full") from None
        except EngineStopped as e:
            raise APIError(503, str(e), type_="server_error", code="unavailable") from None

    def _token_str(self, token: int) -> str:
        """The token's key in a legacy `top_logprobs` dict: its text, or OpenAI's `bytes:\\xNN` spelling for
        bytes that are not UTF-8, unique per id (infer.tokens)."""
        return token_table(self.engine.tokenizer).key[token]

    # ---- chat ----

    async def chat(self, req: ChatRequest, request: Request):
        self.check_model(req.model)
        messages = [m.render() for m in req.messages]
        self._check_prompt_size(sum(len(m["content"]) + len(m.get("reasoning_content", "")) for m in messages),
                                param="messages")
        try:
            prompt = await asyncio.to_thread(self.engine.encode_chat, messages)
        except Exception as e:  # the template rejected the conversation (e.g. a role it does not know)
            raise APIError(400, f"messages: the chat template failed: {e}", param="messages") from None
        max_new = self._max_new(req.requested_tokens, len(prompt))
        if max_new == 0:
            raise APIError(400, "max_tokens must be at least 1", param="max_tokens", code="invalid_value")
        params = [req.sampling(max_new, req.logprob_k, index=i) for i in range(req.n)]
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        job = self._submit([(prompt, params)], rid, req.stream)
        if req.stream:
            return _sse(self._chat_stream(req, job, rid, created, len(prompt)), job, self.loop)
        outs = await _collect(job, self.loop, request)
        choices = []
        for i, (text, tokens, lps, reason) in enumerate(outs):
            reasoning, content = split_reasoning(text)
            message = {"role": "assistant", "content": content}
            if reasoning is not None:
                message["reasoning_content"] = reasoning
            choices.append({"index": i, "message": message, "finish_reason": _reason(reason),
                            "logprobs": self._chat_logprobs(tokens, lps) if req.logprobs else None})
        return {"id": rid, "object": "chat.completion", "created": created, "model": self.name,
                "choices": choices, "usage": _usage(len(prompt), outs)}

    async def _chat_stream(self, req: ChatRequest, job, rid, created, prompt_len):
        def chunk(choices, **extra):
            return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.name,
                    "choices": choices, **extra}

        splitters = [ThinkSplitter() for _ in range(req.n)]
        counts = [0] * req.n
        for i in range(req.n):
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
        async for i, d in job.deltas():
            counts[i] += len(d.token_ids)
            reasoning, content = splitters[i].feed(d.text, final=d.finish_reason is not None)
            delta = {}
            if reasoning:
                delta["reasoning_content"] = reasoning
            if content:
                delta["content"] = content
            choice = {"index": i, "delta": delta, "finish_reason": _reason(d.finish_reason)}
            if req.logprobs:
                choice["logprobs"] = self._chat_logprobs(d.token_ids, d.logprobs)
            if delta or d.finish_reason is not None or req.logprobs:
                yield chunk([choice])
        if req.include_usage:
            yield chunk([], usage={"prompt_tokens": prompt_len, "completion_tokens": sum(counts),
                                   "total_tokens": prompt_len + sum(counts)})

    def _chat_logprobs(self, tokens, lps):
        table = token_table(self.engine.tokenizer)

        def entry(tok, lp):  # `bytes`: the token's own, not those of the U+FFFD a partial character decodes to
            return {"token": table.text[tok], "logprob": lp, "bytes": list(table.raw[tok])}

        content = []
        for tok, (lp, top) in zip(tokens, lps or []):
            content.append({**entry(tok, lp), "top_logprobs": [entry(t, v) for t, v in top.items()]})
        return {"content": content}

    # ---- completions ----

    async def completions(self, req: CompletionRequest, request: Request):
        self.check_model(req.model)
        texts = [p for p in req.prompts() if isinstance(p, str)]
        self._check_prompt_size(max(map(len, texts), default=0), param="prompt")
        encoded = iter(await asyncio.to_thread(lambda: [self.engine.tokenizer.encode(t) for t in texts]))
        prompts = [p if isinstance(p, list) else next(encoded) for p in req.prompts()]
        wants_scores = req.echo and req.logprobs is not None
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream and len(prompts) != 1:
            raise APIError(400, "stream=true takes a single prompt", param="prompt")
        pairs = []
        for prompt in prompts:
            max_new = self._max_new(req.max_tokens, len(prompt))
            pairs.append((prompt, [req.sampling(max_new, req.logprobs, req.logprobs if wants_scores else None,
                                                index=i) for i in range(req.n)]))
        job = self._submit(pairs, rid, req.stream)
        if req.stream:
            return _sse(self._completion_stream(req, (prompts[0], job), rid, created), job, self.loop)
        outs = await _collect(job, self.loop, request)
        choices = []
        for index, ((text, tokens, lps, reason), seq) in enumerate(zip(outs, job.requests)):
            echo_text = self.engine.tokenizer.decode(seq.prompt) if req.echo else ""
            logprobs = None
            if req.logprobs is not None:
                logprobs = self._completion_logprobs(seq.prompt if req.echo else [], seq, tokens, lps)
            choices.append({"index": index, "text": echo_text + text, "logprobs": logprobs,
                            "finish_reason": _reason(reason)})
        return {"id": rid, "object": "text_completion", "created": created, "model": self.name,
                "choices": choices, "usage": _usage(sum(map(len, prompts)), outs)}

    # ---- embeddings ----

    async def embeddings(self, req: EmbeddingRequest, request: Request):
        """One unit vector per input, pooled from the model's final hidden states by the engine's prefill
        (`ModelRunner.embed`), batched with the chat traffic."""
        self.check_model(req.model)
        width = self.engine.model.config.hidden_size
        if req.dimensions is not None and req.dimensions != width:
            raise APIError(400, f"dimensions: this model's embeddings have {width}, not {req.dimensions}",
                           param="dimensions", code="invalid_value")
        texts = [x for x in req.inputs() if isinstance(x, str)]
        self._check_prompt_size(max(map(len, texts), default=0), param="input")
        encoded = iter(await asyncio.to_thread(lambda: [self.engine.tokenizer.encode(t) for t in texts]))
        inputs = [x if isinstance(x, list) else next(encoded) for x in req.inputs()]
        for i, ids in enumerate(inputs):
            if not ids:
                raise APIError(400, f"input[{i}] is empty: there is nothing to embed", param="input",
                               code="invalid_value")
        job = self._submit([(ids, [SamplingParams(max_new_tokens=0, embed=True)]) for ids in inputs], "embed", False)
        await _collect(job, self.loop, request)
        tokens = sum(map(len, inputs))
        data = [{"object": "embedding", "index": i, "embedding": _encode_vector(r.embedding, req.encoding_format)}
                for i, r in enumerate(job.requests)]
        return {"object": "list", "data": data, "model": self.name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    def _completion_logprobs(self, echo_prompt, request, tokens, lps):
        """Legacy logprobs: tokens, token_logprobs, top_logprobs, text_offset; echoed prompt first. A token
        (in `tokens` and as a `top_logprobs` key) is `_token_str`'s: each id its own key, so a dict holds
        exactly the `logprobs` asked for. `text_offset` counts characters of the text the tokens decode to
        together (the choice's text, or in a stream the chunk's tokens), not of their keys: a character
        split over two tokens is one character, and both tokens start where it does."""
        entries = []
        if echo_prompt:
            scores = request.prompt_logprobs or [None] * len(echo_prompt)
            entries += [(t, s) for t, s in zip(echo_prompt, scores)]
        entries += list(zip(tokens, lps or []))
        ids = [tok for tok, _ in entries]
        return {"tokens": [self._token_str(tok) for tok in ids],
                "token_logprobs": [None if score is None else score[0] for _, score in entries],
                "top_logprobs": [None if score is None else {self._token_str(t): v for t, v in score[1].items()}
                                 for _, score in entries],
                "text_offset": token_table(self.engine.tokenizer).text_offsets(ids)}

    async def _completion_stream(self, req: CompletionRequest, prompt_job, rid, created):
        prompt, job = prompt_job

        def chunk(choices, **extra):
            return {"id": rid, "object": "text_completion", "created": created, "model": self.name,
                    "choices": choices, **extra}

        counts = [0] * req.n
        if req.echo:
            text = self.engine.tokenizer.decode(prompt)
            for i in range(req.n):
                yield chunk([{"index": i, "text": text, "logprobs": None, "finish_reason": None}])
        async for i, d in job.deltas():
            counts[i] += len(d.token_ids)
            logprobs = None
            if req.logprobs is not None:
                logprobs = self._completion_logprobs([], None, d.token_ids, d.logprobs)
            yield chunk([{"index": i, "text": d.text, "logprobs": logprobs, "finish_reason": _reason(d.finish_reason)}])
        if req.include_usage:
            yield chunk([], usage={"prompt_tokens": len(prompt), "completion_tokens": sum(counts),
                                   "total_tokens": len(prompt) + sum(counts)})


def _longest_token_bytes(tokenizer) -> int:
    """A prompt of C characters needs at least C / this many tokens (a character is >= 1 byte)."""
    return max(len(tokenizer.decode([i]).encode()) for i in range(len(tokenizer)))


def _layout(engine: Engine, threads: int) -> str:
    p = next(engine.model.parameters())
    return (f"engine: device {p.device}, dtype {str(p.dtype).removeprefix('torch.')}, max batch {engine.max_batch}, "
            f"context {engine.max_len} tokens, compiled decode {'on' if engine.compile else 'off'}; one engine "
            f"thread (torch threads {threads} of {usable_cores()} cores, inter-op {torch.get_num_interop_threads()}), "
            f"one event loop (HTTP, tokenizing, streaming)")


def _reason(reason: str | None) -> str | None:
    return "stop" if reason == "abort" else reason


def _encode_vector(vector: list[float], encoding_format: str):
    """OpenAI's two encodings: a list of floats, or base64 of little-endian float32 bytes."""
    if encoding_format == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
    return vector


def _usage(prompt_tokens: int, outs) -> dict:
    completion = sum(len(tokens) for _, tokens, _, _ in outs)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


async def _collect(job, loop_engine: AsyncEngine, request: Request):
    """Wait for every sequence of a job -> [(text, token_ids, logprobs, finish_reason)] by index.
    A client that hangs up meanwhile aborts the job, as a stream's does (StreamingResponse watches)."""
    texts = [[] for _ in job.requests]

    async def gather():
        async for i, d in job.deltas():
            texts[i].append(d.text)

    collecting, hung_up = asyncio.ensure_future(gather()), asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait([collecting, hung_up], return_when=asyncio.FIRST_COMPLETED)
        if not collecting.done():
            raise APIError(499, "the client closed the connection", code="client_closed")  # nobody reads it
        collecting.result()
    except EngineStopped as e:
        raise APIError(503, str(e), type_="server_error", code="unavailable") from None
    except RequestFailed as e:
        raise APIError(500, str(e), type_="server_error", code="generation_failed") from None
    finally:
        collecting.cancel()
        hung_up.cancel()
        loop_engine.cancel(job)  # no-op when finished; frees rows when the client went away
    if job.cut:
        raise APIError(503, "the server shut down before this request finished", type_="server_error",
                       code="shutting_down")
    return [("".join(t), r.output, r.logprobs, r.finish_reason) for t, r in zip(texts, job.requests)]


async def _disconnected(request: Request) -> None:
    """Returns when the client hangs up (the body is already read: only http.disconnect is left)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _sse(chunks, job, loop_engine: AsyncEngine) -> StreamingResponse:
    async def events():
        try:
            async for c in chunks:
                yield f"data: {json.dumps(c, ensure_ascii=False)}\n\n"
        except (EngineStopped, RequestFailed) as e:
            code = "unavailable" if isinstance(e, EngineStopped) else "generation_failed"
            err = {"error": {"message": str(e), "type": "server_error", "param": None, "code": code}}
            yield f"data: {json.dumps(err)}\n\n"
        finally:
            loop_engine.cancel(job)
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def run(args) -> int:
    """`minimind serve`: take the port, load the checkpoint, then serve until Ctrl-C / SIGTERM."""

    from minimind.checkpoint import CheckpointError

    log_to_stderr()
    try:  # before the checkpoint loads: a busy port fails in a second, not after the model is up
        sock = _listen(args.host, args.port)
    except OSError as e:
        print(f"minimind serve: cannot listen on {args.host}:{args.port}: {e.strerror or e}", file=sys.stderr)
        return 1
    try:
        max_batch = args.max_batch
        rows = getattr(args, "max_request_rows", None) or max(1, max_batch // 2)
        engine = Engine.from_checkpoint(args.ckpt, lora=args.lora, device=getattr(args, "device", "cpu"),
                                        max_batch=max_batch, max_group_rows=min(rows, max_batch),
                                        max_len=getattr(args, "max_len", None),
                                        compile=getattr(args, "compile", False), dtype=args.dtype,
                                        allow_nonfinite=getattr(args, "allow_nonfinite", False))
    except (CheckpointError, OSError, ValueError) as e:
        sock.close()
        print(f"minimind serve: {e}", file=sys.stderr)
        return 2
    name = args.model_name or run_name(args.ckpt)
    app = create_app(engine, model_name=name, api_key=args.api_key, max_queue=args.max_queue,
                     threads=getattr(args, "threads", None) or engine_threads(next(engine.model.parameters()).device))
    guard = ConnectionGuard(header_timeout=getattr(args, "header_timeout", HEADER_TIMEOUT),
                            body_timeout=getattr(args, "body_timeout", BODY_TIMEOUT),
                            max_connections=getattr(args, "max_connections", None))
    print(f"serving {name!r} on http://{args.host}:{args.port}/v1 (at most {guard.max_connections} connections)",
          file=sys.stderr, flush=True)
    # uvicorn's own grace (after ours has drained the engine) only waits for responses being written
    server = GracefulServer(uvicorn_config(app, args.host, args.port, guard, timeout_graceful_shutdown=5),
                            drain=app.state.engine.drain, grace=getattr(args, "grace", GRACE))
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then re-raises the signal to the handler that
    # was there before it; ours makes that a normal exit (status 0) instead of death by signal.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _exit_zero)
    # the ~200k objects of torch, the model and the tokenizer out of the collector's sight: else each
    # full collection costs ~0.1 s of the event loop, and a burst of connections triggers several
    gc.freeze()
    try:
        server.run(sockets=[sock])
    except SystemExit:
        pass
    if not server.started:  # uvicorn logged why (e.g. the app's startup failed)
        print("minimind serve: the server failed to start", file=sys.stderr, flush=True)
        return 1
    print("minimind serve: stopped", file=sys.stderr, flush=True)
    return 0


def _listen(host: str, port: int) -> socket.socket:
    """A bound socket for uvicorn, as uvicorn binds its own (IPv6 when the host has a colon)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def _exit_zero(signum, frame):
    raise SystemExit(0)


__all__ = ["create_app", "run", "Delta", "ServerThread"]
