"""Quality and speed of the PVQ shape search methods (pvq.codec.search).

Run:  python bench/search_quality.py [--quick] [--seed 0]

Data: i.i.d. standard Gaussian vectors (seeded). Prints two markdown tables:

(a) Optimum found: for small (D, K) where the exhaustive search is cheap, the fraction
    of vectors for which each method reaches the brute-force optimum, i.e. its cosine
    is >= the brute-force cosine - 1e-12.

Methods: paper (Algorithm 1), greedy (Opus), refined (the default: greedy + local
search) and refined/p (search_refined(start="paper"): the same local search started
from the paper's point).

(b) Shape SNR and speed at 3 bits/weight: for D in {8, ..., 128}, K is the largest
    pulse count with log2 N(D, K) <= 3 D.  With u = p / ||p|| the best gain for a
    vector x is g = <x, u> and the error is ||x - g u||^2 = ||x||^2 (1 - cos^2);
    the shape SNR is

        SNR_dB = 10 log10( sum_x ||x||^2 / sum_x ||x||^2 (1 - cos^2(x, p)) )

    (ratio of means over vectors, not a mean of per-vector dB).  Time is wall time
    per million weights of one call on the whole batch (single-threaded numba
    kernels, compiled beforehand), best of --repeats runs.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

try:
    import pvq  # noqa: F401
except ImportError:  # running from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from pvq.codec.counts import pulses_for_bits, pyramid_count  # noqa: E402
from pvq.codec.search import (  # noqa: E402
    BRUTE_FORCE_MAX_POINTS,
    brute_force_search,
    search,
    search_refined,
)

# label -> callable(x, K); "refined/p" is search_refined(start="paper") (not the default)
METHODS = {
    "paper": lambda x, K: search(x, K, "paper"),
    "greedy": lambda x, K: search(x, K, "greedy"),
    "refined": lambda x, K: search(x, K, "refined"),
    "refined/p": lambda x, K: search_refined(x, K, start="paper"),
}


def cosines(x: np.ndarray, p: np.ndarray) -> np.ndarray:
    p = p.astype(np.float64)
    return (x * p).sum(axis=1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(p, axis=1))


def shape_snr_db(x: np.ndarray, p: np.ndarray) -> float:
    n2 = (x * x).sum(axis=1)
    c = cosines(x, p)
    return 10.0 * math.log10(n2.sum() / (n2 * (1.0 - c * c)).sum())


def table_optimum(args) -> None:
    rng = np.random.default_rng(args.seed)
    n = 400 if args.quick else 10000
    dims = (4, 6, 8) if args.quick else (4, 6, 8, 12, 16)
    print(f"### (a) Fraction of vectors where each method finds the optimum ({n} Gaussian vectors per row)\n")
    print("| D | K | N(D,K) | " + " | ".join(METHODS) + " |")
    print("|---:|---:|---:|" + "---:|" * len(METHODS))
    for D in dims:
        for K in (2, 4, 6, 8):
            if pyramid_count(D, K) > BRUTE_FORCE_MAX_POINTS:
                continue
            x = rng.standard_normal((n, D))
            cb = cosines(x, brute_force_search(x, K))
            fr = [np.mean(cosines(x, f(x, K)) >= cb - 1e-12) for f in METHODS.values()]
            print(f"| {D} | {K} | {pyramid_count(D, K)} | " + " | ".join(f"{f:.4f}" for f in fr) + " |")
    print()


def table_snr(args) -> None:
    rng = np.random.default_rng(args.seed + 1)
    weights = 1 << (16 if args.quick else 20)
    repeats = args.repeats
    print(f"### (b) Shape SNR (dB) and time (ms per 10^6 weights) at 3 bits/weight ({weights} Gaussian weights per D)\n")
    print(
        "| D | K | bits/weight | "
        + " | ".join(f"SNR {m}" for m in METHODS)
        + " | "
        + " | ".join(f"ms/Mw {m}" for m in METHODS)
        + " |"
    )
    print("|---:|---:|---:|" + "---:|" * (2 * len(METHODS)))
    for D in (8, 16, 32, 64, 128):
        K = pulses_for_bits(D, 3)
        bits = math.log2(pyramid_count(D, K)) / D
        x = rng.standard_normal((weights // D, D))
        snr, ms = [], []
        for f in METHODS.values():
            f(x[:4], K)  # compile / load the cached kernels
            best = float("inf")
            for _ in range(repeats):
                t0 = time.perf_counter()
                p = f(x, K)
                best = min(best, time.perf_counter() - t0)
            snr.append(shape_snr_db(x, p))
            ms.append(best / x.size * 1e9)  # seconds per weight -> ms per 1e6 weights
        print(
            f"| {D} | {K} | {bits:.3f} | "
            + " | ".join(f"{s:.3f}" for s in snr)
            + " | "
            + " | ".join(f"{t:.1f}" for t in ms)
            + " |"
        )
    print()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer vectors and dimensions")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3, help="timing repeats (best of)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    table_optimum(args)
    table_snr(args)
    print(f"_total bench time {time.perf_counter() - t0:.1f} s_")


if __name__ == "__main__":
    main()
