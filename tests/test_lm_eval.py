"""lm-evaluation-harness against shirakit (issue 28): its ``local-completions`` client with its
default settings (token-id prompts, echo + logprobs for loglikelihood) on ``shirakit serve``, and
its HF wrapper on the same shirakit-adapted model in process (``shirakit eval --lm-eval``), give the
same scores and the same per-sample answers. Two local tasks, a generate_until and a
multiple-choice (loglikelihood) one, are YAML files over JSONL written in the test's folder: no hub."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.serving import load_tiny_lm, offline_text

pytest.importorskip("fastapi")
lm_eval = pytest.importorskip("lm_eval")

GEN_PROMPTS = ["abc", "Hello", "xyz 12", "The cat", "q", "Zz"]
MC_DOCS = [("The cat", ["sat", "ran", "zz"]), ("a b", ["c", "d e", "Q"]), ("Hello", [" world", "!", "abc"]),
           ("1 2 3", [" 4", "x", " 5 6"]), ("hi", ["ho", "ha", "hu"])]


def write_tasks(folder: Path, gen_targets: list[str]) -> Path:
    """Two tasks in ``folder``: ``tiny_gen`` (generate_until, exact match) and ``tiny_mc`` (multiple
    choice: one loglikelihood request per choice, accuracy)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "gen.jsonl", "w") as fh:
        for prompt, target in zip(GEN_PROMPTS, gen_targets):
            fh.write(json.dumps({"prompt": prompt, "target": target}) + "\n")
    with open(folder / "mc.jsonl", "w") as fh:
        for i, (context, choices) in enumerate(MC_DOCS):
            fh.write(json.dumps({"context": context, "choices": choices, "label": i % len(choices)}) + "\n")
    common = "dataset_path: json\ntest_split: test\n"
    (folder / "tiny_gen.yaml").write_text(
        "task: tiny_gen\n" + common +
        f"dataset_kwargs:\n  data_files:\n    test: {folder / 'gen.jsonl'}\n  cache_dir: {folder / 'cache'}\n"
        "output_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: '{{target}}'\n"
        "target_delimiter: ''\n"
        "generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 8\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")
    (folder / "tiny_mc.yaml").write_text(
        "task: tiny_mc\n" + common +
        f"dataset_kwargs:\n  data_files:\n    test: {folder / 'mc.jsonl'}\n  cache_dir: {folder / 'cache'}\n"
        "output_type: multiple_choice\ndoc_to_text: '{{context}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{label}}'\n"
        "metric_list:\n  - metric: acc\n")
    return folder


def run_tasks(lm, folder: Path) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(folder), include_defaults=False)
    return simple_evaluate(model=lm, tasks=["tiny_gen", "tiny_mc"], task_manager=manager, log_samples=True,
                           bootstrap_iters=0)


def answers(results: dict, task: str) -> list:
    """Each sample's model output in doc order (generations, or (loglikelihood, greedy) per choice)."""
    samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
    return [[r[0] for r in s["resps"]] for s in samples]


@pytest.fixture(scope="module")
def setting(served_folders, tmp_path_factory):
    """(adapter name, what it says greedily per generation prompt without BOS, the task folder, the
    offline results of shirakit.integrations.lmeval.evaluate (lm-eval's HF wrapper on the adapted
    model) by BOS handling: "no bos" as local-completions sends prompts by default, "bos" as the
    tokenizer does by default (HFLM's default))."""
    import os

    import shirakit
    from shirakit.integrations import lmeval

    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    model_dir, adapters, _ = served_folders
    name = list(adapters)[1]
    model, tokenizer = load_tiny_lm(model_dir)
    # half the generation targets are what the adapted model says (greedy), half are not: a score of 1/2
    said = [offline_text(model_dir, adapters[name], tokenizer(p, add_special_tokens=False).input_ids, 8)
            .split("\n")[0] for p in GEN_PROMPTS]
    targets = [s if i % 2 == 0 else s + "#" for i, s in enumerate(said)]
    folder = write_tasks(tmp_path_factory.mktemp("lm-eval") / "tasks", targets)
    shirakit.load_adapter(model, adapters[name], "x")
    offline = {bos: lmeval.evaluate(model, tokenizer, "tiny_gen,tiny_mc", include_path=folder, batch_size=4,
                                    add_bos_token=None if bos == "bos" else False, log_samples=True,
                                    bootstrap_iters=0)
               for bos in ("bos", "no bos")}
    yield name, said, folder, offline
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


CLIENTS = {
    # its defaults: the model name and the URL only; it finds /tokenize and tokenizes through the server
    "defaults": ({}, "remote", "no bos"),
    # the model folder's tokenizer, BOS first as the tokenizer puts it (as one runs it against vLLM)
    "folder+bos": ({"tokenizer_backend": "huggingface", "add_bos_token": True}, "huggingface", "bos"),
}


@pytest.mark.parametrize("client_case", list(CLIENTS))
def test_server_and_offline_model_give_the_same_scores(setting, served_folders, tiny_server, client_case):
    """lm-eval's local-completions (batch size 1, token-id prompts, echo + logprobs for
    loglikelihood) against ``shirakit serve``, and its HF wrapper on the same adapted model in
    process, tokenizing alike: the same scores, generations, log-likelihoods and greedy flags."""
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    name, said, folder, offline = setting
    model_dir, adapters, _ = served_folders
    args, backend, bos = CLIENTS[client_case]
    if backend == "huggingface":
        args = {**args, "tokenizer": str(model_dir)}
    running = tiny_server(model_dir, adapters)
    client = LocalCompletionsAPI(model=name, base_url=running.url + "/v1/completions", **args)
    assert client.tokenizer_backend == backend
    served, offline = run_tasks(client, folder), offline[bos]

    assert served["results"]["tiny_gen"]["exact_match,none"] == offline["results"]["tiny_gen"]["exact_match,none"]
    assert answers(served, "tiny_gen") == answers(offline, "tiny_gen")
    if bos == "no bos":
        assert answers(served, "tiny_gen") == [[s] for s in said]
        assert served["results"]["tiny_gen"]["exact_match,none"] == pytest.approx(0.5)
    assert served["results"]["tiny_mc"]["acc,none"] == offline["results"]["tiny_mc"]["acc,none"]
    mc_served, mc_offline = answers(served, "tiny_mc"), answers(offline, "tiny_mc")
    assert len(mc_served) == len(MC_DOCS) and all(len(doc) == 3 for doc in mc_served)
    assert [[greedy for _, greedy in doc] for doc in mc_served] == [[greedy for _, greedy in doc]
                                                                    for doc in mc_offline]
    assert [ll for doc in mc_served for ll, _ in doc] == pytest.approx(
        [ll for doc in mc_offline for ll, _ in doc], abs=1e-4)
    assert len({ll for doc in mc_served for ll, _ in doc}) > len(MC_DOCS)  # real, distinct scores


def _value(table: str, task: str, metric: str) -> float:
    row = next(line for line in table.splitlines() if f"|{task}" in line and f"|{metric}" in line)
    cells = [c.strip() for c in row.split("|")]
    return float(cells[cells.index(metric) + 2])  # metric, the higher-is-better arrow, the value


def test_cli_prints_the_offline_scores(setting, served_folders, capsys):
    from shirakit.cli import main

    name, _, folder, offline = setting
    model_dir, adapters, _ = served_folders
    assert main(["eval", str(adapters[name]), "--model", str(model_dir), "--lm-eval", "tiny_gen,tiny_mc",
                 "--include-path", str(folder), "--device", "cpu", "--batch-size", "4"]) == 0
    out = capsys.readouterr().out
    results = offline["bos"]["results"]  # the CLI tokenizes as the tokenizer does, as lm_eval --model hf
    assert _value(out, "tiny_gen", "exact_match") == pytest.approx(results["tiny_gen"]["exact_match,none"], abs=1e-4)
    assert _value(out, "tiny_mc", "acc") == pytest.approx(results["tiny_mc"]["acc,none"], abs=1e-4)
