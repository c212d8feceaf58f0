"""Operations on a whole model: the public functions users call.

- :mod:`.inject`       finding targets (PEFT's rules), putting adapters in and out: one transaction
- :mod:`.control`      set_adapter, merge / unmerge, set_scale, disable, trainable counts
- :mod:`.switch`       switch_adapter: fused-mode switching (SHiRA: two scatters)
- :mod:`.routing`      mixed-adapter batches (``route``; the route's row groups)
- :mod:`.hooks`        what happens at ``model(x)``: calls in flight, meta-draw check, ``adapter_names=``, compile sync
- :mod:`.tensors`      an adapter's values handed to inject (loading, fusion), checked and filled in its transaction
- :mod:`.fusion`       combine_adapters: one adapter equal to a weighted sum of others
- :mod:`.metrics`      AWOM / AWOR orthogonality between adapters
- :mod:`.calibration`  SHiRA's grad / snip masks from calibration batches
- :mod:`.meta_init`    adapters on a model built on the meta device
- :mod:`.hotswap`      prepare_for_hotswap: fixed slots so switching never recompiles
"""
