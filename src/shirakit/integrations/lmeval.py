"""lm-evaluation-harness (EleutherAI's ``lm_eval``) on a shirakit-adapted model, in process.

The model is wrapped by lm-eval's own Hugging Face model class (``HFLM``), so every task runs as
``lm_eval --model hf`` would run it on that model: loglikelihood tasks score each continuation
with one forward pass, generate_until tasks decode greedily with ``model.generate``. Adapters are
ordinary modules of the model, so whichever adapter is active (``shirakit.load_adapter``,
``set_adapter``, a fused switch) is the one evaluated.

    model = AutoModelForCausalLM.from_pretrained(base)
    shirakit.load_adapter(model, "my-adapter")
    results = evaluate(model, tokenizer, ["hellaswag"], limit=100)
    print(results_table(results))

The same scores come from ``shirakit serve`` with lm-eval's ``local-completions`` client
(docs/serving.md); ``shirakit eval ADAPTER --lm-eval TASKS`` runs this module from the CLI.
Needs the ``eval`` extra (``pip install "shirakit[eval]"``).
"""

from __future__ import annotations

from pathlib import Path

from ..core.extras import require

PURPOSE = "lm-evaluation-harness evaluation"


def require_lm_eval():
    """The ``lm_eval`` module (and its HF model class, whose own imports must work too), or
    :class:`~shirakit.core.extras.MissingExtraError` naming the ``eval`` extra that installs it."""
    lm_eval = require("lm_eval", PURPOSE)
    require("lm_eval.models.huggingface", PURPOSE)
    return lm_eval


def task_manager(tasks: list[str], include_path: str | Path | list | None = None):
    """lm-eval's task index over ``include_path``; its ~15,000 built-in tasks are indexed too (tens
    of seconds) only when some of ``tasks`` is not among those under ``include_path``."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    if include_path:
        paths = [str(p) for p in (include_path if isinstance(include_path, (list, tuple)) else [include_path])]
        for path in paths:
            if not Path(path).exists():
                raise FileNotFoundError(f"include_path {path}: no such file or folder (expected task YAML files)")
        local = TaskManager(include_path=paths, include_defaults=False)
        if all(task in local.all_tasks for task in tasks):
            return local
        return TaskManager(include_path=paths)
    return TaskManager()


def evaluate(model, tokenizer, tasks: list[str] | str, include_path=None, limit: int | float | None = None,
             num_fewshot: int | None = None, batch_size: int = 8, device: str | None = None,
             add_bos_token: bool | None = None, log_samples: bool = False, **evaluate_args) -> dict:
    """Run lm-eval ``tasks`` (names, or one comma-separated string) on ``model`` (a causal LM with
    its adapters loaded) and return lm-eval's result dict (``results``, ``configs``, ``samples``
    when ``log_samples``...). ``include_path``: folders or files of task YAMLs of your own.
    ``limit``: at most this many documents per task (a fraction: that share). ``add_bos_token``:
    None tokenizes as the tokenizer does by default (Llama's puts BOS first), as ``lm_eval --model
    hf`` does; False matches lm-eval's ``local-completions`` client, which sends no BOS unless told
    (docs/serving.md). ``evaluate_args`` go to ``lm_eval.simple_evaluate`` unchanged."""
    require_lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else list(tasks)
    if not names or not all(names):
        raise ValueError(f"tasks: expected one or more lm-eval task names, found {tasks!r}")
    manager = task_manager(names, include_path)
    unknown = [t for t in names if t not in manager.all_tasks]
    if unknown:
        where = f" (nor under {include_path})" if include_path else ""
        raise ValueError(f"unknown lm-eval task(s) {unknown}: not among lm-eval's tasks{where}")
    device = device or str(next(model.parameters()).device)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device,
              add_bos_token=add_bos_token)
    results = simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                              log_samples=log_samples, **evaluate_args)
    if results is None:  # simple_evaluate returns None on non-zero ranks of a distributed run
        return {}
    return results


def results_table(results: dict) -> str:
    """lm-eval's own table of a result dict (one row per task and metric; groups after)."""
    require_lm_eval()
    from lm_eval.utils import make_table

    table = make_table(results)
    if results.get("groups"):
        table += "\n" + make_table(results, "groups")
    return table
