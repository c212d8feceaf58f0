"""Bad arguments: exit status 2, one line naming the argument or folder, and no model loaded."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from shirakit.cli import build_parser, main
from shirakit.cli import models as cli_models
from tests import folders


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    root = tmp_path_factory.mktemp("args")
    (root / "a-file").write_text("x")
    (root / "no-config").mkdir()
    (root / "notes.xyz").write_text("x")
    (root / "bad.yaml").write_text("model: [unclosed\n")
    (root / "unknown.yaml").write_text("batch_sise: 4\n")
    existing = root / "existing"
    existing.mkdir()
    (existing / "adapter_config.json").write_text("{}")
    return {"root": root, "lm": folders.causal_lm_folder(root / "lm"), "text": folders.text_jsonl(root / "t.jsonl")}


@pytest.fixture
def no_model_loads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(cli_models, "load_model", refuse)


def run_train(user, *args) -> list[str]:
    base = {"--model": str(user["lm"]), "--data": str(user["text"]), "--task": "causal-lm",
            "--out": str(user["root"] / "out")}
    given = dict(zip(args[::2], args[1::2]))
    merged = {**base, **given}
    return ["train", *[t for k, v in merged.items() for t in ((k,) if v is None else (k, v))]]


# (arguments given on top of a valid train command, text the one-line error must contain)
TRAIN_CASES = [
    (("--batch-size", "0"), "--batch-size"),
    (("--max-steps", "0"), "--max-steps"),
    (("--epochs", "0"), "--epochs"),
    (("--r", "-1"), "--r"),
    (("--grad-accum", "x"), "--grad-accum"),
    (("--eval-split", "0"), "--eval-split"),
    (("--eval-split", "2.5"), "--eval-split"),
    (("--lr", "nan"), "--lr"),
    (("--train-rows", "0"), "--train-rows"),
    (("--method", "dora"), "--method"),
    (("--task", "chat"), "--task"),
    (("--device", "tpu"), "--device"),
    (("--dtype", "float16", "--device", "cpu"), "--dtype float16"),
    (("--mask", "grad", "--method", "lora"), "--mask grad"),
    (("--out", "{root}/a-file"), "--out"),
    (("--out", "{root}/existing"), "--overwrite"),
    (("--out", "{root}/a-file", "--model", "{root}/missing"), "--out"),  # --out is checked first
    (("--model", "{root}/missing"), "--model"),
    (("--model", "{root}/no-config"), "config.json"),
    (("--data", "{root}/missing.jsonl"), "--data"),
    (("--data", "{root}/notes.xyz"), "--data"),
    (("--eval-data", "{root}/missing.csv"), "--eval-data"),
    (("--task", None), "--task"),
    (("--resume", "{root}/no-config"), "--resume"),
    (("--config", "{root}/missing.yaml"), "--config"),
    (("--config", "{root}/bad.yaml"), "--config"),
    (("--config", "{root}/unknown.yaml"), "batch_sise"),
    (("--text-column", "body"), "--text-column"),
]
if not torch.cuda.is_available():
    TRAIN_CASES.append((("--device", "cuda"), "--device cuda"))


def _fill(user, items):
    return tuple(None if v is None else v.format(root=user["root"]) for v in items)


@pytest.mark.parametrize("extra, named", TRAIN_CASES, ids=[" ".join(map(str, c[0])) for c in TRAIN_CASES])
def test_bad_train_argument(user, no_model_loads, capsys, extra, named):
    argv = run_train(user, *_fill(user, extra))
    if extra == ("--task", None):
        argv.remove("--task")
    with pytest.raises(SystemExit) as info:
        raise SystemExit(main(argv))
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error" in err and named in err, err
    assert not (user["root"] / "out").exists()


OTHER_CASES = [
    (["switch", "{root}/existing", "--repeats", "0"], "--repeats"),
    (["fuse", "{root}/missing", "--out", "{root}/f"], "missing"),
    (["fuse", "{root}/existing", "--out", "{root}/a-file"], "--out"),
    (["inspect", "{root}/missing"], "missing"),
    (["orthogonality", "{root}/existing", "{root}/existing", "--png", "{root}/no-such-folder/o.png"], "--png"),
    (["eval", "{root}/existing"], "--data"),
    (["eval", "{root}/existing", "--data", "{root}/notes.xyz"], "--data"),
    (["eval", "{root}/existing", "--model", "{root}/no-config", "--data", "{root}/t.jsonl"], "--model"),
    (["demo", "--steps", "0"], "--steps"),
    (["bench", "no_such_benchmark"], "no_such_benchmark"),
]


@pytest.mark.parametrize("argv, named", OTHER_CASES, ids=[" ".join(c[0][:2]) + c[1] for c in OTHER_CASES])
def test_bad_argument_other_commands(user, no_model_loads, capsys, argv, named):
    with pytest.raises(SystemExit) as info:
        raise SystemExit(main([a.format(root=user["root"]) for a in argv]))
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and named in err, err


def test_every_subcommand_has_help_with_defaults(capsys):
    """Each subcommand the command line lists (serve included) answers --help with its usage."""
    from shirakit.cli import SUBCOMMANDS

    assert {"train", "eval", "switch", "fuse", "inspect", "orthogonality", "bench", "demo", "serve"} <= set(SUBCOMMANDS)
    for command in SUBCOMMANDS:
        with pytest.raises(SystemExit) as info:
            build_parser().parse_args([command, "--help"])
        assert info.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith("usage: shirakit " + command)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    assert "(default: 8)" in capsys.readouterr().out


def test_help_imports_no_torch():
    """``shirakit --help`` stays fast: neither the package nor the parser imports torch or transformers."""
    code = ("import sys; from shirakit.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'transformers', 'datasets') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_bench_lists_its_scripts(capsys):
    assert main(["bench"]) == 0
    out = capsys.readouterr().out
    assert "switch" in out and "train_step" in out and "mixed_batch" in out


def test_a_preset_sets_flags_that_the_command_line_overrides():
    from shirakit.cli import _subparser, train_cmd

    parser = build_parser()
    argv = train_cmd.expand(["--preset", "shakespeare", "--seq-len", "32"], _subparser(parser, "train"))
    args = parser.parse_args(["train", *argv])
    assert (args.task, args.seq_len, args.train_rows, args.preset) == ("causal-lm", 32, 256, "shakespeare")
    assert args.targets == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_preset_data_is_a_dataset_with_text_and_label_columns():
    from shirakit import data

    try:
        table = data.preset_table("bbc_news")
    except FileNotFoundError:
        pytest.skip("the packaged BBC News data is not installed")
    assert table.column_names == ["text", "label"] and len(table) == 2225
    assert sorted(set(table["label"])) == data.bbc_news(test_size=1).labels
