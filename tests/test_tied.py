"""Tied weights: an in-weight adapter (SHiRA, MiSS bat) on ``lm_head`` tied to ``embed_tokens``.

Writing the adapter into the shared tensor would change the input embeddings too (SmolLM2, Llama
3.2, Gemma tie them). shirakit finds the sharing at inject and runs such an adapter additively on
that layer; the result must equal the same adapter on an untied copy, gradients included.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import shirakit
from shirakit.core.adapter import InWeightAdapter

VOCAB = 96  # divisible by MiSS bat's r


def _tied_llama() -> nn.Module:
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
                      tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def _untied(model: nn.Module) -> nn.Module:
    other = copy.deepcopy(model)
    other.config.tie_word_embeddings = False
    other.lm_head.weight = nn.Parameter(other.model.embed_tokens.weight.detach().clone())
    return other


CONFIGS = {
    "shira": lambda: shirakit.ShiraConfig(r=2, target_modules=["lm_head", "q_proj"], init_weights=False,
                                          random_seed=1),
    "miss-bat": lambda: shirakit.MissConfig(r=4, target_modules=["lm_head", "q_proj"], init_weights="bat",
                                            init_random=True),
}


def _ids():
    return torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("method", list(CONFIGS))
def test_in_weight_adapter_on_a_tied_head_leaves_the_embeddings_alone(method):
    tied = _tied_llama()
    untied = _untied(tied)
    embeddings = tied.model.embed_tokens.weight.detach().clone()
    for model in (tied, untied):
        torch.manual_seed(7)
        shirakit.inject(model, CONFIGS[method]())
    head = tied.lm_head
    assert head.weight_shared_with == ("model.embed_tokens.weight",)
    assert isinstance(head.adapters["default"], InWeightAdapter)
    assert head._in_weight("default") is None  # the additive path
    assert untied.lm_head._in_weight("default") is not None  # untied: in the weight as usual
    ids = _ids()
    with torch.no_grad():
        got, want = tied(input_ids=ids).logits, untied(input_ids=ids).logits
    assert torch.equal(tied.model.embed_tokens.weight, embeddings)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

    # training: the same value gradients, and still the embeddings untouched
    for model in (tied, untied):
        model.train()
        model(input_ids=ids).logits.pow(2).mean().backward()
    grads = {n: p.grad for n, p in tied.named_parameters() if p.requires_grad}
    for name, param in untied.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(grads[name], param.grad, atol=1e-5, rtol=1e-4)
    assert torch.equal(tied.model.embed_tokens.weight, embeddings)


def test_merging_into_a_tied_weight_warns_and_unmerge_restores_it():
    tied = _tied_llama()
    embeddings = tied.model.embed_tokens.weight.detach().clone()
    shirakit.inject(tied, CONFIGS["shira"]())
    with pytest.warns(UserWarning, match="tied to"):
        shirakit.merge(tied)
    assert not torch.equal(tied.model.embed_tokens.weight, embeddings)  # merged: both modules see it
    shirakit.unmerge(tied)
    assert torch.equal(tied.model.embed_tokens.weight, embeddings)


def test_lora_on_a_tied_head_stays_additive_and_untied_layers_are_not_flagged():
    tied = _tied_llama()
    shirakit.inject(tied, shirakit.LoraConfig(r=2, target_modules=["lm_head", "q_proj"]))
    assert tied.lm_head.weight_shared_with == ("model.embed_tokens.weight",)
    assert tied.model.layers[0].self_attn.q_proj.weight_shared_with == ()


def test_tie_detection_on_the_meta_device():
    """Built on the meta device (the FSDP2 large-model recipe), every tensor's data pointer is 0: only
    the tied head counts as sharing; the other layers keep their in-weight path (they once all looked
    tied to each other, and SHiRA ran additively on every layer of a meta-built model)."""
    with torch.device("meta"):
        model = _tied_llama()
        shirakit.inject(model, shirakit.ShiraConfig(r=2, target_modules=["q_proj", "down_proj", "lm_head"],
                                                    random_seed=0))
    shared = {name: layer.weight_shared_with for name, layer in shirakit.core.state.adapter_layers(model)}
    assert shared.pop("lm_head") == ("model.embed_tokens.weight",)
    assert len(shared) == 4 and not any(shared.values()), shared
