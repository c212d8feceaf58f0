"""The command line hides other libraries' known start-up noise and nothing else (src/shirakit/cli/quiet.py)."""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from shirakit.cli.quiet import KNOWN_NOISE, _DropKnown, hide_known_noise

ROOT = Path(__file__).resolve().parent.parent
NOISE = ("Failed to load", "_pytree", "Setting accelerator to CPU")


def shirakit(args: list[str], cwd: Path, **env) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "SHIRAKIT_VERBOSE"}
    environ.update(PYTHONPATH=f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", **env)
    return subprocess.run([sys.executable, "-m", "shirakit.cli", *args], capture_output=True, text=True,
                          env=environ, cwd=cwd, timeout=300)


def test_help_is_silent(tmp_path):
    done = shirakit(["--help"], tmp_path)
    assert done.returncode == 0 and "--verbose" in done.stdout
    assert done.stderr == ""


@pytest.fixture(scope="module")
def eval_args(tmp_path_factory) -> tuple[list[str], Path]:
    """``shirakit eval`` of a tiny adapter on a tiny model: a command that loads a transformers model."""
    import shirakit as sk
    from tests.serving import load_tiny_lm, save_tiny_lm

    root = tmp_path_factory.mktemp("quiet")
    model_dir = save_tiny_lm(root / "model")
    model, _ = load_tiny_lm(model_dir)
    sk.inject(model, sk.LoraConfig(r=2, target_modules=["q_proj"]))
    sk.save_adapter(model, root / "adapter")
    (root / "x.jsonl").write_text("".join(f'{{"text": "line {i} of some text"}}\n' for i in range(8)))
    return ["eval", str(root / "adapter"), "--model", str(model_dir), "--data", "x.jsonl", "--task", "causal-lm",
            "--seq-len", "16", "--device", "cpu"], root


def test_a_model_loading_command_is_quiet_and_verbose_shows_all(eval_args):
    args, root = eval_args
    quiet = shirakit(args, root)
    assert quiet.returncode == 0, quiet.stderr
    assert "perplexity" in quiet.stdout.lower()
    assert not [line for line in quiet.stderr.splitlines() if any(n in line for n in NOISE)], quiet.stderr
    loud = shirakit(["--verbose", *args], root)
    assert loud.returncode == 0 and loud.stdout == quiet.stdout
    if importlib.util.find_spec("torchao") is not None:  # the dev environment: torchao is what logs the noise
        assert "Failed to load" in loud.stderr and "_C_" in loud.stderr
        by_env = shirakit(args, root, SHIRAKIT_VERBOSE="1")
        assert "Failed to load" in by_env.stderr


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_only_the_known_messages_are_dropped():
    hide_known_noise()
    hide_known_noise()  # idempotent: one filter per logger
    collect = Collect()
    loggers = {name: logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")}
    try:
        for logger in loggers.values():  # torch's loggers do not propagate to the root: listen on each
            logger.addHandler(collect)
            assert sum(isinstance(f, _DropKnown) for f in logger.filters) == 1
        loggers["torchao"].warning("Failed to load /x/site-packages/torchao/_C_mxfp8.cpython-310-x86_64-linux-gnu"
                                   ".so: Could not load this library")
        loggers["torchao"].warning("Failed to load your checkpoint: a real problem")
        loggers["torch.utils._pytree"].warning("%s is an Enum subclass and is now natively supported by "
                                               "torch.compile as an opaque value type.", "<enum 'X'>")
        loggers["torch.utils._pytree"].warning("something else entirely")
        assert collect.messages == ["Failed to load your checkpoint: a real problem", "something else entirely"]
    finally:
        for name in KNOWN_NOISE:
            logger = logging.getLogger(name)
            logger.removeHandler(collect)
            for f in [f for f in logger.filters if isinstance(f, _DropKnown)]:
                logger.removeFilter(f)
