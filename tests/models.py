"""Tiny random-init models built from configs: fast, no download."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

VOCAB = 97


def tiny_llama(dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, pad_token_id=0,
    )
    return LlamaForCausalLM(cfg).to(dtype).eval()


def tiny_gpt2(dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).to(dtype).eval()


def tiny_bert(dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                     vocab_size=VOCAB, max_position_embeddings=64, num_labels=3,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg).to(dtype).eval()


class ConvNet(torch.nn.Module):
    """A tiny model of the layer siblings: token embedding -> Conv1d over the sequence -> Conv2d
    (strided) -> Conv2d (dilated, padding="same") -> linear head; called like the HF models above."""

    def __init__(self, grouped: bool = False) -> None:
        super().__init__()
        nn = torch.nn
        self.emb = nn.Embedding(VOCAB, 12, padding_idx=0)
        self.c1 = nn.Conv1d(12, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 24, 3, stride=2, padding=1)
        self.c3 = nn.Conv2d(24, 24, 3, padding="same", dilation=2, groups=4 if grouped else 1,
                            padding_mode="reflect" if grouped else "zeros")
        self.head = nn.Linear(24, VOCAB)

    def forward(self, input_ids, labels=None):
        h = self.c1(self.emb(input_ids).transpose(1, 2))  # (B, 16, T)
        h = torch.tanh(h.unsqueeze(-1) * h.unsqueeze(-2))  # (B, 16, T, T): something 2-d to convolve
        h = self.c3(torch.relu(self.c2(h)))  # (B, 24, T/2, T/2)
        logits = self.head(h.mean(-1).transpose(1, 2).contiguous())  # (B, T/2, vocab)
        loss = None
        if labels is not None:
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), labels[:, ::2].reshape(-1))
        return SimpleNamespace(logits=logits, loss=loss)


def tiny_convnet(dtype: torch.dtype = torch.float32, seed: int = 0, grouped: bool = False) -> torch.nn.Module:
    torch.manual_seed(seed)
    return ConvNet(grouped).to(dtype).eval()


MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}
#: models of the layer siblings (convs, embeddings): the battery runs them for the methods that adapt them
SIBLING_MODELS = {"convnet": tiny_convnet}

# Which layers each method targets on each model (all-linear exercises the shorthand on llama).
TARGETS = {
    "llama": "all-linear",
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "bert": ["query", "value", "dense"],
    "convnet": ["emb", "c1", "c2", "c3"],
}


def inputs(seed: int = 1, batch: int = 2, length: int = 10) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (batch, length), generator=g)


def output(model, ids) -> torch.Tensor:
    out = model(input_ids=ids)
    return out.logits
