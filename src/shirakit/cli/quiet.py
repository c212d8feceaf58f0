"""Known, harmless start-up messages of other libraries, hidden from shirakit's own commands.

Loading a model in a ``.[dev]`` environment imports transformers' optional integrations, and they log:

- torchao (the ``quant`` extra): ``Failed to load .../torchao/_C_mxfp8...so`` and ``_C_cutlass_90a``: its CUDA-only
  kernels, which a CPU build of torch cannot load; torchao works without them.
- torch's ``_pytree``: ``<enum 'KernelPreference'> is an Enum subclass and is now natively supported by
  torch.compile ...``: torchao registering its enums the old way, a deprecation notice meant for torchao.
- DeepSpeed (dev): ``Setting accelerator to CPU``: no GPU was found, which a CPU run knows.

Only these exact messages, on the loggers that emit them, are filtered, and only in the command line (the
library never touches logging). Every other warning is kept. ``shirakit --verbose COMMAND`` or
``SHIRAKIT_VERBOSE=1`` shows them too.
"""

from __future__ import annotations

import logging
import os
import re

# logger name -> the message it emits that is known to be noise
KNOWN_NOISE: dict[str, re.Pattern[str]] = {
    "torchao": re.compile(r"^Failed to load \S*torchao[/\\]_C\w*\S*\.so: "),
    "torch.utils._pytree": re.compile(r"is an Enum subclass and is now natively supported by torch\.compile"),
    "DeepSpeed": re.compile(r"^Setting accelerator to CPU\. If you have GPU or other accelerator"),
}


class _DropKnown(logging.Filter):
    def __init__(self, pattern: re.Pattern[str]) -> None:
        super().__init__()
        self.pattern = pattern

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def verbose_requested() -> bool:
    return os.environ.get("SHIRAKIT_VERBOSE", "").strip().lower() not in ("", "0", "false", "no")


def hide_known_noise() -> None:
    """Attach the filters (before the libraries are imported: the loggers are the same objects then)."""
    for name, pattern in KNOWN_NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropKnown) for f in logger.filters):
            logger.addFilter(_DropKnown(pattern))
