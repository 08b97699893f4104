"""WikiText-2 perplexity and float-vs-quantized next-token agreement.

Perplexity follows the usual GPTQ/QuaRot protocol: the test split's rows joined with
"\\n\\n", tokenized once, cut into non-overlapping windows of `seqlen` tokens (the
remainder is dropped), PPL = exp(mean NLL) over every predicted token of every window
(the first token of a window has no prediction, so each window contributes seqlen - 1
tokens; this equals GPTQ's exp(mean over windows of the window's mean NLL)).

The text (`wikitext2_test`): an explicit file, else $PVQ_WIKITEXT2_TEST, else
``datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test")`` (the local cache in
offline mode first; the hub only when online and answering within a few seconds), else
../shared/assets/wikitext-2/raw/wiki.test.raw; `EvalText.describe()` says which.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from pvq.errors import PVQError

from .hub import HUB_PROBE_SECONDS, first_line, hub_endpoint, hub_offline, hub_offline_mode, hub_unreachable

WIKITEXT2_TEST_ENV = "PVQ_WIKITEXT2_TEST"
_RELATIVE = Path("assets") / "wikitext-2" / "raw" / "wiki.test.raw"
#: what `datasets.load_dataset` is asked for: (path, name, split)
WIKITEXT2_DATASET = ("wikitext", "wikitext-2-raw-v1", "test")


class EvalDataError(PVQError, FileNotFoundError):
    """Evaluation data that is missing or unusable."""


@dataclass(frozen=True)
class EvalText:
    """The evaluation text and where it came from.

    source: "file" (then `path` names it), "datasets cache" or "Hugging Face hub" (both
    through `datasets.load_dataset`)."""

    text: str
    source: str
    path: Path | None = None

    def describe(self) -> str:
        """"WikiText-2 test (datasets cache)", "WikiText-2 test (file /path/wiki.test.raw)", ..."""
        return f"WikiText-2 test ({f'file {self.path}' if self.source == 'file' else self.source})"


def shared_asset(relative: Path) -> Path:
    """../shared/`relative` beside the source checkout (it may not exist)."""
    repo = Path(__file__).resolve().parents[3]  # <repo>/src/pvq/eval/perplexity.py
    return repo.parent / "shared" / relative


def shared_wikitext2_test_path() -> Path:
    """../shared/assets/wikitext-2/raw/wiki.test.raw beside the source checkout (it may not exist)."""
    return shared_asset(_RELATIVE)


def default_wikitext2_test_path() -> Path:
    """$PVQ_WIKITEXT2_TEST, else ../shared/assets/wikitext-2/raw/wiki.test.raw next to the
    source checkout (the first that exists; else the last, for the error message)."""
    candidates = []
    if os.environ.get(WIKITEXT2_TEST_ENV):
        candidates.append(Path(os.environ[WIKITEXT2_TEST_ENV]))
    candidates.append(shared_wikitext2_test_path())
    for c in candidates:
        if c.is_file():
            return c
    return candidates[-1]


def wikitext2_test_rows(path: str | os.PathLike | None = None) -> list[str]:
    """The rows of the Hugging Face `wikitext-2-raw-v1` test split from Merity's
    `wiki.test.raw`: a blank line becomes "", a text line `line + "\\n"` (the file at
    `path`, else at `default_wikitext2_test_path()`; the datasets library is not used)."""
    p = Path(path) if path is not None else default_wikitext2_test_path()
    if not p.is_file():
        raise EvalDataError(
            f"WikiText-2 raw test file not found: {p} (give its path, or set ${WIKITEXT2_TEST_ENV}; "
            "it is wikitext-2-raw-v1's wiki.test.raw)"
        )
    try:
        text = p.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError) as e:
        raise EvalDataError(f"WikiText-2 raw test file {p} cannot be read as UTF-8 text: {e}") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return ["" if not line.strip() else line + "\n" for line in lines]


def _dataset_rows(dataset) -> list[str]:
    names = getattr(dataset, "column_names", None) or []
    if "text" not in names:
        raise EvalDataError(f"the datasets copy of {'/'.join(WIKITEXT2_DATASET[:2])} has no 'text' column (columns {names})")
    rows = list(dataset["text"])
    if not rows or not all(isinstance(r, str) for r in rows) or not any(r.strip() for r in rows):
        raise EvalDataError(f"the datasets copy of {'/'.join(WIKITEXT2_DATASET[:2])} holds no text")
    return rows


def wikitext2_rows_from_datasets(hub: bool = True, probe_seconds: float = HUB_PROBE_SECONDS,
                                 split: str = WIKITEXT2_DATASET[2]) -> tuple[list[str], str]:
    """The rows of `datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split)` and
    where they came from: "datasets cache" or "Hugging Face hub".

    The local cache is tried first, in offline mode (no network at all). The hub only when
    `hub`, Hugging Face offline mode is off (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) and the
    hub answers a probe within `probe_seconds`: offline this fails in about that long at
    most, never in datasets' retry loop. EvalDataError says why when there are no rows."""
    name = "/".join(WIKITEXT2_DATASET[:2])
    try:
        import datasets
    except ImportError as e:
        raise EvalDataError(f"the datasets library is not importable ({first_line(e)})") from None
    path, config_name, _ = WIKITEXT2_DATASET
    try:
        with hub_offline(datasets):
            return _dataset_rows(datasets.load_dataset(path, config_name, split=split)), "datasets cache"
    except EvalDataError:
        raise
    except Exception as e:  # noqa: BLE001 - a cache miss is ConnectionError, ValueError, FileNotFoundError...
        miss = f"{name} is not in the datasets cache {datasets.config.HF_DATASETS_CACHE} ({first_line(e)})"
    if not hub:
        raise EvalDataError(miss)
    if hub_offline_mode(datasets):
        raise EvalDataError(f"{miss}, and Hugging Face offline mode is on")
    why = hub_unreachable(hub_endpoint(datasets), probe_seconds)
    if why is not None:
        raise EvalDataError(f"{miss}, and the Hugging Face hub is unreachable ({why})")
    try:
        dataset = datasets.load_dataset(path, config_name, split=split)
    except Exception as e:  # noqa: BLE001 - network and hub errors come in many types
        raise EvalDataError(f"{name} could not be loaded from the Hugging Face hub: {first_line(e)}") from None
    return _dataset_rows(dataset), "Hugging Face hub"


def wikitext2_test(path: str | os.PathLike | None = None, use_datasets: bool = True) -> EvalText:
    """The customary evaluation text, "\\n\\n".join(rows of the wikitext-2-raw-v1 test split),
    and its source. The first of:

    1. `path` (the user's --eval-text): that file, or EvalDataError;
    2. $PVQ_WIKITEXT2_TEST when set: that file, or EvalDataError;
    3. `datasets.load_dataset` (its local cache, then the hub when online; bounded, see
       `wikitext2_rows_from_datasets`), when `use_datasets`;
    4. ../shared/assets/wikitext-2/raw/wiki.test.raw beside the source checkout.

    The file route yields the same rows as the datasets one (`wikitext2_test_rows`)."""
    if path is not None:
        return EvalText(wikitext2_test_text_from_file(path), "file", Path(path))
    env = os.environ.get(WIKITEXT2_TEST_ENV)
    if env:
        return EvalText(wikitext2_test_text_from_file(env), "file", Path(env))
    tried = []
    if use_datasets:
        try:
            rows, source = wikitext2_rows_from_datasets()
            return EvalText("\n\n".join(rows), source)
        except EvalDataError as e:
            tried.append(str(e))
    shared = shared_wikitext2_test_path()
    if shared.is_file():
        return EvalText(wikitext2_test_text_from_file(shared), "file", shared)
    tried.append(f"no file at {shared}")
    raise EvalDataError(f"WikiText-2 test text not found: {'; '.join(tried)} (give the path of wikitext-2-raw-v1's "
                        f"wiki.test.raw, or set ${WIKITEXT2_TEST_ENV})")


def wikitext2_test_text_from_file(path: str | os.PathLike) -> str:
    """"\\n\\n".join(wikitext2_test_rows(path))."""
    return "\n\n".join(wikitext2_test_rows(path))


def wikitext2_test_text(path: str | os.PathLike | None = None) -> str:
    """The customary evaluation text (see `wikitext2_test` for where it comes from)."""
    return wikitext2_test(path).text


def _token_ids(tokenizer_or_ids, text: str | None) -> torch.Tensor:
    if isinstance(tokenizer_or_ids, torch.Tensor) or hasattr(tokenizer_or_ids, "__array__") or isinstance(tokenizer_or_ids, list):
        ids = torch.as_tensor(tokenizer_or_ids, dtype=torch.long)
        return ids.reshape(-1) if ids.ndim <= 1 or ids.shape[0] == 1 else ids
    from pvq.models.loading import encode_text

    return encode_text(tokenizer_or_ids, text if text is not None else wikitext2_test_text())


def token_windows(ids: torch.Tensor, seqlen: int, max_windows: int | None) -> torch.Tensor:
    """The first `max_windows` (all: None) non-overlapping windows of `seqlen` tokens of 1-D
    ids, as (n, seqlen); 2-D ids are taken as windows already."""
    return _windows(ids, seqlen, max_windows)


def _windows(ids: torch.Tensor, seqlen: int, max_windows: int | None) -> torch.Tensor:
    if ids.ndim == 2:  # already windows
        w = ids
    else:
        n = ids.numel() // seqlen
        if n == 0:
            raise EvalDataError(f"{ids.numel()} tokens are fewer than one window of {seqlen}")
        w = ids[: n * seqlen].reshape(n, seqlen)
    return w[:max_windows] if max_windows is not None else w


def _device(model) -> torch.device:
    return next(model.parameters()).device


@dataclass
class PerplexityResult:
    ppl: float
    nll: float  # mean negative log-likelihood per predicted token (nats)
    n_windows: int
    seqlen: int
    n_tokens: int  # predicted tokens = n_windows * (seqlen - 1)
    seconds: float


@torch.no_grad()
def perplexity_details(
    model,
    tokenizer_or_ids,
    seqlen: int = 2048,
    max_windows: int | None = None,
    batch_size: int = 1,
    progress: bool = True,
    text: str | None = None,
) -> PerplexityResult:
    """Perplexity over non-overlapping windows; see `perplexity`."""
    ids = _token_ids(tokenizer_or_ids, text)
    windows = _windows(ids, seqlen, max_windows)
    seqlen = windows.shape[1]
    device = _device(model)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    t0 = time.perf_counter()
    from pvq.progress import progress_bar

    try:
        for b0 in progress_bar(range(0, windows.shape[0], batch_size), desc="perplexity", enabled=progress):
            batch = windows[b0 : b0 + batch_size].to(device)
            logits = model(input_ids=batch, use_cache=False).logits
            nll = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1), reduction="sum"
            )
            total += float(nll.double())
            count += batch.shape[0] * (seqlen - 1)
    finally:
        model.train(was_training)
    mean = total / count
    return PerplexityResult(math.exp(mean), mean, windows.shape[0], seqlen, count, time.perf_counter() - t0)


def perplexity(model, tokenizer_or_ids, *args, **kwargs) -> float:
    """exp(mean token NLL) over the first `max_windows` (all if None) non-overlapping
    windows of `seqlen` tokens (the arguments of `perplexity_details`: seqlen=2048,
    max_windows=None, batch_size=1, progress=True, text=None).

    tokenizer_or_ids: a tokenizer (the text is then `text`, by default the WikiText-2 raw
    test text), a 1-D sequence of token ids, or an (n, seqlen) tensor of windows."""
    return perplexity_details(model, tokenizer_or_ids, *args, **kwargs).ppl


@torch.no_grad()
def next_token_agreement(
    float_model,
    quant_model,
    windows,
    seqlen: int | None = None,
    batch_size: int = 1,
    progress: bool = False,
) -> dict[str, float]:
    """How close the quantized model's next-token distributions are to the float model's.

    windows: (n, seqlen) token ids, or 1-D ids cut into windows of `seqlen`.
    Over every predicted position (the last position of a window, which predicts past its
    end, is left out, as in perplexity) returns {"kl": mean KL(float || quant) in nats per
    token, "top1_agreement": fraction of positions where both argmaxes agree,
    "n_tokens": positions compared}."""
    ids = torch.as_tensor(windows, dtype=torch.long)
    if ids.ndim == 1:
        if seqlen is None:
            raise ValueError("1-D token ids need a seqlen")
        ids = _windows(ids, seqlen, None)
    from pvq.progress import progress_bar

    kl_sum, agree, count = 0.0, 0, 0
    modes = (float_model.training, quant_model.training)
    float_model.eval()
    quant_model.eval()
    try:
        for b0 in progress_bar(range(0, ids.shape[0], batch_size), desc="agreement", enabled=progress):
            batch = ids[b0 : b0 + batch_size]
            lp = F.log_softmax(float_model(input_ids=batch.to(_device(float_model)), use_cache=False).logits[:, :-1].float(), -1)
            lq = F.log_softmax(quant_model(input_ids=batch.to(_device(quant_model)), use_cache=False).logits[:, :-1].float(), -1)
            lq = lq.to(lp.device)
            kl_sum += float((lp.exp() * (lp - lq)).sum(-1).double().sum())
            agree += int((lp.argmax(-1) == lq.argmax(-1)).sum())
            count += lp.shape[0] * lp.shape[1]
    finally:
        float_model.train(modes[0])
        quant_model.train(modes[1])
    return {"kl": kl_sum / count, "top1_agreement": agree / count, "n_tokens": count}
