"""The local files of the six zero-shot tasks of the paper's tables, read and checked.

`pvq.eval.harness` serves these items to lm-evaluation-harness, which scores them; this
module only reads the files (formats in ../shared/assets/MANIFEST.md section 3) and
refuses a missing file or a malformed line with its path and line number.

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

The prompts are those of lm-eval's own configs of these tasks. Known differences from
lm-eval's data: the HellaSwag file is llama.cpp's preprocessed text, whose context is one
field (lm-eval capitalises ctx_b); ARC, WinoGrande and LAMBADA come in MosaicML's converted
layout (same items and answers).
"""

from __future__ import annotations

import bz2
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from pvq.errors import PVQError

from .perplexity import EvalDataError

TASKS_DIR_ENV = "PVQ_TASKS_DIR"
_RELATIVE = Path("assets") / "tasks"


class TaskDataError(EvalDataError):
    """A task file that is missing or has a malformed line (the message names it)."""


class UnknownTaskError(PVQError, ValueError):
    """A task name that is neither local nor lm-eval's (the message lists the local ones)."""


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


def load_task(name: str, tasks_dir: str | os.PathLike | None = None, limit: int | None = None) -> list:
    """The first `limit` items (all if None) of task `name`."""
    spec = TASKS.get(name)
    if spec is None:
        raise UnknownTaskError(f"{name!r} is not a local task; local tasks: {', '.join(TASKS)}")
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


__all__ = [
    "TASKS", "TASKS_DIR_ENV", "ChoiceItem", "LambadaItem", "TaskDataError", "TaskSpec", "UnknownTaskError",
    "default_tasks_dir",
    "load_arc", "load_hellaswag", "load_lambada", "load_piqa", "load_task", "load_winogrande",
]
