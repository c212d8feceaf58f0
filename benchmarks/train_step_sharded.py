"""Train steps of SHiRA beside LoRA where the base does not fit as it is: FSDP2 (2 processes, gloo,
the adapted weights sharded too) and a quantized base (bitsandbytes NF4), each next to the plain
one-process run of the same model (issue 15's targets).

    python benchmarks/train_step_sharded.py [--steps 5] [--repeats 3] [--settings single,fsdp2-meta]
                                            [--tensor-memory] [--mmap-threshold-kib 256]
                                            [--write-docs docs/benchmarks.md]

Every measurement is a fresh process (FSDP2: a ``torchrun --nproc_per_node=2`` launch) that trains
one Llama-shaped model (hidden 1024, MLP 2816, 2 layers, the 7 projections adapted, r=16) on a
global batch of 2 x 256 tokens (FSDP2: 1 x 256 per rank, 1 thread each; one process: 1 thread),
SGD, and reports the median step time and its peak memory: resident memory above what the process
held before it built the model (Linux VmHWM, reset after imports and a warm-up step of a tiny model
that loads the compiled kernels), the highest of the ranks. ``fsdp2`` builds the model whole on
each rank, then shards it; ``fsdp2-meta`` never has it whole (meta device, ``fully_shard``,
``to_empty``, each rank reads its rows of a safetensors checkpoint, ``reset_adapter_parameters``).
``--tensor-memory`` adds, from one more run per row, the peak of live tensor bytes (what tensors
need, without allocator caches; benchmarks/_tensor_memory.py). ``--mmap-threshold-kib`` adds one
more run per row measuring the peak resident memory with glibc's mmap threshold fixed (freed
blocks above it go back to the OS at once; the default dynamic threshold keeps freed blocks of up
to 32 MB in the heap, so the default peak grows with the number of steps).
Ratios are taken within one repeat and the median over repeats is shown. ``--settings`` runs a
subset (``int8``, bitsandbytes ``Linear8bitLt``, only on request); a subset's section gets markers
of its own in ``--write-docs``, so the full run's stays. On a quantized base SHiRA is measured
twice: as it trains there (its values written into the dense copy bitsandbytes dequantizes for each
product) and forced onto the additive path (``base(x) + s x S^T``, what runs where no such copy
exists), each beside LoRA.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _report  # noqa: E402
from _tensor_memory import LiveTensorBytes  # noqa: E402

BEGIN, END = "<!-- train_step_sharded:begin -->", "<!-- train_step_sharded:end -->"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SETTINGS = ("single", "fsdp2", "fsdp2-meta", "nf4", "int8")
DEFAULT_SETTINGS = ("single", "fsdp2", "fsdp2-meta", "nf4")  # int8 (bitsandbytes Linear8bitLt) on request
QUANTIZED = ("nf4", "int8")
SHARDED = ("fsdp2", "fsdp2-meta")
METHODS = {"single": ("shira", "lora"), "fsdp2": ("shira", "lora"), "fsdp2-meta": ("shira", "lora"),
           "nf4": ("shira", "shira-additive", "lora"), "int8": ("shira", "shira-additive", "lora")}


def proc_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def base_model(args: argparse.Namespace) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                         num_attention_heads=16, num_key_value_heads=16, vocab_size=args.vocab,
                         max_position_embeddings=max(args.seq, 128), tie_word_embeddings=False)
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def build(args: argparse.Namespace, method: str, quantized: str | None) -> torch.nn.Module:
    import shirakit

    model = base_model(args)
    if quantized:
        quantize(model, quantized)
    r = args.adapter_rank
    adapter = (shirakit.ShiraConfig(r=r, target_modules=TARGETS, random_seed=0) if method.startswith("shira") else
               shirakit.LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS))
    return shirakit.inject(model, adapter).train()


def quantize(model: torch.nn.Module, kind: str) -> None:
    """Every targeted projection becomes a bitsandbytes NF4 ``Linear4bit`` (fp32 compute) or an 8-bit
    ``Linear8bitLt`` (int8 codes, no fp16 copy)."""
    import bitsandbytes as bnb

    for name, module in list(model.named_modules()):
        if name.rsplit(".", 1)[-1] in TARGETS:
            if kind == "nf4":
                q = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                      compute_dtype=torch.float32, quant_type="nf4")
            else:
                q = bnb.nn.Linear8bitLt(module.in_features, module.out_features, bias=module.bias is not None,
                                        has_fp16_weights=False)
            q.load_state_dict(module.state_dict())
            parent, child = name.rsplit(".", 1)
            setattr(model.get_submodule(parent), child, q.to("cpu"))  # quantized on the move


def shard(model: torch.nn.Module) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    return fully_shard(model)


def build_from_meta(args: argparse.Namespace, method: str) -> torch.nn.Module:
    """torchtitan's recipe: the model is never whole on a rank. Built and injected on the meta device,
    sharded, given storage for its shards only (``to_empty``), each rank reads its rows of the base
    weights from the safetensors checkpoint, HF's rotary buffers are made again, and shirakit draws
    the adapter into the shards (``reset_adapter_parameters``)."""
    import shirakit

    with torch.device("meta"):
        model = build(args, method, quantized=None)
    shard(model).to_empty(device="cpu")
    load_base_shards(model, args.checkpoint)
    for module in list(model.modules()):
        if hasattr(module, "original_inv_freq"):  # non-persistent buffers: not in any checkpoint
            fresh = type(module)(config=model.config)
            for key, buffer in fresh.named_buffers():
                module.get_buffer(key).copy_(buffer)
    return shirakit.reset_adapter_parameters(model)


@torch.no_grad()
def load_base_shards(model: torch.nn.Module, checkpoint: Path) -> None:
    """Copy the base weights in; a sharded parameter reads only its own rows from the file. The
    file is opened (memory-mapped) per tensor: the pages read stay mapped while it is open, and
    counted as the process's resident memory (with it open throughout, half the 24-layer model's
    file, ~600 MB, on each rank at the end of the load)."""
    from safetensors import safe_open
    from torch.distributed.tensor import DTensor

    from shirakit.core.sharded_weights import sharded_rows

    for name, param in model.named_parameters():
        if ".adapters." in name:
            continue
        with safe_open(str(checkpoint), "pt") as f:
            stored = f.get_slice(name.replace(".base_layer.", "."))
            if isinstance(param, DTensor):
                local, start, stop = sharded_rows(param)
                local.copy_(stored[start:stop])
            else:
                param.copy_(stored[:])


def write_checkpoint(args: argparse.Namespace, path: Path) -> None:
    """The base model as a safetensors file (what a pretrained checkpoint on disk is)."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in base_model(args).state_dict().items()}, str(path))


def worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    distributed = args.worker in SHARDED
    if distributed:
        import torch.distributed as dist

        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    batch = torch.randint(args.vocab, (2, args.seq), generator=torch.Generator().manual_seed(1)).chunk(world)[rank]
    if args.method == "shira-additive":  # no dequantized copy found: SHiRA runs beside the quantized base
        import shirakit.core.layer

        shirakit.core.layer.dequantizer = lambda layer, x: None
    warm_up(args, batch)
    with open("/proc/self/clear_refs", "w") as f:  # peak RSS from here on
        f.write("5")
    before = proc_kib("VmRSS")
    tracked = LiveTensorBytes(record=args.breakdown is not None) if args.track_tensors else contextlib.nullcontext()
    with tracked as tracker:
        times = train(args, batch)
    if args.breakdown is not None:  # this rank's storages alive at its peak, by label
        args.breakdown.with_name(f"{args.breakdown.name}.rank{rank}").write_text(
            json.dumps([[list(label), size] for label, size in tracker.at_peak.items()]))
    result = {"step_s": statistics.median(times[args.warmup:]), "peak_kib": proc_kib("VmHWM") - before,
              "process_kib": before}  # the per-process constant the peak is counted above
    if tracker is not None:  # the highest total of live tensor bytes it saw (torch's own accounting)
        result["tensor_peak_kib"] = tracker.peak // 1024
    if distributed:
        gathered = [None] * world
        dist.all_gather_object(gathered, result)
        dist.destroy_process_group()
        result = {key: max(r[key] for r in gathered) for key in result}
    if rank == 0:
        _report.emit(result)


def warm_up(args: argparse.Namespace, batch: torch.Tensor) -> None:
    """Imports, and compiled kernels (numba's SHiRA kernels load or compile on first use: ~50 MB), are
    the process's, not the model's memory: one step of a tiny model of the same kind before the
    peak is reset. (Measured without it, a 2-layer tiny model already "peaked" at 74 MB for LoRA and
    129 MB for SHiRA, as much as the 2-layer benchmark model itself.)"""
    import gc

    import safetensors  # noqa: F401
    import torch.distributed.fsdp  # noqa: F401
    import torch.distributed.tensor  # noqa: F401

    import shirakit.model.meta_init  # noqa: F401

    tiny = argparse.Namespace(**{**vars(args), "hidden": 64, "intermediate": 128, "layers": 1})
    model = build(tiny, args.method, quantized=args.worker if args.worker in QUANTIZED else None)
    model(input_ids=batch[:, :16], labels=batch[:, :16]).loss.backward()
    del model
    gc.collect()


def train(args: argparse.Namespace, batch: torch.Tensor) -> list[float]:
    """Build (as the setting says), then the timed SGD steps; returns each step's seconds."""
    if args.worker == "fsdp2-meta":
        model = build_from_meta(args, args.method)
    else:
        model = build(args, args.method, quantized=args.worker if args.worker in QUANTIZED else None)
        if args.worker == "fsdp2":  # built whole on every rank, then sharded (the full model is its peak)
            shard(model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    times = []
    for _ in range(args.warmup + args.steps):
        start = time.perf_counter()
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return times


def measure(args: argparse.Namespace, setting: str, method: str, track_tensors: bool = False,
            env: dict[str, str] | None = None) -> dict:
    argv = [f"--worker={setting}", f"--method={method}", *_report.flags(args, SIZE_FLAGS)]
    if setting == "fsdp2-meta":
        argv.append(f"--checkpoint={args.checkpoint}")
    if track_tensors:  # a run of its own: the tracker slows every op, so its step times are not used
        argv += ["--track-tensors", "--steps=1"]
    if setting not in SHARDED:
        return _report.run_worker_process(__file__, argv, env)
    return run_torchrun(argv, env=env)


def returned_env(args: argparse.Namespace) -> dict[str, str]:
    """glibc with a fixed mmap threshold: every block above it is its own mapping, returned when freed."""
    return {"MALLOC_MMAP_THRESHOLD_": str(args.mmap_threshold_kib * 1024)}


def run_torchrun(argv: list[str], tries: int = 2, env: dict[str, str] | None = None) -> dict:
    """This script's worker on 2 processes under torchrun: the RESULT line rank 0 printed. A launch
    that dies is tried once more (once, on the loaded machine, both ranks aborted mid-run with
    "terminate called without an active exception"; not reproduced since), and the retry is reported."""
    for attempt in range(1, tries + 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
               str(Path(__file__).resolve()), *argv]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=_report.REPO,
                              env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, timeout=1200)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(_report.RESULT_PREFIX)]
        if proc.returncode == 0 and lines:
            return json.loads(lines[-1][len(_report.RESULT_PREFIX):])
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        print(f"torchrun launch {attempt}/{tries} failed (exit code {proc.returncode}): {argv}", file=sys.stderr)
    raise SystemExit("torchrun worker failed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _settings(text: str) -> tuple[str, ...]:
    chosen = tuple(s.strip() for s in text.split(",") if s.strip())
    unknown = [s for s in chosen if s not in SETTINGS]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(SETTINGS)}, found {text!r}")
    return tuple(s for s in SETTINGS if s in chosen)


SIZE_FLAGS = ("hidden", "intermediate", "layers", "vocab", "seq", "adapter_rank", "steps", "warmup")


def report(args: argparse.Namespace, runs: list[dict], tensors: dict, facts: dict[str, str], command: str,
           returned: dict | None = None) -> str:
    """The section's text (``publish`` puts the markers around it). ``tensors``: (setting, method) ->
    the tracked run's result (``--tensor-memory``), or empty; ``returned``: the same for the runs
    with freed memory returned (``--mmap-threshold-kib``)."""
    returned = returned or {}
    def med(setting: str, method: str, key: str) -> float:
        return statistics.median(run[setting, method][key] for run in runs)

    def ratio(num: tuple[str, str], den: tuple[str, str], key: str) -> str:
        """The median of the within-repeat ratios, and their range when there are several."""
        ratios = [run[num][key] / run[den][key] for run in runs]
        spread = f" ({min(ratios):.2f}-{max(ratios):.2f})" if len(ratios) > 1 else ""
        return f"{statistics.median(ratios):.2f}{spread}"

    rows = []
    for setting in args.settings:
        for method in METHODS[setting]:
            single = ("single", method.split("-")[0])
            rows.append([setting, method, f"{med(setting, method, 'step_s') * 1e3:.0f} ms",
                         f"{med(setting, method, 'process_kib') / 1024:.0f} MiB",
                         f"{med(setting, method, 'peak_kib') / 1024:.0f} MiB",
                         ratio((setting, method), (setting, "lora"), "step_s") if method != "lora" else "",
                         ratio((setting, method), single, "peak_kib")
                         if setting != "single" and "single" in args.settings else ""])
            for extra, key in ((tensors, "tensor_peak_kib"), (returned, "peak_kib")):
                if extra:
                    peak = extra[setting, method][key]
                    rows[-1] += [f"{peak / 1024:.0f} MiB", f"{peak / extra[single][key]:.2f}"
                                 if setting != "single" and "single" in args.settings else ""]
    header = ["setting", "method", "step (median)", "process before the model", "peak memory (max over ranks)",
              "SHiRA / LoRA step",
              "memory / one process"]
    header += ["tensor peak (max over ranks)", "tensors / one process"] if tensors else []
    header += ["peak memory, freed memory returned", "returned / one process"] if returned else []
    body = _report.table(header, rows)
    return "\n".join([
        "## Train step on a sharded (FSDP2) and a quantized (NF4) base" if args.settings == DEFAULT_SETTINGS else
        f"## Train step, settings {', '.join(args.settings)}, {args.layers} layers", "",
        f"- Date: {facts['date']}", f"- Machine: {facts['machine']}", f"- Software: {facts['software']}",
        f"- Command: `{command}`",
        f"- Repeats: {args.repeats} (medians; ratios within a repeat, then the median and, in brackets, the range)",
        f"- Model: Llama-shaped, hidden {args.hidden}, MLP {args.intermediate}, {args.layers} layers, vocab "
        f"{args.vocab}; the 7 projections adapted, r={args.adapter_rank}; global batch 2 x {args.seq} tokens; SGD; "
        f"{args.steps} timed steps after {args.warmup} warm-up",
        "- single: one process, 1 thread; fsdp2: `torchrun --nproc_per_node=2`, gloo, `fully_shard` per decoder "
        f"layer and at the root (adapted weights sharded), 1 x {args.seq} tokens and 1 thread per rank, the model "
        "built whole on each rank and then sharded; fsdp2-meta: the same, but built and injected on the meta "
        "device, sharded, `to_empty`, each rank reading its rows of the base weights from a safetensors file, "
        "`shirakit.reset_adapter_parameters` (the model is never whole on a rank); nf4: one "
        "process, the 7 projections as bitsandbytes `Linear4bit` (NF4, fp32 compute); int8: the same with "
        "`Linear8bitLt` (int8 codes); shira-additive: SHiRA forced onto its additive path there "
        "(`base(x) + s x S^T`) instead of writing into the dequantized copy",
        "- Peak memory: resident memory above the process's own before it built the model (VmHWM; imports and "
        "compiled kernels warmed up first by one step of a 1-layer, hidden-64 model of the same kind); process "
        "before the model: that resident memory itself (interpreter, torch, transformers, shirakit, the compiled "
        "kernels, glibc's heap after the warm-up; max over ranks), which every process holds and sharding cannot "
        "shrink: a rank's whole footprint is that plus its peak"
        + ("; tensor peak: the highest total of live tensor storages from building the model through "
           "1 step after the warm-up, counted by a TorchDispatchMode (`benchmarks/_tensor_memory.py`) in a run of its "
           "own: what the tensors need, without the allocator's cached or unreturned pages" if tensors else "")
        + (f"; freed memory returned: the peak resident memory again, in a run of its own with glibc's mmap "
           f"threshold fixed at {args.mmap_threshold_kib} KiB (`MALLOC_MMAP_THRESHOLD_`), so every block above it is "
           "a mapping of its own, unmapped when freed; with the default dynamic threshold, blocks up to 32 MB freed "
           "once stay in the heap and the peak grows step by step (24 layers, FSDP2: the heap held ~1.1 GB of "
           "freed memory after 3 steps)" if returned else ""), "",
        "Targets (issue 15): SHiRA/LoRA step <= 1.1 under FSDP2 and on the quantized base; FSDP2 peak memory per "
        "rank <= 0.6 x the one-process run's.", "", body])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", choices=SETTINGS, help=argparse.SUPPRESS)
    parser.add_argument("--method", choices=("shira", "shira-additive", "lora"), help=argparse.SUPPRESS)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--adapter-rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--settings", type=_settings, default=DEFAULT_SETTINGS,
                        help="comma-separated subset of " + ",".join(SETTINGS) + " (default: "
                        + ",".join(DEFAULT_SETTINGS) + ")")
    parser.add_argument("--tensor-memory", action="store_true",
                        help="also measure each row's peak of live tensor bytes (a TorchDispatchMode), one run each")
    parser.add_argument("--mmap-threshold-kib", type=int, default=0,
                        help="also measure each row's peak resident memory with glibc's mmap threshold fixed at this "
                        "many KiB (freed blocks above it returned at once), one run each; 0: not measured")
    parser.add_argument("--write-docs", type=Path)
    parser.add_argument("--track-tensors", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--breakdown", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return
    facts = _report.machine_facts("each row a fresh process (FSDP2: 2 processes), 1 thread per process")
    with tempfile.TemporaryDirectory() as folder:
        args.checkpoint = Path(folder) / "base.safetensors"
        if "fsdp2-meta" in args.settings:
            write_checkpoint(args, args.checkpoint)
        runs, tensors, returned = measure_all(args)
    begin, end = BEGIN, END
    if args.settings != DEFAULT_SETTINGS:  # a subset: its own section, so the full run's rows stay
        key = f"[{','.join(args.settings)} {args.layers} layers]"
        begin, end = (marker.replace(":", key + ":") for marker in (BEGIN, END))
    _report.publish(report(args, runs, tensors, facts, _report.command_line("benchmarks/train_step_sharded.py", argv),
                           returned), args.write_docs, begin, end)


def measure_all(args: argparse.Namespace) -> tuple[list[dict], dict, dict]:
    rows = [(s, m) for s in args.settings for m in METHODS[s]]
    runs = []
    for repeat in range(args.repeats):
        runs.append({row: measure(args, *row) for row in rows})
        print(f"repeat {repeat + 1}/{args.repeats} done", file=sys.stderr)
    tensors = {row: measure(args, *row, track_tensors=True) for row in rows} if args.tensor_memory else {}
    returned = {row: measure(args, *row, env=returned_env(args)) for row in rows} if args.mmap_threshold_kib else {}
    return runs, tensors, returned


if __name__ == "__main__":
    main()
