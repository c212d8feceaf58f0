"""SHiRA on one GPU, in bf16: train step, switch, mixed batches and serving, in one short run.

    python benchmarks/gpu.py                              # CUDA, Llama-3.2-1B/3B shapes (< 8 min, one GPU)
    python benchmarks/gpu.py --device cpu --small         # tiny shapes on CPU: proves it runs (~1 min)
    python benchmarks/gpu.py --write-docs docs/benchmarks.md

Models are built from the published Llama-3.2-1B and -3B configs (hidden 2048/3072, intermediate
8192, 16/28 layers, 32/24 heads, 8 KV heads, vocab 128256, tied embeddings) with random weights,
on the device, in bf16: nothing is downloaded. ``--small`` shrinks them to a few layers of width
64-128 with the same structure. Adapters target all seven projections of every layer, rank ``--r``
for LoRA and SHiRA alike (SHiRA's K = r (m + n) values per layer: the same trainable parameters).

Sections (each a set of rows of one table; ratios are taken between rows of this run):

1. **train step**, batch ``--batch`` x ``--seq`` tokens, AdamW, loss = LM cross-entropy: the frozen
   base (no adapter, a forward and backward of the input only), shirakit SHiRA, shirakit LoRA,
   PEFT SHiRA and PEFT LoRA (the anchor, side by side). Median of ``--steps`` steps after
   ``--warmup``; peak ``torch.cuda.max_memory_allocated`` over the timed steps (CUDA only).
2. **switch** on the 3B shape: shirakit's ``switch_adapter`` between two SHiRA adapters (scatter,
   bit-exact), against PEFT LoRA ``unmerge_adapter`` + ``merge_adapter`` of the other one.
3. **mixed batch** on the 1B shape, shirakit SHiRA, inference: 16 rows, each its own adapter of 16
   (``route``), against the same 16 rows on one adapter held in the weights; prefill (``--prefill``
   tokens a row) and decode (one token a row after that prefill, KV cache kept).
4. **serve**: shirakit's continuous-batching engine in-process (no HTTP) on the 1B shape, 32 requests
   of ``--gen`` tokens, greedy, spread over 1, 16 and 100 adapters (``--max-loaded 16``: the 100
   row loads adapters from disk as it goes). Generated tokens per second.

Timing: every timed call ends with ``torch.cuda.synchronize()`` on CUDA, and the clock is read
after it. This script has not been run on a GPU yet (no GPU was lent to this project when it was
written): its CUDA branches were reviewed, not executed; docs/benchmarks.md says so.
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import command_line, machine_facts, publish, table  # noqa: E402

BEGIN, END = "<!-- gpu.py:begin -->", "<!-- gpu.py:end -->"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# From the published config.json of meta-llama/Llama-3.2-1B and -3B (rope scaling left out: it does
# not change a step's cost).
SHAPES = {
    "1B": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, head_dim=64, vocab_size=128256),
    "3B": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
               num_key_value_heads=8, head_dim=128, vocab_size=128256),
}
SMALL = {
    "1B": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, vocab_size=512),
    "3B": dict(hidden_size=96, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=24, vocab_size=512),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    p.add_argument("--small", action="store_true", help="tiny shapes and sizes (CPU smoke run)")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"],
                   help="default bf16 on CUDA, fp32 on CPU (the CPU smoke run checks that it runs, and CPU "
                        "routing in bf16 takes torch's CSR product with fp32 copies: slow)")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--batch", type=int, default=None, help="default 4 (--small 2)")
    p.add_argument("--seq", type=int, default=None, help="default 512 (--small 32)")
    p.add_argument("--steps", type=int, default=None, help="timed steps a row, default 7 (--small 3)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--prefill", type=int, default=None, help="prefill tokens a row, default 256 (--small 16)")
    p.add_argument("--gen", type=int, default=None, help="serve: tokens a request, default 64 (--small 8)")
    p.add_argument("--sections", default="train,switch,mixed,serve")
    p.add_argument("--no-peft", action="store_true", help="leave out PEFT's rows")
    p.add_argument("--write-docs", type=Path, default=None)
    args = p.parse_args(argv)
    small = args.small
    for name, full, tiny in (("batch", 4, 2), ("seq", 512, 32), ("steps", 7, 3), ("prefill", 256, 16), ("gen", 64, 8)):
        if getattr(args, name) is None:
            setattr(args, name, tiny if small else full)
    if args.dtype is None:
        args.dtype = "fp32" if args.device == "cpu" else "bf16"
    args.torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    args.dev = torch.device(args.device)
    if args.dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: torch {torch.__version__} sees no CUDA device "
                         "(try --device cpu --small)")
    return args


# ---- helpers ----------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def fresh_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> str:
    return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f}" if device.type == "cuda" else "n/a"


def build_model(args, shape: str) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    dims = (SMALL if args.small else SHAPES)[shape]
    cfg = LlamaConfig(**dims, max_position_embeddings=4096, tie_word_embeddings=True, rms_norm_eps=1e-5,
                      rope_theta=500000.0)
    torch.manual_seed(0)
    with torch.device(args.dev):  # random init on the device itself (a 3B init on CPU takes minutes)
        model = LlamaForCausalLM(cfg)
    return model.to(args.torch_dtype)


def add_adapter(model, library: str, method: str, r: int, name: str = "default", seed: int = 0):
    if library == "shirakit":
        import shirakit

        config = (shirakit.ShiraConfig(r=r, target_modules=TARGETS, random_seed=seed, init_weights=False)
                  if method == "shira" else
                  shirakit.LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, init_lora_weights=False))
        shirakit.inject(model, config, name)
        return model
    import peft

    config = (peft.ShiraConfig(r=r, target_modules=TARGETS, random_seed=seed, init_weights=False)
              if method == "shira" else
              peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, init_lora_weights=False))
    if isinstance(model, peft.PeftModel):
        model.add_adapter(name, config)
        return model
    return peft.get_peft_model(model, config, adapter_name=name)


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---- 1. train step ----------------------------------------------------------------------------
def train_rows(args) -> list[list[str]]:
    rows = []
    variants = [("frozen base", None, None), ("shirakit SHiRA", "shirakit", "shira"),
                ("shirakit LoRA", "shirakit", "lora")]
    if not args.no_peft:
        variants += [("PEFT SHiRA", "peft", "shira"), ("PEFT LoRA", "peft", "lora")]
    for shape in ("1B", "3B"):
        times, measured = {}, []
        for label, library, method in variants:
            fresh_memory(args.dev)
            model = build_model(args, shape)
            if library is None:
                model.requires_grad_(False)
            else:
                model = add_adapter(model, library, method, args.r)
            model.train()
            params = [p for p in model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(params, lr=1e-5) if params else None
            vocab = model.config.vocab_size
            ids = torch.randint(vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1)).to(args.dev)
            embed = model.get_input_embeddings()
            if optimizer is None:  # the frozen base still backpropagates to its input, as a trained one does
                embed.register_forward_hook(lambda m, i, o: o.requires_grad_(True))

            def step(model=model, ids=ids, optimizer=optimizer):
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                if optimizer is not None:
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)

            for _ in range(args.warmup):
                step()
            fresh_memory(args.dev)
            samples = [timed(step, args.dev) for _ in range(args.steps)]
            times[label] = statistics.median(samples)
            measured.append((label, peak_gib(args.dev), trainable(model)))
            del model, optimizer, params, step, embed
            fresh_memory(args.dev)
        anchor = times.get("shirakit LoRA")  # every row's ratio, the rows run before it too
        for label, memory, count in measured:
            ratio = f"{times[label] / anchor:.2f}" if anchor and label != "shirakit LoRA" else ""
            rows.append([f"train step, {shape}", label, f"{times[label] * 1e3:.1f} ms", ratio, memory,
                         f"{count / 1e6:.2f} M"])
        peft_lora = times.get("PEFT LoRA")
        if peft_lora:
            rows.append([f"train step, {shape}", "shirakit SHiRA / PEFT LoRA", "",
                         f"{times['shirakit SHiRA'] / peft_lora:.2f}", "", ""])
    return rows


# ---- 2. switch ---------------------------------------------------------------------------------
def switch_rows(args) -> list[list[str]]:
    from shirakit.model.switch import switch_adapter

    rows = []
    fresh_memory(args.dev)
    model = build_model(args, "3B")
    for i, name in enumerate("ab"):
        add_adapter(model, "shirakit", "shira", args.r, name, seed=i)
    model.eval()
    with torch.no_grad():
        switch_adapter(model, "a")
        switch_adapter(model, "b")
        samples = []
        for i in range(args.steps * 2):
            samples.append(timed(lambda i=i: switch_adapter(model, "ab"[i % 2]), args.dev))
        switch_adapter(model, None)
    sk = statistics.median(samples)
    rows.append(["switch, 3B", "shirakit SHiRA switch_adapter", f"{sk * 1e3:.1f} ms", "", "", ""])
    del model
    if not args.no_peft:
        fresh_memory(args.dev)
        model = build_model(args, "3B")
        for i, name in enumerate("ab"):
            model = add_adapter(model, "peft", "lora", args.r, name, seed=i)
        model.eval()
        with torch.no_grad():
            base = model.base_model
            base.merge_adapter(["a"])

            def peft_switch(new):
                base.unmerge_adapter()
                base.merge_adapter([new])

            peft_switch("b")
            samples = [timed(lambda i=i: peft_switch("ab"[i % 2]), args.dev) for i in range(args.steps * 2)]
        pl = statistics.median(samples)
        rows.append(["switch, 3B", "PEFT LoRA unmerge + merge", f"{pl * 1e3:.1f} ms", f"{sk / pl:.2f}", "", ""])
        del model
    fresh_memory(args.dev)
    return rows


# ---- 3. mixed batch ----------------------------------------------------------------------------
def mixed_rows(args) -> list[list[str]]:
    import shirakit
    from shirakit.model.routing import route

    fresh_memory(args.dev)
    model = build_model(args, "1B")
    names = [f"a{i}" for i in range(16)]
    for i, name in enumerate(names):
        add_adapter(model, "shirakit", "shira", args.r, name, seed=i)
    model.eval()
    vocab = model.config.vocab_size
    ids = torch.randint(vocab, (16, args.prefill), generator=torch.Generator().manual_seed(2)).to(args.dev)
    nxt = torch.randint(vocab, (16, 1), generator=torch.Generator().manual_seed(3)).to(args.dev)
    results = {}
    with torch.no_grad():
        for label in ("1 adapter", "16 adapters"):
            if label == "1 adapter":
                shirakit.set_adapter(model, names[0])

            def forward(x, cache=None, model=model, routed=label == "16 adapters"):
                if routed:
                    with route(model, names):
                        return model(input_ids=x, past_key_values=cache, use_cache=True)
                return model(input_ids=x, past_key_values=cache, use_cache=True)

            forward(ids)  # warm-up
            prefill = [timed(lambda f=forward: f(ids), args.dev) for _ in range(args.steps)]
            out = forward(ids)
            cache = out.past_key_values
            decode = []
            for _ in range(args.steps + 1):
                # the cache grows a token a call
                decode.append(timed(lambda f=forward, c=cache: f(nxt, c), args.dev))
            results[label] = (statistics.median(prefill), statistics.median(decode[1:]))
            del forward, out, cache
    del model
    fresh_memory(args.dev)
    rows = []
    for i, phase in enumerate(("prefill", "decode")):
        one, many = results["1 adapter"][i], results["16 adapters"][i]
        rows.append([f"mixed batch, 1B, {phase}", "16 rows, 1 adapter (in the weights)", f"{one * 1e3:.1f} ms",
                     "", "", ""])
        rows.append([f"mixed batch, 1B, {phase}", "16 rows, 16 adapters (routed)", f"{many * 1e3:.1f} ms",
                     f"{many / one:.2f}", "", ""])
    return rows


# ---- 4. serve ----------------------------------------------------------------------------------
def _tokenizer(vocab: int):
    """A word-level tokenizer over ``vocab`` made-up words (no download); ids decode to text."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {f"w{i}": i for i in range(vocab - 3)}
    words.update({"<unk>": vocab - 3, "<pad>": vocab - 2, "</s>": vocab - 1})
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


def serve_rows(args) -> list[list[str]]:
    import shirakit
    from shirakit.serve.engine import Engine
    from shirakit.serve.sequence import SamplingParams

    rows = []
    fresh_memory(args.dev)
    model = build_model(args, "1B")
    vocab = model.config.vocab_size
    with tempfile.TemporaryDirectory(prefix="shirakit-gpu-bench-") as tmp:
        folders = {}
        for i in range(100):
            name = f"s{i:03d}"
            add_adapter(model, "shirakit", "shira", 8, name, seed=i)
            folders[name] = shirakit.save_adapter(model, Path(tmp) / name, name, compact=True)
            shirakit.delete_adapter(model, name)
        tokenizer = _tokenizer(vocab)
        requests = 32
        for count in (1, 16, 100):
            served = {n: Path(folders[n]) for n in list(folders)[:count]}
            engine = Engine(copy.deepcopy(model), tokenizer, "base", served,
                            max_loaded=16, max_batch=32).start()
            try:
                params = SamplingParams(max_tokens=args.gen, temperature=0.0)
                prompt = list(range(1, 33))

                def run_all(n_requests, engine=engine, count=count, params=params, prompt=prompt):
                    done = threading.Semaphore(0)
                    produced = [0]
                    errors = []

                    def sink(event):
                        if isinstance(event, Exception):
                            errors.append(event)
                            done.release()
                        elif event.finish_reason is not None:
                            produced[0] += event.completion_tokens
                            done.release()

                    names = list(folders)[:count]
                    for j in range(n_requests):
                        engine.submit(names[j % count], prompt, params, 1, sink)
                    for _ in range(n_requests):
                        if not done.acquire(timeout=600):
                            raise RuntimeError("serve: a request did not finish within 600 s")
                    if errors:
                        raise errors[0]
                    return produced[0]

                run_all(4)  # warm-up
                sync(args.dev)
                start = time.perf_counter()
                tokens = run_all(requests)
                sync(args.dev)
                wall = time.perf_counter() - start
            finally:
                engine.stop()
            rows.append([f"serve, 1B, {requests} requests", f"{count} adapter{'s' * (count > 1)}",
                         f"{tokens / wall:.0f} tok/s", "", "", ""])
    del model
    fresh_memory(args.dev)
    return rows


def main(argv=None) -> None:
    args = parse_args(argv)
    sections = set(args.sections.split(","))
    unknown = sections - {"train", "switch", "mixed", "serve"}
    if unknown:
        raise SystemExit(f"--sections: unknown {sorted(unknown)}; expected some of train,switch,mixed,serve")
    started = time.perf_counter()
    rows = []
    for name, fn in (("train", train_rows), ("switch", switch_rows), ("mixed", mixed_rows), ("serve", serve_rows)):
        if name in sections:
            t0 = time.perf_counter()
            rows += fn(args)
            print(f"[gpu.py] {name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    device_name = torch.cuda.get_device_name(args.dev) if args.dev.type == "cuda" else "CPU"
    facts = machine_facts(f"device {args.device} ({device_name}), {args.dtype}")
    header = ["what", "row", "time (median)", "ratio", "peak GiB", "trainable"]
    body = "\n".join([
        "## GPU: train step, switch, mixed batch, serve (benchmarks/gpu.py)",
        "",
        f"`{command_line('benchmarks/gpu.py', argv)}`, {facts['date']}; {facts['machine']}; {facts['software']}.",
        f"Shapes: {'--small (tiny) versions of ' if args.small else ''}Llama-3.2-1B/3B, random weights, r = {args.r}, "
        f"all seven projections; train batch {args.batch} x {args.seq}; {args.steps} timed steps a row. "
        "Ratios: train rows / shirakit LoRA; switch: shirakit / PEFT LoRA; mixed: 16 adapters / 1. "
        f"Total {time.perf_counter() - started:.0f} s.",
        "",
        table(header, rows),
    ])
    publish(body, args.write_docs, BEGIN, END)


if __name__ == "__main__":
    main()
