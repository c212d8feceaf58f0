"""`shirakit serve --ray`: the Ray Serve deployment on a local Ray instance with 2 CPU replicas.

One module-scoped Ray instance (its start-up is most of this file's time); the openai client talks
to Ray Serve's HTTP proxy on 127.0.0.1. Same oracle as test_serve.py: offline greedy generate.
"""

from __future__ import annotations

import signal
import socket
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from tests.serving import offline_text, save_adapters, save_tiny_lm

pytestmark = pytest.mark.slow  # starts a Ray cluster and Ray Serve
ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
TIMEOUT = 120
# Ray + 2 replicas start in 56 s on this project's 2 shared cores at load 12, 160 s at load 20
STARTUP_LIMIT = 400


@pytest.fixture(scope="module")
def ray_server(tmp_path_factory):
    from shirakit.serve.ray_app import build_app

    root = tmp_path_factory.mktemp("ray")
    model_dir = save_tiny_lm(root / "tiny-llama")
    adapters = save_adapters(model_dir, root / "adapters", 4)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    def too_slow(*_):
        raise TimeoutError(f"Ray Serve did not start in {STARTUP_LIMIT} s")

    previous = signal.signal(signal.SIGALRM, too_slow)  # serve.run itself waits without a bound
    signal.alarm(STARTUP_LIMIT)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(model=str(model_dir), adapters=str(root / "adapters"), replicas=2, max_loaded=2,
                            num_cpus=0.5, allow_runtime_adapters=True), name="shirakit", route_prefix="/")
        signal.alarm(0)
        yield f"http://127.0.0.1:{port}", model_dir, adapters, root
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        serve.shutdown()
        ray.shutdown()


def _client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=TIMEOUT)


def test_ray_replicas_give_offline_greedy_text(ray_server):
    url, model_dir, adapters, _ = ray_server
    client = _client(url)
    assert [m.id for m in client.models.list().data] == ["tiny-llama", *sorted(adapters)]
    names = ["tiny-llama", *adapters]
    jobs = [(names[i % len(names)], f"ray {i}") for i in range(10)]
    with ThreadPoolExecutor(10) as pool:
        texts = list(pool.map(lambda job: client.completions.create(model=job[0], prompt=job[1], max_tokens=8,
                                                                    temperature=0).choices[0].text, jobs))
    assert texts == [offline_text(model_dir, adapters.get(name), prompt, 8) for name, prompt in jobs]
    name = list(adapters)[0]
    whole = client.completions.create(model=name, prompt="streamed", max_tokens=8, temperature=0)
    stream = client.completions.create(model=name, prompt="streamed", max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream) == whole.choices[0].text


def test_ray_multiplexing_keeps_an_adapter_on_its_replica(ray_server):
    url, _, adapters, _ = ray_server
    client = _client(url)
    name = list(adapters)[1]
    for i in range(6):  # one after another: each request finds the replica that holds the adapter
        client.completions.create(model=name, prompt=f"again {i}", max_tokens=2, temperature=0)
    text = httpx.get(url + "/metrics", timeout=TIMEOUT).text
    hits = [float(line.split()[-1]) for line in text.splitlines()
            if line.startswith("shirakit_adapter_cache_hits_total")]
    assert len(hits) == 2  # both replicas report, labelled
    assert sum(hits) >= 4  # at most one or two of the six were misses


def test_ray_errors_and_adapter_loading(ray_server, tmp_path):
    url, model_dir, adapters, _ = ray_server
    client = _client(url)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x", max_tokens=2)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{not json")
    with httpx.Client(base_url=url, timeout=TIMEOUT) as http:
        response = http.post("/v1/load_lora_adapter", json={"lora_name": "broken", "lora_path": str(broken)})
        assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]
        source = adapters[list(adapters)[2]]
        response = http.post("/v1/load_lora_adapter", json={"lora_name": "late", "lora_path": str(source)})
        assert response.status_code == 200, response.text
    out = client.completions.create(model="late", prompt="late one", max_tokens=8, temperature=0)
    assert out.choices[0].text == offline_text(model_dir, source, "late one", 8)
