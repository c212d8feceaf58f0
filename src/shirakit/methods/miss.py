"""MiSS: Matrix Shard Sharing (arXiv 2409.15371; formerly "Bone", block-affine adaptation).

The weight W (out, in) is cut along its input features into r-wide shards; one small trainable
block is shared by all shards. The mode belongs to each adapter (``MissConfig.init_weights``):

``True`` / ``"balance"`` (default): ``miss_block`` M is (r, out), zeros at init. Every shard gets
the same update, W'[o, k*r + j] = W[o, k*r + j] + M[j, o], so

    delta_y = s * S(dropout(x)) M,   S(x)_j = sum_k x[k*r + j]

with x zero-padded to a multiple of r (the last shard is cut short when in % r != 0). The forward
costs one r-wide sum and an (r x out) product: no dense delta is ever formed.

``"mini"``: M is (r, mini_r) and is repeated out/mini_r times along the output features
(requires out % mini_r == 0), then as balance. The product is taken with the small block and
the (..., mini_r) result is tiled, not the block.

``"bat"`` (block-affine): M is (out/r, r, r), one r x r block per output shard b (requires
in % r == 0 and out % r == 0). For the weight's r x r blocks W_bc (output shard b, input shard c)

    W'_bc = W_bc + s * (W_bc M_b + M_b)

The delta depends on W, so no exact form is cheaper than one W-sized pass: adding x delta_W^T to
the base output costs a second full product, and PEFT clones W and adds the delta on every call.
Here bat lives in the weight while active, as SHiRA does: W0 is kept aside, W0 + delta is written
in (fp32 sum, rounded once), so a forward is the base layer's own product, and the block's
gradient comes from a tap, dL/dM_b = s * sum_c (W0_bc^T G_bc + G_bc) with G = g^T x. The delta is
re-written only when the block or the scale changes (once per optimizer step); unmerge, disable
and ``state_dict`` put W0 back bit-exactly (PEFT inverts I + M_b, which is only approximate).
Measured with benchmarks/bench_miss_bat.py (CPU, fp32, 1 thread, one 2816 x 1024 layer, 1024
tokens, r = 64, best of 10, on a loaded shared machine): forward under no_grad 118 ms, the base
layer alone 121 ms, PEFT's MissLinear 175 ms, the clone form 154 ms, base + x delta_W^T 274 ms;
forward + backward with the delta re-written every step 329 ms, PEFT 330 ms, clone 321 ms.

Beyond PEFT: MiSS also adapts transformers Conv1D (the weight is read transposed). Like PEFT, bat
ignores ``miss_dropout`` (the delta sits in the weight) and bat adapters active together compose
in order, each written on top of the weight the previous ones left; a merge puts weight-resident
adapters in first, in the same order, so merged equals unmerged with balance/mini adapters active
too. Training two bat adapters of one layer at once drops the earlier one's effect through the
later one's W-dependence from its gradient (train one at a time). r > in_features is refused at
inject time, as in PEFT (the padded rows would never train).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..core.adapter import Adapter, InWeightAdapter, LayerGeometry
from ..core.config import AdapterConfig, check_dropout, check_rank
from ..core.registry import register

MODES = {True: "balance", False: "balance", "balance": "balance", "bat": "bat", "mini": "mini"}


@dataclass
class MissConfig(AdapterConfig):
    """PEFT's MissConfig fields and defaults. ``init_weights`` picks the mode (True/"balance",
    "bat", "mini"); ``False`` is balance with a random block (PEFT's meaning). ``init_random``
    (shirakit only, not written to the file) draws a random block in any mode, for tests."""

    peft_type: ClassVar[str] = "MISS"
    absent_in_peft: ClassVar[frozenset[str]] = frozenset({"fan_in_fan_out"})

    r: int = 64
    miss_dropout: float = 0.0
    mini_r: int = 1
    init_weights: bool | str = True
    init_random: bool = field(default=False, metadata={"serialize": False}, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_rank("r", self.r)
        check_rank("mini_r", self.mini_r)
        check_dropout("miss_dropout", self.miss_dropout)
        if not isinstance(self.init_weights, bool) and self.init_weights not in ("balance", "bat", "mini"):
            raise ValueError(f"init_weights={self.init_weights!r}: expected True, False, 'balance', 'bat' or 'mini'")

    @property
    def mode(self) -> str:
        return MODES[self.init_weights]


def block_sum(x: torch.Tensor, r: int) -> torch.Tensor:
    """S(x): (..., in) -> (..., r), the sum of x's r-wide shards (x zero-padded to a multiple of r)."""
    pad = (-x.shape[-1]) % r
    if pad:
        x = F.pad(x, (0, pad))
    return x.reshape(*x.shape[:-1], -1, r).sum(dim=-2)


def _sum_dtype(weight: torch.Tensor) -> torch.dtype:
    """Where bat's delta and W0 + delta are computed: fp32 for half-precision and fp32 weights, float64 for
    float64 ones. (An fp32 sum for a float64 weight would round W0 itself to fp32 precision, and the additive
    route, x W0^T + s x delta^T in the weight's dtype, would then disagree with it by ~1e-7 relative.)"""
    return torch.promote_types(weight.dtype, torch.float32)


def bat_delta(w: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """delta_W with delta_W_bc = W_bc M_b + M_b, from w (out, in) and M (out/r, r, r); autograd-safe.

    Rows b*r + i, columns c*r + j of w are the view [b, i*(in/r) + c, j] of shape
    (out/r, r*in/r, r), so one batched product takes W_bc M_b for every (b, c) at once.
    """
    out_f, in_f = w.shape
    nb, r = block.shape[0], block.shape[-1]
    prod = torch.matmul(w.reshape(nb, r * (in_f // r), r), block)  # (b, i*c, r)
    prod = prod.view(nb, r, in_f // r, r).add_(block.unsqueeze(2))  # + M_b[i, j] for every shard c
    return prod.view(out_f, in_f)


class _BatGradTap(torch.autograd.Function):
    """Identity on y = x W'^T (W' = W0 + s delta(W0, M) written in the weight); backward adds dL/dM.

    With G = g^T x = dL/dW' (out, in) seen as [b, i*(in/r) + c, k] like W0 in :func:`bat_delta`:
    dL/dM_b = s * (sum_c W0_bc^T G_bc + sum_c G_bc).
    """

    @staticmethod
    def forward(ctx, y, x, block, w0, scale):
        ctx.save_for_backward(x, block, w0)
        ctx.scale = scale
        return y.clone()  # a custom Function may not hand an input back as its output

    @staticmethod
    def backward(ctx, grad_out):
        x, block, w0 = ctx.saved_tensors
        dtype = block.dtype
        g2 = grad_out.reshape(-1, grad_out.shape[-1]).to(dtype)
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)
        grad_w = g2.T @ x2  # (out, in)
        out_f, in_f = grad_w.shape
        nb, r = block.shape[0], block.shape[-1]
        w_view = w0.to(dtype).reshape(nb, r * (in_f // r), r)
        grad_block = w_view.transpose(1, 2) @ grad_w.view(nb, r * (in_f // r), r)
        grad_block += grad_w.view(nb, r, in_f // r, r).sum(dim=2)
        return grad_out, None, grad_block.mul_(ctx.scale), None, None


class _MissShards:
    """What every mode shares: the shape checks, the block M (``miss_block``) and its init."""

    mode: ClassVar[str]
    fuse_min_steps: ClassVar[int] = 27  # a switch is a tiled block per layer (docs/serving.md)

    def init_parameters(self, base_layer: nn.Module, generator: torch.Generator | None, source: str) -> None:
        geometry, config = self.geometry, self.config
        self.r, self.mini_r = config.r, config.mini_r
        where = f"{source}: " if source else ""
        if self.r > geometry.in_features:
            raise ValueError(f"{where}MiSS r={self.r} exceeds in_features={geometry.in_features}; "
                             f"use r <= {geometry.in_features}")
        self.check_shape(where)
        shape = self.block_shape()
        options = self.parameter_options(base_layer)
        block = torch.zeros(shape, dtype=options["dtype"])
        if generator is not None and (config.init_weights is False or config.init_random):
            bound = 1.0 / math.sqrt(math.prod(shape[1:]))  # kaiming-uniform, a = sqrt(5), like PEFT's
            block = (torch.rand(shape, generator=generator) * 2 - 1).mul_(bound).to(block.dtype)
        self.miss_block = nn.Parameter(block.to(options["device"]))
        # bat ignores dropout, as PEFT does: its delta sits in the weight
        uses_dropout = config.miss_dropout > 0 and self.mode != "bat"
        self.dropout = nn.Dropout(config.miss_dropout) if uses_dropout else nn.Identity()

    slot_scaled = "miss_block"

    def slot_key(self) -> tuple | None:
        """r shapes the shard sum itself: only adapters of one mode, r and mini_r share a hot-swap slot."""
        return (type(self).__name__, self.r, self.mini_r)

    def check_shape(self, where: str) -> None:
        """Raise when this mode cannot take the layer's shape."""

    def block_shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    def extra_repr(self) -> str:
        mini = f", mini_r={self.mini_r}" if self.mode == "mini" else ""
        return f"{super().extra_repr()}, mode={self.mode}, r={self.r}{mini}"


@register
class MissAdapter(_MissShards, Adapter):
    """MiSS; this class is the "balance" mode, and :meth:`build` picks the class of the config's mode."""

    layer_kinds_why = ("its shards split a linear weight's input features into r-wide blocks; PEFT's MiSS adapts "
                       "linear layers only")

    config_class = MissConfig
    mode = "balance"

    @classmethod
    def build(cls, geometry: LayerGeometry, config: MissConfig, *args, **kwargs) -> Adapter:
        mode_class = {"balance": MissAdapter, "mini": MissMiniAdapter, "bat": MissBatAdapter}[config.mode]
        return mode_class(geometry, config, *args, **kwargs)

    def block_shape(self) -> tuple[int, ...]:
        return (self.r, self.geometry.out_features)

    def full_block(self, block: torch.Tensor) -> torch.Tensor:
        """The (r, out) block every shard adds."""
        return block

    def tile(self, y: torch.Tensor) -> torch.Tensor:
        """The block product's (..., block columns) result as (..., out)."""
        return y

    def forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """s * S(dropout(x)) M."""
        block = self.miss_block
        y = block_sum(self.dropout(x.to(block.dtype)), self.r) @ block
        return self.tile(y) * self.scale

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """Dense (out, in) delta in fp32: the full block, repeated over the shards."""
        block = self.full_block(self.miss_block.detach().float())
        in_f = self.geometry.in_features
        tiled = block.T.repeat(1, -(-in_f // self.r))  # (out, shards*r)
        return tiled[:, :in_f] * self.scale


class MissMiniAdapter(MissAdapter):
    """MiSS "mini": M is (r, mini_r), repeated out/mini_r times along the output features."""

    mode = "mini"

    def check_shape(self, where: str) -> None:
        out_f = self.geometry.out_features
        if out_f % self.mini_r:
            raise ValueError(
                f"{where}MiSS 'mini' needs out_features divisible by mini_r={self.mini_r}; found out_features={out_f}"
            )

    def block_shape(self) -> tuple[int, ...]:
        return (self.r, self.mini_r)

    def full_block(self, block: torch.Tensor) -> torch.Tensor:
        return block.repeat(1, self.geometry.out_features // self.mini_r)

    def tile(self, y: torch.Tensor) -> torch.Tensor:
        # the product is taken with the small block, then its (..., mini_r) result is tiled
        return y.repeat(*([1] * (y.dim() - 1)), self.geometry.out_features // self.mini_r)


class MissBatAdapter(_MissShards, InWeightAdapter):
    """MiSS "bat": W'_bc = W_bc + s * (W_bc M_b + M_b), written into the weight while active."""

    layer_kinds_why = MissAdapter.layer_kinds_why

    config_class = MissConfig
    mode = "bat"
    delta_reads_weight = True

    def check_shape(self, where: str) -> None:
        in_f, out_f, r = self.geometry.in_features, self.geometry.out_features, self.r
        if in_f % r or out_f % r:
            raise ValueError(
                f"{where}MiSS 'bat' needs in_features and out_features divisible by r={r} "
                f"(r x r blocks); found in_features={in_f}, out_features={out_f}"
            )

    def block_shape(self) -> tuple[int, ...]:
        return (self.geometry.out_features // self.r, self.r, self.r)

    def forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x delta_W^T from the clean ``weight``: only where the weight cannot carry the delta,
        e.g. a small group of a mixed-adapter batch."""
        block = self.miss_block
        delta = bat_delta(self.geometry.as_out_in(weight).to(block.dtype), block)
        return F.linear(x.to(block.dtype), delta) * self.scale

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """Dense (out, in) delta in fp32 (float64 for a float64 weight), relative to ``weight``, or, while the
        adapter is written in, to the weight it was written into."""
        base = self._saved if self._saved is not None else weight
        acc = _sum_dtype(base)
        with torch.no_grad():
            return bat_delta(self.geometry.as_out_in(base).to(acc), self.miss_block.detach().to(acc)) * self.scale

    # ---- cost model of a mixed-batch group (InWeightAdapter.prefers_weight) ------------------
    # Both routes build the dense delta (m n r multiply-adds), so it drops out. Writing in keeps a
    # copy of W0, writes W0 + delta (fp32 round trip) and copies W0 back: about WRITE_S_PER_ENTRY
    # per weight entry; the additive route's product is m n T multiply-adds. Measured on CPU, fp32,
    # 1 thread, r=64, 4 groups, 512 x 512 to 2816 x 1024: crossover about 64-128 tokens (model: 94).
    WRITE_S_PER_ENTRY: ClassVar[float] = 1.5e-9
    PRODUCT_S_PER_MAC: ClassVar[float] = 0.022e-9

    def write_cost(self) -> float:
        g = self.geometry
        return self.WRITE_S_PER_ENTRY * g.out_features * g.in_features

    def additive_cost(self, tokens: int) -> float:
        g = self.geometry
        return self.PRODUCT_S_PER_MAC * g.out_features * g.in_features * tokens

    # ---- living in the weight (InWeightAdapter) ----------------------------------------------
    def trained_values(self) -> torch.Tensor:
        return self.miss_block

    def write_into(self, weight: torch.Tensor, base_key: object) -> None:
        """Keep W0 aside, write W0 + delta (summed in fp32, or float64 for a float64 weight; rounded once)."""
        delta = self.delta_weight(weight)
        self._saved = weight.detach().clone()
        view = self.geometry.as_out_in(weight)
        view.copy_((view.to(delta.dtype) + delta).to(weight.dtype))

    def restore_into(self, weight: torch.Tensor) -> None:
        """Put W0 back bit-exactly."""
        weight.copy_(self._saved)
        self._saved = None

    def trainable_base_forward(self, base_layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The base layer on the weight holding W0 + delta; the block's gradient comes from a tap."""
        return self.tap_value_grad(base_layer(x), x)

    def tap_value_grad(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """y unchanged (a copy); backward adds dL/dM_b = s * sum_c (W0_bc^T G_bc + G_bc)."""
        if not self.miss_block.requires_grad or self._saved is None:
            return y
        w0 = self.geometry.as_out_in(self._saved)
        return _BatGradTap.apply(y, x, self.miss_block, w0, self.scale)
