"""/metrics in Prometheus' text format, from the engines' counters (prometheus-client renders it).

The engine and its adapter cache keep plain numbers (:class:`Counters`, built from ``METRICS``, the
one list of what is counted); ``Engine.snapshot`` gathers them and this module names them. Under
Ray every replica's numbers carry a ``replica`` label. prometheus-client is imported only to render.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    name: str  # shirakit_<name> in Prometheus
    kind: str  # "counter" or "gauge"
    help: str
    kept_by: str  # "engine" or "cache" (counters they keep), "snapshot" (computed when read)


def _metrics(kept_by: str, rows: list[tuple[str, str, str, str]]) -> dict[str, Metric]:
    return {key: Metric(name, kind, doc, kept_by) for key, name, kind, doc in rows}


# the one definition of every number /metrics shows: key (in Engine.snapshot) -> Metric
METRICS = {
    **_metrics("engine", [
        ("requests_finished", "requests_finished", "counter", "requests whose every choice finished"),
        ("requests_failed", "requests_failed", "counter",
         "requests that failed in the engine (e.g. a corrupt adapter)"),
        ("requests_cancelled", "requests_cancelled", "counter", "requests dropped because the client went away"),
        ("prompt_tokens", "prompt_tokens", "counter", "prompt tokens prefilled"),
        ("generation_tokens", "generation_tokens", "counter", "tokens generated"),
        ("waiting", "queue_depth", "gauge", "requests waiting to join the batch"),
        ("running", "running_sequences", "gauge", "sequences in the running batch"),
        ("prefill_batches", "prefill_batches", "counter", "prefill forwards (chunks of newcomers' prompts)"),
        ("decode_steps", "decode_steps", "counter", "decode steps"),
        ("fused_steps", "fused_steps", "counter", "forwards with one adapter merged into the weights"),
        ("routed_steps", "routed_steps", "counter", "forwards with nothing merged, each row routed to its adapter"),
        ("mixed_steps", "mixed_batches", "counter", "forwards whose rows want different adapters (or some the base)"),
        ("switches", "adapter_switches", "counter", "fused-mode switches (switch_adapter calls)"),
    ]),
    **_metrics("cache", [
        ("cache_hits", "adapter_cache_hits", "counter", "requests whose adapter was already loaded"),
        ("cache_misses", "adapter_cache_misses", "counter", "adapters loaded into the model from their files"),
        ("cache_evictions", "adapter_cache_evictions", "counter", "adapters evicted from the model (LRU)"),
        ("adapter_load_seconds", "adapter_load_seconds", "counter",
         "engine-thread seconds spent putting adapters into the model"),
        ("adapter_load_failures", "adapter_load_failures", "counter", "adapter folders that failed to load"),
    ]),
    **_metrics("snapshot", [
        ("adapter_read_seconds", "adapter_read_seconds", "counter",
         "worker-thread seconds spent reading adapter folders (off the engine thread)"),
        ("adapters_loaded", "adapters_loaded", "gauge", "adapters in the model now"),
        ("adapters_loaded_bytes", "adapters_loaded_bytes", "gauge", "bytes of the loaded adapters' tensors"),
        ("kv_bytes_copied", "kv_bytes_copied", "counter",
         "bytes of keys/values moved inside the KV cache (rows moved on retirement, buffers resized)"),
        ("kv_budget_tokens", "kv_budget_tokens", "gauge", "KV token positions admission may fill (--max-kv-tokens)"),
        ("kv_allocated_tokens", "kv_allocated_tokens", "gauge", "KV token positions the cache's slots hold now"),
    ]),
}


class Counters:
    """The numbers one part of the server keeps (``METRICS`` entries it keeps), all from 0; an
    unknown name is an error, so a counter cannot drift away from what /metrics shows."""

    def __init__(self, kept_by: str) -> None:
        keys = tuple(k for k, m in METRICS.items() if m.kept_by == kept_by)
        if not keys:
            raise ValueError(f"no metrics are kept by {kept_by!r}")
        object.__setattr__(self, "_keys", keys)
        for key in keys:
            object.__setattr__(self, key, 0)

    def __setattr__(self, key: str, value: float) -> None:
        if key not in self._keys:
            raise AttributeError(f"{key!r} is not one of the metrics {self._keys}")
        object.__setattr__(self, key, value)

    def numbers(self) -> dict[str, float]:
        return {key: getattr(self, key) for key in self._keys}


def render(snapshots: list[tuple[dict[str, str], dict[str, float]]], http_errors: dict[int, int]) -> bytes:
    """Prometheus text for the engines' numbers and the HTTP layer's error counts."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    label_names = sorted({k for labels, _ in snapshots for k in labels})
    families = []
    for key, metric in METRICS.items():
        family_type = CounterMetricFamily if metric.kind == "counter" else GaugeMetricFamily
        family = family_type(f"shirakit_{metric.name}", metric.help, labels=label_names)
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
