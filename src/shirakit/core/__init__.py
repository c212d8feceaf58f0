"""The floor everything stands on: the adapter contract and what a layer needs to run it. Knows
nothing of models, files or methods above it.

- :mod:`.config`            ``AdapterConfig``: PEFT's field names and defaults, checked on build
- :mod:`.registry`          ``peft_type`` -> Adapter class (methods add themselves with ``@register``)
- :mod:`.adapter`           the contract: ``Adapter`` and ``InWeightAdapter`` (values ride in the weight)
- :mod:`.sparse_delta`      a delta given by its non-zeros (SHiRA's, for the orthogonality metrics)
- :mod:`.layer`             ``AdapterLinear``: a base layer plus named adapters; ``ModulesToSave``
- :mod:`.threads`           the model's guard: forwards in many threads, writers alone
- :mod:`.routes`            the route in force for this call (a context variable the layer reads)
- :mod:`.sharded_weights`   FSDP2 / ZeRO-3 weights; where a tensor's values live (ties)
- :mod:`.quantized_weights` bitsandbytes / torchao weights: never written; dequantized per product
- :mod:`.state`             what shirakit keeps on a model (adapter layers, holders, shared tensors)
- :mod:`.validation`        checks on values that come from users and files
- :mod:`.cache_dir`         the one cache folder (``SHIRAKIT_CACHE_DIR``)
"""
