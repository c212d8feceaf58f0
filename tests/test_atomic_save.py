"""A save is all or nothing for the folder: SIGKILL at any instant leaves the old adapter or the new one.

The kill loop forks a child that saves two adapters (LoRA alpha 8 and 16, different weights) into
one folder alternately, without pause, and SIGKILLs it at a random instant; the folder must then
read as exactly one of the two, config and weights from the same save, with no warning. CI runs
50 kills; ``-m slow`` runs the issue's 200 (also: ``python tests/test_atomic_save.py 200``).
"""

from __future__ import annotations

import os
import random
import select
import signal
import sys
import warnings

import pytest
import torch

import shirakit
from shirakit.io import folder
from shirakit.io.checkpoint import adapter_state_dict, read_weights
from shirakit.io.folder import CONFIG_NAME, WEIGHTS_NAME

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork (POSIX)")


def two_adapter_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32))
    for name, alpha in (("a", 8), ("b", 16)):
        shirakit.inject(model, shirakit.LoraConfig(r=4, lora_alpha=alpha, target_modules=["0", "2"],
                                                   init_lora_weights=False), name)
    return model


def reference(model) -> dict[str, tuple[float, dict[str, torch.Tensor]]]:
    return {name: (model.shirakit.configs[name].lora_alpha, adapter_state_dict(model, name)) for name in ("a", "b")}


def which_save(directory, references) -> str:
    """'a' or 'b' when the folder reads as exactly that save (a warning is an error), else raise."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config = shirakit.read_config(directory)
        _, tensors, _ = read_weights(directory)
        loaded = shirakit.load_adapter(torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(),
                                                           torch.nn.Linear(32, 32)), directory)
    for name, (alpha, expected) in references.items():
        if config.lora_alpha == alpha and tensors.keys() == expected.keys():
            if all(torch.equal(tensors[k], expected[k]) for k in expected):
                assert loaded.shirakit.configs["default"].lora_alpha == alpha
                return name
    raise AssertionError(f"{directory}: config (alpha {config.lora_alpha}) and weights are not one save's")


def _run_child(work) -> int:
    """Fork a child running ``work()`` (which never returns); it writes one byte to a pipe first."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        try:
            os.close(read_end)
            os.write(write_end, b"r")
            work()
        finally:
            os._exit(0)
    os.close(write_end)
    ready, _, _ = select.select([read_end], [], [], 30)
    os.close(read_end)
    if not ready:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise RuntimeError("the saving child did not start")
    return pid


def kill_loop(directory, kills: int, seed: int = 0) -> dict[str, int]:
    """SIGKILL a child saving alternately 'b' and 'a' at ``kills`` random instants; check each time."""
    model = two_adapter_model()
    references = reference(model)
    shirakit.save_adapter(model, directory, "a")
    rng = random.Random(seed)
    counts = {"kills": 0, "a": 0, "b": 0, "temp_files_left": 0, "between_renames": 0}

    def save_forever():
        i = 0
        while True:
            shirakit.save_adapter(model, directory, "ab"[i % 2 == 0])
            i += 1

    for _ in range(kills):
        pid = _run_child(save_forever)
        torch_free_sleep(rng.uniform(0.0, 0.2))  # a save takes ~20-100 ms here: kills land all over it
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        counts["kills"] += 1
        counts["temp_files_left"] += any(p.name.endswith(".tmp") for p in directory.iterdir())
        counts["between_renames"] += folder._bound_digest(directory) != folder._config_digest(directory)
        counts[which_save(directory, references)] += 1
    shirakit.save_adapter(model, directory, "b")  # a later save cleans every leftover up
    assert sorted(p.name for p in directory.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    return counts


def torch_free_sleep(seconds: float) -> None:
    select.select([], [], [], seconds)


@pytest.mark.slow  # forks and kills 50 saving processes
def test_sigkill_during_save_loop(tmp_path):
    counts = kill_loop(tmp_path, kills=50)
    assert counts["a"] + counts["b"] == 50  # every folder read as one whole save (which_save raises otherwise)
    assert counts["a"] and counts["b"]  # the kills landed across saves, not before the first one


@pytest.mark.slow
def test_sigkill_during_save_loop_200(tmp_path):
    counts = kill_loop(tmp_path, kills=200, seed=1)
    assert counts["a"] + counts["b"] == 200


def test_sigkill_between_the_two_renames(tmp_path):
    """The worst instant, every time: new weights in place, old config still there."""
    model = two_adapter_model()
    references = reference(model)
    shirakit.save_adapter(model, tmp_path, "a")
    for i in range(6):
        name = "ab"[i % 2 == 0]

        def save_and_die_midway(name=name):
            real_replace = os.replace

            def replace_then_die(src, dst):
                real_replace(src, dst)
                if str(dst).endswith(WEIGHTS_NAME):
                    os.kill(os.getpid(), signal.SIGKILL)

            os.replace = replace_then_die
            shirakit.save_adapter(model, tmp_path, name)

        pid = _run_child(save_and_die_midway)
        os.waitpid(pid, 0)
        assert folder._bound_digest(tmp_path) != folder._config_digest(tmp_path)  # it did die between them
        assert which_save(tmp_path, references) == name  # the interrupted save was completed on reading


def test_failed_config_rename_is_completed_on_read(tmp_path, monkeypatch):
    model = two_adapter_model()
    references = reference(model)
    shirakit.save_adapter(model, tmp_path, "a")
    real_replace = os.replace

    def fail_on_config(src, dst):
        if str(dst).endswith(CONFIG_NAME):
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", fail_on_config)
    with pytest.raises(OSError, match="disk full"):
        shirakit.save_adapter(model, tmp_path, "b")
    monkeypatch.undo()
    assert which_save(tmp_path, references) == "b"
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]


def test_hand_edited_config_loads_with_a_warning(tmp_path):
    model = two_adapter_model()
    shirakit.save_adapter(model, tmp_path, "a")
    text = (tmp_path / CONFIG_NAME).read_text().replace('"lora_alpha": 8', '"lora_alpha": 4')
    (tmp_path / CONFIG_NAME).write_text(text)
    with pytest.warns(UserWarning, match="not the config saved with adapter_model.safetensors"):
        assert shirakit.read_config(tmp_path).lora_alpha == 4


def test_peft_reads_our_bound_files(tmp_path):
    peft = pytest.importorskip("peft")
    model = two_adapter_model()
    shirakit.save_adapter(model, tmp_path, "b")
    config = peft.PeftConfig.from_pretrained(str(tmp_path))
    assert config.lora_alpha == 16 and config.r == 4


if __name__ == "__main__":  # the full run: python tests/test_atomic_save.py [kills]
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as folder_path:
        print(kill_loop(Path(folder_path), kills=int(sys.argv[1]) if len(sys.argv) > 1 else 200))
