"""Mixed-adapter batches: 16 rows over 4 adapters vs the same 16 rows with one adapter.

    python benchmarks/mixed_batch.py                      # the full benchmark (~10-15 min on 2 busy cores)
    python benchmarks/mixed_batch.py --quick              # tiny model, one process: a < 30 s smoke test
    python benchmarks/mixed_batch.py --write-docs docs/benchmarks.md   # also update the docs section

Model: a Llama-shaped causal LM from ``transformers.LlamaConfig`` with random weights, fp32, on
CPU (full size: hidden 1024, intermediate 2816, 2 layers, 16 heads, vocab 8192). Every adapter
targets all seven projections (q, k, v, o, gate, up, down). Rows (methods):

- shirakit SHiRA r=32 (``init_weights=False``: random values), LoRA r=32 alpha=64
  (``init_lora_weights=False``), VeRA r=256 (``init_weights=False``), MiSS r=64 balance mode
  (``init_weights=False``: random block); ``--methods miss-bat`` adds MiSS r=64 "bat" (random block);
- peft LoRA r=32 alpha=64 (``init_lora_weights=False``; ``peft.get_peft_model`` + ``add_adapter``);
- the bare transformers model, no adapter library, for scale.

Four adapters ``a0..a3`` per model; the mixed batch gives row i adapter ``a{i % 4}`` (4 rows each,
interleaved). shirakit: ``with shirakit.route(model, names): model(...)``; peft:
``model(..., adapter_names=names)``. The single-adapter run is the same 16 rows as a plain forward
with ``a0`` active and unmerged (shirakit: ``set_adapter``; peft: ``model.set_adapter``). Everything
runs in eval mode under ``torch.inference_mode()``.

Workloads:
- prefill: one forward of 16 x 128 tokens with ``logits_to_keep=1`` (what ``generate`` does in its
  prefill: only the last position's logits), so the unadapted 8192-wide LM head on all 2048
  positions does not dilute the adapters' cost;
- decode: one forward of 16 x 1 new tokens on top of a 128-token KV cache (one greedy decoding
  step). The cache comes from an untimed prefill of the same mode and is ``copy.deepcopy``-ed
  (untimed) before every timed step, so every step sees the same 128-token cache.

Timing: the process CPU time (``time.process_time``) and the wall time (``time.perf_counter``) of
each forward. With one torch thread the CPU time is the work done; the wall time also counts the
time the scheduler gave the core to other processes, which on a busy shared machine varies by 2x
from call to call while the CPU time varies by a few percent. Ratios are taken on the CPU time (the
wall-time ratio is shown beside it). Single and mixed run on two copies of the same model (same
seed: the same base weights and adapters; checked equal on a single forward), so the single copy
keeps ``a0`` in its weight and never pays a switch back from a mixed batch, and the mixed copy
never pays one either. The two modes alternate step by step -- ``--prefill-steps`` /
``--decode-steps`` pairs, the order within a pair flipping every pair -- after ``--warmup``
untimed pairs, with the same inputs (and, for decode, fresh deep copies of caches made from the
same prompt) for both: drifting load on the shared machine then hits both modes alike, step for
step, instead of one block more than the other. The table gives the medians of all timed forwards
per mode, ratio = median mixed / median single, and the quartiles of the per-pair ratios (the
noise); the target is mixed <= 1.5 x single. For shirakit SHiRA, one untimed mixed step per
workload counts the groups that went through the grouped kernel (``grouped.add_grouped``), so the
table shows that the mixed path measured is the one meant. Each row runs in a fresh Python process
(``--worker``; ``--quick`` runs all rows in this process), so no row sees another's memory.

Threads: 1 torch thread per worker by default (``--threads``). On this shared 2-core machine other
processes keep the cores busy; with 2 threads every OpenMP parallel region waits for a sibling
thread the kernel has descheduled, which turns microsecond ops into milliseconds (measured: a
122,880-float ``mul`` 0.016 ms with 1 thread, 16-24 ms with 2 threads under load 9). That penalty
falls on many small ops, i.e. on exactly the routing bookkeeping this benchmark measures.

Correctness (asserted, before the timing): row i of the mixed output equals row i run alone with
its adapter (``set_adapter`` + a batch of one), max |difference| <= 1e-4 on the full prefill logits
(all 128 positions) and on the decode step's logits (mixed prefill + mixed step vs row-alone
prefill + step). shirakit also checks that the ``adapter_names=`` keyword gives the route() output,
and every method reports how much its adapters move the logits (so the check is not vacuous).

Crossover (shirakit SHiRA only): ``AdapterLinear.routed_forward`` asks each SHiRA group's cost
model (``InWeightAdapter.prefers_weight``: the layer's m, n, K and the group's tokens) whether to
run the group on the weight with its values scattered in or through the sparse product. With
``prefers_weight`` patched to always answer True (scatter) or False (sparse), one layer's routed
forward is timed over token counts, (a) for one group holding all rows and (b) for 4 groups of that
many tokens each (4 adapters, as in a mixed batch: there the scatter path also splits the base
product into one product per group), on each of the model's three layer shapes, by CPU time; the
report gives, per shape, the measured crossover, the model's, and what the model's choices cost
over the faster path (default T: 1, 4, 16, ..., 1024).

Width axis (``--widths``, default 512x1376, 768x2048, 1024x2816; ``--width-methods``, default
shira): the prefill and decode workloads again on a model of each width (64-dim heads,
``--width-seq`` = 64 tokens per row), reported as mixed / single per width against issue 13's
target of 1.3.

``--write-docs FILE`` writes the tables, with date, machine and the exact command, into FILE between
``<!-- mixed_batch:begin -->`` and ``<!-- mixed_batch:end -->`` (the rest of FILE is left alone).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import gc
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BEGIN, END = "<!-- mixed_batch:begin -->", "<!-- mixed_batch:end -->"
from _report import (  # noqa: E402
    add_preset_args,
    apply_presets,
    command_line,
    emit,
    flags,
    machine_facts,
    publish,
    run_worker_process,
    table,
)

ATOL = 1e-4
N_ADAPTERS = 4
TARGET_RATIO = 1.5
WIDTH_TARGET = 1.3  # issue 13: 4 SHiRA adapters / one, at every width

PRESETS = {
    "full": dict(hidden=1024, intermediate=2816, layers=2, heads=16, vocab=8192, rows=16, seq=128,
                 prefill_steps=8, decode_steps=40, warmup=2,
                 tokens="1,4,16,32,64,128,256,512,1024", threads=1,
                 widths="512x1376,768x2048,1024x2816", width_seq=64),
    "quick": dict(hidden=128, intermediate=352, layers=2, heads=4, vocab=512, rows=16, seq=16,
                  prefill_steps=2, decode_steps=3, warmup=1, tokens="1,64", threads=1,
                  widths="64x176", width_seq=16),
}

METHODS = {  # key -> (library, label)
    "base": ("none", "base model, no adapter"),
    "shira": ("shirakit", "shirakit SHiRA r=32"),
    "lora": ("shirakit", "shirakit LoRA r=32"),
    "vera": ("shirakit", "shirakit VeRA r=256"),
    "miss": ("shirakit", "shirakit MiSS r=64 (balance)"),
    "miss-bat": ("shirakit", "shirakit MiSS r=64 (bat)"),
    "peft-lora": ("peft", "peft LoRA r=32"),
}
DEFAULT_METHODS = ["base", "shira", "lora", "vera", "miss", "peft-lora"]


# ---- arguments ------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny model, one round, all rows in this process (smoke test)")
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=None,
                   help=f"rows to run (default: {' '.join(DEFAULT_METHODS)})")
    p.add_argument("--skip-crossover", action="store_true", help="skip the SHiRA sparse/scatter crossover")
    p.add_argument("--width-methods", nargs="*", choices=list(METHODS), default=["shira"],
                   help="rows of the width axis, run at every --widths (default: shira; none: skip it)")
    p.add_argument("--in-process", action="store_true", help="run every row in this process (default with --quick)")
    p.add_argument("--write-docs", type=Path, default=None, metavar="FILE",
                   help="write the results section into FILE between the mixed_batch markers")
    p.add_argument("--seed", type=int, default=0)
    add_preset_args(p, PRESETS)
    # internal: run one row (or the crossover) in this process and print it as JSON
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    apply_presets(args, PRESETS)
    try:
        args.width_list = [tuple(int(v) for v in w.split("x")) for w in str(args.widths).split(",") if w.strip()]
    except ValueError:
        p.error(f"--widths: expected HIDDENxINTERMEDIATE[,...], e.g. 512x1376; found {args.widths!r}")
    if any(len(w) != 2 or w[0] % 64 for w in args.width_list):
        p.error(f"--widths: expected HIDDENxINTERMEDIATE pairs with hidden a multiple of 64; found {args.widths!r}")
    if args.methods is None:
        args.methods = list(DEFAULT_METHODS)
    args.token_counts = [int(t) for t in str(args.tokens).split(",") if t.strip()]
    if args.rows % N_ADAPTERS:
        p.error(f"--rows must be a multiple of {N_ADAPTERS}")
    if min(args.prefill_steps, args.decode_steps, args.threads) < 1 or args.warmup < 0:
        p.error("--prefill-steps, --decode-steps and --threads must be >= 1, --warmup >= 0")
    return args


def worker_argv(args: argparse.Namespace) -> list[str]:
    return flags(args, [*PRESETS["full"], "seed"]) + (["--quick"] if args.quick else [])


# ---- models ---------------------------------------------------------------------------------
def build_model(args: argparse.Namespace) -> torch.nn.Module:
    import transformers

    config = transformers.LlamaConfig(
        hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.heads, vocab_size=args.vocab,
        max_position_embeddings=max(512, 2 * args.seq),
    )
    torch.manual_seed(args.seed)  # the same base weights in every worker
    return transformers.LlamaForCausalLM(config).eval()


def shirakit_config(method: str):
    import shirakit

    if method == "shira":
        return shirakit.ShiraConfig(r=32, target_modules=TARGETS, init_weights=False)
    if method == "lora":
        return shirakit.LoraConfig(r=32, lora_alpha=64, target_modules=TARGETS, init_lora_weights=False)
    if method == "vera":
        return shirakit.VeraConfig(r=256, target_modules=TARGETS, init_weights=False)
    if method == "miss":
        return shirakit.MissConfig(r=64, target_modules=TARGETS, init_weights=False)
    if method == "miss-bat":
        return shirakit.MissConfig(r=64, target_modules=TARGETS, init_weights="bat", init_random=True)
    raise ValueError(method)


class Runner:
    """One model with ``N_ADAPTERS`` adapters and the library's ways to run single and mixed."""

    def __init__(self, args: argparse.Namespace, method: str) -> None:
        self.method = method
        self.library = METHODS[method][0]
        self.adapters = [f"a{i}" for i in range(N_ADAPTERS)]
        self.names = [self.adapters[i % N_ADAPTERS] for i in range(args.rows)]
        model = build_model(args)
        if self.library == "shirakit":
            import shirakit

            for i, name in enumerate(self.adapters):
                torch.manual_seed(args.seed + 100 + i)  # each adapter its own masks and values
                shirakit.inject(model, shirakit_config(method), name)
        elif self.library == "peft":
            import peft

            def config():
                return peft.LoraConfig(r=32, lora_alpha=64, target_modules=TARGETS, init_lora_weights=False)

            torch.manual_seed(args.seed + 100)
            model = peft.get_peft_model(model, config(), adapter_name=self.adapters[0])
            for i, name in enumerate(self.adapters[1:], start=1):
                torch.manual_seed(args.seed + 100 + i)
                model.add_adapter(name, config())
        self.model = model.eval()

    @property
    def has_adapters(self) -> bool:
        return self.library != "none"

    def activate(self, name: str) -> None:
        """Make ``name`` the one active adapter (unmerged)."""
        if self.library == "shirakit":
            import shirakit

            shirakit.set_adapter(self.model, name)
        elif self.library == "peft":
            self.model.set_adapter(name)

    def disabled(self):
        if self.library == "shirakit":
            import shirakit

            return shirakit.disable_adapters(self.model)
        if self.library == "peft":
            return self.model.disable_adapter()
        return contextlib.nullcontext()

    def single(self, **kwargs):
        return self.model(**kwargs)

    def mixed(self, names: list[str] | None = None, **kwargs):
        names = self.names if names is None else names
        if self.library == "shirakit":
            from shirakit.model.routing import route

            with route(self.model, names):
                return self.model(**kwargs)
        return self.model(**kwargs, adapter_names=names)

    def keyword(self, **kwargs):
        return self.model(**kwargs, adapter_names=self.names)


# ---- correctness ----------------------------------------------------------------------------
def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def check(runner: Runner, ids: torch.Tensor, next_ids: torch.Tensor) -> dict:
    """Row i of the mixed batch == row i alone with its adapter (prefill logits, decode-step logits)."""
    names = runner.names
    mixed_logits = runner.mixed(input_ids=ids).logits
    cached = runner.mixed(input_ids=ids, use_cache=True, logits_to_keep=1)
    mixed_step = runner.mixed(input_ids=next_ids, past_key_values=cached.past_key_values).logits
    alone, alone_step = [], []
    for i, name in enumerate(names):
        runner.activate(name)
        alone.append(runner.single(input_ids=ids[i : i + 1]).logits)
        out = runner.single(input_ids=ids[i : i + 1], use_cache=True, logits_to_keep=1)
        alone_step.append(runner.single(input_ids=next_ids[i : i + 1], past_key_values=out.past_key_values).logits)
    alone, alone_step = torch.cat(alone), torch.cat(alone_step)
    with runner.disabled():
        bare = runner.single(input_ids=ids[:N_ADAPTERS]).logits
    result = {
        "prefill_diff": max_diff(mixed_logits, alone),
        "decode_diff": max_diff(mixed_step, alone_step),
        # how far each adapter moves row i's logits from the bare model (min over the 4 adapters)
        "effect": min(max_diff(alone[i], bare[i]) for i in range(N_ADAPTERS)),
        "logit_scale": float(alone.abs().max()),
    }
    if runner.library == "shirakit":
        result["keyword_diff"] = max_diff(runner.keyword(input_ids=ids).logits, mixed_logits)
    runner.activate(runner.adapters[0])
    for key in ("prefill_diff", "decode_diff", "keyword_diff"):
        if key in result:
            assert result[key] <= ATOL, (
                f"{METHODS[runner.method][1]}: mixed batch differs from rows run alone ({key} = "
                f"{result[key]:.3g} > {ATOL})"
            )
    assert result["effect"] > 100 * ATOL, f"{runner.method}: the adapters barely change the output ({result})"
    return result


# ---- timing ---------------------------------------------------------------------------------
def timed(fn) -> tuple[float, float]:
    """(process CPU seconds, wall seconds) of one call."""
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - c0, time.perf_counter() - t0


def time_alternating(calls: dict, steps: int, warmup: int) -> dict:
    """``calls``: mode -> a call returning its own ``timed(...)`` (untimed preparation inside it).

    ``warmup`` untimed pairs, then ``steps`` timed pairs, the modes alternating step by step and
    their order flipping every pair, so drifting load hits every mode alike. The garbage collector
    is off while timing (a collection would land on whichever call happened to trigger it).
    Returns mode -> {"cpu": [seconds], "wall": [seconds]}, one entry per timed call, in pair order.
    """
    order = list(calls)
    for _ in range(warmup):
        for mode in order:
            calls[mode]()
    samples: dict[str, list[tuple[float, float]]] = {m: [] for m in calls}
    gc.collect()
    gc.disable()
    try:
        for i in range(steps):
            for mode in order if i % 2 == 0 else order[::-1]:
                samples[mode].append(calls[mode]())
    finally:
        gc.enable()
    return {m: {"cpu": [c for c, _ in v], "wall": [w for _, w in v]} for m, v in samples.items()}


def kernel_groups(step) -> list[int]:
    """[groups the grouped SHiRA kernel took, groups offered to SHiRA's routed deltas] in one call
    of ``step``: shows that the mixed path timed is the grouped kernel's (decode: every group)."""
    from shirakit.methods.shira import grouped

    original, counts = grouped.add_grouped, [0, 0]

    def counting(layer, y, x, groups, kind):
        done = original(layer, y, x, groups, kind)
        counts[0] += len(groups) if done else 0
        counts[1] += len(groups)
        return done

    grouped.add_grouped = counting
    try:
        step()
    finally:
        grouped.add_grouped = original
    return counts


def twin_runners(args: argparse.Namespace, method: str) -> tuple[Runner, Runner | None]:
    """(single, mixed): two copies of the same model and adapters (one for a method-less row)."""
    single = Runner(args, method)
    return single, (Runner(args, method) if single.has_adapters else None)


def method_worker(args: argparse.Namespace, method: str) -> dict:
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="Sparse invariant checks")
    single, mixed = twin_runners(args, method)
    gen = torch.Generator().manual_seed(args.seed + 1)
    ids = torch.randint(args.vocab, (args.rows, args.seq), generator=gen)
    next_ids = torch.randint(args.vocab, (args.rows, 1), generator=gen)
    result = {"method": method, "label": METHODS[method][1]}
    if method == "shira":
        result["routes"] = weight_routes(single.model, args)
    with torch.inference_mode():
        if mixed is not None:
            result["check"] = check(mixed, ids, next_ids)
            single.activate(single.adapters[0])
            mixed.activate(mixed.adapters[0])
            same = torch.equal(single.single(input_ids=ids[:2]).logits, mixed.single(input_ids=ids[:2]).logits)
            assert same, f"{method}: the single and mixed copies of the model differ"
        prefill = {"single": lambda: timed(lambda: single.single(input_ids=ids, logits_to_keep=1))}
        if mixed is not None:
            prefill["mixed"] = lambda: timed(lambda: mixed.mixed(input_ids=ids, logits_to_keep=1))
        result["prefill"] = time_alternating(prefill, args.prefill_steps, args.warmup)

        # decode: every timed step gets a fresh copy of its mode's cache of the same prompt (copied untimed)
        caches = {"single": single.single(input_ids=ids, use_cache=True, logits_to_keep=1).past_key_values}

        def step(kind: str) -> tuple[float, float]:
            cache = copy.deepcopy(caches[kind])
            call = single.single if kind == "single" else mixed.mixed
            return timed(lambda: call(input_ids=next_ids, past_key_values=cache))

        decode = {"single": functools.partial(step, "single")}
        if mixed is not None:
            caches["mixed"] = mixed.mixed(input_ids=ids, use_cache=True, logits_to_keep=1).past_key_values
            decode["mixed"] = functools.partial(step, "mixed")
        result["decode"] = time_alternating(decode, args.decode_steps, args.warmup)
        if method == "shira":
            result["kernel_groups"] = {
                "prefill": kernel_groups(lambda: mixed.mixed(input_ids=ids, logits_to_keep=1)),
                "decode": kernel_groups(lambda: step("mixed")),
            }
    return result


def weight_routes(model, args: argparse.Namespace) -> dict[str, list[int]]:
    """Per workload, [layers whose cost model puts a group on the scattered weight, layers]: what
    ``prefers_weight`` answers in inference for a group's tokens (prefill: rows / 4 x seq; decode:
    rows / 4)."""
    from shirakit.core.state import adapter_layers

    layers = [layer.adapters["a0"] for _, layer in adapter_layers(model)]
    group_rows = args.rows // N_ADAPTERS
    with torch.inference_mode():
        return {workload: [sum(a.prefers_weight(tokens) for a in layers), len(layers)]
                for workload, tokens in (("prefill", group_rows * args.seq), ("decode", group_rows))}


# ---- SHiRA crossover: sparse product vs scattered weight, per token count ---------------------
class _Holder(torch.nn.Module):
    def __init__(self, in_f: int, out_f: int) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(in_f, out_f, bias=False)

    def forward(self, x):
        return self.proj(x)


def measure(fns: dict, min_reps: int, min_time: float, max_reps: int = 200) -> dict[str, float]:
    """Round-robin calls of every fn (so drift hits all alike); median CPU seconds per fn."""
    for fn in fns.values():
        fn()  # warm-up
    samples = {k: [] for k in fns}
    while True:
        for k, fn in fns.items():
            samples[k].append(timed(fn)[0])
        n = len(next(iter(samples.values())))
        if n >= max_reps or (n >= min_reps and all(sum(s) >= min_time for s in samples.values())):
            break
    return {k: statistics.median(s) for k, s in samples.items()}


SPARSE, SCATTER = False, True  # what the patched InWeightAdapter.prefers_weight answers


def forced_route(layer, x, groups, scatter: bool):
    """One routed forward with the route forced (prefers_weight patched to answer ``scatter``)."""
    from shirakit.core.adapter import InWeightAdapter

    original = InWeightAdapter.prefers_weight

    def call():
        InWeightAdapter.prefers_weight = lambda self, tokens: scatter
        try:
            return layer.routed_forward(x, groups)
        finally:
            InWeightAdapter.prefers_weight = original
    return call


def scatter_pair(layer, name: str) -> None:
    """The scatter path's fixed cost: the K values scattered in and the originals scattered back."""
    layer._apply_adapter(name)
    layer._remove_adapter(name)


def crossover_worker(args: argparse.Namespace) -> dict:
    import shirakit

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="Sparse invariant checks")
    h, i = args.hidden, args.intermediate
    shapes = [(f"q/k/v/o {h}->{h}", h, h), (f"gate/up {h}->{i}", h, i), (f"down {i}->{h}", i, h)]
    if args.quick:
        shapes = shapes[1:2]
    reps, min_time = (3, 0.01) if args.quick else (5, 0.25)
    out = {"shapes": [], "reps": reps, "min_time": min_time}

    def base(layer, x):
        return lambda: layer.base_layer(x)

    for label, in_f, out_f in shapes:
        # built outside inference_mode: shirakit's wrapper reads the weight's version counter,
        # which inference tensors do not have
        torch.manual_seed(args.seed)
        holder = _Holder(in_f, out_f).eval()
        names = [f"a{j}" for j in range(N_ADAPTERS)]
        for j, name in enumerate(names):
            torch.manual_seed(args.seed + 100 + j)
            shirakit.inject(holder, shirakit.ShiraConfig(r=32, target_modules=["proj"], init_weights=False), name)
        layer = holder.proj
        layer.withdraw_live()
        k = layer.adapters["a0"].shira_weight.numel()
        # the cost model's crossover: the smallest group size it sends to the written-in weight
        model_from = next((t for t in range(1, 1 << 16) if layer.adapters["a0"].prefers_weight(t)), None)
        with torch.inference_mode():
            # the two K-scatters of the scatter path alone (apply + restore, warm: no base read)
            pair = measure({"pair": functools.partial(scatter_pair, layer, "a0")}, reps, min_time)["pair"]
            rows_out = []
            for t in args.token_counts:
                x1 = torch.randn(t, in_f)
                g1 = [("a0", torch.arange(t))]
                x4 = torch.randn(N_ADAPTERS * t, in_f)
                g4 = [(n, torch.arange(j, N_ADAPTERS * t, N_ADAPTERS)) for j, n in enumerate(names)]
                # correctness of both paths against each other
                for x, g in ((x1, g1), (x4, g4)):
                    d = max_diff(forced_route(layer, x, g, SPARSE)(), forced_route(layer, x, g, SCATTER)())
                    assert d <= ATOL, f"SHiRA sparse and scatter paths differ by {d:.3g} ({label}, {t} tokens)"
                m = measure({
                    "base1": base(layer, x1),
                    "sparse1": forced_route(layer, x1, g1, SPARSE),
                    "scatter1": forced_route(layer, x1, g1, SCATTER),
                    "base4": base(layer, x4),
                    "sparse4": forced_route(layer, x4, g4, SPARSE),
                    "scatter4": forced_route(layer, x4, g4, SCATTER),
                }, reps, min_time)
                rows_out.append({"tokens": t, **m})
            out["shapes"].append({"label": label, "k": k, "pair": pair, "rows": rows_out, "model_from": model_from})
    return out


# ---- orchestration --------------------------------------------------------------------------
def width_key(method: str, hidden: int, intermediate: int) -> str:
    return f"{method}@{hidden}x{intermediate}"


def at_width(args: argparse.Namespace, key: str) -> tuple[argparse.Namespace, str]:
    """A width-axis key ``method@HxI``: the method and the arguments for that width (64-dim heads,
    ``--width-seq`` tokens per row); any other key: unchanged."""
    if "@" not in key:
        return args, key
    method, width = key.split("@")
    hidden, intermediate = (int(v) for v in width.split("x"))
    sized = argparse.Namespace(**{**vars(args), "hidden": hidden, "intermediate": intermediate,
                                  "heads": max(1, hidden // 64), "seq": args.width_seq})
    return sized, method


def run_in_process(key: str, args: argparse.Namespace) -> dict:
    if key == "crossover":
        return crossover_worker(args)
    sized, method = at_width(args, key)
    return method_worker(sized, method)


def run_worker(key: str, args: argparse.Namespace) -> dict:
    if args.in_process:
        result = run_in_process(key, args)
        gc.collect()
        return result
    env = {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    return run_worker_process(__file__, ["--worker", key, *worker_argv(args)], env)


def ms(seconds: float) -> str:
    value = seconds * 1e3
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}" if value >= 1 else f"{value:.3f}"


def pair_spread(w: dict) -> str:
    """The quartiles of mixed / single over the timed pairs (CPU): how noisy the ratio is."""
    pairs = [m / s for m, s in zip(w["mixed"]["cpu"], w["single"]["cpu"])]
    if len(pairs) < 2:
        return f"{pairs[0]:.2f}"
    q1, _, q3 = statistics.quantiles(pairs, n=4)
    return f"{q1:.2f}-{q3:.2f}"


def kernel_share(res: dict, workload: str) -> str:
    counts = res.get("kernel_groups", {}).get(workload)
    return f"{counts[0]} of {counts[1]}" if counts else "-"


def workload_table(results: dict[str, dict], workload: str) -> str:
    rows = []
    for key, res in results.items():
        if key == "crossover" or "@" in key:
            continue
        s = res[workload]
        single_cpu, single_wall = (statistics.median(s["single"][k]) for k in ("cpu", "wall"))
        if "mixed" not in s:
            rows.append([res["label"], ms(single_cpu), "-", "-", "-", "-", f"{ms(single_wall)} / -", "-", "-"])
            continue
        mixed_cpu, mixed_wall = (statistics.median(s["mixed"][k]) for k in ("cpu", "wall"))
        ratio = mixed_cpu / single_cpu
        diff = res["check"][f"{workload}_diff"]
        rows.append([
            res["label"], ms(single_cpu), ms(mixed_cpu), f"**{ratio:.2f}x**", pair_spread(s),
            "yes" if ratio <= TARGET_RATIO else "**no**",
            f"{ms(single_wall)} / {ms(mixed_wall)}", f"{mixed_wall / single_wall:.2f}x", f"{diff:.1e}",
        ])
    return table(["method", "single, CPU (ms)", "mixed, CPU (ms)", "mixed / single (CPU)",
                  "per-pair ratio, quartiles", f"<= {TARGET_RATIO}x",
                  "wall single / mixed (ms)", "mixed / single (wall)", "max abs diff vs rows alone"], rows)


def verdict(results: dict[str, dict]) -> str:
    """Which rows meet the target, by CPU-time ratio."""
    lines = []
    for workload in ("prefill", "decode"):
        misses, total = [], 0
        for key, res in results.items():
            s = res.get(workload, {})
            if key == "crossover" or "@" in key or "mixed" not in s:
                continue
            total += 1
            ratio = statistics.median(s["mixed"]["cpu"]) / statistics.median(s["single"]["cpu"])
            if ratio > TARGET_RATIO:
                misses.append(f"{res['label']} ({ratio:.2f}x)")
        missed = "; missed by " + ", ".join(misses) if misses else ""
        met = total - len(misses)
        lines.append(f"- {workload}: {met} of {total} rows meet mixed <= {TARGET_RATIO}x single{missed}.")
    return "Target, on CPU time:\n\n" + "\n".join(lines)


def check_table(results: dict[str, dict]) -> str:
    rows = []
    for key, res in results.items():
        if key == "crossover" or "@" in key or "check" not in res:
            continue
        c = res["check"]
        rows.append([res["label"], f"{c['prefill_diff']:.1e}", f"{c['decode_diff']:.1e}",
                     f"{c['keyword_diff']:.1e}" if "keyword_diff" in c else "n/a",
                     f"{c['effect']:.3g}", f"{c['logit_scale']:.3g}"])
    return table(["method", "prefill max abs diff", "decode max abs diff", "adapter_names= vs route()",
                  "adapter effect (min over adapters)", "max abs logit"], rows)


def crossover_of(rows: list[dict], sparse: str, scatter: str) -> str:
    """The token count from which the scatter path is at least as fast for every larger count."""
    faster = [r[scatter] <= r[sparse] for r in rows]
    for idx in range(len(rows)):
        if all(faster[idx:]):
            if idx == 0:
                return f"<= {rows[0]['tokens']}"
            return f"{rows[idx - 1]['tokens']} < T <= {rows[idx]['tokens']}"
    return f"> {rows[-1]['tokens']}"


def first_always_faster(rows: list[dict], sparse: str, scatter: str) -> int | None:
    """The smallest measured T from which the scatter path is at least as fast for every larger T."""
    faster = [r[scatter] <= r[sparse] for r in rows]
    for idx in range(len(rows)):
        if all(faster[idx:]):
            return rows[idx]["tokens"]
    return None


def model_picks_scatter(shape: dict, tokens: int) -> bool:
    return shape["model_from"] is not None and tokens >= shape["model_from"]


def crossover_summary(cross: dict) -> str:
    """Per shape: the measured crossover (4 groups) beside the cost model's, and what the model's
    choices cost over the faster path (regret = chosen / best, 1.00 = always the faster one)."""
    lines = []
    for shape in cross["shapes"]:
        regrets = []
        for r in shape["rows"]:
            chosen = r["scatter4"] if model_picks_scatter(shape, r["tokens"]) else r["sparse4"]
            regrets.append(chosen / min(r["scatter4"], r["sparse4"]))
        model = f"T >= {shape['model_from']}" if shape["model_from"] else "never"
        lines.append(f"- {shape['label']}: measured, scatter at least as fast for "
                     f"{crossover_of(shape['rows'], 'sparse4', 'scatter4')} tokens per group; the cost model "
                     f"writes in for {model}; its choices cost at most {max(regrets):.2f}x the faster path "
                     f"(median {statistics.median(regrets):.2f}x).")
    return "\n".join(lines)


def crossover_section(cross: dict) -> str:
    parts = [crossover_summary(cross)]
    for shape in cross["shapes"]:
        rows = []
        for r in shape["rows"]:
            rows.append([str(r["tokens"]), ms(r["base1"]), ms(r["sparse1"]), ms(r["scatter1"]),
                         f"{r['scatter1'] / r['sparse1']:.2f}", ms(r["base4"]), ms(r["sparse4"]), ms(r["scatter4"]),
                         f"{r['scatter4'] / r['sparse4']:.2f}",
                         "scatter" if model_picks_scatter(shape, r["tokens"]) else "sparse"])
        parts.append(
            f"**{shape['label']}** (K = {shape['k']:,} values per adapter; the scatter path's two K-scatters "
            f"alone, apply + restore: {ms(shape['pair'])} ms)\n\n"
            + table(["tokens T per group", "base (1 group)", "sparse", "scatter", "scatter / sparse",
                     "base (4 groups)", "sparse", "scatter", "scatter / sparse", "cost model picks"], rows)
            + f"\n\nScatter at least as fast from: 1 group {crossover_of(shape['rows'], 'sparse1', 'scatter1')}; "
              f"4 groups {crossover_of(shape['rows'], 'sparse4', 'scatter4')} tokens per group."
        )
    return "\n\n".join(parts)


def width_section(args, results: dict) -> str:
    """mixed / single by layer width, for the width-axis rows (prefill and decode)."""
    rows = []
    for key, res in results.items():
        if "@" not in key:
            continue
        width = key.split("@")[1]
        cells = [res["label"], width.replace("x", " x ")]
        for workload in ("prefill", "decode"):
            w = res[workload]
            single, mixed = (statistics.median(w[m]["cpu"]) for m in ("single", "mixed"))
            ratio = mixed / single
            cells += [f"{ms(single)} / {ms(mixed)}", f"**{ratio:.2f}x**", pair_spread(w),
                      "yes" if ratio <= WIDTH_TARGET else "**no**"]
        routes = res.get("routes")
        cells.append(" / ".join(f"{routes[w][0]} of {routes[w][1]}" for w in ("prefill", "decode")) if routes else "-")
        cells.append(" / ".join(kernel_share(res, w) for w in ("prefill", "decode")))
        rows.append(cells)
    return table(["method", "hidden x intermediate", "prefill CPU single / mixed (ms)", "prefill mixed / single",
                  "pair quartiles", f"<= {WIDTH_TARGET}x", "decode CPU single / mixed (ms)", "decode mixed / single",
                  "pair quartiles", f"<= {WIDTH_TARGET}x", "layers on the written-in weight, prefill / decode",
                  "groups through the grouped kernel, prefill / decode"], rows)


def report(args, facts: dict, results: dict, command: str, load_end: float) -> str:
    a = args
    cross = results.get("crossover")
    parts = [
        "## Mixed-adapter batches (`benchmarks/mixed_batch.py`)",
        "Written by the script (`--write-docs`); rerun it rather than editing this section by hand. "
        "The machine is shared and has few cores, so single timings are noisy: compare the ratios.",
        "\n".join([
            f"- Date: {facts['date']}",
            f"- Machine: {facts['machine']}; at the end {load_end:.2f}",
            f"- Software: {facts['software']}",
            f"- Command: `{command}`" + (" (`--quick`: a smoke test, not a measurement)" if a.quick else ""),
            f"- Model: Llama (transformers `LlamaConfig`), hidden {a.hidden}, intermediate {a.intermediate}, "
            f"{a.layers} layers, {a.heads} heads, vocab {a.vocab}, fp32, random weights; adapters on all 7 "
            "projections; SHiRA r=32, LoRA r=32 alpha 64, VeRA r=256, MiSS r=64; random adapter values.",
            f"- Batch: {a.rows} rows over {N_ADAPTERS} adapters, row i -> adapter i mod {N_ADAPTERS} "
            f"({a.rows // N_ADAPTERS} rows each, interleaved); single = the same {a.rows} rows as a plain forward "
            "with one adapter active (unmerged). Eval mode, `torch.inference_mode()`. "
            + ("Each row in a fresh process." if not a.in_process else "All rows in one process."),
            f"- Prefill: one forward of {a.rows} x {a.seq} tokens, `logits_to_keep=1` (as `generate`'s prefill). "
            f"Decode: one forward of {a.rows} x 1 new tokens on a {a.seq}-token KV cache (one greedy step; "
            "the cache is deep-copied, untimed, before each step).",
            f"- Timing: single and mixed on two copies of the same model (checked equal), alternating step by step: "
            f"{a.prefill_steps} (prefill) / {a.decode_steps} (decode) timed pairs per workload after {a.warmup} "
            "untimed pair(s), the order within a pair flipping every pair, same inputs for both; the single copy "
            "keeps its adapter in the weight (no switch back from a mixed batch is ever timed). Medians per mode; "
            "ratio = median mixed / median single; the quartiles of the per-pair ratios show the noise. "
            "CPU = process CPU time (`time.process_time`, "
            f"{a.threads} torch thread(s)): the work done, stable on a busy machine; wall = `time.perf_counter`, "
            "which also counts time other processes held the core. Ratios on CPU time.",
            f"- Correctness (asserted): row i of the mixed output equals row i run alone with its adapter, "
            f"max abs diff <= {ATOL:g} on all prefill logits and on the decode step's logits.",
        ]),
    ]
    routes = results.get("shira", {}).get("routes")
    picked = ""
    if routes:
        picked = (f"; here groups of {a.rows // N_ADAPTERS * a.seq} tokens (prefill) go on the scattered weight in "
                  f"{routes['prefill'][0]} of {routes['prefill'][1]} layers, groups of {a.rows // N_ADAPTERS} tokens "
                  f"(decode) in {routes['decode'][0]} of {routes['decode'][1]} (the others: the sparse product)")
    if "kernel_groups" in results.get("shira", {}):
        shira = results["shira"]
        picked += (f"; groups through the grouped kernel in one mixed step: prefill {kernel_share(shira, 'prefill')}, "
                   f"decode {kernel_share(shira, 'decode')} (the rest: on the written-in weight)")
    parts[-1] += ("\n- shirakit SHiRA in the mixed batch: each layer picks, per group, the scattered weight or the "
                  "sparse product by its cost model (`InWeightAdapter.prefers_weight`: the layer's m, n, K and the "
                  f"group's tokens){picked}.")
    parts += [
        f"### Prefill ({a.rows} x {a.seq} tokens)", workload_table(results, "prefill"),
        f"### Decode step ({a.rows} x 1 token, {a.seq}-token cache)", workload_table(results, "decode"),
        verdict(results),
        "### Correctness check", check_table(results)
        + "\n\nadapter effect = min over the 4 adapters of max |logits with the adapter - bare logits| "
          "(so the check is not vacuous).",
    ]
    if any("@" in key for key in results):
        parts += [
            "### SHiRA mixed batches by layer width",
            f"The same {a.rows} rows over {N_ADAPTERS} adapters vs one adapter, on Llama models of each width "
            f"({a.layers} layers, 64-dim heads, vocab {a.vocab}), {a.width_seq} tokens per row: prefill = one forward "
            f"of {a.rows} x {a.width_seq} tokens (groups of {a.rows // N_ADAPTERS * a.width_seq} tokens per adapter), "
            f"decode = one step of {a.rows} x 1 token on a {a.width_seq}-token cache (groups of "
            f"{a.rows // N_ADAPTERS}). Timing and checks as above; target (issue 13): mixed <= {WIDTH_TARGET}x single.",
            width_section(a, results),
        ]
    if cross:
        parts += [
            "### SHiRA: sparse product vs scattered weight, by group size",
            "One SHiRA layer's `AdapterLinear.routed_forward` under `torch.inference_mode()`, "
            "`InWeightAdapter.prefers_weight` patched to answer False (sparse: base product on all rows + every "
            "group's delta in one grouped-kernel call) or True (scatter: per group the K values scattered in, the base "
            "product on the group's rows, the originals scattered back). x is (rows, in), one token per row. "
            "Left: one group of T tokens (all rows one adapter); right: 4 groups of T tokens each (4 "
            "adapters, 4T rows, interleaved: the mixed-batch case). Median CPU ms (round-robin, >= "
            f"{cross['reps']} calls and >= {cross['min_time']:g} s each); ratio < 1 = scatter faster. "
            "Last column: the route the cost model picks for a group of T tokens on that layer.",
            crossover_section(cross),
        ]
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        return emit(run_in_process(args.worker, args))
    if args.quick:
        args.in_process = True
    command = command_line("benchmarks/mixed_batch.py", argv)
    facts = machine_facts(f"{args.threads} torch thread(s) per worker, one worker at a time")
    keys = list(args.methods) + ([] if args.skip_crossover else ["crossover"])
    keys += [width_key(m, h, i) for h, i in args.width_list for m in args.width_methods]
    results = {}
    for key in keys:
        t0 = time.perf_counter()
        results[key] = run_worker(key, args)
        print(f"  {key}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    publish(report(args, facts, results, command, os.getloadavg()[0]), args.write_docs, BEGIN, END)


if __name__ == "__main__":
    main()
