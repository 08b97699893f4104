"""Zero-shot tasks through lm-evaluation-harness (the `lm-eval` package).

The model (float or a pvq checkpoint, already loaded) is wrapped in lm-eval's Hugging
Face class `HFLM` and scored by lm-eval itself: its request building, batching,
log-likelihoods and metrics. Only the data can come from us:

- the six tasks of the paper's tables (piqa, arc_easy, arc_challenge, hellaswag,
  winogrande, lambada_openai) are served from the local files under the tasks directory
  (`pvq.eval.tasks` reads and checks them) through task configs that point lm-eval at
  JSON-lines files written for the run, with the prompts and metrics of lm-eval's own
  configs for those tasks;
- any other lm-eval task name (or one of the six when no local file is there and no
  `--tasks-dir` was given) goes to lm-eval's own task, whose data `datasets` takes from
  its cache or the hub.

`prepare_tasks` reads and checks everything before the model is loaded (a missing or
malformed file fails at once); `run_tasks` scores a model; `TaskPlan` can score several
models (the sweep). Standard errors are lm-eval's (sample standard deviation / sqrt(n) for
accuracies; a bootstrap of `bootstrap_iters` resamples for perplexity).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from pvq.errors import PVQError
from pvq.progress import progress_enabled

from .hub import first_line, hub_endpoint, hub_offline, hub_offline_mode, hub_unreachable
from .tasks import TASKS, TaskDataError, UnknownTaskError, default_tasks_dir, load_task

__all__ = [
    "LOCAL_TASKS", "Metric", "TaskPlan", "TaskResult", "UnknownTaskError", "average_accuracy", "evaluate_tasks",
    "headline_accuracy", "prepare_tasks", "results_table", "run_tasks", "task_rows",
]

log = logging.getLogger(__name__)

LOCAL_TASKS = tuple(TASKS)
# lm-eval's metrics for each of the six tasks (its task configs' metric_list)
_METRICS = {
    "piqa": ("acc", "acc_norm"), "arc_easy": ("acc", "acc_norm"), "arc_challenge": ("acc", "acc_norm"),
    "hellaswag": ("acc", "acc_norm"), "winogrande": ("acc",), "lambada_openai": ("perplexity", "acc"),
}
_AGGREGATION = {"acc": "mean", "acc_norm": "mean", "perplexity": "perplexity"}


class TaskRunError(PVQError, RuntimeError):
    """lm-eval could not build or run a task (data not reachable offline, a bad config)."""


@dataclass
class Metric:
    name: str
    value: float
    stderr: float | None


@dataclass
class TaskResult:
    task: str
    items: int
    metrics: list[Metric]
    seconds: float  # of the whole lm-eval run this task was part of
    source: str = ""
    # with run_tasks(keep_samples=True): per document, in document order, the
    # (log-likelihood, greedy) of each of its requests as lm-eval scored them
    samples: list[list[tuple[float, bool]]] | None = None

    def metric(self, name: str) -> Metric:
        for m in self.metrics:
            if m.name == name:
                return m
        raise KeyError(f"{self.task} has no metric {name!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"items": self.items, "seconds": self.seconds, "source": self.source,
                "metrics": {m.name: {"value": m.value, "stderr": m.stderr} for m in self.metrics}}


def _doc_rows(name: str, items: list) -> list[dict[str, Any]]:
    """The JSON rows lm-eval reads for one local task (see `_config`)."""
    if name == "lambada_openai":
        return [{"context": it.context, "target": it.continuation} for it in items]
    if name == "winogrande":  # partial evaluation: the choices are the contexts
        return [{"options": list(it.contexts), "target": it.continuations[0][1:], "gold": it.gold} for it in items]
    return [{"context": it.contexts[0], "choices": list(it.choice_texts), "gold": it.gold} for it in items]


def _config(name: str, data_file: Path, cache_dir: Path) -> dict[str, Any]:
    """An lm-eval task config over the rows of `_doc_rows`, with the prompt and metrics of
    lm-eval's own config of the task (a field name as doc_to_* returns that field as is)."""
    config: dict[str, Any] = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file)}, "cache_dir": str(cache_dir)},
        "test_split": "test",
        "num_fewshot": 0,
        "metric_list": [{"metric": m, "aggregation": _AGGREGATION[m], "higher_is_better": m != "perplexity"}
                        for m in _METRICS[name]],
        "metadata": {"version": 1.0, "source": f"pvq local file ({data_file.name})"},
    }
    if name == "lambada_openai":
        config.update(output_type="loglikelihood", doc_to_text="context", doc_to_target="target")
    elif name == "winogrande":
        # doc_to_text gives the gold index: lm-eval's "multiple inputs" (each context + " " + target)
        config.update(output_type="multiple_choice", doc_to_text="gold", doc_to_target="target",
                      doc_to_choice="options")
    else:
        config.update(output_type="multiple_choice", doc_to_text="context", doc_to_target="gold",
                      doc_to_choice="choices")
    return config


@dataclass
class TaskPlan:
    """The tasks to score: lm-eval configs over local files, or lm-eval task names."""

    names: list[str]
    tasks: list[str | dict[str, Any]]
    sources: dict[str, str]
    limit: int | None
    _tmp: Any = field(default=None, repr=False)
    _manager: Any = field(default=None, repr=False)

    def task_manager(self):
        """lm-eval's task index, built once; it reads every task config lm-eval ships (some
        seconds) only when an lm-eval task name is asked for."""
        if self._manager is None:
            from lm_eval.tasks import TaskManager

            self._manager = TaskManager(include_defaults=any(isinstance(t, str) for t in self.tasks))
        return self._manager

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> "TaskPlan":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def resolve_task_names(spec: str | Sequence[str]) -> list[str]:
    """Names from "piqa,arc_easy", "all" (the six local tasks) or a list, deduplicated."""
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if not names:
        raise UnknownTaskError(f"no task given; local tasks: {', '.join(LOCAL_TASKS)} (or 'all', or any lm-eval task)")
    if "all" in names:
        names = [n for n in names if n != "all"]
        names = list(LOCAL_TASKS) + [n for n in names if n not in LOCAL_TASKS]
    return list(dict.fromkeys(names))


def prepare_tasks(spec: str | Sequence[str], tasks_dir: str | os.PathLike | None = None,
                  limit: int | None = None) -> TaskPlan:
    """Resolve task names and read every local file now (errors before any model work).

    A local task whose files are missing goes to lm-eval's own task of that name when no
    `tasks_dir` was given (its data from the `datasets` cache or the hub), else fails."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    names = resolve_task_names(spec)
    root = Path(tasks_dir) if tasks_dir is not None else default_tasks_dir()
    local: dict[str, list] = {}
    remote: list[str] = []
    for name in names:
        if name in TASKS:
            try:
                local[name] = load_task(name, root, limit)
            except TaskDataError as e:
                if tasks_dir is not None or "not found" not in str(e):
                    raise
                log.warning("%s: no local file under %s; using lm-eval's own task (data from the datasets cache or "
                            "the hub)", name, root)
                remote.append(name)
            else:
                if not local[name]:
                    raise TaskDataError(f"{name}: no items to evaluate in its file under {root}")
        else:
            remote.append(name)
    unknown = [n for n in remote if n not in TASKS]
    manager = None
    if unknown:
        from lm_eval.tasks import TaskManager

        manager = TaskManager()  # lm-eval's whole task index, kept for the run
        known = set(manager.all_tasks)
        bad = [n for n in unknown if n not in known]
        if bad:
            raise UnknownTaskError(
                f"unknown task{'s' if len(bad) > 1 else ''} {', '.join(map(repr, bad))}: neither local "
                f"({', '.join(LOCAL_TASKS)}, or 'all') nor an lm-eval task or group (`lm-eval ls tasks` lists those)")
    tmp = tempfile.TemporaryDirectory(prefix="pvq-tasks-") if local else None
    tasks: list[str | dict[str, Any]] = []
    sources: dict[str, str] = {}
    for name in names:
        if name in local:
            folder = Path(tmp.name)
            data_file = folder / f"{name}.jsonl"
            with open(data_file, "w", encoding="utf-8") as f:
                for row in _doc_rows(name, local[name]):
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
            tasks.append(_config(name, data_file, folder / "datasets-cache"))
            sources[name] = f"local files under {root}"
        else:
            tasks.append(name)
            sources[name] = "lm-eval task (datasets cache or hub)"
    return TaskPlan(names, tasks, sources, limit, tmp, manager)


def _quiet_lm_eval() -> None:
    """lm-eval logs every task it builds at INFO and warns that a model object was given
    (expected here), and `datasets` draws a bar for each local file it converts (instant);
    keep their errors, drop the chatter."""
    import datasets

    datasets.disable_progress_bars()
    for name in ("lm_eval", "lm-eval"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _offline_unless_reachable(plan: TaskPlan):
    """(context, reason): Hugging Face offline mode (the datasets cache only) around the run
    when an lm-eval task is asked for and the hub does not answer a short probe, so that an
    offline machine fails in seconds instead of datasets' retry loop; else no change."""
    if not any(isinstance(t, str) for t in plan.tasks):
        return contextlib.nullcontext(), None
    import datasets

    why = None if hub_offline_mode(datasets) else hub_unreachable(hub_endpoint(datasets))
    return (hub_offline(datasets) if why else contextlib.nullcontext()), why


def run_tasks(model, tokenizer, plan: TaskPlan, batch_size: int = 16, bootstrap_iters: int = 1000,
              progress: bool = True, keep_samples: bool = False) -> dict[str, TaskResult]:
    """Score `model` on the planned tasks with lm-eval; results per task name."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    _quiet_lm_eval()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, backend="causal")
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    # lm-eval draws its own bars (with explicit settings): silenced with its output when
    # bars are off (`--quiet`); errors still arrive as exceptions
    silence = contextlib.ExitStack()
    if not (progress and progress_enabled()):  # its bars on stderr, its "bootstrapping ..." note on stdout
        silence.enter_context(contextlib.redirect_stderr(io.StringIO()))
        silence.enter_context(contextlib.redirect_stdout(io.StringIO()))
    offline, why = _offline_unless_reachable(plan)
    try:
        with silence, offline:
            out = lm_eval.simple_evaluate(model=lm, tasks=list(plan.tasks), limit=plan.limit, num_fewshot=None,
                                          bootstrap_iters=bootstrap_iters, log_samples=keep_samples,
                                          verbosity="ERROR", task_manager=plan.task_manager())
    except PVQError:
        raise
    except Exception as e:  # noqa: BLE001 - datasets and lm-eval raise many kinds; the message says which
        names = [n for n, t in zip(plan.names, plan.tasks) if isinstance(t, str)]
        hint = (f" (the lm-eval tasks {', '.join(names)} need their data from the datasets cache or the hub"
                + (f", which is unreachable: {why}" if why else "") + "; offline, use the local tasks under "
                "--tasks-dir)") if names else ""
        raise TaskRunError(f"lm-eval could not run the tasks: {first_line(e)}{hint}") from None
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - t0
    if out is None:
        raise TaskRunError("lm-eval returned no results")
    results = {}
    for name in plan.names:
        results.update(_results_of(name, out, seconds, plan.sources[name]))
    if keep_samples:
        for task, result in results.items():
            docs = sorted(out["samples"].get(task, []), key=lambda d: d["doc_id"])
            result.samples = [[_loglikelihood(r) for r in d["resps"]] for d in docs]
    return results


def _loglikelihood(response) -> tuple[float, bool]:
    """(log-likelihood, greedy) of one logged lm-eval response ([(ll, greedy)] or (ll, greedy))."""
    if isinstance(response, (list, tuple)) and len(response) == 1:
        response = response[0]
    ll, greedy = response
    return float(ll), bool(greedy)


def _results_of(name: str, out: dict, seconds: float, source: str) -> dict[str, TaskResult]:
    """TaskResults of one requested name (a group gives one per subtask that reports)."""
    found = {}
    for task, metrics in out["results"].items():
        if task != name and task not in out.get("group_subtasks", {}).get(name, []):
            continue
        ms = []
        for key, value in metrics.items():
            if "," not in key or "_stderr" in key or not isinstance(value, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            stderr = float(stderr) if isinstance(stderr, (int, float)) and math.isfinite(stderr) else None
            ms.append(Metric(metric, float(value), stderr))
        order = {m: k for k, m in enumerate(_METRICS.get(task, ()))}
        ms.sort(key=lambda m: order.get(m.name, len(order)))
        n = out.get("n-samples", {}).get(task, {})
        items = int(n.get("effective", n.get("original", 0))) if isinstance(n, dict) else 0
        if ms:
            found[task] = TaskResult(task, items, ms, seconds, source)
    if not found:
        raise TaskRunError(f"lm-eval reported no metric for task {name!r}")
    return found


def evaluate_tasks(model, tokenizer, spec: str | Sequence[str], tasks_dir: str | os.PathLike | None = None,
                   limit: int | None = None, batch_size: int = 16, bootstrap_iters: int = 1000,
                   progress: bool = True) -> dict[str, TaskResult]:
    """`prepare_tasks` then `run_tasks`, for one model."""
    with prepare_tasks(spec, tasks_dir, limit) as plan:
        return run_tasks(model, tokenizer, plan, batch_size, bootstrap_iters, progress)


def headline_accuracy(result: TaskResult) -> float | None:
    """The accuracy averaged across tasks: acc_norm where the task reports it, else acc
    (QuaRot's convention for the paper's "Avg. Acc")."""
    names = {m.name: m.value for m in result.metrics}
    return names.get("acc_norm", names.get("acc"))


def average_accuracy(results: dict[str, TaskResult] | dict[str, dict]) -> float | None:
    """Mean of `headline_accuracy` over the tasks (TaskResult or their `to_dict()`)."""
    values = []
    for r in results.values():
        if isinstance(r, dict):
            m = r["metrics"]
            v = (m.get("acc_norm") or m.get("acc") or {}).get("value")
        else:
            v = headline_accuracy(r)
        if v is not None:
            values.append(v)
    return sum(values) / len(values) if values else None


def results_table(rows: Iterable[tuple[str, str, float, float | None, int | str]]) -> str:
    """A plain-text table: task, metric, value, stderr, items."""
    header = ("task", "metric", "value", "stderr", "items")
    cells = [header] + [
        (task, metric, f"{value:.4f}", "-" if stderr is None or math.isnan(stderr) else f"{stderr:.4f}", str(items))
        for task, metric, value, stderr, items in rows
    ]
    widths = [max(len(c[k]) for c in cells) for k in range(len(header))]
    lines = ["  ".join(c[k].ljust(widths[k]) if k < 2 else c[k].rjust(widths[k]) for k in range(len(header)))
             for c in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def task_rows(results: dict[str, TaskResult]) -> list[tuple[str, str, float, float | None, int]]:
    return [(name, m.name, m.value, m.stderr, r.items) for name, r in results.items() for m in r.metrics]
