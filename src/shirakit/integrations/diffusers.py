"""Adapters on a diffusers pipeline: a pipeline is a set of components, each an ``nn.Module``.

    import shirakit.diffusers as sd
    sd.inject(pipe, shirakit.ShiraConfig(r=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"]), "style")
    sd.save_adapter(pipe, "out/style", "style")      # out/style/unet/{adapter_config.json, adapter_model.safetensors}
    sd.load_adapter(pipe, "out/other", "other")      # or a diffusers/kohya LoRA file: pytorch_lora_weights.safetensors
    sd.switch_adapter(pipe, "style")                 # fused: each component switches (SHiRA: two scatters a layer)
    sd.combine_adapters(pipe, ["style", "other"], [1.0, 1.0], "both")

The denoiser (``unet``, ``transformer``, ``prior`` or ``decoder``: any diffusers ``ModelMixin``) and the text
encoders (transformers models) are adapted by shirakit's model-level functions, one component at a time; this module
only decides which components take part and keeps pipeline-wide operations all or nothing.

An adapter folder holds one PEFT-format subfolder per component it adapts (``unet/``, ``text_encoder/``, ...), so
``peft.PeftModel.from_pretrained(pipe.unet, "out/style/unet")`` reads each part. The pipeline's active adapters are
one list: each component runs the names in it that it holds (a component holding none runs as its base).

``pipe`` is a diffusers pipeline (anything with a ``components`` dict) or a plain ``{name: nn.Module}`` dict.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from torch import nn

from ..core.config import AdapterConfig
from ..core.state import ModelAdapters
from ..core.validation import check_adapter_name
from ..io import checkpoint
from ..io.checkpoint import AdapterFiles, read_adapter_files
from ..io.folder import CONFIG_NAME
from ..model import control, fusion, hotswap, metrics, switch
from ..model import inject as inject_ops

__all__ = [
    "components", "denoiser_name", "adapted", "holders", "adapter_names", "active_adapters", "inject",
    "read_pipeline_adapter", "load_adapter", "save_adapter", "combine_adapters", "set_adapter", "switch_adapter",
    "merge", "unmerge", "set_scale", "disable_adapters", "delete_adapter", "unload", "prepare_for_hotswap",
    "adapter_orthogonality", "trainable_parameters", "adapter_tensors",
]

DENOISERS = ("unet", "transformer", "prior", "decoder")
LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' LoRA file name (diffusers.loaders.lora_base)


# ---- the components -------------------------------------------------------------------------------------------
def components(pipe) -> dict[str, nn.Module]:
    """The pipeline's ``nn.Module`` components by name (tokenizers, schedulers and absent parts left out)."""
    if isinstance(pipe, nn.Module):
        raise TypeError(f"expected a diffusers pipeline or a dict of components, found the module "
                        f"{type(pipe).__name__}; for one model use shirakit's own functions (shirakit.inject, ...)")
    found = pipe if isinstance(pipe, Mapping) else getattr(pipe, "components", None)
    if not isinstance(found, Mapping):
        raise TypeError(f"expected a diffusers pipeline (with a .components dict) or a dict of components, "
                        f"found {type(pipe).__name__}")
    return {name: module for name, module in found.items() if isinstance(module, nn.Module)}


def denoiser_name(pipe) -> str:
    """The component that predicts the noise: ``unet``, ``transformer``, ``prior`` or ``decoder``."""
    parts = components(pipe)
    for name in DENOISERS:
        if name in parts:
            return name
    raise ValueError(f"expected a denoiser component (one of {', '.join(DENOISERS)}), found {sorted(parts)}")


def _state(module: nn.Module) -> ModelAdapters | None:
    state = getattr(module, "shirakit", None)
    return state if isinstance(state, ModelAdapters) else None


def adapted(pipe) -> dict[str, nn.Module]:
    """The components that hold shirakit adapters."""
    return {name: module for name, module in components(pipe).items() if _state(module) is not None}


def holders(pipe, name: str) -> dict[str, nn.Module]:
    """The components holding adapter ``name``; a name no component holds is refused."""
    found = {c: m for c, m in adapted(pipe).items() if name in _state(m).configs}
    if not found:
        raise KeyError(f"unknown adapter {name!r}; this pipeline has {adapter_names(pipe)}")
    return found


def adapter_names(pipe) -> list[str]:
    """Every adapter name any component holds."""
    return sorted({n for module in adapted(pipe).values() for n in _state(module).configs})


def active_adapters(pipe) -> dict[str, list[str]]:
    """Each adapted component's active adapters."""
    return {c: list(_state(m).active) for c, m in adapted(pipe).items()}


# ---- all or nothing across components ---------------------------------------------------------------------------
class _Undo:
    """Takes back adapters added to components, newest first: a fresh component gets its original layers and
    trainable flags back, one that had adapters loses the new one and gets its active list back. (The model-level
    functions are all or nothing themselves: only components whose part went in completely are undone here.)"""

    def __init__(self) -> None:
        self.steps: list = []

    @staticmethod
    def step_for(module: nn.Module, name: str):
        """The step that undoes adding ``name`` to ``module``, made before the add (it records what was)."""
        state = _state(module)
        if state is None:
            trainable = [p for p in module.parameters() if p.requires_grad]
            return lambda: (inject_ops.unload(module), [p.requires_grad_(True) for p in trainable])
        active = list(state.active)

        def back() -> None:
            if name in state.configs:
                if any(name in layer.merged for _, layer in _layers(module)):
                    control.unmerge(module)
                inject_ops.delete_adapter(module, name)
            control.set_adapter(module, [n for n in active if n in state.configs])

        return back

    def run(self) -> None:
        for step in reversed(self.steps):
            step()


def _layers(module: nn.Module):
    from ..core.state import adapter_layers

    return adapter_layers(module)


def _adding(pipe, name: str, parts: Mapping[str, object], add) -> None:
    """``add(component_name, module, value)`` for each of ``parts``; a failure undoes the ones done."""
    check_adapter_name(name)
    taken = [c for c, m in adapted(pipe).items() if name in _state(m).configs]
    if taken:
        raise ValueError(f"adapter {name!r} already exists in {taken}; delete it first or use another name")
    modules = components(pipe)
    unknown = sorted(set(parts) - set(modules))
    if unknown:
        raise ValueError(f"no component named {unknown} in this pipeline; its components are {sorted(modules)}")
    undo = _Undo()
    try:
        for component, value in parts.items():
            step = undo.step_for(modules[component], name)
            add(component, modules[component], value)
            undo.steps.append(step)
        set_adapter(pipe, name)
    except BaseException:
        undo.run()
        raise


# ---- adding adapters --------------------------------------------------------------------------------------------
def inject(pipe, config: AdapterConfig | Mapping[str, AdapterConfig], adapter_name: str = "default"):
    """Add a new adapter: ``config`` for the denoiser, or ``{component: config}`` (e.g. ``{"unet": ...,
    "text_encoder": ...}``). It becomes the pipeline's active adapter. All or nothing across components."""
    if isinstance(config, AdapterConfig):
        config = {denoiser_name(pipe): config}
    if not isinstance(config, Mapping) or not config:
        raise TypeError(f"expected an AdapterConfig or a non-empty {{component: AdapterConfig}}, found {config!r}")
    bad = {c: type(v).__name__ for c, v in config.items() if not isinstance(v, AdapterConfig)}
    if bad:
        raise TypeError(f"expected an AdapterConfig for each component, found {bad}")
    _adding(pipe, adapter_name, config, lambda c, module, cfg: inject_ops.inject(module, cfg, adapter_name))
    return pipe


def read_pipeline_adapter(pipe, folder: str | Path) -> dict[str, AdapterFiles]:
    """An adapter folder's files per component, read and checked as files (no component changed): shirakit's
    layout (one PEFT folder per component), or a diffusers / kohya LoRA file (:mod:`.diffusers_lora`)."""
    folder = Path(folder)
    if folder.is_file() or (folder / LORA_FILE).is_file():
        from .diffusers_lora import read_lora_file

        parts = components(pipe)
        denoiser = next((name for name in DENOISERS if name in parts), None)
        return read_lora_file(parts, denoiser, folder / LORA_FILE if folder.is_dir() else folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such adapter folder")
    if (folder / CONFIG_NAME).is_file():
        raise ValueError(f"{folder}: a single-model adapter folder; a pipeline adapter holds one subfolder per "
                         f"component ({', '.join(DENOISERS)}, text_encoder, ...). Load it into one component with "
                         f"shirakit.load_adapter(pipe.unet, ...)")
    parts = {p.name: p for p in sorted(folder.iterdir()) if (p / CONFIG_NAME).is_file()}
    if not parts:
        raise ValueError(f"{folder}: expected component subfolders holding {CONFIG_NAME} (unet/, text_encoder/, ...) "
                         f"or {LORA_FILE}, found neither")
    modules = components(pipe)
    unknown = sorted(set(parts) - set(modules))
    if unknown:
        raise ValueError(f"{folder}: subfolder(s) {unknown} name no component of this pipeline ({sorted(modules)})")
    return {name: read_adapter_files(path) for name, path in parts.items()}


def load_adapter(pipe, folder: str | Path, adapter_name: str = "default", is_trainable: bool = False,
                 merge: bool = False):
    """Load the adapter in ``folder`` into each component it has a part for; it becomes the active adapter
    (``merge=True``: fused). Every file is read and checked before any component changes, and a component that
    refuses its part undoes the parts loaded before it: the pipeline is as it was."""
    files = read_pipeline_adapter(pipe, folder)

    def add(component, module, part):
        checkpoint.load_adapter(module, part, adapter_name, is_trainable=is_trainable)

    _adding(pipe, adapter_name, files, add)
    if merge:
        switch_adapter(pipe, adapter_name)
    return pipe


def save_adapter(pipe, folder: str | Path, adapter_name: str = "default", compact: bool = False) -> Path:
    """Write ``folder/<component>/{adapter_config.json, adapter_model.safetensors}`` for each component holding
    ``adapter_name``. The folder is replaced whole: written beside it, then renamed into place."""
    parts = holders(pipe, adapter_name)
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        for component, module in parts.items():
            checkpoint.save_adapter(module, staging / component, adapter_name, compact=compact)
        old = None
        if folder.exists():
            old = folder.parent / f"{staging.name}.old"
            os.replace(folder, old)
        os.replace(staging, folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def combine_adapters(pipe, names: list[str], weights: list[float], new_name: str):
    """``new_name`` = sum_i weights[i] * names[i] in every component holding any of them (each method's exact
    ``combine``; SHiRA: the union of the supports). It becomes the active adapter. All or nothing."""
    if len(names) != len(weights):
        raise ValueError(f"expected one weight per adapter ({len(names)}), found {len(weights)}")
    for n in names:
        holders(pipe, n)  # every name held somewhere
    parts = {}
    for component, module in adapted(pipe).items():
        held = [(n, w) for n, w in zip(names, weights) if n in _state(module).configs]
        if held:
            parts[component] = held

    def add(component, module, held):
        fusion.combine_adapters(module, [n for n, _ in held], [w for _, w in held], new_name)

    _adding(pipe, new_name, parts, add)
    return pipe


# ---- which adapters run -----------------------------------------------------------------------------------------
def _check_known(pipe, names: list[str]) -> None:
    known = adapter_names(pipe)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise KeyError(f"unknown adapter(s) {unknown}; this pipeline has {known}")


def set_adapter(pipe, names: str | list[str]) -> None:
    """Make ``names`` the active adapters (unmerged); each component runs those it holds."""
    names = [names] if isinstance(names, str) else list(names)
    _check_known(pipe, names)
    for module in adapted(pipe).values():
        control.set_adapter(module, [n for n in names if n in _state(module).configs])


def switch_adapter(pipe, adapter_name: str | None, exact: bool = False) -> None:
    """Fused mode: ``adapter_name`` merged into every component holding it, the others back to their base
    (None: the whole pipeline is the base). SHiRA switches by two scatters per layer, bit-exactly."""
    if adapter_name is not None:
        _check_known(pipe, [adapter_name])
    for module in adapted(pipe).values():
        held = adapter_name is not None and adapter_name in _state(module).configs
        switch.switch_adapter(module, adapter_name if held else None, exact=exact)


def merge(pipe, adapter_names: list[str] | None = None) -> None:
    """Fold adapters (default: the active ones) into each component's weights."""
    for module in adapted(pipe).values():
        held = None if adapter_names is None else [n for n in adapter_names if n in _state(module).configs]
        if held != []:
            control.merge(module, held)


def unmerge(pipe) -> None:
    for module in adapted(pipe).values():
        control.unmerge(module)


def set_scale(pipe, adapter_name: str, scale: float) -> None:
    """An adapter's strength in every component holding it (SHiRA's scaling, LoRA's multiplier)."""
    for module in holders(pipe, adapter_name).values():
        control.set_scale(module, adapter_name, scale)


@contextlib.contextmanager
def disable_adapters(pipe) -> Iterator[None]:
    """Within the block the pipeline computes as its base (merged adapters are taken out and put back)."""
    with contextlib.ExitStack() as stack:
        for module in adapted(pipe).values():
            stack.enter_context(control.disable_adapters(module))
        yield


# ---- taking adapters out ----------------------------------------------------------------------------------------
def delete_adapter(pipe, adapter_name: str) -> None:
    """Remove one adapter from every component holding it (refused while merged: switch to None first)."""
    parts = holders(pipe, adapter_name)
    merged = [c for c, m in parts.items() if any(adapter_name in layer.merged for _, layer in _layers(m))]
    if merged:
        raise RuntimeError(f"adapter {adapter_name!r} is merged in {merged}; switch_adapter(pipe, None) first")
    for module in parts.values():
        inject_ops.delete_adapter(module, adapter_name)


def unload(pipe, merge: bool = False):
    """Every component gets its original layers back (``merge=True``: with the active adapters folded in)."""
    for module in adapted(pipe).values():
        inject_ops.unload(module, merge=merge)
    return pipe


# ---- torch.compile, metrics ------------------------------------------------------------------------------------
def prepare_for_hotswap(pipe, *, r: int | None = None, target_modules: Mapping[str, list[str] | str] | None = None,
                        on_recompile: str = "warn"):
    """:func:`shirakit.prepare_for_hotswap` on each adapted component (before compiling them).
    ``target_modules``: ``{component: targets}`` to wrap beyond what the loaded adapters target."""
    targets = dict(target_modules or {})
    parts = adapted(pipe)
    unknown = sorted(set(targets) - set(parts))
    if unknown:
        raise ValueError(f"target_modules names component(s) {unknown} that hold no adapter; adapted: {sorted(parts)}")
    for component, module in parts.items():
        hotswap.prepare_for_hotswap(module, r=r, target_modules=targets.get(component), on_recompile=on_recompile)
    return pipe


def adapter_orthogonality(pipe, name1: str, name2: str) -> dict[str, list]:
    """AWOM / AWOR per layer of each component holding both adapters (SHiRA paper §4.3)."""
    both = {c: m for c, m in holders(pipe, name1).items() if name2 in _state(m).configs}
    return {c: metrics.adapter_orthogonality(m, name1, name2) for c, m in both.items()}


def trainable_parameters(pipe) -> tuple[int, int]:
    """(trainable, total) over the adapted components."""
    counts = [control.trainable_parameters(m) for m in adapted(pipe).values()]
    return sum(c[0] for c in counts), sum(c[1] for c in counts)


@torch.no_grad()
def adapter_tensors(pipe, adapter_name: str) -> dict[str, dict[str, torch.Tensor]]:
    """Each component's adapter tensors under PEFT's file keys."""
    return {c: checkpoint.adapter_state_dict(m, adapter_name) for c, m in holders(pipe, adapter_name).items()}
