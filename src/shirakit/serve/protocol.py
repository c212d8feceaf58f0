"""Request bodies of the OpenAI-compatible API (the fields vLLM's server takes), and JSON errors.

Parameters follow OpenAI's definitions, defaults and ranges (``max_tokens`` 16 for completions,
``temperature`` 1 in [0, 2], ``top_p`` 1 in (0, 1], ``n`` 1, penalties in [-2, 2], ``logit_bias``
values in [-100, 100]); vLLM's extension ``top_k`` (-1 or 0: off, else the k most probable
tokens) and ``ignore_eos`` (an end-of-sequence token does not end the completion: benchmark
clients send it so that every request generates ``max_tokens``). OpenAI parameters this server
does not implement (``UNSUPPORTED``) are refused with 400 naming the field when they ask for
something (a null or the default passes); unknown fields are ignored. Errors have OpenAI's shape:
``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 403: "PermissionDeniedError",
               404: "NotFoundError", 413: "RequestTooLargeError", 429: "RateLimitError", 500: "InternalServerError",
               503: "ServiceUnavailableError"}
MAX_LOGPROBS = 20  # top alternatives per token, as OpenAI bounds them
# OpenAI parameters not implemented here -> the value that asks for nothing (None: only null passes)
UNSUPPORTED = {"best_of": 1, "suffix": None, "tools": None, "tool_choice": None, "functions": None,
               "function_call": None, "response_format": None, "top_logprobs": None,
               "parallel_tool_calls": None, "audio": None, "modalities": None, "prediction": None}


def short(text: str, limit: int = 80) -> str:
    """``repr(text)``, cut to ``limit`` characters: errors echo what the client sent, not megabytes of it."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text)} characters)"


class ApiError(Exception):
    """An error the API reports as JSON with ``status``."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


RETRY_AFTER_S = 1  # what a 429 tells the client to wait (the queue drains in steps of a few tens of ms)


def error_response(status: int, message: str, param: str | None = None) -> JSONResponse:
    body = {"message": message, "type": ERROR_TYPES.get(status, "Error"), "param": param, "code": status}
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 429 else None  # RFC 6585 section 4; RFC 9110 10.2.3
    return JSONResponse({"error": body}, status_code=status, headers=headers)


class StreamOptions(BaseModel):
    include_usage: bool = False


class Sampling(BaseModel):
    """The generation parameters both endpoints share."""

    model_config = ConfigDict(extra="allow")  # unknown fields pass; UNSUPPORTED ones are refused below

    model: str
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = None  # vLLM's extension: -1 or 0 (or null) off; k >= 1 keeps the k most probable tokens
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens tokens, past end-of-sequence (benchmarks)
    n: int = Field(1, ge=1, le=16)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[int, float] | None = Field(None, max_length=300)
    seed: int | None = Field(None, ge=-2**63, le=2**63 - 1)  # int64, as vLLM bounds it
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4 or any(not s for s in stops) or any(len(s) > 1000 for s in stops):
            raise ValueError("stop takes at most 4 non-empty strings of at most 1000 characters")
        return stops

    @field_validator("top_k", mode="before")
    @classmethod
    def _top_k(cls, value):
        if value is None:
            return value
        if type(value) is not int or value < -1 or value > 2**31 - 1:
            raise ValueError(f"top_k must be an integer: -1 or 0 (off) or k >= 1 (keep the k most probable "
                             f"tokens); got {repr(value)[:40]}")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _biases(cls, value):
        bad = {k: v for k, v in (value or {}).items() if not -100 <= v <= 100}
        if bad:
            raise ValueError(f"logit_bias values must lie in [-100, 100]; found {dict(list(bad.items())[:3])}")
        return value

    @model_validator(mode="after")
    def _unsupported(self):
        for name, harmless in UNSUPPORTED.items():
            value = (self.model_extra or {}).get(name)
            if value is not None and value != harmless:
                raise ApiError(400, f"{name} is not supported by this server (it implements temperature, top_p, "
                                    f"top_k, n, seed, stop, max_tokens, logit_bias, presence_penalty, "
                                    f"frequency_penalty, and logprobs/echo for completions)", name)
        return self


MAX_PROMPTS = 256  # prompts in one completions request (each becomes its own engine request)
PROMPT_FORMS = "a string, a list of strings, a list of token ids or a list of token-id lists"


def _token_ids(value: list, where: str) -> list[int]:
    if not value:
        raise ApiError(400, f"{where} is an empty list of token ids", "prompt")
    for i, token in enumerate(value):
        if type(token) is not int:  # bool is an int to Python, not to the API
            raise ApiError(400, f"{where}[{i}]: expected a token id (an integer), found "
                                f"{type(token).__name__} {repr(token)[:40]}", "prompt")
    return value


def prompts_of(value) -> list[str | list[int]]:
    """The prompts of a completions request, as OpenAI's API reads its ``prompt`` field: a string,
    a list of strings, a list of token ids (one prompt) or a list of token-id lists; each prompt a
    string or a list of token ids."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise ApiError(400, f"prompt: expected {PROMPT_FORMS}; found {type(value).__name__}", "prompt")
    if not value:
        raise ApiError(400, f"prompt: expected {PROMPT_FORMS}; found an empty list", "prompt")
    kinds = {"string" if isinstance(v, str) else "list" if isinstance(v, list) else
             "token id" if type(v) is int else type(v).__name__ for v in value}
    if kinds == {"token id"}:
        return [value]
    if len(kinds) > 1 or not kinds <= {"string", "list"}:
        raise ApiError(400, f"prompt: a list must hold only strings, only token ids or only token-id lists; "
                            f"found {', '.join(sorted(kinds))}", "prompt")
    if len(value) > MAX_PROMPTS:
        raise ApiError(400, f"prompt: at most {MAX_PROMPTS} prompts per request; found {len(value)}", "prompt")
    if kinds == {"string"}:
        return list(value)
    return [_token_ids(v, f"prompt[{i}]") for i, v in enumerate(value)]


class CompletionRequest(Sampling):
    # str | list[str] | list[int] | list[list[int]], read by prompts_of (its errors name what is wrong);
    # after validation, always the list of prompts
    prompt: Any
    max_tokens: int | None = Field(16, ge=0)  # 0: with echo, the prompt's log-probabilities only
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, value):
        return prompts_of(value)

    @model_validator(mode="after")
    def _nothing_to_do(self):
        if self.max_tokens == 0 and not self.echo:
            raise ApiError(400, "max_tokens=0 generates nothing: it takes echo=true (the prompt back, with "
                                "logprobs its tokens' log-probabilities)", "max_tokens")
        return self


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatRequest(Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _no_logprobs(self):
        extra = self.model_extra or {}
        for name in ("logprobs", "echo"):
            if extra.get(name) not in (None, False):
                raise ApiError(400, f"{name} is implemented for /v1/completions only", name)
        return self


class TokenizeRequest(BaseModel):
    """vLLM's ``POST /tokenize`` (the completions form): text -> token ids."""

    model: str | None = None
    prompt: str
    add_special_tokens: bool = True


class DetokenizeRequest(BaseModel):
    """vLLM's ``POST /detokenize``: token ids -> text."""

    model: str | None = None
    tokens: list[int] = Field(max_length=1_000_000)


class LoadAdapterRequest(BaseModel):
    lora_name: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9._\-]*$")
    lora_path: str = Field(min_length=1, max_length=4096)


class UnloadAdapterRequest(BaseModel):
    lora_name: str = Field(min_length=1)
