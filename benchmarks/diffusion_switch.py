"""Style adapters on a full-size SDXL UNet: shirakit SHiRA's fused switch vs diffusers' own LoRA path.

    python benchmarks/diffusion_switch.py                     # SDXL UNet (2.6 B parameters), fp32 and fp16
    python benchmarks/diffusion_switch.py --threads 1 2
    python benchmarks/diffusion_switch.py --small             # a small UNet of the same layout: seconds (CI)

The UNet is built from SDXL-base-1.0's published ``unet/config.json`` (written below) with random weights: switching
cost depends on the shapes, not the values. Adapters target the attention projections diffusers' SDXL LoRA scripts
train (``to_q``, ``to_k``, ``to_v``, ``to_out.0``; 700 layers in SDXL); SHiRA and LoRA use the same r, which gives
both exactly the same trainable parameter count (SHiRA: K = r (m + n) values per layer = LoRA's r (m + n)).

Rows (medians over ``--reps`` rounds, every row once per round; the same UNet object throughout, one phase per
library, the base weights checked bit-identical at the end of the shirakit phase):
- diffusers LoRA ``load + fuse``: ``unet.load_lora_adapter(file, prefix="unet")`` + ``unet.fuse_lora()``: the first
  load from disk (page cache warm) of a ``pytorch_lora_weights.safetensors``; what ``pipe.load_lora_weights`` +
  ``pipe.fuse_lora`` run on the UNet.
- diffusers LoRA switch: with X fused, ``unfuse_lora()`` + ``set_adapters(Y)`` + ``fuse_lora(adapter_names=[Y])``,
  both adapters loaded.
- shirakit SHiRA ``load + fuse``: ``shirakit.diffusers.load_adapter(pipe, folder, merge=True)`` from the pipeline
  folder layout.
- shirakit SHiRA switch: ``shirakit.diffusers.switch_adapter(pipe, B)`` with A fused (both loaded; warm: each seen).
- denoiser step (one UNet forward, batch 1, ``--latent`` x ``--latent`` latent, 77 text tokens): bare base; SHiRA
  active unmerged (its values ride in the weight: the base product); diffusers LoRA unfused (``set_adapters``).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import machine_facts, table  # noqa: E402

# stabilityai/stable-diffusion-xl-base-1.0, unet/config.json (the fields that shape the model)
SDXL_UNET = {
    "act_fn": "silu", "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
    "center_input_sample": False, "class_embed_type": None, "class_embeddings_concat": False, "conv_in_kernel": 3,
    "conv_out_kernel": 3, "cross_attention_dim": 2048, "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], "downsample_padding": 1,
    "dual_cross_attention": False, "encoder_hid_dim": None, "encoder_hid_dim_type": None, "flip_sin_to_cos": True,
    "freq_shift": 0, "in_channels": 4, "layers_per_block": 2, "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05,
    "norm_num_groups": 32, "num_attention_heads": None, "num_class_embeds": None, "only_cross_attention": False,
    "out_channels": 4, "projection_class_embeddings_input_dim": 2816, "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False, "resnet_time_scale_shift": "default", "sample_size": 128,
    "time_cond_proj_dim": None, "time_embedding_act_fn": None, "time_embedding_dim": None,
    "time_embedding_type": "positional", "timestep_post_act": None, "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "upcast_attention": None,
    "use_linear_projection": True,
}
# the same layout, small (the --small mode CI runs)
SMALL_UNET = {**SDXL_UNET, "block_out_channels": [32, 64, 128], "attention_head_dim": [2, 4, 8],
              "cross_attention_dim": 64, "transformer_layers_per_block": [1, 1, 2], "norm_num_groups": 8,
              "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 64 + 6 * 8,
              "addition_embed_type_num_heads": 8}
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def build_unet(config: dict, dtype: torch.dtype):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        unet = UNet2DConditionModel.from_config(config)
    return unet.to(dtype).eval().requires_grad_(False)


def unet_inputs(config: dict, latent: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    text = config["cross_attention_dim"]
    pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
    return dict(sample=torch.randn(1, 4, latent, latent, generator=g).to(dtype), timestep=torch.tensor([500]),
                encoder_hidden_states=torch.randn(1, 77, text, generator=g).to(dtype),
                added_cond_kwargs={"text_embeds": torch.randn(1, pooled, generator=g).to(dtype),
                                   "time_ids": torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]]).to(dtype)})


def save_diffusers_lora(unet, folder: Path, r: int, seed: int) -> Path:
    """A LoRA saved the way diffusers' training scripts save one (peft layers, ``save_lora_weights``)."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    unet.add_adapter(LoraConfig(r=r, lora_alpha=r, target_modules=TARGETS, init_lora_weights=False), "tmp")
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, adapter_name="tmp"))
    StableDiffusionXLPipeline.save_lora_weights(folder, unet_lora_layers=layers,
                                                unet_lora_adapter_metadata={"r": r, "lora_alpha": r,
                                                                            "target_modules": TARGETS})
    unet.unload_lora()  # the peft layers out again: the plain nn.Linear modules back
    return folder / "pytorch_lora_weights.safetensors"


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def median(values: list[float]) -> str:
    return f"{statistics.median(values):.1f}" if values else "-"


def diffusers_phase(unet, files: dict[str, Path], reps: int, inputs: dict, steps: bool) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"load+fuse": [], "switch": [], "step_unfused": []}
    for _ in range(reps):
        out["load+fuse"].append(timed(lambda: (unet.load_lora_adapter(str(files["X"]), prefix="unet", adapter_name="X"),
                                               unet.fuse_lora(adapter_names=["X"]))))
        unet.load_lora_adapter(str(files["Y"]), prefix="unet", adapter_name="Y")
        for dst in ("Y", "X"):
            out["switch"].append(timed(lambda dst=dst: (unet.unfuse_lora(), unet.set_adapters(dst),
                                                        unet.fuse_lora(adapter_names=[dst]))))
        unet.unfuse_lora()
        if steps:
            unet.set_adapters("X")
            with torch.no_grad():
                out["step_unfused"].append(timed(lambda: unet(**inputs)))
        unet.unload_lora()
    return out


def shirakit_phase(pipe, folders: dict[str, Path], reps: int, inputs: dict, steps: bool) -> dict[str, list[float]]:
    import shirakit.diffusers as sd

    unet = pipe["unet"]
    out: dict[str, list[float]] = {"load+fuse": [], "switch": [], "step_base": [], "step_active": []}
    for _ in range(reps):
        out["load+fuse"].append(timed(lambda: sd.load_adapter(pipe, folders["A"], "A", merge=True)))
        sd.load_adapter(pipe, folders["B"], "B")
        sd.switch_adapter(pipe, "A")
        sd.switch_adapter(pipe, "B")  # warm: both seen once in this base state
        for dst in ("A", "B", "A", "B"):
            out["switch"].append(timed(lambda dst=dst: sd.switch_adapter(pipe, dst)))
        if steps:
            sd.switch_adapter(pipe, None)
            with torch.no_grad():
                out["step_base"].append(timed(lambda: unet(**inputs)))
                sd.set_adapter(pipe, "A")  # unmerged: A's values ride in the weight
                out["step_active"].append(timed(lambda: unet(**inputs)))
        sd.switch_adapter(pipe, None)
        sd.unload(pipe)
    return out


def run(config: dict, dtype: torch.dtype, threads: int, args) -> dict[str, dict[str, list[float]]]:
    import shirakit
    import shirakit.diffusers as sd

    torch.set_num_threads(threads)
    unet = build_unet(config, dtype)
    inputs = unet_inputs(config, args.latent, dtype)
    steps = dtype == torch.float32 and not args.no_steps  # fp16 convolutions on a CPU are not what users run
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = {n: save_diffusers_lora(unet, tmp / f"lora_{n}", args.r, seed) for n, seed in (("X", 1), ("Y", 2))}
        pipe = {"unet": unet}
        folders = {}
        for n, seed in (("A", 1), ("B", 2)):
            sd.inject(pipe, shirakit.ShiraConfig(r=args.r, target_modules=TARGETS, random_seed=seed), n)
            with torch.no_grad():
                for name, p in unet.named_parameters():
                    if f".adapters.{n}." in name:
                        p.normal_(0, 0.01)
            folders[n] = sd.save_adapter(pipe, tmp / f"shira_{n}", n)
            sd.unload(pipe)
        theirs = diffusers_phase(unet, files, args.reps, inputs, steps)
        gc.collect()
        # diffusers' unfuse subtracts (rounding): the base shirakit's phase must restore is the one it starts from
        base = {k: v.clone() for k, v in unet.state_dict().items()} if args.small else None
        ours = shirakit_phase(pipe, folders, args.reps, inputs, steps)
    if base is not None:
        assert all(torch.equal(base[k], v) for k, v in unet.state_dict().items()), "base changed"
    del unet
    gc.collect()
    return {"diffusers": theirs, "shirakit": ours}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true", help="a small UNet of SDXL's layout, 2 reps: seconds")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--dtypes", nargs="+", default=["float32", "float16"], choices=["float32", "float16", "bfloat16"])
    p.add_argument("--r", type=int, default=16, help="SHiRA and LoRA rank (equal trainable parameters)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--latent", type=int, default=32, help="latent side of the step rows (32: 256x256 images)")
    p.add_argument("--no-steps", action="store_true", help="skip the denoiser step rows")
    args = p.parse_args(argv)
    if args.small:
        args.reps, args.latent = min(args.reps, 2), 8
    config = SMALL_UNET if args.small else SDXL_UNET
    facts = machine_facts("python benchmarks/diffusion_switch.py " + " ".join(argv or sys.argv[1:]))
    print(json.dumps(facts))
    rows = []
    for dtype_name in args.dtypes:
        for threads in args.threads:
            res = run(config, getattr(torch, dtype_name), threads, args)
            d, s = res["diffusers"], res["shirakit"]
            ratio = statistics.median(d["switch"]) / statistics.median(s["switch"])
            load_ratio = statistics.median(d["load+fuse"]) / statistics.median(s["load+fuse"])
            step = (f"{statistics.median(s['step_active']) / statistics.median(s['step_base']):.3f} / "
                    f"{statistics.median(d['step_unfused']) / statistics.median(s['step_base']):.3f}"
                    if s["step_base"] else "-")
            rows.append([dtype_name, str(threads), median(d["load+fuse"]), median(s["load+fuse"]), f"{load_ratio:.1f}x",
                         median(d["switch"]), median(s["switch"]), f"{ratio:.1f}x", median(s["step_base"]), step])
            print(table(["dtype", "threads", "diffusers LoRA load+fuse ms", "SHiRA load+fuse ms", "ratio",
                         "diffusers unfuse+fuse ms", "SHiRA switch ms", "ratio", "base step ms",
                         "step SHiRA / LoRA-unfused vs base"], rows[-1:]), flush=True)
    print("\nall rows (medians; ratio = diffusers / shirakit):")
    print(table(["dtype", "threads", "diffusers LoRA load+fuse ms", "SHiRA load+fuse ms", "ratio",
                 "diffusers unfuse+fuse ms", "SHiRA switch ms", "ratio", "base step ms",
                 "step SHiRA / LoRA-unfused vs base"], rows))


if __name__ == "__main__":
    main()
