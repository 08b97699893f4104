"""Encode/decode throughput of the PVQ codec on one core, against the big-integer reference.

Run:  python bench/codec_throughput.py [--weights 1048576] [--reference-vectors 2000]

For each (D, shape bits) it draws random codes in [0, N(D, K)), decodes them to pyramid
points, encodes them back (checking the round trip), and times both over at least
`--weights` weights with the vectorised numba codec, then times the pure-Python
big-integer reference (paper Algorithms 2 and 3) on a subset in the same run. It also
times the shape search (Gaussian input) per million weights and bit packing. Prints a
markdown table with the ratios; targets are reported, not asserted.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

# One core: pin the process before numba starts its thread pool.
os.environ.setdefault("NUMBA_NUM_THREADS", "1")
if hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})

from pvq.codec.counts import code_bits, count_table, pulses_for_bits, pyramid_count, word_tables  # noqa: E402
from pvq.codec.enumeration import decode, decode_reference, encode, encode_reference, ints_to_words  # noqa: E402
from pvq.codec.packing import pack_codes, unpack_codes  # noqa: E402
from pvq.codec.search import search  # noqa: E402

CASES = [(16, 3.0), (32, 3.5), (128, 3.0), (128, 4.0)]
# Targets from the issue, (D, bits) -> minimum decode weights/s.
DECODE_TARGETS = {(16, 3.0): 10e6, (128, 3.0): 2e6}
MIN_RATIO = 20.0


def best_of(fn, repeats: int) -> float:
    """Minimum wall time of `repeats` calls (seconds)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=int, default=1 << 20, help="weights per timed batch (default 2^20)")
    parser.add_argument("--reference-vectors", type=int, default=2000, help="vectors timed with the big-int reference")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    rows = []
    for D, bits in CASES:
        K = pulses_for_bits(D, bits)
        tables = word_tables(D, K)
        nbits = code_bits(D, K)
        B = -(-args.weights // D)
        N = pyramid_count(D, K)
        ints = [int.from_bytes(rng.bytes(8 * tables.words + 8), "little") % N for _ in range(B)]
        codes = ints_to_words(ints, tables.words)
        points = decode(codes[:8], D, K)  # compile outside the timing
        encode(points, K)

        t_dec = best_of(lambda: decode(codes, D, K), args.repeats)
        points = decode(codes, D, K)
        t_enc = best_of(lambda: encode(points, K), args.repeats)
        if not np.array_equal(encode(points, K), codes):
            raise SystemExit(f"round trip failed for D={D}, bits={bits}")

        stream = pack_codes(codes, nbits)
        t_pack = best_of(lambda: pack_codes(codes, nbits), args.repeats)
        t_unpack = best_of(lambda: unpack_codes(stream, B, nbits), args.repeats)

        x = rng.standard_normal((B, D))
        search(x[:8], K)
        t_search = best_of(lambda: search(x, K), 1)

        nref = min(args.reference_vectors, B)
        table = count_table(D, K)
        ref_points = points[:nref].tolist()
        t0 = time.perf_counter()
        ref_codes = [encode_reference(p, K, table) for p in ref_points]
        t_ref_enc = time.perf_counter() - t0
        t0 = time.perf_counter()
        ref_back = [decode_reference(c, D, K, table) for c in ref_codes]
        t_ref_dec = time.perf_counter() - t0
        if ref_codes != ints[:nref] or ref_back != ref_points:
            raise SystemExit(f"reference disagrees with the vectorised codec for D={D}, bits={bits}")

        w = B * D
        wref = nref * D
        rows.append(
            dict(
                D=D, bits=bits, K=K, code_bits=nbits, words=tables.words, weights=w,
                dec=w / t_dec, enc=w / t_enc, ref_dec=wref / t_ref_dec, ref_enc=wref / t_ref_enc,
                pack=w / t_pack, unpack=w / t_unpack, search_s_per_m=t_search / w * 1e6,
            )
        )

    print(f"PVQ codec throughput, one core, {args.weights} weights per case (best of {args.repeats}); "
          f"reference = pure-Python big integers on {args.reference_vectors} vectors\n")
    print("| D | shape bits | K | code bits | limbs | decode Mw/s | ref decode Mw/s | decode ratio "
          "| encode Mw/s | ref encode Mw/s | encode ratio | pack Mw/s | unpack Mw/s | search s per Mw |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['D']} | {r['bits']:g} | {r['K']} | {r['code_bits']} | {r['words']} "
            f"| {r['dec'] / 1e6:.2f} | {r['ref_dec'] / 1e6:.3f} | {r['dec'] / r['ref_dec']:.0f}x "
            f"| {r['enc'] / 1e6:.2f} | {r['ref_enc'] / 1e6:.3f} | {r['enc'] / r['ref_enc']:.0f}x "
            f"| {r['pack'] / 1e6:.1f} | {r['unpack'] / 1e6:.1f} | {r['search_s_per_m']:.3f} |"
        )
    print("\nTargets (issue): decode >= 10 Mw/s at (16, 3), >= 2 Mw/s at (128, 3), both >= 20x the reference.")
    for r in rows:
        target = DECODE_TARGETS.get((r["D"], r["bits"]))
        if target is None:
            continue
        ok = r["dec"] >= target and r["dec"] / r["ref_dec"] >= MIN_RATIO
        print(f"  ({r['D']}, {r['bits']:g}): decode {r['dec'] / 1e6:.2f} Mw/s, "
              f"{r['dec'] / r['ref_dec']:.0f}x reference -> {'MET' if ok else 'MISSED'}")


if __name__ == "__main__":
    main()
