"""Rapid switching in fused mode (SHiRA paper §3.2).

A SHiRA adapter changes K entries of each weight, so putting adapter B in place of adapter A in a
fused model is: scatter A's saved base values back, scatter B's values in. No matmul, and after
the first switch to B the base values under B are not even read again (see
``AdapterLinear._apply_adapter``). Other methods fall back to unmerge + merge. The base weights
are bit-identical after any number of SHiRA switches.
"""

from __future__ import annotations

from torch import nn

from ..compile.slots import check_swap
from ..core.layer import AdapterLinear
from ..core.state import check_adapter_names, hosts, state_of
from ..core.threads import writes_weights


@writes_weights
def switch_adapter(model: nn.Module, adapter_name: str | None, exact: bool = False) -> None:
    """Make ``adapter_name`` the one adapter merged into the weights (None: the bare base).

    Whatever was merged before is unmerged first (SHiRA: restored by scatter, bit-exactly).
    ``exact=True``: additive adapters (LoRA, VeRA, MiSS balance) are unmerged bit-exactly too, from
    a copy of the weight kept at merge (see :func:`shirakit.merge`); the default subtracts.
    """
    names = [] if adapter_name is None else [adapter_name]
    check_adapter_names(model, names)
    check_swap(model, names, merged_after=True)
    state = state_of(model)
    found = hosts(model)
    batched = _switch_in_batches([m for _, m in found if isinstance(m, AdapterLinear)], adapter_name)
    for _, host in found:
        if id(host) not in batched:
            if isinstance(host, AdapterLinear):
                host.switch(names, exact)
            host.set_active(names)
    state.active = names


def _switch_in_batches(layers: list[AdapterLinear], adapter_name: str | None) -> set[int]:
    """Switch every layer that can in batched scatters across layers; returns their ids (the others
    switch on their own).

    A UNet has ~130-270 small adapted layers: one merge / unmerge per layer costs two torch scatters
    and the layer's bookkeeping each, which dominate a small layer's K-value writes. Here the layers
    whose switch is plain scatters (:meth:`AdapterLinear.batch_switch_parts`) are switched in three
    steps: every old adapter's saved base values back in one :meth:`InWeightAdapter.scatter_many`
    call per method, then each new adapter's plan (a cold one reads its base values now, from the
    restored weight), then all new values in one more call. The result, bit for bit and in every
    kept state, is what each layer's own :meth:`AdapterLinear.switch` and ``set_active`` leave.
    """
    restores: dict[type, list] = {}
    planned = []
    for layer in layers:
        parts = layer.batch_switch_parts(adapter_name)
        if parts is not None:
            weight, old, new = parts
            if old is not None:
                restores.setdefault(type(old), []).append(old.planned_restore(weight))
            planned.append((layer, weight, new))
    for method, plans in restores.items():
        method.scatter_many(plans)
    writes: dict[type, list] = {}
    for layer, weight, new in planned:
        if layer.merged:
            layer.batch_restored()
        if new is not None:
            writes.setdefault(type(new), []).append(new.planned_write(weight, layer.batch_write_key(weight)))
    for method, plans in writes.items():
        method.scatter_many(plans)
    for layer, weight, new in planned:
        layer.batch_written(adapter_name if new is not None else None, weight)
    return {id(layer) for layer, _, _ in planned}
