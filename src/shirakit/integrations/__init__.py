"""Bridges to other systems' engines, above the library (they use its files and maths, never its app).

- :mod:`.vllm`  SHiRA inside vLLM: a worker extension that scatters an adapter's values into vLLM's
  packed weights, a front scheduler that groups requests by adapter (public path ``shirakit.vllm``;
  needs the ``vllm`` extra, docs/vllm.md)
"""
