"""Figures for people: the per-layer AWOR heatmap (matplotlib, imported on use)."""

from __future__ import annotations

import re

import torch

from ..core.extras import require
from ..model.metrics import Orthogonality


def heatmap(rows: list[Orthogonality], path, title: str = "AWOR per layer") -> None:
    """A PNG: one cell per layer (blocks x projection when names allow), colour = AWOR."""
    matplotlib = require("matplotlib", "the figures")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks, kinds, cells = [], [], {}
    for row in rows:
        match = re.match(r"(.*?\.)(\d+)\.(.*)", row.layer)
        block, kind = (match.group(2), match.group(3)) if match else ("-", row.layer)
        blocks += [block] if block not in blocks else []
        kinds += [kind] if kind not in kinds else []
        cells[(block, kind)] = row.awor
    grid = torch.full((len(blocks), len(kinds)), float("nan"))
    for (block, kind), value in cells.items():
        grid[blocks.index(block), kinds.index(kind)] = value
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(kinds), 1.0 + 0.4 * len(blocks)))
    image = ax.imshow(grid.numpy(), vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(kinds)), kinds, rotation=45, ha="right")  # whole names: "dense" alone is ambiguous
    ax.set_yticks(range(len(blocks)), blocks)
    ax.set(xlabel="layer", ylabel="block", title=title)
    fig.colorbar(image, ax=ax, label="AWOR (1 = orthogonal)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
