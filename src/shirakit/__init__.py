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

# public name -> the module that defines it
_EXPORTS = {
    # core: the contract and the configs
    "Adapter": "core.adapter", "LayerGeometry": "core.adapter", "AdapterConfig": "core.config",
    "AdapterLinear": "core.layer", "ModulesToSave": "core.layer", "ConcurrentUseError": "core.threads",
    "LoraConfig": "methods.lora", "MissConfig": "methods.miss", "ShiraConfig": "methods.shira",
    "VeraConfig": "methods.vera",
    # model operations
    "inject": "model.inject", "delete_adapter": "model.inject", "merge_and_unload": "model.inject",
    "unload": "model.inject",
    "active_adapters": "model.control", "delta_weights": "model.control", "disable_adapters": "model.control",
    "merge": "model.control", "print_trainable_parameters": "model.control", "set_adapter": "model.control",
    "set_scale": "model.control", "trainable_parameters": "model.control", "unmerge": "model.control",
    "switch_adapter": "model.switch", "route": "model.routing", "combine_adapters": "model.fusion",
    "adapter_orthogonality": "model.metrics", "calibrate": "model.calibration", "compute_masks": "model.calibration",
    "reset_adapter_parameters": "model.meta_init",
    # files
    "adapter_state_dict": "io.checkpoint", "load_adapter": "io.checkpoint", "save_adapter": "io.checkpoint",
    "read_config": "io.config_file",
    # torch.compile
    "prepare_for_hotswap": "model.hotswap",
    "RecompileError": "compile.slots", "RecompileWarning": "compile.slots", "set_recompile_policy": "compile.slots",
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

