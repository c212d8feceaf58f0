"""Python calls per adapter-layer forward, by state: deterministic, so a before/after needs no quiet machine.

    python benchmarks/layer_calls.py [-v]

One ``nn.Linear(64, 64)`` wrapped by ``shirakit.inject`` (r = 2), called on a (2, 64) input under
``torch.inference_mode()`` after one warm-up call; ``sys.setprofile`` counts the Python function
calls ("call" events: Python frames, not C builtins) of the second call. The bare ``nn.Linear`` row
is the floor (``nn.Module.__call__``'s two wrappers and ``Linear.forward``). ``-v`` lists the calls
by function name.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

import shirakit


def count(layer: nn.Module, x: torch.Tensor) -> tuple[int, dict[str, int]]:
    names: dict[str, int] = {}

    def profile(frame, event, arg):
        if event == "call":
            names[frame.f_code.co_name] = names.get(frame.f_code.co_name, 0) + 1

    layer(x)
    sys.setprofile(profile)
    try:
        layer(x)
    finally:
        sys.setprofile(None)
    return sum(names.values()), names


def build(methods: list[str], active: str | None, fused: bool) -> nn.Module:
    torch.manual_seed(0)
    model = nn.ModuleDict({"q": nn.Linear(64, 64)})
    for i, method in enumerate(methods):
        config = (shirakit.ShiraConfig(r=2, target_modules=["q"]) if method == "shira"
                  else shirakit.LoraConfig(r=2, target_modules=["q"]))
        shirakit.inject(model, config, f"{method}{i}")
    if fused or active is None:
        shirakit.switch_adapter(model, active)
    else:
        shirakit.set_adapter(model, active)
    return model


CASES = [
    ("bare nn.Linear (no adapter library)", None, None, True),
    ("LoRA only, LoRA fused", ["lora"], "lora0", True),
    ("SHiRA loaded, SHiRA fused", ["shira"], "shira0", True),
    ("SHiRA loaded, base (switch_adapter None)", ["shira"], None, True),
    ("SHiRA live (set_adapter, not fused)", ["shira"], "shira0", False),
    ("SHiRA + LoRA loaded, LoRA fused", ["shira", "lora"], "lora1", True),
]


def main() -> None:
    x = torch.randn(2, 64)
    print("| layer state | Python calls per forward |")
    print("|---|---|")
    for label, methods, active, fused in CASES:
        layer = nn.Linear(64, 64) if methods is None else build(methods, active, fused)["q"]
        with torch.inference_mode():
            total, names = count(layer, x)
        detail = f" {dict(sorted(names.items(), key=lambda kv: -kv[1]))}" if "-v" in sys.argv else ""
        print(f"| {label} | {total} |{detail}")


if __name__ == "__main__":
    main()
