"""Reading ``adapter_config.json``: the bytes bounded, the JSON strict, the method's config class
chosen by ``peft_type`` (see :mod:`shirakit.core.config` for the fields)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..core.config import AdapterConfig
from ..core.registry import method_for_peft_type
from ..core.validation import short_repr
from .atomic import read_regular_file
from .folder import CONFIG_NAME, bound_config_bytes
from .hub import resolve_adapter_source

#: adapter_config.json files are a few KB; anything this large is not one (and is not read whole).
MAX_CONFIG_BYTES = 4 << 20


def read_config(directory: str | Path) -> AdapterConfig:
    """Read ``adapter_config.json`` and return the matching method's config (the one saved with the
    weights beside it, should a save have been interrupted: see :mod:`shirakit.io.folder`). ``directory`` may be
    a Hugging Face repo id already in the local hub cache (:mod:`shirakit.io.hub`)."""
    directory = resolve_adapter_source(directory)
    path = Path(directory) / CONFIG_NAME
    raw = read_regular_file(path, MAX_CONFIG_BYTES, "adapter config")
    return config_from_bytes(bound_config_bytes(Path(directory), raw), path)


def config_from_bytes(raw: bytes, path: Path) -> AdapterConfig:
    """Parse the bytes of an ``adapter_config.json`` (strict JSON: no NaN/Infinity constants)."""
    data = parse_json_object(raw, path)
    if "peft_type" not in data:
        raise ValueError(f"{path}: expected a 'peft_type' key")
    if not isinstance(data["peft_type"], str):
        raise ValueError(f"{path}: field 'peft_type': expected a string, found {short_repr(data['peft_type'])}")
    method = method_for_peft_type(data["peft_type"], source=str(path))
    return method.config_class.from_dict(data, source=str(path))


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def parse_json_object(raw: bytes, path: Path) -> dict[str, Any]:
    """A JSON object from ``raw``; every way the text can be wrong is a ValueError naming ``path``."""
    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant)
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text: {exc}") from None
    except RecursionError:
        raise ValueError(f"{path}: not valid JSON: nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, NaN/Infinity, integers past Python's digit limit
        raise ValueError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data
