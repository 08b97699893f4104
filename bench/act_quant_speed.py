"""Cost of quantizing activations on the fly: PVQ vs round-to-nearest, one core.

Run:  python bench/act_quant_speed.py [--tokens 4096] [--widths 576 1536] [--group-sizes 192 64]

Input: `--tokens` token rows of each width (576 = the benchmark model's hidden size,
1536 = its MLP width), Gaussian values times a log-normal per-token scale (rotated
activations look like this), float32. Timed, best of `--repeats`, on one pinned core:

* rtn fake / rtn encode: symmetric 4-bit round-to-nearest, one float16 scale per group
  (torch; simulated quantization, and the real codes bit-packed with their scales): the
  reference every ratio is taken against, measured in the same run;
* pvq search only: `pvq.codec.search` of all groups (4-bit shapes, the K of D), nothing else;
* pvq fake (paper / greedy / refined search): the simulated quantizer of the forward
  pass (search, float16 least-squares gains, reconstruction), with each search;
* pvq encode: the real encoder (paper search, gains, Fischer enumeration to codes,
  bit packing), i.e. what a low-bit pipeline would have to do per token;
* pvq decode: unpacking, Fischer decoding and reconstruction of those payloads.

Prints a markdown table: tokens/s, values/s, time relative to rtn fake (how many
times slower), SNR of the reconstruction, and bits per value (measured from the payload
where one is made). Nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import time

# One core: pin the process before numba / torch start their thread pools.
os.environ.setdefault("NUMBA_NUM_THREADS", "1")
if hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})

import torch  # noqa: E402

from pvq.codec import search  # noqa: E402
from pvq.activations import (  # noqa: E402
    ActQuantConfig,
    decode_activations,
    encode_activations,
    fake_quantize,
)


def best_of(repeats: int, fn, *args) -> tuple[float, object]:
    """(minimum wall time of `repeats` calls fn(*args), the last result)."""
    out, times = None, []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn(*args)
        times.append(time.perf_counter() - t0)
    return min(times), out


def snr_db(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double(), y.double()
    return float(10 * torch.log10(x.pow(2).sum() / (x - y).pow(2).sum()))


def activations(tokens: int, width: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scale = torch.exp(torch.randn(tokens, 1, generator=g) * 0.5)
    return (torch.randn(tokens, width, generator=g) * scale).float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--widths", type=int, nargs="+", default=[576, 1536])
    parser.add_argument("--group-sizes", type=int, nargs="+", default=[192, 64])
    parser.add_argument("--bits", type=float, default=4.0, help="rtn code bits and pvq shape bits (default 4)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)

    print(f"one core (pinned), {args.tokens} tokens per width, float32 activations, best of {args.repeats}")
    print("\n| width | D | quantizer | tokens/s | Mvalues/s | time vs rtn fake | SNR dB | bits/value |")
    print("|---|---|---|---|---|---|---|---|")
    for width in args.widths:
        x = activations(args.tokens, width, args.seed)
        for D in args.group_sizes:
            if width % D:
                print(f"| {width} | {D} | (D does not divide the width) | | | | | |")
                continue
            rtn = ActQuantConfig("rtn", int(args.bits), D)
            pvq = {m: ActQuantConfig("pvq", args.bits, D, search_method=m) for m in ("paper", "greedy", "refined")}
            K = pvq["paper"].pulses(D)
            # warm up every compiled kernel and table outside the timings
            for c in (rtn, *pvq.values()):
                decode_activations(encode_activations(x[:4], c))
                fake_quantize(x[:4], c)

            groups = x.double().numpy().reshape(-1, D)
            rows = []
            t_ref, y = best_of(args.repeats, fake_quantize, x, rtn)
            rows.append(("rtn fake (reference)", t_ref, snr_db(x, y), rtn.bits_per_value(width)))
            t, payload = best_of(args.repeats, encode_activations, x, rtn)
            rows.append(("rtn encode", t, snr_db(x, decode_activations(payload)), payload.bits_per_value))
            t, _ = best_of(args.repeats, search, groups, K, "paper")
            rows.append((f"pvq search only (paper, K={K})", t, None, None))
            for m, c in pvq.items():
                t, y = best_of(args.repeats, fake_quantize, x, c)
                rows.append((f"pvq fake ({m} search)", t, snr_db(x, y), c.bits_per_value(width)))
            t, payload = best_of(args.repeats, encode_activations, x, pvq["paper"])
            rows.append(("pvq encode (paper search + Fischer codes)", t, None, payload.bits_per_value))
            t, y = best_of(args.repeats, decode_activations, payload)
            rows.append(("pvq decode", t, snr_db(x, y), payload.bits_per_value))
            for name, t, snr, bpv in rows:
                snr_s = f"{snr:.2f}" if snr is not None else "-"
                bpv_s = f"{bpv:.4f}" if bpv is not None else "-"
                print(f"| {width} | {D} | {name} | {args.tokens / t:,.0f} | {x.numel() / t / 1e6:.2f} | "
                      f"{t / t_ref:.1f}x | {snr_s} | {bpv_s} |", flush=True)


if __name__ == "__main__":
    main()
