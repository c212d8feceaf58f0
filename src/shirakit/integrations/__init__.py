"""shirakit on other libraries' objects, through the library's own model-level functions.

- :mod:`.diffusers`       adapters on a diffusers pipeline: one PEFT-format folder per component
- :mod:`.diffusers_lora`  diffusers' and kohya's LoRA files read into shirakit LoRA adapters
"""
