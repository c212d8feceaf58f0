"""The contract every method implements: one adapter on one linear layer.

An :class:`Adapter` computes the output delta and the weight delta of a layer ``y = x W^T + b``.
It knows nothing about module names or models; :class:`shirakit.core.layer.AdapterLinear` owns it.

An :class:`InWeightAdapter` (SHiRA, MiSS "bat") is one whose values ride in the base weight
while it is active and unmerged: the layer writes it in with ``merge_into``, keeps it there
across forwards while :meth:`InWeightAdapter.applied_is_current` holds, and takes it out with
``unmerge_from`` (bit-exact) before anything else reads or writes the weight. Everything the
layer may call on such an adapter is declared on that class; nothing is left to convention.
"""

from __future__ import annotations

import abc
import contextlib
import warnings
from dataclasses import dataclass
from typing import ClassVar, Iterator

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from .config import AdapterConfig


@dataclass(frozen=True)
class ConvSpec:
    """The facts of a wrapped ``nn.Conv1d`` / ``nn.Conv2d`` an adapter needs to run a conv of its own
    (LoRA's A) or the layer's product (SHiRA's in-weight training forward)."""

    dims: int  # spatial dimensions: 1 (Conv1d) or 2 (Conv2d)
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...] | str  # ints, or "same" / "valid"
    dilation: tuple[int, ...]
    groups: int
    padding_mode: str  # "zeros", "reflect", "replicate", "circular"


@dataclass(frozen=True)
class EmbeddingSpec:
    """The lookup options of a wrapped ``nn.Embedding`` an adapter's own lookup repeats (LoRA's A)."""

    padding_idx: int | None
    scale_grad_by_freq: bool
    sparse: bool


@dataclass(frozen=True)
class LayerGeometry:
    """Shape facts about the wrapped layer, seen as a matrix (out, in).

    - linear: ``(out_features, in_features)``; ``fan_in_fan_out``: weight stored (in, out) (GPT-2 Conv1D).
    - conv (``conv`` set): the kernel ``(out, in/groups, *k)`` flattened to ``(out, in/groups * prod(k))``:
      a conv is a linear map on unfolded patches, so positions, scatters and deltas are the same code
      on that row-major view (it is the weight's own storage order).
    - embedding (``embedding``): the table ``(num_embeddings, dim)`` as (out, in) = (rows, dim); its
      "forward" is a row lookup, not a product, but positions and scatters are again the storage order.
    """

    in_features: int
    out_features: int
    fan_in_fan_out: bool = False
    conv: ConvSpec | None = None
    embedding: EmbeddingSpec | None = None

    @property
    def kind(self) -> str:
        """"linear", "conv" or "embedding": what :attr:`Adapter.layer_kinds` is checked against."""
        return "conv" if self.conv is not None else "embedding" if self.embedding is not None else "linear"

    def as_out_in(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight seen as (out, in), a view (transposed for Conv1D, flattened for a conv kernel)."""
        if self.conv is not None:
            return weight.view(weight.shape[0], -1)
        return weight.T if self.fan_in_fan_out else weight

    def storage_flat_index(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Flat positions in the weight's own storage of logical (out, in) entries (rows, cols)."""
        rows, cols = rows.long(), cols.long()
        if self.fan_in_fan_out:
            return cols * self.out_features + rows
        return rows * self.in_features + cols


def adapter_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """Adapter parameters of half-precision (and quantized) models are kept in fp32 (as PEFT does)."""
    if weight_dtype in (torch.float16, torch.bfloat16) or not weight_dtype.is_floating_point:
        return torch.float32  # half precision, or the integer codes of a quantized weight
    return weight_dtype


# Fused optimizer kernels (torch's fused AdamW/Adam/SGD; transformers' Trainer defaults to
# "adamw_torch_fused") write parameters without bumping their version counters, so a version alone
# misses those updates and the weight would keep stale values: every optimizer step counts too.
_optimizer_steps = 0


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


register_optimizer_step_post_hook(_count_optimizer_step)


def values_stamp(param: torch.Tensor) -> tuple[int, int]:
    """Changes whenever ``param``'s values may have changed: an in-place write or any optimizer step."""
    return (param._version, _optimizer_steps)


class Adapter(nn.Module):
    """One adapter on one linear layer.

    The core every method implements: ``config_class``, ``init_parameters`` (``build`` to pick a
    variant), ``forward`` and ``delta_weight``; ``merge_into``/``unmerge_from`` (generic here: add /
    subtract the dense delta in fp32; SHiRA's scatter, MiSS-bat's exact restore override them) and
    ``load_tensors``. What a feature needs beyond it is a capability protocol the feature checks
    (:mod:`shirakit.core.capabilities`: compact files, fusion, deltas from files, ...); the
    defaults kept here (hot-swap slots, routed groups, shared tensors) fit every method.
    """

    config_class: ClassVar[type[AdapterConfig]]
    #: True when ``unmerge_from`` restores the weight bit-exactly (saved originals, not subtraction).
    exact_unmerge: ClassVar[bool] = False
    #: True when the delta depends on the base weight (MiSS bat): not computable on a quantized base.
    delta_reads_weight: ClassVar[bool] = False
    #: True when merge_into / unmerge_from can write into this rank's rows of an FSDP2-sharded weight.
    merges_into_shards: ClassVar[bool] = False
    #: The layer kinds (:attr:`LayerGeometry.kind`) this method adapts, and why it refuses the others.
    layer_kinds: ClassVar[frozenset[str]] = frozenset({"linear"})
    layer_kinds_why: ClassVar[str] = "its maths is written for a (out, in) linear weight"
    #: Can this adapter be written in and taken out by ``scatter_many`` (one call for every layer of a
    #: fused switch, in place of one merge / unmerge per layer; :class:`InWeightAdapter`'s plans)?
    batched_scatter: ClassVar[bool] = False

    def __init__(
        self,
        geometry: LayerGeometry,
        config: AdapterConfig,
        base_layer: nn.Module,
        generator: torch.Generator | None,
        source: str = "",
    ) -> None:
        """The adapter for one layer: ``generator`` draws the initial values (None when loading: the
        values come from a file, so no mask, no init, no checks of drawn values); ``source`` names
        the layer for error messages."""
        super().__init__()
        if geometry.kind not in self.layer_kinds:
            raise TypeError(
                f"{source or 'a layer'} ({type(base_layer).__name__}): {type(self).__name__} does not adapt "
                f"{geometry.kind} layers ({self.layer_kinds_why}); it adapts {sorted(self.layer_kinds)}. "
                "Leave this layer out of target_modules (exclude_modules) or use SHiRA or LoRA there")
        self.geometry = geometry
        self.config = config
        self.scale = 1.0
        self.init_parameters(base_layer, generator, source)

    def init_parameters(self, base_layer: nn.Module, generator: torch.Generator | None, source: str) -> None:
        """Create the adapter's parameters and buffers (on the base weight's device)."""
        raise NotImplementedError

    @staticmethod
    def parameter_options(base_layer: nn.Module) -> dict:
        """dtype and device for new adapter parameters: the base weight's device, fp32 for half weights."""
        weight = base_layer.weight
        return {"dtype": adapter_dtype(weight.dtype), "device": weight.device}

    @classmethod
    def build(cls, *args, **kwargs) -> Adapter:
        """The adapter for one layer (the constructor's arguments), as inject and load ask for it.
        By default the class itself; a method with variants (MiSS's modes) picks the variant's
        class from the config here."""
        return cls(*args, **kwargs)

    @classmethod
    def add_routed_deltas(cls, layer: nn.Module, y: torch.Tensor, x: torch.Tensor,
                          groups: list[tuple[Adapter, torch.Tensor]]) -> None:
        """``y[rows] += adapter(x[rows])`` for each (adapter of this class, row indices) group of a
        routed batch through ``layer`` (an AdapterLinear), in place. Called once per layer and
        method, so a method can do all its groups in one go (SHiRA:
        :mod:`shirakit.methods.shira.grouped`); by default one group at a time."""
        for adapter, rows in groups:
            delta = adapter(x.index_select(0, rows), layer.weight)
            y.index_add_(0, rows, delta.to(y.dtype))

    # ---- shared state across layers (VeRA's projections) -----------------------------------
    @classmethod
    def make_shared(cls, config: AdapterConfig, geometries: list[LayerGeometry]) -> dict[str, torch.Tensor]:
        """Tensors shared by every layer of one adapter (saved once as ``base_model.<key>``)."""
        return {}

    def bind_shared(self, shared: nn.Module) -> None:
        """Receive the model-level holder of :meth:`make_shared`'s tensors (kept as a reference)."""

    @classmethod
    def shared_in_checkpoint(cls, config: AdapterConfig) -> bool:
        """Does the checkpoint carry the shared tensors? (VeRA: ``save_projection``; when False they
        are rebuilt by :meth:`make_shared` from the config on load.)"""
        return True

    # ---- the maths ------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        """Dense delta, shape (out, in), in fp32 (for tests, the generic merge and fusion)."""
        raise NotImplementedError

    def set_scale(self, scale: float) -> None:
        self.scale = float(scale)

    # ---- metrics (shirakit.model.metrics: AWOM / AWOR) -------------------------------------------
    def delta_for_metrics(self, weight: torch.Tensor):
        """The delta the orthogonality metrics use: dense (out, in) fp32 by default; a sparse
        method returns a :class:`shirakit.model.metrics.SparseDelta` (its non-zeros) instead."""
        return self.delta_weight(weight)

    # ---- hot-swap slots (shirakit.model.hotswap) ------------------------------------------------
    #: Config fields a slot pads to the largest value among the adapters taking turns in it.
    slot_padded: ClassVar[tuple[str, ...]] = ()
    #: The tensor the output scale multiplies linearly: a slot holds it with the scale folded in.
    slot_scaled: ClassVar[str] = ""

    def slot_key(self) -> tuple | None:
        """Adapters with equal keys can take turns in one hot-swap slot (their tensors, padded to the
        largest, in one adapter of this class; its additive ``forward`` is what a compiled layer
        runs). An in-weight adapter needs a slot only on a layer where it runs additively (a tied
        weight); elsewhere the weight is its slot. None: never in a slot."""
        return (type(self).__name__,)

    def output_scale(self) -> float:
        """The factor the forward multiplies the delta by."""
        return self.scale

    def with_unit_output_scale(self) -> None:
        """Make :meth:`output_scale` 1 (a slot: the scale is folded into ``slot_scaled``)."""
        self.scale = 1.0

    # ---- merging --------------------------------------------------------------------------
    @torch.no_grad()
    def merged_is_finite(self, weight: torch.Tensor) -> bool:
        """Would merging into ``weight`` leave it finite? (checked before a safe merge commits)"""
        merged = self.geometry.as_out_in(weight).float() + self.delta_weight(weight)
        return bool(torch.isfinite(merged).all())

    def values_state(self) -> tuple:
        """Changes whenever a value the delta is computed from may have changed: every parameter's
        :func:`values_stamp` (an in-place write or any optimizer step), and the scale."""
        return (tuple(values_stamp(p) for p in self.parameters()), self.scale)

    @torch.no_grad()
    def merge_into(self, weight: torch.Tensor, base_key: object = None) -> None:
        """W <- W + delta, computed in fp32 so half-precision weights round once.

        ``base_key``, when not None, names the exact state of ``weight`` (the layer guarantees
        equal keys mean bit-identical weights); methods may use it to cache work across merges.
        The merged values are kept (a copy of the parameters: the adapter's size, not the weight's)
        with their stamp, so unmerge takes out what went in even if they change meanwhile.
        """
        view = self.geometry.as_out_in(weight)
        view.copy_((view.float() + self.delta_weight(weight)).to(weight.dtype))
        self._merged_snapshot = (self.values_state(), [p.detach().clone() for p in self.parameters()])

    @torch.no_grad()
    def unmerge_from(self, weight: torch.Tensor) -> None:
        """W <- W - delta (exact up to rounding; methods that save originals restore bit-exactly),
        with the delta of the values that were merged (see :meth:`_as_merged`)."""
        view = self.geometry.as_out_in(weight)
        with self._as_merged():
            view.copy_((view.float() - self.delta_weight(weight)).to(weight.dtype))
        self._merged_snapshot = None

    @contextlib.contextmanager
    def _as_merged(self) -> Iterator[None]:
        """Within, the parameters hold the values that were merged.

        A stray optimizer step or write while merged would otherwise make unmerge subtract a delta
        that was never added, corrupting the base. The stamp says when to look; the kept copy
        says whether the values really differ, and provides the merged ones (swapped in, then back).
        """
        snapshot = getattr(self, "_merged_snapshot", None)
        params = list(self.parameters())
        if snapshot is None or snapshot[0] == self.values_state():
            yield
            return
        merged = [v.to(p.device) for p, v in zip(params, snapshot[1])]
        if all(torch.equal(p, v) for p, v in zip(params, merged)):
            yield
            return
        warnings.warn(f"{type(self).__name__}: the adapter's values changed while merged (an optimizer step "
                      "or a write); unmerging the values that were merged, so the base comes back as it was",
                      stacklevel=5)
        current = [p.data for p in params]
        for p, v in zip(params, merged):
            p.data = v
        try:
            yield
        finally:
            for p, v in zip(params, current):
                p.data = v

    def forget_written(self) -> None:
        """The weight this adapter was written into was overwritten from outside (the layer saw
        its version change): drop whatever was kept to take the adapter out again, write nothing."""
        self._merged_snapshot = None

    # ---- checkpoints ----------------------------------------------------------------------
    def load_tensors(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        """Copy validated file tensors in. Shapes/dtypes/finiteness are checked by the caller;
        methods override to add their own checks (e.g. SHiRA's index range and uniqueness)."""
        own = self.state_dict()
        with torch.no_grad():
            for key, value in tensors.items():
                own[key].copy_(value)

    #: Decode steps a batch all on this adapter must still run for fusing it (a switch in and out)
    #: to beat routing each step: (switch in + out) / (routed step - fused step), measured by
    #: benchmarks/fuse_crossover.py (SmolLM2-135M, 1-32 rows, rounded up; docs/serving.md). A switch
    #: that is a dense product per layer costs tens of steps: the default is the largest measured.
    fuse_min_steps: ClassVar[int] = 41

    def extra_repr(self) -> str:
        g = self.geometry
        return f"in={g.in_features}, out={g.out_features}, scale={self.scale}"


# ---- adapters whose values ride in the base weight ----------------------------------------------
class InWeightAdapter(Adapter, metaclass=abc.ABCMeta):
    """An adapter whose values are written into the base weight while active and unmerged.

    The forward of such a layer is then the base layer's own product (no extra work at
    inference); training gets the values' gradient from one of two entry points
    (:meth:`trainable_base_forward`, :meth:`tap_value_grad`). What the base class owns:

    - the saved originals ``_saved`` (what :meth:`unmerge_from` puts back bit-exactly) and the
      applied state ``_applied_state`` = (values stamp, scale) of what is written in now;
    - the stamp (:func:`values_stamp`: version counter + optimizer steps) that tells the layer
      the weight holds stale values (:meth:`applied_is_current`);
    - the device move: tensors named in ``_device_tensors`` follow ``.to()``/``.cuda()``, and
      :meth:`drop_device_caches` forgets what was derived for the old device;
    - the route of a mixed-batch group (:meth:`prefers_weight`): the base product with the values
      written in, or the method's additive ``forward``, whichever the cost model says is cheaper.

    Subclasses implement :meth:`trained_values`, :meth:`write_into`, :meth:`restore_into` and
    the two gradient entry points.
    """

    exact_unmerge = True
    #: Cost of re-reading the base weight, in CPU seconds per weight entry: a group run on the weight
    #: with its adapter written in needs a base product of its own, which streams the whole (m, n)
    #: weight once more. Measured with the other constants (see :meth:`prefers_weight`).
    REREAD_S_PER_ENTRY: ClassVar[float] = 0.56e-9
    #: attributes holding tensors (or None) that move with the module's parameters
    _device_tensors: ClassVar[tuple[str, ...]] = ("_saved",)
    # per instance once set (class-level defaults, so subclasses need no constructor of their own):
    _saved: torch.Tensor | None = None  # the base values this adapter covers while written in
    _applied_state: tuple[tuple[int, int], float] | None = None  # (values stamp, scale) written in
    _route_choices: dict | None = None  # (tokens, cost_mode()) -> prefers_weight's answer

    # ---- what a subclass provides ----------------------------------------------------------
    @abc.abstractmethod
    def trained_values(self) -> torch.Tensor:
        """The parameter whose changes require rewriting the weight (SHiRA's values, MiSS's block)."""

    @abc.abstractmethod
    def write_into(self, weight: torch.Tensor, base_key: object) -> None:
        """Save what :meth:`restore_into` needs in ``_saved``, then write this adapter into ``weight``."""

    @abc.abstractmethod
    def restore_into(self, weight: torch.Tensor) -> None:
        """Put back what :meth:`write_into` saved (bit-exact)."""

    @abc.abstractmethod
    def trainable_base_forward(self, base_layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``base_layer(x)`` on the weight holding this adapter, with the values' gradient attached.

        Called for the first live adapter of a layer while grad is enabled. The result must equal
        ``base_layer(x)``; its backward must add dL/d(values) (and give x and the base parameters
        their usual gradients)."""

    @abc.abstractmethod
    def tap_value_grad(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Identity on ``y`` (an output computed on the weight holding this adapter) whose backward
        adds dL/d(values); for further live adapters of a layer and for hooked base layers."""

    @abc.abstractmethod
    def write_cost(self) -> float:
        """Estimated CPU seconds to write this adapter into the weight and restore the base after."""

    @abc.abstractmethod
    def additive_cost(self, tokens: int) -> float:
        """Estimated CPU seconds of :meth:`forward` (and adding it in) on ``tokens`` tokens."""

    # ---- optional: fused switching of many layers at once (shirakit.model.switch) --------------
    # batched_scatter (declared on Adapter): True when the two plans below are implemented.

    def planned_write(self, weight: torch.Tensor, base_key: object) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What :meth:`merge_into` would scatter: (flat weight, positions, values), with every read and
        sum done first (the base values under it saved, as ``write_into`` does); the caller scatters
        them (:meth:`scatter_many`) and then calls :meth:`written_by_batch`."""
        raise NotImplementedError(f"{type(self).__name__} does not switch in batches")

    def planned_restore(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What :meth:`unmerge_from` would scatter: (flat weight, positions, saved base values); the
        caller scatters them and then calls :meth:`restored_by_batch`."""
        raise NotImplementedError(f"{type(self).__name__} does not switch in batches")

    @classmethod
    def scatter_many(cls, writes: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
        """``flat[index] = values`` for every (flat, index, values) of ``writes``, in order."""
        for flat, index, values in writes:
            flat.index_copy_(0, index, values)

    def written_by_batch(self) -> None:
        """The planned write was scattered: the weight now holds this adapter's current values."""
        self._applied_state = self.values_state()

    def restored_by_batch(self) -> None:
        """The planned restore was scattered: the weight holds the base again under this adapter."""
        self._applied_state = None

    # ---- optional: FSDP2 ----------------------------------------------------------------------
    #: Can :meth:`gathered_forward` write this adapter into an FSDP2-gathered copy of the weight?
    #: When False, an FSDP2-sharded layer runs this adapter additively (its :meth:`forward`).
    writes_gathered_copy: ClassVar[bool] = False

    def gathered_forward(self, base_layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """FSDP2: ``base_layer(x)`` on this forward's gathered copy of the weight with this adapter
        written into that copy (and, when training, again into the copy its backward gathers).
        Only called when :attr:`writes_gathered_copy` is True."""
        raise NotImplementedError(f"{type(self).__name__} does not write into gathered FSDP2 copies")

    # ---- optional: a quantized base ---------------------------------------------------------
    #: Can :meth:`dequantized_forward` write this adapter into a dense copy of a quantized weight
    #: dequantized for one product? When False, a quantized layer runs this adapter additively.
    writes_dequantized_copy: ClassVar[bool] = False

    def dequantized_forward(self, base_layer: nn.Module, x: torch.Tensor, dequantizer) -> torch.Tensor:
        """Training on a quantized base whose library multiplies by a freshly dequantized dense copy
        (``dequantizer``: :class:`shirakit.core.quantized_weights.Dequantizer`): ``base_layer(x)`` computed on
        such a copy with this adapter written into it, the values' gradient attached, and no dense
        copy kept for the backward (it dequantizes and writes again). Only called when
        :attr:`writes_dequantized_copy` is True."""
        raise NotImplementedError(f"{type(self).__name__} does not write into dequantized copies")

    # ---- what the layer calls --------------------------------------------------------------
    def prefers_weight(self, tokens: int) -> bool:
        """Should a mixed batch's group of ``tokens`` tokens run on the weight with this adapter
        written in (True), rather than on the clean base plus the additive :meth:`forward`?

        A per-layer cost model, in place of one global token threshold. Against the additive route,
        the weight route costs extra (a) writing the adapter in and restoring the base,
        :meth:`write_cost`, and (b) one more pass over the (m, n) weight, since the group's base
        product is split off the batch's: ``REREAD_S_PER_ENTRY * m * n``; it saves the additive
        product, :meth:`additive_cost`, which grows with the tokens. So

            weight route  <=>  write_cost() + REREAD_S_PER_ENTRY * m * n  <  additive_cost(tokens)

        Constants: fitted to one layer's ``routed_forward`` with 4 groups, both routes forced, on
        CPU, 1 thread, fp32, layers from 512 x 512 to 2816 x 1024, r = 8 and 32, 1-256 tokens per
        group (SHiRA: ``benchmarks/route_costs.py`` measures and fits them, and reports the worst
        regret: 1.05x the faster route, 2026-11-28); ``benchmarks/mixed_batch.py``'s crossover
        section re-measures and checks the choice in a model's layer shapes.

        The answer is kept per (tokens, :meth:`cost_mode`): a decoding step asks it for every group
        of every layer, and the arithmetic costs a few microseconds in Python.
        """
        choices = self._route_choices
        if choices is None or len(choices) > 4096:  # bounded: prefill lengths vary
            choices = self._route_choices = {}
        key = (tokens, self.cost_mode())
        choice = choices.get(key)
        if choice is None:
            g = self.geometry
            reread = self.REREAD_S_PER_ENTRY * g.out_features * g.in_features
            choice = choices[key] = self.write_cost() + reread < self.additive_cost(tokens)
        return choice

    def cost_mode(self) -> object:
        """What, besides a group's tokens, the route's costs depend on at the moment (not the device:
        a move forgets the kept answers). By default whether gradients are enabled."""
        return torch.is_grad_enabled()

    def values_state(self) -> tuple[tuple[int, int], float]:
        return (values_stamp(self.trained_values()), self.scale)

    def forget_written(self) -> None:
        """The weight was overwritten from outside: the saved base values are stale (never put back)."""
        self._saved, self._applied_state = None, None

    def applied_is_current(self) -> bool:
        """Is the weight holding this adapter's current values (no optimizer step, write or new scale since)?"""
        return self._applied_state == self.values_state()

    @torch.no_grad()
    def merge_into(self, weight: torch.Tensor, base_key: object = None) -> None:
        self.write_into(weight, base_key)
        self._applied_state = self.values_state()

    def refresh_in(self, weight: torch.Tensor) -> bool:
        """The adapter is written in and alone in ``weight``, only its values changed (an optimizer
        step): write the new ones over the old. Returns False where the method cannot (then the
        layer restores the base and writes again, two writes instead of one)."""
        return False

    @torch.no_grad()
    def unmerge_from(self, weight: torch.Tensor) -> None:
        if self._applied_state is None:
            raise RuntimeError(f"{type(self).__name__}: unmerge without a prior merge: no saved base values")
        self.restore_into(weight)
        self._applied_state = None

    # ---- device moves ----------------------------------------------------------------------
    def drop_device_caches(self) -> None:
        """Forget tensors derived for the old device (rebuilt on next use)."""

    def _apply(self, fn, *args, **kwargs):
        # .to()/.cuda() move parameters and buffers; the saved originals must follow them.
        super()._apply(fn, *args, **kwargs)
        for attr in self._device_tensors:
            if getattr(self, attr) is not None:
                setattr(self, attr, fn(getattr(self, attr)))
        self._route_choices = None  # the costs were the old device's
        self.drop_device_caches()
        return self
