"""Save and load adapters as PEFT's files: ``adapter_config.json`` + ``adapter_model.safetensors``.

One key rule, no per-method branches: the tensor ``k`` of adapter ``name`` held by the module at
path ``P`` (an AdapterLinear or a ModulesToSave) is ``P.adapters.<name>.<k>`` in the model and
``base_model.model.P.<k>`` in the file. Files are read with safetensors only (no pickle) and
written atomically. Loading validates everything before the model is changed for good: on any
error the half-built adapter is removed again and the error names the file and the key.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import nn

from .adapter import Adapter
from .config import read_config
from .control import set_adapter
from .inject import check_adapter_names, delete_adapter, hosts, inject, state_of, unload
from .io_utils import atomic_write_bytes

WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."


def _file_key(module_path: str, key: str) -> str:
    return f"{PREFIX}{module_path}.{key}"


def adapter_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's file keys (CPU, contiguous)."""
    check_adapter_names(model, [adapter_name])
    out = {}
    for path, host in hosts(model):
        if adapter_name in host.adapters:
            for key, tensor in host.adapters[adapter_name].state_dict().items():
                out[_file_key(path, key)] = tensor.detach().to("cpu").contiguous()
    return out


def save_adapter(model: nn.Module, directory: str | Path, adapter_name: str = "default") -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` (each atomically)."""
    state = state_of(model)
    check_adapter_names(model, [adapter_name])
    directory = Path(directory)
    tensors = adapter_state_dict(model, adapter_name)
    atomic_write_bytes(directory / WEIGHTS_NAME, save(tensors, metadata={"format": "pt"}))
    config = state.configs[adapter_name]
    saved_config = type(config).from_dict(config.to_dict())
    saved_config.mask_fn = getattr(config, "mask_fn", None) if hasattr(saved_config, "mask_fn") else None
    saved_config.inference_mode = True
    if saved_config.base_model_name_or_path is None:
        name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None)
        saved_config.base_model_name_or_path = name_or_path or None
    saved_config.save(directory)
    return directory


def read_weights(directory: str | Path) -> tuple[Path, dict[str, torch.Tensor]]:
    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no adapter weights here (expected {WEIGHTS_NAME})")
    try:
        return path, load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{path}: not a readable safetensors file: {exc}") from exc


def load_adapter(
    model: nn.Module, directory: str | Path, adapter_name: str = "default", is_trainable: bool = False
) -> nn.Module:
    """Add the adapter saved in ``directory`` (by shirakit or by PEFT) under ``adapter_name``.

    It becomes the active adapter; its parameters train only with ``is_trainable=True``.
    """
    config = read_config(directory)
    config.inference_mode = not is_trainable
    path, tensors = read_weights(directory)
    had_adapters = getattr(model, "shirakit", None) is not None
    previous_active = list(model.shirakit.active) if had_adapters else []
    inject(model, config, adapter_name, _from_checkpoint=True)
    try:
        _fill(model, adapter_name, tensors, path)
    except BaseException:
        delete_adapter(model, adapter_name)
        if had_adapters:
            set_adapter(model, previous_active) if previous_active else None
        else:
            unload(model)
        raise
    return model


def _fill(model: nn.Module, adapter_name: str, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Check the file's tensors against what the model expects, then copy them in."""
    expected: dict[str, tuple[nn.Module, str, torch.Tensor]] = {}
    for module_path, host in hosts(model):
        if adapter_name in host.adapters:
            owner = host.adapters[adapter_name]
            for key, tensor in owner.state_dict().items():
                expected[_file_key(module_path, key)] = (owner, key, tensor)
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
        if isinstance(owner, Adapter):
            owner.load_tensors(owner_tensors, source)
        else:
            _copy_in(owner, owner_tensors)


def _check_tensor(value: torch.Tensor, own: torch.Tensor, where: str) -> None:
    if own.dtype.is_floating_point != value.dtype.is_floating_point:
        raise ValueError(f"{where}: expected {'a float' if own.dtype.is_floating_point else 'an integer'} tensor, found {value.dtype}")
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
