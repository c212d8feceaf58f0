"""Mixed-adapter batches: a different adapter for every row of one batch, for every method.

    with shirakit.route(model, ["a", "b", "__base__", "a"]):
        logits = model(input_ids).logits          # row 0 uses "a", row 2 the bare base, ...
        out = model.generate(input_ids, num_beams=3)

or, per call, ``model(input_ids, adapter_names=[...])`` / ``model.generate(..., adapter_names=[...])``
(the keyword is read by the model-call hooks, :mod:`shirakit.model.hooks`).

Per layer the base product runs once for the whole batch and each adapter adds its delta to its
own rows, gathered once per layer (``index_select`` / ``index_add_``). SHiRA's delta goes through
its sparse product for small groups (decoding); for a large group it is cheaper to scatter the
group's K values into the weight, run the base product on the group's rows and scatter the base
values back (two scatters, no extra dense work) -- see :meth:`AdapterLinear.routed_forward`.

``generate`` repeats each input row ``k`` times (beams, return sequences) with
``repeat_interleave``; inside ``generate`` a batch of ``k * len(adapter_names)`` rows therefore maps
row ``i`` to ``adapter_names[i // k]``. Anywhere else the batch must have exactly one row per name.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from ..core.routes import ROUTES, route_of
from ..core.state import adapter_layers, state_of

BASE = "__base__"


class Routing:
    """Row -> adapter assignment shared by every layer during one routed call. ``per_token``: one
    name per token of a batch of one packed row (a serving engine's ragged step), not per row."""

    def __init__(self, names: list[str], per_token: bool = False) -> None:
        self.names = list(names)
        self.per_token = per_token
        self.in_generate = False
        self._groups: dict[tuple[int, torch.device], list[tuple[str, torch.Tensor]]] = {}

    def rows_of(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as the routed rows: itself, or under a per-token route its (1, N, ...) batch as N rows."""
        if not self.per_token:
            return x
        if x.dim() < 2 or x.shape[0] != 1:
            raise ValueError(f"a per-token route needs a batch of one packed row, shape (1, tokens, ...); "
                             f"got shape {tuple(x.shape)}")
        return x.flatten(0, 1)

    def groups(self, batch: int, device: torch.device) -> list[tuple[str, torch.Tensor]]:
        """[(adapter name or BASE, row indices)] for a batch of ``batch`` rows (cached)."""
        key = (batch, device)
        if key not in self._groups:
            count = len(self.names)
            if batch != count and not (self.in_generate and batch % count == 0):
                where = " (inside generate: or a multiple of it)" if self.in_generate else ""
                unit = "token" if self.per_token else "row"
                raise ValueError(f"adapter_names has {count} entries but the batch has {batch} {unit}s; "
                                 f"expected one name per {unit}{where}")
            repeat = batch // count
            rows: dict[str, list[int]] = {}
            for row in range(batch):
                rows.setdefault(self.names[row // repeat], []).append(row)
            with torch.inference_mode(False):  # ordinary tensors: their version counters key caches per step
                self._groups[key] = [(n, torch.tensor(r, device=device)) for n, r in rows.items()]
        return self._groups[key]


def _check(model: nn.Module, names: list[str]) -> None:
    if isinstance(names, str) or not names:
        raise TypeError("adapter_names must be a non-empty list with one adapter name per row")
    known = state_of(model).configs
    unknown = sorted({n for n in names if n != BASE and n not in known})
    if unknown:
        raise KeyError(f"unknown adapter(s) {unknown} in adapter_names; this model has {sorted(known)} "
                       f"(and {BASE!r} for no adapter)")
    if model.training:
        raise RuntimeError("mixed-adapter batches are for inference; call model.eval() first")
    merged = sorted({n for _, layer in adapter_layers(model) for n in layer.merged})
    if merged:
        raise RuntimeError(f"adapter(s) {merged} are merged into the weights; unmerge before routing rows")


@contextlib.contextmanager
def route(model: nn.Module, adapter_names: list[str], per_token: bool = False) -> Iterator[Routing]:
    """Within the block, row i of every batch uses adapter ``adapter_names[i]`` (see module doc);
    with ``per_token``, token i of a batch of one packed row (shape (1, tokens)): several requests'
    tokens side by side in one row, as a serving engine's ragged step feeds them, so the model's
    ``logits_to_keep`` can still pick the positions wanted (per row, every token is a row of its own
    and the output layer runs on all of them).

    The route belongs to this call only (a context variable keyed by the model's guard): other
    threads' forwards, routed or plain, are not affected, and nothing stays behind on the layers.
    """
    _check(model, adapter_names)
    routing = Routing(adapter_names, per_token)
    guard = state_of(model).guard
    token = ROUTES.set({**ROUTES.get(), guard: routing})
    try:
        yield routing
    finally:
        ROUTES.reset(token)


def current_routing(model: nn.Module) -> Routing | None:
    """The route this thread is running ``model`` under, if any."""
    return route_of(state_of(model).guard)
