"""Would compiling the serving engine's decode step pay on CPU? SmolLM2-135M's decoder layers as ONE
torch.compile graph against the same Python code run eager, interleaved in one process.

    python benchmarks/compiled_decode_probe.py [--rows 16] [--rounds 15] [--threads 2]

A feasibility measurement for the next lever of docs/benchmarks.md ("both engines now generate the same
tokens"), not the engine's code path: one decode token for each of ``--rows`` rows at ~100 cached
tokens; the KV write and the decoding rows' attention (``kv.decode_attention``) are one opaque custom op
per layer (so the layer stack has no graph break), every linear is oneDNN's product on a packed weight
copy behind a custom op (inductor lowers ``mkldnn._linear_pointwise`` only for frozen constant weights,
and SHiRA writes into the weights); embeddings, final norm and output layer stay eager in both. Prints
the first compiled call's time (the compile), the largest logit difference, and the median step times
with the median of per-round ratios. Why one graph: the layers compiled one by one, with the attention as
a graph break, ran 1.1x SLOWER than eager here (each compiled region's call costs more than the few
small ops it fuses).
"""

import argparse
import statistics
import time
import types
from typing import Optional

import torch
from transformers import AutoModelForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from shirakit.data import smollm2_dir
from shirakit.serve.kv import decode_attention

ROUNDS_WARM = 3
CAPACITY = 256  # key/value positions per slot


@torch.library.custom_op("shirakit_probe::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], out: int) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@packed_linear.register_fake
def _(x, weight, bias, out):
    return x.new_empty(x.shape[0], out)


def packed_forward(layer, x):
    return packed_linear(x.reshape(-1, x.shape[-1]), layer.packed, layer.bias, layer.out_features).view(
        *x.shape[:-1], -1)


@torch.library.custom_op("shirakit_probe::decode_attention", mutates_args=("keys", "values"))
def write_and_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                     slots: torch.Tensor, positions: torch.Tensor, bias: torch.Tensor, scaling: float) -> torch.Tensor:
    """Write row i's new key/value at (slots[i], positions[i]), then attend: q (1, heads, rows, dim)."""
    _, heads, rows, dim = q.shape
    kv_heads = k.shape[1]
    keys[slots, :, positions] = k[0].transpose(0, 1)
    values[slots, :, positions] = v[0].transpose(0, 1)
    seen = bias.shape[-1]
    flat = q.transpose(1, 2).reshape(rows, kv_heads, heads // kv_heads, dim)
    out = decode_attention(flat, keys[:rows, :, :seen], values[:rows, :, :seen], bias, scaling)
    return out.reshape(1, rows, heads * dim)


@write_and_attend.register_fake
def _(q, k, v, keys, values, slots, positions, bias, scaling):
    return q.new_empty(1, q.shape[2], q.shape[1] * q.shape[3])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir(), dtype=torch.float32).eval()
    config = model.config
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.packed = torch.ops.mkldnn._reorder_linear_weight(module.weight.detach(), 16)
            module.forward = types.MethodType(packed_forward, module)
    dim = config.hidden_size // config.num_attention_heads
    shape = (max(args.rows, 1), config.num_key_value_heads, CAPACITY, dim)
    buffers = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(config.num_hidden_layers)]
    step_tensors = {}

    def attention_forward(self, hidden_states, position_embeddings=None, **_):
        split = (*hidden_states.shape[:-1], -1, self.head_dim)
        q = self.q_proj(hidden_states).view(split).transpose(1, 2)
        k = self.k_proj(hidden_states).view(split).transpose(1, 2)
        v = self.v_proj(hidden_states).view(split).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, *position_embeddings)
        keys, values = buffers[self.layer_idx]
        out = write_and_attend(q, k, v, keys, values, step_tensors["slots"], step_tensors["positions"],
                               step_tensors["bias"], self.scaling)
        return self.o_proj(out), None

    for layer in model.model.layers:
        layer.self_attn.forward = types.MethodType(attention_forward, layer.self_attn)

    def layers(hidden, cos, sin, slots, positions, bias):
        step_tensors.update(slots=slots, positions=positions, bias=bias)
        for layer in model.model.layers:
            hidden = layer(hidden, position_embeddings=(cos, sin))
        return hidden

    compiled = torch.compile(layers, dynamic=True)
    positions = torch.arange(90, 90 + args.rows)
    seen = int(positions.max()) + 1
    hidden_mask = ~(torch.arange(seen)[None, :] <= positions[:, None])[:, None, None]
    bias = torch.zeros(args.rows, 1, 1, seen).masked_fill_(hidden_mask, float("-inf"))
    ids = torch.randint(0, 1000, (1, args.rows))

    def step(run):
        with torch.inference_mode():
            hidden = model.model.embed_tokens(ids)
            cos, sin = model.model.rotary_emb(hidden, positions.view(1, -1))
            hidden = run(hidden, cos, sin, torch.arange(args.rows), positions, bias)
            return model.lm_head(model.model.norm(hidden))

    reference = step(layers)
    began = time.perf_counter()
    out = step(compiled)
    print(f"first compiled step (the compile): {time.perf_counter() - began:.1f} s; largest logit difference "
          f"{(out - reference).abs().max().item():.2e}; same greedy tokens: "
          f"{bool((out.argmax(-1) == reference.argmax(-1)).all())}", flush=True)
    for _ in range(ROUNDS_WARM):
        step(compiled)
        step(layers)
    times = {"eager": [], "compiled": []}
    for round_ in range(args.rounds):
        for name in ("eager", "compiled") if round_ % 2 else ("compiled", "eager"):
            began = time.perf_counter()
            step(layers if name == "eager" else compiled)
            times[name].append(time.perf_counter() - began)
    ratios = [c / e for c, e in zip(times["compiled"], times["eager"])]
    print(f"{args.rows} rows, {args.threads} threads, {args.rounds} rounds: eager "
          f"{statistics.median(times['eager']) * 1e3:.1f} ms, compiled {statistics.median(times['compiled']) * 1e3:.1f}"
          f" ms; compiled / eager {statistics.median(ratios):.3f} (median of per-round ratios)")


if __name__ == "__main__":
    main()
