"""SHiRA: Sparse High-Rank Adapters (Bhardwaj et al., arXiv 2406.13175).

Train K = r*(m+n) entries of the base weight itself, chosen by a mask (§3.1):

    W' = W + s * S,   S sparse with S[i_k, j_k] = v_k,  k = 1..K

S is high rank though it has as many values as a rank-r LoRA. Because only K entries change,
an adapter is merged by a scatter of K values and unmerged by a scatter of the K saved
originals (bit-exact); switching adapters in fused mode is two scatters and no matmul (§3.2).

Training here keeps the values scattered into W while the adapter is active (originals saved),
so the forward is the base product and the backward adds only an SDDMM for the K value
gradients (see :mod:`shirakit.methods.shira.sparse`); no dense m x n delta or gradient is ever formed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, ClassVar

import numpy as np
import torch
from torch import nn
from torch.autograd.graph import increment_version

from ...core.adapter import InWeightAdapter, adapter_dtype
from ...core.config import AdapterConfig, check_rank, no_serialize
from ...core.registry import register
from ...core.sharded_weights import full_values, is_sharded, shard_positions, sharded_rows
from ...core.sparse_delta import SparseDelta
from . import compact, grouped, index_io, native_sddmm, siblings
from .masks import MASKS, shira_budget, validate_indices
from .sparse import SparsePattern, gathered_delta, scatter_values, scattered_linear, sparse_delta, value_grad_tap


@dataclass
class ShiraConfig(AdapterConfig):
    """PEFT's ShiraConfig fields and defaults. ``mask_fn(base_layer, r, generator) -> indices``
    overrides ``mask_type`` (the name is still written to adapter_config.json)."""

    peft_type: ClassVar[str] = "SHIRA"
    absent_in_peft: ClassVar[frozenset[str]] = frozenset(
        {"exclude_modules", "layers_to_transform", "layers_pattern", "bias"})

    r: int = 32
    mask_type: str = "random"
    random_seed: int | None = None
    init_weights: bool = True
    mask_fn: Callable | None = no_serialize()

    def __post_init__(self) -> None:
        super().__post_init__()
        check_rank("r", self.r)
        if self.mask_fn is None and self.mask_type not in MASKS:
            raise ValueError(
                f"unknown mask_type {self.mask_type!r}: expected one of {sorted(MASKS)} or a mask_fn"
            )

    @property
    def seed(self) -> int | None:
        return self.random_seed

    @classmethod
    def recipe(cls, r: int, target_modules, modules_to_save=None, seed: int = 0, **options) -> ShiraConfig:
        """Rank ``r`` (K = r (m + n) values, LoRA's count at the same r); ``seed`` draws the masks."""
        return cls(r=r, target_modules=target_modules, modules_to_save=modules_to_save, random_seed=seed, **options)

    @classmethod
    def from_dict(cls, data: dict, source: str = "<dict>") -> ShiraConfig:
        """A saved adapter may name a custom mask shirakit does not know: its indices come from the
        file, so it loads; only drawing a new mask with this config would need the function."""
        mask_type = data.get("mask_type", "random")
        if not isinstance(mask_type, str) or mask_type in MASKS:  # a wrong type is refused by name there
            return super().from_dict(data, source)

        def unavailable(*args, **kwargs):
            raise ValueError(f"{source}: mask_type {mask_type!r} is not a shirakit mask; pass its mask_fn to "
                             "draw a new mask (loading the saved indices does not need it)")

        config = super().from_dict({**data, "mask_type": "random"}, source)
        return replace(config, mask_type=mask_type, mask_fn=unavailable)


@register
class ShiraAdapter(InWeightAdapter):
    fuse_min_steps = 3  # a switch is two scatters of K values (docs/serving.md)
    config_class = ShiraConfig
    merges_into_shards = True  # scatters each rank's positions into its own rows (see _target)
    _device_tensors = ("_saved", "_merged_values")
    # A hot-swap slot (only where SHiRA runs additively: tied weights) holds the layer's largest K,
    # r being what sets K = r(m+n); positions past an adapter's K are (0, 0) with value 0.
    slot_padded = ("r",)
    slot_scaled = "shira_weight"
    # convs: K positions in the flattened kernel (out, in/groups * prod(k)); embeddings: in the table
    layer_kinds = frozenset({"linear", "conv", "embedding"})

    def init_parameters(self, base_layer: nn.Module, generator: torch.Generator | None, source: str) -> None:
        geometry, config, source = self.geometry, self.config, source or "mask"
        k = shira_budget(config.r, geometry)
        weight = base_layer.weight
        dtype = adapter_dtype(weight.dtype)
        if generator is None:  # loading: load_tensors fills these placeholders (no mask, no init, no checks)
            self.shira_weight = nn.Parameter(torch.empty(k, dtype=dtype, device=weight.device))
            self.register_buffer("shira_indices", torch.empty(2, k, dtype=torch.int32, device=weight.device))
        else:
            mask_fn = config.mask_fn or MASKS[config.mask_type]
            raw = mask_fn(base_layer, config.r, generator)
            source = f"{source}: mask {getattr(mask_fn, '__name__', type(mask_fn).__name__)!r}"
            indices, _ = validate_indices(raw, geometry, k, source)
            init = torch.zeros(k, dtype=dtype)
            if not config.init_weights:  # random values: tests only, as in PEFT
                init = torch.randn(k, generator=generator, dtype=dtype)
            self.shira_weight = nn.Parameter(init.to(weight.device))
            self.register_buffer("shira_indices", indices.to(device=weight.device, dtype=torch.int32))
        # Derived from shira_indices on first use, forgotten when they change (load_tensors, device moves):
        self._positions: torch.Tensor | None = None  # their flat positions in the weight's storage (storage_index)
        self._pattern: SparsePattern | None = None  # the kernels' view of them (pattern)
        self._pattern_version = -1  # shira_indices' version counter when the pattern was made
        # _saved (the K base values, InWeightAdapter's) is kept after unmerge, for the next merge:
        self._saved_key: object = None  # the layer's name for the weight state _saved was read from
        self._merged_state: object = None  # the values state W0 + s*v was computed for
        self._merged_values: torch.Tensor | None = None  # W0 + s*v last scattered (weight dtype)
        self._local_map = None  # FSDP2: ((first row, end row), local positions, which values) of a shard
        self._weight_shape = tuple(weight.shape)
        if geometry.kind != "linear":  # the gathered / dequantized copy paths are written for linear products
            self.writes_gathered_copy = self.writes_dequantized_copy = False

    def storage_index(self, keep: bool = True) -> torch.Tensor:
        """The K positions in the weight's own storage, int64 (``index_copy_`` takes no other; the
        scatters of a merge or switch run ~15% slower from int32 ones), from ``shira_indices``.

        Kept after the first call for the paths that scatter into one weight again and again (merge,
        switch, a training step's write). ``keep=False`` derives them for this call only: under FSDP2
        or ZeRO-3 every rank would otherwise hold 8 bytes per value of positions beside the indices,
        for a write that is once per gathered copy (``docs/distributed.md``, memory).
        """
        idx = self.shira_indices
        if self._positions is not None and self._positions.device == idx.device:
            return self._positions
        positions = self.geometry.storage_flat_index(idx[0], idx[1])
        if keep:
            self._positions = positions
        return positions

    def pattern(self) -> SparsePattern:
        """The kernels' :class:`SparsePattern`: views of the two rows of ``shira_indices`` (int32, no
        copies), plus the CSR row offsets. Made again when the indices were written in place (a
        hot-swap slot's copy, a reset), which eager code sees by their version counter."""
        idx = self.shira_indices
        stale = self._pattern is None or self._pattern.device != idx.device
        if not stale and not torch.compiler.is_compiling():
            stale = self._pattern_version != idx._version
        if stale:
            g = self.geometry
            self._pattern = SparsePattern(idx[0], idx[1], g.out_features, g.in_features)
            self._pattern_version = idx._version
        return self._pattern

    # ---- the maths ------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """delta_y = s * x S^T by a sparse product (mixed batches, and weights that cannot carry the
        values: tied, quantized). Under torch.compile a gather + index_add instead (dynamo traces no
        sparse tensor), reading the indices directly: a hot-swap slot rewrites them in place."""
        g = self.geometry
        if g.conv is not None:
            return siblings.conv_delta(x, self.shira_weight, self.storage_index(), self._weight_shape, g.conv,
                                       self.scale)
        if g.embedding is not None:
            return siblings.embedding_delta(x, self.shira_weight, self.shira_indices[1], self.pattern().crow,
                                            g.in_features, g.embedding, self.scale)
        if torch.compiler.is_compiling():
            return gathered_delta(x, self.shira_indices, self.shira_weight * self.scale, self.geometry.out_features)
        return sparse_delta(x, self.shira_weight, self.pattern(), self.scale)

    @classmethod
    def add_routed_deltas(cls, layer, y, x, groups) -> None:
        """Every SHiRA group of a routed batch in one kernel call where it applies (inference on
        CPU: :mod:`.grouped`'s numba kernel; on CUDA: its Triton launch), else one sparse product
        per group (convs and embeddings: always per group)."""
        if layer.geometry.kind == "linear":
            if grouped.can_group(y, x) and grouped.add_grouped(layer, y, x, groups, ShiraAdapter):
                return
            if grouped.can_group_on_device(y, x) and grouped.add_grouped_on_device(layer, y, x, groups,
                                                                                   ShiraAdapter):
                return
        super().add_routed_deltas(layer, y, x, groups)

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        g = self.geometry
        delta = torch.zeros(g.out_features * g.in_features, dtype=torch.float32, device=weight.device)
        idx = self.shira_indices.long()
        delta[idx[0] * g.in_features + idx[1]] = self.shira_weight.detach().float() * self.scale
        return delta.view(g.out_features, g.in_features)

    # ---- metrics ------------------------------------------------------------------------------
    def delta_for_metrics(self, weight: torch.Tensor) -> SparseDelta:
        """The delta by its non-zeros (orthogonality metrics without a dense m x n)."""
        g = self.geometry
        values = self.shira_weight.detach().float() * self.scale
        return SparseDelta(self.shira_indices.long(), values, (g.out_features, g.in_features))

    file_keys = ("shira_weight", "shira_indices", "shira_index_gaps", "shira_index_far")

    @classmethod
    def file_delta(cls, config: ShiraConfig, tensors: dict[str, torch.Tensor], compact: bool,
                   source: str) -> SparseDelta:
        """The sparse delta from the file's indices, its shape inferred from the largest index (a
        lower bound when the last rows/columns are untouched, which a 1-5% random mask practically
        never leaves). A compact file stores flat positions: their rows need the base model."""
        if compact:
            raise ValueError(f"{source}: a compact file stores flat positions; its shapes need the base model")
        idx = tensors["shira_indices"].long()
        shape = (int(idx[0].max()) + 1, int(idx[1].max()) + 1)
        return SparseDelta(idx, tensors["shira_weight"].float(), shape, shape_inferred=True)

    # ---- living in the weight (InWeightAdapter) ----------------------------------------------
    def trained_values(self) -> torch.Tensor:
        return self.shira_weight

    def trainable_base_forward(self, base_layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The base product on the scattered weight; backward: dx = g W', dv = s * SDDMM(g, x)."""
        if not self.shira_weight.requires_grad:
            return base_layer(x)
        hooked = base_layer._forward_hooks or base_layer._forward_pre_hooks
        if hooked:  # respect the hooks: call the layer, add the gradient through a copying tap
            return self.tap_value_grad(base_layer(x), x)
        g = self.geometry
        if g.conv is not None:
            return siblings.scattered_conv(x, self.shira_weight, base_layer.weight, base_layer.bias,
                                           self.storage_index(), g.conv, self.scale)
        if g.embedding is not None:
            idx = self.shira_indices
            return siblings.scattered_embedding(x, self.shira_weight, base_layer.weight, idx[0], idx[1],
                                                g.embedding, self.scale)
        return scattered_linear(
            x, self.shira_weight, base_layer.weight, base_layer.bias, self.pattern(),
            self.scale, self.geometry.fan_in_fan_out,
        )

    def tap_value_grad(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """y unchanged (a copy); backward adds dv = s * SDDMM(g, x) at the K positions."""
        if not self.shira_weight.requires_grad:
            return y
        g = self.geometry
        if g.conv is not None:
            return siblings.conv_value_tap(y, x, self.shira_weight, self._weight_shape, self.storage_index(), g.conv,
                                           self.scale)
        if g.embedding is not None:
            idx = self.shira_indices
            return siblings.embedding_value_tap(y, x, self.shira_weight, idx[0], idx[1], g.embedding, self.scale)
        return value_grad_tap(y, x, self.shira_weight, self.pattern(), self.scale)

    # ---- cost model of a mixed-batch group (InWeightAdapter.prefers_weight) ------------------
    #: CPU seconds per value for the two scatters (in, then the originals back; random positions)
    WRITE_S_PER_VALUE: ClassVar[float] = 2.0e-9
    #: CPU seconds per value of the grouped numba kernel (inference on CPU, :mod:`.grouped`) for one
    #: block of 8 tokens and one of 4 (a block reads each value once, with a vector of its tokens).
    #: Fitted by ``benchmarks/route_costs.py`` (6 layer shapes 512-2816, r 8 and 32, 1-256 tokens
    #: per group, 4 groups, 1 thread, fp32, loaded 2-core machine): the ratio by least squares on
    #: the kernel's cost (0.98 and 0.68 ns alone), the scale for the smallest regret against the
    #: write and re-read constants (kept): the choice cost at most 1.05x the faster route there.
    #: Rechecked after the kernel's faster transposes (96 points, heavy lock, load ~1-2): refit
    #: 0.62 / 0.50 ns, no better than these (worst 1.07x, median 1.00x, 1 point above 1.02x), so kept.
    GROUPED_S_PER_VALUE_8: ClassVar[float] = 0.65e-9
    GROUPED_S_PER_VALUE_4: ClassVar[float] = 0.45e-9
    #: CPU seconds per multiply-add of torch's CSR product (MKL), the path otherwise
    PRODUCT_S_PER_MAC: ClassVar[float] = 0.123e-9

    def write_cost(self) -> float:
        return self.WRITE_S_PER_VALUE * self.shira_weight.numel()

    def cost_mode(self) -> object:
        return (torch.is_grad_enabled(), grouped.AVAILABLE)

    def additive_cost(self, tokens: int) -> float:
        """The grouped kernel: K values read once per block of 8 (or, the last <= 4 tokens, 4)
        tokens, ``K * (S_8 * blocks of 8 + S_4 * blocks of 4)``; torch's CSR product: K*T
        multiply-adds. With the base class's rule a group goes into the weight from about

            T* = 8 (WRITE_S_PER_VALUE * K + REREAD_S_PER_ENTRY * m * n) / (S_8 * K)

        tokens: wide layers with few values (m n / K = m n / (r (m + n)) large) keep the sparse
        product longer."""
        k = self.shira_weight.numel()
        if grouped.AVAILABLE and not torch.is_grad_enabled() and self.shira_weight.device.type == "cpu":
            eights, fours = grouped.blocks(tokens)
            return k * (self.GROUPED_S_PER_VALUE_8 * eights + self.GROUPED_S_PER_VALUE_4 * fours)
        return self.PRODUCT_S_PER_MAC * k * tokens

    # ---- FSDP2: the gathered copy of a sharded weight -------------------------------------------
    writes_gathered_copy = True

    def gathered_forward(self, base_layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """FSDP2, ZeRO-3: the base product on this forward's gathered copy of the weight, with
        W0[idx] + s*v written into it for that product only and the K base values put back right
        after; the backward does the same around its ``dx = g W'`` on whatever copy it gets (gathered
        afresh from the clean shards, or this one, kept by FSDP and already clean again).

        So a copy holds the values only while one of these products reads it, and W0 is always read
        from the copy itself: nothing is kept between forward and backward or between steps, and a
        rank holds, per value, only its share of the values and the (2, K) int32 indices
        (``docs/distributed.md``, memory). Costs over the frozen product: two K-value reads and
        four K-value writes per step, and the SDDMM. Exceptions leave the copy clean too.
        """
        weight, values = base_layer.weight, self.shira_weight
        self._positions = None  # derived per call on this path (storage_index): not kept on every rank
        undo = self._write_gathered(weight, values)
        try:
            if not (torch.is_grad_enabled() and values.requires_grad):
                return base_layer(x)

            def refill(gathered: torch.Tensor) -> tuple[torch.Tensor, Callable[[], None]]:
                return gathered, self._write_gathered(gathered, values)

            return scattered_linear(x, values, weight, base_layer.bias, self.pattern(), self.scale,
                                    self.geometry.fan_in_fan_out, refill)
        finally:
            undo()

    @torch.no_grad()
    def _write_gathered(self, weight: torch.Tensor, values: torch.Tensor) -> Callable[[], None]:
        """Scatter W0[idx] + s*v into a gathered copy (W0 read from it); returns what puts W0 back.

        Written through ``weight.data``, whose version counter is its own: the copy is saved for the
        backward, and a write seen by autograd would fail its check there. ``index_copy_``, not
        scatter_values' numpy path: numpy pins the storage, and FSDP frees the copy by resizing its
        storage to 0. ``values``: the forward's parameter object (FSDP2 and ZeRO-3 gather into the
        same one for the backward), never a shard.
        """
        flat = self._flat(weight.data)
        index = self.storage_index(keep=False)
        base = flat.index_select(0, index)
        flat.index_copy_(0, index, self.merged_values(flat, base, values=values))

        def undo() -> None:
            with torch.no_grad():
                flat.index_copy_(0, index, base)
        return undo

    # ---- a quantized base: the dequantized copy of one product ---------------------------------
    writes_dequantized_copy = True

    def dequantized_forward(self, base_layer: nn.Module, x: torch.Tensor, dequantizer) -> torch.Tensor:
        """y = x (deq(W) + s S)^T + b, on a dense copy the library would dequantize for this product
        anyway (bitsandbytes on CPU), with W0[idx] + s*v written into it; the backward dequantizes
        again and writes the same K values (dx = g (deq(W) + s S)), then dv = s * SDDMM(g, x).

        The codes are never written and no dense copy outlives its product: a layer holds one only
        while its own forward or backward multiplies by it, as bitsandbytes' own path does. Costs
        over the frozen quantized base: two K-value writes and the SDDMM, where the additive path
        adds two sparse products as well (``benchmarks/train_step_sharded.py``, ``nf4`` rows).
        """
        index = self.storage_index()
        dense = dequantizer.weight()
        flat = self._flat(dense)
        written = self.merged_values(dense, flat.index_select(0, index))  # K values, kept for the backward
        flat.index_copy_(0, index, written)

        def refill(_: None) -> tuple[torch.Tensor, None]:
            again = dequantizer.weight()
            self._flat(again).index_copy_(0, index, written)
            return again, None  # a transient copy: nothing to take out again

        bias = base_layer.bias
        bias = None if bias is None else bias.to(dequantizer.dtype)
        y = scattered_linear(x.to(dequantizer.dtype), self.shira_weight, dense, bias, self.pattern(), self.scale,
                             False, refill, transient=True)
        return y.to(x.dtype)

    # ---- scatter merge ----------------------------------------------------------------------
    def _flat(self, weight: torch.Tensor) -> torch.Tensor:
        if not weight.is_contiguous():
            raise RuntimeError("SHiRA merges by scatter into a contiguous weight; this weight is not")
        return weight.view(-1)

    def _target(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(flat storage to write, positions in it, which of the K values go there; None: all).

        An FSDP2-sharded weight is written in this rank's rows only; the global -> local position
        map is computed once per shard layout.
        """
        if not is_sharded(weight):
            positions = self.__dict__["_positions"]  # storage_index(), without its checks when kept
            if positions is None or positions.device != weight.device:
                positions = self.storage_index()
            return self._flat(weight), positions, None
        local, start, stop = sharded_rows(weight)
        if self._local_map is None or self._local_map[0] != (start, stop):
            positions = self.storage_index(keep=False)
            self._local_map = ((start, stop), *shard_positions(positions, weight.shape[1], start, stop))
        return self._flat(local), self._local_map[1], self._local_map[2]

    @torch.no_grad()
    def merged_values(self, weight: torch.Tensor, base_values: torch.Tensor, which=None,
                      values: torch.Tensor | None = None) -> torch.Tensor:
        """W0[idx] + s*v, computed in fp32, in the weight's dtype (``which``: a subset of the K;
        ``values``: the values to use, by default the adapter's, gathered if sharded)."""
        values = full_values(self.shira_weight) if values is None else values
        values = values if which is None else values.index_select(0, which)
        return (base_values.float() + self.scale * values.float()).to(weight.dtype)

    @torch.no_grad()
    def merged_is_finite(self, weight: torch.Tensor) -> bool:
        flat, index, which = self._target(weight)
        return bool(torch.isfinite(self.merged_values(weight, flat.index_select(0, index), which)).all())

    def write_into(self, weight: torch.Tensor, base_key: object) -> None:
        """Save the K base values, scatter W0 + s*v in their place.

        When the layer vouches (same ``base_key``) that the weight is the one the saved values
        were read from, the read is skipped: a warm switch is then two scatters.
        """
        flat, index, values = self.planned_write(weight, base_key)
        scatter_values(flat, index, values)
        self._after_write()

    def _after_write(self) -> None:
        if self._parameters["shira_weight"].requires_grad:
            self.pattern()  # now, eagerly: a compiled training forward reads it as a plain input

    # ---- many layers in one call (fused switching, shirakit.model.switch) -----------------------
    batched_scatter = True

    @torch.no_grad()
    def planned_write(self, weight: torch.Tensor, base_key: object):
        """(flat weight, positions, W0 + s*v): the base values read first unless ``base_key`` vouches
        for the saved ones, the sum made unless the kept one is current (see :meth:`write_into`).
        Plain attributes go through ``__dict__``: this runs per layer on every switch."""
        flat, index, which = self._target(weight)
        d = self.__dict__
        reread = base_key is None or base_key != d["_saved_key"] or d.get("_saved") is None
        if reread:
            d["_saved"] = flat.index_select(0, index)
        d["_saved_key"] = base_key
        state = self.values_state()
        # W0 + s*v is kept too (K values in the weight's dtype), so a warm switch does no arithmetic
        if reread or d["_merged_values"] is None or d["_merged_state"] != state:
            d["_merged_state"], d["_merged_values"] = state, self.merged_values(weight, d["_saved"], which)
        d["_batch_state"] = state
        return flat, index, d["_merged_values"]

    def planned_restore(self, weight: torch.Tensor):
        flat, index, _ = self._target(weight)
        return flat, index, self.__dict__["_saved"]

    def written_by_batch(self) -> None:
        self.__dict__["_applied_state"] = self.__dict__.pop("_batch_state")
        self._after_write()

    def restored_by_batch(self) -> None:
        self.__dict__["_applied_state"] = None

    @classmethod
    def scatter_many(cls, writes) -> None:
        """Every layer's K values in one C call on CPU (:mod:`.native_sddmm`, ``shirakit_scatter_many``:
        bit copies through the storages' addresses, one per element size), then each weight's version
        counter bumped as ``index_copy_`` would; elsewhere, or without the C kernels, one
        :func:`scatter_values` per layer."""
        kernels = native_sddmm.kernels() if writes and writes[0][0].device.type == "cpu" else None
        if kernels is None or any(flat.device.type != "cpu" for flat, _, _ in writes):
            for flat, index, values in writes:
                scatter_values(flat, index, values)
            return
        by_size: dict[int, list] = {}
        for flat, index, values in writes:
            if values.dtype != flat.dtype or not (index.is_contiguous() and values.is_contiguous()):
                raise RuntimeError(f"scatter_many: expected contiguous int64 positions and {flat.dtype} values, "
                                   f"found {index.dtype} {values.dtype}")
            by_size.setdefault(flat.element_size(), []).append((flat, index, values))
        for size, group in by_size.items():
            addresses = np.array([(f.data_ptr(), i.data_ptr(), v.data_ptr(), i.numel()) for f, i, v in group],
                                 dtype=np.int64).T.copy()
            kernels.scatter_many(addresses[0], addresses[1], addresses[2], addresses[3], size)
        for flat, _, _ in writes:
            increment_version(flat)

    @torch.no_grad()
    def refresh_in(self, weight: torch.Tensor) -> bool:
        """W0[idx] + s*v over the values written last, from the saved W0: one scatter per training
        step instead of two (restore, write). The positions are the same, so nothing else changes."""
        if self._applied_state is None or self._saved is None:
            return False
        flat, index, which = self._target(weight)
        state = self.values_state()
        self._merged_state, self._merged_values = state, self.merged_values(weight, self._saved, which)
        scatter_values(flat, index, self._merged_values)
        self._applied_state = state
        return True

    def restore_into(self, weight: torch.Tensor) -> None:
        """Scatter the saved originals back: the base is restored bit-exactly."""
        flat, index, _ = self._target(weight)
        scatter_values(flat, index, self._saved)

    # ---- fusion ------------------------------------------------------------------------------
    @classmethod
    def combine(cls, layers: dict, configs: list[ShiraConfig], weights: list[float]):
        """Sparse union: positions of all inputs, values sum_i w_i s_i v_i where they overlap.

        The union of K_i positions generally has more than r*(m+n) of them; to stay a file PEFT can
        read (it insists on K = r*(m+n)), r becomes the smallest that fits every layer's union and
        each layer is padded with zero-valued positions (they change nothing).
        """
        unions = {}
        for path, (geometry, adapters) in layers.items():
            n = geometry.in_features
            flats, values = [], []
            for adapter, w in zip(adapters, weights):
                if adapter is not None:
                    idx = adapter.shira_indices.long().cpu()
                    flats.append(idx[0] * n + idx[1])
                    values.append(adapter.shira_weight.detach().float().cpu() * (adapter.scale * w))
            flat, inverse = torch.unique(torch.cat(flats), sorted=True, return_inverse=True)
            summed = torch.zeros(flat.numel()).index_add_(0, inverse, torch.cat(values))
            dtype = next(a for a in adapters if a is not None).shira_weight.dtype
            unions[path] = (geometry, flat, summed, dtype)
        r = max(math.ceil(u[1].numel() / (u[0].in_features + u[0].out_features)) for u in unions.values())
        tensors = {}
        for path, (geometry, flat, summed, dtype) in unions.items():
            n = geometry.in_features
            try:
                k = shira_budget(r, geometry)
            except ValueError as err:  # the union needs a larger r than this small layer can hold
                raise ValueError(
                    f"combining SHiRA adapters: the union of their positions needs r={r} somewhere (one r per "
                    f"file, K = r*(in+out) per layer, as PEFT reads it), which does not fit layer {path!r}: {err}. "
                    f"Leave that layer out of the adapters, or train them with a smaller r"
                ) from None

            window = torch.arange(k)
            pad = window[~torch.isin(window, flat)][: k - flat.numel()]
            all_flat, order = torch.sort(torch.cat([flat, pad]))
            values = torch.cat([summed, torch.zeros(pad.numel())])[order]
            tensors[path] = {
                "shira_weight": values.to(dtype),
                "shira_indices": torch.stack([all_flat // n, all_flat % n]).to(torch.int32),
            }
        config = ShiraConfig(r=r, target_modules=sorted(layers), fan_in_fan_out=configs[0].fan_in_fan_out)
        return config, tensors

    # ---- checkpoints ------------------------------------------------------------------------
    @torch.no_grad()
    def load_tensors(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        """Validate the indices (range, count, uniqueness), sort them and the values together."""
        k = self.shira_weight.numel()
        values, raw, g = tensors["shira_weight"], tensors["shira_indices"], self.geometry
        # The common case (sorted, valid) in one pass: the file's own int32 tensor becomes the buffer
        # (no copy), the storage positions are written as it is checked. Else the reference path.
        adopt = raw.dtype == torch.int32 and raw.is_contiguous() and raw.shape == self.shira_indices.shape \
            and raw.device == self.shira_indices.device
        target = raw if adopt else self.shira_indices
        positions = torch.empty(k, dtype=torch.int64, device=self.shira_indices.device)
        if index_io.load_pairs(raw, g.out_features, g.in_features, g.fan_in_fan_out, target, positions):
            self.shira_indices = target
        else:
            indices, order = validate_indices(raw, g, k, f"{source}: shira_indices")
            values = values if order is None else values[order]
            self.shira_indices.copy_(indices.to(torch.int32))
            positions = None  # derived on first use
        self._positions, self._pattern = positions, None
        if values.dtype == self.shira_weight.dtype and values.device == self.shira_weight.device \
                and values.is_contiguous() and values.shape == self.shira_weight.shape:
            self.shira_weight.data = values  # the file's tensor is ours: take it rather than copy it
        else:
            self.shira_weight.copy_(values)
        self._saved, self._saved_key, self._merged_values = None, None, None
        self._local_map = None

    def compact_tensors(self) -> dict[str, torch.Tensor]:
        return compact.encode(self.shira_indices, full_values(self.shira_weight).detach(), self.geometry.in_features)

    def expand_compact(self, tensors: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
        return compact.decode(tensors, self.geometry.in_features, source, self.geometry.out_features)

    def drop_device_caches(self) -> None:
        self._positions, self._pattern, self._local_map = None, None, None  # made again on the new device

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, K={self.shira_weight.numel()}, mask={self.config.mask_type}"

