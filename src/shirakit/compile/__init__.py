"""torch.compile machinery (model operations call it; ``prepare_for_hotswap`` is in
:mod:`shirakit.model.hotswap`).

- :mod:`.sync`   the model's bookkeeping run eagerly at each compiled call, before the graph
- :mod:`.slots`  hot-swap slots: fixed tensors a compiled forward reads; the recompile checks
"""
