"""RMS norms in one call on CPU: ``F.rms_norm`` in place of transformers' six-op Llama-family norm.

transformers' ``LlamaRMSNorm`` (and the norms copied from it: Qwen2, Mistral, ...) computes
``weight * (x * rsqrt(mean(x^2) + eps))`` as six separate ops; a decode step of SmolLM2-135M runs 61 of
them, about 6 % of the step on 2 CPU cores. ``F.rms_norm`` computes the same formula in one call:
the step took 0.98x the time, with SmolLM2's logits bit-identical (docs/benchmarks.md).

Only norms whose ``forward`` is Llama's own code (same bytecode, constants and names: the
"Copied from Llama" classes) are swapped, and only for float32 inputs: half precision upcasts
inside Llama's norm and others differ in the formula (Gemma's ``1 + weight``), so those keep their
own ``forward``. The swap is an instance attribute, as ``skinny_linear.py``'s forms: the class,
parameters and ``state_dict`` are untouched.
"""

from __future__ import annotations

import functools
import types

import torch
from torch import nn


@functools.cache  # asked once per module of a model
def _llama_norm_code():
    try:
        from transformers.models.llama.modeling_llama import LlamaRMSNorm
    except ImportError:  # a transformers without Llama: nothing is recognized
        return None
    return LlamaRMSNorm.forward.__code__


def is_llama_rms_norm(module: nn.Module) -> bool:
    """Whether ``module``'s class runs exactly Llama's RMS norm (and has its ``weight`` and ``variance_epsilon``)."""
    code = _llama_norm_code()
    forward = getattr(type(module), "forward", None)
    theirs = getattr(forward, "__code__", None)
    return (code is not None and theirs is not None and theirs.co_code == code.co_code
            and theirs.co_consts == code.co_consts and theirs.co_names == code.co_names
            and isinstance(getattr(module, "weight", None), torch.Tensor) and hasattr(module, "variance_epsilon"))


def fused_rms_norm_forward(norm: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """``weight * x / sqrt(mean(x^2) + eps)`` over the last axis in one call (float32 inputs; others: the class's)."""
    if hidden_states.dtype != torch.float32 or norm.weight.dtype != torch.float32:
        return type(norm).forward(norm, hidden_states)
    return nn.functional.rms_norm(hidden_states, (hidden_states.shape[-1],), norm.weight, norm.variance_epsilon)


def use_fused_rms_norms(model: nn.Module) -> int:
    """Give every Llama-family RMS norm of ``model`` :func:`fused_rms_norm_forward`; returns how many."""
    count = 0
    for module in model.modules():
        if is_llama_rms_norm(module):
            module.forward = types.MethodType(fused_rms_norm_forward, module)
            count += 1
    return count


def drop_fused_rms_norms(model: nn.Module) -> None:
    """Undo :func:`use_fused_rms_norms`: every norm back to its class's forward."""
    for module in model.modules():
        if getattr(module.__dict__.get("forward"), "__func__", None) is fused_rms_norm_forward:
            del module.forward
