"""Zero-shot tasks scored as lm-evaluation-harness scores them, from local files.

Tasks (files under the tasks directory, see `default_tasks_dir`; formats in
../shared/assets/MANIFEST.md section 3):

=============  ========================================  =========================================
task           file(s)                                   prompt -> continuation(s)
=============  ========================================  =========================================
piqa           piqa/valid.jsonl + piqa/valid-labels.lst  "Question: {goal}\\nAnswer:" -> " " + sol1 / sol2
               (else mosaicml-gauntlet/piqa.jsonl)
arc_easy       mosaicml-gauntlet/arc_easy.jsonl          "{query}\\nAnswer:" -> " " + choice
arc_challenge  mosaicml-gauntlet/arc_challenge.jsonl     (query is "Question: ...")
hellaswag      hellaswag/hellaswag_val_full.txt.bz2      "{label}: {ctx}" -> " " + ending (4)
winogrande     mosaicml-gauntlet/winogrande.jsonl        option context (2) -> " " + shared continuation
lambada_openai mosaicml-gauntlet/lambada_openai.jsonl    context -> " " + last word
=============  ========================================  =========================================

Scoring (lm-eval's `loglikelihood`): a request is a (context, continuation) pair.
Whitespace at the end of the context moves to the front of the continuation; the
context and context + continuation are tokenized without special tokens and the
continuation's tokens are those of the whole string past the context's token count (so a
merge across the boundary is attributed as lm-eval attributes it). The model sees
context + continuation minus its last token (left-truncated to the model's maximum
length); the continuation's log-likelihood is the sum of the log-probabilities of its
tokens, and it is "greedy" when every one of them is the argmax at its position.

Metrics: multiple choice `acc` = argmax of the summed log-likelihoods (ties: first),
`acc_norm` = argmax of log-likelihood / len(choice text) in characters (lm-eval's length
of the choice without the " " delimiter; reported for piqa, arc_*, hellaswag, as
lm-eval does); winogrande (partial evaluation) scores the shared continuation after each
option and picks the likelier one; lambada `acc` = greedy decoding reproduces every
continuation token, `perplexity` = exp(-mean over items of the continuation's total
log-likelihood). The standard error of an accuracy is sqrt(p(1 - p) / (n - 1)) (lm-eval's
sample standard deviation over sqrt(n)); perplexity has none here (lm-eval bootstraps it).

Batching: all requests of a task are tokenized, sorted by length (longest first,
index as tie-break: deterministic), right-padded into batches with an attention mask, and
the log-softmax is taken only at the continuation positions (the head itself runs only on
the batch's last positions that hold a continuation, where the model takes
`logits_to_keep`).

Known differences from lm-eval's data (MANIFEST): the HellaSwag file is llama.cpp's
preprocessed text, whose context is one field (lm-eval capitalises ctx_b); ARC,
WinoGrande and LAMBADA come in MosaicML's converted layout (same items and answers).
"""

from __future__ import annotations

from pvq.errors import PVQError

import bz2
import json
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

from pvq.models.loading import start_token_id

from .perplexity import EvalDataError

TASKS_DIR_ENV = "PVQ_TASKS_DIR"
_RELATIVE = Path("assets") / "tasks"


class TaskDataError(EvalDataError):
    """A task file that is missing or has a malformed line (the message names it)."""


class UnknownTaskError(PVQError, ValueError):
    """A task name that is not known (the message lists the known ones)."""


def default_tasks_dir() -> Path:
    """$PVQ_TASKS_DIR, else ../shared/assets/tasks next to the source checkout."""
    if os.environ.get(TASKS_DIR_ENV):
        return Path(os.environ[TASKS_DIR_ENV])
    repo = Path(__file__).resolve().parents[3]  # <repo>/src/pvq/eval/tasks.py
    return repo.parent / "shared" / _RELATIVE


# ----------------------------------------------------------------------------- items


@dataclass(frozen=True)
class ChoiceItem:
    """One multiple-choice item: choice i is the request (contexts[i], continuations[i]).

    Ordinary tasks share one context; winogrande shares one continuation. `choice_texts`
    are the texts acc_norm divides by (the choice without the target delimiter)."""

    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    gold: int
    choice_texts: tuple[str, ...]

    @property
    def requests(self) -> list[tuple[str, str]]:
        return list(zip(self.contexts, self.continuations))


@dataclass(frozen=True)
class LambadaItem:
    context: str
    continuation: str  # with its leading " "

    @property
    def requests(self) -> list[tuple[str, str]]:
        return [(self.context, self.continuation)]


def _choices(context: str, choices: Sequence[str], gold: int, delimiter: str = " ") -> ChoiceItem:
    return ChoiceItem(tuple(context for _ in choices), tuple(delimiter + c for c in choices), gold, tuple(choices))


# ----------------------------------------------------------------------------- files


def _require(path: Path, task: str) -> Path:
    if not path.is_file():
        raise TaskDataError(f"{task}: data file not found: {path} (give --tasks-dir, or set ${TASKS_DIR_ENV})")
    return path


def _json_lines(path: Path, limit: int | None) -> Iterable[tuple[int, dict]]:
    """(line number, object) of a JSON-lines file; blank lines skipped; at most `limit`."""
    n = 0
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if limit is not None and n >= limit:
                return
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskDataError(f"{path}, line {lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise TaskDataError(f"{path}, line {lineno}: expected a JSON object, got {type(obj).__name__}")
            n += 1
            yield lineno, obj


def _field(obj: dict, key: str, kind: type | tuple[type, ...], path: Path, lineno: int):
    if key not in obj:
        raise TaskDataError(f"{path}, line {lineno}: missing field {key!r}")
    value = obj[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise TaskDataError(f"{path}, line {lineno}: field {key!r} must be {names}, got {value!r}")
    return value


def _string_list(obj: dict, key: str, path: Path, lineno: int, length: int | None = None) -> list[str]:
    values = _field(obj, key, list, path, lineno)
    if not values or not all(isinstance(v, str) for v in values):
        raise TaskDataError(f"{path}, line {lineno}: field {key!r} must be a non-empty list of strings")
    if length is not None and len(values) != length:
        raise TaskDataError(f"{path}, line {lineno}: field {key!r} must have {length} entries, got {len(values)}")
    return values


def _gold(value: Any, n_choices: int, path: Path, lineno: int) -> int:
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < n_choices:
        raise TaskDataError(f"{path}, line {lineno}: bad label {value!r} (expected an integer in 0..{n_choices - 1})")
    return value


def load_piqa(tasks_dir: Path, limit: int | None = None) -> list[ChoiceItem]:
    """PIQA validation: the original release (valid.jsonl + valid-labels.lst) when
    present, else MosaicML's piqa.jsonl (same items, whitespace stripped)."""
    questions, labels = tasks_dir / "piqa" / "valid.jsonl", tasks_dir / "piqa" / "valid-labels.lst"
    gauntlet = tasks_dir / "mosaicml-gauntlet" / "piqa.jsonl"
    if not questions.is_file() and gauntlet.is_file():
        return [
            _choices(query.rstrip("\n") + "\nAnswer:", choices, gold)
            for query, choices, gold in _gauntlet_choices(gauntlet, limit)
        ]
    if not questions.is_file():
        raise TaskDataError(f"piqa: data file not found: {questions} (nor {gauntlet}; give --tasks-dir, "
                            f"or set ${TASKS_DIR_ENV})")
    _require(labels, "piqa")
    with open(labels, encoding="utf-8") as f:
        label_lines = [line.strip() for line in f]
    items = []
    for k, (lineno, obj) in enumerate(_json_lines(questions, limit)):
        goal = _field(obj, "goal", str, questions, lineno)
        sols = [_field(obj, key, str, questions, lineno) for key in ("sol1", "sol2")]
        if k >= len(label_lines):  # labels align with the questions, one per line
            raise TaskDataError(f"{labels}: no label for question {k + 1} (line {lineno} of {questions}; "
                                f"{len(label_lines)} labels)")
        gold = _gold(label_lines[k], 2, labels, k + 1)
        items.append(_choices(f"Question: {goal}\nAnswer:", sols, gold))
    return items


def _gauntlet_choices(path: Path, limit: int | None) -> Iterable[tuple[str, list[str], int]]:
    for lineno, obj in _json_lines(path, limit):
        query = _field(obj, "query", str, path, lineno)
        choices = _string_list(obj, "choices", path, lineno)
        yield query, choices, _gold(_field(obj, "gold", (int, str), path, lineno), len(choices), path, lineno)


def load_arc(tasks_dir: Path, subset: str, limit: int | None = None) -> list[ChoiceItem]:
    """ARC-Easy / ARC-Challenge test ({query: "Question: ...", choices, gold})."""
    path = _require(tasks_dir / "mosaicml-gauntlet" / f"arc_{subset}.jsonl", f"arc_{subset}")
    return [_choices(query + "\nAnswer:", choices, gold) for query, choices, gold in _gauntlet_choices(path, limit)]


def _hellaswag_preprocess(text: str) -> str:
    """lm-eval's hellaswag `preprocess` (idempotent on the already-preprocessed file)."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def load_hellaswag(tasks_dir: Path, limit: int | None = None) -> list[ChoiceItem]:
    """HellaSwag validation, 6 lines per item: context, gold label 0-3, four endings."""
    path = _require(tasks_dir / "hellaswag" / "hellaswag_val_full.txt.bz2", "hellaswag")
    items: list[ChoiceItem] = []
    with bz2.open(path, "rt", encoding="utf-8", newline="\n") as f:
        block: list[str] = []
        for lineno, line in enumerate(f, 1):
            if limit is not None and len(items) >= limit:
                break
            block.append(line.rstrip("\n"))
            if len(block) < 6:
                continue
            first = lineno - 5
            if not block[0].strip():
                raise TaskDataError(f"{path}, line {first}: empty context")
            gold = _gold(block[1], 4, path, first + 1)
            endings = [_hellaswag_preprocess(e) for e in block[2:]]
            for k, e in enumerate(endings):
                if not e:
                    raise TaskDataError(f"{path}, line {first + 2 + k}: empty ending")
            items.append(_choices(_hellaswag_preprocess(block[0]), endings, gold))
            block = []
        if block and (limit is None or len(items) < limit):
            raise TaskDataError(f"{path}: {len(block)} trailing lines after item {len(items)} "
                                "(each item is 6 lines: context, label, 4 endings)")
    return items


def load_winogrande(tasks_dir: Path, limit: int | None = None) -> list[ChoiceItem]:
    """WinoGrande dev, partial evaluation: {context_options[2], continuation, gold}."""
    path = _require(tasks_dir / "mosaicml-gauntlet" / "winogrande.jsonl", "winogrande")
    items = []
    for lineno, obj in _json_lines(path, limit):
        options = _string_list(obj, "context_options", path, lineno, length=2)
        continuation = _field(obj, "continuation", str, path, lineno)
        gold = _gold(_field(obj, "gold", (int, str), path, lineno), 2, path, lineno)
        # lm-eval: contexts sentence[:idx] + option, target " " + sentence[idx+1:].strip()
        target = continuation.strip()
        items.append(ChoiceItem(tuple(options), (" " + target, " " + target), gold, (target, target)))
    return items


def load_lambada(tasks_dir: Path, limit: int | None = None) -> list[LambadaItem]:
    """LAMBADA (OpenAI) test: {context, continuation}; the text is context + " " + continuation."""
    path = _require(tasks_dir / "mosaicml-gauntlet" / "lambada_openai.jsonl", "lambada_openai")
    items = []
    for lineno, obj in _json_lines(path, limit):
        context = _field(obj, "context", str, path, lineno)
        word = _field(obj, "continuation", str, path, lineno)
        if not word.strip():
            raise TaskDataError(f"{path}, line {lineno}: empty continuation")
        items.append(LambadaItem(context.rstrip(" "), " " + word.strip(" ")))
    return items


@dataclass(frozen=True)
class TaskSpec:
    name: str
    loader: Callable[[Path, int | None], list]
    acc_norm: bool  # report acc_norm beside acc (multiple choice only)
    kind: str  # "choice" | "lambada"


TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in (
        TaskSpec("piqa", load_piqa, True, "choice"),
        TaskSpec("arc_easy", lambda d, n: load_arc(d, "easy", n), True, "choice"),
        TaskSpec("arc_challenge", lambda d, n: load_arc(d, "challenge", n), True, "choice"),
        TaskSpec("hellaswag", load_hellaswag, True, "choice"),
        TaskSpec("winogrande", load_winogrande, False, "choice"),
        TaskSpec("lambada_openai", load_lambada, False, "lambada"),
    )
}


def resolve_task_names(spec: str | Sequence[str]) -> list[str]:
    """Task names from "piqa,arc_easy", "all" or a list; UnknownTaskError lists the known ones."""
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if names == ["all"]:
        return list(TASKS)
    unknown = [n for n in names if n not in TASKS]
    if unknown or not names:
        raise UnknownTaskError(
            f"unknown task{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown)) or '(none given)'}; "
            f"known: {', '.join(TASKS)} (or 'all')"
        )
    return list(dict.fromkeys(names))


def load_task(name: str, tasks_dir: str | os.PathLike | None = None, limit: int | None = None) -> list:
    """The first `limit` items (all if None) of task `name`."""
    spec = TASKS.get(name)
    if spec is None:
        resolve_task_names([name])  # raises with the list of known tasks
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    root = Path(tasks_dir) if tasks_dir is not None else default_tasks_dir()
    try:
        return spec.loader(root, limit)
    except (UnicodeDecodeError, EOFError, OSError, RecursionError, ValueError) as e:
        if isinstance(e, TaskDataError):
            raise
        # a file that is not UTF-8, a truncated or damaged bz2 stream, JSON nested too deeply
        raise TaskDataError(f"{name}: cannot read its data under {root}: {type(e).__name__}: {e}") from None


# ----------------------------------------------------------------------------- scoring


@dataclass(frozen=True)
class Loglikelihood:
    logprob: float  # sum of the continuation tokens' log-probabilities (nats)
    greedy: bool  # every continuation token is the argmax at its position
    n_tokens: int  # continuation tokens


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of `text` without special tokens (lm-eval's tok_encode for causal LMs).

    The tokenizer needs `encode(text, add_special_tokens=False)` (or `encode(text)`)."""
    try:
        ids = tokenizer.encode(text, add_special_tokens=False)
    except TypeError:
        ids = tokenizer.encode(text)
    return [int(i) for i in ids]


def _prefix_token(tokenizer, model) -> int:
    """Context for an empty context (lm-eval's prefix token: BOS, else EOS)."""
    token = start_token_id(tokenizer, model)
    if token is None:
        raise ValueError("an empty context needs a BOS or EOS token, and neither the tokenizer nor the model defines one")
    return token


def encode_request(tokenizer, context: str, continuation: str, cache: dict[str, list[int]] | None = None,
                   model=None) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-eval splits them (see the module docstring)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    cache = {} if cache is None else cache

    def enc(text: str) -> list[int]:
        if text not in cache:
            cache[text] = encode(tokenizer, text)
        return cache[text]

    if not context:
        return [_prefix_token(tokenizer, model)], enc(continuation)
    whole = enc(context + continuation)
    n_context = len(enc(context))
    return whole[:n_context], whole[n_context:]


def model_max_length(model, default: int = 2048) -> int:
    """Longest input the model takes (config max_position_embeddings / n_positions)."""
    config = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        v = getattr(config, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    return default


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _accepts_logits_to_keep(model) -> bool:
    """Whether the model's forward takes `logits_to_keep` (transformers causal LMs do)."""
    import inspect

    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


@torch.no_grad()
def loglikelihoods(
    model,
    tokenizer,
    requests: Sequence[tuple[str, str]],
    batch_size: int = 16,
    max_length: int | None = None,
    progress: bool = True,
    desc: str = "loglikelihood",
) -> list[Loglikelihood]:
    """Log-likelihood of each continuation given its context (see the module docstring),
    in the order of `requests`."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    max_length = max_length or model_max_length(model)
    cache: dict[str, list[int]] = {}
    sequences: list[list[int]] = []  # model input (context + continuation minus last token)
    targets: list[list[int]] = []
    for i, (context, continuation) in enumerate(requests):
        ctx, cont = encode_request(tokenizer, context, continuation, cache, model)
        if len(cont) > max_length:
            raise ValueError(f"request {i}: continuation of {len(cont)} tokens exceeds the model's length {max_length}")
        sequences.append((ctx + cont)[-(max_length + 1):][:-1])  # left truncation, as lm-eval
        targets.append(cont)
    results: list[Loglikelihood | None] = [None] * len(requests)
    order = sorted(range(len(requests)), key=lambda i: (-len(sequences[i]), i))
    order_nonempty = [i for i in order if targets[i]]
    for i in order:
        if not targets[i]:  # nothing to score (lm-eval: log-likelihood 0, greedy)
            results[i] = Loglikelihood(0.0, True, 0)
    device = _device(model)
    keep_supported = _accepts_logits_to_keep(model)
    was_training = model.training
    model.eval()
    from tqdm.auto import tqdm

    try:
        for b0 in tqdm(range(0, len(order_nonempty), batch_size), desc=desc, disable=not progress):
            batch = order_nonempty[b0 : b0 + batch_size]
            width = max(len(sequences[i]) for i in batch)
            ids = torch.zeros((len(batch), width), dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for r, i in enumerate(batch):  # right padding: real tokens never see the padding
                ids[r, : len(sequences[i])] = torch.tensor(sequences[i])
                mask[r, : len(sequences[i])] = 1
            kwargs = {}
            # the head (and its memory) only where a continuation token is predicted: the
            # last `keep` positions cover every row's continuation
            first = min(len(sequences[i]) - len(targets[i]) for i in batch)
            if keep_supported:
                kwargs["logits_to_keep"] = width - first
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False, **kwargs).logits
            offset = width - logits.shape[1]  # position of logits[:, 0]
            for r, i in enumerate(batch):
                n, m = len(sequences[i]), len(targets[i])
                logp = F.log_softmax(logits[r, n - m - offset : n - offset].float(), dim=-1)
                target = torch.tensor(targets[i], device=logp.device)
                picked = logp.gather(1, target[:, None])[:, 0]
                greedy = bool((logp.argmax(-1) == target).all())
                results[i] = Loglikelihood(float(picked.double().sum()), greedy, m)
    finally:
        model.train(was_training)
    return results  # type: ignore[return-value]


# ----------------------------------------------------------------------------- metrics


def accuracy_stderr(p: float, n: int) -> float | None:
    """lm-eval's standard error of a mean of 0/1 values: sqrt(p (1 - p) / (n - 1)); None
    for a single item (undefined; None rather than NaN keeps the JSON standard)."""
    return math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else None


def _argmax(values: Sequence[float]) -> int:
    best = 0
    for k, v in enumerate(values):
        if v > values[best]:
            best = k
    return best


def choice_predictions(item: ChoiceItem, lls: Sequence[float]) -> tuple[int, int]:
    """(acc prediction, acc_norm prediction) of one item from its choices' log-likelihoods."""
    norm = [ll / max(len(text), 1) for ll, text in zip(lls, item.choice_texts)]
    return _argmax(lls), _argmax(norm)


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
    seconds: float
    requests: int = 0

    def metric(self, name: str) -> Metric:
        for m in self.metrics:
            if m.name == name:
                return m
        raise KeyError(f"{self.task} has no metric {name!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"items": self.items, "requests": self.requests, "seconds": self.seconds,
                "metrics": {m.name: {"value": m.value, "stderr": m.stderr} for m in self.metrics}}


def choice_metrics(items: Sequence[ChoiceItem], lls: Sequence[Sequence[float]], with_norm: bool) -> list[Metric]:
    n = len(items)
    preds = [choice_predictions(item, ll) for item, ll in zip(items, lls)]
    acc = sum(p[0] == item.gold for p, item in zip(preds, items)) / n
    out = [Metric("acc", acc, accuracy_stderr(acc, n))]
    if with_norm:
        acc_norm = sum(p[1] == item.gold for p, item in zip(preds, items)) / n
        out.append(Metric("acc_norm", acc_norm, accuracy_stderr(acc_norm, n)))
    return out


def lambada_metrics(results: Sequence[Loglikelihood]) -> list[Metric]:
    n = len(results)
    acc = sum(r.greedy for r in results) / n
    ppl = math.exp(-sum(r.logprob for r in results) / n)
    return [Metric("acc", acc, accuracy_stderr(acc, n)), Metric("perplexity", ppl, None)]


def evaluate_task(
    model,
    tokenizer,
    name: str,
    tasks_dir: str | os.PathLike | None = None,
    limit: int | None = None,
    batch_size: int = 16,
    max_length: int | None = None,
    progress: bool = True,
    items: list | None = None,
) -> TaskResult:
    """Score one task (its first `limit` items, or the given `items`)."""
    spec = TASKS.get(name)
    if spec is None:
        resolve_task_names([name])
    items = load_task(name, tasks_dir, limit) if items is None else items
    if not items:
        raise TaskDataError(f"{name}: no items to evaluate")
    t0 = time.perf_counter()
    requests = [req for item in items for req in item.requests]
    scored = loglikelihoods(model, tokenizer, requests, batch_size, max_length, progress, desc=name)
    if spec.kind == "lambada":
        metrics = lambada_metrics(scored)
    else:
        lls, k = [], 0
        for item in items:
            lls.append([r.logprob for r in scored[k : k + len(item.requests)]])
            k += len(item.requests)
        metrics = choice_metrics(items, lls, spec.acc_norm)
    return TaskResult(name, len(items), metrics, time.perf_counter() - t0, len(requests))


def evaluate_tasks(
    model,
    tokenizer,
    names: str | Sequence[str],
    tasks_dir: str | os.PathLike | None = None,
    limit: int | None = None,
    batch_size: int = 16,
    max_length: int | None = None,
    progress: bool = True,
) -> dict[str, TaskResult]:
    """Score several tasks; every task's data is read (and checked) before any scoring."""
    names = resolve_task_names(names)
    loaded = {name: load_task(name, tasks_dir, limit) for name in names}
    return {name: evaluate_task(model, tokenizer, name, batch_size=batch_size, max_length=max_length,
                                progress=progress, items=loaded[name]) for name in names}


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


@dataclass
class _Row:
    task: str
    metric: str
    value: float
    stderr: float | None
    items: int | str


def results_table(rows: Iterable[tuple[str, str, float, float | None, int | str]]) -> str:
    """A plain-text table: task, metric, value, stderr, items."""
    rows = [_Row(*r) for r in rows]
    header = ("task", "metric", "value", "stderr", "items")
    cells = [header] + [
        (r.task, r.metric, f"{r.value:.4f}", "-" if r.stderr is None or math.isnan(r.stderr) else f"{r.stderr:.4f}",
         str(r.items))
        for r in rows
    ]
    widths = [max(len(c[k]) for c in cells) for k in range(len(header))]
    lines = ["  ".join(c[k].ljust(widths[k]) if k < 2 else c[k].rjust(widths[k]) for k in range(len(header)))
             for c in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def task_rows(results: dict[str, TaskResult]) -> list[tuple[str, str, float, float | None, int]]:
    return [(name, m.name, m.value, m.stderr, r.items) for name, r in results.items() for m in r.metrics]


__all__ = [
    "TASKS", "TASKS_DIR_ENV", "ChoiceItem", "LambadaItem", "Loglikelihood", "Metric", "TaskDataError", "TaskResult",
    "TaskSpec", "UnknownTaskError", "accuracy_stderr", "average_accuracy", "choice_metrics", "choice_predictions",
    "default_tasks_dir", "encode", "encode_request", "evaluate_task", "evaluate_tasks", "headline_accuracy",
    "lambada_metrics", "load_arc", "load_hellaswag", "load_lambada", "load_piqa", "load_task", "load_winogrande",
    "loglikelihoods", "model_max_length", "resolve_task_names", "results_table", "task_rows",
]
