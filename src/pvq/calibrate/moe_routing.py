"""Mixture-of-experts calibration: experts the router sends too few calibration tokens to
are given Hessians from tokens routed to them by force (the block re-run with a forced
router), so that every expert is quantized with its own curvature."""

from __future__ import annotations

import logging

import torch
from torch import nn
from pvq.calibrate.capture import HessianAccumulator, run_block

log = logging.getLogger(__name__)


def _expert_index(adapter, lin: str) -> int | None:
    """The expert index of a block-relative linear name ("mlp.experts.5.down_proj" -> 5)."""
    prefix = adapter.moe.experts + "." if adapter.moe is not None else None
    return int(lin[len(prefix):].split(".")[0]) if prefix and lin.startswith(prefix) else None


def _force_routed(adapter, experts, group, tokens: dict[str, int]) -> dict[str, int]:
    """The group's expert linears whose expert was routed fewer calibration tokens than the
    widest input of its linears (the hidden size or the expert width: below it a Hessian is
    rank-deficient): {linear: expert index}."""
    if experts is None:
        return {}
    threshold = max(experts[0].gate_up_proj.in_features, experts[0].down_proj.in_features)
    out = {}
    for lin in group:
        e = _expert_index(adapter, lin)
        if e is not None and tokens[lin] < threshold:
            out[lin] = e
    if out:
        log.info("%d expert layer(s) routed fewer than %d calibration tokens: force-routed for their Hessians",
                 len(out), threshold)
    return out


def _forced_hessians(block, experts, forced: dict[str, int], modules: dict[str, nn.Module], hidden, kwargs_list,
                     batch_size, device, w=None, n_batches=0) -> dict[str, torch.Tensor]:
    """Hessians of the force-routed experts' linears from every token entering the block (the
    block's output still adds only the router's choices)."""
    experts.forced = frozenset(forced.values())
    try:
        with HessianAccumulator(modules, stop_early=False, world=w, n_batches=n_batches) as acc:
            run_block(block, hidden, kwargs_list, batch_size, device, on_batch_start=acc.new_pass, collect=False)
        acc.finish()
        return acc.hessians()
    finally:
        experts.forced = frozenset()


