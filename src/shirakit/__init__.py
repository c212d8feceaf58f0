"""shirakit: parameter-efficient fine-tuning built around SHiRA (Sparse High-Rank Adapters).

    import shirakit
    shirakit.inject(model, shirakit.ShiraConfig(r=32, target_modules="all-linear"))
    ...train...
    shirakit.save_adapter(model, "out/my-adapter")

The names below are imported on first use (PEP 562), so ``import shirakit`` and the command
line's ``--help`` do not pay for torch until something needs it.
"""

from __future__ import annotations

import importlib
import sys
import types

# public name -> the module that defines it
_EXPORTS = {
    "Adapter": "adapter", "LayerGeometry": "adapter",
    "calibrate": "methods.shira", "compute_masks": "methods.shira",
    "adapter_state_dict": "checkpoint", "load_adapter": "checkpoint", "save_adapter": "checkpoint",
    "AdapterConfig": "config", "read_config": "config",
    "active_adapters": "control", "delta_weights": "control", "disable_adapters": "control", "merge": "control",
    "print_trainable_parameters": "control", "set_adapter": "control",
    "set_scale": "control", "trainable_parameters": "control", "unmerge": "control",
    "combine_adapters": "fusion",
    "ConcurrentUseError": "guard",
    "prepare_for_hotswap": "hotswap",
    "RecompileError": "slots", "RecompileWarning": "slots", "set_recompile_policy": "slots",
    "delete_adapter": "inject", "inject": "inject", "merge_and_unload": "inject", "unload": "inject",
    "AdapterLinear": "layer", "ModulesToSave": "layer",
    "reset_adapter_parameters": "materialize",
    "LoraConfig": "methods.lora", "MissConfig": "methods.miss", "ShiraConfig": "methods.shira",
    "VeraConfig": "methods.vera",
    "adapter_orthogonality": "metrics",
    "route": "routing",
    "switch_adapter": "switching",
}

__version__ = "0.1.0"
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'shirakit' has no attribute {name!r}")
    from . import methods  # noqa: F401  (registers every method: configs read from files need them)

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


class _Package(types.ModuleType):
    """Importing the submodule ``shirakit.inject`` must not hide the function ``shirakit.inject``
    (Python sets a package attribute per imported submodule): the exported name wins."""

    def __setattr__(self, name: str, value) -> None:
        if isinstance(value, types.ModuleType) and name in _EXPORTS:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
