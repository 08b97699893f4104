"""Synthetic layers for tests and quick comparisons of the quantizers.

`synthetic_layer(rows, columns)` gives a Gaussian weight W and a calibration Hessian
``H = X^T X / n`` whose inputs X have what makes real layers hard: features correlated
through a few shared latent factors plus a random mixing, and a few outlier channels
with a much larger scale. Deterministic in `seed`.
"""

from __future__ import annotations

import torch

__all__ = ["synthetic_layer"]


def synthetic_layer(
    rows: int,
    columns: int,
    *,
    samples: int | None = None,
    seed: int = 0,
    latent: int = 8,
    outliers: int = 4,
    outlier_scale: float = 10.0,
    weight_scale: float = 0.02,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(W (rows, columns) float32, H (columns, columns) float32)."""
    g = torch.Generator().manual_seed(seed)
    n = samples if samples is not None else 2 * columns
    W = torch.randn(rows, columns, generator=g, dtype=torch.float64) * weight_scale
    mix = torch.eye(columns, dtype=torch.float64) + 0.3 * torch.randn(columns, columns, generator=g, dtype=torch.float64) / columns**0.5
    X = torch.randn(n, columns, generator=g, dtype=torch.float64) @ mix
    if latent:
        X += torch.randn(n, latent, generator=g, dtype=torch.float64) @ torch.randn(latent, columns, generator=g, dtype=torch.float64)
    if outliers:
        idx = torch.randperm(columns, generator=g)[:outliers]
        X[:, idx] *= outlier_scale
    H = X.T @ X / n
    return W.float(), H.float()
