"""The table of adapter methods: ``peft_type`` -> Adapter class. Methods add themselves with @register."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .adapter import Adapter
    from .config import AdapterConfig

METHODS: dict[str, type[Adapter]] = {}
#: The method a recipe uses when it names none (the command line's ``--method``): the library's subject.
DEFAULT_METHOD = "shira"


def register(cls: type[Adapter]) -> type[Adapter]:
    """Class decorator: make ``cls`` the implementation of ``cls.config_class.peft_type``."""
    peft_type = cls.config_class.peft_type
    if peft_type in METHODS and METHODS[peft_type] is not cls:
        raise ValueError(f"peft_type {peft_type!r} is already registered to {METHODS[peft_type].__name__}")
    METHODS[peft_type] = cls
    return cls


def method_for_peft_type(peft_type: str, source: str = "config") -> type[Adapter]:
    try:
        return METHODS[peft_type]
    except KeyError:
        raise ValueError(
            f"{source}: unknown peft_type {peft_type!r}; shirakit implements {sorted(METHODS)}"
            + ("" if METHODS else " (no method is registered yet: import shirakit.methods first)")
        ) from None


def method_for_config(config: AdapterConfig) -> type[Adapter]:
    return method_for_peft_type(config.peft_type, source=type(config).__name__)


def method_names() -> list[str]:
    """The registered methods as users type them (``peft_type`` lower-cased: shira, lora, ...)."""
    return [peft_type.lower() for peft_type in METHODS]


def method_for_name(name: str) -> type[Adapter]:
    """The method a user names (``"shira"``, ``"LoRA"``); an unknown name lists the known ones."""
    return method_for_peft_type(str(name).upper(), source=f"method {name!r}")
