"""The one wrapper: a linear layer plus a dict of named adapters.

``AdapterLinear`` replaces a targeted ``nn.Linear`` (or transformers ``Conv1D``) in place. Its
forward is ``y = base_layer(x) + sum_{a in active, unmerged} a(x)``. Adapters whose values live in
the weight (:class:`~shirakit.core.adapter.InWeightAdapter`: SHiRA, MiSS bat) are instead written into
the base weight while active, so their unmerged forward costs nothing beyond the base product;
they are withdrawn (originals restored exactly) before anything else touches the weight: merge,
unmerge, disable, delete, unload, ``state_dict``. The layer calls only what the two adapter
classes declare.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
import weakref

import torch
from torch import nn

from . import adapter as adapter_module
from .adapter import Adapter, ConvSpec, EmbeddingSpec, InWeightAdapter, LayerGeometry
from .quantized_weights import (
    NO_INPUT_GRADIENT,
    QUANTIZED_MERGE,
    dequantizer,
    input_gradient_blocked,
    quantized_kind,
    recomputed_linear,
)
from .routes import ROUTES, route_of
from .sharded_weights import SHARDED_MERGE, gathered_per_call, is_sharded, whole_weight
from .threads import WAIT_S, ConcurrentUseError, ModelGuard

try:  # GPT-2 style Conv1D: y = x @ W + b with W stored (in, out)
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a runtime dependency, but stay importable
    Conv1D = ()  # type: ignore[assignment]

SUPPORTED_LAYERS = ((nn.Linear, Conv1D) if Conv1D else (nn.Linear,)) + (nn.Conv1d, nn.Conv2d, nn.Embedding)
#: what "all-linear" picks: linear layers only (as PEFT), never convs or embeddings
LINEAR_LAYERS = (nn.Linear, Conv1D) if Conv1D else (nn.Linear,)

# FSDP (fully_shard) turns the weight into shards after inject; values a forward had already written
# into the whole weight would be sharded as if they were the base.
LIVE_BEFORE_FSDP = (
    "this layer's weight was sharded by FSDP while an in-weight adapter (SHiRA, MiSS bat) was written into it "
    "(a forward ran before fully_shard): the shards now hold adapter values as if they were the base. Call "
    "model.state_dict() or shirakit.set_adapter(model, ...) before fully_shard; it takes them out"
)


def _conv_spec(layer: nn.Module) -> ConvSpec:
    return ConvSpec(
        dims=layer.weight.dim() - 2, in_channels=layer.in_channels, out_channels=layer.out_channels,
        kernel_size=tuple(layer.kernel_size), stride=tuple(layer.stride),
        padding=layer.padding if isinstance(layer.padding, str) else tuple(layer.padding),
        dilation=tuple(layer.dilation), groups=layer.groups, padding_mode=layer.padding_mode)


def geometry_of(layer: nn.Module) -> LayerGeometry:
    """The layer as a matrix (see :class:`LayerGeometry`): linear, conv (flattened kernel), embedding."""
    if isinstance(layer, nn.Linear):
        return LayerGeometry(layer.in_features, layer.out_features, fan_in_fan_out=False)
    if Conv1D and isinstance(layer, Conv1D):
        in_f, out_f = layer.weight.shape
        return LayerGeometry(in_f, out_f, fan_in_fan_out=True)
    if isinstance(layer, (nn.Conv1d, nn.Conv2d)) and not isinstance(layer, nn.modules.conv._ConvTransposeNd):
        out_ch = layer.weight.shape[0]
        return LayerGeometry(layer.weight[0].numel(), out_ch, conv=_conv_spec(layer))
    if isinstance(layer, nn.Embedding):
        if layer.max_norm is not None:
            raise TypeError(f"nn.Embedding with max_norm={layer.max_norm} renormalizes rows of its table in place at "
                            "every lookup, which would rewrite adapter values kept in it and the base alike; "
                            "shirakit adapts embeddings without max_norm")
        spec = EmbeddingSpec(layer.padding_idx, layer.scale_grad_by_freq, layer.sparse)
        return LayerGeometry(layer.embedding_dim, layer.num_embeddings, embedding=spec)
    raise TypeError(
        f"expected nn.Linear, transformers Conv1D, nn.Conv1d, nn.Conv2d or nn.Embedding, found "
        f"{type(layer).__name__}; shirakit adapts those layers only"
    )


class _WeightUse:
    """The forwards running products on one layer's weight (a plain object: nn.Module's
    ``__setattr__`` costs microseconds per call on this per-forward path)."""

    __slots__ = ("users", "plain")

    def __init__(self) -> None:
        self.users = 0  # products in flight on this weight
        self.plain = False  # they read the plain state (shared), not a routed one (exclusive)


class AdapterLinear(nn.Module):
    """A linear layer with named adapters. See the module docstring for the forward rule."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.geometry = geometry_of(base_layer)
        if base_layer.weight.is_inference():
            raise RuntimeError(
                "this layer's weight was created under torch.inference_mode(); such tensors cannot be "
                "adapted in place: build or load the model outside inference mode (torch.no_grad() is fine)"
            )
        self.base_layer = base_layer
        self.quantized = quantized_kind(base_layer.weight)  # e.g. "Params4bit": adapters run beside it
        self.adapters = nn.ModuleDict()
        self.active: list[str] = []
        self.merged: list[str] = []  # LIFO: unmerge pops in reverse order, so overlaps restore exactly
        self.disabled = False
        self._live: list[str] = []  # in-weight adapters currently written into the weight
        # Bookkeeping that lets a SHiRA merge skip re-reading base values it read before: the
        # generation changes whenever the clean base weight may differ from what it was.
        self._base_generation = 0
        self._note_own_write()
        self._kept: dict[str, torch.Tensor] = {}  # exact merges: the weight as it was before each
        # Threads (see shirakit.core.threads): the model's guard (inject shares one across the model), and
        # the products running on this layer's weight (a _WeightUse).
        self._guard = ModelGuard()
        self._use = _WeightUse()
        self._has_in_weight = False  # an in-weight adapter here: forwards coordinate (see _enter)
        self._ready: tuple | None = None  # what _enter last found in sync (see _mark_ready)
        # Other parameters sharing this weight's storage (tied embeddings), found by inject: no
        # adapter is then kept written into it; SHiRA / MiSS bat run additively (see _in_weight).
        self.weight_shared_with: tuple[str, ...] = ()
        # shirakit.compile.slots.LayerSlots after prepare_for_hotswap: what a compiled forward reads
        self.hotswap: nn.Module | None = None
        self.weight_only = False  # see update_weight_only (read by a compiled forward)
        # model.state_dict() must show the clean base weight, never adapter values riding in it.
        self.register_state_dict_pre_hook(lambda module, prefix, keep_vars: module.withdraw_live())

    # ---- what HF code may read off a linear layer ------------------------------------------
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    @property
    def in_features(self) -> int:
        return self.geometry.in_features

    @property
    def out_features(self) -> int:
        return self.geometry.out_features

    # ---- adapters ----------------------------------------------------------------------
    def add_adapter(self, name: str, adapter: Adapter) -> None:
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        if self.quantized and adapter.delta_reads_weight:
            raise ValueError(
                f"{type(adapter).__name__} computes its delta from the base weight, which is quantized here "
                f"({self.quantized}); dequantize the base or choose a mode whose delta does not read the weight")
        with self._guard.writing("adding an adapter"):
            self._withdraw_live()
            self.adapters[name] = adapter.to(self.weight.device)
            self._has_in_weight = any(self._in_weight(n) is not None for n in self.adapters)

    def remove_adapter(self, name: str) -> None:
        if name in self.merged:
            raise RuntimeError(f"adapter {name!r} is merged into the weights; unmerge it before deleting")
        with self._guard.writing("deleting an adapter"):
            self._withdraw_live()
            del self.adapters[name]
            self.active = [n for n in self.active if n != name]
            self._has_in_weight = any(self._in_weight(n) is not None for n in self.adapters)

    def set_active(self, names: list[str]) -> None:
        with self._guard.writing("set_adapter"):
            self._withdraw_live()
            self.active = [n for n in names if n in self.adapters]

    def set_disabled(self, disabled: bool) -> None:
        with self._guard.writing("disable_adapters"):
            self._withdraw_live()
            self.disabled = disabled

    # ---- weight bookkeeping ---------------------------------------------------------------
    def _note_own_write(self) -> None:
        self._seen_weight = weakref.ref(self.weight)  # a reference that neither registers nor keeps it
        self._seen_version = self.weight._version

    def _weight_rewritten(self) -> bool:
        """Was the weight written (or replaced) by someone else since shirakit last wrote it?"""
        weight = self.weight
        return weight._version != self._seen_version or weight is not self._seen_weight()

    def _reconcile(self) -> None:
        """Take a write we did not make (load_state_dict, a user's copy_) as a new base.

        Whatever shirakit had written into the weight is gone, and the base values it kept are
        stale: they are dropped, never written back. Live adapters are written in again by the next
        sync; merged ones are merged onto the new base now (with a warning), so the layer computes
        what a fresh load followed by the same calls would.
        """
        if not self._weight_rewritten():
            return
        self._base_generation += 1
        merged = [(n, n in self._kept) for n in self.merged]
        for name in self._live + self.merged:
            self.adapters[name].forget_written()
        self._live, self.merged, self._kept = [], [], {}
        self._note_own_write()
        if merged:
            warnings.warn(f"the weight under merged adapter(s) {[n for n, _ in merged]} was overwritten from "
                          "outside (load_state_dict, copy_): taking it as the new base and merging them onto it "
                          "again", stacklevel=4)
            for name, exact in merged:
                self._apply_adapter(name, exact)
                self.merged.append(name)

    def _apply_adapter(self, name: str, exact: bool = False) -> None:
        clean_below = not self.merged and not self._live
        key = (id(self.weight), self._base_generation) if clean_below else None
        adapter = self.adapters[name]
        if exact and not adapter.exact_unmerge:
            self._kept[name] = self.weight.detach().clone()
        adapter.merge_into(self.weight, base_key=key)
        self._note_own_write()

    def _remove_adapter(self, name: str) -> None:
        adapter = self.adapters[name]
        kept = self._kept.pop(name, None)
        if kept is not None:  # exact mode: the weight as it was before this merge, bit for bit
            with torch.no_grad():
                self.weight.copy_(kept)
            adapter.forget_written()
        else:
            adapter.unmerge_from(self.weight)
            if not adapter.exact_unmerge:  # subtraction leaves rounding behind: the base changed
                self._base_generation += 1
        self._note_own_write()

    # ---- live (scattered-in) adapters --------------------------------------------------
    def _in_weight(self, name: str) -> InWeightAdapter | None:
        """The adapter, if it is kept written into the weight while active and unmerged. Never on a
        weight shared with another module (tied embeddings): writing there would change that module
        too, so SHiRA / MiSS bat run additively (``y = base(x) + adapter(x)``) on such a layer. Nor on
        a quantized weight: it holds codes, not values (SHiRA then adds ``s x S^T`` beside it)."""
        adapter = self.adapters[name] if name in self.adapters else None
        return adapter if isinstance(adapter, InWeightAdapter) and self._weight_writable() else None

    def _weight_writable(self) -> bool:
        """May adapters be kept written into this weight? (see :meth:`_in_weight`)"""
        return not self.weight_shared_with and not self.quantized

    def _wanted_live(self) -> list[str]:
        if self.disabled or gathered_per_call(self.base_layer):  # FSDP, ZeRO-3: written per gathered copy
            return []
        return [n for n in self.active if n not in self.merged and self._in_weight(n) is not None]

    def withdraw_live(self) -> None:
        """Restore the base values under every live adapter (reverse order: exact under overlap)."""
        if self._live:
            with self._guard.writing("taking live adapters out of the weight (state_dict, unload)"):
                self._withdraw_live()

    def _withdraw_live(self) -> None:
        self._ready = None  # every change of the layer comes here: drop the record (and what it holds)
        self._reconcile()
        while self._live:
            self._remove_adapter(self._live.pop())

    def _live_current(self) -> bool:
        """Does the weight hold the wanted live adapters, with their current values?"""
        wanted = self._wanted_live()
        return wanted == self._live and all(self.adapters[n].applied_is_current() for n in wanted)

    def _in_sync(self) -> bool:
        return not self._weight_rewritten() and self._live_current()

    def sync_live(self) -> None:
        """Make the weight hold exactly the wanted live adapters with their current values."""
        self._reconcile()
        if self._live_current():
            return
        wanted = self._wanted_live()
        if wanted == self._live and len(wanted) == 1 and self.adapters[wanted[0]].refresh_in(self.weight):
            self._note_own_write()  # one adapter, new values (a training step): written over the old
            return
        self._withdraw_live()
        for name in wanted:
            self._apply_adapter(name)
            self._live.append(name)

    # ---- merging ------------------------------------------------------------------------
    def _check_mergeable(self, names: list[str]) -> None:
        if self.quantized and names:
            raise RuntimeError(QUANTIZED_MERGE.format(where=f"a layer with adapters {names}", kind=self.quantized))
        refused = [n for n in names if not self.adapters[n].merges_into_shards] if is_sharded(self.weight) else []
        if refused:
            kinds = sorted({type(self.adapters[n]).__name__ for n in refused})
            raise RuntimeError(SHARDED_MERGE.format(names=refused, kinds=", ".join(kinds)))

    def _whole_weight(self, names: list[str], what: str, write: bool = True):
        """ZeRO-3: the weight and these adapters' parameters gathered around a merge (see
        :func:`~shirakit.core.sharded_weights.whole_weight`); elsewhere, or with no names, nothing."""
        if not names:  # the same on every rank: the model's state is
            return contextlib.nullcontext()
        return whole_weight(self.base_layer, [self.adapters[n] for n in names], what, write)

    def merge_is_finite(self, names: list[str]) -> bool:
        self._check_mergeable(names)
        with self._guard.writing("merge"), self._whole_weight(names, "merge", write=False):
            self._withdraw_live()
            return all(self.adapters[n].merged_is_finite(self.weight) for n in names if n not in self.merged)

    def merge(self, names: list[str], exact: bool = False) -> None:
        """Fold ``names`` into the weight. ``exact``: keep a copy of the weight before each additive
        adapter (LoRA, VeRA, MiSS balance/mini), so unmerge restores it bit-exactly instead of
        subtracting (one weight-sized copy per merged adapter; SHiRA and MiSS bat are always exact)."""
        self._check_mergeable(names)
        with self._guard.writing("merge"), self._whole_weight([n for n in names if n not in self.merged], "merge"):
            self._withdraw_live()
            if self.weight_shared_with and names:
                warnings.warn(f"merging {names} into a weight tied to {list(self.weight_shared_with)}: those "
                              "modules change too (unmerge restores them)", stacklevel=3)
            # weight-resident adapters first, in order, as forward writes them in (MiSS bat reads the weight)
            names = sorted(names, key=lambda n: self._in_weight(n) is None)
            for name in names:
                if name in self.merged:
                    warnings.warn(f"adapter {name!r} is already merged; skipping", stacklevel=3)
                    continue
                self._apply_adapter(name, exact)
                self.merged.append(name)

    def unmerge(self) -> None:
        with self._guard.writing("unmerge"), self._whole_weight(list(self.merged), "unmerge"):
            self._withdraw_live()
            while self.merged:
                self._remove_adapter(self.merged.pop())

    def switch(self, names: list[str], exact: bool = False) -> None:
        """Fused mode: unmerge whatever is merged, merge ``names`` (SHiRA: scatters only)."""
        with self._guard.writing("switch_adapter"):
            self.unmerge()
            self.merge([n for n in names if n in self.adapters], exact)

    # ---- fused switching of many layers at once (shirakit.model.switch) ----------------------
    # The batched path runs per layer on every switch of a model with hundreds of layers: it reads and
    # writes plain attributes through __dict__ (nn.Module's __getattr__ / __setattr__ cost ~1 us each).
    def batch_switch_parts(self, name: str | None):
        """(weight, adapter to take out, adapter to put in) when switching this layer to ``name`` is
        plain scatters a caller may batch across layers (:meth:`InWeightAdapter.scatter_many`): at most
        one adapter merged, both able to batch, nothing live, the weight ours (not rewritten from
        outside, not tied, sharded, gathered per call or quantized), no exact-merge copies. Else None:
        the layer switches on its own (:meth:`switch`)."""
        d = self.__dict__
        merged = d["merged"]
        if d["_live"] or d["_kept"] or len(merged) > 1 or d["weight_shared_with"] or d["quantized"]:
            return None
        adapters = d["_modules"]["adapters"]._modules
        old = adapters[merged[0]] if merged else None
        new = adapters.get(name) if name is not None else None
        if (old is not None and not old.batched_scatter) or (new is not None and not new.batched_scatter):
            return None
        base = d["_modules"]["base_layer"]
        weight = base._parameters.get("weight") if "weight" in base._parameters else base.weight
        if weight is None or weight._version != d["_seen_version"] or weight is not d["_seen_weight"]():
            return None  # rewritten from outside: the layer reconciles on its own
        if is_sharded(weight) or gathered_per_call(base):
            return None
        return weight, old, new

    def batch_restored(self) -> None:
        """The caller scattered the merged adapter's saved base values back (bit-exact: no new base)."""
        merged = self.__dict__["merged"]
        self.__dict__["_modules"]["adapters"]._modules[merged.pop()].restored_by_batch()

    def batch_write_key(self, weight: torch.Tensor) -> object:
        """The base key :meth:`_apply_adapter` would pass on this (clean) weight."""
        return (id(weight), self.__dict__["_base_generation"])

    def batch_written(self, name: str | None, weight: torch.Tensor) -> None:
        """The caller scattered ``name`` in (None: nothing): record it as merged and active, as
        :meth:`switch` and ``set_active`` would."""
        d = self.__dict__
        if name is not None:
            d["_modules"]["adapters"]._modules[name].written_by_batch()
            d["merged"].append(name)
        d["active"] = [name] if name is not None else []
        d["_seen_weight"] = weakref.ref(weight)
        d["_seen_version"] = weight._version

    # ---- threads: products running on this weight ------------------------------------------
    def _enter(self, plain: bool) -> None:
        """Wait until the weight may hold what this forward needs, bring it there, count the user.

        Plain forwards share the weight while it holds the wanted live adapters with current values;
        a routed forward needs it to itself (it starts from the clean base and scatters per group).
        """
        guard, use = self._guard, self._use
        with guard.lock:
            if use.users and not (plain and use.plain and self._in_sync()):
                self._wait_for_weight(plain)
            if not use.users:
                if plain:
                    self.sync_live()
                else:
                    self._withdraw_live()
                use.plain = plain
            use.users += 1
            guard.layer_users += 1
            self._ready = self._mark_ready() if plain else None

    def _mark_ready(self) -> tuple | None:
        """What the fast path of :meth:`_eager_forward` compares to know the weight still holds what
        this (plain, just synced) forward found: the guard and its epoch (no set_adapter, merge,
        switch, set_scale, ... since), the weight object and its version counter (no write by
        shirakit or anyone else since), the one live adapter's values stamp and scale. None where
        the fast path does not apply (a gathered weight, several live adapters, a quantized base)."""
        weight = self.base_layer._parameters.get("weight")
        if (weight is None or weight is not self.weight or len(self._live) > 1 or self.quantized
                or gathered_per_call(self.base_layer) or not self._in_sync()):
            return None
        live = None
        if self._live:
            adapter = self.adapters[self._live[0]]
            values = adapter.trained_values()
            live = (values, values._version, adapter_module._optimizer_steps, adapter, adapter.scale)
        guard = self._guard
        pending = self._pending()
        bare = not pending  # nothing to apply: the forward is the base layer's own
        return (guard, guard.epoch, weakref.ref(weight), weight._version, live, bare)

    def _wait_for_weight(self, plain: bool) -> None:
        """Wait (lock released meanwhile) until this forward may use the weight; bounded by WAIT_S."""
        guard, use = self._guard, self._use
        waited = 0.0
        guard.waiting += 1
        try:
            while use.users and not (plain and use.plain and self._in_sync()):
                if waited >= WAIT_S:
                    raise ConcurrentUseError(
                        f"a forward waited {WAIT_S:.0f} s for other threads' products on this layer's weight "
                        "(SHiRA / MiSS bat write adapters into it); is a forward stuck in another thread?")
                guard.idle.wait(1.0)
                waited += 1.0
        finally:
            guard.waiting -= 1

    def _leave(self) -> None:
        guard, use = self._guard, self._use
        with guard.lock:
            use.users -= 1
            guard.layer_users -= 1
            if not use.users and guard.waiting:
                guard.idle.notify_all()

    # ---- forward ------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return self._compiled_forward(x, *args, **kwargs)
        return self._eager_forward(x, *args, **kwargs)

    def _eager_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        d = self.__dict__  # plain reads: nn.Module's __getattr__ costs a Python call per attribute
        guard = d["_guard"]
        routing = ROUTES.get().get(guard)  # this call's route, if any (per thread / task): route_of
        ready = d["_ready"]
        if routing is None and ready is not None:
            # Fast path (serving, inference with an adapter fused or live): nothing changed since the
            # last forward found this weight in sync, so the sync (reconcile, value stamps, the wanted
            # live adapters) would do nothing; only count this product as a user of the weight.
            r_guard, r_epoch, r_weight, r_version, live, bare = ready
            base = d["_modules"]["base_layer"]
            weight = base._parameters.get("weight")
            use = d["_use"]
            with guard.lock:
                entered = (
                    r_guard is guard and guard.epoch == r_epoch and weight is r_weight()
                    and weight._version == r_version and not (use.users and not use.plain)
                    and not hasattr(weight, "ds_id") and not base.__dict__.get("_is_fsdp_managed_module")
                    and (live is None or (live[0]._version == live[1] and live[2] == adapter_module._optimizer_steps
                                          and live[3].scale == live[4])))
                if entered:
                    use.plain = True
                    use.users += 1
                    guard.layer_users += 1
            if entered:
                try:
                    if bare:
                        return base(x, *args, **kwargs)
                    return self._plain_forward(x, *args, **kwargs)
                finally:
                    with guard.lock:
                        use.users -= 1
                        guard.layer_users -= 1
                        if not use.users and guard.waiting:
                            guard.idle.notify_all()
        if routing is None and gathered_per_call(self.base_layer):
            return self._gathered_forward(x, *args, **kwargs)
        if not self._has_in_weight:  # nothing is ever written into this weight by a forward
            if self.merged and self._weight_rewritten():
                with self._guard.lock:
                    self._reconcile()
            if routing is not None:
                return self._routed(x, routing)
            return self._plain_forward(x, *args, **kwargs)
        self._enter(plain=routing is None)
        try:
            if routing is not None:
                return self._routed(x, routing)
            return self._plain_forward(x, *args, **kwargs)
        finally:
            self._leave()

    def _routed(self, x: torch.Tensor, routing) -> torch.Tensor:
        rows = routing.rows_of(x)
        y = self.routed_forward(rows, routing.groups(rows.shape[0], x.device))
        return y if rows is x else y.unflatten(0, x.shape[:2])

    def _compiled_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """What torch.compile traces (see shirakit.compile.sync): bookkeeping stays out of the graph.

        The model's pre-forward hook has already, eagerly, brought every layer's weight up to date
        and registered this call as a user of it (version counters, optimizer steps, the lock and
        the route's context variable are Python state dynamo cannot trace or would recompile on);
        it also set a per-thread flag on the model's guard saying whether this call is routed. A
        routed call runs each layer's product eagerly (a graph break per layer). A layer prepared
        for hot swapping reads only its fixed slots, so swapping adapters changes no guard.
        """
        if getattr(self._guard.local, "routed", False):
            return _eager_layer_forward(self, x, *args, **kwargs)
        slots = self.hotswap
        if slots is not None and slots.fits and not torch.is_grad_enabled():
            return slots.forward(self.base_layer, x, *args, **kwargs)
        if self.weight_only:  # e.g. SHiRA switched in fused mode: no names read, no recompile
            return self.base_layer(x, *args, **kwargs)
        return self._plain_forward(x, *args, **kwargs)

    def _pending(self) -> list[str]:
        """The active adapters a forward must apply (not merged into the weight, not disabled)."""
        return [] if self.disabled else [n for n in self.active if n not in self.merged]

    def update_weight_only(self) -> None:
        """Is this layer's forward, right now, just ``base_layer(x)``? (no additive adapter pending,
        no in-weight adapter that needs its value gradient). Set by the sync before each call."""
        pending = self._pending()
        live_grads = torch.is_grad_enabled() and any(
            p.requires_grad for n in self._live for p in self.adapters[n].parameters())
        self.weight_only = not live_grads and all(self._in_weight(n) is not None for n in pending)

    def _plain_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The active adapters: in-weight ones already written in (``_enter``), the others added."""
        pending = self._pending()
        if self.quantized:
            return self._quantized_forward(x, pending, *args, **kwargs)
        live = [self._in_weight(n) for n in pending if self._in_weight(n) is not None]
        if live and torch.is_grad_enabled():
            y = live[0].trainable_base_forward(self.base_layer, x)
            for adapter in live[1:]:
                y = adapter.tap_value_grad(y, x)
        else:
            y = self.base_layer(x, *args, **kwargs)
        return self._add_deltas(y, x, [n for n in pending if self._in_weight(n) is None])

    def _add_deltas(self, y: torch.Tensor, x: torch.Tensor, names: list[str]) -> torch.Tensor:
        """``y + sum a(x)`` over the adapters ``names``, each run as its additive forward."""
        for name in names:
            y = y + self.adapters[name](x, self.weight).to(y.dtype)
        return y

    def _quantized_forward(self, x: torch.Tensor, pending: list[str], *args, **kwargs) -> torch.Tensor:
        """A quantized base: ``y = base(x) + sum a(x)`` over the pending adapters, except that while
        training, the first one that can (SHiRA) writes itself into the dense copy the library
        dequantizes for this product anyway (:func:`~shirakit.core.quantized_weights.dequantizer`: bitsandbytes,
        torchao's weight-only tensors, on CPU): ``y = x (deq(W) + delta)^T + b``, its backward
        dequantizing again. Where the library's own product would keep its dense copy for the
        backward (torchao), the base runs as ``recomputed_linear`` instead. The codes are never
        written; no dense copy outlives its product. A base product that would give the input no
        gradient is refused (the layers below would train on a wrong one)."""
        needs_dx = torch.is_grad_enabled() and x.requires_grad
        blocked = input_gradient_blocked(self.base_layer) if needs_dx else None
        if blocked:
            raise RuntimeError(blocked)
        first, copy_of = None, None
        if torch.is_grad_enabled() and not torch.compiler.is_compiling() and not (
                self.base_layer._forward_hooks or self.base_layer._forward_pre_hooks):
            copy_of = dequantizer(self.base_layer, x)
            writers = [n for n in pending if isinstance(self.adapters[n], InWeightAdapter)
                       and self.adapters[n].writes_dequantized_copy and self.adapters[n].trained_values().requires_grad]
            first = writers[0] if copy_of is not None and writers else None
        if first is None and needs_dx and copy_of is not None and copy_of.kept_by_library:
            y = recomputed_linear(x, self.base_layer.bias, copy_of)  # torchao would keep a dense copy per layer
        elif first is None:
            y = self.base_layer(x, *args, **kwargs)
            if needs_dx and not y.requires_grad:  # any other library whose product drops dx (torch won't say)
                raise RuntimeError(NO_INPUT_GRADIENT.format(kind=self.quantized))
        else:
            y = self.adapters[first].dequantized_forward(self.base_layer, x, copy_of)
        return self._add_deltas(y, x, [n for n in pending if n != first])

    def _gathered_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """FSDP2, ZeRO-3: the weight is a copy gathered for this forward (and again for its backward).

        A single in-weight adapter that can (SHiRA) writes into that copy, and its backward writes
        again (the single-process cost); several, or one that cannot (MiSS bat), run additively,
        reading the clean gathered weight. Nothing stays in the weight or the shards.
        """
        if self._live:
            raise RuntimeError(LIVE_BEFORE_FSDP)
        pending = self._pending()
        in_weight = [n for n in pending if self._in_weight(n) is not None]
        first = None
        if len(in_weight) == 1 and self.adapters[in_weight[0]].writes_gathered_copy:
            first = in_weight[0]
            y = self.adapters[first].gathered_forward(self.base_layer, x)
        else:
            y = self.base_layer(x, *args, **kwargs)
        return self._add_deltas(y, x, [n for n in pending if n != first])

    def routed_forward(self, x: torch.Tensor, groups: list[tuple[str, torch.Tensor]]) -> torch.Tensor:
        """Row group g gets adapter g: the base product once, each delta added to its rows only.

        An adapter that lives in the weight (SHiRA) and has many tokens in its group instead runs
        the base product on its rows with its values scattered in, when its cost model says two
        K-scatters and one more pass over the weight beat the sparse product over that many tokens
        (:meth:`InWeightAdapter.prefers_weight`, per layer shape); small groups (decoding) use the
        sparse product.
        Runs with the weight to itself (``_enter(plain=False)``), starting from the clean base.
        """
        self._withdraw_live()
        if self.disabled:
            return self.base_layer(x)
        tokens_per_row = x.numel() // (x.shape[0] * x.shape[-1]) if x.dim() > 1 and x.numel() else 1
        adapters = self.adapters
        writable = self._weight_writable()
        in_weight: list[tuple[str, torch.Tensor]] = []
        by_method: dict[type, list[tuple[Adapter, torch.Tensor]]] = {}
        for name, rows in groups:
            adapter = adapters[name] if name in adapters else None
            if adapter is None:
                continue
            tokens = rows.numel() * tokens_per_row
            if writable and isinstance(adapter, InWeightAdapter) and adapter.prefers_weight(tokens):
                in_weight.append((name, rows))
            else:
                by_method.setdefault(type(adapter), []).append((adapter, rows))
        if in_weight:
            done = {name for name, _ in in_weight}
            rest = [rows for name, rows in groups if name not in done]
            chunks = ([(torch.cat(rest), None)] if rest else []) + [(rows, name) for name, rows in in_weight]
            y = self._run_chunks(x, chunks)
        else:
            y = self.base_layer(x)
        for method, method_groups in by_method.items():  # a method may do all its groups at once
            method.add_routed_deltas(self, y, x, method_groups)
        return y

    def _run_chunks(self, x: torch.Tensor, chunks: list[tuple[torch.Tensor, str | None]]) -> torch.Tensor:
        """The base product per row chunk, with the chunk's weight-resident adapter applied."""
        y = None
        for rows, name in chunks:
            if name is not None:
                self._apply_adapter(name)
            try:
                out = self.base_layer(x.index_select(0, rows))
            finally:
                if name is not None:
                    self._remove_adapter(name)
            if y is None:
                y = out.new_empty((x.shape[0], *out.shape[1:]))
            y.index_copy_(0, rows, out)
        return y

    def extra_repr(self) -> str:
        return f"active={self.active}, merged={self.merged}, disabled={self.disabled}"


class AdapterConv(AdapterLinear):
    """The conv sibling (``nn.Conv1d``, ``nn.Conv2d``): the same wrapper on the flattened kernel
    ``(out, in/groups * prod(kernel))`` (:class:`LayerGeometry`); ``base_layer(x)`` keeps the layer's
    stride, padding, dilation, groups and padding_mode. Reads of the conv's attributes pass through."""

    in_channels = property(lambda self: self.base_layer.in_channels)
    out_channels = property(lambda self: self.base_layer.out_channels)
    kernel_size = property(lambda self: self.base_layer.kernel_size)
    stride = property(lambda self: self.base_layer.stride)
    padding = property(lambda self: self.base_layer.padding)
    dilation = property(lambda self: self.base_layer.dilation)
    groups = property(lambda self: self.base_layer.groups)
    padding_mode = property(lambda self: self.base_layer.padding_mode)


class AdapterEmbedding(AdapterLinear):
    """The embedding sibling: the table ``(num_embeddings, dim)`` seen as (out, in) = (rows, dim);
    the forward is ``base_layer(ids)`` plus each additive adapter's rows. A table tied to an output
    head (``lm_head``) is never written in place (``weight_shared_with``: in-weight adapters run
    additively there, as on any shared weight)."""

    num_embeddings = property(lambda self: self.base_layer.num_embeddings)
    embedding_dim = property(lambda self: self.base_layer.embedding_dim)
    padding_idx = property(lambda self: self.base_layer.padding_idx)
    max_norm = property(lambda self: self.base_layer.max_norm)


def wrap_layer(base_layer: nn.Module) -> AdapterLinear:
    """The wrapper for a supported layer: AdapterConv for convs, AdapterEmbedding for embeddings."""
    kind = geometry_of(base_layer).kind
    return {"conv": AdapterConv, "embedding": AdapterEmbedding}.get(kind, AdapterLinear)(base_layer)


@torch.compiler.disable
def _eager_layer_forward(layer: AdapterLinear, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """A mixed-adapter batch under torch.compile runs each layer's product eagerly: it reads the
    route (a context variable), scatters per group and picks adapters by row (a graph break)."""
    return layer._eager_forward(x, *args, **kwargs)


@torch.compiler.disable
def _eager_module_forward(module: nn.Module, *args, **kwargs):
    return module._eager_forward(*args, **kwargs)


class ModulesToSave(nn.Module):
    """A module trained and saved whole, one copy per adapter (e.g. a classification head).

    The copies live under ``adapters.<name>`` so checkpoint keys follow the same rule as
    adapter layers: ``P.adapters.<name>.<k>`` <-> ``base_model.model.P.<k>``.
    """

    def __init__(self, original_module: nn.Module) -> None:
        super().__init__()
        self.original_module = original_module
        self.adapters = nn.ModuleDict()
        self.active: list[str] = []
        self.disabled = False
        self._guard = ModelGuard()  # the model's, set by inject (routes are looked up by it)

    def add_adapter(self, name: str) -> None:
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} already has a copy of this module")
        copy_ = copy.deepcopy(self.original_module)
        for p in copy_.parameters():
            p.requires_grad_(True)
        self.adapters[name] = copy_

    def remove_adapter(self, name: str) -> None:
        del self.adapters[name]
        self.active = [n for n in self.active if n != name]

    def set_active(self, names: list[str]) -> None:
        self.active = [n for n in names if n in self.adapters]

    def set_disabled(self, disabled: bool) -> None:
        self.disabled = disabled

    def current(self) -> nn.Module:
        if self.disabled or not self.active:
            return self.original_module
        return self.adapters[self.active[0]]

    def forward(self, *args, **kwargs):
        if torch.compiler.is_compiling():  # the route is read eagerly (see AdapterLinear._compiled_forward)
            if getattr(self._guard.local, "routed", False):
                return _eager_module_forward(self, *args, **kwargs)
            return self.current()(*args, **kwargs)
        return self._eager_forward(*args, **kwargs)

    def _eager_forward(self, *args, **kwargs):
        routing = route_of(self._guard)
        if routing is None or self.disabled:
            return self.current()(*args, **kwargs)
        packed, rest = args[0], args[1:]
        x = routing.rows_of(packed)
        y = None
        for name, rows in routing.groups(x.shape[0], x.device):
            module = self.adapters[name] if name in self.adapters else self.original_module
            out = module(x.index_select(0, rows), *rest, **kwargs)
            if not isinstance(out, torch.Tensor):
                raise TypeError(f"mixed-adapter batches need a tensor output from {type(module).__name__}")
            if y is None:
                y = out.new_empty((x.shape[0], *out.shape[1:]))
            y.index_copy_(0, rows, out)
        return y if x is packed else y.unflatten(0, packed.shape[:2])
