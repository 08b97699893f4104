"""Histograms of a model's normalised group gains against the Beta law (paper section 3.4,
Theorem 3.1 and Appendix D; `pvq plot gains`).

Each linear weight (out_features x in_features) is read as rows w of length C = G * D,
each cut into G groups of D consecutive input columns (the groups PVQ quantizes). The
normalised gain of group g is ||w_g|| / ||w||, so the squares of a row's G gains sum to 1
(`pvq.codec.normalised_group_gains`). For Gaussian rows the squared normalised gain
u = ||w_g||^2 / ||w||^2 follows Beta(D/2, D(G-1)/2) (`pvq.codec.beta_gain_density`; the
paper prints the second parameter as G(D-1)/2, its own proof gives D(G-1)/2). The paper's
Appendix D compares these histograms after the rotation (`rotate=True`), where the law fits
closely; unrotated weights have heavier tails.

The plot shows u (``quantity="energy"``, the paper's s_g) or the gain g = sqrt(u)
(``quantity="gain"``, density 2 g f_u(g^2)).
"""

from __future__ import annotations

from pvq.errors import PVQError

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from pvq.codec import beta_gain_density, normalised_group_gains
from pvq.models import adapter_for

QUANTITIES = ("energy", "gain")


class GainPlotError(PVQError, ValueError):
    """Settings a gain histogram cannot be made with (the message says which layer/why)."""


@dataclass
class LayerGains:
    name: str
    shape: tuple[int, int]
    group_size: int
    gains: np.ndarray  # (rows, G) normalised gains, squares summing to 1 per row

    @property
    def num_groups(self) -> int:
        return self.gains.shape[1]


def default_gain_layers(model) -> list[str]:
    """A few layers across depth: the first, middle and last decoder block's q_proj,
    o_proj, up_proj and down_proj (those that exist in the adapter)."""
    adapter = adapter_for(model)
    blocks = adapter.get_blocks(model)
    n = len(blocks)
    return [adapter.layer_name(i, lin) for i in dict.fromkeys((0, n // 2, n - 1))
            for lin in adapter.block_linear_names(blocks[i])
            if lin.rsplit(".", 1)[-1] in ("q_proj", "o_proj", "up_proj", "down_proj")]


def layer_gains(model, group_size: int, layers: Sequence[str] | None = None) -> list[LayerGains]:
    """Normalised group gains of the named linear layers (default `default_gain_layers`)."""
    names = list(layers) if layers else default_gain_layers(model)
    out = []
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise GainPlotError(f"model has no layer {name!r}") from None
        weight = getattr(module, "weight", None)
        if weight is None or weight.ndim != 2:
            raise GainPlotError(f"{name} has no 2-D weight")
        C = weight.shape[1]
        if C % group_size or C // group_size < 2:
            divisors = [d for d in range(2, C // 2 + 1) if C % d == 0]
            near = sorted(divisors, key=lambda d: abs(d - group_size))[:2]
            raise GainPlotError(f"{name}: in_features {C} does not split into >= 2 groups of {group_size}"
                                + (f" (nearest group sizes: {', '.join(map(str, sorted(near)))})" if near else ""))
        W = weight.detach().to("cpu").double().numpy()
        out.append(LayerGains(name, tuple(W.shape), group_size, normalised_group_gains(W, group_size)))
    return out


def plot_gain_histograms(gains: Sequence[LayerGains], path: str | Path, quantity: str = "energy",
                         title: str = "", bins: int = 80) -> Path:
    """One panel per layer: histogram (density) of u or g with the Beta-law density."""
    if quantity not in QUANTITIES:
        raise GainPlotError(f"quantity must be one of {QUANTITIES}, got {quantity!r}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(gains)
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    for ax, lg in zip(axes.flat, gains):
        values = (lg.gains**2 if quantity == "energy" else lg.gains).reshape(-1)
        D, G = lg.group_size, lg.num_groups
        # the plotted range: up to the 99.9th percentile of the data or of the law, whichever is wider
        law_hi = math.sqrt(_beta_quantile(D, G, 0.999)) if quantity == "gain" else _beta_quantile(D, G, 0.999)
        hi = max(float(np.quantile(values, 0.999)), law_hi)
        ax.hist(values, bins=bins, range=(0, hi), density=True, alpha=0.6, label="weights")
        x = np.linspace(0, hi, 400)[1:]
        ax.plot(x, beta_gain_density(x, D, G, squared=quantity == "energy"), "r-", lw=1.5,
                label=f"Beta({D / 2:g}, {D * (G - 1) / 2:g})" + ("" if quantity == "energy" else " (as gain)"))
        ax.set_title(f"{lg.name}\n{lg.shape[0]}x{lg.shape[1]}, G={G}", fontsize=8)
        ax.set_xlabel("||w_g||^2 / ||w||^2" if quantity == "energy" else "||w_g|| / ||w||", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def _beta_quantile(D: int, G: int, q: float) -> float:
    from scipy.special import betaincinv

    from pvq.codec import beta_gain_parameters

    a, b = beta_gain_parameters(D, G)
    return float(betaincinv(a, b, q))


__all__ = ["QUANTITIES", "GainPlotError", "LayerGains", "default_gain_layers", "layer_gains", "plot_gain_histograms"]
