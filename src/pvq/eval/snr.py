"""Signal-to-noise ratio on an i.i.d. Gaussian source (the paper's Figure 3, reproducible).

Every quantizer sees the same seeded N(0, 1) rows of `ROW_LENGTH` values and is charged
for everything it stores, as bits per value:
- PVQ (groups of D): shape code bits ceil(log2 N(D, K)) / D, plus the gain: a float16
  per group (16 / D) or `gain_bits` Beta-quantile bits per group plus one float32 row
  energy per row (gain_bits / D + 32 / ROW_LENGTH). Shapes go through the real codec
  (search, encode, bit-pack, unpack, decode), not a simulation.
- Uniform scalar round-to-nearest: b bits plus a float16 absmax scale per 128 values.
- Lloyd-Max scalar (MSE-optimal for a Gaussian): b bits plus a float16 RMS scale per 128.
- E8 lattice: a ball-shaped E8 codebook (exact point count, fractional rate) on values
  normalised by a float16 RMS scale per 128, lattice scale fitted on separate samples.
- Shannon's rate-distortion bound for a Gaussian source: SNR = 6.02 R dB.
SNR = 10 log10(sum x^2 / sum (x - x_hat)^2) over all values.
"""

from __future__ import annotations

import csv
import time
from dataclasses import dataclass

import numpy as np

from pvq.codec.counts import code_bits, pulses_for_bits
from pvq.codec.enumeration import decode, encode
from pvq.codec.gain import BetaGainQuantizer
from pvq.codec.lattice import E8Codebook
from pvq.codec.packing import pack_codes, unpack_codes
from pvq.codec.scalar import lloyd_max_quantize, uniform_rtn
from pvq.codec.search import search
from pvq.progress import progress_bar

ROW_LENGTH = 1024
SCALE_GROUP = 128  # values per float16 scale for the scalar and E8 quantizers
SHAPE_BITS = (1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0)
QUICK_SHAPE_BITS = (2.0, 3.0, 4.0)
SCALAR_BITS = (2, 3, 4, 5, 6)
E8_RATES = (1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0)
BETA_GAIN_BITS = 5
BETA_GAIN_DIMS = (8, 16, 32)


@dataclass(frozen=True)
class SNRPoint:
    method: str
    setting: str
    bits_per_value: float
    snr_db: float
    seconds: float


def snr_db(x: np.ndarray, x_hat: np.ndarray) -> float:
    """10 log10(signal energy / error energy) in dB."""
    err = float(np.sum((x - x_hat) ** 2))
    return float("inf") if err == 0 else 10.0 * np.log10(float(np.sum(x**2)) / err)


def pvq_quantize_rows(
    rows: np.ndarray, D: int, K: int, gain: str = "fp16", gain_bits: int = BETA_GAIN_BITS
) -> np.ndarray:
    """PVQ of (R, L) rows in groups of D with K pulses; returns the reconstruction.

    The shape goes through search -> encode -> pack -> unpack -> decode so the stored
    bits are real. The gain is the least-squares one, <w, p>/||p|| for the unit shape
    p/||p||, stored as float16 (`gain="fp16"`) or as Beta quantiles (`gain="beta"`).
    """
    R, L = rows.shape
    groups = rows.reshape(-1, D)
    points = search(groups, K)
    nbits = code_bits(D, K)
    stream = pack_codes(encode(points, K), nbits)
    points = decode(unpack_codes(stream, groups.shape[0], nbits), D, K)
    unit = points / np.linalg.norm(points, axis=1, keepdims=True)
    gains = np.sum(groups * unit, axis=1)  # >= 0: the search matches signs
    if gain == "fp16":
        gains = gains.astype(np.float16).astype(np.float64)
    elif gain == "beta":
        G = L // D
        quantizer = BetaGainQuantizer(group_size=D, num_groups=G, bits=gain_bits, reconstruction="centroid")
        row_energy = np.sum(rows**2, axis=1).astype(np.float32).astype(np.float64)
        gain_rows = gains.reshape(R, G)
        gains = quantizer.decode(quantizer.encode(gain_rows, row_energy), row_energy).reshape(-1)
    else:
        raise ValueError(f"unknown gain storage {gain!r}: use 'fp16' or 'beta'")
    return (gains[:, None] * unit).reshape(R, L)


def _rms_normalised(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split into SCALE_GROUP blocks normalised by their float16-stored RMS."""
    blocks = rows.reshape(-1, SCALE_GROUP)
    scale = np.sqrt(np.mean(blocks**2, axis=1, keepdims=True)).astype(np.float16).astype(np.float64)
    return blocks / scale, scale


def run_snr_experiment(
    samples: int = 256,
    seed: int = 0,
    dimensions: tuple[int, ...] | list[int] = (8, 16, 32, 64, 128),
    out_png: str | None = "pvq_snr.png",
    out_csv: str | None = None,
    quick: bool = False,
) -> list[SNRPoint]:
    """Run every quantizer on `samples` Gaussian rows of ROW_LENGTH, print a table, plot."""
    for D in dimensions:
        if ROW_LENGTH % D:
            raise ValueError(f"group size {D} must divide the row length {ROW_LENGTH}")
    rng = np.random.default_rng(seed)
    rows = rng.standard_normal((samples, ROW_LENGTH))
    train = rng.standard_normal((max(64, samples // 4), ROW_LENGTH))  # for fitting E8 scales
    shape_bits = QUICK_SHAPE_BITS if quick else SHAPE_BITS
    scalar_bits = SCALAR_BITS[:3] if quick else SCALAR_BITS
    e8_rates = E8_RATES[1:6:2] if quick else E8_RATES

    jobs = []
    for D in dimensions:
        for b in shape_bits:
            jobs.append(("PVQ", D, b, "fp16"))
            if D in BETA_GAIN_DIMS:
                jobs.append(("PVQ", D, b, "beta"))
    jobs += [("RTN", None, b, None) for b in scalar_bits]
    jobs += [("Lloyd-Max", None, b, None) for b in scalar_bits]
    jobs += [("E8", None, r, None) for r in e8_rates]

    points: list[SNRPoint] = []
    for method, D, b, gain in progress_bar(jobs, desc="snr", unit="point"):
        t0 = time.perf_counter()
        if method == "PVQ":
            K = pulses_for_bits(D, b)
            x_hat = pvq_quantize_rows(rows, D, K, gain=gain)
            shape = code_bits(D, K) / D
            if gain == "fp16":
                bpv, label, name = shape + 16 / D, f"D={D} K={K} fp16 gain", f"PVQ D={D}"
            else:
                bpv = shape + BETA_GAIN_BITS / D + 32 / ROW_LENGTH
                label, name = f"D={D} K={K} {BETA_GAIN_BITS}b Beta gain", f"PVQ D={D} Beta{BETA_GAIN_BITS}"
        elif method == "RTN":
            x_hat = uniform_rtn(rows, int(b), SCALE_GROUP)
            bpv, label, name = b + 16 / SCALE_GROUP, f"{b}b g{SCALE_GROUP}", "RTN"
        elif method == "Lloyd-Max":
            x_hat = lloyd_max_quantize(rows, int(b), SCALE_GROUP)
            bpv, label, name = b + 16 / SCALE_GROUP, f"{b}b g{SCALE_GROUP}", "Lloyd-Max"
        else:
            blocks, scale = _rms_normalised(rows)
            train_blocks, _ = _rms_normalised(train)
            book = E8Codebook.for_rate(b).fit_scale(train_blocks.reshape(-1, 8))
            q = book.quantize(blocks.reshape(-1, 8)).reshape(blocks.shape)
            x_hat = (q * scale).reshape(rows.shape)
            bpv, label, name = book.rate + 16 / SCALE_GROUP, f"rate {book.rate:.3f}", "E8"
        points.append(SNRPoint(name, label, bpv, snr_db(rows, x_hat), time.perf_counter() - t0))

    _print_table(points, samples)
    _print_summary(points)
    if out_csv:
        _write_csv(points, out_csv)
        print(f"wrote {out_csv}")
    if out_png:
        _plot(points, out_png, samples)
        print(f"wrote {out_png}")
    return points


def _print_table(points: list[SNRPoint], samples: int) -> None:
    print(f"\nSNR on i.i.d. N(0,1), {samples} rows x {ROW_LENGTH} values (bits per value include all side info)\n")
    print("| method | setting | bits/value | SNR dB | Shannon bound dB | gap dB | time s |")
    print("|---|---|---|---|---|---|---|")
    for p in sorted(points, key=lambda p: (p.method, p.bits_per_value)):
        bound = 6.0206 * p.bits_per_value
        print(
            f"| {p.method} | {p.setting} | {p.bits_per_value:.3f} | {p.snr_db:.2f} | {bound:.2f} "
            f"| {bound - p.snr_db:.2f} | {p.seconds:.2f} |"
        )


def _write_csv(points: list[SNRPoint], path: str) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["method", "setting", "bits_per_value", "snr_db", "seconds"])
        for p in points:
            writer.writerow([p.method, p.setting, f"{p.bits_per_value:.6f}", f"{p.snr_db:.4f}", f"{p.seconds:.3f}"])


def interpolated_snr(points: list[SNRPoint], method: str, bits: float) -> float | None:
    """SNR of one method's curve linearly interpolated at `bits` (None outside its range)."""
    pts = sorted((p for p in points if p.method == method), key=lambda p: p.bits_per_value)
    xs = [p.bits_per_value for p in pts]
    if not pts or bits < xs[0] or bits > xs[-1]:
        return None
    return float(np.interp(bits, xs, [p.snr_db for p in pts]))


def _print_summary(points: list[SNRPoint], rates: tuple[float, ...] = (3.0, 4.0)) -> None:
    """Each method's curve read off at equal total bits (linear interpolation between measured points)."""
    methods = sorted({p.method for p in points})
    print("\nSNR in dB at equal bits per value (linear interpolation between measured points)\n")
    print("| method | " + " | ".join(f"{r:g} bits" for r in rates) + " |")
    print("|---|" + "---|" * len(rates))
    for m in methods:
        cells = [interpolated_snr(points, m, r) for r in rates]
        print(f"| {m} | " + " | ".join("-" if c is None else f"{c:.2f}" for c in cells) + " |")
    print("| Shannon bound | " + " | ".join(f"{6.0206 * r:.2f}" for r in rates) + " |")


def _plot(points: list[SNRPoint], path: str, samples: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6))
    pvq_methods = sorted({p.method for p in points if p.method.startswith("PVQ")},
                         key=lambda m: (" Beta" in m, int(m.split("D=")[1].split()[0])))
    cmap = plt.get_cmap("viridis")
    styles = {}
    for n, m in enumerate(pvq_methods):
        styles[m] = dict(color=cmap(n / max(1, len(pvq_methods) - 1)), ls="--" if "Beta" in m else "-", marker="o")
    styles.update({
        "E8": dict(color="crimson", ls="-", marker="D"),
        "Lloyd-Max": dict(color="dimgray", ls="-", marker="^"),
        "RTN": dict(color="darkorange", ls="-", marker="s"),
    })
    for method in pvq_methods + ["E8", "Lloyd-Max", "RTN"]:
        pts = sorted((p for p in points if p.method == method), key=lambda p: p.bits_per_value)
        if pts:
            ax.plot([p.bits_per_value for p in pts], [p.snr_db for p in pts], ms=4, label=method, **styles[method])
    top = max(p.bits_per_value for p in points)
    r = np.linspace(0, top, 50)
    ax.plot(r, 6.0206 * r, "k:", label="Shannon bound 6.02 R")
    ax.set_xlabel("bits per value (shape + gain/scale side information)")
    ax.set_ylabel("SNR (dB)")
    ax.set_title(f"Gaussian source, {samples} x {ROW_LENGTH} values")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
