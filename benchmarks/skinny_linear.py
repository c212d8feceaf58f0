"""Linears on CPU by row count: ``F.linear`` (``x W^T``) against ``serve/skinny_linear.py``'s forms
(``(W x^T)^T`` for few rows, oneDNN's product on a packed weight copy from 8 rows, unpacked for many).

    python benchmarks/skinny_linear.py [--threads 1 2] [--rows 8 16 32 64 128] [--prefill 64 128 256]
                                       [--repeats 7] [--write-docs FILE]

Three tables, the forms side by side in the same process at each thread count:

- per layer: SmolLM2-135M's projection shapes and its output layer, fp32, with the weights out of
  cache (each timing cycles through 60 copies of the weight; the output layer's 113 MB is out of
  cache by itself), median microseconds per call;
- per decode step: SmolLM2-135M (``shirakit.data.smollm2_dir()``), one token for each of
  ``rows`` rows over a 64-token cache, ``logits_to_keep=1``, median milliseconds, with the largest
  difference of the two forms' logits; "engine's forms" there are what the serving engine would choose
  (``use_skinny_linears`` at that thread count: packed oneDNN from ``PACKED_FROM_ROWS`` rows where the
  build has oneDNN, below that ``W x^T`` where calibrated, else ``F.linear``);
- per prefill forward: SmolLM2-135M over ``--prefill`` prompt tokens (one row, no cache,
  ``logits_to_keep=1``), ``F.linear`` everywhere against the engine's forms (packed oneDNN on every
  shape; the shapes whose unpacked oneDNN won at ``MANY_ROWS`` are listed, they take it only without
  packed weights), median milliseconds and the largest logit difference.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _report  # noqa: E402

from shirakit.serve.skinny_linear import (  # noqa: E402
    PACKED_FROM_ROWS,
    drop_skinny_linears,
    install_linear_forms,
    skinny_forward,
    use_skinny_linears,
)

# untimed calls before a whole-model timing: a layer makes its packed weight copy on its second call
# after the forms are installed (skinny_linear._packed), so one warm-up left that copy in a timed call
WARMUPS = 2
SHAPES = {"q_proj, o_proj": (576, 576), "k_proj, v_proj": (192, 576), "gate_proj, up_proj": (1536, 576),
          "down_proj": (576, 1536), "lm_head": (49152, 576)}
BEGIN, END = "<!-- skinny_linear:begin -->", "<!-- skinny_linear:end -->"


def per_call(forward, layers, x, repeats: int) -> float:
    """Median microseconds of ``forward(layer, x)``, cycling through ``layers``."""

    def cycle():
        for layer in layers:
            forward(layer, x)

    return _report.median_seconds(cycle, repeats) / len(layers) * 1e6


def per_layer(rows: int, repeats: int) -> list[list[str]]:
    out = []
    for name, (n, k) in SHAPES.items():
        layers = [torch.nn.Linear(k, n, bias=False) for _ in range(1 if name == "lm_head" else 60)]
        for layer in layers:  # W x^T at this row count, whatever a calibration would choose
            layer.skinny_rows, layer.onednn_rows, layer.packed_rows = rows, 0, 0
        x = torch.randn(rows, k)
        a = per_call(lambda layer, x: torch.nn.functional.linear(x, layer.weight), layers, x, repeats)
        b = per_call(skinny_forward, layers, x, repeats)
        out.append([name, str(rows), f"{a:.0f}", f"{b:.0f}", f"{a / b:.2f}"])
    return out


def per_step(model, rows: int, repeats: int) -> list[str]:
    ids = torch.randint(0, model.config.vocab_size, (rows, 64))
    token = torch.randint(0, model.config.vocab_size, (rows, 1))
    with torch.inference_mode():
        cache = model(ids, use_cache=True).past_key_values
        result = {}
        for form in ("F.linear", "skinny"):
            (use_skinny_linears if form == "skinny" else drop_skinny_linears)(model)

            def step(form=form):
                result[form] = model(token, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
                cache.crop(-1)  # back to the 64-token cache

            result[form + " s"] = _report.median_seconds(step, repeats, warmups=WARMUPS)
    drop_skinny_linears(model)
    a, b = result["F.linear s"] * 1e3, result["skinny s"] * 1e3
    diff = (result["F.linear"] - result["skinny"]).abs().max().item()
    return [str(rows), f"{a:.1f}", f"{b:.1f}", f"{a / b:.2f}", f"{diff:.1e}"]


def per_prefill(model, tokens: int, repeats: int) -> list[str]:
    ids = torch.randint(0, model.config.vocab_size, (1, tokens))
    result = {}
    with torch.inference_mode():
        forms = use_skinny_linears(model)  # calibrated once, then installed for its turn
        for form in ("F.linear", "calibrated"):
            install_linear_forms(model, forms if form == "calibrated" else {})

            def forward(form=form):
                result[form] = model(ids, logits_to_keep=1).logits

            result[form + " s"] = _report.median_seconds(forward, repeats, warmups=WARMUPS)
    drop_skinny_linears(model)
    onednn = ", ".join(f"{n}x{k}" for (n, k), f in forms.items() if f.many and f.many <= tokens) or "none"
    a, b = result["F.linear s"] * 1e3, result["calibrated s"] * 1e3
    diff = (result["F.linear"] - result["calibrated"]).abs().max().item()
    return [str(tokens), onednn, f"{a:.0f}", f"{b:.0f}", f"{a / b:.2f}", f"{diff:.1e}"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rows", type=int, nargs="+", default=[8, 16, 32, 64, 128])
    parser.add_argument("--prefill", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--write-docs", type=Path, default=None)
    args = parser.parse_args(argv)
    from transformers import AutoModelForCausalLM

    from shirakit.data import smollm2_dir

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir(), dtype=torch.float32).eval()
    facts = _report.machine_facts("one process")
    layer_rows, step_rows, prefill_rows = [], [], []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for rows in args.rows:
            layer_rows += [[str(threads), *r] for r in per_layer(rows, args.repeats)]
            step_rows.append([str(threads), *per_step(model, rows, args.repeats)])
        for tokens in args.prefill:
            prefill_rows.append([str(threads), *per_prefill(model, tokens, args.repeats)])
    section = "\n\n".join([
        f"### Few-row linears on CPU (`{_report.command_line('benchmarks/skinny_linear.py', argv)}`)",
        "\n".join(f"- {key}: {value}" for key, value in facts.items()),
        "Per layer, weights out of cache, microseconds per call (median):",
        _report.table(["threads", "layer", "rows", "F.linear", "W x^T", "speed-up"], layer_rows),
        "SmolLM2-135M, one decode step over a 64-token cache, milliseconds (median):",
        _report.table(["threads", "rows", "F.linear", "engine's forms", "speed-up", "largest logit difference"],
                      step_rows),
        "SmolLM2-135M, one prefill forward, milliseconds (median); the engine's forms (packed oneDNN from "
        f"{PACKED_FROM_ROWS} rows; unpacked oneDNN on the listed shapes without packed weights):",
        _report.table(["threads", "tokens", "unpacked oneDNN shapes (out x in)", "F.linear", "engine's forms",
                       "speed-up", "largest logit difference"], prefill_rows),
    ])
    _report.publish(section, args.write_docs, BEGIN, END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
