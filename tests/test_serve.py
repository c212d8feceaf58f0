"""`shirakit serve` end to end: the real `openai` client against a server on 127.0.0.1, a tiny model
saved to a temp folder, adapters of every method. The oracle is offline greedy `generate` with the
request's adapter alone (tests/serving.py)."""

from __future__ import annotations

import re
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from tests.serving import CONTEXT, SERVE_CASES, load_tiny_lm, offline_text, save_adapters, save_tiny_lm

pytest.importorskip("fastapi")
from shirakit.serve import Engine, start_server  # noqa: E402
from shirakit.serve.policy import Policy  # noqa: E402

TIMEOUT = 60


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    model_dir = save_tiny_lm(root / "tiny-llama")
    adapters = save_adapters(model_dir, root / "adapters", 8)
    return model_dir, adapters, root


def _server(folders, adapters=None, **engine_args):
    model_dir, found, _ = folders
    model, tokenizer = load_tiny_lm(model_dir)
    engine = Engine(model, tokenizer, "tiny-llama", found if adapters is None else adapters, **engine_args)
    return start_server(engine, policy=Policy(allow_runtime_adapters=True))


@pytest.fixture(scope="module")
def server(folders):
    running = _server(folders, max_loaded=8)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=TIMEOUT)


class Oracle:
    """Offline greedy texts, one model load per adapter."""

    def __init__(self, folders):
        self.model_dir, self.adapters, _ = folders
        self.memo = {}

    def __call__(self, name, prompt, max_tokens):
        key = (name, prompt, max_tokens)
        if key not in self.memo:
            self.memo[key] = offline_text(self.model_dir, self.adapters.get(name), prompt, max_tokens)
        return self.memo[key]


@pytest.fixture(scope="module")
def oracle(folders):
    return Oracle(folders)


def _complete(client, model, prompt, max_tokens=12, **kw):
    return client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, **kw)


# ---- correctness -----------------------------------------------------------------------------
def test_models_lists_base_and_every_adapter(client, folders):
    ids = [m.id for m in client.models.list().data]
    assert ids[0] == "tiny-llama"
    assert sorted(ids[1:]) == sorted(folders[1])


@pytest.mark.parametrize("method", [c.id for c in SERVE_CASES] + ["base"])
def test_greedy_text_equals_offline_generate(client, oracle, folders, method):
    name = "tiny-llama" if method == "base" else next(n for n in folders[1] if n.startswith(method))
    prompt = f"The {method} adapter says"
    out = _complete(client, name, prompt)
    assert out.choices[0].text == oracle(name, prompt, 12)
    assert out.usage.prompt_tokens == len(prompt) + 1  # one token per character, plus <s>
    assert out.usage.completion_tokens >= len(out.choices[0].text)


@pytest.mark.parametrize("fused", [True, False], ids=["always-fused", "always-routed"])
def test_fused_and_routed_steps_give_the_same_text(server, client, oracle, folders, fused):
    """One request at a time is a uniform batch: fused or routed by the policy; force each way."""
    before = server.engine.snapshot()
    server.engine.fuse_min_steps = 1 if fused else 10**9
    try:
        for name in list(folders[1])[:5]:  # one adapter of every method
            assert _complete(client, name, "forced").choices[0].text == oracle(name, "forced", 12)
    finally:
        server.engine.fuse_min_steps = None
    after = server.engine.snapshot()
    grew = "fused_steps" if fused else "routed_steps"
    assert after[grew] - before[grew] >= 5 * 12


def test_32_concurrent_requests_over_8_adapters(server, client, oracle, folders):
    names = list(folders[1])
    jobs = [(names[i % 8], f"request {i}: hello") for i in range(32)]
    with ThreadPoolExecutor(32) as pool:
        texts = list(pool.map(lambda job: _complete(client, *job).choices[0].text, jobs))
    expected = [oracle(name, prompt, 12) for name, prompt in jobs]
    assert texts == expected
    assert len({t for t in expected}) > 16  # the adapters really differ, so routing is exercised
    assert server.engine.snapshot()["mixed_steps"] > 0


def test_streaming_gives_the_same_text(client, folders):
    name = list(folders[1])[1]
    whole = _complete(client, name, "stream me", max_tokens=20)
    chunks = list(_complete(client, name, "stream me", max_tokens=20, stream=True,
                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_chat_completion_and_its_stream(client, folders):
    model_dir, adapters, _ = folders
    name = list(adapters)[2]
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    whole = client.chat.completions.create(model=name, messages=messages, max_tokens=10, temperature=0)
    _, tokenizer = load_tiny_lm(model_dir)
    templated = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(templated, add_special_tokens=False).input_ids  # the template writes its own specials
    assert whole.choices[0].message.content == offline_text(model_dir, adapters[name], ids, 10)
    assert whole.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model=name, messages=messages, max_tokens=10, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == whole.choices[0].message.content


def test_n_seed_and_stop(client, oracle, folders):
    name = list(folders[1])[0]
    first = client.completions.create(model=name, prompt="sample", max_tokens=8, n=3, temperature=1.0, seed=7)
    again = client.completions.create(model=name, prompt="sample", max_tokens=8, n=3, temperature=1.0, seed=7)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    greedy = oracle(name, "stop here", 12)
    stop = greedy[3:5]
    cut = greedy[: greedy.find(stop)]
    out = _complete(client, name, "stop here", stop=[stop])
    assert (out.choices[0].text, out.choices[0].finish_reason) == (cut, "stop")
    streamed = _complete(client, name, "stop here", stop=[stop], stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut


# ---- adapters over the API -------------------------------------------------------------------
def test_load_and_unload_adapter_any_method(server, client, folders, tmp_path):
    model_dir, adapters, _ = folders
    source = adapters[next(n for n in adapters if n.startswith("vera"))]
    shutil.copytree(source, tmp_path / "fresh")
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as http:
        ok = http.post("/v1/load_lora_adapter", json={"lora_name": "fresh", "lora_path": str(tmp_path / "fresh")})
        assert ok.status_code == 200, ok.text
        again = http.post("/v1/load_lora_adapter", json={"lora_name": "fresh", "lora_path": str(tmp_path / "fresh")})
        assert again.status_code == 400
        assert "fresh" in [m.id for m in client.models.list().data]
        assert _complete(client, "fresh", "new one").choices[0].text == \
            offline_text(model_dir, tmp_path / "fresh", "new one", 12)
        assert http.post("/v1/unload_lora_adapter", json={"lora_name": "fresh"}).status_code == 200
        assert http.post("/v1/unload_lora_adapter", json={"lora_name": "fresh"}).status_code == 404
    with pytest.raises(openai.NotFoundError):
        _complete(client, "fresh", "gone")


def test_eviction_with_max_loaded_2_loses_no_request(folders, oracle):
    five = dict(list(folders[1].items())[:5])
    running = _server(folders, adapters=five, max_loaded=2)
    try:
        client = openai.OpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0, timeout=TIMEOUT)
        jobs = [(name, f"turn {k}") for k in range(4) for name in five]  # rotation: every turn misses
        with ThreadPoolExecutor(10) as pool:
            texts = list(pool.map(lambda job: _complete(client, *job, max_tokens=8).choices[0].text, jobs))
        assert texts == [oracle(name, prompt, 8) for name, prompt in jobs]
        numbers = running.engine.snapshot()
        assert numbers["cache_evictions"] >= 3 and numbers["adapters_loaded"] <= 2
        assert numbers["requests_finished"] == len(jobs) and numbers["requests_failed"] == 0
    finally:
        running.stop()


# ---- bad input: OpenAI-style errors, and the server keeps serving -------------------------------
def _error(response, status):
    assert response.status_code == status, response.text
    body = response.json()["error"]
    assert body["code"] == status and body["message"]
    return body


def test_bad_requests_get_json_errors(server, client, folders):
    name = list(folders[1])[0]
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as http:
        _error(http.post("/v1/completions", json={"model": "nope", "prompt": "x"}), 404)
        _error(http.post("/v1/chat/completions", json={"model": "nope", "messages": [{"role": "user",
                                                                                         "content": "x"}]}), 404)
        _error(http.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"}), 400)
        _error(http.post("/v1/completions", json={"model": name, "prompt": "x", "max_tokens": "many"}), 400)
        _error(http.post("/v1/completions", json={"model": name, "prompt": "x", "temperature": 5}), 400)
        _error(http.post("/v1/completions", json={"model": name, "prompt": "x", "n": 0}), 400)
        _error(http.post("/v1/completions", json={"model": name}), 400)
        _error(http.post("/v1/completions", json={"model": name, "prompt": [10**9]}), 400)
        _error(http.post("/v1/chat/completions", json={"model": name, "messages": []}), 400)
        body = _error(http.post("/v1/completions", json={"model": name, "prompt": "y" * CONTEXT}), 400)
        assert "context" in body["message"]
        _error(http.post("/v1/completions", json={"model": name, "prompt": "x", "max_tokens": CONTEXT}), 400)
        _error(http.post("/v1/unload_lora_adapter", json={"lora_name": "nope"}), 404)
        _error(http.post("/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": "/no/such/dir"}), 400)
        _error(http.get("/v1/nothing-here"), 404)
    with pytest.raises(openai.NotFoundError):
        _complete(client, "nope", "x")
    with pytest.raises(openai.BadRequestError):
        _complete(client, name, "x", max_tokens=CONTEXT)
    assert _complete(client, name, "still serving").choices[0].text


def _corrupt(source, target):
    shutil.copytree(source, target)
    data = (target / "adapter_model.safetensors").read_bytes()
    (target / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])


def test_corrupt_adapter_is_a_clear_error_and_nothing_else_changes(server, client, folders, oracle, tmp_path):
    name = list(folders[1])[3]
    _corrupt(folders[1][name], tmp_path / "broken")
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as http:
        body = _error(http.post("/v1/load_lora_adapter", json={"lora_name": "broken",
                                                               "lora_path": str(tmp_path / "broken")}), 400)
        assert "safetensors" in body["message"]
    assert "broken" not in [m.id for m in client.models.list().data]
    assert _complete(client, name, "after the corrupt one").choices[0].text == \
        oracle(name, "after the corrupt one", 12)


def test_corrupt_adapter_folder_found_at_startup(folders, oracle, tmp_path):
    good = list(folders[1])[1]
    _corrupt(folders[1][good], tmp_path / "broken")
    running = _server(folders, adapters={good: folders[1][good], "broken": tmp_path / "broken"})
    try:
        client = openai.OpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0, timeout=TIMEOUT)
        with ThreadPoolExecutor(4) as pool:
            bad = pool.submit(_complete, client, "broken", "x")
            fine = [pool.submit(_complete, client, good, f"fine {i}") for i in range(3)]
            with pytest.raises(openai.BadRequestError, match="could not be loaded"):
                bad.result()
            assert [f.result().choices[0].text for f in fine] == [oracle(good, f"fine {i}", 12) for i in range(3)]
    finally:
        running.stop()


def test_queue_full_is_429(folders):
    running = _server(folders, max_queue=2)
    gate = threading.Event()
    running.engine.call(lambda: gate.wait(TIMEOUT))  # hold the engine thread: requests pile up
    try:
        client = openai.OpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0, timeout=TIMEOUT)
        with ThreadPoolExecutor(2) as pool:
            waiting = [pool.submit(_complete, client, "tiny-llama", f"queued {i}") for i in range(2)]
            deadline = time.monotonic() + TIMEOUT
            while running.engine.stats.waiting < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            with pytest.raises(openai.RateLimitError):
                _complete(client, "tiny-llama", "one too many")
            gate.set()
            assert all(w.result().choices[0].finish_reason for w in waiting)
    finally:
        gate.set()
        running.stop()


def test_disconnect_mid_stream_frees_the_slot(server, folders):
    name = list(folders[1])[0]
    before = server.engine.snapshot()["requests_cancelled"]
    body = {"model": name, "prompt": "a long one", "max_tokens": 80, "temperature": 0, "stream": True}
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as http:
        with http.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            next(response.iter_lines())  # one event, then hang up
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        numbers = server.engine.snapshot()
        if numbers["requests_cancelled"] > before and numbers["running"] == 0:
            break
        time.sleep(0.05)
    assert numbers["requests_cancelled"] == before + 1 and numbers["running"] == 0


def test_health_and_metrics(server, client, folders):
    _complete(client, list(folders[1])[0], "count me")
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as http:
        assert http.post("/v1/completions", json={"model": "nope", "prompt": "x"}).status_code == 404
        assert http.get("/health").status_code == 200
        text = http.get("/metrics").text
    for metric in ("shirakit_requests_finished_total", "shirakit_generation_tokens_total", "shirakit_queue_depth",
                   "shirakit_adapter_cache_hits_total", "shirakit_adapter_cache_misses_total",
                   "shirakit_adapter_load_seconds_total", "shirakit_adapter_switches_total",
                   "shirakit_mixed_batches_total", 'shirakit_http_errors_total{status="404"}'):
        assert metric in text, metric
    finished = [line for line in text.splitlines() if line.startswith("shirakit_requests_finished_total")]
    assert float(finished[0].split()[-1]) >= 1


def test_the_serve_command(folders, oracle, tmp_path):
    """`shirakit serve --model DIR --adapters DIR` as a user runs it, stopped by SIGTERM."""
    import signal
    import socket
    import subprocess
    import sys

    model_dir, adapters, root = folders
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "shirakit.cli", "serve", "--model", str(model_dir), "--adapters",
               str(root / "adapters"), "--port", str(port), "--max-loaded", "2"]
    log = open(tmp_path / "serve.log", "w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=TIMEOUT)
        assert [m.id for m in client.models.list().data] == ["tiny-llama", *sorted(adapters)]
        name = sorted(adapters)[-1]
        assert _complete(client, name, "from the command").choices[0].text == oracle(name, "from the command", 12)
    finally:
        process.terminate()
        try:
            process.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
    # uvicorn shuts down gracefully, then re-raises the signal it caught (exit status -SIGTERM)
    output = (tmp_path / "serve.log").read_text()
    assert process.returncode in (0, -signal.SIGTERM) and "Application shutdown complete" in output, output
    frozen = re.search(r"\(([\d,]+) start-up objects out of the garbage collector's walks\)", output)
    assert frozen and int(frozen.group(1).replace(",", "")) > 10_000, output


def test_freezing_the_start_up_heap_takes_it_out_of_full_collections():
    """What `shirakit serve` does once its engine runs: a full collection then walks only newer objects."""
    import gc

    from shirakit.serve.heap import freeze_startup_heap

    before = len(gc.get_objects())
    try:
        frozen = freeze_startup_heap()
        assert frozen >= before // 2
        assert len(gc.get_objects()) < before // 10
        cycle = []
        cycle.append(cycle)
        del cycle  # garbage made after the freeze: still collected
        assert gc.collect() >= 1
    finally:
        gc.unfreeze()
