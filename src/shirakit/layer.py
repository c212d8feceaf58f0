"""The one wrapper: a linear layer plus a dict of named adapters.

``AdapterLinear`` replaces a targeted ``nn.Linear`` (or transformers ``Conv1D``) in place. Its
forward is ``y = base_layer(x) + sum_{a in active, unmerged} a(x)``. Adapters whose values live in
the weight (:class:`~shirakit.adapter.InWeightAdapter`: SHiRA, MiSS bat) are instead written into
the base weight while active, so their unmerged forward costs nothing beyond the base product;
they are withdrawn (originals restored exactly) before anything else touches the weight: merge,
unmerge, disable, delete, unload, ``state_dict``. The layer calls only what the two adapter
classes declare.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from .adapter import Adapter, InWeightAdapter, LayerGeometry
from .weight_kinds import QUANTIZED_MERGE, fsdp_managed, quantized_kind

try:  # GPT-2 style Conv1D: y = x @ W + b with W stored (in, out)
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a runtime dependency, but stay importable
    Conv1D = ()  # type: ignore[assignment]

SUPPORTED_LAYERS = (nn.Linear, Conv1D) if Conv1D else (nn.Linear,)

# FSDP (fully_shard) turns the weight into shards after inject; values a forward had already written
# into the whole weight would be sharded as if they were the base.
LIVE_BEFORE_FSDP = (
    "this layer's weight was sharded by FSDP while an in-weight adapter (SHiRA, MiSS bat) was written into it "
    "(a forward ran before fully_shard): the shards now hold adapter values as if they were the base. Call "
    "model.state_dict() or shirakit.set_adapter(model, ...) before fully_shard; it takes them out"
)


def geometry_of(layer: nn.Module) -> LayerGeometry:
    if isinstance(layer, nn.Linear):
        return LayerGeometry(layer.in_features, layer.out_features, fan_in_fan_out=False)
    if Conv1D and isinstance(layer, Conv1D):
        in_f, out_f = layer.weight.shape
        return LayerGeometry(in_f, out_f, fan_in_fan_out=True)
    raise TypeError(
        f"expected nn.Linear or transformers Conv1D, found {type(layer).__name__}; "
        "shirakit adapts linear layers only"
    )


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
        self._seen_version = self.weight._version
        self.routing = None  # a shirakit.routing.Routing while a mixed-adapter batch runs
        # model.state_dict() must show the clean base weight, never adapter values riding in it.
        self.register_state_dict_pre_hook(lambda module, prefix, keep_vars: module.withdraw_live())

    # ---- what HF code may read off a linear layer ------------------------------------------
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

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
        if self.quantized and isinstance(adapter, InWeightAdapter) and adapter.delta_reads_weight:
            raise ValueError(
                f"{type(adapter).__name__} computes its delta from the base weight, which is quantized here "
                f"({self.quantized}); dequantize the base or choose a mode whose delta does not read the weight")
        self.withdraw_live()
        self.adapters[name] = adapter.to(self.weight.device)

    def remove_adapter(self, name: str) -> None:
        if name in self.merged:
            raise RuntimeError(f"adapter {name!r} is merged into the weights; unmerge it before deleting")
        self.withdraw_live()
        del self.adapters[name]
        self.active = [n for n in self.active if n != name]

    def set_active(self, names: list[str]) -> None:
        self.withdraw_live()
        self.active = [n for n in names if n in self.adapters]

    def set_disabled(self, disabled: bool) -> None:
        self.withdraw_live()
        self.disabled = disabled

    # ---- weight bookkeeping ---------------------------------------------------------------
    def _check_external_writes(self) -> None:
        """A write we did not make (load_state_dict, a user's copy_) starts a new base generation."""
        if self.weight._version != self._seen_version:
            self._base_generation += 1

    def _apply_adapter(self, name: str) -> None:
        self._check_external_writes()
        clean_below = not self.merged and not self._live
        key = (id(self.weight), self._base_generation) if clean_below else None
        self.adapters[name].merge_into(self.weight, base_key=key)
        self._seen_version = self.weight._version

    def _remove_adapter(self, name: str) -> None:
        self._check_external_writes()
        adapter = self.adapters[name]
        adapter.unmerge_from(self.weight)
        if not adapter.exact_unmerge:  # subtraction leaves rounding behind: the base changed
            self._base_generation += 1
        self._seen_version = self.weight._version

    # ---- live (scattered-in) adapters --------------------------------------------------
    def _in_weight(self, name: str) -> InWeightAdapter | None:
        adapter = self.adapters[name] if name in self.adapters else None
        # a quantized weight holds codes: in-weight adapters run beside it (SHiRA: y = base(x) + s x S^T)
        return adapter if isinstance(adapter, InWeightAdapter) and not self.quantized else None

    def _wanted_live(self) -> list[str]:
        if self.disabled or fsdp_managed(self.base_layer):  # FSDP: written per gathered copy instead
            return []
        return [n for n in self.active if n not in self.merged and self._in_weight(n) is not None]

    def withdraw_live(self) -> None:
        """Restore the base values under every live adapter (reverse order: exact under overlap)."""
        while self._live:
            self._remove_adapter(self._live.pop())

    def sync_live(self) -> None:
        """Make the weight hold exactly the wanted live adapters with their current values."""
        wanted = self._wanted_live()
        if wanted == self._live and all(self.adapters[n].applied_is_current() for n in wanted):
            return
        self.withdraw_live()
        for name in wanted:
            self._apply_adapter(name)
            self._live.append(name)

    # ---- merging ------------------------------------------------------------------------
    def _check_mergeable(self, names: list[str]) -> None:
        if self.quantized and names:
            raise RuntimeError(QUANTIZED_MERGE.format(where=f"a layer with adapters {names}", kind=self.quantized))

    def merge_is_finite(self, names: list[str]) -> bool:
        self._check_mergeable(names)
        self.withdraw_live()
        return all(self.adapters[n].merged_is_finite(self.weight) for n in names if n not in self.merged)

    def merge(self, names: list[str]) -> None:
        self._check_mergeable(names)
        self.withdraw_live()
        # weight-resident adapters first, in order, as forward writes them in (MiSS bat reads the weight)
        names = sorted(names, key=lambda n: self._in_weight(n) is None)
        for name in names:
            if name in self.merged:
                warnings.warn(f"adapter {name!r} is already merged; skipping", stacklevel=3)
                continue
            self._apply_adapter(name)
            self.merged.append(name)

    def unmerge(self) -> None:
        self.withdraw_live()
        while self.merged:
            self._remove_adapter(self.merged.pop())

    def switch(self, names: list[str]) -> None:
        """Fused mode: unmerge whatever is merged, merge ``names`` (SHiRA: scatters only)."""
        self.unmerge()
        self.merge([n for n in names if n in self.adapters])

    # ---- forward ------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.routing is not None:
            return self.routed_forward(x, self.routing.groups(x.shape[0], x.device))
        if fsdp_managed(self.base_layer):
            return self._gathered_forward(x, *args, **kwargs)
        self.sync_live()
        pending = [] if self.disabled else [n for n in self.active if n not in self.merged]
        live = [self._in_weight(n) for n in pending if self._in_weight(n) is not None]
        if live and torch.is_grad_enabled():
            y = live[0].trainable_base_forward(self.base_layer, x)
            for adapter in live[1:]:
                y = adapter.tap_value_grad(y, x)
        else:
            y = self.base_layer(x, *args, **kwargs)
        for name in pending:
            if self._in_weight(name) is None:
                y = y + self.adapters[name](x, self.weight).to(y.dtype)
        return y

    def _gathered_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """FSDP2: the weight is a copy gathered for this forward (and again for its backward).

        A single in-weight adapter that can (SHiRA) writes into that copy and its backward writes
        again (the single-process cost); several, or one that cannot (MiSS bat), run additively,
        reading the clean gathered weight. Nothing stays in the weight or the shards.
        """
        if self._live:
            raise RuntimeError(LIVE_BEFORE_FSDP)
        pending = [] if self.disabled else [n for n in self.active if n not in self.merged]
        in_weight = [n for n in pending if self._in_weight(n) is not None]
        first = None
        if len(in_weight) == 1 and hasattr(self.adapters[in_weight[0]], "gathered_forward"):
            first = in_weight[0]
            y = self.adapters[first].gathered_forward(self.base_layer, x)
        else:
            y = self.base_layer(x, *args, **kwargs)
        for name in pending:
            if name != first:
                y = y + self.adapters[name](x, self.weight).to(y.dtype)
        return y

    def routed_forward(self, x: torch.Tensor, groups: list[tuple[str, torch.Tensor]]) -> torch.Tensor:
        """Row group g gets adapter g: the base product once, each delta added to its rows only.

        An adapter that lives in the weight (SHiRA) and has many tokens in its group instead runs
        the base product on its rows with its values scattered in: two K-scatters beat a sparse
        product over that many tokens; small groups (decoding) use the sparse product.
        """
        self.withdraw_live()
        if self.disabled:
            return self.base_layer(x)
        tokens_per_row = x[0].numel() // x.shape[-1] if x.dim() > 1 else 1
        in_weight = [
            (name, rows) for name, rows in groups
            if self._in_weight(name) is not None
            and rows.numel() * tokens_per_row >= self._in_weight(name).scatter_min_tokens
        ]
        done = {name for name, _ in in_weight}
        if in_weight:
            rest = [rows for name, rows in groups if name not in done]
            chunks = ([(torch.cat(rest), None)] if rest else []) + [(rows, name) for name, rows in in_weight]
            y = self._run_chunks(x, chunks)
        else:
            y = self.base_layer(x)
        for name, rows in groups:
            if name in self.adapters and name not in done:
                delta = self.adapters[name](x.index_select(0, rows), self.weight)
                y.index_add_(0, rows, delta.to(y.dtype))
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
        self.routing = None  # a shirakit.routing.Routing while a mixed-adapter batch runs

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
        if self.routing is None or self.disabled:
            return self.current()(*args, **kwargs)
        x, rest = args[0], args[1:]
        y = None
        for name, rows in self.routing.groups(x.shape[0], x.device):
            module = self.adapters[name] if name in self.adapters else self.original_module
            out = module(x.index_select(0, rows), *rest, **kwargs)
            if not isinstance(out, torch.Tensor):
                raise TypeError(f"mixed-adapter batches need a tensor output from {type(module).__name__}")
            if y is None:
                y = out.new_empty((x.shape[0], *out.shape[1:]))
            y.index_copy_(0, rows, out)
        return y
