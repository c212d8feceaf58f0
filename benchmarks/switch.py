"""Adapter switching in fused mode: shirakit SHiRA vs PEFT LoRA / SHiRA vs the raw scatter bound.

    python benchmarks/switch.py                  # 4 x Linear 4096x4096, r = 32, 7 repetitions
    python benchmarks/switch.py --quick          # small layers, 3 repetitions: a smoke test (< 30 s)
    python benchmarks/switch.py --big            # also 4 Llama-7B-shaped blocks (3.2 GB of fp32 weights)
    python benchmarks/switch.py --threads 1 2    # run everything once per torch thread count
    python benchmarks/switch.py --write-docs docs/benchmarks.md   # also update the docs section

"Switch" = fused mode: the weights hold adapter A merged; afterwards they hold adapter B merged.
Every row works on ONE model (fp32, random weights, no bias, all linear layers targeted), in
phases: shirakit SHiRA, shirakit LoRA, PEFT LoRA, PEFT SHiRA; each phase wraps the same nn.Linear
modules and takes its adapters out again before the next one (the base weights are restored from a
saved copy after the phases whose unmerge subtracts). The two SHiRA adapters (seeds 1 and 2) are
made by shirakit; PEFT SHiRA loads them from shirakit's PEFT-layout files, so every SHiRA row and
the raw bound use the SAME indices and values.

Rows (each timed with ``time.perf_counter`` around the operation only; CPU work is synchronous):
- PEFT LoRA / PEFT SHiRA switch: ``base_model.unmerge_adapter()`` + ``base_model.merge_adapter([B])``.
- shirakit SHiRA switch, warm: ``switch_adapter(model, B)`` with A merged, both seen before in this
  base state: a scatter of A's saved base values back + a scatter of B's values in.
- shirakit SHiRA switch, cold: the same, right after a write to the base weights (one element
  multiplied by 1, which bumps the tensor's version): B's base values must be read again. This is
  what the first switch to each adapter costs; the very first switch after ``inject`` is shown too.
- shirakit LoRA switch (the generic unmerge + merge path), for reference.
- raw bound, on the same flat weight views and the same ``storage_index()`` as the shirakit SHiRA
  adapters, for each kernel: numpy ``W[idx] = v``, torch ``index_copy_``, torch ``scatter_``:
  (i) one scatter of B's K values per layer; (ii) the two scatters a switch needs at minimum
  (A's originals back, B's values in); (iii) cold minimum: gather B's base values, add the adapter
  values (fp32), then the two scatters. The bound is the fastest kernel's median.
- with loading: ``load`` = read the adapter from its directory (page cache warm: the same files are
  read every repetition). PEFT: ``PeftModel.load_adapter(dir, adapter_name=...)`` (+ unmerge the old,
  merge the new); shirakit: ``switch_adapter(model, None)`` + ``load_adapter(model, dir, name,
  merge=True)``, from the PEFT-layout file and from the compact file (``save_adapter(compact=True)``).
  The delete of the previously loaded adapter happens outside the timed region.
- profile: the pieces of a switch timed one by one on the same data (``index_copy_`` of the saved
  values back, ``index_select`` of the base values (cold only), ``merged_values`` = the fp32 add,
  ``index_copy_`` in); what the warm switch costs beyond its pieces is Python/bookkeeping overhead.

Each repetition ("round") runs every row of a phase once, in a fixed order, so drifting load on the
shared machine hits all rows of a phase alike; the first ``--warmup`` rounds are not recorded. The
tables give the median over ``--reps`` rounds (and min-max).

Checked inside the benchmark (assertions): after each SHiRA switch the weight differs from the base
only at the adapter's positions and holds base + value there, bit for bit; after
``switch_adapter(model, None)`` (and after unloading) every base weight is bit-identical to a copy
taken before any adapter existed; PEFT SHiRA merges the same values at the same positions.
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import statistics
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

BEGIN, END = "<!-- switch:begin -->", "<!-- switch:end -->"
from _report import (  # noqa: E402
    add_preset_args,
    apply_presets,
    command_line,
    machine_facts,
    replace_section,
    table,
    today,
)

SQUARE_TARGETS = ["proj"]
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
A, B = "ad_a", "ad_b"  # PEFT warns about adapter names contained in its prefixes ("a" is in "lora_")

PRESETS = {
    "full": dict(hidden=4096, layers=4, big_hidden=4096, big_intermediate=11008, big_blocks=4, r=32, reps=7, warmup=1),
    "quick": dict(hidden=512, layers=2, big_hidden=256, big_intermediate=688, big_blocks=2, r=8, reps=3, warmup=1),
}


# ---- arguments ------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small layers, few repetitions (smoke test)")
    p.add_argument("--big", action="store_true", help="also run 4 transformer blocks of Llama-7B shapes")
    p.add_argument("--no-square", action="store_true", help="skip the n x n layers (with --big: only the big shape)")
    p.add_argument("--threads", type=int, nargs="+", default=None,
                   help="torch thread counts to run with, one full pass each (default: torch's default)")
    p.add_argument("--skip-peft", action="store_true", help="skip the PEFT phases")
    p.add_argument("--write-docs", type=Path, default=None, metavar="FILE",
                   help="write the results section into FILE between the switch markers")
    p.add_argument("--seed", type=int, default=0)
    add_preset_args(p, PRESETS)
    args = p.parse_args(argv)
    apply_presets(args, PRESETS)
    if args.threads is None:
        args.threads = [torch.get_num_threads()]
    if args.reps < 1 or args.warmup < 0 or min(args.threads) < 1:
        p.error("--reps and --threads must be >= 1, --warmup >= 0")
    if args.no_square and not args.big:
        p.error("--no-square leaves nothing to run without --big")
    return args


# ---- models ---------------------------------------------------------------------------------
def linear(n_in: int, n_out: int) -> nn.Linear:
    return torch.nn.utils.skip_init(nn.Linear, n_in, n_out, bias=False)  # filled by init_weights


class SquareBlock(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.proj = linear(n, n)

    def forward(self, x):
        return self.proj(x)


class Attention(nn.Module):
    def __init__(self, h: int) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (linear(h, h) for _ in range(4))

    def forward(self, x):
        return self.o_proj(self.q_proj(x) + self.k_proj(x) + self.v_proj(x))


class Mlp(nn.Module):
    def __init__(self, h: int, i: int) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = linear(h, i), linear(h, i), linear(i, h)

    def forward(self, x):
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaBlock(nn.Module):
    def __init__(self, h: int, i: int) -> None:
        super().__init__()
        self.self_attn, self.mlp = Attention(h), Mlp(h, i)

    def forward(self, x):
        x = x + self.self_attn(x)
        return x + self.mlp(x)


class Stack(nn.Module):
    """A plain module (no transformers config): a list of blocks run one after the other."""

    def __init__(self, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(blocks)

    def forward(self, x):
        for block in self.layers:
            x = block(x)
        return x


def build_model(shape: str, args) -> tuple[nn.Module, list[str], str]:
    if shape == "square":
        model = Stack([SquareBlock(args.hidden) for _ in range(args.layers)])
        what = f"{args.layers} x nn.Linear {args.hidden}x{args.hidden}"
        targets = SQUARE_TARGETS
    else:
        h, i = args.big_hidden, args.big_intermediate
        model = Stack([LlamaBlock(h, i) for _ in range(args.big_blocks)])
        what = (f"{args.big_blocks} Llama blocks (hidden {h}, intermediate {i}; q/k/v/o {h}x{h}, "
                f"gate/up {i}x{h}, down {h}x{i})")
        targets = LLAMA_TARGETS
    generator = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=generator)
            p.requires_grad_(False)
    return model.eval(), targets, what


# ---- measurement helpers ---------------------------------------------------------------------
class Recorder:
    """Collects seconds per row; ``record`` is False during warm-up rounds."""

    def __init__(self) -> None:
        self.times: dict[str, list[float]] = defaultdict(list)
        self.record = True

    def time(self, key: str, fn) -> None:
        gc.collect()  # cheap: everything that existed after the imports was frozen (see main)
        gc.disable()
        try:
            t0 = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - t0
        finally:
            gc.enable()
        if self.record:
            self.times[key].append(elapsed)

    def add(self, key: str, seconds: float) -> None:
        if self.record:
            self.times[key].append(seconds)

    def median(self, key: str) -> float | None:
        values = self.times.get(key)
        return statistics.median(values) if values else None


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bit pattern (so -0.0 != 0.0 and NaN payloads count)."""
    return t.view({4: torch.int32, 2: torch.int16, 8: torch.int64}[t.element_size()])


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def bump_versions(weights: list[torch.Tensor]) -> None:
    """A write shirakit did not make (value-preserving): the next SHiRA merge must re-read the base."""
    with torch.no_grad():
        for w in weights:
            w.view(-1)[:1].mul_(1)


def check_base(weights: list[torch.Tensor], reference: list[torch.Tensor], where: str) -> None:
    bad = [i for i, (w, r) in enumerate(zip(weights, reference)) if not same_bits(w.detach(), r)]
    assert not bad, f"{where}: base weights of layer(s) {bad} are not bit-identical to the saved copy"


def restore_base(weights: list[torch.Tensor], reference: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for w, r in zip(weights, reference):
            w.copy_(r)


# ---- raw scatter kernels on flat views ----------------------------------------------------------
class RawLayer:
    """One layer's flat weight and one SHiRA adapter pair's data, as torch tensors and numpy views."""

    def __init__(self, weight: torch.Tensor, adapters: dict[str, nn.Module], reference: torch.Tensor) -> None:
        self.flat = weight.detach().view(-1)
        self.np_flat = self.flat.numpy()
        self.idx, self.orig, self.new, self.values = {}, {}, {}, {}
        for name, adapter in adapters.items():
            idx = adapter.storage_index()
            orig = reference.view(-1).index_select(0, idx)
            self.idx[name] = idx
            self.orig[name] = orig
            self.new[name] = adapter.merged_values(weight, orig)  # what shirakit scatters in
            self.values[name] = (adapter.scale * adapter.shira_weight.detach().float()).contiguous()


def scatter_numpy(layer: RawLayer, name: str, which: dict) -> None:
    layer.np_flat[layer.idx[name].numpy()] = which[name].numpy()


def scatter_index_copy(layer: RawLayer, name: str, which: dict) -> None:
    layer.flat.index_copy_(0, layer.idx[name], which[name])


def scatter_scatter(layer: RawLayer, name: str, which: dict) -> None:
    layer.flat.scatter_(0, layer.idx[name], which[name])


def gather_numpy(layer: RawLayer, name: str):
    return torch.from_numpy(layer.np_flat.take(layer.idx[name].numpy()))


def gather_torch(layer: RawLayer, name: str):
    return layer.flat.index_select(0, layer.idx[name])


# name -> (scatter, gather); numpy index arrays are views of the torch ones (no conversion cost)
KERNELS = {
    "numpy W[idx] = v": (scatter_numpy, gather_numpy),
    "torch index_copy_": (scatter_index_copy, gather_torch),
    "torch scatter_": (scatter_scatter, gather_torch),
}


def raw_round(rec: Recorder, raw: list[RawLayer], old: str, new: str, prefix: str) -> None:
    """The raw bound rows; the weights hold the clean base before and after."""
    for kernel, (scatter, gather) in KERNELS.items():
        def one(scatter=scatter):
            for layer in raw:
                scatter(layer, new, layer.new)

        def two(scatter=scatter):
            for layer in raw:
                scatter(layer, old, layer.orig)
                scatter(layer, new, layer.new)

        def cold(scatter=scatter, gather=gather):  # old back first: the two masks may share positions
            for layer in raw:
                scatter(layer, old, layer.orig)
                merged = gather(layer, new) + layer.values[new]  # fp32 (the weights here are fp32)
                scatter(layer, new, {new: merged})

        rec.time(f"{prefix}raw1|{kernel}", one)
        for layer in raw:
            scatter_index_copy(layer, new, layer.orig)
        for key, fn in (("raw2", two), ("rawcold", cold)):
            for layer in raw:
                scatter_index_copy(layer, old, layer.new)
            rec.time(f"{prefix}{key}|{kernel}", fn)
            for layer in raw:
                scatter_index_copy(layer, new, layer.orig)


def profile_round(rec: Recorder, raw: list[RawLayer], adapters: list[dict], weights, old: str, new: str) -> None:
    """shirakit's switch pieces, each timed on its own and summed over layers (clean base before/after)."""
    for layer in raw:
        scatter_index_copy(layer, old, layer.new)
    pieces = defaultdict(float)
    for layer, pair, weight in zip(raw, adapters, weights):
        t0 = time.perf_counter()
        layer.flat.index_copy_(0, layer.idx[old], layer.orig[old])
        t1 = time.perf_counter()
        base = layer.flat.index_select(0, layer.idx[new])
        t2 = time.perf_counter()
        merged = pair[new].merged_values(weight, base)
        t3 = time.perf_counter()
        layer.flat.index_copy_(0, layer.idx[new], merged)
        t4 = time.perf_counter()
        layer.flat.scatter_(0, layer.idx[old], layer.new[old])
        layer.flat.scatter_(0, layer.idx[old], layer.orig[old])
        t6 = time.perf_counter()
        pieces["unmerge index_copy_"] += t1 - t0
        pieces["index_select (cold only)"] += t2 - t1
        pieces["merged_values (fp32 add)"] += t3 - t2
        pieces["merge index_copy_"] += t4 - t3
        pieces["scatter_ (same K, for comparison)"] += (t6 - t4) / 2
    for key, seconds in pieces.items():
        rec.add(f"prof|{key}", seconds)
    for layer in raw:
        scatter_index_copy(layer, new, layer.orig)


# ---- phases ----------------------------------------------------------------------------------
def file_bytes(directory: Path) -> int:
    return (directory / "adapter_model.safetensors").stat().st_size


def other(name: str) -> str:
    return B if name == A else A


def phase_shirakit_shira(model, targets, weights, reference, args, work: Path, rec: Recorder, info: dict) -> None:
    import shirakit
    from shirakit.model.switch import switch_adapter

    for seed, name in ((1, A), (2, B)):
        shirakit.inject(model, shirakit.ShiraConfig(r=args.r, target_modules=targets, init_weights=False,
                                                    random_seed=seed), name)
    layers = [m for m in model.modules() if isinstance(m, shirakit.AdapterLinear)]
    assert all(layer.weight is w for layer, w in zip(layers, weights)) and len(layers) == len(weights)
    pairs = [{n: layer.adapters[n] for n in (A, B)} for layer in layers]
    raw = [RawLayer(w, pair, r) for w, pair, r in zip(weights, pairs, reference)]
    info["K"] = sorted({pair[A].shira_weight.numel() for pair in pairs})
    info["values"] = sum(pair[A].shira_weight.numel() for pair in pairs)
    dirs = {}
    for name in (A, B):
        for compact in (False, True):
            d = work / f"shirakit-shira-{name}-{'compact' if compact else 'peft'}"
            shirakit.save_adapter(model, d, name, compact=compact)
            dirs[name, compact] = d
    info["shira_dirs"] = {name: dirs[name, False] for name in (A, B)}
    info["size|SHiRA, PEFT layout"] = file_bytes(dirs[A, False])
    info["size|SHiRA, compact"] = file_bytes(dirs[A, True])

    def check_merged(name: str, where: str) -> None:
        for layer, w, r in zip(raw, weights, reference):
            got = w.detach().view(-1)
            assert same_bits(got.index_select(0, layer.idx[name]), layer.new[name]), f"{where}: wrong merged values"
            changed = torch.nonzero(bits(got) != bits(r.view(-1))).flatten()
            assert bool(torch.isin(changed, layer.idx[name]).all()), f"{where}: change outside the adapter's positions"

    # Correctness first (the very first switches are timed once, for the record).
    t0 = time.perf_counter()
    switch_adapter(model, A)
    info["first switch (base -> A)"] = time.perf_counter() - t0
    check_merged(A, "switch to A")
    t0 = time.perf_counter()
    switch_adapter(model, B)
    info["first switch (A -> B)"] = time.perf_counter() - t0
    check_merged(B, "switch A -> B")
    switch_adapter(model, None)
    check_base(weights, reference, "shirakit SHiRA: switch_adapter(model, None)")

    loaded: list[str] = []
    counter = iter(range(10**6))

    def drop_loaded(keep: str | None = None) -> None:
        for name in [n for n in loaded if n != keep]:
            shirakit.delete_adapter(model, name)
            loaded.remove(name)

    for round_ in range(args.warmup + args.reps):
        rec.record = round_ >= args.warmup
        old, new = (A, B) if round_ % 2 == 0 else (B, A)
        # state: nothing merged
        raw_round(rec, raw, old, new, "")
        profile_round(rec, raw, pairs, weights, old, new)
        check_base(weights, reference, "after the raw kernels")
        # cold: a fresh base state; old merged untimed, then old -> new timed
        bump_versions(weights)
        switch_adapter(model, old)
        rec.time("sk_shira_cold", lambda new=new: switch_adapter(model, new))
        # warm: both were read in this base state
        rec.time("sk_shira_warm", lambda old=old: switch_adapter(model, old))
        check_merged(old, "warm switch")
        # load + switch, from each layout; the previous adapter is deleted outside the timing
        for compact, key in ((False, "sk_shira_load_switch_peft"), (True, "sk_shira_load_switch_compact")):
            name = f"ld{next(counter)}"

            def load_switch(d=dirs[new, compact], name=name):
                switch_adapter(model, None)
                shirakit.load_adapter(model, d, name, merge=True)

            rec.time(key, load_switch)
            loaded.append(name)
            drop_loaded(keep=name)
        check_merged(new, "load + switch")
        switch_adapter(model, None)
        drop_loaded()
        for compact, key in ((False, "sk_shira_load_peft"), (True, "sk_shira_load_compact")):
            name = f"ld{next(counter)}"
            rec.time(key, lambda d=dirs[new, compact], name=name: shirakit.load_adapter(model, d, name))
            loaded.append(name)
            drop_loaded()
        check_base(weights, reference, "shirakit SHiRA round")
    switch_adapter(model, None)
    check_base(weights, reference, "shirakit SHiRA: after all rounds, switch_adapter(model, None)")
    shirakit.unload(model)
    check_base(weights, reference, "shirakit SHiRA: after unload")


def phase_shirakit_lora(model, targets, weights, reference, args, work: Path, rec: Recorder, info: dict) -> None:
    import shirakit
    from shirakit.model.switch import switch_adapter

    torch.manual_seed(args.seed + 10)  # LoRA's random init draws from torch's global RNG
    for name in (A, B):
        config = shirakit.LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules=targets, init_lora_weights=False)
        shirakit.inject(model, config, name)
    dirs = {name: shirakit.save_adapter(model, work / f"shirakit-lora-{name}", name) for name in (A, B)}
    switch_adapter(model, B)
    loaded: list[str] = []
    counter = iter(range(10**6))
    for round_ in range(args.warmup + args.reps):
        rec.record = round_ >= args.warmup
        old, new = (A, B) if round_ % 2 == 0 else (B, A)
        switch_adapter(model, old)
        rec.time("sk_lora_switch", lambda new=new: switch_adapter(model, new))
        name = f"ld{next(counter)}"

        def load_switch(d=dirs[old], name=name):
            switch_adapter(model, None)
            shirakit.load_adapter(model, d, name, merge=True)

        rec.time("sk_lora_load_switch", load_switch)
        for n in loaded:
            shirakit.delete_adapter(model, n)
        loaded[:] = [name]
    switch_adapter(model, None)
    shirakit.unload(model)
    restore_base(weights, reference)  # LoRA's unmerge subtracts: rounding changed the base


def peft_quiet():
    warnings.filterwarnings("ignore", category=UserWarning, module=r"peft(\.|$)")


def peft_round_rows(pm, rec: Recorder, dirs: dict, prefix: str, args, loaded: list[str], counter) -> None:
    tuner = pm.base_model
    for round_ in range(args.warmup + args.reps):
        rec.record = round_ >= args.warmup
        old, new = (A, B) if round_ % 2 == 0 else (B, A)
        tuner.merge_adapter([old])  # nothing is merged at the start of a round

        def switch(new=new):
            tuner.unmerge_adapter()
            tuner.merge_adapter([new])

        rec.time(f"{prefix}_switch", switch)
        name = f"ld{next(counter)}"

        def load_switch(d=dirs[old], name=name):
            tuner.unmerge_adapter()
            pm.load_adapter(str(d), adapter_name=name)
            tuner.merge_adapter([name])

        rec.time(f"{prefix}_load_switch", load_switch)
        for n in loaded:
            pm.delete_adapter(n)
        loaded[:] = [name]
        tuner.unmerge_adapter()
        name = f"ld{next(counter)}"
        rec.time(f"{prefix}_load", lambda d=dirs[new], name=name: pm.load_adapter(str(d), adapter_name=name))
        for n in loaded:
            pm.delete_adapter(n)
        loaded[:] = [name]
    tuner.unmerge_adapter()
    for n in loaded:
        pm.delete_adapter(n)


def phase_peft_lora(model, targets, weights, reference, args, work: Path, rec: Recorder, info: dict) -> None:
    import peft

    peft_quiet()
    torch.manual_seed(args.seed + 20)
    config = lambda: peft.LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules=list(targets),
                                     init_lora_weights=False)
    pm = peft.get_peft_model(model, config(), adapter_name=A)
    pm.add_adapter(B, config())
    dirs = {}
    for name in (A, B):
        pm.save_pretrained(str(work / "peft-lora"), selected_adapters=[name])
        dirs[name] = work / "peft-lora" / name  # PEFT writes non-default adapters into a subfolder
    info["size|LoRA (PEFT)"] = file_bytes(dirs[A])
    peft_round_rows(pm, rec, dirs, "peft_lora", args, [], iter(range(10**6)))
    pm.unload()
    restore_base(weights, reference)


def phase_peft_shira(model, targets, weights, reference, args, work: Path, rec: Recorder, info: dict) -> None:
    import peft

    peft_quiet()
    dirs = info["shira_dirs"]  # shirakit's PEFT-layout files: the same indices and values as its rows
    pm = peft.PeftModel.from_pretrained(model, str(dirs[A]), adapter_name=A)
    pm.load_adapter(str(dirs[B]), adapter_name=B)
    pm.base_model.merge_adapter([B])
    # the same positions and values as shirakit merges (PEFT adds a sparse COO delta densely)
    import shirakit  # only to read the expected values from shirakit's file

    expected = shirakit.io.checkpoint.read_weights(dirs[B])[1]
    exact = True
    for (name, _module), w, r in zip([(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)],
                                    weights, reference):
        key = "base_model.model." + name.removesuffix(".base_layer")
        idx = expected[key + ".shira_indices"].long()
        flat = idx[0] * w.shape[1] + idx[1]
        want = r.view(-1).clone()
        want[flat] = (r.view(-1)[flat].float() + expected[key + ".shira_weight"].float()).to(w.dtype)
        exact &= same_bits(w.detach().view(-1), want)
        assert torch.allclose(w.detach().view(-1), want, rtol=0, atol=1e-6), f"PEFT SHiRA merge differs at {name}"
    info["peft shira merge bit-identical to shirakit's"] = exact
    pm.base_model.unmerge_adapter()
    peft_round_rows(pm, rec, dirs, "peft_shira", args, [], iter(range(10**6)))
    pm.unload()
    restore_base(weights, reference)


# ---- one shape, one thread count -----------------------------------------------------------------
def run_shape(shape: str, args) -> list[dict]:
    model, targets, what = build_model(shape, args)
    weights = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    reference = [w.detach().clone() for w in weights]
    results = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        rec, info = Recorder(), {"what": what, "shape": shape, "threads": threads,
                                 "weights": sum(w.numel() for w in weights), "layers": len(weights)}
        load_before = os.getloadavg()[0]
        started = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="shirakit-switch-") as tmp:
            work = Path(tmp)
            phases = [phase_shirakit_shira, phase_shirakit_lora]
            phases += [] if args.skip_peft else [phase_peft_lora, phase_peft_shira]
            for phase in phases:
                t0 = time.perf_counter()
                phase(model, targets, weights, reference, args, work, rec, info)
                print(f"  [{shape}, {threads} thread(s)] {phase.__name__}: {time.perf_counter() - t0:.1f} s",
                      file=sys.stderr, flush=True)
            check_base(weights, reference, "end of run")
        info["load average"] = f"{load_before:.2f} at start, {os.getloadavg()[0]:.2f} at end"
        info["seconds"] = time.perf_counter() - started
        results.append({"info": info, "times": dict(rec.times)})
    del model, weights, reference
    gc.collect()
    return results


# ---- report --------------------------------------------------------------------------------------
def fmt_ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    ms = seconds * 1e3
    return f"{ms:,.0f}" if ms >= 100 else f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}"


def fmt_ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "-"
    r = a / b
    return f"{r:,.0f}x" if r >= 100 else f"{r:.1f}x" if r >= 10 else f"{r:.2f}x"


ROW_LABELS = [
    ("peft_lora_switch", "PEFT LoRA switch (unmerge_adapter + merge_adapter)"),
    ("peft_shira_switch", "PEFT SHiRA switch (unmerge_adapter + merge_adapter)"),
    ("sk_shira_cold", "shirakit SHiRA switch, cold (base values read again)"),
    ("sk_shira_warm", "shirakit SHiRA switch, warm"),
    ("sk_lora_switch", "shirakit LoRA switch (generic unmerge + merge)"),
]
LOAD_LABELS = [
    ("peft_lora_load", "PEFT LoRA: load_adapter alone"),
    ("peft_lora_load_switch", "PEFT LoRA: unmerge + load_adapter + merge"),
    ("peft_shira_load", "PEFT SHiRA: load_adapter alone"),
    ("peft_shira_load_switch", "PEFT SHiRA: unmerge + load_adapter + merge"),
    ("sk_shira_load_peft", "shirakit SHiRA: load_adapter alone, PEFT-layout file"),
    ("sk_shira_load_compact", "shirakit SHiRA: load_adapter alone, compact file"),
    ("sk_shira_load_switch_peft", "shirakit SHiRA: switch to None + load_adapter(merge=True), PEFT-layout file"),
    ("sk_shira_load_switch_compact", "shirakit SHiRA: switch to None + load_adapter(merge=True), compact file"),
    ("sk_lora_load_switch", "shirakit LoRA: switch to None + load_adapter(merge=True)"),
]
RAW_LABELS = [("raw1", "(i) one scatter of the new values"), ("raw2", "(ii) two scatters (old originals back, new in)"),
              ("rawcold", "(iii) gather + fp32 add + two scatters (cold minimum)")]


def raw_bound(times: dict, key: str) -> tuple[float | None, str]:
    meds = {k: statistics.median(times[f"{key}|{k}"]) for k in KERNELS if times.get(f"{key}|{k}")}
    if not meds:
        return None, "-"
    best = min(meds, key=meds.get)
    return meds[best], best


def section_for(result: dict, args) -> str:
    info, times = result["info"], result["times"]
    med = lambda key: statistics.median(times[key]) if times.get(key) else None
    span = lambda key: (f"{fmt_ms(min(times[key]))}-{fmt_ms(max(times[key]))}" if times.get(key) else "-")
    n = len(next(iter(times.values()))) if times else 0
    out = [f"### {info['what']}, r = {args.r}, torch threads = {info['threads']}",
           f"{info['layers']} layers, {info['weights'] / 1e6:,.0f} M fp32 base weights, K = "
           f"{', '.join(f'{k:,}' for k in info['K'])} SHiRA values per layer ({info['values']:,} in all); "
           f"median of {n} rounds after {args.warmup} warm-up round(s); load average {info['load average']}; "
           f"this pass took {info['seconds']:.0f} s."]
    rows = [[label, fmt_ms(med(key)), span(key)] for key, label in ROW_LABELS if med(key) is not None]
    bounds = {}
    for key, label in RAW_LABELS:
        bounds[key], kernel = raw_bound(times, key)
        rows.append([f"raw bound {label}: fastest = {kernel}", fmt_ms(bounds[key]), "-"])
    first = [f"{k}: {fmt_ms(v)} ms" for k, v in info.items() if k.startswith("first switch")]
    out += ["#### Switch (adapters already in memory)", table(["row", "median (ms)", "min-max (ms)"], rows),
            "The very first shirakit SHiRA switches after `inject` (one sample each): " + "; ".join(first) + "."]
    kernel_rows = [[label] + [fmt_ms(med(f"{key}|{k}")) for k in KERNELS] for key, label in RAW_LABELS]
    out += ["#### Raw scatter kernels (same weights, same indices; median ms)",
            table(["work per switch (all layers)", *KERNELS], kernel_rows)]
    prof = [(k.split("|", 1)[1], med(k)) for k in times if k.startswith("prof|")]
    pieces = sum(v for k, v in prof if k in ("unmerge index_copy_", "merged_values (fp32 add)", "merge index_copy_"))
    warm = med("sk_shira_warm")
    prof_rows = [[k, fmt_ms(v), fmt_ms(v / info["layers"])] for k, v in prof]
    if warm is not None:
        overhead = warm - pieces
        prof_rows.append(["warm switch minus (unmerge index_copy_ + fp32 add + merge index_copy_): Python and "
                          "bookkeeping (a difference of medians: below zero = lost in the noise)",
                          fmt_ms(overhead), fmt_ms(overhead / info["layers"])])
    out += ["#### Where the shirakit SHiRA switch time goes (pieces timed one by one, summed over layers)",
            table(["piece", "median, all layers (ms)", "per layer (ms)"], prof_rows)]
    load_rows = [[label, fmt_ms(med(key)), span(key)] for key, label in LOAD_LABELS if med(key) is not None]
    out += ["#### With loading from disk (page cache warm)", table(["row", "median (ms)", "min-max (ms)"], load_rows)]
    values = info["values"]
    size_rows = [[k.split("|", 1)[1], f"{v:,}", f"{v / values:.2f}"] for k, v in info.items() if k.startswith("size|")]
    out += ["#### Adapter files (one adapter, all layers)",
            table(["file", "bytes", "bytes per trained value"], size_rows)]
    if "size|SHiRA, compact" in info:
        out.append(f"Compact / PEFT layout: {info['size|SHiRA, compact'] / info['size|SHiRA, PEFT layout']:.2f}x. "
                   f"PEFT SHiRA merge bit-identical to shirakit's: "
                   f"{info.get('peft shira merge bit-identical to shirakit' + chr(39) + 's', 'not run')}.")
    lora, cold = med("peft_lora_switch"), med("sk_shira_cold")
    ratio_rows = [
        ["PEFT LoRA switch / shirakit SHiRA switch (warm)", fmt_ratio(lora, warm), ">= 40x"],
        ["PEFT LoRA switch / shirakit SHiRA switch (cold)", fmt_ratio(lora, cold), ">= 40x"],
        ["PEFT SHiRA switch / shirakit SHiRA switch (warm)", fmt_ratio(med("peft_shira_switch"), warm), ""],
        ["shirakit SHiRA switch (warm) / raw bound (i) one scatter", fmt_ratio(warm, bounds["raw1"]), "<= 1.5x"],
        ["shirakit SHiRA switch (warm) / raw bound (ii) two scatters", fmt_ratio(warm, bounds["raw2"]), "<= 1.5x"],
        ["shirakit SHiRA switch (cold) / raw bound (iii) cold minimum", fmt_ratio(cold, bounds["rawcold"]), "<= 1.5x"],
        ["shirakit compact load + switch / PEFT LoRA load alone",
         fmt_ratio(med("sk_shira_load_switch_compact"), med("peft_lora_load")), "<= 1x"],
        ["shirakit PEFT-layout load + switch / PEFT LoRA load alone",
         fmt_ratio(med("sk_shira_load_switch_peft"), med("peft_lora_load")), ""],
        ["PEFT LoRA load + switch / shirakit compact load + switch",
         fmt_ratio(med("peft_lora_load_switch"), med("sk_shira_load_switch_compact")), ""],
    ]
    out += ["#### Ratios (of medians)", table(["ratio", "value", "target"], ratio_rows)]
    return "\n\n".join(out)


def switch_machine_facts() -> dict[str, str]:
    mem = "?"
    try:
        kib = int(re.search(r"^MemTotal:\s*(\d+)", Path("/proc/meminfo").read_text(), re.M).group(1))
        mem = f"{kib / 1024**2:.0f} GiB"
    except (OSError, AttributeError):
        pass
    facts = machine_facts(f"{mem} RAM, shared")
    facts["software"] += f", numpy {np.__version__}"
    return facts


TITLE = "## Adapter switching in fused mode (`benchmarks/switch.py`)"
INTRO = (
    "Written by the script (`--write-docs`); rerun it rather than editing this section by hand. Each shape "
    "has its own block (a run replaces only the blocks of the shapes it ran). The machine is shared and has "
    "few cores, so single timings are noisy: compare the ratios (all of medians), and compare rows of one "
    "block only. See the script's docstring for exactly what each row times."
)


def sub_markers(shape: str) -> tuple[str, str]:
    return f"<!-- switch:{shape}:begin -->", f"<!-- switch:{shape}:end -->"


def shape_block(args, facts: dict, results: list[dict], command: str) -> str:
    parts = ["\n".join([f"- Date: {facts['date']}", f"- Machine: {facts['machine']}",
                        f"- Software: {facts['software']}", f"- Command: `{command}`",
                        f"- fp32 weights, no bias, random values; every linear layer targeted; SHiRA r = {args.r} "
                        f"(K = r (in + out) per layer, random mask, seeds 1 and 2), LoRA r = {args.r}, alpha = "
                        f"{2 * args.r}, random A and B."])]
    if args.quick:
        parts.append("**`--quick`: small layers and few rounds, a smoke test, not a measurement.**")
    parts += [section_for(r, args) for r in results]
    return "\n\n".join(parts)


def split_blocks(inner: str) -> dict[str, str]:
    """shape -> its block (markers included) found in an existing section."""
    blocks = {}
    for match in re.finditer(r"<!-- switch:(\w+):begin -->.*?<!-- switch:\1:end -->", inner, re.S):
        blocks[match.group(1)] = match.group(0)
    return blocks


def build_section(blocks: dict[str, str]) -> str:
    order = sorted(blocks, key=lambda k: (k != "square", k))
    return "\n\n".join([TITLE, INTRO, *(blocks[k] for k in order)])


def write_docs(path: Path, new_blocks: dict[str, str]) -> None:
    """Replace only this script's section, and in it only the blocks of the shapes just run."""
    text = path.read_text() if path.exists() else ""
    have = BEGIN in text and END in text and text.index(BEGIN) < text.index(END)
    blocks = split_blocks(text[text.index(BEGIN):text.index(END)]) if have else {}
    for shape, body in new_blocks.items():
        b, e = sub_markers(shape)
        blocks[shape] = f"{b}\n{body}\n{e}"
    replace_section(path, BEGIN, END, build_section(blocks))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    command = command_line("benchmarks/switch.py", argv)
    facts = switch_machine_facts()  # imports transformers, peft and shirakit
    gc.collect()
    gc.freeze()  # a full collection over transformers' objects costs ~0.5 s; keep them out of later ones
    shapes = ([] if args.no_square else ["square"]) + (["llama"] if args.big else [])
    blocks = {}
    for shape in shapes:
        facts["date"] = today() if blocks else facts["date"]
        blocks[shape] = shape_block(args, facts, run_shape(shape, args), command)
    print(build_section(blocks))
    if args.write_docs:
        write_docs(args.write_docs, blocks)
        print(f"\n(wrote the section into {args.write_docs})", file=sys.stderr)


if __name__ == "__main__":
    main()
