"""Thread safety for one model: who may write into its weights, and when.

The rule (README, "Guarantees"):

- Forwards (plain, routed with :func:`shirakit.route` or ``adapter_names=``, ``generate``) may run
  in any number of threads at once, and each gets the adapters it asked for. A route is per call
  (a context variable, :mod:`shirakit.core.routes`), never state on the layers.
- Calls that change the model (``set_adapter``, ``switch_adapter``, ``merge``, ``unmerge``,
  ``set_scale``, ``disable_adapters``, ``inject``, ``load_adapter``, ``delete_adapter``, ``unload``,
  ``combine_adapters``, and ``state_dict`` while an in-weight adapter is live) take the model's
  re-entrant lock. Made while another thread is inside a forward of the same model, they raise
  :class:`ConcurrentUseError` at once: the other forward would otherwise see some layers before the
  change and some after (and, for SHiRA / MiSS "bat", read a weight half rewritten).
- Inside a layer, an adapter that lives in the weight (SHiRA, MiSS "bat") is written in or taken
  out only while no other thread is running that layer's product: a forward that needs the weight in
  another state waits for the running products (each a few milliseconds) to finish, and gives up
  with :class:`ConcurrentUseError` after ``WAIT_S`` seconds rather than read a wrong weight.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from typing import Iterator

#: How long a layer waits for other threads' products on its weight before giving up.
WAIT_S = 60.0


class ConcurrentUseError(RuntimeError):
    """A call that changes the model met a forward of the same model running in another thread."""


class ModelGuard:
    """One per model (``model.shirakit.core.threads``, shared by its layers): the lock, and what runs.

    ``lock`` is re-entrant: a model-level call holds it while the layer-level calls it makes take it
    again. ``idle`` (a condition on the same lock) is notified when a layer's product finishes.
    """

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.idle = threading.Condition(self.lock)
        self._calls: dict[int, int] = {}  # thread ident -> depth of model calls (forward, generate) in flight
        self.layer_users = 0  # layer products reading an in-weight state, all threads
        self.waiting = 0  # forwards waiting on ``idle`` (notified only when someone waits)
        # Moves on entering and leaving every change of the model (``writing``): a layer's record that
        # its weight is ready for plain forwards (AdapterLinear._ready) holds only while it stands.
        self.epoch = 0
        # Per thread: the keyword-routing hooks' stack, and ``routed``: whether the model call this
        # thread is in runs under a route (set eagerly before a compiled call; see shirakit.compile.sync).
        self.local = threading.local()

    def __reduce__(self):  # deepcopy / pickle of a model: a fresh guard, nothing in flight
        return (ModelGuard, ())

    # ---- model calls in flight ---------------------------------------------------------------
    def enter_call(self) -> None:
        with self.lock:
            me = threading.get_ident()
            self._calls[me] = self._calls.get(me, 0) + 1

    def exit_call(self) -> None:
        with self.lock:
            me = threading.get_ident()
            depth = self._calls.get(me, 0) - 1
            if depth > 0:
                self._calls[me] = depth
            else:
                self._calls.pop(me, None)

    def call_stack(self) -> list:
        """This thread's stack of model-call entries (see :mod:`shirakit.model.hooks`)."""
        stack = getattr(self.local, "stack", None)
        if stack is None:
            stack = self.local.stack = []
        return stack

    # ---- writers -------------------------------------------------------------------------------
    def check_alone(self, what: str) -> None:
        """Raise unless no other thread is inside a forward of this model (call with the lock held)."""
        me = threading.get_ident()
        others = [t for t in self._calls if t != me]
        if others or self.layer_users:
            busy = f"{len(others)} other thread(s) inside a forward" if others else "a layer product running"
            raise ConcurrentUseError(
                f"{what} changes the model while {busy} of the same model; it was refused so that forward "
                "does not mix adapters. Change adapters when no forward runs (e.g. from the one thread that "
                "owns the model), or use shirakit.route(model, names) / adapter_names= for per-call adapters"
            )

    @contextlib.contextmanager
    def writing(self, what: str) -> Iterator[None]:
        with self.lock:
            self.check_alone(what)
            self.epoch += 1
            try:
                yield
            finally:
                self.epoch += 1


def guard_of(model) -> ModelGuard | None:
    return getattr(getattr(model, "shirakit", None), "guard", None)


def writes_weights(fn):
    """Run a model-level call that changes the model under its guard (see the module doc)."""

    @functools.wraps(fn)
    def wrapper(model, *args, **kwargs):
        guard = guard_of(model)
        if guard is None:
            return fn(model, *args, **kwargs)
        with guard.writing(f"{fn.__name__}()"):
            return fn(model, *args, **kwargs)

    return wrapper
