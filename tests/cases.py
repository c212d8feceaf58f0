"""The contract battery's case table: one row per (method, config) the battery runs.

Adding a method = one row here (plus its file in methods/; tests/toy_method.py is one that lives in
tests/ only, proving the point). ``make(target, init_identity)``
returns a config: ``init_identity=False`` asks for a randomized adapter (non-zero delta).
``params(in, out)`` is the trainable-parameter count per targeted layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import shirakit
from tests.toy_method import DiagConfig


@dataclass(frozen=True)
class Case:
    id: str
    make: Callable[[object, bool], shirakit.AdapterConfig]
    params: Callable[[int, int], int]
    exact_unmerge: bool  # unmerge restores the base weights bit-exactly
    siblings: bool = False  # the method adapts convs and embeddings too (tests/models.py SIBLING_MODELS)


CASES = [
    Case(
        "lora-r4",
        lambda t, ident: shirakit.LoraConfig(r=4, lora_alpha=8, target_modules=t, init_lora_weights=ident),
        lambda i, o: 4 * (i + o),
        exact_unmerge=False,
        siblings=True,
    ),
    Case(
        "lora-rslora-r8",
        lambda t, ident: shirakit.LoraConfig(r=8, lora_alpha=4, use_rslora=True, target_modules=t,
                                             init_lora_weights=ident),
        lambda i, o: 8 * (i + o),
        exact_unmerge=False,
        siblings=True,
    ),
    Case(
        "shira-r2",
        lambda t, ident: shirakit.ShiraConfig(r=2, target_modules=t, init_weights=ident, random_seed=3),
        lambda i, o: 2 * (i + o),
        exact_unmerge=True,
        siblings=True,
    ),
    Case(
        "vera-r8",
        lambda t, ident: shirakit.VeraConfig(r=8, target_modules=t, init_weights=ident, projection_prng_key=5),
        lambda i, o: o + 8,
        exact_unmerge=False,
    ),
    Case(
        "vera-r4-noproj",
        lambda t, ident: shirakit.VeraConfig(r=4, target_modules=t, init_weights=ident, save_projection=False,
                                             d_initial=0.2),
        lambda i, o: o + 4,
        exact_unmerge=False,
    ),
    Case(
        "miss-balance-r5",  # 5 divides none of the in_features: exercises the zero-padded last shard
        lambda t, ident: shirakit.MissConfig(r=5, target_modules=t, init_weights=ident),
        lambda i, o: 5 * o,
        exact_unmerge=False,
    ),
    Case(
        "miss-bat-r4",
        lambda t, ident: shirakit.MissConfig(r=4, target_modules=t, init_weights="bat", init_random=not ident),
        lambda i, o: o * 4,
        exact_unmerge=True,
    ),
    Case(
        "miss-mini-r4-m8",
        lambda t, ident: shirakit.MissConfig(r=4, mini_r=8, target_modules=t, init_weights="mini",
                                             init_random=not ident),
        lambda i, o: 4 * 8,
        exact_unmerge=False,
    ),
    Case(
        "toy-diag",  # tests/toy_method.py: a method defined in the test suite alone
        lambda t, ident: DiagConfig(target_modules=t, init_weights=ident),
        lambda i, o: min(i, o),
        exact_unmerge=False,
    ),
]
