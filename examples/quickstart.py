"""Quick start: SHiRA on a tiny Llama, end to end, in a few seconds on a CPU.

Injects a SHiRA adapter, trains a few steps, saves it in PEFT's format, reloads it into a
fresh model, merges it by scatter, unmerges it (bit-exact restore) and prints what happened.
"""

from __future__ import annotations

import tempfile
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import shirakit


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256, max_position_embeddings=128)
    return LlamaForCausalLM(config)


def main() -> None:
    model = tiny_llama()
    base_weights = {k: v.clone() for k, v in model.state_dict().items()}
    shirakit.inject(model, shirakit.ShiraConfig(r=8, target_modules="all-linear", random_seed=0))
    shirakit.print_trainable_parameters(model)

    data = torch.randint(0, 256, (8, 64), generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    for step in range(1, 21):
        loss = model(input_ids=data, labels=data).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 5 == 0:
            print(f"step {step:2d}  loss {loss.item():.4f}")
    model.eval()
    with torch.no_grad():
        trained = model(input_ids=data).logits

    with tempfile.TemporaryDirectory() as directory:
        shirakit.save_adapter(model, directory)
        fresh = tiny_llama()
        start = time.perf_counter()
        shirakit.load_adapter(fresh, directory)
        print(f"reloaded the adapter in {1e3 * (time.perf_counter() - start):.1f} ms")
    with torch.no_grad():
        print("reloaded == trained:", torch.equal(fresh(input_ids=data).logits, trained))
        start = time.perf_counter()
        shirakit.merge(fresh)
        print(f"merged by scatter in {1e3 * (time.perf_counter() - start):.2f} ms;",
              "merged == unmerged:", torch.allclose(fresh(input_ids=data).logits, trained, atol=1e-5))
        shirakit.unmerge(fresh)
        plain = shirakit.unload(fresh)
        restored = all(torch.equal(plain.state_dict()[k], v) for k, v in base_weights.items())
        print("unmerge restored every base weight bit-exactly:", restored)


if __name__ == "__main__":
    main()
