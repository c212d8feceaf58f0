"""Tiny Hugging Face model folders (weights, config, a real tokenizer with a chat template) and the
data files a user would bring: what ``shirakit train --model DIR --data FILE`` reads, built offline."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL = ["<unk>", "<pad>", "<eos>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
WORDS = ["the", "cat", "dog", "sat", "ran", "on", "mat", "fast", "slow", "good", "bad", "movie", "film", "great",
         "awful", "hello", "hi", "how", "are", "you", "fine", "thanks", "what", "is", "two", "plus", "four"]


def tokenizer():
    """A word-level fast tokenizer over WORDS (unknown words -> <unk>) with a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS + list("0123456789.,?!"))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                  pre_tokenizers.Punctuation()])
    core.add_special_tokens(SPECIAL)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def causal_lm_folder(path: Path, seed: int = 0) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=128,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def encoder_folder(path: Path, seed: int = 0) -> Path:
    """A BERT body (no head: the classifier's head is new, as with MiniLM)."""
    from transformers import BertConfig, BertModel

    tok = tokenizer()
    torch.manual_seed(seed)
    config = BertConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                        vocab_size=len(tok), max_position_embeddings=128, pad_token_id=tok.pad_token_id)
    BertModel(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


TEXTS = ["the cat sat on the mat", "the dog ran fast", "the cat ran slow", "the dog sat on the mat",
         "hello how are you", "fine thanks"]
REVIEWS = [("great movie", "pos"), ("good film", "pos"), ("awful movie", "neg"), ("bad film", "neg"),
           ("great film good", "pos"), ("bad movie awful", "neg")]
CHATS = [
    [{"role": "user", "content": "what is two plus two ?"}, {"role": "assistant", "content": "four"}],
    [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi how are you ?"},
     {"role": "user", "content": "fine thanks"}, {"role": "assistant", "content": "good"}],
]


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def text_jsonl(path: Path, repeat: int = 8) -> Path:
    return jsonl(path, [{"text": t} for t in TEXTS * repeat])


def chat_jsonl(path: Path, repeat: int = 6) -> Path:
    return jsonl(path, [{"messages": m} for m in CHATS * repeat])


def reviews_csv(path: Path, repeat: int = 6, text: str = "review", label: str = "sentiment") -> Path:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow([text, label])
        writer.writerows(REVIEWS * repeat)
    return path
