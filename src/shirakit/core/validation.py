"""Checks on values that come from users and files: config fields against their annotations,
finite scalars, regular expressions, adapter names, tensors handed in for an adapter's.

A config read from JSON can hold anything JSON can: ``"false"`` where a bool belongs (truthy if
taken as it is), ``true`` where an int belongs (``True == 1`` in Python), ``1e308`` or a 5,000-digit
integer where a scale belongs. Each field is checked against its dataclass annotation, so a
wrong type is refused by name instead of failing (or worse, succeeding) somewhere deeper.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import time
import types
import typing
from typing import Any

import regex
import torch
from torch import nn

#: Largest magnitude a float config field or an adapter scale may have. Real ones are O(1)-O(1e3)
#: (lora_alpha = 2 r at r = 1024 is 2048); 1e6 times any weight already overflows half precision.
MAX_SCALAR = 1e6
#: Integers in configs (ranks, seeds, layer indices) fit in 64 bits; larger ones are refused.
INT_RANGE = (-(2**63), 2**64 - 1)
#: Names shirakit gives a meaning of its own (``__base__``: the base model's rows in ``route``).
RESERVED_NAMES = frozenset({"__base__"})


def short_repr(value: Any, limit: int = 80) -> str:
    """repr(value) cut to ``limit`` characters (a hostile file's value may be megabytes long)."""
    try:
        text = repr(value)
    except (RecursionError, ValueError):  # deeply nested, or an int past Python's digit limit
        return f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _describe(hint: Any) -> str:
    args = typing.get_args(hint)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if hint is type(None):
        return "null"
    if origin is list:
        return f"a list of {_describe(args[0]).split(' ', 1)[-1]}s" if args else "a list"
    names = {bool: "a bool", int: "an int", float: "a number", str: "a string", dict: "an object"}
    return names.get(origin or hint, getattr(hint, "__name__", str(hint)))


def _accepts(hint: Any, value: Any) -> bool:
    """Does ``value`` fit the annotation ``hint``? Annotations it cannot judge (callables) accept."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(a, value) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin is list or hint is list:
        return isinstance(value, list) and (not args or all(_accepts(args[0], v) for v in value))
    if hint is dict or origin is dict:
        return isinstance(value, dict)
    return True


def _mentions_float(hint: Any) -> bool:
    return hint is float or any(_mentions_float(a) for a in typing.get_args(hint))


def _check_number(name: str, value: Any, as_float: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return
    if as_float or not isinstance(value, numbers.Integral):
        check_scalar(f"field {name!r}", value)
    elif not INT_RANGE[0] <= value <= INT_RANGE[1]:
        raise ValueError(f"field {name!r}: expected an integer that fits in 64 bits, found {short_repr(value)}")


def check_fields(config: Any) -> None:
    """Every field of the dataclass ``config`` against its type annotation, and numbers in range."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        hint = hints.get(f.name, Any)
        if not _accepts(hint, value):
            raise ValueError(f"field {f.name!r}: expected {_describe(hint)}, found {short_repr(value)} "
                             f"({type(value).__name__})")
        for item in value if isinstance(value, list) else [value]:
            _check_number(f.name, item, _mentions_float(hint))


def check_scalar(name: str, value: Any) -> float:
    """A finite real number of magnitude <= MAX_SCALAR, as a float (NaN, inf, 1e308 are refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name}: expected a number, found {short_repr(value)} ({type(value).__name__})")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number) or abs(number) > MAX_SCALAR:
        raise ValueError(f"{name}: expected a finite number of magnitude at most {MAX_SCALAR:g}, found {number!r}")
    return number


def check_regex(pattern: str, name: str) -> None:
    """``pattern`` must compile (matching it later is bounded in time, see :func:`fullmatch`)."""
    try:
        regex.compile(pattern)
    except (regex.error, RecursionError, OverflowError, ValueError) as exc:
        raise ValueError(f"field {name!r}: {short_repr(pattern)} is not a valid regular expression: {exc}") from None


#: Seconds all regex matching for one inject may take (a normal pattern over 10k names: milliseconds).
REGEX_TIME_LIMIT = 2.0


class RegexTimeout(ValueError):
    """A target regex took too long to match (catastrophic backtracking, e.g. ``(.*.*)*z``)."""


def bounded_match(pattern: str, text: str, deadline: float, what: str, full: bool = True):
    """``re.fullmatch`` (or ``re.match``) semantics, refusing instead of hanging once ``deadline``
    (time.monotonic) passes: the ``regex`` module stops a backtracking match at its timeout."""
    left = deadline - time.monotonic()
    try:
        if left <= 0:
            raise TimeoutError
        return (regex.fullmatch if full else regex.match)(pattern, text, timeout=left)
    except TimeoutError:
        raise RegexTimeout(
            f"{what} {short_repr(pattern)} took too long to match module names (over the time limit); "
            "it backtracks catastrophically: simplify it or give a list of names"
        ) from None


def check_adapter_name(name: Any) -> None:
    """Adapter names key nn.ModuleDicts and shirakit's own tables, so some are impossible: names of
    nn.Module attributes (``forward``, ``to``, ``training``, ``state_dict``, ...) cannot be module
    keys, ``.`` would split a parameter path, ``__base__`` means "no adapter" to ``route``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"adapter_name must be a non-empty string, found {short_repr(name)}")
    if "." in name:
        raise ValueError(f"adapter_name must not contain '.', found {name!r}")
    if name in RESERVED_NAMES:
        raise ValueError(f"adapter_name {name!r} is reserved by shirakit; choose another name")
    if name in _module_attributes():
        raise ValueError(f"adapter_name {name!r} is the name of an nn.Module attribute (adapters are kept "
                         "in nn.ModuleDicts, which cannot hold it); choose another name")


_MODULE_ATTRIBUTES: frozenset[str] | None = None


def _module_attributes() -> frozenset[str]:
    global _MODULE_ATTRIBUTES
    if _MODULE_ATTRIBUTES is None:
        _MODULE_ATTRIBUTES = frozenset(dir(nn.ModuleDict())) | frozenset(dir(nn.Module))
    return _MODULE_ATTRIBUTES


# ---- tensors from files and callers ------------------------------------------------------------
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def check_tensor(value: torch.Tensor, own: torch.Tensor, where: str, exact_shape: bool = False) -> torch.Tensor:
    """Check a tensor handed in for ``own`` and return it in ``own``'s dtype. Float values are
    checked for finiteness after the cast (float64 1e300 is inf in fp32). Index tensors of
    adapters may differ in length (the method checks the count with its meaning, e.g. SHiRA's K);
    ``exact_shape`` asks for the exact shape (whole modules kept in modules_to_save)."""
    if own.dtype.is_floating_point:
        if value.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{where}: expected a float tensor (float16, bfloat16, float32 or float64), "
                             f"found {value.dtype}")
        if tuple(value.shape) != tuple(own.shape):
            raise ValueError(f"{where}: expected shape {tuple(own.shape)}, found {tuple(value.shape)}")
        value = value.to(own.dtype)
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"{where}: contains non-finite values (nan or inf) in {own.dtype}")
        return value
    if value.dtype not in INDEX_DTYPES or own.dtype not in INDEX_DTYPES:
        raise ValueError(f"{where}: expected an integer tensor (int8 to int64 or uint8), found {value.dtype}")
    relaxed = not exact_shape and value.dim() == own.dim() and (value.dim() != 2 or value.shape[0] == own.shape[0])
    if tuple(value.shape) != tuple(own.shape) and not relaxed:
        raise ValueError(f"{where}: expected shape {tuple(own.shape)}, found {tuple(value.shape)}")
    return value
