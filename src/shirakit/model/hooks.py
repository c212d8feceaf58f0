"""What happens at ``model(x)`` and ``model.generate(...)``, in one room: the top module's hooks.

inject installs them once (:func:`install_keyword_routing`); before the model's forward they

1. count the call as in flight on the model's guard, so a call changing the model from another
   thread is refused while this one runs (:mod:`shirakit.core.threads`);
2. refuse a model whose adapters are still undrawn placeholders (meta-device init);
3. enter the ``adapter_names=`` keyword's route, if given (:mod:`shirakit.model.routing`);
4. before a compiled call, do eagerly what dynamo cannot trace: the weight sync and the route
   flag (:mod:`shirakit.compile.sync`);

and after it (always, even when the forward raised) undo 4, 3 and 1 in that order. Under
torch.compile(model) both run in ``torch.compiler.disable``d functions: a graph break at entry and
at exit. ``generate`` is wrapped so that the whole generation is one call in flight and expanded
batches (beams) map back to their names.
"""

from __future__ import annotations

import contextlib
import types

import torch
from torch import nn

from ..compile.sync import enter_compiled_call, is_compiled_call, leave_compiled_call
from ..core.state import check_drawn, state_of
from .routing import current_routing, route


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
