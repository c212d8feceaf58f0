"""Who may do what on the server: the API key, runtime adapter loading, adapter roots, body size.

One :class:`Policy` per server, read by the HTTP app (``app.py``) on every request, so the
builtin engine and other engines behind the same app answer alike:

- ``api_key``: every ``/v1/*`` request, and ``/tokenize``, ``/detokenize``, ``/tokenizer_info``,
  carries ``Authorization: Bearer KEY`` (as vLLM's ``--api-key``), compared in constant time
  (``hmac.compare_digest``); ``/health`` and ``/metrics`` stay open. 401 otherwise.
- ``allow_runtime_adapters``: ``load_lora_adapter`` / ``unload_lora_adapter`` answer 403 unless
  the server was started with ``--allow-runtime-adapters`` (vLLM gates them behind
  ``VLLM_ALLOW_RUNTIME_LORA_UPDATING``): a client that may load a folder may make the server
  read any file it can reach.
- ``adapter_roots``: when given, a loaded folder must resolve (symlinks and ``..`` followed) to a
  folder under one of them; the check runs before the folder is looked at, so a client cannot
  learn whether a folder outside the roots exists.
- ``max_body_bytes``: larger request bodies are refused with 413 before they are read whole.
"""

from __future__ import annotations

import hmac
import os
from dataclasses import dataclass, field
from pathlib import Path

from .protocol import ApiError, short

API_KEY_ENV = "SHIRAKIT_API_KEY"
DEFAULT_MAX_BODY_BYTES = 1 << 20  # 1 MiB: ~150,000 tokens of text, far past any context served here


@dataclass(frozen=True)
class Policy:
    api_key: str | None = None
    allow_runtime_adapters: bool = False
    adapter_roots: tuple[Path, ...] = field(default=())
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES

    def __post_init__(self) -> None:
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must be a non-empty string or None")
        if self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes must be at least 1024, got {self.max_body_bytes}")
        roots = []
        for root in self.adapter_roots:
            resolved = Path(root).resolve()
            if not resolved.is_dir():
                raise FileNotFoundError(f"--adapter-root {root}: not a folder")
            roots.append(resolved)
        object.__setattr__(self, "adapter_roots", tuple(roots))

    @classmethod
    def from_args(cls, api_key: str | None = None, allow_runtime_adapters: bool = False,
                  adapter_roots=(), max_body_mb: float | None = None) -> Policy:
        """The command line's policy; the key falls back to ``$SHIRAKIT_API_KEY``."""
        key = api_key or os.environ.get(API_KEY_ENV) or None
        size = DEFAULT_MAX_BODY_BYTES if max_body_mb is None else int(max_body_mb * 2**20)
        return cls(key, allow_runtime_adapters, tuple(adapter_roots or ()), size)

    def authorized(self, header: str | None) -> bool:
        """Does an ``Authorization`` header carry the key (always, when there is no key)?"""
        if self.api_key is None:
            return True
        scheme, _, token = (header or "").partition(" ")
        # compare_digest takes as long for any wrong key of a length: nothing leaks by timing
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())

    def check_runtime_adapters(self) -> None:
        if not self.allow_runtime_adapters:
            raise ApiError(403, "loading and unloading adapters at run time is off on this server; "
                                "start it with --allow-runtime-adapters to allow it")

    def adapter_folder(self, lora_path: str) -> Path:
        """The folder ``lora_path`` names, resolved, if loading it is allowed (ApiError 400 if not).

        Messages repeat only what the client sent (shortened), never the resolved path, and say
        "outside the roots" before anything about existence."""
        try:
            resolved = Path(lora_path).resolve()
            if self.adapter_roots and not any(resolved.is_relative_to(r) for r in self.adapter_roots):
                raise ApiError(400, f"lora_path {short(lora_path)} is outside the adapter roots this server "
                                    f"loads from (--adapter-root)", "lora_path")
            if not resolved.is_dir():
                raise ApiError(400, f"lora_path {short(lora_path)} is not a folder on the server", "lora_path")
        except OSError:  # a name too long, a loop of links, no permission: say no more than that
            raise ApiError(400, f"lora_path {short(lora_path)} cannot be read as a folder", "lora_path") from None
        return resolved
