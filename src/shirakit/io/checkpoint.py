"""Save and load adapters as PEFT's files: ``adapter_config.json`` + ``adapter_model.safetensors``.

One key rule, no per-method branches: the tensor ``k`` of adapter ``name`` held by the module at
path ``P`` (an AdapterLinear or a ModulesToSave) is ``P.adapters.<name>.<k>`` in the model and
``base_model.model.P.<k>`` in the file; a tensor ``k`` the adapter shares across layers
(:meth:`Adapter.make_shared`, e.g. VeRA's ``vera_A``) is ``base_model.<k>`` in the file, written
when the method's :meth:`Adapter.shared_in_checkpoint` says so. Files are read with safetensors
only (no pickle); the pair is written all or nothing (:mod:`shirakit.io.folder`). Loading validates
everything before the model is changed for good (layer tensors against the config before anything
is allocated), then builds the adapter with those values in one :func:`inject` transaction: on any
error nothing of it stays and the error names the file and the key.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch import nn

from ..core.adapter import Adapter
from ..core.capabilities import CompactFiles, supports
from ..core.config import AdapterConfig
from ..core.registry import method_for_config
from ..core.sharded_weights import full_values, is_sharded
from ..core.state import SharedTensors, check_adapter_names, check_drawn, hosts, shared_of, state_of
from ..core.threads import writes_weights
from ..core.validation import check_adapter_name
from ..model.control import merge as merge_adapters
from ..model.inject import inject
from ..model.tensors import AdapterTensors
from .atomic import check_regular_file
from .config_file import read_config
from .folder import BINDING_KEY, CONFIG_NAME, WEIGHTS_NAME, check_save_target, digest, write_adapter_folder
from .hub import resolve_adapter_source

PREFIX = "base_model.model."
# safetensors metadata naming the file's layout: absent = PEFT's; COMPACT_V1 = methods' compact
# layouts (core.capabilities.CompactFiles; SHiRA's is shirakit.methods.shira.compact), shirakit only.
FORMAT_KEY = "shirakit_format"
COMPACT_V1 = "compact-v1"


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
    """A CPU, contiguous, plain tensor; an FSDP2-sharded parameter (a DTensor) is gathered whole first
    (a collective, so every rank must make this call)."""
    return full_values(tensor).detach().to("cpu").contiguous()


def adapter_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's file keys (CPU, contiguous). Under FSDP2 (fully_shard) the
    sharded tensors are gathered, a collective: call it (or :func:`save_adapter`) on every rank."""
    check_adapter_names(model, [adapter_name])
    check_drawn(model, "save the adapter")
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
    """Write ``adapter_config.json`` and ``adapter_model.safetensors``, all or nothing: after a
    crash or kill at any instant the folder reads as the previous adapter or this one
    (:mod:`shirakit.io.folder`).

    ``compact=True`` writes methods that have a compact layout (SHiRA: <= 6 bytes per value, see
    :mod:`shirakit.methods.shira.compact`) in it; such a file is for shirakit only, PEFT cannot read it.

    Under FSDP2 the adapter's sharded tensors are gathered, a collective: call it on every rank
    (as accelerate and Trainer do). Rank 0 writes the complete adapter, the others wait for it, so
    no rank returns before the folder is there and no two ranks race to rename into one folder.
    """
    state = state_of(model)
    check_adapter_names(model, [adapter_name])
    directory = check_save_target(directory)  # on every rank, before the gather: no rank waits on a refusal
    sharded = _sharded(model, adapter_name)
    tensors = adapter_state_dict(model, adapter_name)
    metadata = {"format": "pt"}
    if compact:
        metadata[FORMAT_KEY] = COMPACT_V1
        for path, host in hosts(model):
            owner = host.adapters[adapter_name] if adapter_name in host.adapters else None
            if isinstance(owner, Adapter) and supports(owner, CompactFiles):
                packed = owner.compact_tensors()
                prefix = _file_key(path, "")
                tensors = {k: v for k, v in tensors.items() if not k.startswith(prefix)}
                tensors.update({prefix + k: v.detach().to("cpu").contiguous() for k, v in packed.items()})
    config = state.configs[adapter_name]
    name_or_path = config.base_model_name_or_path or getattr(getattr(model, "config", None), "_name_or_path", None)
    config_bytes = replace(config, inference_mode=True, base_model_name_or_path=name_or_path or None).to_json_bytes()
    metadata[BINDING_KEY] = digest(config_bytes)  # binds the pair: see shirakit.io.folder
    if not sharded or torch.distributed.get_rank() == 0:
        write_adapter_folder(directory, config_bytes, save(tensors, metadata=metadata))
    if sharded:
        torch.distributed.barrier()
    return directory


def _sharded(model: nn.Module, adapter_name: str) -> bool:
    """Is any of the adapter's tensors an FSDP2 shard (so every rank takes part in saving it)?"""
    return any(is_sharded(t) for _, host in hosts(model) if adapter_name in host.adapters
               for t in host.adapters[adapter_name].state_dict().values())


def read_weights(directory: str | Path) -> tuple[Path, dict[str, torch.Tensor], dict[str, str]]:
    """(path, tensors, metadata) of ``adapter_model.safetensors``; safetensors only, no pickle."""
    path = Path(directory) / WEIGHTS_NAME
    check_regular_file(path, "adapter weights")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError, OverflowError) as exc:
        raise ValueError(f"{path}: not a readable safetensors file: {exc}") from None
    layout = metadata.get(FORMAT_KEY)
    if layout not in (None, COMPACT_V1):
        raise ValueError(f"{path}: unknown {FORMAT_KEY} {layout!r}; expected none (PEFT's layout) or {COMPACT_V1!r}")
    return path, tensors, metadata


@dataclass(frozen=True)
class AdapterFiles:
    """An adapter folder's two files, read and checked as files, not yet matched to any model."""

    directory: Path
    config: AdapterConfig
    weights_path: Path
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]


def read_adapter_files(directory: str | Path) -> AdapterFiles:
    """Read ``adapter_config.json`` and ``adapter_model.safetensors`` (no model needed, so a server
    can do it off the thread that owns the model; :func:`load_adapter` then takes the result).
    ``directory`` may be a Hugging Face repo id already in the local hub cache (:mod:`shirakit.io.hub`;
    a local folder of that name wins)."""
    directory = resolve_adapter_source(directory)
    config = read_config(directory)
    path, tensors, metadata = read_weights(directory)
    return AdapterFiles(Path(directory), config, path, tensors, metadata)


@writes_weights
def load_adapter(
    model: nn.Module,
    directory: str | Path | AdapterFiles,
    adapter_name: str = "default",
    is_trainable: bool = False,
    merge: bool = False,
) -> nn.Module:
    """Add the adapter saved in ``directory`` (by shirakit or by PEFT, either layout) under
    ``adapter_name``; ``directory`` may also be a repo id (``"org/name"``) already in the local Hugging Face
    hub cache, never downloaded (:mod:`shirakit.io.hub`). It becomes the active adapter; its parameters train only with
    ``is_trainable=True``; ``merge=True`` also merges it (fused mode). ``directory`` may also be
    the :class:`AdapterFiles` that :func:`read_adapter_files` read before.

    Read, check, inject: the files are read and their keys split by the key rule, then
    :func:`~shirakit.model.inject.inject` checks the values against the config on the meta device
    and builds the adapter with them as one transaction; any refusal leaves the model exactly as it was.
    """
    check_adapter_name(adapter_name)
    files = directory if isinstance(directory, AdapterFiles) else read_adapter_files(directory)
    config = replace(files.config, inference_mode=not is_trainable)  # files may be loaded again
    with _naming(files.directory / CONFIG_NAME):  # a config the model cannot take: say which file
        inject(model, config, adapter_name, tensors=_file_tensors(files))
    if merge:
        merge_adapters(model, [adapter_name])
    return model


@contextlib.contextmanager
def _naming(path: Path) -> Iterator[None]:
    """Errors raised inside name ``path`` (e.g. "target_modules matched no module" comes from inject,
    which knows nothing of files)."""
    try:
        yield
    except (ValueError, TypeError) as exc:
        if str(path.parent) in str(exc):
            raise
        raise (TypeError if isinstance(exc, TypeError) else ValueError)(f"{path}: {exc}") from exc


def _file_tensors(files: AdapterFiles) -> AdapterTensors:
    """The file's tensors split by the key rule into layer and shared tensors, for inject (which
    checks them against the adapter it builds, on the meta device first: see
    :mod:`shirakit.model.tensors`); a key the rule does not know is refused here."""
    path, tensors = files.weights_path, files.tensors
    shared_prefix = _shared_file_key("")
    foreign = sorted(k for k in tensors if not k.startswith(shared_prefix))
    if foreign:
        raise ValueError(f"{path}: {len(foreign)} unexpected key(s), e.g. {foreign[:3]}")
    layers = {k[len(PREFIX):]: v for k, v in tensors.items() if k.startswith(PREFIX)}
    shared = {k[len(shared_prefix):]: v for k, v in tensors.items() if not k.startswith(PREFIX)}
    return AdapterTensors(layers, shared, source=str(path), prefix=PREFIX, shared_prefix=shared_prefix,
                          compact=files.metadata.get(FORMAT_KEY) == COMPACT_V1)
