"""Calibration data: windows of token ids the Hessians H = E[x x^T] are estimated from.

Sources (`calibration_data`): the text file given; else ("auto", the default) WikiText-2
where it can be reached: the wikitext-2-raw-v1 train split from the `datasets` cache, the
WikiText-2 validation text of ../shared/assets beside the source checkout, the train split
from the Hugging Face hub when it answers (bounded probe, `pvq.eval.hub`); else, and with
"sampled", text sampled from the model. Each source is described in one line for the report.

- a text file, tokenized whole, from which `n_windows` non-overlapping windows of
  `seqlen` tokens are drawn at random (seeded): a random offset, then a random choice of
  `n_windows` distinct window slots, in random order;
- the model itself, when no text is given: sequences sampled from the BOS token at
  temperature 1 (plain ancestral sampling, no top-k/top-p), so that a model can be
  quantized with nothing but the model. Costs `n_windows * seqlen` decoding steps of the
  float model, in batches of `batch_size`.
"""

from __future__ import annotations

import inspect
import logging
import os
from pathlib import Path

import torch

from pvq.errors import PVQError
from pvq.fileio import read_utf8
from pvq.models.loading import encode_text, start_token_id  # noqa: F401 - encode_text re-exported

log = logging.getLogger(__name__)


#: the calib_text that asks for text sampled from the model (None: WikiText-2 where reachable, else sampled)
SAMPLED = "sampled"
_SHARED_VALID = Path("assets") / "wikitext-2" / "tokenized" / "valid.txt"


class CalibrationError(PVQError, ValueError):
    """Calibration data that cannot provide the requested windows."""


def windows_from_ids(ids: torch.Tensor, n_windows: int, seqlen: int, seed: int, source: str = "the text") -> torch.Tensor:
    """`n_windows` random non-overlapping windows of `seqlen` tokens from a 1-D id tensor."""
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    if n_windows < 1 or seqlen < 1:
        raise CalibrationError(f"need n_windows >= 1 and seqlen >= 1, got {n_windows} and {seqlen}")
    n_tokens = ids.numel()
    needed = n_windows * seqlen
    if needed > n_tokens:
        raise CalibrationError(
            f"{source} has {n_tokens} tokens, too few for {n_windows} non-overlapping windows of {seqlen} tokens "
            f"({needed} tokens asked for); use fewer or shorter windows, or a longer text"
        )
    g = torch.Generator().manual_seed(int(seed))
    offset = int(torch.randint(0, min(seqlen, n_tokens - needed + 1), (1,), generator=g))
    slots = (n_tokens - offset) // seqlen
    chosen = torch.randperm(slots, generator=g)[:n_windows]
    starts = offset + chosen * seqlen
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])


def _bos_id(tokenizer, model) -> int:
    token = start_token_id(tokenizer, model)
    if token is None:
        raise CalibrationError("neither the tokenizer nor the model config defines a BOS (or EOS) token to sample from")
    return token


@torch.no_grad()
def sample_windows(
    model,
    n_windows: int,
    seqlen: int,
    seed: int,
    start_token: int,
    batch_size: int = 16,
    temperature: float = 1.0,
    progress: bool = True,
) -> torch.Tensor:
    """`n_windows` sequences of `seqlen` tokens sampled from the model, each starting with
    `start_token` (seeded; the result depends on seed and batch_size)."""
    if n_windows < 1 or seqlen < 1:
        raise CalibrationError(f"need n_windows >= 1 and seqlen >= 1, got {n_windows} and {seqlen}")
    device = next(model.parameters()).device
    g = torch.Generator(device=device).manual_seed(int(seed))
    was_training = model.training
    model.eval()
    out_batches = []
    from pvq.progress import progress_bar

    bar = progress_bar(total=n_windows * (seqlen - 1), desc="sampling calibration text", unit="tok", unit_scale=True,
                       enabled=progress)
    # the KV cache argument: `cache` from transformers 5.x, `past_key_values` before
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    try:
        for b0 in range(0, n_windows, batch_size):
            b = min(batch_size, n_windows - b0)
            ids = torch.full((b, seqlen), start_token, dtype=torch.long, device=device)
            step_input, past = ids[:, :1], None
            for t in range(1, seqlen):
                bar.update(b)
                out = model(input_ids=step_input, use_cache=True, **{cache_arg: past})
                past = out["cache"] if "cache" in out else out["past_key_values"]
                logits = out.logits[:, -1, :].float()
                probs = torch.softmax(logits / temperature, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=g)
                ids[:, t] = nxt[:, 0]
                step_input = nxt
            out_batches.append(ids.cpu())
            log.info("sampled calibration windows %d-%d of %d", b0 + 1, b0 + b, n_windows)
    finally:
        bar.close()
        model.train(was_training)
    return torch.cat(out_batches)


def calibration_windows(
    tokenizer,
    text_path: str | os.PathLike | None,
    n_windows: int,
    seqlen: int,
    seed: int,
    model=None,
    batch_size: int = 16,
    progress: bool = True,
) -> torch.Tensor:
    """(n_windows, seqlen) int64 token ids for calibration.

    From `text_path` when given (random non-overlapping windows of the tokenized file),
    otherwise sampled from `model` starting at the BOS token (see `sample_windows`)."""
    if text_path is not None:
        path = Path(text_path)
        text = read_utf8(path, CalibrationError, "calibration text")
        ids = encode_text(tokenizer, text)
        return windows_from_ids(ids, n_windows, seqlen, seed, source=f"calibration text {path}")
    if model is None:
        raise CalibrationError("calibration_windows needs a text file or a model to sample calibration text from")
    return sample_windows(model, n_windows, seqlen, seed, _bos_id(tokenizer, model), batch_size=batch_size,
                          progress=progress)


def _wikitext2_text() -> tuple[str, str] | None:
    """(text, description) of the first WikiText-2 calibration text that can be reached
    without waiting on a network (see the module docstring), else None."""
    from pvq.eval.perplexity import EvalDataError, shared_asset, wikitext2_rows_from_datasets

    tried = []
    try:
        rows, where = wikitext2_rows_from_datasets(hub=False, split="train")
        return "\n\n".join(rows), f"WikiText-2 train ({where})"
    except EvalDataError as e:
        tried.append(str(e))
    shared = shared_asset(_SHARED_VALID)
    if shared.is_file():
        return read_utf8(shared, CalibrationError, "calibration text"), f"WikiText-2 validation (file {shared})"
    try:
        rows, where = wikitext2_rows_from_datasets(hub=True, split="train")
        return "\n\n".join(rows), f"WikiText-2 train ({where})"
    except EvalDataError as e:
        tried.append(str(e))
    log.info("no WikiText-2 calibration text reachable (%s); sampling from the model", "; ".join(tried))
    return None


def calibration_data(tokenizer, text_path: str | os.PathLike | None, n_windows: int, seqlen: int, seed: int,
                     model=None, batch_size: int = 16, progress: bool = True) -> tuple[torch.Tensor, str]:
    """(windows (n_windows, seqlen) int64, where they came from in one line): from
    `text_path` when it is a file path, from WikiText-2 where reachable when it is None
    (needs a tokenizer), else (or with SAMPLED) sampled from `model`."""
    if text_path is not None and str(text_path) != SAMPLED:
        return (calibration_windows(tokenizer, text_path, n_windows, seqlen, seed, progress=progress),
                f"calibration text file {text_path}")
    if text_path is None and tokenizer is not None:
        found = _wikitext2_text()
        if found is not None:
            text, where = found
            ids = encode_text(tokenizer, text)
            return windows_from_ids(ids, n_windows, seqlen, seed, source=where), where
    why = "as asked (--calib-text sampled)" if text_path is not None else "no WikiText-2 text was reachable"
    if model is None:
        raise CalibrationError(f"no calibration text: {why}, and there is no whole model to sample text from (a "
                               "streamed model needs --calib-text FILE)")
    return (calibration_windows(tokenizer, None, n_windows, seqlen, seed, model=model, batch_size=batch_size,
                                progress=progress), f"sampled from the model, seeded ({why})")
