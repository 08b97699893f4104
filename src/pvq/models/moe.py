"""Mixture-of-experts blocks as one linear layer per expert, so each expert is quantized
(and stored) like any other linear.

transformers keeps a block's experts fused: two 3-D parameters, `gate_up_proj` (E, 2I, H)
and `down_proj` (E, H, I), dispatched by an "experts implementation". `unfuse_experts`
replaces that module with `UnfusedExperts`: expert e is `experts.{e}.gate_up_proj`
(nn.Linear H -> 2I, gate rows then up rows, as transformers stores them) and
`experts.{e}.down_proj`, viewing the fused weights (no copy). Its forward is transformers'
eager expert loop, the same operations in the same order. The router (`mlp.gate`) is not
touched and stays float.

Calibration: an expert sees only the tokens its router sends it (the pipeline counts them
per expert). An expert routed fewer tokens than the hidden size (below it its Hessian is
rank-deficient) is *force-routed* for its Hessian: with its index in `forced` it is run on
every token entering the block, while the block's output still adds only the experts the
router chose, with the router's weights.
"""

from __future__ import annotations

import torch
from torch import nn


class ExpertMLP(nn.Module):
    """One expert: down_proj(act(gate) * up) with gate, up = chunks of gate_up_proj(x)."""

    def __init__(self, hidden: int, intermediate: int, act_fn: nn.Module, *, dtype=None, device=None):
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden, 2 * intermediate, bias=False, dtype=dtype, device=device)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False, dtype=dtype, device=device)
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act_fn(gate) * up)


class UnfusedExperts(nn.ModuleList):
    """A block's experts, one `ExpertMLP` each (see the module docstring)."""

    def __init__(self, experts: list[ExpertMLP]):
        super().__init__(experts)
        self.forced: frozenset[int] = frozenset()  # run on every token (calibration only)

    @property
    def num_experts(self) -> int:
        return len(self)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        final = torch.zeros_like(hidden_states)
        with torch.no_grad():
            mask = nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        order = [int(e) for e in hit[:, 0]]
        if self.forced:
            order = sorted(set(order) | self.forced)
        for e in order:
            if e == self.num_experts:
                continue
            top_k_pos, token_idx = torch.where(mask[e])
            if e in self.forced:
                out = self[e](hidden_states)[token_idx]  # every token's activations feed the Hessians
            else:
                out = self[e](hidden_states[token_idx])
            out = out * top_k_weights[token_idx, top_k_pos, None]
            final.index_add_(0, token_idx, out.to(final.dtype))
        return final


def _is_fused(module: nn.Module) -> bool:
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor) and gate_up.ndim == 3 and down.ndim == 3


def unfuse(fused: nn.Module) -> UnfusedExperts:
    """The `UnfusedExperts` of transformers' fused experts module; its weights are views of
    the fused ones (on the meta device: empty)."""
    gate_up, down = fused.gate_up_proj, fused.down_proj
    n, two_i, hidden = gate_up.shape
    if down.shape != (n, hidden, two_i // 2) or two_i % 2:
        raise ValueError(f"fused experts of shapes {tuple(gate_up.shape)} / {tuple(down.shape)} are not "
                         "(E, 2I, H) / (E, H, I)")
    experts = []
    for e in range(n):
        expert = ExpertMLP(hidden, two_i // 2, fused.act_fn, dtype=gate_up.dtype, device="meta")
        expert.gate_up_proj.weight = nn.Parameter(gate_up.data[e], requires_grad=False)
        expert.down_proj.weight = nn.Parameter(down.data[e], requires_grad=False)
        experts.append(expert)
    return UnfusedExperts(experts)


def unfuse_experts(model: nn.Module, blocks: nn.ModuleList, experts_path: str) -> int:
    """Replace every block's fused experts at `experts_path` (e.g. "mlp.experts") with
    `UnfusedExperts`, in place; idempotent. Returns how many blocks were changed."""
    changed = 0
    for block in blocks:
        parent_path, _, attr = experts_path.rpartition(".")
        try:
            parent = block.get_submodule(parent_path) if parent_path else block
        except AttributeError:
            continue
        module = getattr(parent, attr, None)
        if isinstance(module, nn.Module) and not isinstance(module, UnfusedExperts) and _is_fused(module):
            setattr(parent, attr, unfuse(module))
            changed += 1
    return changed


def num_experts(block: nn.Module, experts_path: str) -> int | None:
    """How many experts a block has at `experts_path` (None: a dense block)."""
    try:
        module = block.get_submodule(experts_path)
    except AttributeError:
        return None
    if isinstance(module, UnfusedExperts):
        return len(module)
    return int(module.gate_up_proj.shape[0]) if _is_fused(module) else None
