"""Linear layers on CPU by row count: few rows as ``y = (W x^T)^T``, many through oneDNN, where
each beats ``y = F.linear(x, W)`` on this machine.

A decode step multiplies every weight by a handful of rows (one per running request). On CPU,
``F.linear`` hands ``x W^T`` to the BLAS with the weight as the transposed operand; written
``W x^T`` instead, the weight's output rows are the long side, which the threads split between
them. Which form is faster depends on the CPU, the BLAS, the threads and the layer's shape, so
:func:`use_skinny_linears` measures both on the model's own layers at start, all of them in the
model's order as a decode step meets them (:func:`calibrate`), and gives each weight shape
``W x^T`` up to the most rows at which it was no slower at every row count tried (never, where it lost).

Measured on this project's 2-core AMD EPYC (torch 2.13 CPU, fp32, weights out of cache;
``benchmarks/skinny_linear.py``): at 2 threads and 8 rows, SmolLM2-135M's 1536 x 576 projections
1.9x faster, its 49152 x 576 output layer 43 -> 13 ms (3.3x), its 192 x 576 ones even; one decode
step of the whole model 206 -> 114 ms at 8 rows, 243 -> 162 ms at 16 (on a later day, alternating
whole-model steps: F.linear everywhere 1.42-1.50x slower at 8 rows, 1.24x at 16, and F.linear on any
one shape but 192 x 576 alone 6-19 % slower); at 1 thread only the output layer gains (1.2-1.6x).
From 64 rows on the two forms are even.
The sums run in another order, so logits may differ from ``F.linear``'s in the last bits (5e-5 at
most in that model's logits).

Prefill forwards are the other end: many rows, compute bound. There ``F.linear`` (MKL's sgemm on
this build) runs SmolLM2's 1536 x 576 projections at ~50 GFLOP/s on those 2 cores, while oneDNN's
matmul (``torch.ops.mkldnn._linear_pointwise``, the op inductor's CPU linear fusion calls; the
weight is read as it is, not prepacked) takes 1.2-1.4x less time at 64-256 rows (the output
layer 1.3-2.5x); the 576-wide ones are even and the 192 x 576 ones slower. So the calibration also
times both at ``MANY_ROWS`` rows per shape, and a shape where oneDNN won takes it from that many
rows up (only without autograd: the op has no backward; without oneDNN in the build, never).

From ``PACKED_FROM_ROWS`` (8) rows up, where the build has oneDNN and outside autograd, a layer
multiplies by a copy of its weight that oneDNN packed for itself (``_reorder_linear_weight``), as
vLLM's CPU linears do: SmolLM2's whole decode step 0.63-0.77x at 8 rows, 0.85x at 16 and 64, but
1.13x at 4 rows (so fewer rows keep the forms above). The copy is remade once the weight has stayed
the same for two calls after a write (:func:`_packed`); it costs one more copy of the weights.

The layer reads ``layer.weight`` at each call (or its packed copy of the current version), so values
written into the weight (SHiRA's fused switch) are seen as with ``F.linear``. Only plain
``nn.Linear`` layers with an ordinary float32 CPU weight take part; quantized, sharded or meta
weights (a tensor subclass, another device) keep their own forward.
"""

from __future__ import annotations

import time
import types
from collections import defaultdict
from typing import NamedTuple

import torch
from torch import nn

ROW_COUNTS = (4, 8, 16, 32, 64)  # the row counts the calibration tries, in order (2-3 rows follow 4's verdict)
MOST_LAYERS = 8  # the many-row calibration times at most this many layers of a shape (bounded start-up)
REPEATS = 4  # timed calls of each form per row count (alternating); the fastest of each decide
MARGIN = 0.95  # oneDNN must take at most this share of F.linear's time to be chosen
# W x^T is chosen where the calibration's pass found it no slower than F.linear: the pass understates
# its gain in a real step (SmolLM2, 8 rows: 576 x 576 read 0.85-0.98 there, while F.linear on those
# layers made the whole decode step 6-7 % slower), so a tie goes to W x^T
FEW_MARGIN = 1.0
MANY_ROWS = 128  # oneDNN is timed at this many rows, and used from there up where it won
MANY_ROWS_FLOP = 2e9  # the many-row calibration times at most this much work per call (the output layer: one)
PACK_HINT_ROWS = 16  # the row count oneDNN lays a packed weight out for (it serves any count)
# packed oneDNN from this many rows up, on every shape, where the build has oneDNN: no calibration, as
# timing it per shape outside a forward misjudged it (docs/serving.md, "Packed weights")
PACKED_FROM_ROWS = 8


def skinny_forward(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` on CPU: oneDNN's product on a packed copy of the weight from
    ``layer.packed_rows`` rows up (0: never; not under autograd; while the weight keeps changing,
    the forms below), ``(W x^T)^T + b`` for 2..``layer.skinny_rows`` rows, oneDNN's product from
    ``layer.onednn_rows`` rows up (0: never; not under autograd), else ``F.linear``."""
    features = x.shape[-1]
    rows = x.numel() // features if features else 0
    if x.device.type != "cpu" or x.dtype != layer.weight.dtype:
        return nn.functional.linear(x, layer.weight, layer.bias)
    if 0 < layer.packed_rows <= rows and not torch.is_grad_enabled():
        y = _packed(layer, x.reshape(rows, features))
        if y is not None:
            return y.view(*x.shape[:-1], -1)
    if 2 <= rows <= layer.skinny_rows:
        return _transposed(x.reshape(rows, features), layer.weight, layer.bias).view(*x.shape[:-1], -1)
    if 0 < layer.onednn_rows <= rows and not torch.is_grad_enabled():
        return _onednn(x.reshape(rows, features), layer.weight, layer.bias).view(*x.shape[:-1], -1)
    return nn.functional.linear(x, layer.weight, layer.bias)


def _transposed(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # contiguous: the next ops (views into heads, norms) run on a plain row-major result
    y = torch.mm(weight, x2.t()).t().contiguous()
    if bias is not None:
        y += bias
    return y


def _onednn(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x2, weight, bias, "none", [], "")


def _packed(layer: nn.Linear, x2: torch.Tensor) -> torch.Tensor | None:
    """oneDNN's product on the layer's packed weight copy, repacked when ``layer.weight`` was
    written or replaced; None (use another form) while it keeps changing from one call to the
    next. Why wait for a settled weight: SHiRA's fused switch writes the weight once, and one
    repack (a copy of the weight) then serves every later step; a routed step that scatters an
    adapter into the weight and back changes it twice per call, and repacking there would cost a
    copy per product. Holds one copy of the weight (the model's linear weights twice in memory)."""
    weight = layer.weight
    state = (weight, weight._version)
    packed = layer.__dict__.get("_packed_weight")
    if packed is None or packed[0] is not weight or packed[1] != state[1]:
        seen = layer.__dict__.get("_seen_weight")
        layer._seen_weight = state
        if seen is None or seen[0] is not weight or seen[1] != state[1]:
            return None  # changed since the last call (or the first call): not worth a copy yet
        packed = (*state, torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_HINT_ROWS))
        layer._packed_weight = packed
    return torch.ops.mkldnn._linear_pointwise(x2, packed[2], layer.bias, "none", [], "")


def _drop_packed(layer: nn.Linear) -> None:
    for name in ("_packed_weight", "_seen_weight"):
        layer.__dict__.pop(name, None)


def onednn_available() -> bool:
    """Whether this torch build has oneDNN and its linear ops (CPU builds for x86 and Arm do)."""
    try:
        return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
                and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))
    except (AttributeError, RuntimeError):
        return False


def skinny_candidate(module: nn.Module) -> bool:
    """A plain ``nn.Linear`` whose weight is an ordinary float32 CPU tensor."""
    if type(module) is not nn.Linear:
        return False
    weight = module.weight
    return (type(weight.data) is torch.Tensor and weight.device.type == "cpu" and weight.dtype == torch.float32
            and not weight.is_inference())  # inference tensors have no version counter (_packed reads it)


def fastest_ratios(candidate, anchor, repeats: int) -> dict:
    """Per key, ``candidate()``'s fastest seconds over ``anchor()``'s (each call returns ``{key:
    seconds}``), over ``repeats`` calls of each, alternating (after one warm-up call of each). Why
    the fastest: noise only adds time, and here it came in spikes (one pass of the two forms' in
    six took 1.5x its usual time), which flipped a median of three; why alternating: the memory
    bandwidth these products live on swings by +-30 % within seconds on a shared machine, and
    calls next to each other see the same moment. The order flips every other pair (drift)."""
    candidate()
    anchor()
    fastest_c: dict = {}
    fastest_a: dict = {}
    for i in range(repeats):
        if i % 2:
            a = anchor()
            c = candidate()
        else:
            c = candidate()
            a = anchor()
        for key in c:
            fastest_c[key] = min(c[key], fastest_c.get(key, c[key]))
            fastest_a[key] = min(a[key], fastest_a.get(key, a[key]))
    return {key: fastest_c[key] / fastest_a[key] if fastest_a[key] > 0 else 1.0 for key in fastest_c}


def _step_pass(layers: list[nn.Linear], inputs: dict[int, torch.Tensor], transposed: frozenset) -> dict:
    """Seconds per weight shape of one pass over ``layers`` in order, ``W x^T`` for the shapes in
    ``transposed`` and ``F.linear`` for the others, each product followed by an RMS norm of it."""
    spent: dict[tuple[int, int], float] = defaultdict(float)
    for layer in layers:
        shape = tuple(layer.weight.shape)
        form = _transposed if shape in transposed else nn.functional.linear
        start = time.perf_counter()
        y = form(inputs[layer.in_features], layer.weight, layer.bias)
        y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-6)
        spent[shape] += time.perf_counter() - start
    return spent


def calibrate(layers: list[nn.Linear], repeats: int = REPEATS) -> dict[tuple[int, int], int]:
    """Per weight shape of ``layers``, the most rows (of ``ROW_COUNTS``) up to which ``W x^T`` took
    at most ``FEW_MARGIN`` of ``F.linear``'s time at every count tried; 0: never.

    Timed as a decode step meets the layers: all of them, in the model's order (so each weight
    comes from memory, unless the whole model fits in the cache), each product followed by a
    small op on its output; each layer's call timed, summed per shape; passes with ``W x^T`` and
    with ``F.linear`` in pairs. Why not each shape on its own, as this did before: a few layers of
    one shape called back to back stay in the cache and keep the BLAS's threads busy, and there
    ``F.linear`` won at 8 rows on 576 x 576 (1.1-1.5x) and the choice flipped from run to run,
    while in SmolLM2's decode step ``F.linear`` on those layers made the whole step 6-12 % slower
    (alternating whole-model steps, 4-16 rows, 2 threads); the pass agrees with the model."""
    shapes = {tuple(layer.weight.shape) for layer in layers}
    most = dict.fromkeys(shapes, 0)
    winning = set(shapes)  # the shapes W x^T won at every count so far
    with torch.inference_mode():
        for rows in ROW_COUNTS:
            if not winning:
                break
            inputs = {features: torch.randn(rows, features) for features in {m.in_features for m in layers}}
            ratios = fastest_ratios(lambda x=inputs, w=frozenset(winning): _step_pass(layers, x, w),
                                    lambda x=inputs: _step_pass(layers, x, frozenset()), repeats)
            for shape in list(winning):
                if ratios[shape] > FEW_MARGIN:
                    winning.discard(shape)
                else:
                    most[shape] = rows
    return most


def calibrate_many(layers: list[nn.Linear], repeats: int = REPEATS) -> int:
    """``MANY_ROWS`` if oneDNN's product took at most ``MARGIN`` of ``F.linear``'s time at that many
    rows on these layers (one weight shape), else 0 (also without oneDNN, or if its op fails)."""
    if not onednn_available():
        return 0
    out_features, features = layers[0].weight.shape
    layers = layers[: max(1, min(MOST_LAYERS, int(MANY_ROWS_FLOP // (2 * MANY_ROWS * out_features * features))))]
    x = torch.randn(MANY_ROWS, features)
    with torch.inference_mode():
        try:
            ratio = fastest_ratios(lambda: {"": _seconds(lambda: [_onednn(x, m.weight, m.bias) for m in layers])},
                                  lambda: {"": _seconds(lambda: [nn.functional.linear(x, m.weight, m.bias)
                                                                  for m in layers])}, repeats)[""]
        except RuntimeError:  # a build whose oneDNN refuses this shape or dtype: keep F.linear
            return 0
    return MANY_ROWS if ratio <= MARGIN else 0


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class LinearForms(NamedTuple):
    """Per weight shape: ``W x^T`` for 2..``few`` rows (0: never); oneDNN from ``many`` rows up (0:
    never); oneDNN on a packed weight from ``packed`` rows up (0: never; where it applies it goes first)."""

    few: int
    many: int
    packed: int = 0


def use_skinny_linears(model: nn.Module, most_rows: int | None = None, onednn_rows: int | None = None,
                       packed_rows: int | None = None) -> dict[tuple[int, int], LinearForms]:
    """Give the :func:`skinny_candidate` layers of ``model`` the row-count forward (an instance
    attribute: the class, parameters and ``state_dict`` are untouched): ``W x^T`` up to
    ``most_rows`` rows, oneDNN from ``onednn_rows`` up and packed oneDNN from ``packed_rows`` up,
    or, where ``None``, what :func:`calibrate` / :func:`calibrate_many` find for each weight shape at
    the current thread count (packed: ``PACKED_FROM_ROWS`` where oneDNN is present). Returns the
    :class:`LinearForms` per shape ((0, 0, 0): that shape keeps ``F.linear``)."""
    by_shape = _candidates_by_shape(model)
    layers = [m for m in model.modules() if skinny_candidate(m)]
    few = calibrate(layers) if most_rows is None else dict.fromkeys(by_shape, most_rows)
    packed = (PACKED_FROM_ROWS if packed_rows is None else packed_rows) if onednn_available() else 0
    forms = {shape: LinearForms(few[shape], calibrate_many(group) if onednn_rows is None else onednn_rows, packed)
             for shape, group in by_shape.items()}
    install_linear_forms(model, forms)
    return forms


def install_linear_forms(model: nn.Module, forms: dict[tuple[int, int], LinearForms]) -> None:
    """Give each candidate layer the forms chosen for its weight shape (as :func:`use_skinny_linears`
    returned; a shape not in ``forms``, or ``{}``: ``F.linear``), replacing any it had."""
    drop_skinny_linears(model)
    for shape, layers in _candidates_by_shape(model).items():
        chosen = forms.get(shape, LinearForms(0, 0))
        if any(chosen):
            for layer in layers:
                layer.skinny_rows, layer.onednn_rows, layer.packed_rows = chosen
                layer.forward = types.MethodType(skinny_forward, layer)


def _candidates_by_shape(model: nn.Module) -> dict[tuple[int, int], list[nn.Linear]]:
    shapes: dict[tuple[int, int], list[nn.Linear]] = defaultdict(list)
    for module in model.modules():
        if skinny_candidate(module):
            shapes[tuple(module.weight.shape)].append(module)
    return shapes


def drop_skinny_linears(model: nn.Module) -> None:
    """Undo :func:`use_skinny_linears`: every layer back to its class's forward."""
    for module in model.modules():
        if getattr(module.__dict__.get("forward"), "__func__", None) is skinny_forward:
            del module.forward
            del module.skinny_rows, module.onednn_rows, module.packed_rows
        if isinstance(module, nn.Linear):
            _drop_packed(module)
