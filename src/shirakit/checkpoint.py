"""Save and load adapters as PEFT's files: ``adapter_config.json`` + ``adapter_model.safetensors``.

One key rule, no per-method branches: the tensor ``k`` of adapter ``name`` held by the module at
path ``P`` (an AdapterLinear or a ModulesToSave) is ``P.adapters.<name>.<k>`` in the model and
``base_model.model.P.<k>`` in the file; a tensor ``k`` the adapter shares across layers
(:meth:`Adapter.make_shared`, e.g. VeRA's ``vera_A``) is ``base_model.<k>`` in the file, written
when the method's :meth:`Adapter.shared_in_checkpoint` says so. Files are read with safetensors
only (no pickle) and written atomically. Loading validates everything before the model is changed
for good: on any error the half-built adapter is removed again and the error names the file and the key.
"""

from __future__ import annotations

import warnings
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch import nn

from .adapter import Adapter
from .compact import COMPACT_V1, FORMAT_KEY
from .config import read_config
from .control import merge as merge_adapters
from .control import set_adapter
from .inject import delete_adapter, inject, unload
from .io_utils import atomic_write_bytes
from .registry import method_for_config
from .state import SharedTensors, check_adapter_names, hosts, shared_of, state_of

WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."


def _file_key(module_path: str, key: str) -> str:
    return f"{PREFIX}{module_path}.{key}"


def _shared_file_key(key: str) -> str:
    return f"base_model.{key}"


def _shared_saved(model: nn.Module, adapter_name: str) -> tuple[SharedTensors | None, bool]:
    """The adapter's shared-tensor holder (or None) and whether its checkpoint carries them."""
    holder = shared_of(model, adapter_name)
    if holder is None:
        return None, False
    config = state_of(model).configs[adapter_name]
    return holder, method_for_config(config).shared_in_checkpoint(config)


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    """A CPU, contiguous, plain tensor; an FSDP2-sharded parameter (a DTensor) is gathered whole first."""
    if hasattr(tensor, "full_tensor"):  # DTensor: a collective, so every rank must make this call
        tensor = tensor.full_tensor()
    return tensor.detach().to("cpu").contiguous()


def adapter_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's file keys (CPU, contiguous). Under FSDP2 (fully_shard) the
    sharded tensors are gathered, a collective: call it (or :func:`save_adapter`) on every rank."""
    check_adapter_names(model, [adapter_name])
    out = {}
    for path, host in hosts(model):
        if adapter_name in host.adapters:
            for key, tensor in host.adapters[adapter_name].state_dict().items():
                out[_file_key(path, key)] = _plain(tensor)
    holder, saved = _shared_saved(model, adapter_name)
    if saved:
        for key, tensor in holder.tensors().items():
            out[_shared_file_key(key)] = tensor.detach().to("cpu").contiguous()
    return out


def save_adapter(
    model: nn.Module, directory: str | Path, adapter_name: str = "default", compact: bool = False
) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` (each atomically).

    ``compact=True`` writes methods that have a compact layout (SHiRA: <= 6 bytes per value, see
    :mod:`shirakit.compact`) in it; such a file is for shirakit only, PEFT cannot read it.
    """
    state = state_of(model)
    check_adapter_names(model, [adapter_name])
    directory = Path(directory)
    tensors = adapter_state_dict(model, adapter_name)
    metadata = {"format": "pt"}
    if compact:
        metadata[FORMAT_KEY] = COMPACT_V1
        for path, host in hosts(model):
            owner = host.adapters[adapter_name] if adapter_name in host.adapters else None
            if isinstance(owner, Adapter) and owner.has_compact_layout:
                packed = owner.compact_tensors()
                prefix = _file_key(path, "")
                tensors = {k: v for k, v in tensors.items() if not k.startswith(prefix)}
                tensors.update({prefix + k: v.detach().to("cpu").contiguous() for k, v in packed.items()})
    atomic_write_bytes(directory / WEIGHTS_NAME, save(tensors, metadata=metadata))
    config = state.configs[adapter_name]
    name_or_path = config.base_model_name_or_path or getattr(getattr(model, "config", None), "_name_or_path", None)
    replace(config, inference_mode=True, base_model_name_or_path=name_or_path or None).save(directory)
    return directory


def read_weights(directory: str | Path) -> tuple[Path, dict[str, torch.Tensor], dict[str, str]]:
    """(path, tensors, metadata) of ``adapter_model.safetensors``; safetensors only, no pickle."""
    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no adapter weights here (expected {WEIGHTS_NAME})")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{path}: not a readable safetensors file: {exc}") from exc
    layout = metadata.get(FORMAT_KEY)
    if layout not in (None, COMPACT_V1):
        raise ValueError(f"{path}: unknown {FORMAT_KEY} {layout!r}; expected none (PEFT's layout) or {COMPACT_V1!r}")
    return path, tensors, metadata


def load_adapter(
    model: nn.Module,
    directory: str | Path,
    adapter_name: str = "default",
    is_trainable: bool = False,
    merge: bool = False,
) -> nn.Module:
    """Add the adapter saved in ``directory`` (by shirakit or by PEFT, either layout) under
    ``adapter_name``. It becomes the active adapter; its parameters train only with
    ``is_trainable=True``; ``merge=True`` also merges it (fused mode).
    """
    config = read_config(directory)
    config.inference_mode = not is_trainable
    path, tensors, metadata = read_weights(directory)
    had_adapters = getattr(model, "shirakit", None) is not None
    previous_active = list(model.shirakit.active) if had_adapters else []
    trainable_before = [p for p in model.parameters() if p.requires_grad]  # inject freezes a fresh model
    inject(model, config, adapter_name, _from_checkpoint=True)
    try:
        if metadata.get(FORMAT_KEY) == COMPACT_V1:
            tensors = _expand_compact(model, adapter_name, tensors, path)
        _fill(model, adapter_name, tensors, path)
    except BaseException:
        delete_adapter(model, adapter_name)
        if had_adapters:
            set_adapter(model, previous_active) if previous_active else None
        else:
            unload(model)
            for p in trainable_before:
                p.requires_grad_(True)
        raise
    if merge:
        merge_adapters(model, [adapter_name])
    return model


def _expand_compact(model: nn.Module, adapter_name: str, tensors: dict, path: Path) -> dict[str, torch.Tensor]:
    """Turn each compact-layout layer back into the standard tensors, for the usual checks."""
    tensors = dict(tensors)
    for module_path, host in hosts(model):
        owner = host.adapters[adapter_name] if adapter_name in host.adapters else None
        if not isinstance(owner, Adapter) or not owner.has_compact_layout:
            continue
        prefix = _file_key(module_path, "")
        packed = {k[len(prefix):]: tensors.pop(k) for k in list(tensors) if k.startswith(prefix)}
        expanded = owner.expand_compact(packed, f"{path}: {prefix[:-1]}")
        tensors.update({prefix + k: v for k, v in expanded.items()})
    return tensors


def _fill(model: nn.Module, adapter_name: str, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Check the file's tensors against what the model expects, then copy them in."""
    expected: dict[str, tuple[nn.Module, str, torch.Tensor]] = {}
    for module_path, host in hosts(model):
        if adapter_name in host.adapters:
            owner = host.adapters[adapter_name]
            for key, tensor in owner.state_dict().items():
                expected[_file_key(module_path, key)] = (owner, key, tensor)
    holder, saved = _shared_saved(model, adapter_name)
    for key, tensor in (holder.tensors() if holder is not None else {}).items():
        file_key = _shared_file_key(key)
        if saved:
            expected[file_key] = (holder, key, tensor)
        elif file_key in tensors:  # as PEFT does: the config says they are rebuilt, so they are
            warnings.warn(f"{path}: {file_key!r} is in the file but the config says it is not saved; "
                          "using the tensor rebuilt from the config", stacklevel=3)
            tensors = {k: v for k, v in tensors.items() if k != file_key}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing:
        raise ValueError(f"{path}: missing {len(missing)} key(s), e.g. {missing[:3]}")
    if unexpected:
        raise ValueError(f"{path}: {len(unexpected)} unexpected key(s), e.g. {unexpected[:3]}")
    per_owner: dict[int, tuple[nn.Module, dict[str, torch.Tensor], str]] = {}
    for file_key, (owner, key, own) in expected.items():
        value = tensors[file_key]
        _check_tensor(value, own, f"{path}: key {file_key!r}")
        entry = per_owner.setdefault(id(owner), (owner, {}, file_key.rsplit(".", 1)[0]))
        entry[1][key] = value
    for owner, owner_tensors, where in per_owner.values():
        source = f"{path}: {where}"
        if isinstance(owner, (Adapter, SharedTensors)):
            owner.load_tensors(owner_tensors, source)
        else:
            _copy_in(owner, owner_tensors)


def _check_tensor(value: torch.Tensor, own: torch.Tensor, where: str) -> None:
    if own.dtype.is_floating_point != value.dtype.is_floating_point:
        kind = "a float" if own.dtype.is_floating_point else "an integer"
        raise ValueError(f"{where}: expected {kind} tensor, found {value.dtype}")
    if own.dtype.is_floating_point:
        if tuple(value.shape) != tuple(own.shape):
            raise ValueError(f"{where}: expected shape {tuple(own.shape)}, found {tuple(value.shape)}")
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"{where}: contains non-finite values (nan or inf)")
    elif value.dim() != own.dim() or (value.dim() == 2 and value.shape[0] != own.shape[0]):
        # index tensors: the count is checked with their meaning by the method (e.g. SHiRA's K)
        raise ValueError(f"{where}: expected shape {tuple(own.shape)}, found {tuple(value.shape)}")


@torch.no_grad()
def _copy_in(module: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    own = module.state_dict()
    for key, value in tensors.items():
        own[key].copy_(value.to(own[key].dtype))
