"""What a kernel is: a name, what it serves (`supports(layer, x)`) and its forward; and the
one warning a layout a kernel family does not take gives."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch


if TYPE_CHECKING:
    from pvq.runtime.linear import QuantizedLinear


@dataclass(frozen=True)
class Kernel:
    """`differentiable`: a backward pass through its output reaches x (and the weight it
    built) correctly; kernels that decode into a reused workspace or run outside autograd
    are not, and are skipped while a gradient must reach x (`needs_grad`)."""

    name: str
    supports: Callable[[QuantizedLinear, torch.Tensor], bool]
    forward: Callable[[QuantizedLinear, torch.Tensor], torch.Tensor]
    differentiable: bool = False


def needs_grad(x: torch.Tensor) -> bool:
    """Whether autograd will take a gradient through this call's input."""
    return x.requires_grad and torch.is_grad_enabled()


def _rows(x: torch.Tensor) -> int:
    return x.numel() // max(1, x.shape[-1])


_WARNED: set[str] = set()


def _served(refusal: str | None, kernels: str) -> bool:
    """True when `refusal` is None; else warn once per reason (the reference decode runs)."""
    if refusal is None:
        return True
    if refusal not in _WARNED:
        _WARNED.add(refusal)
        warnings.warn(f"pvq: {kernels} do not serve layers with {refusal}; using the slower reference decode",
                      stacklevel=5)
    return False
