"""shirakit on other libraries' objects and engines, through the library's own model-level functions
and files (never the application above it).

- :mod:`.diffusers`       adapters on a diffusers pipeline: one PEFT-format folder per component
- :mod:`.diffusers_lora`  diffusers' and kohya's LoRA files read into shirakit LoRA adapters
- :mod:`.lmeval`          lm-evaluation-harness on an adapted model in process (lm-eval's HF wrapper;
  ``shirakit eval --lm-eval``; needs the ``eval`` extra)
- :mod:`.trl`             TRL's SFTTrainer / DPOTrainer on an injected model; ``base_reference`` is DPO's
  reference model as the same model with its adapters disabled (no second copy; needs the ``trl`` extra)
- :mod:`.vllm`            SHiRA inside vLLM: a worker extension that scatters an adapter's values into
  vLLM's packed weights, a front scheduler that groups requests by adapter (public path
  ``shirakit.vllm``; needs the ``vllm`` extra, docs/vllm.md)
"""
