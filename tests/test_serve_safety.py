"""`shirakit serve` under attack (issue 24): a reloaded name serves its new folder, one client's
request can never fail another's, and the admin surface is closed unless opened."""

from __future__ import annotations

import functools
import json
import shutil
import threading
import time

import httpx
import pytest

from tests.serving import load_tiny_lm, offline_text, save_adapters, save_tiny_lm

pytest.importorskip("fastapi")
from shirakit.serve import Engine, start_server  # noqa: E402
from shirakit.serve.policy import Policy  # noqa: E402

TIMEOUT = 60


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety")
    model_dir = save_tiny_lm(root / "tiny-llama")
    adapters = save_adapters(model_dir, root / "adapters", 5)
    return model_dir, adapters, root


def _server(folders, adapters=None, step_delay=0.0, **engine_args):
    model_dir, found, _ = folders
    model, tokenizer = load_tiny_lm(model_dir)
    engine = Engine(model, tokenizer, "tiny-llama", found if adapters is None else adapters, **engine_args)
    if step_delay:  # slow decode steps, so a stream is surely still running while the test acts
        real = engine._iterate

        def slow():
            time.sleep(step_delay)
            real()

        engine._iterate = slow
    return start_server(engine, policy=Policy(allow_runtime_adapters=True))


def _text(http, model, prompt, max_tokens=12):
    response = http.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": max_tokens,
                                                   "temperature": 0})
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def _stream_text(lines) -> tuple[str, bool]:
    """(the text of a completions stream's lines, whether it ended with [DONE])."""
    text, done = "", False
    for line in lines:
        if not line.startswith("data: "):
            continue
        if line == "data: [DONE]":
            done = True
            break
        chunk = json.loads(line[6:])
        text += "".join(c["text"] for c in chunk["choices"])
    return text, done


# ---- a name means the folder it was last given ------------------------------------------------------
def test_reloading_a_name_in_use_serves_the_new_folder(folders, tmp_path):
    model_dir, adapters, _ = folders
    old, new = list(adapters.values())[0], list(adapters.values())[1]  # a LoRA and a SHiRA adapter
    shutil.copytree(old, tmp_path / "old")
    shutil.copytree(new, tmp_path / "new")
    running = _server(folders, adapters={}, step_delay=0.01)
    body = {"model": "x", "prompt": "a long one", "max_tokens": 60, "temperature": 0, "stream": True}
    try:
        with httpx.Client(base_url=running.url, timeout=TIMEOUT) as http:
            assert http.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(tmp_path / "old")}
                             ).status_code == 200
            with http.stream("POST", "/v1/completions", json=body) as stream:
                lines = stream.iter_lines()
                first = next(line for line in lines if line.startswith("data: "))
                assert http.post("/v1/unload_lora_adapter", json={"lora_name": "x"}).status_code == 200
                loaded = http.post("/v1/load_lora_adapter", json={"lora_name": "x",
                                                                  "lora_path": str(tmp_path / "new")})
                assert loaded.status_code == 200, loaded.text
                assert running.engine.snapshot()["running"] == 1  # the old stream is still decoding
                during = _text(http, "x", "the new one")  # batched beside the old stream's row
                rest, done = _stream_text(lines)
            old_text = json.loads(first[6:])["choices"][0]["text"] + rest
            after = _text(http, "x", "after the stream")
        assert done and old_text == offline_text(model_dir, tmp_path / "old", "a long one", 60)
        assert during == offline_text(model_dir, tmp_path / "new", "the new one", 12)
        assert after == offline_text(model_dir, tmp_path / "new", "after the stream", 12)
        assert after != offline_text(model_dir, tmp_path / "old", "after the stream", 12)
        deadline = time.monotonic() + TIMEOUT
        while running.engine.snapshot()["adapters_loaded"] != 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert running.engine.snapshot()["adapters_loaded"] == 1  # the old tensors left with the old row
    finally:
        running.stop()


def test_reloading_a_name_in_use_from_a_corrupt_folder_is_refused(folders, tmp_path):
    _, adapters, _ = folders
    source = list(adapters.values())[0]
    shutil.copytree(source, tmp_path / "old")
    shutil.copytree(source, tmp_path / "broken")
    data = (tmp_path / "broken" / "adapter_model.safetensors").read_bytes()
    (tmp_path / "broken" / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    running = _server(folders, adapters={}, step_delay=0.01)
    body = {"model": "x", "prompt": "a long one", "max_tokens": 60, "temperature": 0, "stream": True}
    try:
        with httpx.Client(base_url=running.url, timeout=TIMEOUT) as http:
            assert http.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(tmp_path / "old")}
                             ).status_code == 200
            with http.stream("POST", "/v1/completions", json=body) as stream:
                lines = stream.iter_lines()
                next(line for line in lines if line.startswith("data: "))
                assert http.post("/v1/unload_lora_adapter", json={"lora_name": "x"}).status_code == 200
                broken = http.post("/v1/load_lora_adapter", json={"lora_name": "x",
                                                                  "lora_path": str(tmp_path / "broken")})
                assert broken.status_code == 400 and "safetensors" in broken.json()["error"]["message"]
                assert str(tmp_path) not in broken.text  # no server paths in errors
                _, done = _stream_text(lines)
            assert done
            assert http.post("/v1/completions", json={"model": "x", "prompt": "gone"}).status_code == 404
    finally:
        running.stop()


@functools.lru_cache(maxsize=None)
def _offline(model_dir, adapter_dir, prompt, max_tokens):
    return offline_text(model_dir, adapter_dir, prompt, max_tokens)


# ---- one client never fails another ------------------------------------------------------------------
POISON = 33  # the poisoned request's max_tokens: how the injected failure finds its row


def _bystanders(running, names, max_tokens=60):
    """Start one greedy stream per name on threads; returns (threads, results: name -> (text, done))."""
    results = {}

    def run(name):
        body = {"model": name, "prompt": f"bystander {name}", "max_tokens": max_tokens, "temperature": 0,
                "stream": True}
        with httpx.Client(base_url=running.url, timeout=TIMEOUT) as http:
            with http.stream("POST", "/v1/completions", json=body) as stream:
                results[name] = _stream_text(stream.iter_lines())

    threads = [threading.Thread(target=run, args=(name,)) for name in names]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + TIMEOUT
    while running.engine.snapshot()["running"] < len(names) and time.monotonic() < deadline:
        time.sleep(0.005)
    assert running.engine.snapshot()["running"] == len(names)
    return threads, results


def _check_bystanders(folders, threads, results, max_tokens=60):
    model_dir, adapters, _ = folders
    for thread in threads:
        thread.join(TIMEOUT)
    for name, (text, done) in results.items():
        assert done, name
        assert text == _offline(model_dir, adapters.get(name), f"bystander {name}", max_tokens), name


@pytest.mark.parametrize("where,stream", [("sample", False), ("stop", True), ("decode", True), ("decode", False)])
def test_a_failure_in_one_row_fails_that_request_alone(folders, monkeypatch, where, stream):
    from shirakit.serve import engine as engine_module
    from shirakit.serve.sequence import Sequence

    def poisoned(seq):
        return seq.params.max_tokens == POISON and len(seq.tokens) >= 3

    if where == "sample":
        real_sample = engine_module.sample
        monkeypatch.setattr(engine_module, "sample", lambda logits, seq: (_ for _ in ()).throw(
            RuntimeError("injected sample failure")) if poisoned(seq) else real_sample(logits, seq))
    else:
        method = {"stop": "check_stop", "decode": "decode"}[where]
        real = getattr(Sequence, method)

        def broken(self, *args):
            if poisoned(self):
                raise RuntimeError(f"injected {where} failure")
            return real(self, *args)

        monkeypatch.setattr(Sequence, method, broken)
    names = ["tiny-llama", *list(folders[1])[:3]]
    running = _server(folders, step_delay=0.01)
    try:
        threads, results = _bystanders(running, names)
        body = {"model": names[1], "prompt": "poison", "max_tokens": POISON, "temperature": 0.7, "seed": 1,
                "n": 2, "stream": stream}
        with httpx.Client(base_url=running.url, timeout=TIMEOUT) as http:
            if stream:
                with http.stream("POST", "/v1/completions", json=body) as response:
                    assert response.status_code == 200
                    lines = [line for line in response.iter_lines() if line.startswith("data: ")]
                assert lines[-1] == "data: [DONE]"
                error = json.loads(lines[-2][6:])["error"]
            else:
                response = http.post("/v1/completions", json=body)
                assert response.status_code == 500, response.text
                error = response.json()["error"]
        assert f"injected {where} failure" in error["message"] and error["code"] == 500
        _check_bystanders(folders, threads, results)
        # a row's last event goes out before the engine retires it, in the same iteration: wait for it
        deadline = time.monotonic() + 5
        while running.engine.snapshot()["running"] and time.monotonic() < deadline:
            time.sleep(0.01)
        numbers = running.engine.snapshot()
        assert numbers["requests_failed"] == 1 and numbers["requests_finished"] == len(names)
        assert numbers["running"] == 0
    finally:
        running.stop()


def test_out_of_range_parameters_are_refused_at_the_door_or_served(folders):
    """The issue's attack values: each is a 400 naming its field, or is served; bystanders never notice."""
    name = list(folders[1])[0]
    running = _server(folders, step_delay=0.01)
    try:
        threads, results = _bystanders(running, ["tiny-llama", name])
        with httpx.Client(base_url=running.url, timeout=TIMEOUT) as http:
            for bad, field in [({"seed": 2**70}, "seed"), ({"seed": 2**64 - 1, "n": 2}, "seed"),
                               ({"seed": -2**63 - 1}, "seed"), ({"temperature": -1}, "temperature"),
                               ({"top_p": 0}, "top_p"), ({"n": 17}, "n"), ({"max_tokens": 0}, "max_tokens")]:
                response = http.post("/v1/completions", json={"model": name, "prompt": "x", **bad})
                assert response.status_code == 400, (bad, response.text)
                assert response.json()["error"]["param"] == field
            for fine in [{"temperature": 1e-300}, {"temperature": 1e-45}, {"top_p": 1e-300, "temperature": 1},
                         {"seed": 2**63 - 1, "n": 2, "temperature": 1}, {"seed": -2**63, "temperature": 1}]:
                for _ in range(2):
                    response = http.post("/v1/completions", json={"model": name, "prompt": "x", "max_tokens": 4,
                                                                  **fine})
                    assert response.status_code == 200, (fine, response.text)
        _check_bystanders(folders, threads, results)
        assert running.engine.snapshot()["requests_failed"] == 0
    finally:
        running.stop()


# ---- the admin surface -------------------------------------------------------------------------------
def _policy_server(folders, policy):
    model_dir, found, _ = folders
    model, tokenizer = load_tiny_lm(model_dir)
    return start_server(Engine(model, tokenizer, "tiny-llama", found), policy=policy)


def test_runtime_adapters_are_off_by_default(folders):
    running = _policy_server(folders, Policy())
    try:
        with httpx.Client(base_url=running.url, timeout=TIMEOUT) as http:
            name = list(folders[1])[0]
            for route, body in [("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": str(folders[1][name])}),
                                ("/v1/unload_lora_adapter", {"lora_name": name})]:
                response = http.post(route, json=body)
                assert response.status_code == 403 and "--allow-runtime-adapters" in response.json()["error"]["message"]
            assert name in [m["id"] for m in http.get("/v1/models").json()["data"]]
    finally:
        running.stop()


def test_api_key_adapter_roots_and_errors_without_server_paths(folders, tmp_path, monkeypatch):
    from shirakit.serve import prefetch as prefetch_module

    _, adapters, root = folders
    allowed = tmp_path / "allowed"
    shutil.copytree(list(adapters.values())[0], allowed / "good")
    (allowed / "escape").symlink_to(root / "adapters")  # a link out of the root
    outside = list(adapters.values())[1]
    readers = []
    real_read = prefetch_module.read_adapter_files
    monkeypatch.setattr(prefetch_module, "read_adapter_files",
                        lambda path: readers.append(threading.current_thread().name) or real_read(path))
    running = _policy_server(folders, Policy(api_key="sekrit", allow_runtime_adapters=True,
                                             adapter_roots=(allowed,)))
    key = {"Authorization": "Bearer sekrit"}
    try:
        with httpx.Client(base_url=running.url, timeout=TIMEOUT) as http:
            assert http.get("/health").status_code == 200  # open
            for headers in [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekrit"}]:
                response = http.get("/v1/models", headers=headers)
                assert response.status_code == 401 and response.json()["error"]["code"] == 401
                assert http.post("/v1/completions", headers=headers,
                                 json={"model": "tiny-llama", "prompt": "x"}).status_code == 401
            assert http.get("/v1/models", headers=key).status_code == 200

            def load(path, name="y"):
                return http.post("/v1/load_lora_adapter", headers=key, json={"lora_name": name, "lora_path": path})

            messages = []
            for path in [str(outside), str(tmp_path / "no-such-folder"), str(allowed / ".." / outside.name),
                         str(allowed / "escape" / outside.name), "x" * 4000]:
                response = load(path)
                assert response.status_code == 400, (path, response.text)
                message = response.json()["error"]["message"]
                # only what the client sent comes back: never a resolved path, never the OS's own text
                assert (str(outside) not in message or path == str(outside)) and "File name too long" not in message
                assert len(message) < 400, message
                messages.append(message)
            # existing or not, a folder outside the roots gets the same answer
            assert all("outside the adapter roots" in m for m in messages[:4]), messages
            assert load(str(allowed / "good")).status_code == 200
            assert "shirakit-engine" not in readers and readers  # read on a reader thread, not the engine's
            assert _text(http.__class__(base_url=running.url, timeout=TIMEOUT, headers=key), "y", "hello")
    finally:
        running.stop()


def test_large_bodies_long_prompts_and_unsupported_parameters(folders):
    running = _policy_server(folders, Policy(max_body_bytes=64 * 1024))
    name = list(folders[1])[0]
    try:
        with httpx.Client(base_url=running.url, timeout=TIMEOUT) as http:
            huge = json.dumps({"model": name, "prompt": "y" * (10 << 20)}).encode()
            response = http.post("/v1/completions", content=huge, headers={"content-type": "application/json"})
            assert response.status_code == 413, response.text

            def chunks():  # no Content-Length: counted as it arrives
                yield b'{"model": "tiny-llama", "prompt": "'
                for _ in range(100):
                    yield b"z" * 4096
                yield b'"}'

            response = http.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
            assert response.status_code == 413, response.text
            start = time.monotonic()
            assert http.get("/health").status_code == 200 and time.monotonic() - start < 1.0
            # under the body bound but surely past the context (96 tokens): refused before tokenizing
            response = http.post("/v1/completions", json={"model": name, "prompt": "y" * 50000})
            assert response.status_code == 400 and response.json()["error"]["param"] == "prompt"
            for field, value in [("best_of", 3), ("suffix", "end"), ("tools", [{"type": "function"}]),
                                 ("response_format", {"type": "json_object"})]:
                response = http.post("/v1/completions", json={"model": name, "prompt": "x", field: value})
                assert response.status_code == 400, (field, response.text)
                assert response.json()["error"]["param"] == field
            chat = {"model": name, "messages": [{"role": "user", "content": "hi"}], "logprobs": True}
            assert http.post("/v1/chat/completions", json=chat).json()["error"]["param"] == "logprobs"
            assert http.post("/v1/completions", json={"model": name, "prompt": "x", "best_of": 1, "suffix": None,
                                                      "user": "someone", "max_tokens": 2}).status_code == 200
    finally:
        running.stop()


# ---- logprobs, echo, logit_bias, penalties -----------------------------------------------------------
def _offline_logprobs(model_dir, adapter_dir, ids):
    """log_softmax of the model's logits at every position of ``ids`` (offline, that adapter alone)."""
    import torch

    import shirakit

    model, _ = load_tiny_lm(model_dir)
    if adapter_dir is not None:
        shirakit.load_adapter(model, adapter_dir, "only")
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)


def _offline_penalized(model_dir, adapter_dir, ids, max_tokens, bias=None, presence=0.0, frequency=0.0):
    """Greedy tokens with OpenAI's logit_bias and penalties, the long way (full forward per token)."""
    import torch

    import shirakit

    model, _ = load_tiny_lm(model_dir)
    if adapter_dir is not None:
        shirakit.load_adapter(model, adapter_dir, "only")
    ids, out, counts = list(ids), [], {}
    with torch.no_grad():
        for _ in range(max_tokens):
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
            for token, value in (bias or {}).items():
                logits[token] += value
            for token, count in counts.items():
                logits[token] -= count * frequency + presence
            token = int(logits.argmax())
            if token == 2:  # </s>
                break
            out.append(token)
            counts[token] = counts.get(token, 0) + 1
            ids.append(token)
    return out


def test_logprobs_and_echo_as_lm_eval_asks_for_them(folders):
    """lm-evaluation-harness's local-completions loglikelihood: token ids, max_tokens 1, logprobs 1,
    echo; it sums token_logprobs[ctxlen:-1] and checks greediness against top_logprobs."""
    model_dir, adapters, _ = folders
    name = list(adapters)[1]
    _, tokenizer = load_tiny_lm(model_dir)
    context, continuation = tokenizer("The cat").input_ids, tokenizer("sat", add_special_tokens=False).input_ids
    ids = context + continuation
    reference = _offline_logprobs(model_dir, adapters[name], ids)
    running = _policy_server(folders, Policy())
    try:
        with httpx.Client(base_url=running.url, timeout=TIMEOUT) as http:
            body = {"model": name, "prompt": [ids], "max_tokens": 1, "logprobs": 1, "echo": True, "temperature": 0}
            response = http.post("/v1/completions", json=body)
            assert response.status_code == 200, response.text
            choice = response.json()["choices"][0]
            block = choice["logprobs"]
            assert len(block["tokens"]) == len(ids) + 1 and block["token_logprobs"][0] is None
            assert choice["text"].startswith(tokenizer.decode(ids))
            expected = [float(reference[i - 1, ids[i]]) for i in range(1, len(ids))]
            assert block["token_logprobs"][1:len(ids)] == pytest.approx(expected, abs=1e-4)
            answer = sum(block["token_logprobs"][len(context):-1])
            assert answer == pytest.approx(sum(expected[len(context) - 1:]), abs=1e-4)
            generated = block["token_logprobs"][-1]
            assert generated == pytest.approx(float(reference[-1].max()), abs=1e-4)  # greedy: the top one
            assert max(block["top_logprobs"][-1].values()) == pytest.approx(generated, abs=1e-6)
            assert block["text_offset"][:2] == [0, len(block["tokens"][0])]
            # streaming gives the same entries; without echo only the generated tokens
            stream = {**body, "prompt": "The cat", "echo": False, "max_tokens": 4, "stream": True, "logprobs": 2}
            with http.stream("POST", "/v1/completions", json=stream) as response:
                chunks = [json.loads(line[6:]) for line in response.iter_lines()
                          if line.startswith("data: {")]
            tokens = [t for c in chunks for t in c["choices"][0]["logprobs"]["tokens"]]
            assert "".join(tokens) == "".join(c["choices"][0]["text"] for c in chunks)
            assert all(len(top) >= 2 for c in chunks for top in c["choices"][0]["logprobs"]["top_logprobs"])
    finally:
        running.stop()


def test_ignore_eos_generates_max_tokens_past_end_of_sequence(folders):
    """vLLM's ``ignore_eos``: an end-of-sequence token no longer ends the choice (benchmark clients send
    it so that every engine generates the same count); without it the same request stops at once."""
    model_dir, adapters, _ = folders
    name = list(adapters)[0]
    _, tokenizer = load_tiny_lm(model_dir)
    eos = tokenizer.eos_token_id
    running = _policy_server(folders, Policy())
    try:
        with httpx.Client(base_url=running.url, timeout=TIMEOUT) as http:
            def choice(**kw):
                body = {"model": name, "prompt": "abab", "max_tokens": 6, "temperature": 0,
                        "logit_bias": {str(eos): 100}, **kw}
                response = http.post("/v1/completions", json=body)
                assert response.status_code == 200, response.text
                return response.json()["choices"][0], response.json()["usage"]["completion_tokens"]

            stopped, count = choice()
            assert stopped["finish_reason"] == "stop" and count == 1
            kept, count = choice(ignore_eos=True)
            assert kept["finish_reason"] == "length" and count == 6
            assert choice(ignore_eos=False)[1] == 1
            assert http.post("/v1/completions", json={"model": name, "prompt": "x", "ignore_eos": "sometimes"}
                             ).json()["error"]["param"] == "ignore_eos"
    finally:
        running.stop()


def test_logit_bias_and_penalties_follow_openai(folders):
    model_dir, adapters, _ = folders
    name = list(adapters)[0]
    _, tokenizer = load_tiny_lm(model_dir)
    prompt = tokenizer("abab").input_ids
    running = _policy_server(folders, Policy())
    try:
        with httpx.Client(base_url=running.url, timeout=TIMEOUT) as http:
            def tokens(**kw):
                body = {"model": name, "prompt": prompt, "max_tokens": 10, "temperature": 0, "logprobs": 0, **kw}
                response = http.post("/v1/completions", json=body)
                assert response.status_code == 200, response.text
                return [tokenizer.convert_tokens_to_ids(t) for t in response.json()["choices"][0]["logprobs"]["tokens"]]

            z, y = tokenizer.convert_tokens_to_ids("z"), tokenizer.convert_tokens_to_ids("y")
            assert tokens(logit_bias={str(z): 100}) == [z] * 10
            two = {str(z): 50, str(y): 49}  # z wins until the penalties have taken enough off it
            for kw, offline in [({"logit_bias": two, "frequency_penalty": 1.5}, {"frequency": 1.5}),
                                ({"logit_bias": two, "presence_penalty": 2.0}, {"presence": 2.0}),
                                ({"logit_bias": {str(z): 3.0}, "frequency_penalty": -0.5}, {"frequency": -0.5}),
                                ({"frequency_penalty": 2.0, "presence_penalty": -1.0},
                                 {"frequency": 2.0, "presence": -1.0})]:
                bias = {int(k): v for k, v in kw.get("logit_bias", {}).items()}
                got = [t for t in tokens(**kw) if t != 2]
                assert got == _offline_penalized(model_dir, adapters[name], prompt, 10, bias=bias, **offline), kw
            assert y in tokens(logit_bias=two, frequency_penalty=1.5)  # the penalty did change the text
            assert http.post("/v1/completions", json={"model": name, "prompt": "x", "logit_bias": {"100000": 1}}
                             ).json()["error"]["param"] == "logit_bias"
            assert http.post("/v1/completions", json={"model": name, "prompt": "x", "logit_bias": {"5": 101}}
                             ).status_code == 400
            assert http.post("/v1/completions", json={"model": name, "prompt": "x", "presence_penalty": 3}
                             ).json()["error"]["param"] == "presence_penalty"
    finally:
        running.stop()
