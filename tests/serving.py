"""Fixtures for the serving tests: a tiny causal LM with a real tokenizer, saved like a hub folder,
adapters of every method saved beside it, and the offline reference (greedy ``generate``)."""

from __future__ import annotations

import string
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import shirakit
from tests.cases import CASES

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
CONTEXT = 96


def _tokenizer() -> PreTrainedTokenizerFast:
    """One token per printable character, <s> first, </s> as end of text."""
    chars = [c for c in string.printable if c not in "\t\r\x0b\x0c"]
    vocab = {t: i for i, t in enumerate(SPECIALS + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save_tiny_lm(directory: Path) -> Path:
    """A 2-layer Llama (vocab 100, context 96) and its tokenizer, as a model folder."""
    tokenizer = _tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=CONTEXT,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2, initializer_range=0.2)
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 0
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def load_tiny_lm(directory: Path):
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval(), \
        AutoTokenizer.from_pretrained(directory)


SERVE_CASES = [c for c in CASES if c.id in ("lora-r4", "shira-r2", "vera-r8", "miss-balance-r5", "miss-bat-r4")]


def save_adapters(model_dir: Path, out: Path, count: int) -> dict[str, Path]:
    """``count`` randomized adapters cycling through every method (SHiRA also in the compact layout)."""
    folders = {}
    for i in range(count):
        case = SERVE_CASES[i % len(SERVE_CASES)]
        model, _ = load_tiny_lm(model_dir)
        torch.manual_seed(100 + i)
        config = case.make("all-linear", False)
        if hasattr(config, "random_seed"):
            config.random_seed = 100 + i
        shirakit.inject(model, config, "x")
        name = f"{case.id}-{i}"
        compact = case.id.startswith("shira") and i % 2 == 0
        shirakit.save_adapter(model, out / name, "x", compact=compact)
        folders[name] = out / name
    return folders


def offline_text(model_dir: Path, adapter_dir: Path | None, prompt: str | list[int], max_tokens: int) -> str:
    """The oracle: greedy ``generate`` with that adapter alone, decoded as the server decodes.
    A string prompt is tokenized as ``tokenizer(prompt)``; a list is taken as token ids."""
    model, tokenizer = load_tiny_lm(model_dir)
    if adapter_dir is not None:
        shirakit.load_adapter(model, adapter_dir, "only")
    ids = tokenizer(prompt, return_tensors="pt").input_ids if isinstance(prompt, str) else torch.tensor([prompt])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                         do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def start_tiny_server(model_dir: Path, adapters: dict[str, Path], policy=None, **engine_args):
    """A running ``shirakit serve`` (127.0.0.1, a free port) over the tiny model; the caller stops it
    (tests/conftest.py's ``tiny_server`` does). ``policy``: default runtime adapter loading on (the
    tests load and unload adapters over the API), nothing else."""
    from shirakit.serve import Engine, start_server
    from shirakit.serve.policy import Policy

    model, tokenizer = load_tiny_lm(model_dir)
    return start_server(Engine(model, tokenizer, "tiny-llama", adapters, **engine_args),
                        policy=policy or Policy(allow_runtime_adapters=True))
