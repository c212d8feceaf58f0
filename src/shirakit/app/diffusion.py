"""Training a style or subject adapter on a diffusion pipeline from a folder of images (DreamBooth-style).

The loss is the denoising objective of DDPM (Ho et al. 2020, arXiv 2006.11239): for an image's latent ``x0``,
noise ``e ~ N(0, I)`` and a step ``t ~ U{0..T-1}``, ``x_t = scheduler.add_noise(x0, e, t)`` and

    L = || f(x_t, t, c) - target ||^2,   target = e (epsilon prediction) or v = a_t e - s_t x0 (v prediction)

with ``c`` the prompt's text-encoder states (text-conditioned UNets; unconditional UNets take none). Prior
preservation (DreamBooth, Ruiz et al. 2022, arXiv 2208.12242) adds ``w * L`` on images of the class, with the class
prompt, so the adapter learns the subject without forgetting the class. Only the adapter's values train; the base,
the VAE and the scheduler stay as they are.
"""

from __future__ import annotations

import inspect
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from ..core.config import AdapterConfig
from ..core.extras import require
from ..integrations import diffusers as sd

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass
class DiffusionHistory:
    """The loss of every optimizer step, and the sample image written after each epoch."""

    losses: list[float] = field(default_factory=list)
    epoch_loss: list[float] = field(default_factory=list)
    samples: list[str] = field(default_factory=list)
    seconds: float = 0.0


# ---- images -----------------------------------------------------------------------------------------------------
def image_geometry(pipe) -> tuple[int, int]:
    """(channels, side) of the images the pipeline makes: the VAE's input, or the denoiser's own sample."""
    denoiser = getattr(pipe, sd.denoiser_name(pipe))
    vae = getattr(pipe, "vae", None)
    size = denoiser.config.sample_size
    size = size[0] if isinstance(size, (list, tuple)) else size
    if vae is not None:
        scale = 2 ** (len(vae.config.block_out_channels) - 1)
        return vae.config.in_channels, int(size) * scale
    return denoiser.config.in_channels, int(size)


def load_images(folder: str | Path, channels: int, side: int) -> torch.Tensor:
    """Every image in ``folder`` as (N, channels, side, side) in [-1, 1]: centre-cropped square, resized."""
    Image = require("PIL.Image", "reading training images")

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: expected a folder of images ({', '.join(IMAGE_SUFFIXES)})")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise ValueError(f"{folder}: expected image files ({', '.join(IMAGE_SUFFIXES)}), found none")
    mode = {1: "L", 3: "RGB"}.get(channels)
    if mode is None:
        raise ValueError(f"expected a pipeline making 1- or 3-channel images, found {channels} channels")
    out = []
    for path in paths:
        try:
            with Image.open(path) as image:
                image = image.convert(mode)
        except OSError as exc:
            raise ValueError(f"{path}: not a readable image: {exc}") from None
        w, h = image.size
        s = min(w, h)
        image = image.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
        image = image.resize((side, side), Image.BICUBIC)
        data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(side, side, channels)
        out.append(data.permute(2, 0, 1).float() / 127.5 - 1.0)
    return torch.stack(out)


def save_grid(images: torch.Tensor, path: str | Path, columns: int | None = None) -> Path:
    """(N, C, H, W) in [-1, 1] written as one PNG grid."""
    Image = require("PIL.Image", "reading training images")

    n, c, h, w = images.shape
    columns = columns or n
    rows = math.ceil(n / columns)
    grid = torch.full((c, rows * h, columns * w), -1.0)
    for i, image in enumerate(images):
        r, k = divmod(i, columns)
        grid[:, r * h:(r + 1) * h, k * w:(k + 1) * w] = image
    pixels = ((grid.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).contiguous()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = "L" if c == 1 else "RGB"
    Image.fromarray(pixels.squeeze(-1).numpy() if c == 1 else pixels.numpy(), mode).save(path)
    return path


# ---- one step --------------------------------------------------------------------------------------------------
def _conditioned(denoiser) -> bool:
    return "encoder_hidden_states" in inspect.signature(denoiser.forward).parameters


def encode_prompt(pipe, prompts: list[str]) -> torch.Tensor:
    """The text encoder's last hidden states for ``prompts`` (gradients flow when it holds a trainable adapter)."""
    tokenizer, encoder = getattr(pipe, "tokenizer", None), getattr(pipe, "text_encoder", None)
    if tokenizer is None or encoder is None:
        raise ValueError("a text-conditioned denoiser needs the pipeline's tokenizer and text_encoder; found none")
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(encoder.device)
    return encoder(ids)[0]


def _latents(pipe, pixels: torch.Tensor) -> torch.Tensor:
    vae = getattr(pipe, "vae", None)
    if vae is None:
        return pixels
    with torch.no_grad():
        latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.sample()
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * vae.config.scaling_factor


def denoising_loss(pipe, pixels: torch.Tensor, prompts: list[str] | None, generator: torch.Generator) -> torch.Tensor:
    """Per-image mean squared error of the denoiser's prediction (module docstring), shape (N,)."""
    denoiser = getattr(pipe, sd.denoiser_name(pipe))
    scheduler = pipe.scheduler
    x0 = _latents(pipe, pixels).to(denoiser.device, denoiser.dtype)
    noise = torch.randn(x0.shape, generator=generator).to(x0)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (x0.shape[0],), generator=generator).to(x0.device)
    noisy = scheduler.add_noise(x0, noise, t)
    kind = scheduler.config.get("prediction_type", "epsilon")
    if kind == "epsilon":
        target = noise
    elif kind == "v_prediction":
        target = scheduler.get_velocity(x0, noise, t)
    else:
        raise ValueError(f"expected a scheduler predicting epsilon or v_prediction, found {kind!r}")
    extra = {"encoder_hidden_states": encode_prompt(pipe, prompts)} if _conditioned(denoiser) else {}
    pred = denoiser(noisy, t, **extra).sample
    return F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=tuple(range(1, pred.dim())))


# ---- sampling --------------------------------------------------------------------------------------------------
@torch.no_grad()
def sample(pipe, prompt: str | None, n: int = 4, steps: int = 20, seed: int = 0) -> torch.Tensor:
    """``n`` images from the pipeline as (N, C, H, W) in [-1, 1], the same noise for the same seed."""
    generator = torch.Generator().manual_seed(seed)
    denoiser = getattr(pipe, sd.denoiser_name(pipe))
    if _conditioned(denoiser):
        out = pipe([prompt or ""] * n, num_inference_steps=steps, generator=generator, output_type="pt")
        return out.images.float() * 2 - 1
    out = pipe(batch_size=n, num_inference_steps=steps, generator=generator, output_type="np")
    return torch.from_numpy(out.images).permute(0, 3, 1, 2).float() * 2 - 1


# ---- the loop --------------------------------------------------------------------------------------------------
def _autocast(mixed_precision: str, device: torch.device):
    if mixed_precision == "auto":
        use = device.type == "cuda" and torch.cuda.is_bf16_supported()
        mixed_precision = "bf16" if use else "no"
    if mixed_precision == "no":
        return torch.autocast(device.type, enabled=False)
    if mixed_precision not in ("bf16", "fp16"):
        raise ValueError(f"mixed_precision: expected 'auto', 'no', 'bf16' or 'fp16', found {mixed_precision!r}")
    dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def train(
    pipe,
    images: str | Path | torch.Tensor,
    *,
    prompt: str | None = None,
    adapter: AdapterConfig | dict[str, AdapterConfig] | None = None,
    adapter_name: str = "default",
    epochs: int = 1,
    max_steps: int | None = None,
    batch_size: int = 4,
    lr: float = 1e-3,
    class_images: str | Path | torch.Tensor | None = None,
    class_prompt: str | None = None,
    prior_loss_weight: float = 1.0,
    gradient_checkpointing: bool = True,
    mixed_precision: str = "auto",
    samples_dir: str | Path | None = None,
    sample_steps: int = 20,
    n_samples: int = 4,
    seed: int = 0,
    progress: bool = True,
    on_epoch: Callable[[DiffusionHistory], None] | None = None,
) -> DiffusionHistory:
    """Train adapter ``adapter_name`` on ``images`` (a folder, or (N, C, H, W) in [-1, 1]) with ``prompt``.

    ``adapter``: a config for the denoiser, ``{component: config}``, or None to train an adapter the pipeline
    already holds (:func:`shirakit.diffusers.inject` / ``load_adapter(..., is_trainable=True)``). ``class_images``
    and ``class_prompt``: prior preservation, weighted by ``prior_loss_weight``. ``samples_dir``: a grid of
    ``n_samples`` images written after each epoch (``epoch-<k>.png``). Returns the loss history.
    """
    if adapter is not None:
        sd.inject(pipe, adapter, adapter_name)
    elif adapter_name not in sd.adapter_names(pipe):
        raise KeyError(f"no adapter {adapter_name!r} in the pipeline and no config given to make one")
    sd.set_adapter(pipe, adapter_name)
    denoiser = getattr(pipe, sd.denoiser_name(pipe))
    if _conditioned(denoiser) and prompt is None:
        raise ValueError("this denoiser is text-conditioned: pass the prompt that names the style or subject")
    channels, side = image_geometry(pipe)
    data = images if isinstance(images, torch.Tensor) else load_images(images, channels, side)
    prior = None
    if class_images is not None:
        if _conditioned(denoiser) and class_prompt is None:
            raise ValueError("prior preservation needs class_prompt beside class_images")
        prior = class_images if isinstance(class_images, torch.Tensor) else load_images(class_images, channels, side)
    params = [p for m in sd.adapted(pipe).values() for p in m.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"adapter {adapter_name!r} has no trainable parameters (loaded without is_trainable=True?)")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    per_epoch = math.ceil(len(data) / batch_size)
    total = max_steps if max_steps is not None else epochs * per_epoch
    epochs = math.ceil(total / per_epoch)
    if gradient_checkpointing and getattr(denoiser, "_supports_gradient_checkpointing", False):
        denoiser.enable_gradient_checkpointing()
    generator = torch.Generator().manual_seed(seed)
    history, start = DiffusionHistory(), time.perf_counter()
    bar = _bar(total, progress)
    modules = list(sd.adapted(pipe).values())
    try:
        for m in modules:
            m.train()
        for epoch in range(epochs):
            order = torch.randperm(len(data), generator=generator)
            epoch_losses = []
            for i in range(0, len(data), batch_size):
                if len(history.losses) >= total:
                    break
                batch = data[order[i:i + batch_size]]
                with _autocast(mixed_precision, denoiser.device):
                    loss = denoising_loss(pipe, batch, [prompt] * len(batch) if prompt else None, generator).mean()
                    if prior is not None:
                        pick = torch.randint(0, len(prior), (len(batch),), generator=generator)
                        cls = [class_prompt] * len(batch) if class_prompt else None
                        loss = loss + prior_loss_weight * denoising_loss(pipe, prior[pick], cls, generator).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                value = float(loss.detach())
                history.losses.append(value)
                epoch_losses.append(value)
                bar.update(1)
                bar.set_postfix(loss=f"{value:.4f}")
            history.epoch_loss.append(sum(epoch_losses) / max(len(epoch_losses), 1))
            history.seconds = time.perf_counter() - start
            if samples_dir is not None:
                for m in modules:
                    m.eval()
                grid = sample(pipe, prompt, n_samples, sample_steps, seed)
                history.samples.append(str(save_grid(grid, Path(samples_dir) / f"epoch-{epoch + 1}.png")))
                for m in modules:
                    m.train()
            if on_epoch is not None:
                on_epoch(history)
    finally:
        bar.close()
        for m in modules:
            m.eval()
        if gradient_checkpointing and getattr(denoiser, "_supports_gradient_checkpointing", False):
            denoiser.disable_gradient_checkpointing()
    history.seconds = time.perf_counter() - start
    return history


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def set_postfix(self, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


def _bar(total: int, progress: bool):
    if not progress:
        return _NoBar()
    try:
        tqdm = require("tqdm.auto", "the progress bar").tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc="diffusion adapter", unit="step")
