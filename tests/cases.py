"""The contract battery's case table: one row per (method, config) the battery runs.

Adding a method = one row here (plus its file in methods/). ``make(target, init_identity)``
returns a config: ``init_identity=False`` asks for a randomized adapter (non-zero delta).
``params(in, out)`` is the trainable-parameter count per targeted layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import shirakit


@dataclass(frozen=True)
class Case:
    id: str
    make: Callable[[object, bool], shirakit.AdapterConfig]
    params: Callable[[int, int], int]
    exact_unmerge: bool  # unmerge restores the base weights bit-exactly
    peft_interop: bool = True


CASES = [
    Case(
        "lora-r4",
        lambda t, ident: shirakit.LoraConfig(r=4, lora_alpha=8, target_modules=t, init_lora_weights=ident),
        lambda i, o: 4 * (i + o),
        exact_unmerge=False,
    ),
    Case(
        "lora-rslora-r8",
        lambda t, ident: shirakit.LoraConfig(r=8, lora_alpha=4, use_rslora=True, target_modules=t,
                                             init_lora_weights=ident),
        lambda i, o: 8 * (i + o),
        exact_unmerge=False,
    ),
    Case(
        "shira-r2",
        lambda t, ident: shirakit.ShiraConfig(r=2, target_modules=t, init_weights=ident, random_seed=3),
        lambda i, o: 2 * (i + o),
        exact_unmerge=True,
    ),
]
