"""One generated sequence: its parameters, tokens, text, and how its next token is chosen.

Greedy (``temperature`` below ``GREEDY_BELOW``, 1e-5 as vLLM's sampling epsilon) takes the
argmax, as ``generate(do_sample=False)`` does: dividing by a smaller temperature overflows and
picks the argmax anyway. Sampling
divides the logits by the temperature, keeps the ``top_k`` most probable tokens (Fan et al. 2018,
arXiv 1805.04833), then the smallest set of those whose renormalized probability reaches ``top_p``
(nucleus sampling, Holtzman et al. 2019, arXiv 1904.09751; top-k first, as vLLM orders them) and
draws from it with the
sequence's own ``torch.Generator``: seeded requests give the same text whatever else is in the
batch.

Text is the tokenizer's decode of the new tokens (``skip_special_tokens=True``), built
incrementally: each token decodes a short window, the tokens since the last emitted piece and the
piece before them as context (``Sequence.detokenize``), and appends what the window adds past its
context. A window whose text ends in a replacement character (half of a multi-byte character,
byte-fallback or byte-level tokens) waits for the next token; when the sequence ends the rest is
decoded whole, once. So a token costs a decode of a few tokens, not of the whole text (O(n)
instead of O(n^2) over a sequence), and the text equals the full decode of the tokens read so far
(tests/test_serve_engine.py checks it on random streams with byte-fallback and byte-level tokens).
Stop strings are searched only in the text's new tail (and the ``len(stop) - 1`` characters before
it), so they are found across token boundaries; a stream sends the part that is settled: not a
tail that may still become a stop string.

Every step of one row (:func:`sample`, :meth:`Sequence.decode`, :meth:`Sequence.check_stop`) may
raise for that row alone; the engine then fails that request and the batch goes on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

GREEDY_BELOW = 1e-5  # temperatures below this are greedy (vLLM's _SAMPLING_EPS)
SEED_SPACE = 2**64  # torch.Generator seeds are 64-bit: seed + choice index wraps around


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off; k >= 1: only the k most probable tokens
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None  # report each token's log-probability and this many alternatives
    echo: bool = False  # with logprobs: the prompt's tokens' log-probabilities too
    ignore_eos: bool = False  # vLLM's extension: an end-of-sequence token does not end the choice

    @property
    def adjusts(self) -> bool:
        return bool(self.logit_bias) or self.presence_penalty != 0 or self.frequency_penalty != 0


@dataclass
class Sequence:
    """Choice ``index`` of request ``request_id``; the engine's unit of batching."""

    request_id: str
    index: int
    adapter: str  # an adapter name, or BASE
    prompt: list[int]
    params: SamplingParams
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters of text already streamed
    finish_reason: str | None = None
    generator: torch.Generator | None = None
    cached: int = 0  # prompt tokens whose keys/values are in the cache (chunked prefill)
    shown: int = 0  # tokens[shown:read] are the context of the next decode window
    read: int = 0  # tokens[:read] are in ``text``
    counts: dict[int, int] = field(default_factory=dict)  # generated token -> times, for the penalties
    logprobs: list[tuple[str, float | None, dict[str, float] | None]] = field(default_factory=list)  # not sent yet

    def __post_init__(self) -> None:
        if not self.greedy and self.params.seed is not None:
            self.generator = torch.Generator().manual_seed((self.params.seed + self.index) % SEED_SPACE)

    @property
    def greedy(self) -> bool:
        return self.params.temperature < GREEDY_BELOW

    @property
    def prefill_left(self) -> int:
        """Prompt tokens not prefilled yet."""
        return len(self.prompt) - self.cached

    @property
    def remaining(self) -> int:
        return self.params.max_tokens - len(self.tokens)

    def add(self, token: int, tokenizer, eos_ids: set[int]) -> None:
        """Record a new token; set ``finish_reason`` when the sequence is done."""
        self.tokens.append(token)
        self.counts[token] = self.counts.get(token, 0) + 1
        if token in eos_ids and not self.params.ignore_eos:
            self.finish_reason = "stop"
            self.detokenize(tokenizer, len(self.tokens) - 1, final=True)
            return
        before = len(self.text)
        self.detokenize(tokenizer, len(self.tokens), final=self.remaining <= 0)
        cut = self.check_stop(before)
        if cut >= 0:
            self.text = self.text[:cut]
            self.finish_reason = "stop"
        elif self.remaining <= 0:
            self.finish_reason = "length"

    def detokenize(self, tokenizer, end: int, final: bool = False) -> None:
        """Append the text of ``tokens[read:end]``: decode the window ``tokens[shown:end]`` and keep
        what it adds to its context ``tokens[shown:read]`` (the context makes spaces and merges
        come out as in the full decode). An unfinished character waits. ``final``: the text is
        the full decode of ``tokens[:end]``, once (a byte-fallback decoder renders a run of byte
        tokens that ends unfinished as one replacement character per byte, the bytes before too)."""
        if final:
            self.text = self.decode(tokenizer, self.tokens[:end])
            self.shown = self.read = end
            return
        context = self.decode(tokenizer, self.tokens[self.shown:self.read])
        window = self.decode(tokenizer, self.tokens[self.shown:end])
        if len(window) > len(context) and not window.endswith("\ufffd"):
            self.text += window[len(context):]
            self.shown, self.read = self.read, end

    def adjusted(self, logits: torch.Tensor) -> torch.Tensor:
        """One row's logits with ``logit_bias`` added and the penalties taken off, as OpenAI defines
        them over the tokens generated so far: l[t] - c[t] * frequency - (c[t] > 0) * presence."""
        out = logits.float().clone()
        if self.params.logit_bias:
            ids, biases = zip(*self.params.logit_bias)
            out[list(ids)] += torch.tensor(biases, dtype=out.dtype, device=out.device)
        if self.counts and (self.params.presence_penalty or self.params.frequency_penalty):
            ids = torch.tensor(list(self.counts), device=out.device)
            counts = torch.tensor(list(self.counts.values()), dtype=out.dtype, device=out.device)
            out[ids] -= counts * self.params.frequency_penalty + self.params.presence_penalty
        return out

    def take_logprobs(self) -> list | None:
        """The log-probability entries not sent yet (None when the request asked for none)."""
        if self.params.logprobs is None:
            return None
        entries, self.logprobs = self.logprobs, []
        return entries

    def decode(self, tokenizer, tokens: list[int]) -> str:
        return tokenizer.decode(tokens, skip_special_tokens=True)

    def check_stop(self, since: int = 0) -> int:
        """Where the first stop string starts in the text (one that ends after ``since``: earlier
        text was checked before); -1 if none does."""
        return min((i for i in (self.text.find(s, max(0, since - len(s) + 1)) for s in self.params.stop) if i >= 0),
                   default=-1)

    def settled_delta(self) -> str:
        """Text not streamed yet that can no longer change; advances ``sent``."""
        end = len(self.text)
        if self.finish_reason is None:
            if self.text.endswith("\ufffd"):  # half of a multi-token character
                end -= 1
            hold = max((len(s) - 1 for s in self.params.stop), default=0)
            end = max(self.sent, end - hold)
        delta = self.text[self.sent:end]
        self.sent = max(self.sent, end)
        return delta


def sampling_probs(logits: torch.Tensor, sequences: list[Sequence]) -> torch.Tensor:
    """The distributions the sampled rows draw from, for all of them in one batched pass
    (``logits``: (rows, vocab), row i for ``sequences[i]``).

    p = softmax(logits / T) with each row's own temperature; each row with a ``top_k`` keeps its k
    most probable tokens (renormalized among them), then each row keeps the smallest set of most
    probable tokens whose mass reaches its ``top_p`` (the most probable token is always kept, so a
    tiny ``top_p`` or ``top_k`` 1 is greedy, not empty). Rows are independent: a row's
    probabilities are the same whatever else is in the batch, and a row without top_k or top_p
    is the plain softmax."""
    device = logits.device
    vocab = logits.shape[-1]
    temperature = torch.tensor([s.params.temperature for s in sequences], dtype=torch.float32, device=device)
    probs = torch.softmax(logits.float() / temperature[:, None], dim=-1)
    top_p = torch.tensor([s.params.top_p for s in sequences], dtype=torch.float32, device=device)
    top_k = torch.tensor([s.params.top_k if 0 < s.params.top_k < vocab else vocab for s in sequences], device=device)
    cut_k = top_k < vocab
    if bool((top_p < 1.0).any()) or bool(cut_k.any()):
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        drop = torch.arange(vocab, device=device)[None, :] >= top_k[:, None]  # past each row's k
        kept = sorted_probs.masked_fill(drop, 0)
        # the top-k rows renormalized (rows without top_k divide by exactly 1: unchanged)
        mass = torch.where(cut_k, kept.sum(dim=-1), torch.ones_like(top_p))
        kept = kept / mass[:, None]
        before = kept.cumsum(dim=-1) - kept  # mass of the tokens ranked above
        drop |= before >= top_p[:, None]
        drop[:, 0] = False
        probs = torch.zeros_like(probs).scatter_(1, order, kept.masked_fill(drop, 0))
    return probs


def sample(probs: torch.Tensor, seq: Sequence) -> int:
    """One row's draw from its distribution (``probs``: (vocab,), from :func:`sampling_probs`) with
    the sequence's own generator: seeded choices are reproducible alone or in any batch."""
    return int(torch.multinomial(probs, 1, generator=seq.generator))


def logprob_entries(logprobs: torch.Tensor, tokens: list[int], top: int, tokenizer) -> list:
    """(token text, its log-probability, {alternative text: log-probability}) for each of ``tokens``;
    ``logprobs``: (len(tokens), vocab) log-softmax rows, row i the distribution token i was drawn from."""
    chosen = logprobs.gather(1, torch.tensor(tokens, device=logprobs.device)[:, None])[:, 0].tolist()
    best = logprobs.topk(top, dim=1) if top else None
    out = []
    for i, token in enumerate(tokens):
        text = tokenizer.decode([token])
        alternatives = {}
        if best is not None:
            alternatives = {tokenizer.decode([t]): v for t, v in zip(best.indices[i].tolist(), best.values[i].tolist())}
        alternatives.setdefault(text, chosen[i])  # the chosen token is always listed, as OpenAI does
        out.append((text, chosen[i], alternatives))
    return out
