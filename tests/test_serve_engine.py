"""The engine's memory half (issue 24): token-budget admission, the slot KV cache, chunked prefill.

The engine is driven directly (no HTTP) over the tiny model; the oracle is offline greedy
``generate`` with the request's adapter alone (tests/serving.py), as for the HTTP tests.
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest
import torch

from tests.serving import load_tiny_lm, offline_text, save_adapters, save_tiny_lm

pytest.importorskip("fastapi")
from shirakit.model.routing import BASE  # noqa: E402
from shirakit.serve import Engine, start_server  # noqa: E402
from shirakit.serve.engine import RequestTooLarge  # noqa: E402
from shirakit.serve.kv import SlotKV  # noqa: E402
from shirakit.serve.policy import Policy  # noqa: E402
from shirakit.serve.sequence import SamplingParams, Sequence  # noqa: E402

TIMEOUT = 60


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    model_dir = save_tiny_lm(root / "tiny-llama")
    return model_dir, save_adapters(model_dir, root / "adapters", 3), root


def _engine(folders, **engine_args) -> Engine:
    model_dir, adapters, _ = folders
    model, tokenizer = load_tiny_lm(model_dir)
    return Engine(model, tokenizer, "tiny-llama", adapters, **engine_args)


def _prompt(seed: int, length: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return [1] + torch.randint(3, 99, (length - 1,), generator=generator).tolist()


class Collector:
    """A sink per request: its text, and when each event came."""

    def __init__(self) -> None:
        self.text, self.times, self.done, self.error = "", [], threading.Event(), None

    def __call__(self, event) -> None:
        if isinstance(event, Exception):
            self.error = event
            self.done.set()
            return
        self.text += event.text
        self.times.append(time.perf_counter())
        if event.finish_reason is not None:
            self.done.set()


def _run(engine: Engine, jobs: list[tuple[str, list[int], int]]) -> list[Collector]:
    sinks = []
    for model, prompt, max_tokens in jobs:
        sink = Collector()
        engine.submit(model, prompt, SamplingParams(max_tokens=max_tokens, temperature=0), 1, sink)
        sinks.append(sink)
    for sink in sinks:
        assert sink.done.wait(TIMEOUT), "a request did not finish"
        assert sink.error is None, sink.error
    return sinks


def _record_rows(engine: Engine) -> list[tuple[str, int, int, int, int]]:
    """Every forward the engine runs: ("prefill", rows, tokens per row, running rows, forward number)
    and ("decode", rows, 1, running rows, forward number). A ragged forward (decoding rows and a
    prefill chunk together) gives both entries with the same forward number."""
    seen = []
    count = iter(range(1 << 30))
    prefill, decode, step = engine._prefill, engine._decode_step, engine._step

    def recording_prefill(group, fed, union):
        seen.append(("prefill", len(group), max(fed), len(engine._running), next(count)))
        prefill(group, fed, union)

    def recording_decode():
        seen.append(("decode", engine._decoding, 1, len(engine._running), next(count)))
        decode()

    def recording_step(group, fed):
        number = next(count)
        if group:
            seen.append(("prefill", len(group), max(fed), len(engine._running), number))
        if engine._decoding:
            seen.append(("decode", engine._decoding, 1, len(engine._running), number))
        step(group, fed)

    engine._prefill, engine._decode_step, engine._step = recording_prefill, recording_decode, recording_step
    return seen


def test_token_budget_queues_long_requests_and_refuses_what_never_fits(folders):
    """A budget of 4 slots x 64 positions: rows reserving up to 64 run 4 at a time and the others
    wait; a request reserving more than the budget allows alone is refused with a clear error."""
    model_dir, adapters, _ = folders
    name = list(adapters)[0]
    engine = _engine(folders, max_kv_tokens=256, max_batch=32).start()
    seen = _record_rows(engine)
    try:
        with pytest.raises(RequestTooLarge, match=r"needs \d+ KV token positions.*budget is 256"):
            engine.submit(name, _prompt(0, 40), SamplingParams(max_tokens=40, temperature=0), 1, Collector())
        with pytest.raises(RequestTooLarge, match="choice"):  # n rows of 64: 8 slots
            engine.submit(name, _prompt(0, 20), SamplingParams(max_tokens=10, temperature=0), 5, Collector())
        jobs = [(name if i % 2 else "tiny-llama", _prompt(i, 20 + i), 30) for i in range(7)]
        sinks = _run(engine, jobs)
    finally:
        engine.stop()
    assert max(rows for _, _, _, rows, _ in seen) == 4  # the budget, not max_batch, bounded the batch
    for (model, prompt, max_tokens), sink in zip(jobs, sinks):
        assert sink.text == offline_text(model_dir, adapters.get(model), prompt, max_tokens)


def test_token_budget_refusal_over_http_is_a_400_naming_the_budget(folders):
    model_dir, adapters, _ = folders
    running = start_server(_engine(folders, max_kv_tokens=256), policy=Policy())
    try:
        with httpx.Client(base_url=running.url, timeout=TIMEOUT) as http:
            body = {"model": "tiny-llama", "prompt": [_prompt(1, 50)], "max_tokens": 30, "temperature": 0}
            response = http.post("/v1/completions", json=body)
            assert response.status_code == 400, response.text
            assert "KV budget is 256" in response.json()["error"]["message"]
            body["max_tokens"] = 10  # 60 positions: fits
            response = http.post("/v1/completions", json=body)
            assert response.status_code == 200, response.text
    finally:
        running.stop()


@pytest.mark.parametrize("ragged", [True, False])
@pytest.mark.parametrize("chunked", [True, False])
def test_a_long_prompt_is_prefilled_in_chunks_between_decode_steps(folders, chunked, ragged):
    """Four rows decode; a 70-token prompt arrives. Chunked (16 tokens an iteration): it goes in
    over several iterations, each also giving the running rows a token (ragged: in the chunk's
    own forward; otherwise in a decode step right after it); unchunked: one forward. Every text
    equals offline generate either way."""
    model_dir, adapters, _ = folders
    names = list(adapters)
    engine = _engine(folders, max_num_batched_tokens=20, chunked_prefill=chunked)
    assert engine.ragged  # the tiny Llama runs on transformers' attention interface
    engine.ragged = ragged
    engine.start()
    seen = _record_rows(engine)
    try:
        short = [(names[i % 3], _prompt(10 + i, 6), 20) for i in range(4)]
        sinks = []
        for model, prompt, max_tokens in short:
            sink = Collector()
            engine.submit(model, prompt, SamplingParams(max_tokens=max_tokens, temperature=0), 1, sink)
            sinks.append(sink)
        deadline = time.monotonic() + TIMEOUT
        while engine.stats.decode_steps < 2 and time.monotonic() < deadline:
            time.sleep(0.005)
        long_job = ("tiny-llama", _prompt(99, 70), 8)
        sinks += _run(engine, [long_job])
        for sink in sinks:
            assert sink.done.wait(TIMEOUT) and sink.error is None
    finally:
        engine.stop()
    at = [i for i, entry in enumerate(seen) if entry[0] == "prefill" and entry[2] > 6]
    long_chunks = [seen[i] for i in at]
    if chunked:
        assert len(long_chunks) >= 4 and all(chunk <= 20 for _, _, chunk, _, _ in long_chunks)
        # with each chunk of the long prompt the running rows got a token: in the same forward
        # (ragged) or the next one
        assert all(seen[i + 1][0] == "decode" and seen[i + 1][1] >= 1 for i in at[:-1])
        assert all(seen[i + 1][4] == seen[i][4] + (0 if ragged else 1) for i in at[:-1])
    else:
        assert [chunk for _, _, chunk, _, _ in long_chunks] == [70]
    for (model, prompt, max_tokens), sink in zip([*short, long_job], sinks):
        assert sink.text == offline_text(model_dir, adapters.get(model), prompt, max_tokens)


def test_echo_logprobs_are_the_same_chunked_or_not(folders):
    """Prompt log-probabilities gathered chunk by chunk equal those of one whole-prompt forward,
    in ragged forwards and in separate prefill forwards."""
    entries = {}
    for chunked, ragged in ((True, True), (False, True), (True, False), (False, False)):
        engine = _engine(folders, max_num_batched_tokens=16, chunked_prefill=chunked)
        engine.ragged = ragged
        engine.start()
        got = []
        done = threading.Event()

        def sink(event, got=got, done=done):
            if isinstance(event, Exception):
                got.append(event)
                done.set()
                return
            got.extend(event.logprobs or [])
            if event.finish_reason:
                done.set()

        try:
            params = SamplingParams(max_tokens=2, temperature=0, logprobs=2, echo=True)
            engine.submit("tiny-llama", _prompt(5, 45), params, 1, sink)
            assert done.wait(TIMEOUT)
        finally:
            engine.stop()
        assert not any(isinstance(g, Exception) for g in got), got
        entries[chunked, ragged] = got
    reference = entries[False, False]
    assert len(reference) == 45 + 2
    for key, got in entries.items():
        assert len(got) == len(reference), key
        for (text_a, value_a, top_a), (text_b, value_b, top_b) in zip(got, reference):
            assert text_a == text_b
            assert (value_a is None) == (value_b is None)
            if value_a is not None:
                assert value_a == pytest.approx(value_b, abs=1e-5)
                assert top_a.keys() == top_b.keys()


def test_slots_move_one_row_on_retirement_not_the_batch():
    """16 rows of 40 tokens: a retirement copies the last row into the hole (one row's bytes), a
    decode step writes in place (no copy), and the data each row reads is what it wrote."""
    kv = SlotKV(max_rows=32, max_time=96)
    rows, heads, dim = 16, 2, 8
    kv.add(rows)
    kv.plan(rows, 64)
    with torch.inference_mode():
        keys = torch.randn(rows, heads, 40, dim)
        cache, mask, positions = kv.step(0, rows, 40, torch.float32, "cpu")
        for layer in range(2):
            cache.update(keys + layer, keys - layer, layer)
        kv.advance(0, [40] * rows)
        assert kv.bytes_copied == 0  # the first write allocated, nothing copied
        cache, mask, positions = kv.step(0, rows, 1, torch.float32, "cpu")
        assert positions[:, 0].tolist() == [40] * rows and mask.shape == (rows, 1, 1, 41)
        new = torch.randn(rows, heads, 1, dim)
        for layer in range(2):
            k, v = cache.update(new, new, layer)
            assert k.shape == (rows, heads, 41, dim) and k.data_ptr() == kv.keys[layer].data_ptr()
        kv.advance(0, [1] * rows)
        assert kv.bytes_copied == 0  # a decode step writes in place
    kv.move(rows - 1, 3)
    kv.pop()
    one_row = 2 * 2 * heads * 41 * dim * 4  # 2 layers x (keys, values) x 41 tokens, fp32
    assert kv.bytes_copied == one_row
    assert torch.equal(kv.keys[1][3, :, :40], keys[rows - 1] + 1)
    assert torch.equal(kv.keys[0][3, :, 40], new[rows - 1, :, 0])
    assert kv.lengths == [41] * (rows - 1)


def test_a_ragged_forward_gives_each_row_its_own_forward_logits(folders):
    """Two decoding rows (6 and 9 tokens cached) and two prefill chunks (a fresh prompt's first 5
    tokens, and tokens 4..10 of a prompt whose first 4 are cached) in ONE forward, in both batch
    layouts: every token's logits equal those of a plain forward over its own row's tokens (GQA:
    4 query heads on 2 key/value heads, folded, not repeated)."""
    from shirakit.serve.kv import RaggedStep, ragged_forward

    model_dir, _, _ = folders
    model, _ = load_tiny_lm(model_dir)
    seqs = [_prompt(s, n) for s, n in ((1, 7), (2, 10), (3, 5), (4, 11))]
    cached = [6, 9, 0, 4]  # rows 0, 1 decode their last token; rows 2, 3 prefill a chunk
    fed = [1, 1, 5, 7]
    with torch.inference_mode():
        plain = [model(input_ids=torch.tensor([s])).logits[0] for s in seqs]
        for shape in ("row", "column"):
            kv = SlotKV(max_rows=8, max_time=96)
            kv.add(4)
            kv.plan(4, 32)
            warm = RaggedStep(kv, 0, [(r, 0, cached[r]) for r in range(4) if cached[r]], "cpu")
            ids = [t for r in range(4) for t in seqs[r][: cached[r]]]
            with ragged_forward(model, warm):
                model(input_ids=torch.tensor([ids]), position_ids=warm.positions[None], past_key_values=warm)
            kv.advance(0, cached)
            step = RaggedStep(kv, 2, [(2, 0, 5), (3, 4, 7)], "cpu")
            ids = [t for r in range(4) for t in seqs[r][cached[r]: cached[r] + fed[r]]]
            view = (1, -1) if shape == "row" else (-1, 1)
            with ragged_forward(model, step):
                out = model(input_ids=torch.tensor(ids).view(view), position_ids=step.positions.view(view),
                            past_key_values=step).logits.reshape(len(ids), -1)
            assert model.config._attn_implementation != "shirakit_ragged"  # restored after the forward
            at = 0
            for r in range(4):
                expected = plain[r][cached[r]: cached[r] + fed[r]]
                torch.testing.assert_close(out[at: at + fed[r]], expected, rtol=1e-5, atol=1e-5)
                at += fed[r]


def test_fused_rms_norms_give_the_same_logits_and_only_replace_llamas_norm(folders):
    """The engine's CPU norms (``F.rms_norm`` in one call) leave a forward's logits bit-identical; a norm
    whose formula differs (another forward) keeps its own; half precision falls back to the class's
    forward; dropping them restores the class's forward."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from shirakit.serve.fused_norms import drop_fused_rms_norms, is_llama_rms_norm, use_fused_rms_norms

    model_dir, _, _ = folders
    model, _ = load_tiny_lm(model_dir)
    ids = torch.tensor([_prompt(1, 9)])
    with torch.inference_mode():
        before = model(input_ids=ids).logits
        norms = [m for m in model.modules() if isinstance(m, LlamaRMSNorm)]
        assert use_fused_rms_norms(model) == len(norms) > 2 and all("forward" in vars(m) for m in norms)
        assert torch.equal(model(input_ids=ids).logits, before)
        half = norms[0].to(torch.bfloat16)
        x = torch.randn(3, half.weight.shape[0], dtype=torch.bfloat16)
        assert torch.equal(half(x), LlamaRMSNorm.forward(half, x))
        drop_fused_rms_norms(model)
        assert not any("forward" in vars(m) for m in norms)

    class OnePlusWeight(LlamaRMSNorm):  # Gemma's formula: weight counts from 1
        def forward(self, hidden_states):
            return (1 + self.weight) * super().forward(hidden_states) / self.weight

    assert not is_llama_rms_norm(OnePlusWeight(8)) and is_llama_rms_norm(LlamaRMSNorm(8))
    assert not is_llama_rms_norm(torch.nn.LayerNorm(8))


def test_decode_attention_equals_scaled_dot_product_attention():
    """The decoding rows' attention (two batched products over the slot buffers' views, CPU float32)
    gives what scaled_dot_product_attention gives with the boolean mask: rows of different lengths
    (keys past a row's length hidden), grouped query heads folded into the query axis."""
    from shirakit.serve.kv import decode_attention

    torch.manual_seed(0)
    rows, kv_heads, groups, dim, capacity = 5, 2, 3, 16, 24
    keys_buffer, values_buffer = torch.randn(2, 8, kv_heads, capacity, dim).unbind(0)
    query = torch.randn(rows, kv_heads, groups, dim)
    lengths = torch.tensor([1, 7, 12, 3, 12])
    longest = int(lengths.max())
    mask = (torch.arange(longest)[None, :] < lengths[:, None])[:, None, None]
    bias = torch.zeros(mask.shape).masked_fill_(~mask, float("-inf"))
    key, value = keys_buffer[:rows, :, :longest], values_buffer[:rows, :, :longest]  # views, as the engine's
    got = decode_attention(query, key, value, bias, dim ** -0.5)
    expected = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # a hidden key changes nothing: row 0 sees only its first key, so its output is that key's value
    torch.testing.assert_close(got[0], value[0, :, :1].expand(kv_heads, groups, dim), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("arch", ["gpt2", "qwen2"])
def test_a_ragged_forward_on_other_architectures(arch):
    """GPT-2 (learned positions, no GQA) and Qwen2 (GQA, q/k/v biases): the same per-row logits."""
    from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

    from shirakit.serve.kv import RaggedStep, ragged_forward, supports_ragged

    torch.manual_seed(0)
    if arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=100, n_positions=96))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, vocab_size=100))
    model.eval()
    assert supports_ragged(model)
    seqs = [_prompt(s, n) for s, n in ((1, 7), (2, 10), (3, 5), (4, 11))]
    cached, fed = [6, 9, 0, 4], [1, 1, 5, 7]
    with torch.inference_mode():
        plain = [model(input_ids=torch.tensor([s])).logits[0] for s in seqs]
        kv = SlotKV(max_rows=8, max_time=96)
        kv.add(4)
        kv.plan(4, 32)
        warm = RaggedStep(kv, 0, [(r, 0, cached[r]) for r in range(4) if cached[r]], "cpu")
        with ragged_forward(model, warm):
            model(input_ids=torch.tensor([[t for r in range(4) for t in seqs[r][: cached[r]]]]),
                  position_ids=warm.positions[None], past_key_values=warm)
        kv.advance(0, cached)
        step = RaggedStep(kv, 2, [(2, 0, 5), (3, 4, 7)], "cpu")
        ids = [t for r in range(4) for t in seqs[r][cached[r]: cached[r] + fed[r]]]
        with ragged_forward(model, step):
            out = model(input_ids=torch.tensor([ids]), position_ids=step.positions[None],
                        past_key_values=step).logits[0]
        at = 0
        for r in range(4):
            torch.testing.assert_close(out[at: at + fed[r]], plain[r][cached[r]: cached[r] + fed[r]], rtol=1e-5,
                                       atol=1e-5)
            at += fed[r]


def test_chunks_are_sized_by_measured_time_while_rows_decode(folders):
    """With rows decoding, a long prompt's chunk makes an iteration cost at most 1 + chunk_slack
    decode steps (partial); a prompt costing at most CHUNK_BURST steps is short (whole): no prompt
    until a decode step is timed, then MIN_PREFILL_CHUNK until a prompt token is, then
    slack x t_decode / t_token (and burst x ...); a decode-only iteration again every
    REFRESH_DECODE_EVERY."""
    from shirakit.serve import engine as engine_module

    burst = engine_module.CHUNK_BURST
    engine = _engine(folders, max_num_batched_tokens=512, chunk_slack=0.5)
    assert engine._timed_budgets() == (0, 0)  # nothing measured: a decode-only iteration first
    engine._timed(16, 0, 0.200)  # a decode step of 16 rows: 200 ms
    assert engine._timed_budgets() == (engine_module.MIN_PREFILL_CHUNK,) * 2
    engine._timed(16, 16, 0.200 + 16 * 0.004)  # 16 prompt tokens beside it: 4 ms a token
    assert engine._timed_budgets() == (int(burst * 200 / 4), 25)  # 0.5 x 200 ms / 4 ms
    for _ in range(engine_module.REFRESH_DECODE_EVERY - 1):
        engine._timed(16, 25, 0.300)
    assert engine._timed_budgets() == (0, 0)
    engine._timed(16, 0, 0.100)  # the decode step got cheaper: smaller chunks
    whole, partial = engine._timed_budgets()
    assert 0 < partial < 25 and whole < burst * 200 / 4
    with pytest.raises(ValueError, match="chunk_slack must be a positive"):
        _engine(folders, chunk_slack=0)


@pytest.mark.parametrize("lengths, expected", [
    ([90, 90, 90, 300], [90, 90, 90]),  # short (<= 100 tokens each): in whole, together; the long one waits
    ([90] * 6, [90] * 5),  # ... within the iteration's token budget (512 - 2 decoding rows)
    ([300, 30], [25]),  # a long prompt first: a chunk of the partial budget, the rest wait
    ([5, 300], [5, 20]),  # a short prompt whole, then a chunk of what the partial budget leaves
    ([10, 300], [10]),  # ... unless that is under MIN_PREFILL_CHUNK (15 tokens)
])
def test_ragged_prefill_feeds_short_prompts_whole_and_long_ones_in_chunks(folders, lengths, expected):
    """Ragged forwards pack the prefilling rows in order, each its own count: a prompt that costs at
    most CHUNK_BURST decode steps goes in whole (it is not split into chunks that would each delay
    its first token by an iteration), several within the token budget; a longer one takes a chunk
    of the partial budget (>= MIN_PREFILL_CHUNK after others) and the rows after it wait."""
    from shirakit.serve import engine as engine_module

    engine = _engine(folders, max_num_batched_tokens=512, chunk_slack=0.5)
    assert engine.ragged and engine_module.CHUNK_BURST == 2.0
    params = SamplingParams(max_tokens=8, temperature=0)
    engine._running = [Sequence(f"d{i}", 0, BASE, _prompt(i, 4), params) for i in range(2)]
    engine._running += [Sequence(f"p{i}", 0, BASE, _prompt(9 + i, n), params) for i, n in enumerate(lengths)]
    for seq in engine._running[:2]:
        seq.cached = 4
    engine._decoding = 2
    engine._kv.add(len(engine._running))
    engine._kv.plan(len(engine._running), 400)
    engine._timed(2, 0, 0.200)
    engine._timed(2, 16, 0.200 + 16 * 0.004)  # 4 ms a token: partial 25 tokens, short up to 100
    group, fed = engine._prefill_group()
    assert fed == expected
    assert group == engine._running[2: 2 + len(expected)]


# ---- incremental detokenization ------------------------------------------------------------------
def _byte_fallback_tokenizer():
    """A Llama-style tokenizer: SentencePiece pieces with "▁" for spaces and <0xNN> byte-fallback
    tokens for anything else (multi-byte characters come out of several tokens)."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    pieces += ["▁", "▁the", "▁cat", "the", "é", "▁é", "▁.", "日", "本"]
    pieces += [c for c in "abcdefghijklmnopqrstuvwxyz.,"]  # ASCII as pieces: byte tokens only for the rest
    vocab = {p: i for i, p in enumerate(pieces)}
    model = models.BPE(vocab, [], unk_token="<unk>", byte_fallback=True)
    tok = Tokenizer(model)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _byte_level_tokenizer():
    """A GPT-2-style byte-level BPE: every byte is a token, a few merges; characters of 2-4 bytes
    are split across tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(alphabet))}
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def _stream_of(tokenizer, rng, length: int) -> list[int]:
    """The ids of random multi-byte text, some replaced by random other ids. Byte-fallback: never
    by a byte token (its decoder renders a whole run of byte tokens as replacement characters
    once one byte of it is wrong, earlier characters too, so no stream of it can be exact; a
    model emits byte tokens for whole characters). Byte-level: any id (its decoder is lossy per
    bad byte only)."""
    text = "".join(rng.choice(["é", "日本", "😀", " the", " cat", "a", ".", "ß", "€", " é"]) for _ in range(length))
    ids = tokenizer(text, add_special_tokens=False).input_ids
    byte_fallback = "<0x41>" in tokenizer.get_vocab()
    pieces = [i for i in range(len(tokenizer)) if not byte_fallback or "<0x" not in tokenizer.convert_ids_to_tokens(i)]
    return [t if rng.random() < 0.8 else rng.choice(pieces) for t in ids[:length]]


@pytest.mark.parametrize("make", [_byte_fallback_tokenizer, _byte_level_tokenizer])
def test_incremental_text_equals_the_full_decode(make):
    import random

    from shirakit.serve.sequence import Sequence

    tokenizer = make()
    rng = random.Random(0)
    byte_tokens = exact = 0
    for _ in range(150):
        stream = _stream_of(tokenizer, rng, rng.randrange(1, 40))
        seq = Sequence("r", 0, "base", [1], SamplingParams(max_tokens=len(stream), temperature=0))
        for i, token in enumerate(stream):
            seq.add(token, tokenizer, eos_ids=set())
            read = tokenizer.decode(stream[: seq.read], skip_special_tokens=True)
            if seq.finish_reason is None and "\ufffd" not in read:
                # the text of the tokens read; the rest waits for its character. (Where the tokens
                # read hold a broken character the decoder itself may rewrite earlier characters:
                # byte-fallback turns a whole run of byte tokens into replacement characters.)
                assert seq.text == read, stream[: i + 1]
                exact += 1
                pending = tokenizer.decode(stream[seq.read: i + 1], skip_special_tokens=True)
                assert seq.read == i + 1 or pending == "" or "\ufffd" in pending, (stream[: i + 1], pending)
        assert seq.finish_reason == "length"
        assert seq.text == tokenizer.decode(stream, skip_special_tokens=True), stream
        byte_tokens += sum(1 for t in stream if "<0x" in tokenizer.convert_ids_to_tokens(t) or
                           tokenizer.decode([t]).endswith("\ufffd"))
    assert byte_tokens > 100  # the streams did split characters across tokens
    assert exact > 500  # most steps checked exactly


def test_stop_strings_across_token_boundaries_and_eos():
    from shirakit.serve.sequence import Sequence

    tokenizer = _byte_fallback_tokenizer()
    ids = tokenizer("the cat. 日本the cat", add_special_tokens=False).input_ids
    for stop, expected in ((("t.",), "the ca"), (("本t",), "the cat. 日"), (("日",), "the cat. ")):
        seq = Sequence("r", 0, "base", [1], SamplingParams(max_tokens=50, temperature=0, stop=stop))
        for token in ids:
            seq.add(token, tokenizer, eos_ids={2})
            if seq.finish_reason:
                break
        assert (seq.text, seq.finish_reason) == (expected, "stop"), stop
    seq = Sequence("r", 0, "base", [1], SamplingParams(max_tokens=50, temperature=0))
    japanese = tokenizer("日", add_special_tokens=False).input_ids
    for token in japanese[:-1] + [2]:  # the end of text in the middle of a character: flushed
        seq.add(token, tokenizer, eos_ids={2})
    assert seq.finish_reason == "stop" and seq.text == tokenizer.decode(japanese[:-1])


# ---- batched sampling ------------------------------------------------------------------------------
def _texts(engine: Engine, jobs: list[tuple[list[int], SamplingParams, int]]) -> list[list[str]]:
    """Submit every job at once (so they share batches); the text of each choice."""
    sinks = []
    for prompt, params, n in jobs:
        texts, done, errors = [""] * n, threading.Event(), []
        left = [n]

        def sink(event, texts=texts, done=done, errors=errors, left=left):
            if isinstance(event, Exception):
                errors.append(event)
                done.set()
                return
            texts[event.index] += event.text
            if event.finish_reason:
                left[0] -= 1
                if not left[0]:
                    done.set()

        engine.submit("tiny-llama", prompt, params, n, sink)
        sinks.append((texts, done, errors))
    for _, done, errors in sinks:
        assert done.wait(TIMEOUT) and not errors, errors
    return [texts for texts, _, _ in sinks]


def test_seeded_sampling_is_the_same_alone_and_in_a_batch(folders):
    """Temperature, top_p, seed, logit_bias and penalties per row, sampled in one batched pass:
    each seeded request gives the text it gives alone, whatever shares its batch."""
    seeded = [
        (_prompt(1, 8), SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, seed=5), 2),
        (_prompt(2, 5), SamplingParams(max_tokens=12, temperature=1.3, seed=11, logit_bias=((7, 3.0),),
                                       frequency_penalty=0.5), 1),
        (_prompt(3, 9), SamplingParams(max_tokens=12, temperature=0.5, top_p=0.3, seed=2**63 - 1, logprobs=2), 1),
    ]
    others = [(_prompt(10 + i, 4 + i), SamplingParams(max_tokens=12, temperature=[0.0, 1.0, 0.7][i % 3],
                                                      top_p=[1.0, 0.5, 0.95][i % 3]), 1) for i in range(5)]
    engine = _engine(folders).start()
    try:
        alone = [_texts(engine, [job])[0] for job in seeded]
        together = _texts(engine, [*others[:3], *seeded, *others[3:]])[3:6]
        again = _texts(engine, [*seeded, *others])[:3]
    finally:
        engine.stop()
    assert together == alone and again == alone
    assert alone[0][0] != alone[0][1]  # choice 1 draws with seed + 1
    assert len({t for texts in alone for t in texts}) == 4


# ---- top_k ----------------------------------------------------------------------------------------
def test_top_k_keeps_the_k_most_probable_then_top_p_renormalized_per_row():
    """sampling_probs: a top_k row keeps its k most probable tokens renormalized; with top_p too,
    the nucleus is taken of that renormalized distribution (vLLM's order); a row without either
    is the plain softmax, bit for bit, whatever shares its batch."""
    from shirakit.serve.sequence import Sequence, sampling_probs

    torch.manual_seed(0)
    logits = torch.randn(4, 50) * 3
    params = [SamplingParams(max_tokens=1, temperature=0.7, top_k=5),
              SamplingParams(max_tokens=1, temperature=1.0, top_k=8, top_p=0.6),
              SamplingParams(max_tokens=1, temperature=1.2),
              SamplingParams(max_tokens=1, temperature=1.0, top_k=500)]  # k >= vocab: off
    seqs = [Sequence("r", 0, "base", [1], p) for p in params]
    probs = sampling_probs(logits, seqs)
    soft = [torch.softmax(logits[i] / p.temperature, -1) for i, p in enumerate(params)]
    top5 = soft[0].topk(5).indices
    assert set(probs[0].nonzero().flatten().tolist()) == set(top5.tolist())
    torch.testing.assert_close(probs[0][top5], soft[0][top5] / soft[0][top5].sum())
    values, order = soft[1].topk(8)
    renormalized = values / values.sum()
    count = int((renormalized.cumsum(0) - renormalized < 0.6).sum())  # smallest prefix reaching 0.6
    assert set(probs[1].nonzero().flatten().tolist()) == set(order[:count].tolist())
    assert torch.equal(probs[2], soft[2]) and torch.equal(probs[3], soft[3])
    assert torch.equal(sampling_probs(logits[2:3], seqs[2:3])[0], probs[2])


def test_seeded_top_k_is_the_same_alone_and_in_a_batch(folders):
    job = (_prompt(4, 7), SamplingParams(max_tokens=12, temperature=1.0, top_k=3, seed=9), 1)
    others = [(_prompt(20 + i, 5), SamplingParams(max_tokens=12, temperature=1.0, top_k=[0, 2, 40][i], seed=i), 1)
              for i in range(3)]
    engine = _engine(folders).start()
    try:
        alone = _texts(engine, [job])[0]
        together = _texts(engine, [others[0], job, *others[1:]])[1]
    finally:
        engine.stop()
    assert together == alone


def test_top_k_over_http_completions_and_chat(folders):
    """top_k 1 samples the argmax (the greedy text); -1 and 0 are off (the seed's text without
    top_k); anything else that is not an integer >= -1 is a 400 naming top_k, on both endpoints."""
    model_dir, _, _ = folders
    running = start_server(_engine(folders), policy=Policy())
    prompt = _prompt(6, 8)
    try:
        with httpx.Client(base_url=running.url, timeout=TIMEOUT) as http:
            def text(**extra):
                body = {"model": "tiny-llama", "prompt": [prompt], "max_tokens": 10, "temperature": 1.0, "seed": 3,
                        **extra}
                response = http.post("/v1/completions", json=body)
                assert response.status_code == 200, response.text
                return response.json()["choices"][0]["text"]

            assert text(top_k=1) == offline_text(model_dir, None, prompt, 10)
            assert text(top_k=-1) == text(top_k=0) == text()
            for bad in (-2, 1.5, "3", True, 2**40):
                for path, body in (("/v1/completions", {"prompt": "x"}),
                                   ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})):
                    response = http.post(path, json={"model": "tiny-llama", "top_k": bad, **body})
                    assert response.status_code == 400, (bad, path, response.text)
                    error = response.json()["error"]
                    assert error["param"] == "top_k" and "top_k must be an integer" in error["message"], error
            response = http.post("/v1/chat/completions", json={
                "model": "tiny-llama", "messages": [{"role": "user", "content": "x"}], "top_k": 2, "seed": 1,
                "max_tokens": 4})
            assert response.status_code == 200, response.text
    finally:
        running.stop()
