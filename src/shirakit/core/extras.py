"""Optional dependencies: which ``pip install "shirakit[EXTRA]"`` brings each module, and one error that says so.

Code that needs an optional package imports it with :func:`require` (``datasets = require("datasets", "shirakit
train")``); a module-level import of one (the server's fastapi) is translated by the command line with
:func:`missing_extra`. Either way a missing package reads, on one line,

    shirakit train needs the 'datasets' package, which the "train" extra installs: pip install "shirakit[train]"

The table is pyproject.toml's ``[project.optional-dependencies]`` read backwards (tests/test_extras.py checks that
every extra named here exists there).
"""

from __future__ import annotations

import importlib
from types import ModuleType

# import name (top level) -> (extra, distribution name when it differs from the import name)
EXTRAS: dict[str, tuple[str, str]] = {
    "matplotlib": ("demo", "matplotlib"),
    "gguf": ("demo", "gguf"),
    "accelerate": ("demo", "accelerate"),
    "tqdm": ("demo", "tqdm"),
    "datasets": ("train", "datasets"),
    "yaml": ("train", "pyyaml"),
    "fastapi": ("serve", "fastapi"),
    "uvicorn": ("serve", "uvicorn"),
    "prometheus_client": ("serve", "prometheus-client"),
    "ray": ("ray", "ray[serve]"),
    "vllm": ("vllm", "vllm"),
    "bitsandbytes": ("quant", "bitsandbytes"),
    "torchao": ("quant", "torchao"),
    "diffusers": ("diffusion", "diffusers"),
    "PIL": ("diffusion", "pillow"),
    "trl": ("trl", "trl"),
    "lm_eval": ("eval", "lm-eval"),
    "triton": ("dev", "triton"),
}


class MissingExtraError(ModuleNotFoundError):
    """An optional package is not installed; the message names the extra that installs it.

    A ``ModuleNotFoundError`` (so ``except ImportError`` still catches it), with ``name`` the missing module and
    ``extra`` the extra to install."""

    def __init__(self, module: str, purpose: str | None = None) -> None:
        top = module.partition(".")[0]
        extra, dist = EXTRAS.get(top, (None, top))
        who = purpose or "this"
        if extra is None:
            text = f"{who} needs the {top!r} package, which is not installed: pip install {dist}"
        else:
            called = f" ({dist})" if dist != top else ""
            text = (f"{who} needs the {top!r} package{called}, which the {extra!r} extra installs: "
                    f'pip install "shirakit[{extra}]"')
        super().__init__(text, name=top)
        self.extra = extra


def require(module: str, purpose: str | None = None) -> ModuleType:
    """``importlib.import_module(module)``, or :class:`MissingExtraError` naming the extra to install when it (or
    the package it belongs to) is missing. ``purpose`` says what needs it ("shirakit train", "recipe files")."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if isinstance(exc, MissingExtraError):
            raise
        missing = exc.name or module
        if missing.partition(".")[0] != module.partition(".")[0] and missing.partition(".")[0] not in EXTRAS:
            raise  # something the package itself imports is broken: not a missing extra, show it as it is
        raise MissingExtraError(missing, purpose) from None


def missing_extra(exc: BaseException, purpose: str | None = None) -> MissingExtraError | None:
    """The :class:`MissingExtraError` that ``exc`` means, or None when it is not a missing optional package."""
    if isinstance(exc, MissingExtraError):
        return exc
    if isinstance(exc, ModuleNotFoundError) and exc.name and exc.name.partition(".")[0] in EXTRAS:
        return MissingExtraError(exc.name, purpose)
    return None
