"""TRL's SFTTrainer, then DPOTrainer, on a shirakit SHiRA adapter: offline, a tiny random Llama, ~20 s on a CPU.

Needs the ``trl`` extra (``pip install -c constraints.txt -e ".[trl]"``). The model is built from a config and the
tokenizer is one token per character, so nothing is downloaded. With a real model, load it with
``AutoModelForCausalLM.from_pretrained`` and its tokenizer instead; the shirakit lines stay the same.

    python examples/trl_sft_dpo.py                 # SHiRA
    python examples/trl_sft_dpo.py --method lora   # or vera, miss

The DPO reference model is the same model with its adapters disabled (``base_reference``): no second copy.
"""

from __future__ import annotations

import argparse
import string
import tempfile

import torch
from datasets import Dataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

import shirakit
from shirakit.integrations.trl import base_reference, check_model

CONFIGS = {
    "shira": lambda: shirakit.ShiraConfig(r=8, target_modules="all-linear", random_seed=0),
    "lora": lambda: shirakit.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"),
    "vera": lambda: shirakit.VeraConfig(r=16, target_modules="all-linear"),
    "miss": lambda: shirakit.MissConfig(r=8, target_modules="all-linear"),
}


def char_tokenizer() -> PreTrainedTokenizerFast:
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + list(string.ascii_lowercase + string.digits + " .,:?!"))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def tiny_llama(vocab_size: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=128,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=sorted(CONFIGS), default="shira")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()

    tokenizer = char_tokenizer()
    model = tiny_llama(len(tokenizer))
    shirakit.inject(model, CONFIGS[args.method]())  # before the trainer sees the model
    shirakit.print_trainable_parameters(model)

    common = dict(max_steps=args.steps, per_device_train_batch_size=4, learning_rate=5e-3, use_cpu=True,
                  report_to=[], logging_steps=args.steps, save_strategy="no", disable_tqdm=True)
    with tempfile.TemporaryDirectory() as out:
        # 1. supervised fine-tuning on plain text
        sft_data = Dataset.from_list([{"text": f"question {i}: what is {i} plus {i}? answer: {2 * i}."}
                                      for i in range(40)])
        sft = SFTTrainer(model=check_model(model), args=SFTConfig(output_dir=f"{out}/sft", **common),
                         train_dataset=sft_data, processing_class=tokenizer)
        sft.train()
        print("SFT loss", [round(e["loss"], 3) for e in sft.state.log_history if "loss" in e])

        # 2. preference tuning: polite answers over curt ones; the reference is the base model (adapters off)
        dpo_data = Dataset.from_list([{"prompt": f"can you help with {i}?", "chosen": " yes, gladly.",
                                       "rejected": " no."} for i in range(40)])
        dpo = DPOTrainer(model=model, ref_model=base_reference(model),
                         args=DPOConfig(output_dir=f"{out}/dpo", beta=0.1, **common),
                         train_dataset=dpo_data, processing_class=tokenizer)
        dpo.train()
        last = [e for e in dpo.state.log_history if "rewards/margins" in e][-1]
        print(f"DPO loss {last['loss']:.4f}  reward margin {last['rewards/margins']:.3f}  "
              f"accuracy {last['rewards/accuracies']:.2f}")

        folder = shirakit.save_adapter(model, f"{out}/adapter")
        print("saved", sorted(p.name for p in folder.iterdir()))


if __name__ == "__main__":
    main()
