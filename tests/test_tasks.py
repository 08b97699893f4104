"""Zero-shot task scoring (pvq.eval.tasks): the batched scorer against a brute-force one,
the metrics on items with known log-likelihoods, and the file parsers."""

from __future__ import annotations

import bz2
import json
import math
from pathlib import Path

import re

import pytest
from conftest import cli_error
import torch
from torch import nn

from pvq.eval.tasks import (
    TASKS,
    ChoiceItem,
    LambadaItem,
    TaskDataError,
    UnknownTaskError,
    accuracy_stderr,
    choice_metrics,
    default_tasks_dir,
    encode_request,
    evaluate_task,
    evaluate_tasks,
    load_task,
    loglikelihoods,
    resolve_task_names,
    results_table,
    task_rows,
)
from pvq.models import tiny_llama

SHARED_TASKS = Path(__file__).resolve().parents[2] / "shared" / "assets" / "tasks"


class CharTokenizer:
    """One token per character (its code point); no special tokens, BOS = 1."""

    bos_token_id = 1

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]


class WordTokenizer:
    """GPT-2-like: a word carries its leading space (" b" is one token)."""

    bos_token_id = 0

    def __init__(self):
        self.vocab: dict[str, int] = {}

    def encode(self, text, add_special_tokens=False):
        import re

        return [self.vocab.setdefault(piece, len(self.vocab) + 1) for piece in re.findall(r" ?\S+|\s", text)]


class BigramModel(nn.Module):
    """Logits at position t depend only on token t: a fixed random table, so every
    log-likelihood can be computed by hand."""

    def __init__(self, vocab=128, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("table", torch.randn(vocab, vocab, generator=g) * 3)
        self.anchor = nn.Parameter(torch.zeros(()))  # the scorer finds the device from a parameter
        self.config = type("Config", (), {"max_position_embeddings": 64})()
        self.calls = 0

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        self.calls += 1
        return type("Out", (), {"logits": self.table[input_ids]})()

    def logprob(self, prev: int, token: int) -> float:
        return float(torch.log_softmax(self.table[prev].double(), -1)[token])

    def greedy_next(self, prev: int) -> int:
        return int(self.table[prev].argmax())


def _hand_loglik(model: BigramModel, context: str, continuation: str) -> float:
    ids = [ord(c) for c in context + continuation]
    n_ctx = len(context)
    return sum(model.logprob(ids[t - 1], ids[t]) for t in range(n_ctx, len(ids)))


# ----------------------------------------------------------------------------- scorer


def _brute_force(model, tokenizer, context, continuation, max_length):
    """One unpadded forward per request, summed log-probabilities, from the definition."""
    ctx, cont = encode_request(tokenizer, context, continuation)
    ids = (ctx + cont)[-(max_length + 1):]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids[:-1]])).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    n = len(ids) - 1
    total, greedy = 0.0, True
    for k, tok in enumerate(cont):
        pos = n - len(cont) + k
        total += float(logp[pos, tok])
        greedy &= int(logp[pos].argmax()) == tok
    return total, greedy


REQUESTS = [
    ("Question: what is two plus two?\nAnswer:", " four"),
    ("Question: what is two plus two?\nAnswer:", " five and a half"),
    ("short", " x"),
    ("trailing space ", "moves to the continuation"),
    ("a much longer context that runs for quite a few characters before the end", " ok"),
    ("mid", "dle"),
    ("The cat sat on the", " mat."),
]


@pytest.mark.parametrize("batch_size,max_length", [(3, None), (1, None), (16, None), (4, 30)])
def test_batched_scorer_equals_brute_force(batch_size, max_length):
    model = tiny_llama(seed=0, init_std=0.2)
    tok = CharTokenizer()
    got = loglikelihoods(model, tok, REQUESTS, batch_size=batch_size, max_length=max_length, progress=False)
    limit = max_length or model.config.max_position_embeddings
    for (ctx, cont), res in zip(REQUESTS, got):
        expected, greedy = _brute_force(model, tok, ctx, cont, limit)
        assert res.logprob == pytest.approx(expected, abs=1e-5)
        assert res.greedy == greedy
        assert res.n_tokens == len(encode_request(tok, ctx, cont)[1])
    # batching and order do not change the result
    again = loglikelihoods(model, tok, REQUESTS[::-1], batch_size=2, max_length=max_length, progress=False)[::-1]
    assert [r.logprob for r in again] == pytest.approx([r.logprob for r in got], abs=1e-5)


def test_left_truncation_keeps_the_continuation():
    model = BigramModel()
    tok = CharTokenizer()
    ctx, cont = "x" * 100, " end"
    res = loglikelihoods(model, tok, [(ctx, cont)], max_length=10, progress=False)[0]
    # a bigram model ignores what truncation drops, so the result is the untruncated one
    assert res.logprob == pytest.approx(_hand_loglik(model, ctx, cont), abs=1e-5)
    with pytest.raises(ValueError, match="exceeds the model's length"):
        loglikelihoods(model, tok, [("a", "b" * 20)], max_length=10, progress=False)


def test_request_encoding_follows_lm_eval():
    tok = WordTokenizer()
    ctx, cont = encode_request(tok, "Question: a\nAnswer: ", "Paris")
    # the context's trailing space moves to the continuation: " Paris" is one token
    assert len(cont) == 1 and cont == tok.encode(" Paris")
    assert ctx == tok.encode("Question: a\nAnswer:")
    ctx, cont = encode_request(tok, "Answer:", " Paris is big")
    assert cont == tok.encode(" Paris is big")
    # an empty context gets the BOS token as its context
    assert encode_request(CharTokenizer(), "", "ab") == ([1], [97, 98])


# ----------------------------------------------------------------------------- metrics


def test_acc_and_acc_norm_formulas():
    short_vs_long = ChoiceItem(("q",) * 2, (" a", " bbbbbbbb"), 1, ("a", "bbbbbbbb"))
    # acc: -2 > -4 picks choice 0 (wrong); acc_norm: -2/1 < -4/8 picks choice 1 (right)
    metrics = {m.name: m for m in choice_metrics([short_vs_long], [[-2.0, -4.0]], with_norm=True)}
    assert metrics["acc"].value == 0.0 and metrics["acc_norm"].value == 1.0
    three = ChoiceItem(("q",) * 3, (" x", " y", " z"), 2, ("x", "y", "z"))
    items = [three] * 4
    lls = [[-1.0, -2.0, -0.5], [-0.1, -2.0, -0.5], [-3.0, -2.0, -0.5], [-1.0, -1.0, -1.0]]  # ties pick the first
    metrics = {m.name: m for m in choice_metrics(items, lls, with_norm=False)}
    assert set(metrics) == {"acc"}
    assert metrics["acc"].value == 0.5
    assert metrics["acc"].stderr == pytest.approx(math.sqrt(0.25 / 3))
    assert accuracy_stderr(0.3, 11) == pytest.approx(math.sqrt(0.3 * 0.7 / 10))


def test_multiple_choice_task_with_known_logliks():
    model = BigramModel()
    tok = CharTokenizer()
    items = [
        ChoiceItem(("Q:",) * 3, (" ab", " zzzz", " q"), gold, ("ab", "zzzz", "q")) for gold in range(3)
    ]
    res = evaluate_task(model, tok, "arc_easy", items=items, progress=False)
    lls = [_hand_loglik(model, "Q:", c) for c in (" ab", " zzzz", " q")]
    best = max(range(3), key=lambda k: lls[k])
    best_norm = max(range(3), key=lambda k: lls[k] / len(items[0].choice_texts[k]))
    assert res.metric("acc").value == pytest.approx(1 / 3) and res.items == 3 and res.requests == 9
    assert res.metric("acc_norm").value == pytest.approx(1 / 3)
    hits = evaluate_task(model, tok, "arc_easy", items=[items[best]], progress=False)
    assert hits.metric("acc").value == 1.0
    norm_hits = evaluate_task(model, tok, "arc_easy", items=[items[best_norm]], progress=False)
    assert norm_hits.metric("acc_norm").value == 1.0


def test_winogrande_partial_scoring_picks_the_likelier_context():
    model = BigramModel()
    tok = CharTokenizer()
    contexts = ("The trophy did not fit because the ball", "The trophy did not fit because the case")
    # pick the continuation's first character so that the two contexts' last tokens
    # ("l" / "e") give it clearly different probabilities
    best_char = max("abcdefghijklmnopqrstuvwxyz",
                    key=lambda c: abs(model.logprob(ord("l"), ord(" ")) - model.logprob(ord("e"), ord(" "))))
    continuation = " " + best_char + "was too big."
    lls = [_hand_loglik(model, c, continuation) for c in contexts]
    assert lls[0] != lls[1]
    likelier = 0 if lls[0] > lls[1] else 1
    right = ChoiceItem(contexts, (continuation,) * 2, likelier, (continuation[1:],) * 2)
    wrong = ChoiceItem(contexts, (continuation,) * 2, 1 - likelier, (continuation[1:],) * 2)
    assert evaluate_task(model, tok, "winogrande", items=[right], progress=False).metric("acc").value == 1.0
    res = evaluate_task(model, tok, "winogrande", items=[right, wrong], progress=False)
    assert res.metric("acc").value == 0.5 and [m.name for m in res.metrics] == ["acc"]


def test_lambada_greedy_accuracy_and_perplexity():
    model = BigramModel()
    tok = CharTokenizer()
    context = "Once upon a time"
    chain, prev = [], ord(context[-1])
    for _ in range(5):  # the greedy continuation of the bigram model
        prev = model.greedy_next(prev)
        chain.append(prev)
    greedy_text = "".join(map(chr, chain))
    wrong_last = chr((chain[-1] + 1) % 128)
    items = [LambadaItem(context, greedy_text), LambadaItem(context, greedy_text[:-1] + wrong_last)]
    res = evaluate_task(model, tok, "lambada_openai", items=items, progress=False)
    assert res.metric("acc").value == 0.5
    lls = [_hand_loglik(model, it.context, it.continuation) for it in items]
    assert res.metric("perplexity").value == pytest.approx(math.exp(-sum(lls) / 2), rel=1e-5)
    assert res.metric("perplexity").stderr is None


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


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(UnknownTaskError, match="unknown task 'mmlu'; known: piqa, arc_easy, arc_challenge"):
        resolve_task_names("piqa,mmlu")
    with pytest.raises(UnknownTaskError, match="known:"):
        load_task("boolq")
    assert resolve_task_names("all") == list(TASKS)
    assert resolve_task_names("winogrande, piqa,piqa") == ["winogrande", "piqa"]


def test_evaluate_tasks_end_to_end_on_tiny_llama(tmp_path):
    root = _write_tasks_dir(tmp_path / "tasks")
    model = tiny_llama(seed=0)
    results = evaluate_tasks(model, CharTokenizer(), "all", tasks_dir=root, progress=False)
    assert list(results) == list(TASKS)
    assert results["hellaswag"].items == 2 and results["hellaswag"].requests == 8
    for res in results.values():
        for m in res.metrics:
            assert math.isfinite(m.value)
    table = results_table(task_rows(results))
    assert "acc_norm" in table and "perplexity" in table and "lambada_openai" in table
    # deterministic
    again = evaluate_tasks(model, CharTokenizer(), "all", tasks_dir=root, progress=False)
    assert task_rows(again) == task_rows(results)


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


def test_cli_eval_tasks_table_and_json(tiny_model_dir, tmp_path, capsys):
    from pvq.cli import main

    root = _write_tasks_dir(tmp_path / "tasks")
    out = tmp_path / "eval.json"
    assert main(["eval", str(tiny_model_dir / "model"), "--tasks", "all", "--tasks-dir", str(root), "--limit", "1",
                 "--seqlen", "64", "--eval-text", str(tiny_model_dir / "wiki.test.raw"), "--device", "cpu",
                 "--json", str(out)]) == 0
    text = capsys.readouterr().out
    header = next(line for line in text.splitlines() if line.startswith("task"))
    assert header.split() == ["task", "metric", "value", "stderr", "items"]
    for name in TASKS:
        assert name in text
    assert "wikitext2" in text and "average accuracy" in text
    saved = json.loads(out.read_text())
    assert saved["ppl"] > 1 and saved["limit"] == 1
    assert set(saved["tasks"]) == set(TASKS) and saved["tasks"]["hellaswag"]["items"] == 1
    assert set(saved["tasks"]["piqa"]["metrics"]) == {"acc", "acc_norm"}
    assert 0 <= saved["average_accuracy"] <= 1


def test_cli_eval_tasks_only_and_bad_input(tiny_model_dir, tmp_path, capsys):
    from pvq.cli import main

    root = _write_tasks_dir(tmp_path / "tasks")
    assert main(["eval", str(tiny_model_dir / "model"), "--tasks", "winogrande,lambada_openai", "--no-ppl",
                 "--tasks-dir", str(root), "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "perplexity" in text and "wikitext2" not in text and "piqa" not in text
    assert re.search("unknown task 'mmlu'; known: piqa", cli_error(capsys, ["eval", str(tiny_model_dir / "model"), "--tasks", "mmlu", "--tasks-dir", str(root)]))
    assert re.search("--no-ppl leaves nothing to evaluate", cli_error(capsys, ["eval", str(tiny_model_dir / "model"), "--no-ppl"]))
    (root / "mosaicml-gauntlet" / "winogrande.jsonl").write_text("{}\n")
    assert re.search(r"winogrande\.jsonl, line 1: missing field 'context_options'", cli_error(capsys, ["eval", str(tiny_model_dir / "model"), "--tasks", "winogrande", "--tasks-dir", str(root)]))
