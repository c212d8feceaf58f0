"""The routes in force for the current call (:func:`shirakit.route`, ``adapter_names=``), as the
layers read them: ``{ModelGuard: Routing}`` in a context variable, so each thread (and each asyncio
task) sees only the routes it entered. The dict is replaced, never mutated. Routes are made and
entered in :mod:`shirakit.model.routing`; this floor only holds the variable the layer reads.
"""

from __future__ import annotations

import contextvars
from types import MappingProxyType
from typing import Any, Mapping

_NO_ROUTES: Mapping = MappingProxyType({})
ROUTES: contextvars.ContextVar[Mapping] = contextvars.ContextVar("shirakit_routes", default=_NO_ROUTES)


def route_of(guard: Any) -> Any:
    """The route this call runs the guard's model under, or None."""
    return ROUTES.get().get(guard)
