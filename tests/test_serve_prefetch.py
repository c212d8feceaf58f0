"""Reading adapter folders ahead on a worker thread (shirakit.serve.prefetch): bounds, dropping
unwanted reads, errors reaching only their adapter's requests; and, through the server, a request
whose adapter is still being read does not hold up the others."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest

pytest.importorskip("fastapi")
from shirakit.serve import prefetch as prefetch_module  # noqa: E402
from shirakit.serve.prefetch import Prefetcher  # noqa: E402

TIMEOUT = 60


@pytest.fixture
def gated_reads(monkeypatch):
    """Reads of folders named in ``gates`` block until their event is set; every read records its thread."""
    gates: dict[str, threading.Event] = {}
    threads: list[str] = []
    real = prefetch_module.read_adapter_files

    def read(path):
        threads.append(threading.current_thread().name)
        gate = gates.get(Path(path).name)
        if gate is not None:
            assert gate.wait(TIMEOUT), "a gated read was never released"
        if Path(path).name.startswith("bad"):
            raise ValueError(f"{path}: not a readable safetensors file")
        return real(path) if Path(path).exists() else str(path)

    monkeypatch.setattr(prefetch_module, "read_adapter_files", read)
    return gates, threads


def _wait_done(future, timeout=TIMEOUT):
    future.result(timeout)  # raises TimeoutError if the read hangs
    return future


def test_reads_run_on_the_worker_and_are_bounded(gated_reads):
    gates, threads = gated_reads
    gates["a"] = threading.Event()
    reader = Prefetcher(max_ready=2)
    try:
        assert reader.want("a", Path("/x/a")) and reader.want("b", Path("/x/b"))
        assert not reader.want("c", Path("/x/c"))  # two reads held: the third waits for room
        assert reader.want("a", Path("/x/a"))  # already being read
        assert reader.take("a", Path("/x/a")) is None  # still blocked
        gates["a"].set()
        deadline = time.monotonic() + TIMEOUT
        while (done := reader.take("a", Path("/x/a"))) is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _wait_done(done).result() == "/x/a"
        assert reader.want("c", Path("/x/c"))  # taking one made room
        assert threads and all(t.startswith("shirakit-adapter-reader") for t in threads)
    finally:
        reader.close()


def test_unwanted_reads_are_dropped(gated_reads):
    reader = Prefetcher(max_ready=4)
    try:
        for name in "abc":
            reader.want(name, Path(f"/x/{name}"))
        reader.keep_only({"b": Path("/x/b")})
        assert reader.pending() == 1
        reader.want("b2", Path("/x/b2"))
        reader.forget("b")
        assert reader.pending() == 1
        reader.keep_only({"b2": Path("/elsewhere/b2")})  # same name, another folder: not the read we hold
        assert reader.pending() == 0
    finally:
        reader.close()


def test_a_failed_read_reaches_only_its_own_future(gated_reads):
    reader = Prefetcher(max_ready=4)
    try:
        reader.want("bad", Path("/x/bad"))
        reader.want("good", Path("/x/good"))
        deadline = time.monotonic() + TIMEOUT
        found = {}
        while len(found) < 2 and time.monotonic() < deadline:
            for name in ("bad", "good"):
                if name not in found and (future := reader.take(name, Path(f"/x/{name}"))) is not None:
                    found[name] = future
            time.sleep(0.01)
        with pytest.raises(ValueError, match="not a readable safetensors"):
            _wait_done(found["bad"]).result()
        assert _wait_done(found["good"]).result() == "/x/good"
    finally:
        reader.close()


def test_a_request_whose_adapter_is_being_read_does_not_hold_up_the_batch(gated_reads, served_folders, tiny_server):
    from tests.serving import offline_text

    gates, threads = gated_reads
    model_dir, every, _ = served_folders
    adapters = dict(list(every.items())[:3])
    slow, fast = list(adapters)[:2]
    gates[slow] = threading.Event()
    running = tiny_server(model_dir, adapters, max_loaded=2)
    try:
        client = openai.OpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0, timeout=TIMEOUT)

        def complete(name, prompt):
            return client.completions.create(model=name, prompt=prompt, max_tokens=8, temperature=0).choices[0].text

        with ThreadPoolExecutor(4) as pool:
            blocked = pool.submit(complete, slow, "waits for its files")
            deadline = time.monotonic() + TIMEOUT
            while running.engine.stats.waiting < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            others = [pool.submit(complete, name, f"goes ahead {i}") for i, name in enumerate([fast, "tiny-llama"] * 2)]
            texts = [f.result(TIMEOUT) for f in others]
            assert not blocked.done()  # everyone else finished while its folder was still being read
            gates[slow].set()
            assert blocked.result(TIMEOUT) == offline_text(model_dir, adapters[slow], "waits for its files", 8)
        assert texts == [offline_text(model_dir, adapters.get(name), f"goes ahead {i}", 8)
                         for i, name in enumerate([fast, "tiny-llama"] * 2)]
        assert "shirakit-engine" not in threads and threads  # folders were read off the engine thread
        numbers = running.engine.snapshot()
        assert numbers["requests_failed"] == 0 and numbers["adapters_loaded"] <= 2
    finally:
        gates[slow].set()  # before the fixture stops the server
