"""Operations on a whole model: the public functions users call.

- :mod:`.inject`       finding targets (PEFT's rules), putting adapters in and out: one transaction
- :mod:`.control`      set_adapter, merge / unmerge, set_scale, disable, trainable counts
- :mod:`.switch`       switch_adapter: fused-mode switching (SHiRA: two scatters)
- :mod:`.routing`      mixed-adapter batches (``route``, ``adapter_names=``) and the model-call hooks
- :mod:`.fusion`       combine_adapters: one adapter equal to a weighted sum of others
- :mod:`.metrics`      AWOM / AWOR orthogonality between adapters
- :mod:`.calibration`  SHiRA's grad / snip masks from calibration batches
- :mod:`.meta_init`    adapters on a model built on the meta device
- :mod:`.hotswap`      prepare_for_hotswap: fixed slots so switching never recompiles
"""
