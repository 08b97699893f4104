"""The float reference of a streamed job, evaluated without ever holding the float model.

`streamed_reference(stream, windows)` runs the evaluation windows through the float model
one decoder block at a time, reading each block from the shards (the pipeline's own
`capture_block_inputs` / `run_block`). It returns `ReferenceLogits`, which computes the
float logits of any batch of those windows through the model's own forward: its decoder
blocks are replaced for that call by stand-ins that return the stored final hidden states.
So everything after the blocks (final norm, head, Gemma's soft-capping) is the model's own
code. Only the windows' final hidden states are held: n x seqlen x hidden float32.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pvq.calibrate.capture import capture_block_inputs, run_block


class _Given(nn.Module):
    """Stands in for a decoder block: the first returns the hidden states it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.value: torch.Tensor | None = None

    def forward(self, hidden_states, *args, **kwargs):
        return self.value if self.value is not None else hidden_states


class ReferenceLogits:
    """Float logits of the streamed windows, batch by batch (see the module docstring)."""

    def __init__(self, stream: Any, windows: torch.Tensor, final_hidden: torch.Tensor):
        self.stream, self.windows, self.final_hidden = stream, windows, final_hidden

    @torch.no_grad()
    def logits(self, b0: int, b1: int) -> torch.Tensor:
        model, adapter = self.stream.model, self.stream.adapter
        parent_path, _, attr = adapter.blocks.rpartition(".")
        parent = model.get_submodule(parent_path)
        blocks = getattr(parent, attr)
        stand_ins = nn.ModuleList(_Given() for _ in blocks)
        stand_ins[0].value = self.final_hidden[b0:b1]
        setattr(parent, attr, stand_ins)
        try:
            return model(input_ids=self.windows[b0:b1], use_cache=False).logits
        finally:
            setattr(parent, attr, blocks)


@torch.no_grad()
def streamed_reference(stream: Any, windows: torch.Tensor, batch_size: int = 4, progress: bool = True) -> ReferenceLogits:
    """Run (n, seqlen) windows through the streamed float model, one block at a time."""
    from pvq.progress import progress_bar

    model, adapter = stream.model, stream.adapter
    blocks = adapter.get_blocks(model)
    hidden, arguments = capture_block_inputs(model, adapter, windows, batch_size, torch.device("cpu"), torch.float32,
                                             stream=stream)
    for i in progress_bar(range(len(blocks)), desc="float reference (streamed)", unit="block", enabled=progress):
        block = stream.load_block(i)
        try:
            hidden = run_block(block, hidden, arguments, batch_size, torch.device("cpu"))
        finally:
            stream.drop_block(i)
    return ReferenceLogits(stream, windows, hidden)


@torch.no_grad()
def streamed_comparison(reference: ReferenceLogits, quantized: nn.Module, agreement_windows: int,
                        batch_size: int = 1) -> dict[str, float]:
    """Perplexity of the float reference and of `quantized` on the reference's windows, and
    KL(float || quantized) and top-1 agreement on the first `agreement_windows` of them (the
    quantities `perplexity_details` and `next_token_agreement` give for in-memory models)."""
    windows = reference.windows
    n, seqlen = windows.shape
    nll_float = nll_quant = kl = 0.0
    agree = compared = 0
    t0 = time.perf_counter()
    for b0 in range(0, n, batch_size):
        b1 = min(n, b0 + batch_size)
        batch = windows[b0:b1]
        lf = reference.logits(b0, b1)[:, :-1].float()
        lq = quantized(input_ids=batch, use_cache=False).logits[:, :-1].float()
        target = batch[:, 1:].reshape(-1)
        nll_float += float(F.cross_entropy(lf.reshape(-1, lf.shape[-1]), target, reduction="sum").double())
        nll_quant += float(F.cross_entropy(lq.reshape(-1, lq.shape[-1]), target, reduction="sum").double())
        keep = max(0, min(b1, agreement_windows) - b0)
        if keep:
            pf, pq = F.log_softmax(lf[:keep], -1), F.log_softmax(lq[:keep], -1)
            kl += float((pf.exp() * (pf - pq)).sum().double())
            agree += int((pf.argmax(-1) == pq.argmax(-1)).sum())
            compared += keep * (seqlen - 1)
    tokens = n * (seqlen - 1)
    return {"ppl_float": math.exp(nll_float / tokens), "ppl_quantized": math.exp(nll_quant / tokens),
            "n_windows": n, "kl": kl / max(compared, 1), "top1_agreement": agree / max(compared, 1),
            "n_tokens": compared, "seconds": time.perf_counter() - t0}
