"""What the quantized-base tests share: a two-layer MLP (quantized by each backend, and its fp32
reference holding the dequantized weights), the four methods' configs, SGD steps, and the adapter
comparison.

Tolerance 1e-5 absolute: fp32 rounding of products of ~1e-1 values over 64-128 terms (every
library here dequantizes to fp32 before its product, or scales an fp32 product by row)."""

from __future__ import annotations

import gc
import weakref

import torch
from torch import nn

import shirakit
import shirakit.core.layer

TOL = 1e-5
CONFIGS = {
    "shira": lambda: shirakit.ShiraConfig(r=4, target_modules=["0", "2"], random_seed=1, init_weights=False),
    "lora": lambda: shirakit.LoraConfig(r=4, target_modules=["0", "2"], init_lora_weights=False),
    "vera": lambda: shirakit.VeraConfig(r=8, target_modules=["0", "2"], init_weights=False),
    "miss": lambda: shirakit.MissConfig(r=8, target_modules=["0", "2"], init_weights=False),
}


class MLP(nn.Module):
    """Layers "0" and "2" as in a Sequential, but a forward of its own (VeRA adds a shared-store
    submodule to the model, which a Sequential would call as a layer)."""

    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        for i, layer in enumerate(layers):
            self.add_module(str(i), layer)

    def __getitem__(self, i: int) -> nn.Module:
        return getattr(self, str(i))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self[2](self[1](self[0](x)))


def dense_mlp() -> MLP:
    torch.manual_seed(0)
    return MLP([nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32)])


def inject(model: nn.Module, config: shirakit.AdapterConfig, name: str = "default") -> None:
    torch.manual_seed(5)  # the adapter's random draws: the same in the quantized and the reference model
    shirakit.inject(model, config, name)


def train(model: nn.Module, x: torch.Tensor, steps: int = 3) -> None:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(steps):
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()


def assert_adapters_close(a: nn.Module, b: nn.Module) -> None:
    sa, sb = shirakit.adapter_state_dict(a), shirakit.adapter_state_dict(b)
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key].float(), sb[key].float(), rtol=0, atol=TOL, msg=lambda m, k=key: f"{k}: {m}")


def spy_dense_copies(monkeypatch) -> list[weakref.ref]:
    """Every dense copy the layers dequantize from now on, as weak references (a live one is being kept)."""
    made: list[weakref.ref] = []
    real = shirakit.core.layer.dequantizer

    def spying(layer, x):
        found = real(layer, x)
        if found is None:
            return None

        def weight():
            dense = found.weight()
            made.append(weakref.ref(dense))
            return dense

        return found._replace(weight=weight)

    monkeypatch.setattr(shirakit.core.layer, "dequantizer", spying)
    return made


def train_keeping_no_copy(model: nn.Module, x: torch.Tensor, copies: list[weakref.ref], steps: int = 5) -> list[int]:
    """SGD steps as :func:`train`, checking that no dequantized copy (``copies``, from
    :func:`spy_dense_copies`) is alive between forward and backward or after a step; returns the
    element count of every floating-point tensor autograd saved for a backward."""
    saved_numels: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved_numels.append(t.numel() if t.is_floating_point() else 0)
        return t

    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(steps):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(x).pow(2).mean()
        gc.collect()
        assert all(ref() is None for ref in copies), "a dequantized copy is kept for the backward"
        loss.backward()
        opt.step()
        opt.zero_grad()
        gc.collect()
        assert all(ref() is None for ref in copies), "a dequantized copy outlived its step"
    return saved_numels


# ---- the backends: (quantized MLP, fp32 MLP holding its dequantized weights), same biases ----------
def bnb_dequantized(layer: nn.Module) -> torch.Tensor:
    import bitsandbytes as bnb

    weight = layer.weight
    if isinstance(weight, bnb.nn.Params4bit):
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()
    return weight.data.float() * weight.SCB.float().unsqueeze(1) / 127.0  # Int8Params: row-scaled codes


def bnb_pair(kind: str) -> tuple[nn.Module, nn.Module]:
    """bitsandbytes 4-bit NF4 (``nf4``) or 8-bit (``int8``) layers on CPU."""
    import bitsandbytes as bnb

    dense = dense_mlp()
    if kind == "nf4":
        make = lambda i, o: bnb.nn.Linear4bit(i, o, compute_dtype=torch.float32, quant_type="nf4")  # noqa: E731
    else:
        make = lambda i, o: bnb.nn.Linear8bitLt(i, o, has_fp16_weights=False)  # noqa: E731
    quant = MLP([make(64, 128), nn.ReLU(), make(128, 32)])
    quant.load_state_dict(dense.state_dict())
    quant = quant.to("cpu")  # bitsandbytes quantizes on the move to a device
    with torch.no_grad():
        for i in (0, 2):
            dense[i].weight.copy_(bnb_dequantized(quant[i]))
    return quant, dense


def torchao_weight_only(kind: str):
    """torchao's weight-only config for ``kind`` (None: ``to_nf4`` on each weight, as torchtune does)."""
    from torchao import quantization as ao

    return {
        "int8": lambda: ao.Int8WeightOnlyConfig(),
        "int4": lambda: ao.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=ao.PerGroup(32)),
        "float8": lambda: ao.Float8WeightOnlyConfig(),
        "nf4": lambda: None,
    }[kind]()


TORCHAO_KINDS = ["int8", "int4", "float8", "nf4"]


def torchao_quantize(model: nn.Module, kind: str) -> nn.Module:
    from torchao import quantization as ao
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

    config = torchao_weight_only(kind)
    if config is None:
        for i in (0, 2):
            weight = to_nf4(model[i].weight.detach(), block_size=64, scaler_block_size=32)
            model[i].weight = nn.Parameter(weight, requires_grad=False)
    else:
        ao.quantize_(model, config)
    return model


def torchao_dequantized(weight: torch.Tensor) -> torch.Tensor:
    if type(weight).__name__ == "NF4Tensor":
        return weight.get_original_weight().float()
    return weight.dequantize().float()


def torchao_pair(kind: str) -> tuple[nn.Module, nn.Module]:
    """torchao 0.18 weight-only kinds that run on this CPU (tests/test_torchao.py says which)."""
    quant, dense = torchao_quantize(dense_mlp(), kind), dense_mlp()
    with torch.no_grad():
        for i in (0, 2):
            dense[i].weight.copy_(torchao_dequantized(quant[i].weight))
    return quant, dense


#: (library, kind) of every quantized base the tests run over; a library not installed is skipped.
BACKENDS = [("bitsandbytes", "nf4"), ("bitsandbytes", "int8")] + [("torchao", k) for k in TORCHAO_KINDS]
PAIRS = {"bitsandbytes": bnb_pair, "torchao": torchao_pair}


def step_input_grads(model: nn.Module, x: torch.Tensor, steps: int = 3) -> list[torch.Tensor]:
    """SGD steps on ``model(x)^2``; the input's gradient at each (the base product must pass it on)."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    grads = []
    for _ in range(steps):
        x = x.detach().requires_grad_()
        model(x).pow(2).mean().backward()
        grads.append(x.grad)
        opt.step()
        opt.zero_grad()
    return grads
