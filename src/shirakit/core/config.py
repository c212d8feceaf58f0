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
from typing import Any, ClassVar

from .validation import check_fields, check_regex, short_repr

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
    #: Shared fields that PEFT's config for this method lacks: written only when not at their
    #: default, so PEFT reads our files without "unexpected keyword" warnings.
    absent_in_peft: ClassVar[frozenset[str]] = frozenset()

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    fan_in_fan_out: bool = False  # weights stored (in, out), as GPT-2's Conv1D; inject records it
    bias: str = "none"
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.exclude_modules, (set, tuple)):
            self.exclude_modules = sorted(self.exclude_modules)
        if isinstance(self.modules_to_save, set):
            self.modules_to_save = sorted(self.modules_to_save)
        for f in dataclasses.fields(self):  # tuples are lists to the schema (and to JSON)
            if isinstance(getattr(self, f.name), tuple):
                setattr(self, f.name, list(getattr(self, f.name)))
        check_fields(self)  # every field against its annotation: no "false" for a bool, no NaN alpha
        self._check_targets()
        if self.bias != "none":
            raise ValueError(f"bias={self.bias!r} is not supported yet; expected 'none'")
        # PEFT trains the classification head for SEQ_CLS without being asked; users expect the same.
        if self.task_type == "SEQ_CLS":
            extra = [h for h in _SEQ_CLS_HEADS if h not in (self.modules_to_save or [])]
            self.modules_to_save = list(self.modules_to_save or []) + extra

    @property
    def seed(self) -> int | None:
        """The seed of the adapter's random draws when the config fixes one (SHiRA's ``random_seed``);
        None: inject takes one from torch's global generator."""
        return None

    @classmethod
    def recipe(cls, r: int, target_modules, modules_to_save=None, seed: int = 0, **options: Any) -> AdapterConfig:
        """This method's config at rank ``r`` for training recipes (the CLI, the demo): the method
        picks what else rank ``r`` means for it (LoRA: ``lora_alpha = 2 r``) and where its seed goes.
        ``options`` are the method's own fields (SHiRA's ``mask_type``)."""
        return cls(r=r, target_modules=target_modules, modules_to_save=modules_to_save, **options)

    def _check_targets(self) -> None:
        """Regex strings must compile; PEFT's rule: layer selection needs a list of targets."""
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, str) and value.lower() != "all-linear":
                check_regex(value, name)
        pattern = getattr(self, "layers_pattern", None)
        for value in [pattern] if isinstance(pattern, str) else pattern or []:
            check_regex(value, "layers_pattern")
        if isinstance(self.target_modules, str):
            for name in ("layers_to_transform", "layers_pattern"):
                if getattr(self, name, None) not in (None, [], ""):
                    raise ValueError(f"{name} cannot be used when target_modules is a string "
                                     f"({self.target_modules!r}); give target_modules as a list of names")

    # ---- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The JSON-able dict PEFT expects: our fields plus ``peft_type``; no callables."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.metadata.get("serialize", True) and not (f.name in self.absent_in_peft and value == f.default):
                out[f.name] = value
        out["peft_type"] = self.peft_type
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>") -> AdapterConfig:
        """Build the config; reject PEFT features we do not implement, warn on unknown fields."""
        if not isinstance(data, dict):
            raise ValueError(f"{source}: expected a JSON object, found {type(data).__name__}")
        data = dict(data)
        found_type = data.pop("peft_type", cls.peft_type)
        if found_type != cls.peft_type:
            raise ValueError(f"{source}: expected peft_type {cls.peft_type!r}, found {found_type!r}")
        # fields kept out of the file (callables, test switches) are not taken from it either
        ours = {f.name for f in dataclasses.fields(cls) if f.init and f.metadata.get("serialize", True)}
        kwargs = {}
        for key, value in data.items():
            if key in ours:
                kwargs[key] = value
            elif key in _PEFT_FEATURES_OFF:
                if value not in (_PEFT_FEATURES_OFF[key], None, {}, [], False):
                    raise ValueError(
                        f"{source}: field {key!r} = {short_repr(value)} asks for a PEFT feature shirakit does not "
                        f"implement (expected {_PEFT_FEATURES_OFF[key]!r}); refusing to load it as "
                        "something else"
                    )
            elif key not in _PEFT_BOOKKEEPING:
                warnings.warn(f"{source}: ignoring unknown config field {key!r} = {short_repr(value)}", stacklevel=3)
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{source}: invalid {cls.__name__}: {exc}") from exc

    def to_json_bytes(self) -> bytes:
        return (json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n").encode()


def check_rank(name: str, value: Any) -> None:
    if not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, found {value!r}")


def check_dropout(name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), found {value}")

def no_serialize() -> Any:
    """A dataclass field kept out of adapter_config.json (e.g. a Python callable)."""
    return field(default=None, metadata={"serialize": False}, repr=False, compare=False)
