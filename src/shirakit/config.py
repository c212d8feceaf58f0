"""Adapter configurations, serialised as PEFT's ``adapter_config.json``.

Every method's config is a dataclass subclass of :class:`AdapterConfig` whose field names and
defaults are PEFT's, so the JSON we write is a file ``peft.PeftConfig.from_pretrained`` reads, and
a file PEFT wrote is one we read. PEFT writes many fields for features shirakit does not have
(DoRA, LoftQ, ...); on load those are accepted when they hold PEFT's default and refused with a
clear error otherwise, so a checkpoint is never silently loaded as something it is not.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from .io_utils import atomic_write_bytes
from .registry import method_for_peft_type

CONFIG_NAME = "adapter_config.json"

# Fields PEFT writes for features shirakit does not implement, with the value that means "off".
# A file that has any of them set to something else describes an adapter we cannot reproduce.
_PEFT_FEATURES_OFF: dict[str, Any] = {
    "use_dora": False,
    "lora_bias": False,
    "use_qalora": False,
    "use_bdlora": None,
    "layer_replication": None,
    "rank_pattern": {},
    "alpha_pattern": {},
    "loftq_config": {},
    "eva_config": None,
    "corda_config": None,
    "kasa_config": None,
    "lora_ga_config": None,
    "monteclora_config": None,
    "velora_config": None,
    "arrow_config": None,
    "trainable_token_indices": None,
    "target_parameters": None,
    "alora_invocation_tokens": None,
    "megatron_config": None,
}
# Fields PEFT writes that carry no meaning for shirakit's numerics (bookkeeping only).
_PEFT_BOOKKEEPING = {
    "auto_mapping", "peft_version", "megatron_core", "qalora_group_size", "ensure_weight_tying",
    "init_lora_weights_kwargs",
}

_SEQ_CLS_HEADS = ["classifier", "score"]


@dataclass
class AdapterConfig:
    """Fields every method shares; subclasses add their own with PEFT's names and defaults."""

    peft_type: ClassVar[str] = ""
    #: Shared fields that PEFT's config for this method lacks: written only when set, so PEFT
    #: reads our files without "unexpected keyword" warnings.
    absent_in_peft: ClassVar[frozenset[str]] = frozenset()

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.exclude_modules, (set, tuple)):
            self.exclude_modules = sorted(self.exclude_modules)
        if self.modules_to_save is not None:
            self.modules_to_save = list(self.modules_to_save)
        # PEFT trains the classification head for SEQ_CLS without being asked; users expect the same.
        if self.task_type == "SEQ_CLS":
            extra = [h for h in _SEQ_CLS_HEADS if h not in (self.modules_to_save or [])]
            self.modules_to_save = list(self.modules_to_save or []) + extra

    # ---- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The JSON-able dict PEFT expects: our fields plus ``peft_type``; no callables."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.metadata.get("serialize", True) and not (f.name in self.absent_in_peft and value is None):
                out[f.name] = value
        out["peft_type"] = self.peft_type
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>") -> AdapterConfig:
        """Build the config; reject PEFT features we do not implement, warn on unknown fields."""
        data = dict(data)
        found_type = data.pop("peft_type", cls.peft_type)
        if found_type != cls.peft_type:
            raise ValueError(f"{source}: expected peft_type {cls.peft_type!r}, found {found_type!r}")
        ours = {f.name for f in dataclasses.fields(cls) if f.init}
        kwargs = {}
        for key, value in data.items():
            if key in ours:
                kwargs[key] = value
            elif key in _PEFT_FEATURES_OFF:
                if value not in (_PEFT_FEATURES_OFF[key], None, {}, [], False):
                    raise ValueError(
                        f"{source}: field {key!r} = {value!r} asks for a PEFT feature shirakit does not "
                        f"implement (expected {_PEFT_FEATURES_OFF[key]!r}); refusing to load it as "
                        "something else"
                    )
            elif key not in _PEFT_BOOKKEEPING:
                warnings.warn(f"{source}: ignoring unknown config field {key!r} = {value!r}", stacklevel=3)
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{source}: invalid {cls.__name__}: {exc}") from exc

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / CONFIG_NAME
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"
        atomic_write_bytes(path, text.encode())
        return path


def read_config(directory: str | Path) -> AdapterConfig:
    """Read ``adapter_config.json`` and return the matching method's config."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no adapter config here (expected {CONFIG_NAME})")
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(data, dict) or "peft_type" not in data:
        raise ValueError(f"{path}: expected a JSON object with a 'peft_type' key")
    method = method_for_peft_type(data["peft_type"], source=str(path))
    return method.config_class.from_dict(data, source=str(path))


def no_serialize() -> Any:
    """A dataclass field kept out of adapter_config.json (e.g. a Python callable)."""
    return field(default=None, metadata={"serialize": False}, repr=False, compare=False)
