"""Adapters on disk, in PEFT's format.

- :mod:`.atomic`       a file is the old one or the complete new one, never half
- :mod:`.folder`       ``adapter_config.json`` + ``adapter_model.safetensors`` written as one
- :mod:`.config_file`  reading ``adapter_config.json`` (bounded, strict JSON, method by ``peft_type``)
- :mod:`.checkpoint`   save_adapter / load_adapter: file keys <-> model tensors
- :mod:`.hub`          a repo id (``org/name``) resolved in the local Hugging Face hub cache (never downloaded)
- :mod:`.deltas`       per-layer deltas read from a folder without a base model
"""
