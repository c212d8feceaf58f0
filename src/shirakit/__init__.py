"""shirakit: parameter-efficient fine-tuning built around SHiRA (Sparse High-Rank Adapters).

    import shirakit
    shirakit.inject(model, shirakit.ShiraConfig(r=32, target_modules="all-linear"))
    ...train...
    shirakit.save_adapter(model, "out/my-adapter")
"""

from . import methods  # noqa: F401  (registers every method)
from .adapter import Adapter, LayerGeometry
from .calibration import calibrate, compute_masks
from .checkpoint import adapter_state_dict, load_adapter, save_adapter
from .config import AdapterConfig, read_config
from .control import (
    active_adapters,
    delta_weights,
    disable_adapters,
    merge,
    print_trainable_parameters,
    set_adapter,
    set_scale,
    trainable_parameters,
    unmerge,
)
from .fusion import combine_adapters
from .inject import delete_adapter, inject, merge_and_unload, unload
from .layer import AdapterLinear, ModulesToSave
from .methods.lora import LoraConfig
from .methods.miss import MissConfig
from .methods.shira import ShiraConfig
from .methods.vera import VeraConfig
from .metrics import adapter_orthogonality
from .routing import route
from .switching import switch_adapter

__version__ = "0.1.0"

__all__ = [
    "Adapter", "AdapterConfig", "AdapterLinear", "LayerGeometry", "LoraConfig", "MissConfig", "ModulesToSave",
    "ShiraConfig", "VeraConfig",
    "active_adapters", "adapter_orthogonality", "adapter_state_dict", "combine_adapters", "route",
    "switch_adapter", "calibrate", "compute_masks", "delete_adapter",
    "delta_weights", "disable_adapters", "inject", "load_adapter", "merge", "merge_and_unload",
    "print_trainable_parameters", "read_config", "save_adapter", "set_adapter", "set_scale",
    "trainable_parameters", "unload", "unmerge",
]
