"""`shirakit serve` under attack (issue 24): a reloaded name serves its new folder, one client's
request can never fail another's, and the admin surface is closed unless opened."""

from __future__ import annotations

import json
import shutil
import threading
import time

import httpx
import pytest

from tests.serving import load_tiny_lm, offline_text, save_adapters, save_tiny_lm

pytest.importorskip("fastapi")
from shirakit.serve import Engine, start_server  # noqa: E402

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
        real = engine._decode_step

        def slow():
            time.sleep(step_delay)
            real()

        engine._decode_step = slow
    return start_server(engine)


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
