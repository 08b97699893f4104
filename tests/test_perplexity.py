import math
from pathlib import Path

import pytest
import torch

from pvq.eval.perplexity import (
    EvalDataError,
    next_token_agreement,
    perplexity,
    perplexity_details,
    wikitext2_test_rows,
    wikitext2_test_text,
)
from pvq.models import tiny_llama

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
WIKI_TEST = SHARED / "assets" / "wikitext-2" / "raw" / "wiki.test.raw"


def test_wikitext_rows_follow_the_hf_layout(tmp_path):
    path = tmp_path / "wiki.test.raw"
    path.write_text(" \n = Title = \n \n Some text . \n \n")
    assert wikitext2_test_rows(path) == ["", " = Title = \n", "", " Some text . \n", ""]
    assert wikitext2_test_text(path) == "\n\n = Title = \n\n\n\n\n Some text . \n\n\n"
    with pytest.raises(EvalDataError, match="WikiText-2 raw test file not found"):
        wikitext2_test_text(tmp_path / "missing.raw")


@pytest.mark.skipif(not WIKI_TEST.is_file(), reason=f"shared assets not found at {SHARED}")
def test_the_real_wikitext_test_file():
    rows = wikitext2_test_rows(WIKI_TEST)
    assert len(rows) == 4358 and sum(1 for r in rows if r) == 2891
    assert wikitext2_test_text(WIKI_TEST).startswith("\n\n = Robert Boulter = \n\n\n\n\n Robert Boulter is an English")


def _direct_nll(model, windows):
    """Token by token, from the definition."""
    total, count = 0.0, 0
    with torch.no_grad():
        for w in windows:
            logits = model(input_ids=w[None]).logits[0].double()
            for t in range(1, w.numel()):
                total -= float(torch.log_softmax(logits[t - 1], -1)[w[t]])
                count += 1
    return total / count


def test_perplexity_matches_a_direct_computation():
    model = tiny_llama(seed=0, init_std=0.2)
    ids = torch.randint(0, 256, (5 * 16 + 7,), generator=torch.Generator().manual_seed(0))
    windows = ids[: 5 * 16].reshape(5, 16)
    expected = math.exp(_direct_nll(model, windows))
    res = perplexity_details(model, ids, seqlen=16, progress=False)
    assert res.n_windows == 5 and res.n_tokens == 5 * 15 and res.seqlen == 16
    assert res.ppl == pytest.approx(expected, rel=1e-5)
    assert perplexity(model, ids, seqlen=16, batch_size=3, progress=False) == pytest.approx(expected, rel=1e-5)
    assert perplexity(model, windows, progress=False) == pytest.approx(expected, rel=1e-5)  # windows given
    first2 = math.exp(_direct_nll(model, windows[:2]))
    assert perplexity(model, ids.tolist(), seqlen=16, max_windows=2, progress=False) == pytest.approx(first2, rel=1e-5)
    with pytest.raises(EvalDataError, match="fewer than one window"):
        perplexity(model, ids[:10], seqlen=16, progress=False)


def test_perplexity_from_a_tokenizer_and_text():
    class Bytes:
        def __call__(self, text, **kwargs):
            return {"input_ids": list(text.encode())}

    model = tiny_llama(seed=1)
    text = "hello world, " * 10
    ids = torch.tensor(list(text.encode()))
    assert perplexity(model, Bytes(), seqlen=32, text=text, progress=False) == perplexity(model, ids, seqlen=32, progress=False)


def test_next_token_agreement():
    a, b = tiny_llama(seed=0, init_std=0.2), tiny_llama(seed=1, init_std=0.2)
    windows = torch.randint(0, 256, (3, 12), generator=torch.Generator().manual_seed(0))
    same = next_token_agreement(a, a, windows)
    assert same["top1_agreement"] == 1.0 and abs(same["kl"]) < 1e-6 and same["n_tokens"] == 3 * 11
    diff = next_token_agreement(a, b, windows.flatten(), seqlen=12, batch_size=2)
    with torch.no_grad():
        lp = torch.log_softmax(a(windows).logits[:, :-1].double(), -1)
        lq = torch.log_softmax(b(windows).logits[:, :-1].double(), -1)
    kl = float((lp.exp() * (lp - lq)).sum(-1).mean())
    agree = float((lp.argmax(-1) == lq.argmax(-1)).double().mean())
    assert diff["kl"] == pytest.approx(kl, rel=1e-4) and diff["kl"] > 0.01
    assert diff["top1_agreement"] == pytest.approx(agree)


@pytest.mark.slow
def test_real_model_perplexity_reference(real_model):
    """MANIFEST reference: the float model, first 20 windows of 512 tokens: PPL 35.88."""
    from pvq.pipeline import encode_text

    model, tokenizer, _ = real_model
    ids = encode_text(tokenizer, wikitext2_test_text(WIKI_TEST))
    assert ids.numel() == 304_986
    res = perplexity_details(model, ids, seqlen=512, max_windows=20, progress=False)
    assert res.ppl == pytest.approx(35.88, abs=0.01)
