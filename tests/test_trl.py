"""TRL's trainers on shirakit adapters (src/shirakit/integrations/trl.py), CPU, tiny random models.

What this guards:
- ``SFTTrainer`` trains an injected adapter of every method (fp32, and SHiRA under bf16 autocast on CPU,
  where SHiRA's backward once crashed): the loss falls, the base weights stay bit-identical;
- ``DPOTrainer`` with ``ref_model=base_reference(model)``: no second copy of any weight (the reference owns
  no parameters and calls the policy itself), its log-probabilities are the base model's, and training is
  step for step the same as with an explicit frozen copy of the base as ``ref_model`` (the oracle);
- an adapter on the output head, or no adapter at all, is refused with a reason.
"""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer  # noqa: E402

import shirakit  # noqa: E402
from shirakit.integrations.trl import base_reference, check_model  # noqa: E402
from tests.serving import _tokenizer  # noqa: E402

TOKENIZER = _tokenizer()
# adapters that do not start as the identity, so the policy differs from the base from step 0
CONFIGS = {
    "shira": lambda: shirakit.ShiraConfig(r=4, target_modules="all-linear", random_seed=0, init_weights=False),
    "lora": lambda: shirakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False),
    "vera": lambda: shirakit.VeraConfig(r=8, target_modules="all-linear", init_weights=False),
    "miss": lambda: shirakit.MissConfig(r=4, target_modules="all-linear", init_weights=False),
}


def tiny_lm() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(TOKENIZER), max_position_embeddings=96,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(config)


def base_weights(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def trained(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


def common_args(out, bf16: bool = False, **extra) -> dict:
    # TRL's configs default to bf16 autocast (bf16=None -> True); fp32 unless a test asks
    return dict(output_dir=str(out), max_steps=3, per_device_train_batch_size=4, use_cpu=True, report_to=[],
                logging_steps=1, save_strategy="no", learning_rate=1e-2, disable_tqdm=True, bf16=bf16, **extra)


def losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


SFT_DATA = Dataset.from_list([{"text": f"the cat {i} sat on the mat"} for i in range(12)])
DPO_DATA = Dataset.from_list([{"prompt": f"q{i}:", "chosen": f" yes {i}", "rejected": f" no {i}"} for i in range(8)])


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_sft_trains_every_method(method, tmp_path):
    model = tiny_lm()
    shirakit.inject(model, CONFIGS[method]())
    before_base, before_adapter = base_weights(model), trained(model)
    trainer = SFTTrainer(model=check_model(model), args=SFTConfig(**common_args(tmp_path)), train_dataset=SFT_DATA,
                         processing_class=TOKENIZER)
    trainer.train()
    seen = losses(trainer)
    assert len(seen) == 3 and seen[-1] < seen[0], seen
    after = trained(model)
    assert max((after[k] - before_adapter[k]).abs().max().item() for k in after) > 0  # the adapter moved
    for key, value in base_weights(model).items():  # the base did not (state_dict shows the clean base)
        if key not in after:
            assert torch.equal(value, before_base[key]), key


def test_sft_bf16_autocast_on_cpu_shira(tmp_path):
    """bf16 autocast on CPU: the SHiRA backward under autocast (tests/test_mixed_precision.py), through TRL."""
    results = {}
    for bf16 in (False, True):
        model = tiny_lm()
        shirakit.inject(model, CONFIGS["shira"]())
        trainer = SFTTrainer(model=model, args=SFTConfig(**common_args(tmp_path / str(bf16), bf16=bf16)),
                             train_dataset=SFT_DATA, processing_class=TOKENIZER)
        trainer.train()
        results[bf16] = losses(trainer)
        assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast, not a bf16 model
    assert results[True][-1] < results[True][0]
    # bf16 matmuls move the loss by ~1e-3 relative on this model; a broken backward would not track fp32
    assert results[True] == pytest.approx(results[False], rel=2e-2)


def dpo(model, ref_model, out, bf16: bool = False) -> DPOTrainer:
    return DPOTrainer(model=model, ref_model=ref_model, args=DPOConfig(**common_args(out, bf16)),
                      train_dataset=DPO_DATA, processing_class=TOKENIZER)


def test_dpo_reference_is_the_base_without_a_copy(tmp_path):
    model = tiny_lm()
    base = copy.deepcopy(model).eval()  # the oracle only
    shirakit.inject(model, CONFIGS["shira"]())
    reference = base_reference(model)
    trainer = dpo(model, reference, tmp_path)

    # no second copy: the reference owns nothing and runs the trainer's own policy
    assert trainer.ref_model is reference and reference.policy is trainer.model
    assert list(reference.parameters()) == [] and list(reference.buffers()) == []
    storages = {p.untyped_storage().data_ptr() for p in trainer.model.parameters()}
    assert storages == storages | {p.untyped_storage().data_ptr() for p in trainer.ref_model.parameters()}

    # its log-probabilities are the base model's (TRL's fused LM head on the reference) and not the policy's
    batch = torch.tensor([TOKENIZER("q1: yes 1").input_ids])
    got = trainer.ref_model(input_ids=batch, labels=batch, fused_lm_head=True).log_probs[0]
    with torch.no_grad():
        base_logits = base(input_ids=batch).logits[0, :-1]
        policy_logits = model(input_ids=batch, fused_lm_head=False).logits[0, :-1]
    want = torch.log_softmax(base_logits, -1).gather(-1, batch[0, 1:, None])[:, 0]
    policy = torch.log_softmax(policy_logits, -1).gather(-1, batch[0, 1:, None])[:, 0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - policy).abs().max() > 1e-3  # the adapter does change the policy: the check above means something
    assert shirakit.active_adapters(model) == ["default"]  # enabled again after the reference call


# SHiRA in the inner loop; the others (8 s each on a quiet core) are slow
@pytest.mark.parametrize("method", [m if m == "shira" else pytest.param(m, marks=pytest.mark.slow)
                                    for m in sorted(CONFIGS)])
def test_dpo_trains_every_method_like_a_frozen_base_copy(method, tmp_path):
    """Training against ``base_reference`` equals training against a deep copy of the base, step for step
    (under TRL's default bf16 autocast, so the reference forward runs under it too)."""
    runs = {}
    for mode in ("view", "copy"):
        model = tiny_lm()
        frozen = copy.deepcopy(model).eval() if mode == "copy" else None
        shirakit.inject(model, CONFIGS[method]())
        trainer = dpo(model, base_reference(model) if mode == "view" else frozen, tmp_path / mode, bf16=True)
        trainer.train()
        runs[mode] = (losses(trainer), trained(model))
    (view_losses, view_weights), (copy_losses, copy_weights) = runs["view"], runs["copy"]
    assert len(view_losses) == 3 and view_losses[-1] < view_losses[0], view_losses
    assert view_losses == pytest.approx(copy_losses, rel=1e-6, abs=1e-7)
    for key in copy_weights:
        torch.testing.assert_close(view_weights[key], copy_weights[key], rtol=1e-6, atol=1e-7)


def test_refused_models():
    with pytest.raises(ValueError, match="holds no shirakit adapters"):
        base_reference(tiny_lm())
    model = tiny_lm()
    shirakit.inject(model, shirakit.LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(ValueError, match="'lm_head' .*output head"):
        check_model(model)
    with pytest.raises(TypeError, match="found str"):
        base_reference("model")
