"""/metrics in Prometheus' text format, from the engines' counters (prometheus-client renders it).

The engine keeps plain numbers (``Engine.snapshot``); this module names them. Under Ray every
replica's numbers carry a ``replica`` label.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# engine number -> (metric name, kind, help)
METRICS = {
    "requests_finished": ("requests_finished", "counter", "requests whose every choice finished"),
    "requests_failed": ("requests_failed", "counter", "requests that failed in the engine (e.g. a corrupt adapter)"),
    "requests_cancelled": ("requests_cancelled", "counter", "requests dropped because the client went away"),
    "prompt_tokens": ("prompt_tokens", "counter", "prompt tokens prefilled"),
    "generation_tokens": ("generation_tokens", "counter", "tokens generated"),
    "waiting": ("queue_depth", "gauge", "requests waiting to join the batch"),
    "running": ("running_sequences", "gauge", "sequences in the running batch"),
    "prefill_batches": ("prefill_batches", "counter", "prefill forwards (newcomers joining the batch)"),
    "decode_steps": ("decode_steps", "counter", "decode steps"),
    "fused_steps": ("fused_steps", "counter", "forwards with one adapter merged into the weights"),
    "routed_steps": ("routed_steps", "counter", "forwards with nothing merged, each row routed to its adapter"),
    "mixed_steps": ("mixed_batches", "counter", "forwards whose rows want different adapters (or some the base)"),
    "switches": ("adapter_switches", "counter", "fused-mode switches (switch_adapter calls)"),
    "cache_hits": ("adapter_cache_hits", "counter", "requests whose adapter was already loaded"),
    "cache_misses": ("adapter_cache_misses", "counter", "adapter loads from disk"),
    "cache_evictions": ("adapter_cache_evictions", "counter", "adapters evicted from the model (LRU)"),
    "adapter_load_seconds": ("adapter_load_seconds", "counter", "seconds spent loading adapters from disk"),
    "adapter_load_failures": ("adapter_load_failures", "counter", "adapter folders that failed to load"),
    "adapters_loaded": ("adapters_loaded", "gauge", "adapters in the model now"),
    "adapters_loaded_bytes": ("adapters_loaded_bytes", "gauge", "bytes of the loaded adapters' tensors"),
}


def render(snapshots: list[tuple[dict[str, str], dict[str, float]]], http_errors: dict[int, int]) -> bytes:
    """Prometheus text for the engines' numbers and the HTTP layer's error counts."""
    label_names = sorted({k for labels, _ in snapshots for k in labels})
    families = []
    for key, (name, kind, doc) in METRICS.items():
        family_type = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
        family = family_type(f"shirakit_{name}", doc, labels=label_names)
        for labels, numbers in snapshots:
            family.add_metric([labels.get(k, "") for k in label_names], float(numbers.get(key, 0)))
        families.append(family)
    errors = CounterMetricFamily("shirakit_http_errors", "error responses by status", labels=["status"])
    for status, count in sorted(http_errors.items()):
        errors.add_metric([str(status)], count)
    families.append(errors)

    class _Collector:
        def collect(self):
            return families

    registry = CollectorRegistry()
    registry.register(_Collector())
    return generate_latest(registry)
