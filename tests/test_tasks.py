"""The local task files (pvq.eval.tasks): each format read into the items lm-eval is
given, malformed files named with file and line, the real files' item counts."""

from __future__ import annotations

import bz2
import json
from pathlib import Path

import pytest

from pvq.eval.tasks import (
    TaskDataError,
    UnknownTaskError,
    default_tasks_dir,
    load_task,
)

SHARED_TASKS = Path(__file__).resolve().parents[2] / "shared" / "assets" / "tasks"


# ----------------------------------------------------------------------------- files


def _write_tasks_dir(root: Path) -> Path:
    g = root / "mosaicml-gauntlet"
    g.mkdir(parents=True)
    (root / "piqa").mkdir()
    (root / "hellaswag").mkdir()
    (root / "piqa" / "valid.jsonl").write_text(
        json.dumps({"goal": "open a jar", "sol1": "twist the lid", "sol2": "eat the lid"}) + "\n"
        + json.dumps({"goal": "dry hair", "sol1": "use water", "sol2": "use a towel"}) + "\n")
    (root / "piqa" / "valid-labels.lst").write_text("0\n1\n")
    for name in ("arc_easy", "arc_challenge"):
        (g / f"{name}.jsonl").write_text(
            json.dumps({"query": "Question: sky colour?", "choices": ["blue", "green", "red"], "gold": 0}) + "\n")
    (g / "winogrande.jsonl").write_text(
        json.dumps({"context_options": ["A beat B so A", "A beat B so B"], "continuation": "was happy.", "gold": 0})
        + "\n")
    (g / "lambada_openai.jsonl").write_text(json.dumps({"context": "He opened the", "continuation": "door"}) + "\n")
    lines = ["Cooking: A man stands in a kitchen. he", "2", "flies.", "swims.", "cooks dinner.", "sleeps."]
    with bz2.open(root / "hellaswag" / "hellaswag_val_full.txt.bz2", "wt") as f:
        f.write("\n".join(lines * 2) + "\n")
    return root


def test_parsers_read_each_format(tmp_path):
    root = _write_tasks_dir(tmp_path / "tasks")
    piqa = load_task("piqa", root)
    assert [it.gold for it in piqa] == [0, 1]
    assert piqa[0].requests == [("Question: open a jar\nAnswer:", " twist the lid"),
                                ("Question: open a jar\nAnswer:", " eat the lid")]
    arc = load_task("arc_challenge", root)
    assert arc[0].contexts[0] == "Question: sky colour?\nAnswer:" and arc[0].continuations == (" blue", " green", " red")
    assert arc[0].choice_texts == ("blue", "green", "red")
    wino = load_task("winogrande", root)[0]
    assert wino.requests == [("A beat B so A", " was happy."), ("A beat B so B", " was happy.")] and wino.gold == 0
    lam = load_task("lambada_openai", root)[0]
    assert (lam.context, lam.continuation) == ("He opened the", " door")
    hs = load_task("hellaswag", root)
    assert len(hs) == 2 and hs[0].gold == 2 and hs[0].contexts[0] == "Cooking: A man stands in a kitchen. he"
    assert hs[0].continuations[2] == " cooks dinner."
    assert len(load_task("hellaswag", root, limit=1)) == 1
    # piqa falls back to the gauntlet file when the original release is absent
    (root / "piqa" / "valid.jsonl").unlink()
    (root / "mosaicml-gauntlet" / "piqa.jsonl").write_text(
        json.dumps({"query": "Question: dry hair\n", "choices": ["use water", "use a towel"], "gold": 1}) + "\n")
    assert load_task("piqa", root)[0].requests[1] == ("Question: dry hair\nAnswer:", " use a towel")


def test_tasks_dir_from_the_environment(tmp_path, monkeypatch):
    root = _write_tasks_dir(tmp_path / "elsewhere")
    monkeypatch.setenv("PVQ_TASKS_DIR", str(root))
    assert default_tasks_dir() == root
    assert len(load_task("arc_easy")) == 1


def test_bad_task_files_name_file_and_line(tmp_path):
    root = _write_tasks_dir(tmp_path / "tasks")
    arc = root / "mosaicml-gauntlet" / "arc_easy.jsonl"
    arc.write_text(arc.read_text() + "{not json\n")
    with pytest.raises(TaskDataError, match=r"arc_easy\.jsonl, line 2: not valid JSON"):
        load_task("arc_easy", root)
    arc.write_text(json.dumps({"query": "Question: q", "choices": ["a", "b"]}) + "\n")
    with pytest.raises(TaskDataError, match=r"arc_easy\.jsonl, line 1: missing field 'gold'"):
        load_task("arc_easy", root)
    arc.write_text(json.dumps({"query": "Question: q", "choices": ["a", "b"], "gold": 2}) + "\n")
    with pytest.raises(TaskDataError, match=r"line 1: bad label 2 \(expected an integer in 0..1\)"):
        load_task("arc_easy", root)
    (root / "piqa" / "valid-labels.lst").write_text("0\nyes\n")
    with pytest.raises(TaskDataError, match=r"valid-labels\.lst, line 2: bad label 'yes'"):
        load_task("piqa", root)
    (root / "piqa" / "valid-labels.lst").write_text("0\n")
    with pytest.raises(TaskDataError, match="no label for question 2"):
        load_task("piqa", root)
    wino = root / "mosaicml-gauntlet" / "winogrande.jsonl"
    wino.write_text(json.dumps({"context_options": ["only one"], "continuation": "x", "gold": 0}) + "\n")
    with pytest.raises(TaskDataError, match=r"winogrande\.jsonl, line 1: field 'context_options' must have 2 entries"):
        load_task("winogrande", root)
    with bz2.open(root / "hellaswag" / "hellaswag_val_full.txt.bz2", "wt") as f:
        f.write("ctx\n7\na\nb\nc\nd\n")
    with pytest.raises(TaskDataError, match=r"hellaswag_val_full\.txt\.bz2, line 2: bad label 7"):
        load_task("hellaswag", root)
    with bz2.open(root / "hellaswag" / "hellaswag_val_full.txt.bz2", "wt") as f:
        f.write("ctx\n1\na\nb\nc\nd\nctx2\n0\n")
    with pytest.raises(TaskDataError, match="2 trailing lines after item 1"):
        load_task("hellaswag", root)
    (root / "mosaicml-gauntlet" / "lambada_openai.jsonl").unlink()
    with pytest.raises(TaskDataError, match=r"data file not found: .*lambada_openai\.jsonl"):
        load_task("lambada_openai", root)


def test_unknown_local_task_lists_the_local_ones():
    with pytest.raises(UnknownTaskError, match="'boolq' is not a local task; local tasks: piqa, arc_easy"):
        load_task("boolq")


EXPECTED_COUNTS = {"piqa": 1838, "arc_easy": 2376, "arc_challenge": 1172, "hellaswag": 10042, "winogrande": 1267,
                   "lambada_openai": 5153}


@pytest.mark.skipif(not SHARED_TASKS.is_dir(), reason=f"shared task data not found at {SHARED_TASKS}")
def test_the_real_task_files_have_the_manifest_counts():
    for name, count in EXPECTED_COUNTS.items():
        items = load_task(name, SHARED_TASKS)
        assert len(items) == count, name
        golds = {it.gold for it in items} if name != "lambada_openai" else set()
        if golds:
            assert golds == set(range(len(items[0].requests))), name


# ----------------------------------------------------------------------------- pvq eval


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from conftest import save_tiny_model

    root = tmp_path_factory.mktemp("tiny-eval")
    save_tiny_model(root / "model")
    (root / "wiki.test.raw").write_text(" \n = Title = \n \n" + "the quick brown fox jumps over the lazy dog . " * 40
                                        + "\n \n")
    return root
