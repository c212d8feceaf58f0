"""Adapters by repo id from the local Hugging Face hub cache (src/shirakit/io/hub.py), no network.

Each test builds the cache as huggingface_hub lays it out: ``models--org--name/blobs/<sha256>``,
``snapshots/<commit>/<file>`` as relative symlinks to the blobs, ``refs/main`` holding the commit;
under a temporary HF_HUB_CACHE (or HF_HOME).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch

import shirakit
from shirakit.io.hub import hub_cache_dir
from shirakit.serve.build import adapter_folders
from tests.models import inputs, tiny_llama

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def put_in_cache(cache: Path, repo_id: str, folder: Path, commit: str = COMMIT) -> Path:
    """Copy the files of ``folder`` into ``cache`` as the snapshot ``commit`` of model repo ``repo_id``."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True)
    for file in sorted(folder.iterdir()):
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def saved(tmp_path: Path, name: str, seed: int) -> Path:
    model = tiny_llama()
    shirakit.inject(model, shirakit.ShiraConfig(r=2, target_modules=["q_proj", "v_proj"], init_weights=False,
                                                random_seed=seed))
    return shirakit.save_adapter(model, tmp_path / name)


def logits_with(source) -> torch.Tensor:
    model = shirakit.load_adapter(tiny_llama(), source)
    with torch.no_grad():
        return model(input_ids=inputs()).logits


@pytest.fixture
def hub(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "hub-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    return cache


def test_load_adapter_by_repo_id_from_the_cache(hub, tmp_path):
    folder = saved(tmp_path, "a", seed=1)
    snapshot = put_in_cache(hub, "org/name", folder)
    assert (snapshot / "adapter_model.safetensors").is_symlink()
    want = logits_with(folder)
    torch.testing.assert_close(logits_with("org/name"), want, rtol=0, atol=0)
    assert shirakit.read_config("org/name") == shirakit.read_config(folder)
    assert logits_with("org/name").sub(logits_with(saved(tmp_path, "b", seed=2))).abs().max() > 1e-4  # distinct


def test_hf_home_is_honoured(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    assert hub_cache_dir() == tmp_path / "hf-home" / "hub"
    folder = saved(tmp_path, "a", seed=1)
    put_in_cache(tmp_path / "hf-home" / "hub", "org/name", folder)
    torch.testing.assert_close(logits_with("org/name"), logits_with(folder), rtol=0, atol=0)


def test_not_in_the_cache_is_a_clear_error(hub):
    with pytest.raises(FileNotFoundError) as info:
        shirakit.load_adapter(tiny_llama(), "org/missing")
    text = str(info.value)
    assert "'org/missing': no such local folder" in text
    assert str(hub / "models--org--missing" / "refs" / "main") in text and "never downloads" in text
    # a repo folder without the ref (an interrupted download) is not found either
    (hub / "models--org--partial" / "snapshots").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="models--org--partial"):
        shirakit.read_config("org/partial")


def test_a_revision_after_at_picks_a_branch_or_a_commit(hub, tmp_path):
    main_folder, v2_folder = saved(tmp_path, "main", seed=1), saved(tmp_path, "v2", seed=2)
    put_in_cache(hub, "org/name", main_folder)
    other = "fedcba9876543210fedcba9876543210fedcba98"
    put_in_cache(hub, "org/name", v2_folder, commit=other)
    (hub / "models--org--name" / "refs" / "main").write_text(COMMIT)  # put_in_cache moved main: put it back
    (hub / "models--org--name" / "refs" / "v2").write_text(other)
    want_main, want_v2 = logits_with(main_folder), logits_with(v2_folder)
    assert (want_main - want_v2).abs().max() > 1e-4
    torch.testing.assert_close(logits_with("org/name"), want_main, rtol=0, atol=0)
    torch.testing.assert_close(logits_with("org/name@v2"), want_v2, rtol=0, atol=0)
    torch.testing.assert_close(logits_with(f"org/name@{other}"), want_v2, rtol=0, atol=0)  # a commit hash
    torch.testing.assert_close(logits_with(f"org/name@{COMMIT}"), want_main, rtol=0, atol=0)
    with pytest.raises(FileNotFoundError) as info:
        shirakit.read_config("org/name@v3")
    assert "refs/v3" in str(info.value) and "--revision v3" in str(info.value)
    assert adapter_folders("org/name@v2") == {"name@v2": hub / "models--org--name" / "snapshots" / other}


def test_a_local_folder_wins_over_a_repo_id(hub, tmp_path):
    cached = saved(tmp_path, "cached", seed=1)
    put_in_cache(hub, "org/name", cached)
    local = saved(tmp_path / "org", "name", seed=2)  # ./org/name (the tests run in tmp_path)
    assert Path("org/name").resolve() == local.resolve()
    torch.testing.assert_close(logits_with("org/name"), logits_with(local), rtol=0, atol=0)
    assert (logits_with(local) - logits_with(cached)).abs().max() > 1e-4


def test_serve_adapters_by_repo_id(hub, tmp_path):
    one, two = saved(tmp_path, "one", seed=1), saved(tmp_path, "two", seed=2)
    snap_one = put_in_cache(hub, "org/style", one)
    shelf = tmp_path / "shelf"
    shelf.mkdir()
    (shelf / "local").symlink_to(two)
    found = adapter_folders("org/style, shelf")
    assert found == {"style": snap_one, "local": Path("shelf/local")}
    assert adapter_folders(str(two)) == {"two": two}  # one adapter folder is one adapter
    with pytest.raises(ValueError, match=r"\['style'\] already given"):
        adapter_folders("org/style,org/style")
    with pytest.raises(FileNotFoundError, match="--adapters 'org/nothing': no such local folder"):
        adapter_folders("org/nothing")


def test_cli_inspect_by_repo_id(hub, tmp_path, capsys):
    from shirakit.cli import main

    snapshot = put_in_cache(hub, "org/name", saved(tmp_path, "a", seed=1))
    assert main(["inspect", "org/name"]) == 0
    assert str(snapshot) in capsys.readouterr().out
    assert main(["inspect", "org/absent"]) == 2
    assert "adapter 'org/absent': no such local folder" in capsys.readouterr().err
