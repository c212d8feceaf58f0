"""Two style adapters on a small diffusion model, switched and fused, all offline; writes a PNG grid.

No pretrained diffusion weights can be had offline, so the base model is trained here from scratch: a small
``UNet2DModel`` (diffusers) with a DDPM scheduler learns 16x16 images of the digits 0-9, drawn with the DejaVu
Sans font that matplotlib ships (random size, offset and tilt). Two "styles" are the same digits drawn in other
palettes: A is red ink on a yellow ground, B is cyan ink on a dark blue ground. A SHiRA adapter is trained on each
(denoiser only: its convolutions, attention and time-embedding projections; K = r (m + n) values per layer, a
conv's kernel flattened to (out, in * kh * kw)), then the pipeline is switched between them in fused mode (two
scatters per layer) and the two are fused into one (``combine_adapters``, SHiRA paper §4.3). The grid's rows:
base, style A, style B, A+B (same noise each row).

    python examples/diffusion_styles.py --out out/diffusion_styles     # a few minutes on 2 CPU cores
    python examples/diffusion_styles.py --small                        # seconds: the test's setting
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

import shirakit
import shirakit.diffusers as sd
from shirakit.app.diffusion import save_grid

SIDE = 16
PALETTES = {  # (ink, ground) in RGB 0-1
    "base": ((0.05, 0.05, 0.05), (0.95, 0.95, 0.95)),
    "A": ((0.85, 0.05, 0.05), (1.0, 0.9, 0.2)),
    "B": ((0.1, 0.95, 0.95), (0.05, 0.05, 0.35)),
}
# Colour lives in the convolutions (conv_in reads RGB, the ResNet convs carry it), so a palette style needs them;
# the attention and time-embedding projections alone barely move the colours. conv_out (3 x in*9) is left out:
# K = r (m + n) does not fit a 3-row weight for r > 2, and the fused A+B adapter needs room for both masks.
TARGETS = ["conv_in", "conv1", "conv2", "to_q", "to_k", "to_v", "to_out.0", "time_emb_proj"]


def digit_masks(n: int, seed: int) -> torch.Tensor:
    """(n, 1, SIDE, SIDE) ink coverage in [0, 1] of random digits, rendered with matplotlib's packaged font."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rng = np.random.default_rng(seed)
    out = np.empty((n, 1, SIDE, SIDE), dtype=np.float32)
    scale = 4  # render larger, then average down: anti-aliased strokes
    for i in range(n):
        fig = Figure(figsize=(1, 1), dpi=SIDE * scale)
        canvas = FigureCanvasAgg(fig)
        fig.text(0.5 + rng.uniform(-0.08, 0.08), 0.5 + rng.uniform(-0.08, 0.08), str(rng.integers(10)),
                 fontsize=rng.uniform(48, 60) * scale / 4, ha="center", va="center", rotation=rng.uniform(-15, 15),
                 family="DejaVu Sans", weight="bold")
        canvas.draw()
        gray = np.asarray(canvas.buffer_rgba())[..., 0].astype(np.float32) / 255.0
        gray = gray.reshape(SIDE, scale, SIDE, scale).mean(axis=(1, 3))
        out[i, 0] = 1.0 - gray
    return torch.from_numpy(out)


def paint(masks: torch.Tensor, style: str) -> torch.Tensor:
    """Coverage -> RGB in [-1, 1] with the style's ink and ground."""
    ink, ground = (torch.tensor(c).view(1, 3, 1, 1) for c in PALETTES[style])
    return (masks * ink + (1 - masks) * ground) * 2 - 1


def make_pipeline(width: int, seed: int):
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(sample_size=SIDE, in_channels=3, out_channels=3, layers_per_block=1,
                       block_out_channels=(width, 2 * width), norm_num_groups=8,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    scheduler = DDPMScheduler(num_train_timesteps=200, beta_schedule="squaredcos_cap_v2", clip_sample=True)
    pipe = DDPMPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def train_base(pipe, images: torch.Tensor, steps: int, batch: int, lr: float, seed: int, progress: bool) -> float:
    """Plain full training of the base UNet (the denoising loss of shirakit.app.diffusion)."""
    from shirakit.app.diffusion import denoising_loss

    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(pipe.unet.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    pipe.unet.train()
    loss = torch.tensor(0.0)
    for step in range(steps):
        pick = torch.randint(0, len(images), (batch,), generator=g)
        loss = denoising_loss(pipe, images[pick], None, g).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if progress and (step + 1) % max(steps // 10, 1) == 0:
            print(f"  base step {step + 1}/{steps}: loss {loss.item():.4f}", flush=True)
    pipe.unet.eval()
    return float(loss.detach())


def mean_colour(images: torch.Tensor) -> list[float]:
    return [round(v, 3) for v in ((images.clamp(-1, 1) + 1) / 2).mean(dim=(0, 2, 3)).tolist()]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="out/diffusion_styles")
    p.add_argument("--small", action="store_true", help="a seconds-long run (tests): tiny model, few steps")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    small = args.small
    sizes = dict(width=8, images=64, base_steps=30, style_steps=10, batch=16, samples=4, sample_steps=10, r=2) \
        if small else dict(width=16, images=256, base_steps=500, style_steps=80, batch=16, samples=6,
                           sample_steps=40, r=4)
    out = Path(args.out)
    t0 = time.perf_counter()
    masks = digit_masks(sizes["images"], args.seed)
    pipe = make_pipeline(sizes["width"], args.seed)
    print(f"base: UNet2DModel {sum(p.numel() for p in pipe.unet.parameters()):,} parameters, "
          f"{sizes['base_steps']} steps on {len(masks)} digits")
    train_base(pipe, paint(masks, "base"), sizes["base_steps"], sizes["batch"], 2e-3, args.seed, not small)
    print(f"  base trained at {time.perf_counter() - t0:.0f} s")
    for style in ("A", "B"):
        config = shirakit.ShiraConfig(r=sizes["r"], target_modules=TARGETS, random_seed=args.seed + ord(style))
        history = sd.train(pipe, paint(masks, style), adapter=config, adapter_name=style,
                           max_steps=sizes["style_steps"], batch_size=sizes["batch"], lr=2e-2, seed=args.seed,
                           progress=False, gradient_checkpointing=False)
        print(f"style {style}: SHiRA r={sizes['r']}, {sd.trainable_parameters(pipe)[0]:,} values trained, "
              f"loss {history.losses[0]:.4f} -> {history.losses[-1]:.4f}")
        sd.save_adapter(pipe, out / f"style_{style}", style)
    sd.set_adapter(pipe, [])
    sd.combine_adapters(pipe, ["A", "B"], [0.5, 0.5], "AB")
    rows, timings = {}, {}
    for name in (None, "A", "B", "AB"):
        start = time.perf_counter()
        sd.switch_adapter(pipe, name)  # fused: the adapter's values scattered into the weights
        timings[name or "base"] = (time.perf_counter() - start) * 1e3
        rows[name or "base"] = sd_sample(pipe, sizes["samples"], sizes["sample_steps"], args.seed)
    sd.switch_adapter(pipe, None)
    grid = torch.cat([rows[k] for k in ("base", "A", "B", "AB")])
    path = save_grid(torch.nn.functional.interpolate(grid, scale_factor=4, mode="nearest"), out / "styles.png",
                     columns=sizes["samples"])
    colours = {k: mean_colour(v) for k, v in rows.items()}
    print("mean colour (RGB 0-1) per row: " + "; ".join(f"{k} {v}" for k, v in colours.items()))
    print("fused switch times (ms): " + ", ".join(f"{k} {v:.2f}" for k, v in timings.items()))
    print(f"grid written to {path} (rows: base, style A, style B, A+B) in {time.perf_counter() - t0:.0f} s")
    return {"grid": path, "colours": colours, "pipe": pipe}


def sd_sample(pipe, n: int, steps: int, seed: int) -> torch.Tensor:
    from shirakit.app.diffusion import sample

    return sample(pipe, None, n, steps, seed)


if __name__ == "__main__":
    main()
