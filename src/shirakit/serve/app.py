"""The OpenAI-compatible HTTP API (FastAPI), on vLLM's routes, over a backend.

    GET  /health                      200 when the engine runs
    GET  /metrics                     Prometheus text
    GET  /v1/models                   the base model and every adapter
    POST /v1/completions              prompt -> text (stream: server-sent events)
    POST /v1/chat/completions         messages -> text, through the tokenizer's chat template
    POST /v1/load_lora_adapter        {"lora_name", "lora_path"}: any method, not LoRA only
    POST /v1/unload_lora_adapter      {"lora_name"}
    POST /tokenize, /detokenize       vLLM's: text <-> token ids with the served tokenizer
    GET  /tokenizer_info              its special tokens and chat template (lm-eval's remote tokenizer)

Handlers validate, tokenize (on a worker thread, after a bound on the text's length) and hand the
request to the backend; they never touch the model. The backend's ``policy`` (``policy.py``)
decides the API key, runtime adapter loading, adapter roots and the body size. Every error the API
answers goes through :func:`api_error_for` (one place: other engines behind this app answer alike).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections import Counter
from dataclasses import replace
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .cache import AdapterLoadError
from .engine import Output, QueueFull, RequestFailed, UnknownModel
from .metrics import render
from .policy import Policy
from .protocol import (
    ERROR_TYPES,
    ApiError,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    LoadAdapterRequest,
    Sampling,
    TokenizeRequest,
    UnloadAdapterRequest,
    error_response,
)
from .sequence import SamplingParams

log = logging.getLogger("shirakit.serve")
TOKENIZER_ROUTES = ("/tokenize", "/detokenize", "/tokenizer_info")  # behind the API key, as /v1/* is


def api_error_for(exc: Exception) -> ApiError:
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, UnknownModel):
        return ApiError(404, f"the model {exc.args[0]!r} does not exist; GET /v1/models lists the base model "
                             f"and the adapters", "model")
    if isinstance(exc, QueueFull):
        return ApiError(429, f"the server is busy: {exc}; retry later")
    if isinstance(exc, RequestFailed):
        return ApiError(500, str(exc))
    if isinstance(exc, OSError):  # its text names server paths: log it, tell the client less
        log.warning("request failed on a file: %s", exc)
        return ApiError(400, f"the server could not read a file this request needs ({type(exc).__name__})")
    if isinstance(exc, (AdapterLoadError, ValueError)):
        return ApiError(400, str(exc))
    log.error("internal error", exc_info=exc)
    return ApiError(500, f"internal error ({type(exc).__name__}); the server's log has the details")


class Guard:
    """ASGI middleware run before routing: the API key on ``/v1/*`` (401) and the body-size bound
    (413), checked on the declared length and on the bytes as they arrive (a lying or missing
    Content-Length does not help); the body is read here, at most the bound, then handed on."""

    def __init__(self, app, policy_of, errors: Counter) -> None:
        self.app, self.policy_of, self.errors = app, policy_of, errors

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        policy: Policy = self.policy_of()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}
        guarded = scope["path"].startswith("/v1/") or scope["path"] in TOKENIZER_ROUTES
        if guarded and not policy.authorized(headers.get("authorization")):
            return await self._refuse(scope, send, 401, "a valid API key is required: Authorization: Bearer KEY")
        limit = policy.max_body_bytes
        too_big = f"the request body is larger than this server accepts ({limit} bytes)"
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            return await self._refuse(scope, send, 413, too_big)
        if scope.get("method") in ("GET", "HEAD"):
            return await self.app(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                return await self._refuse(scope, send, 413, too_big)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # after the body: disconnects, as the server reports them

        await self.app(scope, replay, send)

    async def _refuse(self, scope, send, status: int, message: str) -> None:
        self.errors[status] += 1
        await error_response(status, message)(scope, None, send)


def create_app(backend) -> FastAPI:
    """The FastAPI application serving ``backend`` (``LocalBackend`` or the Ray ingress's)."""
    app = FastAPI(title="shirakit serve", version="1")
    app.state.backend = backend
    app.state.http_errors = Counter()
    policy = lambda: getattr(backend, "policy", None) or Policy()  # noqa: E731  (read per request: Ray binds late)
    app.add_middleware(Guard, policy_of=policy, errors=app.state.http_errors)

    def failed(exc: Exception) -> JSONResponse:
        error = api_error_for(exc)
        app.state.http_errors[error.status] += 1
        return error_response(error.status, error.message, error.param)

    @app.exception_handler(ApiError)
    async def _api_error(_, exc: ApiError):
        return failed(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return failed(ApiError(400, f"invalid request: {where or 'body'}: {first.get('msg', exc)}", where or None))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_, exc: StarletteHTTPException):
        app.state.http_errors[exc.status_code] += 1
        return error_response(exc.status_code, str(exc.detail))

    @app.get("/health")
    async def health():
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics():
        text = render(await backend.snapshots(), dict(app.state.http_errors))
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        now = int(time.time())
        data = [{"id": name, "object": "model", "created": now, "owned_by": "shirakit",
                 "root": backend.base_name, "parent": None if name == backend.base_name else backend.base_name}
                for name in backend.models()]
        return {"object": "list", "data": data}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        try:
            prompts = await _completion_prompts(backend, body.prompt)
            params = [_params(backend, body, ids, body.max_tokens, where)
                      for (ids, _), where in zip(prompts, _prompt_params(len(prompts)))]
            return await _respond(backend, request, body, prompts, params, chat=False)
        except Exception as exc:
            return failed(exc)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        try:
            prompt = await _chat_prompt(backend, body)
            params = _params(backend, body, prompt, body.max_completion_tokens or body.max_tokens)
            return await _respond(backend, request, body, [(prompt, None)], [params], chat=True)
        except Exception as exc:
            return failed(exc)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        try:
            if body.model is not None and not backend.knows(body.model):
                raise UnknownModel(body.model)
            _check_text_length(backend, len(body.prompt), "prompt")
            tokens = (await asyncio.to_thread(backend.tokenizer, body.prompt,
                                              add_special_tokens=body.add_special_tokens)).input_ids
        except Exception as exc:
            return failed(exc)
        return {"count": len(tokens), "max_model_len": backend.max_context, "tokens": tokens, "token_strs": None}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        try:
            if body.model is not None and not backend.knows(body.model):
                raise UnknownModel(body.model)
            vocab = len(backend.tokenizer)
            bad = [t for t in body.tokens if not 0 <= t < vocab]
            if bad:
                raise ApiError(400, f"tokens: token ids must lie in [0, {vocab}); found {bad[:5]}", "tokens")
            text = await asyncio.to_thread(backend.tokenizer.decode, body.tokens)
        except Exception as exc:
            return failed(exc)
        return {"prompt": text}

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        tok = backend.tokenizer
        return {"tokenizer_class": type(tok).__name__, "model_max_length": backend.max_context,
                "bos_token": tok.bos_token, "eos_token": tok.eos_token, "pad_token": tok.pad_token,
                "unk_token": tok.unk_token, "chat_template": getattr(tok, "chat_template", None)}

    @app.post("/v1/load_lora_adapter")
    async def load_adapter(body: LoadAdapterRequest):
        try:
            policy().check_runtime_adapters()
            folder = await asyncio.to_thread(policy().adapter_folder, body.lora_path)
            await backend.load_adapter(body.lora_name, str(folder))
        except Exception as exc:
            return failed(exc)
        return PlainTextResponse(f"Success: adapter {body.lora_name!r} added.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_adapter(body: UnloadAdapterRequest):
        try:
            policy().check_runtime_adapters()
            await backend.unload_adapter(body.lora_name)
        except Exception as exc:
            return failed(exc)
        return PlainTextResponse(f"Success: adapter {body.lora_name!r} removed.")

    return app


# ---- turning requests into engine work ------------------------------------------------------
def _text_bound(backend) -> int:
    """Characters past which a text surely has more tokens than the context: context x the longest
    token's length (a token never covers more characters than its longest vocabulary entry)."""
    bound = getattr(backend, "_text_bound", None)
    if bound is None:
        longest = max((len(t) for t in backend.tokenizer.get_vocab()), default=1)
        bound = backend._text_bound = backend.max_context * max(longest, 1)
    return bound


def _check_text_length(backend, chars: int, param: str) -> None:
    if chars > _text_bound(backend):
        raise ApiError(400, f"the {param} has {chars} characters, surely more than this model's context of "
                            f"{backend.max_context} tokens", param)


def _prompt_params(count: int) -> list[str]:
    """How errors name each prompt: ``prompt``, or ``prompt[i]`` when the request has several."""
    return ["prompt"] if count == 1 else [f"prompt[{i}]" for i in range(count)]


async def _completion_prompts(backend, prompts: list[str | list[int]]) -> list[tuple[list[int], str | None]]:
    """(token ids, the prompt's text as sent or None for token ids) of every prompt of a request
    (``protocol.prompts_of`` has checked their shapes); strings are tokenized off the event loop."""
    vocab = len(backend.tokenizer)
    texts = []
    for prompt, where in zip(prompts, _prompt_params(len(prompts))):
        if isinstance(prompt, str):
            _check_text_length(backend, len(prompt), where)
            texts.append(prompt)
            continue
        if len(prompt) > backend.max_context:
            raise ApiError(400, f"{where} has {len(prompt)} tokens; this model's context is "
                                f"{backend.max_context} tokens", "prompt")
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise ApiError(400, f"{where}: token ids must lie in [0, {vocab}); found {bad[:5]}", "prompt")
    encoded = iter(())
    if texts:
        encoded = iter(await asyncio.to_thread(lambda: [backend.tokenizer(t).input_ids for t in texts]))
    out = []
    for prompt, where in zip(prompts, _prompt_params(len(prompts))):
        ids = next(encoded) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise ApiError(400, f"{where} is empty (it has no tokens)", "prompt")
        out.append((ids, prompt if isinstance(prompt, str) else None))
    return out


async def _chat_prompt(backend, body: ChatRequest) -> list[int]:
    tokenizer = backend.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise ApiError(400, "this model's tokenizer has no chat template; use /v1/completions")
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    _check_text_length(backend, sum(len(m["content"]) for m in messages), "messages")

    def tokenize() -> list[int]:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False).input_ids

    return await asyncio.to_thread(tokenize)  # off the event loop: /health and the streams go on


def _params(backend, body: Sampling, prompt: list[int], max_tokens: int | None,
            where: str = "prompt") -> SamplingParams:
    """The engine's parameters for one prompt. ``max_tokens=0`` (echo: the prompt's log-probabilities
    only) runs one step, whose token :func:`_prompt_only` drops: the engine always samples one."""
    if not backend.knows(body.model):
        raise UnknownModel(body.model)
    room = backend.max_context - len(prompt)
    if room <= 0:
        raise ApiError(400, f"{'the ' * (where == 'prompt')}{where} has {len(prompt)} tokens; this model's context "
                            f"is {backend.max_context} tokens (and a completion needs one more)", "prompt")
    if max_tokens is None:
        max_tokens = room
    if max_tokens > room:
        raise ApiError(400, f"this model's context is {backend.max_context} tokens; {where} has "
                            f"{len(prompt)} and max_tokens asks for {max_tokens}", "max_tokens")
    max_tokens = max(max_tokens, 1)
    vocab = len(backend.tokenizer)
    bias = body.logit_bias or {}
    outside = [t for t in bias if not 0 <= t < vocab]
    if outside:
        raise ApiError(400, f"logit_bias token ids must lie in [0, {vocab}); found {outside[:5]}", "logit_bias")
    top_k = body.top_k if body.top_k is not None and body.top_k > 0 else 0
    if top_k and not getattr(backend, "supports_top_k", False):
        raise ApiError(400, "top_k is not supported by this server's engine", "top_k")
    return SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, top_k=top_k,
                          seed=body.seed, stop=tuple(body.stop or ()), logit_bias=tuple(bias.items()),
                          presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                          logprobs=getattr(body, "logprobs", None), echo=getattr(body, "echo", False),
                          ignore_eos=body.ignore_eos)


async def _respond(backend, request: Request, body: Sampling, prompts: list[tuple[list[int], str | None]],
                   params: list[SamplingParams], chat: bool):
    """One engine request per prompt, ``n`` choices each; prompt i's choices answer as indexes
    i * n ... i * n + n - 1 (OpenAI's and vLLM's order)."""
    echo, logprobs = getattr(body, "echo", False), getattr(body, "logprobs", None) is not None
    streams = []
    for (ids, _), p in zip(prompts, params):
        stream = backend.generate(body.model, ids, p, body.n)
        streams.append(_prompt_only(stream, len(ids)) if getattr(body, "max_tokens", None) == 0 else stream)
    events = _fan_in(streams, body.n)
    try:
        first = await anext(events)  # errors (404, 429, a corrupt adapter) surface before any byte is sent
    except BaseException:
        await events.aclose()
        raise
    texts = None
    if echo or logprobs:  # each prompt as the client sent it, or its tokens' text
        texts = [text if text is not None else backend.tokenizer.decode(ids) for ids, text in prompts]
    shape = _Shape(body.model, chat, [len(ids) for ids, _ in prompts], body.n, texts if echo else None, logprobs)
    shape.prompt_chars = [len(t) for t in texts or [""] * len(prompts)]
    if body.stream:
        usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_sse(shape, first, events, usage), media_type="text/event-stream")
    return await _collect(shape, first, events, request)


async def _prompt_only(events: AsyncIterator[Output], prompt_tokens: int) -> AsyncIterator[Output]:
    """``max_tokens=0``: the events of a one-token request without that token (its text, its
    log-probability, its count): what is left is the echoed prompt and its log-probabilities."""
    sent: dict[int, int] = {}  # choice -> log-probability entries passed on
    try:
        async for event in events:
            entries = event.logprobs
            if entries is not None:
                done = sent.get(event.index, 0)
                entries = entries[:max(prompt_tokens - done, 0)]
                sent[event.index] = done + len(entries)
            yield replace(event, text="", completion_tokens=0, logprobs=entries,
                          finish_reason="length" if event.finish_reason else None)
    finally:
        await events.aclose()


async def _fan_in(streams: list[AsyncIterator[Output]], n: int) -> AsyncIterator[Output]:
    """The events of every prompt's stream as one stream, choice indexes offset by prompt (i * n).
    Nothing is yielded before every stream has produced its first event, so an error of any prompt
    (429, an adapter that fails to load) fails the whole request before a byte is sent; closing
    this stream cancels every prompt's engine request."""
    if len(streams) == 1:
        try:
            async for event in streams[0]:
                yield event
        finally:
            await streams[0].aclose()
        return
    queue: asyncio.Queue = asyncio.Queue()
    finished = object()

    async def pump(i: int, stream: AsyncIterator[Output]) -> None:
        try:
            async for event in stream:
                queue.put_nowait((i, replace(event, index=i * n + event.index)))
            queue.put_nowait((i, finished))
        except Exception as exc:
            queue.put_nowait((i, exc))
        finally:
            await stream.aclose()

    tasks = [asyncio.ensure_future(pump(i, stream)) for i, stream in enumerate(streams)]
    try:
        held, started, open_streams = [], set(), len(streams)
        while open_streams:
            i, item = await queue.get()
            if isinstance(item, Exception):
                raise item
            if item is finished:
                open_streams -= 1
                started.add(i)
            elif len(started) < len(streams):
                started.add(i)
                held.append(item)
            else:
                yield item
            if held and len(started) == len(streams):
                for event in held:
                    yield event
                held = []
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class _Shape:
    """OpenAI's response objects for one request: completion or chat, whole or chunked; choice
    ``index`` belongs to prompt ``index // n``."""

    def __init__(self, model: str, chat: bool, prompt_tokens: list[int], n: int = 1,
                 echo: list[str] | None = None, logprobs: bool = False) -> None:
        self.model, self.chat, self.prompt_tokens, self.n = model, chat, prompt_tokens, n
        self.echo, self.logprobs = echo, logprobs
        self.choices = n * len(prompt_tokens)
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.prompt_chars = [0] * len(prompt_tokens)  # each prompt's length in characters: where its completion starts
        self.offsets: dict[int, int] = {}  # choice -> text offset of its next token
        self.echoed: set[int] = set()

    def text(self, index: int, text: str) -> str:
        """A completion's text, its prompt echoed in front of its first piece."""
        if self.echo is not None and index not in self.echoed:
            self.echoed.add(index)
            return self.echo[index // self.n] + text
        return text

    def logprob_block(self, index: int, entries: list | None) -> dict | None:
        """OpenAI's completions ``logprobs`` object for ``entries`` (token, logprob, alternatives);
        text offsets count from the start of the prompt."""
        if not self.logprobs:
            return None
        entries = entries or []
        start = self.offsets.get(index, 0 if self.echo is not None else self.prompt_chars[index // self.n])
        offsets = []
        for token, _, _ in entries:
            offsets.append(start)
            start += len(token)
        self.offsets[index] = start
        return {"tokens": [e[0] for e in entries], "token_logprobs": [e[1] for e in entries],
                "top_logprobs": [e[2] for e in entries], "text_offset": offsets}

    def usage(self, completion_tokens: int) -> dict:
        prompt_tokens = sum(self.prompt_tokens)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    def whole(self, texts: dict[int, str], reasons: dict[int, str], tokens: int, logprobs: dict | None = None) -> dict:
        logprobs = logprobs or {}
        if self.chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": texts[i]},
                        "logprobs": None, "finish_reason": reasons[i]} for i in sorted(texts)]
        else:
            choices = [{"index": i, "text": self.text(i, texts[i]), "logprobs": self.logprob_block(i, logprobs.get(i)),
                        "finish_reason": reasons[i]} for i in sorted(texts)]
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": choices, "usage": self.usage(tokens)}

    def chunk(self, index: int, text: str | None, reason: str | None, first: bool = False,
              logprobs: list | None = None) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": text or ""} if first else ({"content": text} if text else {})
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}
        else:
            choice = {"index": index, "text": self.text(index, text or ""),
                      "logprobs": self.logprob_block(index, logprobs), "finish_reason": reason}
        return {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": [choice]}


async def _collect(shape: _Shape, first: Output, events: AsyncIterator[Output], request: Request):
    n = shape.choices
    texts, reasons, tokens, logprobs = {i: "" for i in range(n)}, {}, {}, {i: [] for i in range(n)}

    def take(event: Output) -> None:
        texts[event.index] += event.text
        logprobs[event.index] += event.logprobs or []
        tokens[event.index] = event.completion_tokens
        if event.finish_reason:
            reasons[event.index] = event.finish_reason

    take(first)
    try:
        async for event in events:
            take(event)
            if await request.is_disconnected():  # the client left: free its rows
                break
    finally:
        await events.aclose()
    return shape.whole(texts, reasons, sum(tokens.values()), logprobs)


async def _sse(shape: _Shape, first: Output, events: AsyncIterator[Output], usage: bool):
    """Server-sent events as OpenAI streams them; closing the stream (disconnect) cancels the request."""
    tokens = {}

    def frame(obj) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    try:
        if shape.chat:
            for i in range(shape.choices):
                yield frame(shape.chunk(i, "", None, first=True))
        tokens[first.index] = first.completion_tokens
        yield frame(shape.chunk(first.index, first.text, first.finish_reason, logprobs=first.logprobs))
        try:
            async for event in events:
                tokens[event.index] = event.completion_tokens
                yield frame(shape.chunk(event.index, event.text, event.finish_reason, logprobs=event.logprobs))
        except Exception as exc:  # after the headers: the error as an event, then the end, as vLLM does
            error = api_error_for(exc)
            yield frame({"error": {"message": error.message, "type": ERROR_TYPES.get(error.status, "Error"),
                                   "param": error.param, "code": error.status}})
            yield "data: [DONE]\n\n"
            return
        if usage:
            yield frame({"id": shape.id, "object": "chat.completion.chunk" if shape.chat else "text_completion",
                         "created": shape.created, "model": shape.model, "choices": [],
                         "usage": shape.usage(sum(tokens.values()))})
        yield "data: [DONE]\n\n"
    finally:
        await events.aclose()

