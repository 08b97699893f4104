"""How well do Beta-quantile gains fit the benchmark model's (unrotated) weights?

Run:  python bench/gain_study.py [--group-size 16] [--gain-bits 4]

For a few linear layers of the demo model, the normalised group energies
u = ||w_g||^2 / ||w||^2 are compared with the Beta(D/2, D(G-1)/2) law the paper's gain
quantizer assumes: the share of groups beyond the last quantile threshold (the model
says 1/2^bits) and the relative gain error of Beta-quantile (centroid) gains against
per-layer fitted (empirical, Lloyd-Max) levels at the same bits.
"""

from __future__ import annotations

import argparse

import numpy as np

from pvq.codec import BetaGainQuantizer, empirical_gain_codebook, nearest_level
from pvq.models import load_model

LAYERS = (
    "model.layers.0.self_attn.q_proj",
    "model.layers.5.mlp.down_proj",
    "model.layers.10.self_attn.v_proj",
    "model.layers.20.mlp.gate_proj",
    "model.layers.29.mlp.down_proj",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--group-size", type=int, default=16)
    parser.add_argument("--gain-bits", type=int, default=4)
    args = parser.parse_args()
    model, _, _ = load_model(args.model, checksum=False)
    D, b = args.group_size, args.gain_bits
    print(f"| layer | u beyond last Beta threshold (model: {1 / 2**b:.4f}) | Beta gain rel. error median / p99 / max "
          "| empirical gain rel. error median / p99 / max |")
    print("|---|---|---|---|")
    for name in LAYERS:
        W = model.get_submodule(name).weight.data.double().numpy()
        R, C = W.shape
        G = C // D
        gains = np.linalg.norm(W.reshape(R, G, D), axis=2)
        row_sq = (W**2).sum(axis=1)
        beta = BetaGainQuantizer(D, G, b, "centroid")
        beta_hat = beta.decode(beta.encode(gains, row_sq), row_sq)
        norm = gains / np.sqrt(row_sq)[:, None]
        levels = empirical_gain_codebook(norm, b)
        emp_hat = levels[nearest_level(norm, levels)] * np.sqrt(row_sq)[:, None]
        beyond = np.mean(gains**2 / row_sq[:, None] > beta.thresholds[-1])

        def stats(est):
            rel = np.abs(est - gains) / np.maximum(gains, 1e-12)
            return f"{np.median(rel):.3f} / {np.percentile(rel, 99):.3f} / {rel.max():.2f}"

        print(f"| {name} | {beyond:.3f} | {stats(beta_hat)} | {stats(emp_hat)} |")


if __name__ == "__main__":
    main()
