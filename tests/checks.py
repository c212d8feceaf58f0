"""Shared test helpers: edit a saved adapter file, check a failed load left nothing behind, count
the bytes an adapter holds."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

import shirakit
from shirakit.core.state import SHARED_ATTR
from shirakit.io.checkpoint import WEIGHTS_NAME
from shirakit.methods.shira.sparse import SparsePattern
from tests.models import MODELS, inputs, output


def edit_weights(directory, fn) -> None:
    """Apply ``fn`` to the saved tensors dict and write the file back."""
    path = directory / WEIGHTS_NAME
    tensors = load_file(str(path))
    fn(tensors)
    save_file(tensors, str(path))


def assert_untouched(model, base: torch.Tensor) -> None:
    """Nothing half-done: no wrapper or holder left, base not frozen, outputs are the base's."""
    assert not any(isinstance(m, shirakit.AdapterLinear) for m in model.modules())
    assert not hasattr(model, "shirakit") and not hasattr(model, SHARED_ATTR)
    assert all(p.requires_grad for p in model.parameters())
    assert torch.equal(output(model, inputs()), base)


def assert_load_fails(directory, match: str) -> None:
    model = MODELS["llama"]()
    base = output(model, inputs())
    with pytest.raises((ValueError, TypeError, FileNotFoundError), match=match):
        shirakit.load_adapter(model, directory)
    assert_untouched(model, base)


def held_bytes(adapter) -> int:
    """Bytes of every tensor the adapter holds other than its parameters (buffers, caches, the
    kernels' pattern, saved base values), each storage counted once."""
    local = [p.to_local() if hasattr(p, "to_local") else p for p in adapter.parameters()]  # FSDP2: DTensors
    params = {p.untyped_storage().data_ptr() for p in local}
    storages: dict[int, int] = {}

    def add(obj) -> None:
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            if storage.data_ptr() not in params and storage.nbytes():
                storages[storage.data_ptr()] = storage.nbytes()
        elif isinstance(obj, (tuple, list)):
            for item in obj:
                add(item)
        elif isinstance(obj, SparsePattern):
            add(list(vars(obj).values()))

    add(list(adapter.buffers()))
    add([v for k, v in vars(adapter).items() if k not in ("_parameters", "_buffers", "_modules")])
    return sum(storages.values())


def lm_training_losses(model, ids: torch.Tensor, steps: int, lr: float) -> list[float]:
    """AdamW on the trainable parameters, ``steps`` steps of next-token loss on ``ids``; the losses."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def rows_alone(model, ids, names):
    """Each row of ``ids`` run alone with its adapter active (``"__base__"``: adapters disabled): what a
    routed batch over ``names`` must equal."""
    rows = []
    for i, name in enumerate(names):
        if name == "__base__":
            with shirakit.disable_adapters(model):
                rows.append(output(model, ids[i : i + 1]))
        else:
            shirakit.set_adapter(model, name)
            rows.append(output(model, ids[i : i + 1]))
    return torch.cat(rows)
