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
from ..core.state import adapter_layers, check_adapter_names, hosts, state_of
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
    for _, layer in adapter_layers(model):
        layer.switch(names, exact)
    for _, host in hosts(model):
        host.set_active(names)
    state.active = names
