import math
import threading
import time
from pathlib import Path

import pytest
import torch

import pvq.eval.perplexity as perplexity_module
import pvq.eval.hub as hub_module
from pvq.eval.perplexity import (
    WIKITEXT2_TEST_ENV,
    EvalDataError,
    EvalText,
    next_token_agreement,
    perplexity,
    perplexity_details,
    wikitext2_rows_from_datasets,
    wikitext2_test,
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


# --------------------------------------------------------------- where the evaluation text comes from


def _raw(path, body):
    path.write_text(f" \n = {body} = \n \n Some {body} text . \n \n")
    return path


@pytest.fixture
def sources(tmp_path, monkeypatch):
    """Three WikiText-shaped files (explicit, env, ../shared) and a fake datasets loader that
    records its calls; no env var set."""
    files = {name: _raw(tmp_path / f"{name}.raw", name) for name in ("explicit", "env", "shared")}
    monkeypatch.delenv(WIKITEXT2_TEST_ENV, raising=False)
    monkeypatch.setattr(perplexity_module, "shared_wikitext2_test_path", lambda: files["shared"])
    calls = []
    state = {"rows": ["", " = Datasets = \n", "", " Some datasets text . \n", ""], "error": None}

    def fake_loader():
        calls.append(1)
        if state["error"]:
            raise EvalDataError(state["error"])
        return state["rows"], "datasets cache"

    monkeypatch.setattr(perplexity_module, "wikitext2_rows_from_datasets", fake_loader)
    return files, calls, state, monkeypatch


def test_eval_text_precedence_explicit_env_datasets_shared(sources):
    files, calls, state, monkeypatch = sources
    # 1. an explicit path always wins (the datasets route is not even tried)
    got = wikitext2_test(files["explicit"])
    assert got == EvalText(wikitext2_test_text_of(files["explicit"]), "file", files["explicit"])
    assert got.describe() == f"WikiText-2 test (file {files['explicit']})" and not calls
    # 2. then $PVQ_WIKITEXT2_TEST
    monkeypatch.setenv(WIKITEXT2_TEST_ENV, str(files["env"]))
    assert wikitext2_test() == EvalText(wikitext2_test_text_of(files["env"]), "file", files["env"]) and not calls
    assert wikitext2_test(files["explicit"]).path == files["explicit"]
    # a set variable that names no file is an error, not a silent fall-through
    monkeypatch.setenv(WIKITEXT2_TEST_ENV, str(files["env"].with_name("gone.raw")))
    with pytest.raises(EvalDataError, match="WikiText-2 raw test file not found: .*gone.raw"):
        wikitext2_test()
    # 3. then the datasets library, rows joined the customary way
    monkeypatch.delenv(WIKITEXT2_TEST_ENV)
    got = wikitext2_test()
    assert got == EvalText("\n\n".join(state["rows"]), "datasets cache") and len(calls) == 1
    assert got.describe() == "WikiText-2 test (datasets cache)"
    assert wikitext2_test_text() == got.text  # the existing entry point takes the same route
    # 4. then ../shared beside the checkout
    state["error"] = "wikitext/wikitext-2-raw-v1 is not in the datasets cache"
    assert wikitext2_test() == EvalText(wikitext2_test_text_of(files["shared"]), "file", files["shared"])
    assert wikitext2_test(use_datasets=False).source == "file"
    # nothing anywhere: one line naming every place looked at
    files["shared"].unlink()
    with pytest.raises(EvalDataError) as info:
        wikitext2_test()
    msg = str(info.value)
    assert "\n" not in msg and "not in the datasets cache" in msg and f"no file at {files['shared']}" in msg
    assert WIKITEXT2_TEST_ENV in msg


def wikitext2_test_text_of(path):
    return "\n\n".join(wikitext2_test_rows(path))


def _fake_datasets_cache(root, rows, monkeypatch):
    """A datasets cache holding `rows` as wikitext/wikitext-2-raw-v1's test split, laid out as
    `load_dataset` leaves a hub dataset (built by datasets' own parquet builder, offline)."""
    datasets = pytest.importorskip("datasets")
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets.packaged_modules.parquet.parquet import Parquet

    pq.write_table(pa.table({"text": rows}), root / "test.parquet")
    cache = root / "cache"
    builder = Parquet(cache_dir=str(cache), dataset_name="wikitext", config_name="wikitext-2-raw-v1",
                      data_files={"test": str(root / "test.parquet")}, hash="0123456789abcdef")
    builder.download_and_prepare()
    built = Path(builder.cache_dir).parents[1]  # wikitext/<config id>/0.0.0/<hash>
    built.rename(built.with_name("wikitext-2-raw-v1"))  # a hub config's directory is its plain name
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))
    return cache


@pytest.fixture
def no_network(monkeypatch):
    """Records every name lookup and connection attempt (none is expected)."""
    import socket

    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args[:1])
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(hub_module, "_hub_head", lambda endpoint, seconds: attempts.append(endpoint) or 200)
    return attempts


def _hub_offline_flags(monkeypatch, offline: bool):
    datasets = pytest.importorskip("datasets")
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", offline)
    return datasets, hub_constants


def test_the_datasets_cache_route_reads_a_cached_split_without_network(tmp_path, monkeypatch, no_network):
    rows = ["", " = Title = \n", "", " Some text . \n", ""]
    _fake_datasets_cache(tmp_path, rows, monkeypatch)
    datasets, hub_constants = _hub_offline_flags(monkeypatch, False)  # online as far as the settings go
    assert wikitext2_rows_from_datasets() == (rows, "datasets cache")
    assert not no_network  # the cache was tried in offline mode: no lookup, no probe
    assert datasets.config.HF_HUB_OFFLINE is False and hub_constants.HF_HUB_OFFLINE is False  # restored
    monkeypatch.delenv(WIKITEXT2_TEST_ENV, raising=False)
    got = wikitext2_test()
    assert got.source == "datasets cache" and got.text == "\n\n".join(rows)


@pytest.mark.skipif(not WIKI_TEST.is_file(), reason=f"shared assets not found at {SHARED}")
def test_datasets_rows_give_the_file_routes_text(tmp_path, monkeypatch, no_network):
    """The file route yields the Hugging Face rows: the same rows through a datasets cache give
    exactly the text the file gives."""
    rows = wikitext2_test_rows(WIKI_TEST)
    _fake_datasets_cache(tmp_path, rows, monkeypatch)
    _hub_offline_flags(monkeypatch, True)
    monkeypatch.delenv(WIKITEXT2_TEST_ENV, raising=False)
    got = wikitext2_test()
    assert got.source == "datasets cache" and got.text == wikitext2_test_text(WIKI_TEST) and not no_network


def test_offline_failure_is_fast_and_touches_no_network(tmp_path, monkeypatch, no_network):
    datasets, _ = _hub_offline_flags(monkeypatch, True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "empty-cache"))
    t0 = time.perf_counter()
    with pytest.raises(EvalDataError, match="not in the datasets cache .*and Hugging Face offline mode is on"):
        wikitext2_rows_from_datasets()
    assert time.perf_counter() - t0 < 30 and not no_network  # a retry loop would take minutes; loose for a loaded machine


def test_an_unanswering_hub_costs_the_probe_time_only(tmp_path, monkeypatch):
    """Online settings, nothing cached, a hub that never answers (a hanging name lookup, say):
    the attempt gives up after the probe's time; datasets' own retry loop never starts."""
    datasets, _ = _hub_offline_flags(monkeypatch, False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "empty-cache"))
    release = threading.Event()
    monkeypatch.setattr(hub_module, "_hub_head", lambda endpoint, seconds: release.wait(60) and 200)
    loads = []
    real_load = datasets.load_dataset

    def load(*args, **kwargs):
        loads.append(datasets.config.HF_HUB_OFFLINE)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", load)
    t0 = time.perf_counter()
    try:
        with pytest.raises(EvalDataError, match=r"the Hugging Face hub is unreachable \(no answer from .* within 0.3 s\)"):
            wikitext2_rows_from_datasets(probe_seconds=0.3)
    finally:
        release.set()
    assert time.perf_counter() - t0 < 30  # the fake hub hangs 60 s; loose for a loaded machine
    assert loads == [True]  # the cache attempt only, in offline mode

    def refused(endpoint, seconds):
        raise ConnectionError("[Errno -2] Name or service not known")

    monkeypatch.setattr(hub_module, "_hub_head", refused)
    with pytest.raises(EvalDataError, match="unreachable .*ConnectionError: \\[Errno -2\\] Name or service not known"):
        wikitext2_rows_from_datasets(probe_seconds=0.3)
    monkeypatch.setattr(hub_module, "_hub_head", lambda endpoint, seconds: 503)
    with pytest.raises(EvalDataError, match="answers HTTP 503"):
        wikitext2_rows_from_datasets(probe_seconds=0.3)


def test_a_reachable_hub_is_loaded_from_online(tmp_path, monkeypatch):
    """When the probe answers, load_dataset runs again with offline mode off (a fake here: the
    cache attempt is refused, the online one returns rows)."""
    datasets, _ = _hub_offline_flags(monkeypatch, False)
    monkeypatch.setattr(hub_module, "_hub_head", lambda endpoint, seconds: 200)
    rows = ["", " = Hub = \n", ""]

    def load(path, name, split):
        assert (path, name, split) == ("wikitext", "wikitext-2-raw-v1", "test")
        if datasets.config.HF_HUB_OFFLINE:
            raise ConnectionError("Couldn't reach 'wikitext' on the Hub (OfflineModeIsEnabled)")
        return datasets.Dataset.from_dict({"text": rows})

    monkeypatch.setattr(datasets, "load_dataset", load)
    assert wikitext2_rows_from_datasets() == (rows, "Hugging Face hub")
    with pytest.raises(EvalDataError, match="is not in the datasets cache"):
        wikitext2_rows_from_datasets(hub=False)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: datasets.Dataset.from_dict({"title": ["x"]}))
    with pytest.raises(EvalDataError, match="has no 'text' column"):
        wikitext2_rows_from_datasets()


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
    from pvq.calibrate import encode_text

    model, tokenizer, _ = real_model
    ids = encode_text(tokenizer, wikitext2_test_text(WIKI_TEST))
    assert ids.numel() == 304_986
    res = perplexity_details(model, ids, seqlen=512, max_windows=20, progress=False)
    assert res.ppl == pytest.approx(35.88, abs=0.01)
