"""LoRA files made for diffusers (``pytorch_lora_weights.safetensors``) read into shirakit LoRA adapters.

A LoRA layer computes ``y = W x + s B A x`` with ``s = alpha / r`` (Hu et al. 2021, arXiv 2106.09685). Three key
layouts are read, all in one safetensors file:

- diffusers / PEFT: ``<component>.<module path>.lora_A.weight`` and ``.lora_B.weight`` (what
  ``pipe.save_lora_weights`` writes), ``r`` and ``lora_alpha`` in the ``lora_adapter_metadata`` JSON (keys
  ``<component>.lora_alpha``) when present, else ``alpha = r`` as diffusers assumes;
- older diffusers: ``.lora.down.weight`` / ``.lora.up.weight``, ``.lora_linear_layer.down.weight``,
  ``processor.to_q_lora.down.weight`` (``to_out_lora`` is ``to_out.0``); keys without a component prefix are the
  denoiser's;
- kohya: ``lora_unet_<path with _>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``; ``lora_te_`` /
  ``lora_te1_`` is ``text_encoder``, ``lora_te2_`` ``text_encoder_2``, ``lora_transformer_`` ``transformer``. The path
  is found among the component's own module names (dots as underscores), so only models whose module names are
  diffusers' (SD 1.x/2.x UNets, transformers text encoders) resolve; an LDM-named SDXL UNet key is refused by name.

Each component becomes one shirakit ``LoraConfig`` whose ``target_modules`` are the exact module paths. Layers with
another rank or alpha than the rest are made equal without changing the delta: A and B padded with zero rows and
columns up to the largest rank, and B scaled by ``(alpha_l / r_l) / (alpha / r)``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ..io.checkpoint import AdapterFiles

METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2",
                  "lora_te_": "text_encoder", "lora_transformer_": "transformer"}
# suffix of a key -> which LoRA tensor it is
_ROLES = [(".lora_A.weight", "A"), (".lora_B.weight", "B"), (".lora.down.weight", "A"), (".lora.up.weight", "B"),
          (".lora_linear_layer.down.weight", "A"), (".lora_linear_layer.up.weight", "B"),
          (".lora_down.weight", "A"), (".lora_up.weight", "B"), (".alpha", "alpha")]
_KOHYA_TABLES: dict[int, dict[str, set[str]]] = {}  # component -> flat name -> paths, for one read
_PROCESSOR = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)_lora$")


def read_lora_file(modules: dict[str, nn.Module], denoiser: str | None, path: str | Path) -> dict[str, AdapterFiles]:
    """The file's LoRA per component of ``modules`` (a pipeline's components; ``denoiser``: the one that takes keys
    without a component prefix), as :class:`AdapterFiles` (config + tensors under PEFT's file keys) that
    :func:`shirakit.load_adapter` takes; nothing in the pipeline changes."""
    path = Path(path)
    tensors, metadata = _read(path)
    _KOHYA_TABLES.clear()
    parts: dict[str, dict[str, dict[str, torch.Tensor]]] = {}  # component -> module path -> role -> tensor
    for key, value in tensors.items():
        component, module_path, role = _parse(key, modules, path, denoiser)
        slot = parts.setdefault(component, {}).setdefault(module_path, {})
        if role in slot:
            raise ValueError(f"{path}: two keys give the {role} of {component}.{module_path} (e.g. {key!r})")
        slot[role] = value
    if not parts:
        raise ValueError(f"{path}: no LoRA tensors found")
    _KOHYA_TABLES.clear()
    return {c: _adapter_files(path, c, layers, _metadata_of(metadata, c, path)) for c, layers in parts.items()}


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: expected a .safetensors LoRA file (pickled .bin files are not read)")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{path}: not a readable safetensors file: {exc}") from None
    return tensors, metadata


def _metadata_of(metadata: dict, component: str, path: Path) -> dict:
    raw = metadata.get(METADATA_KEY)
    if not raw:
        return {}
    try:
        found = json.loads(raw)
    except ValueError:
        raise ValueError(f"{path}: metadata {METADATA_KEY!r} is not JSON") from None
    prefix = f"{component}."
    own = {k[len(prefix):]: v for k, v in found.items() if k.startswith(prefix)}
    for field in ("use_dora", "rank_pattern", "alpha_pattern"):
        if own.get(field):
            raise ValueError(f"{path}: {component}.{field} = {own[field]!r}; shirakit reads plain LoRA only")
    return own


def _parse(key: str, modules: dict[str, nn.Module], path: Path, denoiser: str | None) -> tuple[str, str, str]:
    """(component, module path, role) of one file key."""
    for suffix, role in _ROLES:  # noqa: B007 (role is read after the break)
        if key.endswith(suffix):
            stem = key[: -len(suffix)]
            break
    else:
        raise ValueError(f"{path}: key {key!r} is no LoRA tensor this reader knows (lora_A/B, lora.down/up, "
                         f"lora_down/up, alpha); DoRA and other adapter types are not read")
    for prefix, component in KOHYA_PREFIXES.items():
        if stem.startswith(prefix):
            if component == "unet" and component not in modules and "transformer" in modules:
                component = "transformer"
            return component, _kohya_path(stem[len(prefix):], component, modules, path, key), role
    head, _, rest = stem.partition(".")
    if head not in modules and denoiser is None:
        raise ValueError(f"{path}: key {key!r} names no component of this pipeline ({sorted(modules)})")
    component, module_path = (head, rest) if head in modules else (denoiser, stem)
    module_path = _PROCESSOR.sub(lambda m: "." + ("to_out.0" if m.group(1) == "to_out" else m.group(1)), module_path)
    module_path = module_path.removesuffix(".processor")
    if role == "alpha":
        raise ValueError(f"{path}: key {key!r}: an alpha tensor outside kohya's naming")
    return component, module_path, role


def _kohya_path(flat: str, component: str, modules: dict[str, nn.Module], path: Path, key: str) -> str:
    if component not in modules:
        raise ValueError(f"{path}: key {key!r} is for component {component!r}, which this pipeline lacks "
                         f"({sorted(modules)})")
    table = _KOHYA_TABLES.get(id(modules[component]))
    if table is None:
        table = _KOHYA_TABLES[id(modules[component])] = {}
        for name, _ in modules[component].named_modules():
            name = name.removesuffix(".base_layer")  # a component shirakit already wrapped
            table.setdefault(name.replace(".", "_"), set()).add(name)
    found = table.get(flat, set())
    if len(found) != 1:
        what = "no module" if not found else f"several modules {sorted(found)}"
        raise ValueError(f"{path}: key {key!r}: {what} of {component} is named {flat!r} with '.' read as '_' "
                         "(kohya files for LDM-named models, e.g. SDXL's input_blocks, need a converted file)")
    return next(iter(found))


def _adapter_files(path: Path, component: str, layers: dict[str, dict[str, torch.Tensor]], meta: dict):
    from ..methods.lora import LoraConfig

    for module_path, roles in layers.items():
        missing = {"A", "B"} - set(roles)
        if missing:
            raise ValueError(f"{path}: {component}.{module_path} has no lora_{'/'.join(sorted(missing))} tensor")
        a, b = roles["A"], roles["B"]
        if a.dim() not in (2, 4) or b.dim() != a.dim() or b.shape[1] != a.shape[0]:
            raise ValueError(f"{path}: {component}.{module_path}: expected A (r, in) and B (out, r) of a linear "
                             f"layer, or a conv's A (r, in, kh, kw) and B (out, r, 1, 1); found A {tuple(a.shape)} "
                             f"and B {tuple(b.shape)}")
    ranks = {p: roles["A"].shape[0] for p, roles in layers.items()}
    default_alpha = meta.get("lora_alpha")
    alphas = {p: float(roles["alpha"]) if "alpha" in roles else float(default_alpha if default_alpha else ranks[p])
              for p, roles in layers.items()}
    r = max(ranks.values())
    uniform = len(set(ranks.values())) == 1 and len(set(alphas.values())) == 1
    alpha = next(iter(alphas.values())) if uniform else float(r)
    tensors = {}
    for module_path, roles in layers.items():
        a, b = roles["A"], roles["B"]
        if not uniform:  # same delta under one (r, alpha): zero rows/columns, B carries the scale ratio
            pad = r - a.shape[0]
            ratio = (alphas[module_path] / ranks[module_path]) / (alpha / r)
            a = torch.cat([a, a.new_zeros(pad, *a.shape[1:])])
            b = torch.cat([(b.float() * ratio).to(b.dtype), b.new_zeros(b.shape[0], pad, *b.shape[2:])], dim=1)
        tensors[f"base_model.model.{module_path}.lora_A.weight"] = a
        tensors[f"base_model.model.{module_path}.lora_B.weight"] = b
    config = LoraConfig(r=int(r), lora_alpha=alpha, target_modules=sorted(layers),
                        use_rslora=bool(meta.get("use_rslora", False)))
    return AdapterFiles(path / component, config, path, tensors, {})
