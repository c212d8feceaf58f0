"""The completions ``prompt`` in every form OpenAI's API takes (issue 28): a string, a list of
strings, a list of token ids, a list of token-id lists; several prompts in one request each get
their own ``n`` choices (prompt i's at indexes i*n .. i*n+n-1). ``max_tokens=0`` with echo, bad
prompts, and 429's Retry-After."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from tests.serving import load_tiny_lm, offline_text

pytest.importorskip("fastapi")

TIMEOUT = 60


@pytest.fixture(scope="module")
def tokenizer(served_folders):
    return load_tiny_lm(served_folders[0])[1]


@pytest.fixture(scope="module")
def server(served_folders):
    from tests.serving import start_tiny_server

    model_dir, adapters, _ = served_folders
    running = start_tiny_server(model_dir, adapters)
    yield running
    running.stop()


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as client:
        yield client


def _post(http, **body):
    response = http.post("/v1/completions", json={"temperature": 0, **body})
    assert response.status_code == 200, response.text
    return response.json()


def _error(http, **body) -> dict:
    response = http.post("/v1/completions", json={"model": "tiny-llama", "temperature": 0, **body})
    assert response.status_code == 400, response.text
    return response.json()["error"]


def test_every_prompt_form_gives_the_offline_text(http, served_folders, tokenizer):
    model_dir, adapters, _ = served_folders
    name = list(adapters)[2]
    texts = ["hello there", "a b c", "Zebra"]
    ids = [tokenizer(t).input_ids for t in texts]
    expected = [offline_text(model_dir, adapters[name], t, 8) for t in texts]
    for prompt in (texts, ids):
        answer = _post(http, model=name, prompt=prompt, max_tokens=8, n=2)
        choices = answer["choices"]
        assert [c["index"] for c in choices] == list(range(6))
        assert [c["text"] for c in choices] == [e for e in expected for _ in range(2)]
        assert answer["usage"]["prompt_tokens"] == sum(map(len, ids))
    # one prompt: a string, its token ids flat, or wrapped in a list of one
    for prompt in (texts[0], ids[0], [ids[0]], [texts[0]]):
        assert [c["text"] for c in _post(http, model=name, prompt=prompt, max_tokens=8)["choices"]] == expected[:1]


def test_several_prompts_stream_by_index(http, served_folders, tokenizer):
    model_dir, adapters, _ = served_folders
    name = list(adapters)[0]
    texts = ["one", "the second prompt"]
    body = {"model": name, "prompt": texts, "max_tokens": 6, "temperature": 0, "n": 2, "stream": True,
            "stream_options": {"include_usage": True}}
    pieces: dict[int, str] = {}
    with http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    for event in events[:-1]:
        (choice,) = event["choices"]
        pieces[choice["index"]] = pieces.get(choice["index"], "") + choice["text"]
    expected = [offline_text(model_dir, adapters[name], t, 6) for t in texts]
    assert pieces == {0: expected[0], 1: expected[0], 2: expected[1], 3: expected[1]}
    assert events[-1]["usage"]["prompt_tokens"] == sum(len(tokenizer(t).input_ids) for t in texts)


def test_loglikelihood_batch_as_lm_eval_sends_it(http, served_folders, tokenizer):
    """lm-eval with batch_size > 1: several token-id prompts, echo, logprobs 1, max_tokens 1; each
    choice is its own prompt's, as if sent alone. max_tokens 0 gives the same without the token."""
    name = list(served_folders[1])[4]
    prompts = [tokenizer("The cat sat").input_ids, tokenizer("on a mat", add_special_tokens=False).input_ids]
    alone = [_post(http, model=name, prompt=p, max_tokens=1, logprobs=1, echo=True)["choices"][0] for p in prompts]
    together = _post(http, model=name, prompt=prompts, max_tokens=1, logprobs=1, echo=True)["choices"]
    assert len(together) == 2
    for one, both, ids in zip(alone, together, prompts):
        assert both["text"] == one["text"] and both["text"].startswith(tokenizer.decode(ids))
        assert both["logprobs"]["tokens"] == one["logprobs"]["tokens"]
        assert both["logprobs"]["token_logprobs"][0] is None and one["logprobs"]["token_logprobs"][0] is None
        assert both["logprobs"]["token_logprobs"][1:] == pytest.approx(one["logprobs"]["token_logprobs"][1:],
                                                                       abs=1e-5)
        assert len(both["logprobs"]["tokens"]) == len(ids) + 1
    answer = _post(http, model=name, prompt=prompts, max_tokens=0, logprobs=1, echo=True)
    assert answer["usage"]["completion_tokens"] == 0
    for zero, one, ids in zip(answer["choices"], alone, prompts):
        assert zero["text"] == tokenizer.decode(ids) and zero["finish_reason"] == "length"
        assert zero["logprobs"]["tokens"] == one["logprobs"]["tokens"][:-1]
        assert zero["logprobs"]["token_logprobs"][1:] == pytest.approx(one["logprobs"]["token_logprobs"][1:-1],
                                                                       abs=1e-5)
        assert zero["logprobs"]["text_offset"] == one["logprobs"]["text_offset"][:-1]
    echoed = _post(http, model=name, prompt="just this", max_tokens=0, echo=True)["choices"][0]
    assert echoed["text"] == "just this" and echoed["logprobs"] is None


@pytest.mark.parametrize("prompt, says", [
    ([], "found an empty list"),
    ({"text": "x"}, "found dict"),
    (7, "found int"),
    ([1, "a"], "only strings, only token ids or only token-id lists; found string, token id"),
    (["a", [1, 2]], "found list, string"),
    ([True, False], "found bool"),
    ([[5, 6], []], "prompt[1] is an empty list of token ids"),
    ([[5, 6.5]], "prompt[0][1]: expected a token id (an integer), found float 6.5"),
    ([[5, "6"]], "prompt[0][1]: expected a token id (an integer), found str"),
    ([5, 100000], "token ids must lie in [0, 100); found [100000]"),
    ([[5], [-1]], "prompt[1]: token ids must lie in [0, 100); found [-1]"),
    ([[5]] * 257, "at most 256 prompts per request; found 257"),
    ([[5] * 200], "has 200 tokens; this model's context is 96 tokens"),
])
def test_bad_prompts_are_400_naming_the_field(http, prompt, says):
    error = _error(http, prompt=prompt, max_tokens=2)
    assert error["param"] == "prompt" and says in error["message"], error
    assert error["type"] == "BadRequestError"


def test_bad_lengths_are_400(http):
    assert _error(http, prompt="x", max_tokens=0)["param"] == "max_tokens"  # nothing asked for
    assert "echo=true" in _error(http, prompt="x", max_tokens=0)["message"]
    error = _error(http, prompt=["x", "y" * 90], max_tokens=10)
    assert error["param"] == "max_tokens" and "prompt[1] has 91" in error["message"]
    assert "prompt has 96 tokens" in _error(http, prompt=[[5] * 96], max_tokens=0, echo=True)["message"]


def test_429_carries_retry_after_and_a_refused_batch_leaves_nothing_queued(served_folders, tiny_server):
    model_dir, adapters, _ = served_folders
    running = tiny_server(model_dir, adapters, max_queue=2)
    gate = threading.Event()
    running.engine.call(lambda: gate.wait(TIMEOUT))  # hold the engine thread: requests wait
    try:
        with httpx.Client(base_url=running.url, timeout=TIMEOUT) as http:
            body = {"model": "tiny-llama", "prompt": ["a", "b", "c"], "max_tokens": 2}
            response = http.post("/v1/completions", json=body)  # the third prompt finds the queue full
            assert response.status_code == 429, response.text
            assert response.headers["retry-after"] == "1"
            assert response.json()["error"]["type"] == "RateLimitError"
            gate.set()
            deadline = time.monotonic() + TIMEOUT
            while running.engine.snapshot()["requests_cancelled"] < 2 and time.monotonic() < deadline:
                time.sleep(0.02)
            numbers = running.engine.snapshot()
            assert numbers["requests_cancelled"] == 2 and numbers["waiting"] == 0 and numbers["running"] == 0
            ok = http.post("/v1/completions", json={**body, "prompt": ["a", "b"]})
            assert ok.status_code == 200 and len(ok.json()["choices"]) == 2
            assert "retry-after" not in ok.headers
    finally:
        gate.set()


def test_tokenize_and_detokenize_as_vllm_does(http, tokenizer):
    """vLLM's tokenizer routes (lm-eval's local-completions finds them and tokenizes through them)."""
    ids = tokenizer("Hi there").input_ids
    answer = http.post("/tokenize", json={"prompt": "Hi there"}).json()
    assert answer["tokens"] == ids and answer["count"] == len(ids) and answer["max_model_len"] == 96
    assert http.post("/tokenize", json={"prompt": "</s>", "add_special_tokens": False}).json()["tokens"] == [2]
    assert http.post("/detokenize", json={"tokens": ids}).json() == {"prompt": tokenizer.decode(ids)}
    info = http.get("/tokenizer_info").json()
    assert (info["bos_token"], info["eos_token"], info["pad_token"]) == ("<s>", "</s>", "<pad>")
    assert info["chat_template"] == tokenizer.chat_template
    error = http.post("/detokenize", json={"tokens": [5, 100]}).json()["error"]
    assert error["param"] == "tokens" and "[0, 100); found [100]" in error["message"]
    assert http.post("/tokenize", json={"prompt": "x", "model": "nope"}).status_code == 404
    assert http.post("/tokenize", json={"prompt": 5}).status_code == 400


def test_tokenizer_routes_are_behind_the_api_key(served_folders, monkeypatch):
    from shirakit.serve import Engine, start_server
    from shirakit.serve.policy import Policy

    model_dir, adapters, _ = served_folders
    model, tok = load_tiny_lm(model_dir)
    running = start_server(Engine(model, tok, "tiny-llama", adapters), policy=Policy(api_key="k3y"))
    try:
        with httpx.Client(base_url=running.url, timeout=TIMEOUT) as http:
            assert http.get("/tokenizer_info").status_code == 401
            assert http.post("/tokenize", json={"prompt": "x"}).status_code == 401
            assert http.post("/detokenize", json={"tokens": [5]}).status_code == 401
            key = {"Authorization": "Bearer k3y"}
            assert http.post("/tokenize", json={"prompt": "x"}, headers=key).status_code == 200
            assert http.get("/health").status_code == 200
    finally:
        running.stop()
