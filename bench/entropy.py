"""How much would entropy coding save over PVQ's fixed-rate codes? (issue 30: measure first)

PVQ stores each shape as a fixed-width code of ceil(log2 N(D, K)) bits and each gain index
at gain_bits. An entropy coder could store them in fewer bits when their distribution is
not uniform. This script estimates the bits it could reach, without building the coder:

- shapes: each pyramid point is coded coordinate by coordinate. |p_i| is coded given the
  context (coordinates left, pulses left), the sign of a non-zero p_i takes 1 bit, and the
  last magnitude is implied. The estimate is the empirical conditional entropy of the
  magnitudes under one static model fitted to all the data. That is what a static
  arithmetic or rANS coder reaches with that model stored; the model's own size is counted,
  at 32 bits per (context, magnitude) cell seen.
- gain indices: the order-0 empirical entropy per layer, plus 32 bits per level.

Sources: a checkpoint's PVQ layers (`--checkpoint DIR`), and/or iid Gaussian rows
(`--gaussian`, the source of `pvq snr`). For the Gaussian source it also reports the SNR
at equal stored bits: the fixed-rate K against the larger K an entropy coder could afford.

    python bench/entropy.py --checkpoint pvq-out --gaussian
"""

from __future__ import annotations

import argparse
import math
from collections import Counter
from pathlib import Path

import numpy as np


def _entropy_bits(counts: Counter) -> float:
    """Total ideal code length (bits) of the symbols counted, under their empirical distribution."""
    n = sum(counts.values())
    return -sum(c * math.log2(c / n) for c in counts.values() if c)


def shape_contexts(points: np.ndarray, K: int) -> tuple[dict, int]:
    """({(coordinates left, pulses left): Counter of magnitudes}, sign bits) of (n, D) int points."""
    n, D = points.shape
    mags = np.abs(points).astype(np.int64)
    left = K - np.concatenate([np.zeros((n, 1), np.int64), np.cumsum(mags, axis=1)[:, :-1]], axis=1)
    contexts: dict[tuple[int, int], Counter] = {}
    for i in range(D - 1):  # the last magnitude is what is left
        keys = left[:, i] * (K + 1) + mags[:, i]
        values, counts = np.unique(keys, return_counts=True)
        for key, c in zip(values.tolist(), counts.tolist()):
            contexts.setdefault((D - i, key // (K + 1)), Counter())[key % (K + 1)] += c
    return contexts, int(np.count_nonzero(points))


def contexts_bits(contexts: dict) -> tuple[float, int]:
    """(ideal code length in bits under the empirical model, cells of that model)."""
    return sum(_entropy_bits(c) for c in contexts.values()), sum(len(c) for c in contexts.values())


def merge(into: dict, contexts: dict) -> None:
    for key, counts in contexts.items():
        into.setdefault(key, Counter()).update(counts)


def shape_bits(points: np.ndarray, K: int) -> tuple[float, int]:
    """(estimated entropy-coded bits of all points without the model, model cells)."""
    contexts, signs = shape_contexts(points, K)
    bits, cells = contexts_bits(contexts)
    return bits + signs, cells


def gain_bits_entropy(indices: np.ndarray, levels: int) -> float:
    return _entropy_bits(Counter(indices.tolist())) + 32 * levels


def pvq_layers(path: str):
    """(name, QuantizedTensor) of every PVQ layer of a checkpoint directory, or of a
    `pvq quantize` work directory (its finished blocks: the one-shot codes, which fine-tuning
    keeps unless code updates moved some)."""
    from pvq.calibrate import workdir as wd

    if (Path(path) / wd.STATE_FILE).is_file():
        state = wd.read_state(Path(path))
        done = int(state.get("blocks_done", 0)) if state else 0
        if not done:
            raise SystemExit(f"{path}: a work directory with no finished block")
        for i in range(done):  # the blocks its state file lists as finished, nothing half-written
            layers, _ = wd.load_block(Path(path), i)
            yield from ((name, qt) for name, qt in layers.items() if qt.method == "pvq")
        return
    import pvq
    from pvq.runtime import QuantizedLinear

    model, _, _ = pvq.load(path, load_tokenizer=False, check_decode=False)
    for name, layer in model.named_modules():
        if isinstance(layer, QuantizedLinear) and layer.method == "pvq":
            yield name, layer.quantized_tensor()


def checkpoint_rows(path: str) -> tuple[list[dict], dict]:
    from pvq.codec import unpack_codes
    from pvq.codec.counts import pyramid_count as pvq_count
    from pvq.methods.pvq import _points

    rows, shared = [], {}
    for name, qt in pvq_layers(path):
        meta, R = qt.meta, qt.shape[0]
        D, G, K, nbits = (int(meta[k]) for k in ("group_size", "num_groups", "pulses", "code_bits"))
        points = _points(qt)
        contexts, signs = shape_contexts(points, K)
        merge(shared.setdefault((D, K), {}), contexts)
        s_bits, cells = contexts_bits(contexts)
        s_bits += signs
        row = {"name": name, "groups": R * G, "D": D, "K": K, "code_bits": nbits, "stored_bytes": qt.stored_bytes,
               "shape_entropy": s_bits + 32 * cells, "shape_ideal": s_bits, "signs": signs, "shape_fixed": R * G * nbits,
               "shape_uniform": R * G * math.log2(int(pvq_count(D, K)))}
        if meta["gain"] in ("beta", "empirical"):
            gb = int(meta["gain_bits"])
            idx = np.asarray(unpack_codes(qt.tensors["gain_indices"], R * G, gb)).reshape(R * G, -1)[:, 0]
            row["gain_entropy"] = gain_bits_entropy(idx, 1 << gb)
            row["gain_fixed"] = R * G * gb
        rows.append(row)
    return rows, shared


def report_checkpoint(path: str) -> None:
    rows, shared = checkpoint_rows(path)
    if not rows:
        print(f"{path}: no PVQ layer")
        return
    weights = sum(r["groups"] * r["D"] for r in rows)
    stored = sum(r["stored_bytes"] for r in rows) * 8
    sf, se = sum(r["shape_fixed"] for r in rows), sum(r["shape_entropy"] for r in rows)
    gf, ge = sum(r.get("gain_fixed", 0) for r in rows), sum(r.get("gain_entropy", 0) for r in rows)
    print(f"\n{path}: {len(rows)} PVQ layers, {weights} weights, {stored / weights:.4f} stored bits/weight")
    su = sum(r["shape_uniform"] for r in rows)
    print("| part | fixed-rate bits/weight | log2 N (joint packing, no model) | entropy-coded estimate (model included) | saved vs fixed |")
    print("|---|---|---|---|---|")
    print(f"| shapes, one model per layer (D={rows[0]['D']}, K={rows[0]['K']}) | {sf / weights:.4f} | {su / weights:.4f} | {se / weights:.4f} | "
          f"{(sf - se) / sf:.2%} |")
    if gf:
        print(f"| gain indices | {gf / weights:.4f} | {gf / weights:.4f} | {ge / weights:.4f} | {(gf - ge) / gf:.2%} |")
    si = sum(r["shape_ideal"] for r in rows)
    model_cells = 0
    shared_bits = sum(r["signs"] for r in rows)
    for contexts in shared.values():
        b, c = contexts_bits(contexts)
        shared_bits += b
        model_cells += c
    shared_bits += 32 * model_cells
    print(f"| shapes, one model for the whole checkpoint | {sf / weights:.4f} | {su / weights:.4f} | "
          f"{shared_bits / weights:.4f} | {(sf - shared_bits) / sf:.2%} |")
    print(f"| shapes, per-layer models, model cost left out (a lower bound) | {sf / weights:.4f} | {su / weights:.4f} | "
          f"{si / weights:.4f} | {(sf - si) / sf:.2%} |")
    se = min(se, shared_bits)
    saved = (sf - se) + (gf - ge)
    print(f"| all stored bytes of the PVQ layers (best shape model above, gains entropy coded) | {stored / weights:.4f} | - | "
          f"{(stored - saved) / weights:.4f} | {saved / stored:.2%} |")
    print(f"keep entropy coding (issue 30's rule, >= 3% of the quantized layers' bytes): {'yes' if saved / stored >= 0.03 else 'no'}")


def report_gaussian(D: int, samples: int, seed: int, rates: tuple[float, ...]) -> None:
    from pvq.codec import code_bits, pulses_for_bits, search
    from pvq.eval.snr import BETA_GAIN_BITS, pvq_quantize_rows, snr_db

    rng = np.random.default_rng(seed)
    L = 256
    rows = rng.standard_normal((samples // L, L))
    groups = rows.reshape(-1, D)
    gain_rate = BETA_GAIN_BITS / D
    print(f"\niid Gaussian source: {groups.shape[0]} vectors of D = {D}, seed {seed}; gains: {BETA_GAIN_BITS}-bit Beta "
          f"quantiles ({gain_rate:.3f} bits/value, equiprobable by construction: not entropy coded)")
    from pvq.codec.counts import pyramid_count as pvq_count

    print("| K | fixed-rate shape bits/value | log2 N / D | entropy-coded estimate (model included) | saved vs fixed |")
    print("|---|---|---|---|---|")
    est: dict[int, float] = {}

    def estimate(K: int) -> float:
        """Entropy-coded shape bits per value at K (model included), computed once."""
        if K not in est:
            bits, cells = shape_bits(search(groups, K), K)
            est[K] = (bits + 32 * cells) / groups.size
        return est[K]

    Ks = sorted({pulses_for_bits(D, b) for b in np.arange(1.0, max(rates) + 1.01, 0.25)})
    for K in Ks:
        fixed = code_bits(D, K) / D
        print(f"| {K} | {fixed:.4f} | {math.log2(int(pvq_count(D, K))) / D:.4f} | {estimate(K):.4f} | "
              f"{(fixed - estimate(K)) / fixed:.2%} |")

    print("\nSNR at equal stored bits per value (shape + gain), every K considered:")
    print("| bits/value | fixed-rate K | SNR dB | entropy-coded K | SNR dB | Shannon bound dB |")
    print("|---|---|---|---|---|---|")
    for r in rates:
        fixed_k = max(K for K in range(1, 400) if code_bits(D, K) / D + gain_rate <= r)
        coded_k = fixed_k
        while estimate(coded_k + 1) + gain_rate <= r:
            coded_k += 1
        snr = {K: snr_db(rows, pvq_quantize_rows(rows, D, K, gain="beta")) for K in {fixed_k, coded_k}}
        print(f"| {r:.2f} | {fixed_k} | {snr[fixed_k]:.2f} | {coded_k} | {snr[coded_k]:.2f} | {6.0206 * r:.2f} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", help="a pvq checkpoint directory, or a `pvq quantize` work directory (its PVQ "
                                         "layers are measured)")
    ap.add_argument("--gaussian", action="store_true", help="also measure an iid Gaussian source")
    ap.add_argument("--dim", type=int, default=16, help="Gaussian source: D")
    ap.add_argument("--samples", type=int, default=1 << 22, help="Gaussian source: values")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rates", default="2.25,3.25,4.25", help="Gaussian source: bits per value for the SNR table")
    args = ap.parse_args(argv)
    if args.checkpoint:
        report_checkpoint(args.checkpoint)
    if args.gaussian:
        report_gaussian(args.dim, args.samples, args.seed, tuple(float(r) for r in args.rates.split(",")))
    if not (args.checkpoint or args.gaussian):
        ap.error("give --checkpoint DIR and/or --gaussian")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
