"""Zero-shot tasks through lm-evaluation-harness (pvq.eval.harness): lm-eval's scores of
the local task files against a brute-force computation from the definition, the CLI, and
bad input (unknown task, malformed file) refused before any model work."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from conftest import cli_error, printable_char_tokenizer
from test_tasks import _write_tasks_dir, tiny_model_dir  # noqa: F401 (a fixture)

from pvq.eval.harness import LOCAL_TASKS, UnknownTaskError, prepare_tasks, run_tasks
from pvq.eval.tasks import TaskDataError, load_task
from pvq.models import tiny_llama


def _brute_force(model, tokenizer, context: str, continuation: str) -> tuple[float, bool]:
    """One forward over context + continuation; the sum of the continuation tokens'
    log-probabilities and whether each is the argmax (one token per character here)."""
    ctx = tokenizer.encode(context, add_special_tokens=False)
    cont = tokenizer.encode(continuation, add_special_tokens=False)
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    positions = range(len(ctx) - 1, len(ctx) + len(cont) - 1)
    total = sum(float(logp[p, t]) for p, t in zip(positions, cont))
    greedy = all(int(logp[p].argmax()) == t for p, t in zip(positions, cont))
    return total, greedy


def _argmax(values):
    return max(range(len(values)), key=lambda k: (values[k], -k))


def test_lm_eval_scores_equal_the_definition_on_every_local_task(tmp_path):
    root = _write_tasks_dir(tmp_path / "tasks")
    model, tok = tiny_llama(seed=0), printable_char_tokenizer()
    model.eval()
    with prepare_tasks("all", root) as plan:
        assert plan.names == list(LOCAL_TASKS)
        results = run_tasks(model, tok, plan, batch_size=3, progress=False, keep_samples=True)
    assert list(results) == list(LOCAL_TASKS)
    for name in LOCAL_TASKS:
        items, res = load_task(name, root), results[name]
        assert res.items == len(items) and len(res.samples) == len(items)
        mine = [[_brute_force(model, tok, c, x) for c, x in item.requests] for item in items]
        for doc, ref in zip(res.samples, mine):
            assert [g for _, g in doc] == [g for _, g in ref], name
            assert [ll for ll, _ in doc] == pytest.approx([ll for ll, _ in ref], abs=1e-4), name
        lls = [[ll for ll, _ in doc] for doc in mine]
        if name == "lambada_openai":
            assert res.metric("acc").value == sum(doc[0][1] for doc in mine) / len(mine)
            assert res.metric("perplexity").value == pytest.approx(math.exp(-sum(d[0] for d in lls) / len(lls)),
                                                                   rel=1e-5)
            continue
        acc = sum(_argmax(ll) == it.gold for ll, it in zip(lls, items)) / len(items)
        assert res.metric("acc").value == acc, name
        if name != "winogrande":
            norm = [[v / len(t) for v, t in zip(ll, it.choice_texts)] for ll, it in zip(lls, items)]
            assert res.metric("acc_norm").value == sum(_argmax(n) == it.gold for n, it in zip(norm, items)) / len(items)
        else:
            assert [m.name for m in res.metrics] == ["acc"]


def test_limit_and_plan_errors(tmp_path):
    root = _write_tasks_dir(tmp_path / "tasks")
    with prepare_tasks("hellaswag,piqa,hellaswag", root, limit=1) as plan:
        assert plan.names == ["hellaswag", "piqa"] and plan.limit == 1
        folder = plan.tasks[0]["dataset_kwargs"]["data_files"]["test"]
        assert len(open(folder).read().splitlines()) == 1  # only the items scored are written
    assert not __import__("os").path.exists(folder)  # the run's files are removed with the plan
    with pytest.raises(UnknownTaskError, match="no task given"):
        prepare_tasks(" , ", root)
    (root / "mosaicml-gauntlet" / "arc_easy.jsonl").unlink()
    with pytest.raises(TaskDataError, match=r"data file not found: .*arc_easy\.jsonl"):
        prepare_tasks("arc_easy", root)  # an explicit --tasks-dir never falls back to the hub


def test_cli_eval_tasks_table_json_and_bad_input(tiny_model_dir, tmp_path, capsys):  # noqa: F811
    from pvq.cli import main

    root = _write_tasks_dir(tmp_path / "tasks")
    out = tmp_path / "eval.json"
    assert main(["eval", str(tiny_model_dir / "model"), "--tasks", "all", "--tasks-dir", str(root), "--limit", "1",
                 "--seqlen", "64", "--eval-text", str(tiny_model_dir / "wiki.test.raw"), "--device", "cpu",
                 "--json", str(out)]) == 0
    text = capsys.readouterr().out
    header = next(line for line in text.splitlines() if line.startswith("task"))
    assert header.split() == ["task", "metric", "value", "stderr", "items"]
    for name in LOCAL_TASKS:
        assert name in text
    assert "wikitext2" in text and "average accuracy" in text and "lm-evaluation-harness" in text
    saved = json.loads(out.read_text())
    assert saved["ppl"] > 1 and saved["limit"] == 1
    assert set(saved["tasks"]) == set(LOCAL_TASKS) and saved["tasks"]["hellaswag"]["items"] == 1
    assert set(saved["tasks"]["piqa"]["metrics"]) == {"acc", "acc_norm"}
    assert 0 <= saved["average_accuracy"] <= 1

    assert main(["eval", str(tiny_model_dir / "model"), "--tasks", "winogrande,lambada_openai", "--no-ppl",
                 "--tasks-dir", str(root), "--device", "cpu", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "perplexity" in captured.out and "wikitext2" not in captured.out and "piqa" not in captured.out
    assert "it/s" not in captured.err  # --quiet: no progress bars, lm-eval's included
    model = str(tiny_model_dir / "model")
    assert re.search("unknown task 'no_such_task': neither local",
                     cli_error(capsys, ["eval", model, "--tasks", "no_such_task", "--tasks-dir", str(root)]))
    assert re.search("--no-ppl leaves nothing to evaluate", cli_error(capsys, ["eval", model, "--no-ppl"]))
    (root / "mosaicml-gauntlet" / "winogrande.jsonl").write_text("{}\n")
    assert re.search(r"winogrande\.jsonl, line 1: missing field 'context_options'",
                     cli_error(capsys, ["eval", model, "--tasks", "winogrande", "--tasks-dir", str(root)]))


def test_an_lm_eval_task_offline_fails_fast_in_one_line(tmp_path, monkeypatch):
    """An lm-eval task name (not local) whose data is in no cache, the hub unreachable: one
    error naming the task and the reason, without datasets' network retries."""
    import time

    import datasets

    from pvq.eval import harness
    from pvq.eval.harness import TaskRunError

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(harness, "hub_unreachable", lambda endpoint: "no answer (test)")
    with prepare_tasks("boolq", tmp_path, limit=2) as plan:
        assert plan.tasks == ["boolq"] and "lm-eval task" in plan.sources["boolq"]
        t0 = time.perf_counter()
        with pytest.raises(TaskRunError, match=r"lm-eval tasks boolq need their data .* unreachable: no answer"):
            run_tasks(tiny_llama(seed=0), printable_char_tokenizer(), plan, progress=False)
        assert time.perf_counter() - t0 < 60
