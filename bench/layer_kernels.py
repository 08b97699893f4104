"""PVQ kernels against float and int4 on the same layer shapes, timed in one run.

Run:  python bench/layer_kernels.py [--threads 2] [--shapes demo 8b] [--out bench-out/kernels.json]

1. Decode throughput on one core (weights/s), D=16 3-bit shapes: Fischer's order
   (`pvq.codec.decode`) against the split order (`pvq.codec.split_decode`), same codes.
2. Forward time of one layer at batch 1, 8 and 512 for the demo model's shapes and an
   8B Llama's, with PVQ D=16 3-bit shapes + 4-bit fitted gains (random uniform codes,
   random gains: speed does not depend on the values): the PVQ layer as `pvq generate`
   runs it (kernel chosen by `select_kernel`), the reference decode-then-`F.linear`
   (demo shapes only: it is slow), float32 and bfloat16 `F.linear`, and torch's int4
   weight-only CPU matmul (`_weight_int4pack_mm_for_cpu`, group 64, bfloat16
   activations). All with `--threads` torch threads; the PVQ kernels use as many.
   Ratios are against float32 `F.linear` of the same shape timed in the same run.
3. With ``--per-code`` (and ``--checkpoint DIR``): ns per 16-weight code of each kernel of
   the stored layout on one thread: the previous release's tree kernel, numba's and C's fast one.
4. With ``--crossover``: the fused GEMV against decode + GEMM at batch 1-16 (the CPU
   kernels' row threshold, `pvq.runtime.cpu_kernels.gemv_max_rows`).
5. With ``--cuda`` (a GPU machine): the same layer table on the GPU, PVQ's Triton kernels
   against float16 `F.linear`.
   The PVQ kernels are the C ones where they were built (`pvq.runtime.c_kernels`), else numba;
   the table's title says which. `--threads` is both torch's and the kernels' thread count.
Targets (issues 13 and 28) are reported, not asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time


import numpy as np
import torch
import torch.nn.functional as F

from pvq.codec import (
    decode,
    encode,
    pack_codes,
    pulses_for_bits,
    pyramid_count,
    split_decode,
    split_encode,
)
from pvq.runtime import QuantizedLinear
from pvq.runtime.kernels import DEQUANTIZE, select_kernel

SHAPES = {  # (out_features, in_features)
    "demo": [(576, 576), (1536, 576), (576, 1536)],
    "8b": [(4096, 4096), (14336, 4096), (4096, 14336)],
}
BATCHES = (1, 8, 512)
PVQ_CONFIG = {"group_size": 16, "shape_bits": 3.0, "gain": "empirical", "gain_bits": 4, "use_hessian": False}


def timed(fn, repeats: int, budget_s: float = 2.0) -> float:
    """Median seconds of `fn()` over `repeats` calls (fewer if they exceed the budget), after one warm-up."""
    fn()
    times = []
    start = time.perf_counter()
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
        if time.perf_counter() - start > budget_s and len(times) >= 3:
            break
    return statistics.median(times)


def random_codes(D: int, K: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """n codes uniform in [0, N(D, K)) (N < 2^53 here)."""
    return (rng.random(n) * pyramid_count(D, K)).astype(np.uint64)


def decode_rows(n: int, rng: np.random.Generator) -> list[dict]:
    torch.set_num_threads(1)
    D, K = 16, pulses_for_bits(16, 3.0)
    split_codes = random_codes(D, K, n, rng)
    points = split_decode(split_codes, D, K)
    fischer_codes = encode(points, K)
    assert np.array_equal(decode(fischer_codes, D, K), points)
    assert np.array_equal(split_encode(points, K), split_codes)
    rows = []
    for name, fn in (("fischer", lambda: decode(fischer_codes, D, K)), ("split", lambda: split_decode(split_codes, D, K))):
        seconds = timed(fn, 5)
        rows.append({"order": name, "D": D, "K": K, "weights_per_s": n * D / seconds})
    return rows


def pvq_layer(R: int, C: int, rng: np.random.Generator) -> QuantizedLinear:
    layer = QuantizedLinear(C, R, "pvq", PVQ_CONFIG)
    lay = layer.layout
    D, G, K = lay["group_size"], lay["num_groups"], lay["pulses"]
    codes = random_codes(D, K, R * G, rng)
    payload = {
        "codes": pack_codes(codes, lay["code_bits"]),
        "gain_indices": pack_codes(rng.integers(0, 16, R * G).astype(np.uint64), 4),
        "row_norms": (rng.random(R) * 2 + 0.5).astype(np.float16),
        "gain_codebook": np.sort(rng.random(16) * 0.4 + 0.05).astype(np.float16),
    }
    layer.set_payload(payload)
    return layer


def int4_layer(R: int, C: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.from_numpy(rng.integers(0, 16, (R, C)).astype(np.int32))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(w, 2)
    scales_zeros = torch.rand(C // 64, R, 2, dtype=torch.bfloat16)
    return packed, scales_zeros


def cuda_layer_rows(shapes: list[tuple[int, int]], rng: np.random.Generator, repeats: int) -> list[dict]:
    """The layer table on a CUDA device: PVQ (Triton kernels) against float16 `F.linear`."""
    rows = []
    sync = torch.cuda.synchronize
    for R, C in shapes:
        layer = pvq_layer(R, C, rng).to("cuda")
        w16 = torch.randn(R, C, device="cuda", dtype=torch.float16)
        for B in BATCHES:
            x16 = torch.randn(B, C, device="cuda", dtype=torch.float16)
            kernel = select_kernel(layer, x16).name
            with torch.inference_mode():
                t = {"float16": timed(lambda: (F.linear(x16, w16), sync()), repeats),
                     "pvq": timed(lambda: (layer(x16), sync()), repeats)}
            rows.append({"shape": [R, C], "batch": B, "kernel": kernel, "seconds": t, "device": "cuda",
                         "bytes": {"float16": R * C * 2, "pvq": layer.stored_bytes}})
            print(f"  cuda {R}x{C} batch {B}: " + ", ".join(f"{k} {v * 1e3:.3f} ms" for k, v in t.items()), flush=True)
    return rows


def layer_rows(shapes: list[tuple[int, int]], rng: np.random.Generator, threads: int, repeats: int) -> list[dict]:
    torch.set_num_threads(threads)
    rows = []
    from pvq.runtime.compute_layout import Int4Weights, transcode_int8

    for R, C in shapes:
        layer = pvq_layer(R, C, rng)
        # the compute layouts (pvq.load(..., layout="int8" / "int4")) of a copy of the same payload
        layer8, layer4 = QuantizedLinear(C, R, "pvq", PVQ_CONFIG), QuantizedLinear(C, R, "pvq", PVQ_CONFIG)
        layer8.set_payload(layer.payload())
        layer4.set_payload(layer.payload())
        w8 = transcode_int8(layer8)
        layer8.release_payload(w8)
        layer4.release_payload(Int4Weights.from_int8(w8))
        w32 = torch.randn(R, C)
        w16 = w32.to(torch.bfloat16)
        packed, sz = int4_layer(R, C, rng)
        sizes = {"float32": w32.numel() * 4, "bfloat16": w16.numel() * 2,
                 "int4": packed.numel() * packed.element_size() + sz.numel() * sz.element_size(),
                 "pvq": layer.stored_bytes, "pvq-int8": layer8._compute.nbytes, "pvq-int4": layer4._compute.nbytes}
        for B in BATCHES:
            x32 = torch.randn(B, C)
            x16 = x32.to(torch.bfloat16)
            kernel = select_kernel(layer, x32).name
            with torch.inference_mode():
                t = {
                    "float32": timed(lambda: F.linear(x32, w32), repeats),
                    "bfloat16": timed(lambda: F.linear(x16, w16), repeats),
                    "int4": timed(lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x16, packed, 64, sz), repeats),
                    "pvq": timed(lambda: layer(x32), repeats),
                    "pvq-int8": timed(lambda: layer8(x32), repeats),
                    "pvq-int4": timed(lambda: layer4(x32), repeats),
                }
                if R * C <= 1 << 20:
                    t["pvq-reference"] = timed(lambda: DEQUANTIZE.forward(layer, x32), max(3, repeats // 4))
            rows.append({"shape": [R, C], "batch": B, "kernel": kernel, "seconds": t, "bytes": sizes,
                         "threads": threads})
            print(f"  {R}x{C} batch {B}: " + ", ".join(f"{k} {v * 1e3:.3f} ms" for k, v in t.items()), flush=True)
    return rows


def crossover_rows(rng: np.random.Generator, threads: int, repeats: int) -> list[dict]:
    """Fused GEMV against decode + GEMM at small batches (where `gemv_max_rows` comes from)."""
    from pvq.runtime.kernels import PVQ_CPU_DECODE_GEMM, PVQ_CPU_GEMV

    torch.set_num_threads(threads)
    rows = []
    for R, C in ((576, 1536), (1536, 576), (4096, 4096)):
        layer = pvq_layer(R, C, rng)
        for B in (1, 2, 4, 8, 16):
            x = torch.randn(B, C)
            with torch.inference_mode():
                g = timed(lambda: PVQ_CPU_GEMV.forward(layer, x), repeats)
                d = timed(lambda: PVQ_CPU_DECODE_GEMM.forward(layer, x), repeats)
            rows.append({"shape": [R, C], "batch": B, "gemv": g, "decode_gemm": d})
            print(f"  crossover {R}x{C} batch {B}: gemv {g * 1e3:.2f} ms, decode+gemm {d * 1e3:.2f} ms", flush=True)
    return rows


def per_code_rows(checkpoint: str | None, rng: np.random.Generator, repeats: int) -> list[dict]:
    """One thread, batch 1: ns per 16-weight code of the packed PVQ GEMV for each kernel that
    serves the stored layout: the tree kernel of the previous release (`cpu_kernels.pvq_rows`),
    the numba fast kernel and the C one, on uniform random codes (4096 x 4096) and, with
    --checkpoint, on the codes of that checkpoint's first 70 PVQ layers (real codes split
    less evenly). The same layer objects and inputs for every kernel."""
    from pvq.runtime import c_kernels, cpu_kernels

    sets = {"uniform random codes, 4096 x 4096": [pvq_layer(4096, 4096, rng)]}
    if checkpoint:
        import pvq

        model, _, _ = pvq.load(checkpoint, check_decode=False, load_tokenizer=False)
        sets[f"{checkpoint}: 70 layers"] = [m for m in model.modules()
                                            if isinstance(m, QuantizedLinear) and m.method == "pvq"][:70]
    rows = []
    for what, layers in sets.items():
        jobs = []
        for lay in layers:
            R, C = lay.out_features, lay.in_features
            x = rng.standard_normal((1, C)).astype(np.float32)
            out = np.zeros((1, R), np.float32)
            tree = cpu_kernels._pvq_tree_state(lay, ("tree",))
            fast = cpu_kernels._pvq_state(lay, ("fast",))
            c = c_kernels.c_args_for("pvq-fast", fast.args)
            jobs.append((lay, R, C, x, out, tree, fast, c))
        codes = sum(R * C / 16 for _, R, C, *_ in jobs)
        kernels = {
            "tree (previous release, numba)": lambda j: cpu_kernels.pvq_rows(0, j[1], j[3], *j[5].args, j[4],
                                                                           cpu_kernels._EMPTY, np.int64(0)),
            "fast, numba": lambda j: cpu_kernels.pvq_fast_rows(0, j[1], j[3], *j[6].args, j[4], cpu_kernels._EMPTY,
                                                              np.int64(0)),
        }
        if jobs[0][7] is not None:
            kernels["fast, C"] = lambda j: c_kernels.run("pvq-fast", j[7][0], 0, j[1], x=j[3], out=j[4], R=j[1])
        for name, fn in kernels.items():
            seconds = timed(lambda: [fn(j) for j in jobs], repeats)
            rows.append({"codes": what, "kernel": name, "ns_per_code": seconds / codes * 1e9})
            print(f"  per code, {what}, {name}: {seconds / codes * 1e9:.1f} ns", flush=True)
    return rows


def tables(decode_res: list[dict], layer_res: list[dict], threads: int) -> str:
    out = ["Decode, one core (D=16, K=%d, uniform random codes):" % decode_res[0]["K"], "",
           "| order | weights/s | vs Fischer |", "|---|---|---|"]
    base = decode_res[0]["weights_per_s"]
    for r in decode_res:
        out.append(f"| {r['order']} | {r['weights_per_s'] / 1e6:.0f} M | {r['weights_per_s'] / base:.2f}x |")
    from pvq.runtime import c_kernels

    backend = f"C kernels ({c_kernels.simd()})" if c_kernels.available() else "numba kernels"
    out += ["", f"Layer forward, {threads} threads, {backend} (ms; in brackets: time / float32 `F.linear`):", "",
            "| shape (out x in) | batch | kernel | float32 | bfloat16 | int4 (torch) | pvq (packed) | pvq (int8 layout) | "
            "pvq (int4 layout) | pvq reference | bytes / float32: packed, int8, int4 | ns per 16-weight code per core (packed, batch 1; both threads counted) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in layer_res:
        t = r["seconds"]
        f32 = t["float32"]
        cell = lambda k: f"{t[k] * 1e3:.3f} ({t[k] / f32:.2f}x)" if k in t else "-"
        out.append(f"| {r['shape'][0]} x {r['shape'][1]} | {r['batch']} | {r['kernel']} | {f32 * 1e3:.3f} | "
                   f"{cell('bfloat16')} | {cell('int4')} | {cell('pvq')} | {cell('pvq-int8')} | {cell('pvq-int4')} | "
                   f"{cell('pvq-reference')} | " + ", ".join(f"{r['bytes'][k] / r['bytes']['float32']:.3f}" for k in
                                                           ("pvq", "pvq-int8", "pvq-int4")) + " | "
                   + (f"{r['seconds']['pvq'] * r['threads'] / (r['shape'][0] * r['shape'][1] / 16) * 1e9:.1f} |"
                      if r["batch"] == 1 else "- |"))
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch (and PVQ kernel) threads")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--decode-codes", type=int, default=1 << 20, help="codes timed in the decode comparison")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--crossover", action="store_true", help="also fused GEMV vs decode+GEMM at batch 1-16")
    parser.add_argument("--per-code", action="store_true",
                        help="also ns per code of each packed-PVQ kernel on one thread (the tree, numba and C kernels)")
    parser.add_argument("--checkpoint", default=None, help="with --per-code: also time the codes of this checkpoint")
    parser.add_argument("--cuda", action="store_true", help="also the layer table on the GPU (Triton kernels vs float16)")
    parser.add_argument("--out", default="bench-out/kernels.json")
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    decode_res = decode_rows(args.decode_codes, rng)
    layer_res = layer_rows([s for name in args.shapes for s in SHAPES[name]], rng, args.threads, args.repeats)
    text = tables(decode_res, layer_res, args.threads)
    cross = []
    if args.crossover:
        cross = crossover_rows(rng, args.threads, args.repeats)
        text += ("\n\nFused GEMV / decode + GEMM (CPU, same threads):\n\n| shape | batch | gemv ms | decode+gemm ms | "
                 "ratio |\n|---|---|---|---|---|")
        for r in cross:
            text += (f"\n| {r['shape'][0]} x {r['shape'][1]} | {r['batch']} | {r['gemv'] * 1e3:.2f} | "
                     f"{r['decode_gemm'] * 1e3:.2f} | {r['gemv'] / r['decode_gemm']:.2f} |")
    per_code = []
    if args.per_code:
        per_code = per_code_rows(args.checkpoint, rng, max(3, args.repeats // 2))
        text += ("\n\nPacked PVQ GEMV, one thread, batch 1 (ns per 16-weight code):\n\n| codes | kernel | ns per code |"
                 "\n|---|---|---|")
        for r in per_code:
            text += f"\n| {r['codes']} | {r['kernel']} | {r['ns_per_code']:.1f} |"
    cuda_res = []
    if args.cuda:
        cuda_res = cuda_layer_rows([s for name in args.shapes for s in SHAPES[name]], rng, args.repeats)
        text += "\n\nOn CUDA (ms; pvq / float16 `F.linear`):\n\n| shape | batch | kernel | float16 | pvq |\n|---|---|---|---|---|"
        for r in cuda_res:
            t = r["seconds"]
            text += (f"\n| {r['shape'][0]} x {r['shape'][1]} | {r['batch']} | {r['kernel']} | {t['float16'] * 1e3:.3f} | "
                     f"{t['pvq'] * 1e3:.3f} ({t['pvq'] / t['float16']:.2f}x) |")
    print(text)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"decode": decode_res, "layers": layer_res, "crossover": cross, "cuda_layers": cuda_res,
                   "per_code": per_code,
                   "threads": args.threads,
                   "table": text}, f, indent=1)


if __name__ == "__main__":
    main()
