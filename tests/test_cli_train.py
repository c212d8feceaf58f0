"""``shirakit train`` on a user's model folder and data files, then eval, inspect, fuse, switch.

The model folders are tiny (tests/folders.py: Llama and BERT with a word-level tokenizer and a
chat template); the data is written here: JSON Lines text, a CSV of labelled reviews, chat JSONL.
"""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch

import shirakit
from shirakit.app.user_data import IGNORE_INDEX
from shirakit.cli import main
from tests import folders

FAST = ["--quiet", "--batch-size", "4", "--seed", "0"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("user")
    return {
        "lm": folders.causal_lm_folder(root / "my-llama"),
        "enc": folders.encoder_folder(root / "my-bert"),
        "text": folders.text_jsonl(root / "notes.jsonl"),
        "chat": folders.chat_jsonl(root / "chats.jsonl"),
        "csv": folders.reviews_csv(root / "reviews.csv"),
        "root": root,
    }


def record(folder) -> dict:
    return json.loads((folder / "shirakit_training.json").read_text())


def train(files, out, *extra) -> dict:
    assert main(["train", "--out", str(out), *FAST, *extra]) == 0
    return record(out)


def lm_run(files, out, *extra) -> dict:
    return train(files, out, "--model", str(files["lm"]), "--data", str(files["text"]), "--task", "causal-lm",
                 "--seq-len", "8", *extra)


def test_causal_lm_from_jsonl_then_eval_inspect_switch(files, tmp_path, capsys):
    rec = lm_run(files, tmp_path / "a", "--max-steps", "9")  # 28 packed rows / 4 = 7 steps an epoch
    assert rec["steps"] == list(range(1, 10)) and len(rec["epoch_metric"]) == 2  # beyond one epoch
    assert rec["finished"] and rec["task"] == "causal-lm" and rec["device_used"] == "cpu"
    assert rec["metric_after"] < rec["metric_before"]  # the adapter learned the repeated sentences
    assert (tmp_path / "a" / "training_curves.png").stat().st_size > 1000
    assert shirakit.read_config(tmp_path / "a").base_model_name_or_path == str(files["lm"].resolve())
    capsys.readouterr()

    assert main(["eval", str(tmp_path / "a")]) == 0  # held-out rows found again from the record
    out = capsys.readouterr().out
    adapter_ppl = float(out.split("adapter  perplexity ")[1].split()[0])
    assert adapter_ppl == pytest.approx(rec["metric_after"], rel=1e-3)

    assert main(["inspect", str(tmp_path / "a"), "--layers"]) == 0
    out = capsys.readouterr().out
    assert "layers       14" in out and "model.layers.1.mlp.down_proj" in out

    lm_run(files, tmp_path / "b", "--max-steps", "2", "--seed", "1")
    assert main(["switch", str(tmp_path / "a"), str(tmp_path / "b"), "--repeats", "2"]) == 0
    assert "fused-mode switch: median" in capsys.readouterr().out


def test_sft_trains_on_assistant_tokens_only(files, tmp_path):
    from shirakit.app import user_data

    tok = folders.tokenizer()
    rows = user_data.sft(user_data.load_table(files["chat"]).select(range(2)), tok, "messages", 128, "chats")
    for row, chat in zip(rows, folders.CHATS):
        trained = [t for t in row["labels"] if t != IGNORE_INDEX]
        wanted = "".join(m["content"] + "<|end|>" for m in chat if m["role"] == "assistant")
        assert tok.decode(trained).replace(" ", "") == wanted.replace(" ", "")
        assert len(row["labels"]) == len(row["input_ids"])
    rec = train(files, tmp_path / "s", "--model", str(files["lm"]), "--data", str(files["chat"]), "--task", "sft",
                "--max-steps", "3", "--eval-split", "2")
    assert rec["steps"] == [1, 2, 3] and rec["metric"] == "perplexity"


def test_classifier_from_csv_eval_and_fuse_keeps_the_head(files, tmp_path, capsys):
    args = ["--model", str(files["enc"]), "--data", str(files["csv"]), "--task", "classification",
            "--text-column", "review", "--label-column", "sentiment", "--method", "lora", "--lr", "1e-2",
            "--epochs", "3", "--eval-split", "0.25"]
    rec = train(files, tmp_path / "c", *args)
    assert rec["labels"] == ["neg", "pos"] and len(rec["epoch_metric"]) == 3
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "c")]) == 0
    accuracy = float(capsys.readouterr().out.split("adapter  accuracy ")[1].split()[0])
    assert accuracy == pytest.approx(rec["metric_after"], abs=1e-4)

    # fusing one adapter with weight 1 keeps its head: the same accuracy (a dropped head would be random)
    assert main(["fuse", str(tmp_path / "c"), "--out", str(tmp_path / "f")]) == 0
    assert main(["eval", str(tmp_path / "f"), "--data", str(files["csv"]), "--text-column", "review",
                 "--label-column", "sentiment"]) == 0
    capsys.readouterr()
    config = shirakit.read_config(tmp_path / "f")
    assert "classifier" in config.modules_to_save and config.task_type == "SEQ_CLS"
    model = shirakit.load_adapter(folders_bert(files), tmp_path / "f", "f")
    shirakit.load_adapter(model, tmp_path / "c", "c")
    heads = model.classifier.adapters
    assert torch.equal(heads["f"].weight, heads["c"].weight)

    # two adapters with different heads: refused unless --modules-from says whose head to keep
    train(files, tmp_path / "d", *args, "--seed", "1", "--epochs", "1")
    fuse = ["fuse", str(tmp_path / "c"), str(tmp_path / "d"), "--out", str(tmp_path / "g")]
    assert main(fuse) == 2
    assert "--modules-from" in capsys.readouterr().err
    assert not (tmp_path / "g").exists()
    assert main([*fuse, "--modules-from", "1"]) == 0


def folders_bert(files):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(files["enc"], num_labels=2)


def test_recipe_file_with_flag_overrides(files, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: {files['lm']}\ndata: {files['text']}\ntask: causal-lm\nseq_len: 8\nr: 4\n"
                      "max-steps: 2\nmethod: vera\ntargets: [q_proj, v_proj]\n")
    rec = train(files, tmp_path / "r", "--config", str(recipe), "--r", "2")
    assert (rec["r"], rec["max_steps"], rec["method"], rec["targets"]) == (2, 2, "vera", ["q_proj", "v_proj"])
    assert shirakit.read_config(tmp_path / "r").r == 2
    as_json = tmp_path / "recipe.json"
    as_json.write_text(json.dumps({"model": str(files["lm"]), "data": str(files["text"]), "task": "causal-lm",
                                   "seq_len": 8, "max_steps": 1, "method": "miss", "r": 2}))
    assert train(files, tmp_path / "j", "--config", str(as_json))["method"] == "miss"


def test_resume_continues_the_run(files, tmp_path):
    lm_run(files, tmp_path / "a", "--max-steps", "2")
    rec = lm_run(files, tmp_path / "a", "--max-steps", "4", "--resume", str(tmp_path / "a"))
    assert rec["steps"] == [1, 2, 3, 4] and len(rec["loss"]) == 4


def test_grad_mask_is_calibrated(files, tmp_path):
    lm_run(files, tmp_path / "g", "--max-steps", "1", "--mask", "grad", "--calibration-batches", "2", "--r", "1")
    assert shirakit.read_config(tmp_path / "g").mask_type == "grad"


def test_files_have_the_usual_permissions(files, tmp_path):
    lm_run(files, tmp_path / "p", "--max-steps", "1")
    umask = os.umask(0o022)
    os.umask(umask)
    for name in ("adapter_model.safetensors", "adapter_config.json", "shirakit_training.json"):
        assert stat.S_IMODE((tmp_path / "p" / name).stat().st_mode) == 0o666 & ~umask


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_device_auto_uses_the_gpu(files, tmp_path):
    rec = lm_run(files, tmp_path / "gpu", "--max-steps", "2", "--device", "auto")
    assert rec["device_used"].startswith("cuda") and rec["dtype_used"] in ("bfloat16", "float32")
    assert main(["eval", str(tmp_path / "gpu"), "--device", "cuda"]) == 0


def test_a_peft_adapter_folder_is_evaluated_inspected_and_switched(files, tmp_path, capsys):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(files["lm"])
    config = peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft.get_peft_model(model, config).save_pretrained(tmp_path / "peft")
    (tmp_path / "peft" / "README.md").unlink(missing_ok=True)
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "peft"), "--data", str(files["text"]), "--seq-len", "8"]) == 0
    out = capsys.readouterr().out  # the base came from base_model_name_or_path (a local folder)
    assert "base     perplexity" in out and "adapter  perplexity" in out
    assert main(["inspect", str(tmp_path / "peft"), "--layers"]) == 0
    assert "model.layers.0.self_attn.q_proj" in capsys.readouterr().out
    assert main(["switch", str(tmp_path / "peft"), "--model", str(files["lm"]), "--repeats", "1"]) == 0


def test_orthogonality_plot_names_both_adapters_without_warnings(files, tmp_path, capsys):
    import warnings

    lm_run(files, tmp_path / "x", "--max-steps", "1", "--r", "1")
    lm_run(files, tmp_path / "y", "--max-steps", "1", "--r", "1", "--seed", "3")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["orthogonality", str(tmp_path / "x"), str(tmp_path / "y"), "--png", str(tmp_path / "o.png")]) == 0
    assert not [w for w in caught if "beta" in str(w.message)]
    assert (tmp_path / "o.png").stat().st_size > 1000


def test_packaged_models_are_named_by_hub_id_not_by_path():
    from shirakit.app.data import minilm_dir
    from shirakit.cli.models import PACKAGED, packaged_name

    try:
        folder = minilm_dir()
    except FileNotFoundError:
        pytest.skip("the packaged MiniLM is not installed")
    assert packaged_name(folder) == PACKAGED["minilm"]
