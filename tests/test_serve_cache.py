"""The adapter cache's policy without a model: LRU by count and bytes, pins, retirement, failures."""

from __future__ import annotations

import pytest

from shirakit.serve.cache import AdapterCache, AdapterLoadError


class FakeModel:
    def __init__(self, sizes):
        self.sizes, self.inside, self.loads = sizes, set(), []

    def load(self, name, path):
        if self.sizes[name] is None:
            raise ValueError("truncated file")
        self.inside.add(name)
        self.loads.append(name)
        return self.sizes[name]

    def unload(self, name):
        self.inside.remove(name)


def _cache(sizes, **bounds):
    model = FakeModel(sizes)
    cache = AdapterCache(model.load, model.unload, **bounds)
    for name in sizes:
        cache.register(name, f"/adapters/{name}")
    return cache, model


def test_lru_by_count_evicts_the_least_recently_used():
    cache, model = _cache({n: 10 for n in "abcd"}, max_loaded=2)
    for name in "abac":  # a is used again before c arrives: b is the LRU victim
        assert cache.acquire(name)
        cache.release(name)
    assert model.inside == {"a", "c"} and list(cache.loaded) == ["a", "c"]
    assert (cache.stats.cache_hits, cache.stats.cache_misses, cache.stats.cache_evictions) == (1, 3, 1)


def test_byte_bound():
    cache, model = _cache({"a": 60, "b": 50, "c": 30}, max_loaded=10, max_bytes=100)
    for name in "abc":
        assert cache.acquire(name)
        cache.release(name)
    assert model.inside == {"b", "c"} and cache.loaded_bytes == 80


def test_pinned_adapters_are_never_evicted():
    cache, model = _cache({n: 1 for n in "abc"}, max_loaded=2)
    assert cache.acquire("a") and cache.acquire("b")
    assert cache.acquire("c") is False  # everything pinned: the request must wait
    assert model.inside == {"a", "b"}
    cache.release("a")
    assert cache.acquire("c") and model.inside == {"b", "c"}
    with pytest.raises(RuntimeError, match="released more often"):
        cache.release("a")


def test_unregister_while_pinned_waits_for_the_last_release():
    cache, model = _cache({"a": 1}, max_loaded=2)
    assert cache.acquire("a")
    cache.unregister("a")
    assert not cache.known("a") and model.inside == {"a"}
    cache.release("a")
    assert model.inside == set() and not cache.loaded


def test_failed_load_changes_nothing():
    cache, model = _cache({"good": 1, "bad": None}, max_loaded=2)
    assert cache.acquire("good")
    with pytest.raises(AdapterLoadError, match="'bad'.*truncated file"):
        cache.acquire("bad")
    assert list(cache.loaded) == ["good"] and cache.pins == {"good": 1} and cache.stats.adapter_load_failures == 1


def test_bounds_are_checked():
    with pytest.raises(ValueError, match="max_loaded"):
        AdapterCache(lambda n, p: 0, lambda n: None, max_loaded=0)


def test_evict_takes_out_only_unpinned_adapters_and_keeps_them_registered():
    cache, model = _cache({"a": 1, "b": 1}, max_loaded=2)
    assert cache.acquire("a") and cache.acquire("b")
    cache.release("b")
    assert cache.evict("a") is False and cache.evict("b") is True
    assert model.inside == {"a"} and cache.known("b")
    assert cache.acquire("b") and model.inside == {"a", "b"}  # a later use loads it again


def test_a_name_registered_again_while_its_old_key_is_pinned_gets_a_fresh_key():
    cache, model = _cache({"a": 1}, max_loaded=4)
    assert cache.acquire("a") and cache.key("a") == "a"
    cache.unregister("a")
    model.sizes["a#2"] = 2
    assert cache.register("a", "/adapters/a-new") == "a#2"  # the old tensors are still in use
    assert not cache.is_loaded("a")  # so the new folder is read, not the old tensors reused
    assert cache.acquire("a") and model.loads == ["a", "a#2"] and cache.folders["a#2"].name == "a-new"
    cache.release("a")  # the old key's last pin: its tensors leave
    assert model.inside == {"a#2"} and "a" not in cache.folders
    cache.release("a#2")
    cache.unregister("a")
    assert cache.register("a", "/adapters/a") == "a"  # nothing of the old name left: the plain key again
    with pytest.raises(ValueError, match="already registered"):
        cache.register("a", "/adapters/other")
