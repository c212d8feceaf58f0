"""Train steps of SHiRA beside LoRA where the base does not fit as it is: FSDP2 (2 processes, gloo,
the adapted weights sharded too) and a quantized base (bitsandbytes NF4), each next to the plain
one-process run of the same model (issue 15's targets).

    python benchmarks/train_step_sharded.py [--steps 5] [--repeats 3] [--settings single,nf4]
                                            [--write-docs docs/benchmarks.md]

Every measurement is a fresh process (FSDP2: a ``torchrun --nproc_per_node=2`` launch) that trains
one Llama-shaped model (hidden 1024, MLP 2816, 2 layers, the 7 projections adapted, r=16) on a
global batch of 2 x 256 tokens (FSDP2: 1 x 256 per rank, 1 thread each; one process: 1 thread),
SGD, and reports the median step time and its peak memory: resident memory above what the process
held before it built the model (Linux VmHWM, reset after imports), the highest of the ranks.
Ratios are taken within one repeat and the median over repeats is shown. ``--settings`` runs a
subset (``int8``, bitsandbytes ``Linear8bitLt``, only on request); a subset's section gets markers
of its own in ``--write-docs``, so the full run's stays. On a quantized base SHiRA is measured
twice: as it trains there (its values written into the dense copy bitsandbytes dequantizes for each
product) and forced onto the additive path (``base(x) + s x S^T``, what runs where no such copy
exists), each beside LoRA.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _report  # noqa: E402

BEGIN, END = "<!-- train_step_sharded:begin -->", "<!-- train_step_sharded:end -->"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SETTINGS = ("single", "fsdp2", "nf4", "int8")
DEFAULT_SETTINGS = ("single", "fsdp2", "nf4")  # int8 (bitsandbytes Linear8bitLt) on request
QUANTIZED = ("nf4", "int8")
METHODS = {"single": ("shira", "lora"), "fsdp2": ("shira", "lora"), "nf4": ("shira", "shira-additive", "lora"),
           "int8": ("shira", "shira-additive", "lora")}


def proc_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def build(args: argparse.Namespace, method: str, quantized: str | None) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    import shirakit

    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                         num_attention_heads=16, num_key_value_heads=16, vocab_size=args.vocab,
                         max_position_embeddings=max(args.seq, 128), tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
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


def worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    distributed = args.worker == "fsdp2"
    if distributed:
        import torch.distributed as dist
        from torch.distributed.fsdp import fully_shard

        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    batch = torch.randint(args.vocab, (2, args.seq), generator=torch.Generator().manual_seed(1)).chunk(world)[rank]
    if args.method == "shira-additive":  # no dequantized copy found: SHiRA runs beside the quantized base
        import shirakit.layer

        shirakit.layer.dequantizer = lambda layer, x: None
    import transformers.models.llama.modeling_llama  # noqa: F401  (imports are not the model's memory)
    if args.worker in QUANTIZED:
        import bitsandbytes  # noqa: F401
    with open("/proc/self/clear_refs", "w") as f:  # peak RSS from here on
        f.write("5")
    before = proc_kib("VmRSS")
    model = build(args, args.method, quantized=args.worker if args.worker in QUANTIZED else None)
    if distributed:
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    times = []
    for _ in range(args.warmup + args.steps):
        start = time.perf_counter()
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    result = {"step_s": statistics.median(times[args.warmup:]), "peak_kib": proc_kib("VmHWM") - before}
    if distributed:
        gathered = [None] * world
        dist.all_gather_object(gathered, result)
        dist.destroy_process_group()
        result = {"step_s": max(r["step_s"] for r in gathered), "peak_kib": max(r["peak_kib"] for r in gathered)}
    if rank == 0:
        _report.emit(result)


def measure(args: argparse.Namespace, setting: str, method: str) -> dict:
    argv = [f"--worker={setting}", f"--method={method}", *_report.flags(args, SIZE_FLAGS)]
    if setting != "fsdp2":
        return _report.run_worker_process(__file__, argv)
    return run_torchrun(argv)


def run_torchrun(argv: list[str], tries: int = 2) -> dict:
    """This script's worker on 2 processes under torchrun: the RESULT line rank 0 printed. A launch
    that dies is tried once more (once, on the loaded machine, both ranks aborted mid-run with
    "terminate called without an active exception"; not reproduced since), and the retry is reported."""
    for attempt in range(1, tries + 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
               str(Path(__file__).resolve()), *argv]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=_report.REPO,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=1200)
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


def report(args: argparse.Namespace, runs: list[dict], facts: dict[str, str], command: str) -> str:
    """The section's text (``publish`` puts the markers around it)."""
    def med(setting: str, method: str, key: str) -> float:
        return statistics.median(run[setting, method][key] for run in runs)

    def ratio(num: tuple[str, str], den: tuple[str, str], key: str) -> str:
        return f"{statistics.median(run[num][key] / run[den][key] for run in runs):.2f}"

    rows = []
    for setting in args.settings:
        for method in METHODS[setting]:
            single = ("single", method.split("-")[0])
            rows.append([setting, method, f"{med(setting, method, 'step_s') * 1e3:.0f} ms",
                         f"{med(setting, method, 'peak_kib') / 1024:.0f} MiB",
                         ratio((setting, method), (setting, "lora"), "step_s") if method != "lora" else "",
                         ratio((setting, method), single, "peak_kib")
                         if setting != "single" and "single" in args.settings else ""])
    body = _report.table(["setting", "method", "step (median)", "peak memory (max over ranks)",
                          "SHiRA / LoRA step", "memory / one process"], rows)
    return "\n".join([
        "## Train step on a sharded (FSDP2) and a quantized (NF4) base" if args.settings == DEFAULT_SETTINGS else
        f"## Train step, settings {', '.join(args.settings)}, {args.layers} layers", "",
        f"- Date: {facts['date']}", f"- Machine: {facts['machine']}", f"- Software: {facts['software']}",
        f"- Command: `{command}`", f"- Repeats: {args.repeats} (medians; ratios within a repeat, then the median)",
        f"- Model: Llama-shaped, hidden {args.hidden}, MLP {args.intermediate}, {args.layers} layers, vocab "
        f"{args.vocab}; the 7 projections adapted, r={args.adapter_rank}; global batch 2 x {args.seq} tokens; SGD; "
        f"{args.steps} timed steps after {args.warmup} warm-up",
        "- single: one process, 1 thread; fsdp2: `torchrun --nproc_per_node=2`, gloo, `fully_shard` per decoder "
        f"layer and at the root (adapted weights sharded), 1 x {args.seq} tokens and 1 thread per rank; nf4: one "
        "process, the 7 projections as bitsandbytes `Linear4bit` (NF4, fp32 compute); int8: the same with "
        "`Linear8bitLt` (int8 codes); shira-additive: SHiRA forced onto its additive path there "
        "(`base(x) + s x S^T`) instead of writing into the dequantized copy",
        "- Peak memory: resident memory above the process's own before it built the model (VmHWM)", "",
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
    parser.add_argument("--write-docs", type=Path)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return
    facts = _report.machine_facts("each row a fresh process (FSDP2: 2 processes), 1 thread per process")
    runs = []
    for repeat in range(args.repeats):
        runs.append({(s, m): measure(args, s, m) for s in args.settings for m in METHODS[s]})
        print(f"repeat {repeat + 1}/{args.repeats} done", file=sys.stderr)
    begin, end = BEGIN, END
    if args.settings != DEFAULT_SETTINGS:  # a subset: its own section, so the full run's rows stay
        key = f"[{','.join(args.settings)} {args.layers} layers]"
        begin, end = (marker.replace(":", key + ":") for marker in (BEGIN, END))
    _report.publish(report(args, runs, facts, _report.command_line("benchmarks/train_step_sharded.py", argv)),
                    args.write_docs, begin, end)


if __name__ == "__main__":
    main()
