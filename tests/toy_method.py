"""A test-only method: proof that a new method is one file, one registration, one row in tests/cases.py.

Diagonal scale: the adapter trains one value per diagonal entry of the (out, in) weight,

    delta_W = s * diag(d)  (d: (min(in, out),), zero-padded to (out, in)),
    delta_y = s * d * x[..., :min(in, out)]  (zero-padded to out features),

zeros at init (the identity). Nothing under src/ knows it: it registers itself with the public
``register`` decorator and inherits merge, unmerge, save and load from the contract.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from shirakit.core.adapter import Adapter
from shirakit.core.config import AdapterConfig
from shirakit.core.registry import register


@dataclass
class DiagConfig(AdapterConfig):
    peft_type: ClassVar[str] = "TOY_DIAG"

    init_weights: bool = True  # False: random values (a non-zero delta, for tests)


@register
class DiagAdapter(Adapter):
    config_class = DiagConfig

    def init_parameters(self, base_layer: nn.Module, generator: torch.Generator | None, source: str) -> None:
        options = self.parameter_options(base_layer)
        diag = torch.zeros(min(self.geometry.in_features, self.geometry.out_features), dtype=options["dtype"])
        if generator is not None and not self.config.init_weights:  # None: values come from a file
            diag = (torch.randn(diag.shape, generator=generator) * 0.1).to(diag.dtype)
        self.toy_diag = nn.Parameter(diag.to(options["device"]))

    def forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        d = self.toy_diag
        y = x[..., : d.numel()].to(d.dtype) * d * self.scale
        return F.pad(y, (0, self.geometry.out_features - d.numel()))

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        g, d = self.geometry, self.toy_diag.detach().float()
        return F.pad(torch.diag(d), (0, g.in_features - d.numel(), 0, g.out_features - d.numel())) * self.scale
