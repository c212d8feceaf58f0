"""Mixed-adapter batches: a different adapter for every row of one batch, for every method.

    with shirakit.route(model, ["a", "b", "__base__", "a"]):
        logits = model(input_ids).logits          # row 0 uses "a", row 2 the bare base, ...
        out = model.generate(input_ids, num_beams=3)

or, per call, ``model(input_ids, adapter_names=[...])`` / ``model.generate(..., adapter_names=[...])``.

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
import types
from typing import Iterator

import torch
from torch import nn

from ..compile.sync import enter_compiled_call, is_compiled_call, leave_compiled_call
from ..core.state import adapter_layers, check_drawn, state_of
from ..core.threads import ROUTES

BASE = "__base__"


class Routing:
    """Row -> adapter assignment shared by every layer during one routed call."""

    def __init__(self, names: list[str]) -> None:
        self.names = list(names)
        self.in_generate = False
        self._groups: dict[tuple[int, torch.device], list[tuple[str, torch.Tensor]]] = {}

    def groups(self, batch: int, device: torch.device) -> list[tuple[str, torch.Tensor]]:
        """[(adapter name or BASE, row indices)] for a batch of ``batch`` rows (cached)."""
        key = (batch, device)
        if key not in self._groups:
            count = len(self.names)
            if batch != count and not (self.in_generate and batch % count == 0):
                where = " (inside generate: or a multiple of it)" if self.in_generate else ""
                raise ValueError(f"adapter_names has {count} entries but the batch has {batch} rows; "
                                 f"expected one name per row{where}")
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
def route(model: nn.Module, adapter_names: list[str]) -> Iterator[Routing]:
    """Within the block, row i of every batch uses adapter ``adapter_names[i]`` (see module doc).

    The route belongs to this call only (a context variable keyed by the model's guard): other
    threads' forwards, routed or plain, are not affected, and nothing stays behind on the layers.
    """
    _check(model, adapter_names)
    routing = Routing(adapter_names)
    guard = state_of(model).guard
    token = ROUTES.set({**ROUTES.get(), guard: routing})
    try:
        yield routing
    finally:
        ROUTES.reset(token)


def current_routing(model: nn.Module) -> Routing | None:
    """The route this thread is running ``model`` under, if any."""
    return ROUTES.get().get(state_of(model).guard)


# ---- the adapter_names= keyword and generate ---------------------------------------------------
# The top module's pre/post forward hooks also count the model call as "in flight" on the guard, so
# a call changing the model from another thread is refused while this one runs (shirakit.core.threads).
# Before a compiled call they also do, eagerly, what dynamo cannot trace (shirakit.compile.sync); under
# torch.compile(model) they are therefore kept out of the graph: a graph break at entry and exit.
def _pre_forward(module, args, kwargs):
    names = kwargs.pop("adapter_names", None)
    _enter_model_call(module, names, torch.compiler.is_compiling())
    return args, kwargs


def _post_forward(module, args, kwargs, output):
    _leave_model_call(module)


@torch.compiler.disable
def _enter_model_call(module: nn.Module, names: list[str] | None, compiling: bool) -> None:
    guard = state_of(module).guard
    guard.enter_call()
    stack = guard.call_stack()
    stack.append((None, None))  # first, so the post-hook (called even when this hook raises) pops our entry
    check_drawn(module, "run the model")
    scope = None
    if names is not None:
        scope = route(module, names)
        scope.__enter__()
        stack[-1] = (scope, None)
    if compiling or is_compiled_call(module):
        stack[-1] = (scope, enter_compiled_call(module, routed=current_routing(module) is not None))


@torch.compiler.disable
def _leave_model_call(module: nn.Module) -> None:
    guard = state_of(module).guard
    stack = guard.call_stack()
    try:
        scope, compiled = stack.pop()
        try:
            if compiled is not None:
                leave_compiled_call(module, compiled)
        finally:
            if scope is not None:
                scope.__exit__(None, None, None)
    finally:
        guard.exit_call()


def install_keyword_routing(model: nn.Module) -> None:
    """Let ``model(..., adapter_names=[...])`` and ``model.generate(..., adapter_names=[...])`` route
    rows; installed once by ``inject`` (hooks on the top module, and an instance-level wrapper
    around ``generate`` that marks the generate call so expanded batches map back to names)."""
    if getattr(model, "_shirakit_route_hooks", None) is not None:
        return
    model._shirakit_route_hooks = [
        model.register_forward_pre_hook(_pre_forward, with_kwargs=True),
        model.register_forward_hook(_post_forward, with_kwargs=True, always_call=True),
    ]
    if callable(getattr(type(model), "generate", None)):
        # a bound method (not a closure) so copy.deepcopy(model) rebinds it to the copy
        model.generate = types.MethodType(_generate_with_routing, model)


def uninstall_keyword_routing(model: nn.Module) -> None:
    for handle in getattr(model, "_shirakit_route_hooks", []):
        handle.remove()
    for attr in ("_shirakit_route_hooks", "generate"):
        if attr in model.__dict__:
            delattr(model, attr)


def _generate_with_routing(model: nn.Module, *args, adapter_names=None, **kwargs):
    """The model's own ``generate``, with rows routed by ``adapter_names`` or an enclosing route().

    The whole generation counts as one model call in flight (shirakit.core.threads), so another thread
    cannot switch adapters between its decoding steps.
    """
    guard = state_of(model).guard
    guard.enter_call()
    try:
        with contextlib.ExitStack() as stack:
            routing = stack.enter_context(route(model, adapter_names)) if adapter_names is not None else None
            routing = routing or current_routing(model)
            if routing is not None:
                routing.in_generate = True
            try:
                return type(model).generate(model, *args, **kwargs)
            finally:
                if routing is not None:
                    routing.in_generate = False
    finally:
        guard.exit_call()
