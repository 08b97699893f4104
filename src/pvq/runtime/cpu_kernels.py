"""CPU kernels of PVQ, RTN and GPTQ layers (numba, threads over output rows).

Both read the packed payload as stored (split-order codes, gains or gain indices) and
never build the whole float weight of a layer unless asked to:

* ``pvq-cpu-gemv`` (at most `gemv_max_rows(layer)` tokens, i.e. decoding): each thread
  decodes one output row's codes into a small buffer, turns them into float32 weights
  (``p_i * (gain / ||p||)``) and multiplies them with every token at once.
* ``pvq-cpu-decode-gemm`` (prefill): decodes the whole layer into one reusable float32
  workspace, threads over rows, then calls `F.linear`.

Both scale the integer points by ``float32(gain / ||p||)``, where the reference
(`pvq.methods.pvq.dequantize`) divides by the norm and multiplies by the gain in float64:
weights differ by at most an ulp or so, and the GEMV also sums in another order, so
outputs match the reference to float32 tolerance (tests: relative error below 1e-5).
Layers stored in Fischer's order are left to the reference path (`pvq convert`
re-encodes them); codes are range-checked like the reference decoder's.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numba as nb
import numpy as np
import torch
import torch.nn.functional as F

from pvq.codec.split import split_decode_many, split_supported, split_tables
from pvq.methods.pvq import escape_tables, gain_tables

from pvq.runtime import c_kernels
from pvq.runtime.workspace import WORKSPACE
from pvq.runtime.errors import LayerCodecError
from pvq.runtime.grid_fast import FAST_GRID_BITS, grid_fast_rows, grid_fast_tables
from pvq.runtime.pvq_fast import (
    fast_pvq_supported,
    fast_pvq_tables,
    fast_stream_args,
    _row_gains,
    half_to_double,
    pvq_fast_points,
    pvq_fast_rows,
    read_bits,
)

__all__ = ["runtime_threads", "set_kernel_threads", "kernel_threads", "GEMV_MAX_ROWS", "PVQCpuState", "gemv_max_rows", "decoded_weight", "forward_decode_gemm", "forward_gemv", "cpu_state", "grid_rows",
           "pvq_rows", "refusal"]

#: Token rows up to which the fused GEMV runs (above: decode + GEMM), for layers below
#: GEMV_LARGE_WEIGHTS weights and for larger ones: `python bench/layer_kernels.py --crossover`
#: (docs/results.md section 7) finds the GEMV ahead at 1-2 rows on the demo model's
#: shapes and about even at 1 row on 4096 x 4096, in two runs that disagree beyond that.
GEMV_MAX_ROWS = 2
GEMV_MAX_ROWS_LARGE = 1
GEMV_LARGE_WEIGHTS = 1 << 22


def gemv_max_rows(layer) -> int:
    """Token rows up to which `layer` runs the fused GEMV on the CPU."""
    large = layer.out_features * layer.in_features >= GEMV_LARGE_WEIGHTS
    return GEMV_MAX_ROWS_LARGE if large else GEMV_MAX_ROWS
#: A call whose estimated single-thread time is below this runs on one thread: a hand-off
#: to the pool costs 100-150 us here (`bench/layer_kernels.py`, 2 threads), more than it saves.
_PARALLEL_MIN_SECONDS = 400e-6
#: Threads of the kernels (None: torch's intra-op thread count): `set_kernel_threads`.
_KERNEL_THREADS: int | None = None


def set_kernel_threads(n: int | None) -> None:
    """Threads the CPU kernels split a layer's rows over (None: follow torch.get_num_threads())."""
    global _KERNEL_THREADS
    if n is not None and (not isinstance(n, int) or n < 1):
        raise ValueError(f"kernel threads must be a positive integer or None, got {n!r}")
    _KERNEL_THREADS = n


def kernel_threads() -> int:
    return _KERNEL_THREADS if _KERNEL_THREADS is not None else max(1, torch.get_num_threads())


#: The same for the C kernels' own pool (a hand-off of a few microseconds) while torch's ops
#: run on one thread (`runtime_threads`, a decode step); while torch's run on several, its
#: spinning workers and the pool's take turns on the same cores (measured: a 576 x 576 decode +
#: GEMM over 512 tokens 6.2 ms against 2.8 ms with the decode on one thread), so the pool
#: serves only calls estimated above _C_PARALLEL_MIN_SECONDS_SHARED.
_C_PARALLEL_MIN_SECONDS = 40e-6
_C_PARALLEL_MIN_SECONDS_SHARED = 5e-3


def _c_threads(seconds: float) -> int:
    limit = _C_PARALLEL_MIN_SECONDS if torch.get_num_threads() == 1 else _C_PARALLEL_MIN_SECONDS_SHARED
    return kernel_threads() if seconds >= limit else 1


#: Single-thread seconds per weight of each kernel at batch 1 (measured on this machine
#: class, `bench/layer_kernels.py`; only used to decide whether to hand work to a pool).
_SECONDS_PER_WEIGHT = {"pvq-fast": 3.6e-9, "pvq-tree": 8e-9, "int8": 0.25e-9, "int4": 0.2e-9, "grid-fast": 0.3e-9, "grid": 2e-9}


@nb.njit(inline="always")
def _decode_row(r, codes, nbits, D, G, K, total, start, length, left, right, kind, kl_, of, dv, rc, gd, gs, kmax,
                lb, lp, crow, pts, cs, ks):
    """Codes of row r into pts (G, D); returns the first group whose code is out of range, or -1."""
    bad = -1
    for g in range(G):
        c = read_bits(codes, (r * G + g) * nbits, nbits)
        if c >= total:  # never decoded: an out-of-range code would index past the tables
            if bad < 0:
                bad = g
            c = 0
        crow[g] = c
    split_decode_many(crow, D, K, start, length, left, right, kind, kl_, of, dv, rc, gd, gs, kmax, lb, lp, cs, ks, pts)
    return bad


@nb.njit(inline="always")
def _row_scales(r, G, D, pts, gain_mode, gains16, gidx, gbits, codebook, row_scale, esc_pos, esc_gain, gains, scales):
    """scales[g] = gain / ||p|| of row r's groups (float32), pts (G, D) its decoded points,
    the gains as every kernel reads them (`pvq_fast._row_gains`: escapes applied)."""
    _row_gains(r, G, gain_mode, gains16, gidx, gbits, codebook, row_scale, esc_pos, esc_gain, gains)
    for g in range(G):
        ss = np.float32(0.0)
        for i in range(D):
            ss += pts[g, i] * pts[g, i]  # small integers: exact
        scales[g] = np.float32(gains[g] / math.sqrt(np.float64(ss)))


@nb.njit(cache=True, nogil=True)
def pvq_rows(lo, hi, x, codes, nbits, D, G, K, total, start, length, left, right, kind, kl_, of, dv, rc, gd, gs, kmax,
             lb, lp, gain_mode, gains16, gidx, gbits, codebook, row_scale, esc_pos, esc_gain, out, weight, row0):
    """Rows lo..hi of a PVQ layer from its packed payload, either
    - (weight empty) ``out[:, r] = x @ W[r]^T`` as sum_g scale_g <p_g, x_g> (the GEMV: no weight formed), or
    - (weight (R, C)) ``weight[r] = p_i * scale_g`` (the decode for a GEMM),
    with ``scale_g = float32(gain / ||p||)``. Returns the flat index (r * G + g) of the
    first code out of range, or -1."""
    B = x.shape[0]
    gemv = weight.shape[0] == 0
    crow = np.empty(G, np.int64)
    pts = np.empty((G, D), np.float32)
    scales = np.empty(G, np.float32)
    gains = np.empty(G, np.float64)
    acc = np.empty(B, np.float32)
    cs = np.empty(start.shape[0], np.int64)
    ks = np.empty(start.shape[0], np.int64)
    for r in range(lo, hi):
        bad = _decode_row(r, codes, nbits, D, G, K, total, start, length, left, right, kind, kl_, of, dv, rc, gd, gs,
                          kmax, lb, lp, crow, pts, cs, ks)
        if bad >= 0:
            return r * G + bad
        _row_scales(r, G, D, pts, gain_mode, gains16, gidx, gbits, codebook, row_scale, esc_pos, esc_gain, gains,
                    scales)
        if not gemv:
            for g in range(G):
                for i in range(D):
                    weight[r - row0, g * D + i] = pts[g, i] * scales[g]
            continue
        acc[:] = 0.0
        for g in range(G):
            base = g * D
            for b in range(B):
                d = np.float32(0.0)
                for i in range(D):
                    d += pts[g, i] * x[b, base + i]
                acc[b] += scales[g] * d
        for b in range(B):
            out[b, r] = acc[b]
    return -1


@nb.njit(cache=True, nogil=True)
def grid_rows(lo, hi, x, codes, bits, gs, G, scales16, zeros, out, weight, row0):
    """Rows lo..hi of an RTN/GPTQ layer (codes and zero points bit-packed at `bits`,
    float16 scales per group of `gs` columns), in stored column order: GEMV into out
    (weight empty) or the weights into weight, ``float32(code - zero) * float32(scale)``
    exactly as `pvq.methods.rtn.grid_dequantize`. Returns -1 (grid codes cannot be out of range)."""
    B = x.shape[0]
    C = G * gs
    gemv = weight.shape[0] == 0
    acc = np.empty(B, np.float32)
    for r in range(lo, hi):
        acc[:] = 0.0
        for g in range(G):
            s = np.float32(half_to_double(scales16[r, g]))
            z = read_bits(zeros, (r * G + g) * bits, bits)
            base = g * gs
            for j in range(gs):
                w = np.float32(read_bits(codes, (r * C + base + j) * bits, bits) - z) * s
                if gemv:
                    for b in range(B):
                        acc[b] += w * x[b, base + j]
                else:
                    weight[r - row0, base + j] = w
        if gemv:
            for b in range(B):
                out[b, r] = acc[b]
    return -1


class _RowPool:
    """Runs a row-range kernel over a layer's output rows on torch's thread count.

    The kernels are plain (cached, GIL-free) numba functions split over rows by a thread
    pool, not numba's parallel loops: those crashed in this stack (numba 0.68 + torch 2.13,
    a segmentation fault inside the parallel region) and cannot be cached."""

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._workers = 0

    def run(self, kernel, start: int, stop: int, seconds: float, *args) -> int:
        """Run `kernel` over rows start..stop; `seconds`: its estimated single-thread time."""
        threads = kernel_threads()
        rows = stop - start
        if threads == 1 or seconds < _PARALLEL_MIN_SECONDS or rows < 2 * threads:
            return int(kernel(start, stop, *args))
        if self._pool is None or self._workers != threads:
            if self._pool is not None:
                self._pool.shutdown(wait=False)
            self._pool = ThreadPoolExecutor(threads, thread_name_prefix="pvq-kernel")
            self._workers = threads
        bounds = [start + rows * i // threads for i in range(threads + 1)]
        futures = [self._pool.submit(kernel, bounds[i], bounds[i + 1], *args) for i in range(1, threads)]
        results = [int(kernel(bounds[0], bounds[1], *args))] + [int(f.result()) for f in futures]
        bad = [b for b in results if b >= 0]
        return min(bad) if bad else -1


_ROWS = _RowPool()


@dataclass
class PVQCpuState:
    """The kernel chosen for one layer and its arguments (views of its buffers plus decoded
    tables), chosen once and kept until a buffer changes; perm: GPTQ's act-order column
    permutation (stored column j is input column perm[j])."""

    key: tuple
    args: tuple
    shape: tuple[int, int]
    perm: torch.Tensor | None = None
    kernel: object = None
    name: str = ""
    c: tuple | None = None  # (c_kernels.LayerArgs, arrays it points into) where the C kernels serve it


#: Methods with CPU kernels.
CPU_METHODS = ("pvq", "rtn", "gptq")


def refusal(layer) -> str | None:
    """None if the kernels (CPU, and Triton's but for its own limits) serve this layer, else why not."""
    if layer.method != "pvq":
        return None if layer.method in CPU_METHODS else f"method {layer.method}"
    lay = layer.layout
    if lay.get("enumeration", "fischer") != "split":
        return "PVQ codes in Fischer's order (`pvq convert` re-encodes them in the split order)"
    D, K = int(lay["group_size"]), int(lay["pulses"])
    if not split_supported(D, K):  # codes of more than 53 bits
        return f"PVQ codes of {lay['code_bits']} bits"
    return None


def cpu_state(layer) -> PVQCpuState:
    """Kernel arguments of a `QuantizedLinear`, cached on the layer until a buffer changes."""
    compute = layer.__dict__.get("_compute")
    key = (compute.kind, id(compute)) if compute is not None else layer.payload_key()
    state = layer.__dict__.get("_cpu_state")
    if state is not None and state.key == key:
        return state
    if compute is not None:
        state = PVQCpuState(key, compute.kernel_args(int(layer.layout["group_size"])),
                            (layer.out_features, layer.in_features), kernel=compute.kernel, name=compute.kind)
    else:
        state = _pvq_state(layer, key) if layer.method == "pvq" else _grid_state(layer, key)
    state.c = c_kernels.c_args_for(state.name, state.args)
    layer._cpu_state = state
    return state


def _grid_state(layer, key: tuple) -> PVQCpuState:
    lay = layer.layout
    pay = layer.payload()
    perm = pay.get("perm")
    bits, gs, G = int(lay["bits"]), int(lay["group_size"]), int(lay["num_groups"])
    if bits in FAST_GRID_BITS and gs % 2 == 0:
        scales, zeros = grid_fast_tables(pay["scales"], pay["zeros"], layer.out_features, G, bits)
        state = PVQCpuState(key, (pay["codes"], np.int64(bits), np.int64(gs), np.int64(G), scales, zeros),
                            (layer.out_features, layer.in_features), kernel=grid_fast_rows, name="grid-fast")
    else:
        state = PVQCpuState(key, (pay["codes"], np.int64(bits), np.int64(gs), np.int64(G),
                                  pay["scales"].view(np.int16), pay["zeros"]),
                            (layer.out_features, layer.in_features), kernel=grid_rows, name="grid")
    state.perm = None if perm is None else torch.from_numpy(perm.astype(np.int64))
    return state


def _pvq_gain_args(layer) -> tuple:
    lay = layer.layout
    pay = layer.payload()
    empty8 = np.zeros(1, np.uint8)
    R = layer.out_features
    if lay["gain"] == "fp16":
        gain_mode, gains16, gidx, gbits = 0, pay["gains"].view(np.int16), empty8, 0
        codebook, row_scale = np.zeros(1), np.zeros(1)
    else:
        gain_mode, gains16, gidx, gbits = 1, np.zeros((1, 1), np.int16), pay["gain_indices"], int(lay["gain_bits"])
        codebook, row_scale = gain_tables(lay, pay, R)
    escapes = None if lay["gain"] == "fp16" else escape_tables(lay, pay, R)
    esc_pos, esc_gain = escapes if escapes is not None else (np.zeros((1, 0), np.int64), np.zeros((1, 0)))
    return (np.int64(gain_mode), gains16, gidx, np.int64(gbits), codebook, row_scale, esc_pos, esc_gain)


def _pvq_state(layer, key: tuple) -> PVQCpuState:
    """The fast kernel (`pvq_fast`) where it serves the layer's (D, K), else the tree kernel."""
    lay = layer.layout
    D, G, K, nbits = (int(lay[k]) for k in ("group_size", "num_groups", "pulses", "code_bits"))
    if not fast_pvq_supported(D, K):
        return _pvq_tree_state(layer, key)
    ft = fast_pvq_tables(D, K)
    args = (*fast_stream_args(layer.payload()["codes"]), np.int64(nbits), np.int64(D), np.int64(G), np.int64(K),
            np.int64(ft.total), ft.offs, ft.divs, ft.recs, ft.guide, ft.gscale, ft.lbase, ft.leaf32, ft.inv_norm,
            *_pvq_gain_args(layer))
    return PVQCpuState(key, args, (layer.out_features, G * D), kernel=pvq_fast_rows, name="pvq-fast")


def _pvq_tree_state(layer, key: tuple) -> PVQCpuState:
    """`pvq_rows`: any split-order (D, K) the fast codec takes (the tree walked per code)."""
    lay = layer.layout
    D, G, K, nbits = (int(lay[k]) for k in ("group_size", "num_groups", "pulses", "code_bits"))
    tb = split_tables(D, K)
    args = (layer.payload()["codes"], np.int64(nbits), np.int64(D), np.int64(G), np.int64(K), np.int64(tb.total),
            *tb.arrays, *_pvq_gain_args(layer))
    return PVQCpuState(key, args, (layer.out_features, G * D), kernel=pvq_rows, name="pvq-tree")


def _raise_bad(layer, flat: int) -> None:
    G = int(layer.layout["num_groups"])
    raise LayerCodecError(f"{layer._label()}: code of row {flat // G}, group {flat % G} is out of range "
                          f"[0, N({layer.layout['group_size']},{layer.layout['pulses']})): the payload is damaged")


_EMPTY = np.zeros((0, 0), np.float32)  # an absent x, out or weight argument of the row kernels


def _run(layer, state: PVQCpuState, x2: np.ndarray, out: np.ndarray, weight: np.ndarray, work: int,
         start: int = 0, stop: int | None = None) -> None:
    """Rows start..stop of the layer (weight row 0 is layer row `start`)."""
    stop = layer.out_features if stop is None else stop
    seconds = work * _SECONDS_PER_WEIGHT.get(state.name, 4e-9)
    if state.c is not None:  # the C kernels: their own pool, a hand-off of a few microseconds
        threads = _c_threads(seconds)
        if weight.shape[0]:
            bad = c_kernels.run(state.name, state.c[0], start, stop, weight=weight, row0=start, threads=threads)
        else:
            bad = c_kernels.run(state.name, state.c[0], start, stop, x=x2, out=out, R=layer.out_features,
                                threads=threads)
    else:
        bad = _ROWS.run(state.kernel, start, stop, seconds, x2, *state.args, out, weight, np.int64(start))
    if bad >= 0:
        _raise_bad(layer, int(bad))


def run_transcode(layer, points: np.ndarray, scales: np.ndarray) -> None:
    """A PVQ layer's codes decoded into the int8 layout's arrays (C kernel or `pvq_fast_points`)."""
    state = cpu_state(layer)
    R = layer.out_features
    seconds = 4e-9 * R * layer.in_features
    if state.c is not None:
        threads = _c_threads(seconds)
        bad = c_kernels.run("pvq-fast", state.c[0], 0, R, points_out=points, scales_out=scales, threads=threads)
    else:
        bad = _ROWS.run(pvq_fast_points, 0, R, seconds, *state.args, points, scales)
    if bad >= 0:
        _raise_bad(layer, int(bad))


def forward_gemv(layer, x: torch.Tensor) -> torch.Tensor:
    state = cpu_state(layer)
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).to(torch.float32)
    if state.perm is not None:
        x2 = x2[:, state.perm]
    x2 = x2.contiguous()
    out = torch.empty((x2.shape[0], layer.out_features), dtype=torch.float32)
    _run(layer, state, x2.numpy(), out.numpy(), _EMPTY, layer.out_features * layer.in_features * x2.shape[0])
    if layer.bias is not None:
        out += layer.bias.to(torch.float32)
    return out.reshape(*shape[:-1], layer.out_features).to(x.dtype)


#: Most weights decoded at once for a GEMM: larger layers are decoded and multiplied in
#: chunks of rows (the workspace stays at 4 MiB; the 8-bit head of the demo model would
#: otherwise take 113 MB during a prefill, an 8B MLP layer 235 MB; chunks of 4 MiB cost
#: nothing measurable in a GEMM over the prompt's tokens).
DECODE_CHUNK_WEIGHTS = 1 << 20


def decoded_weight(layer, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """Rows start..stop of the layer's float32 weight decoded into the shared workspace
    (valid until the next call), in stored column order (GPTQ act-order: see `cpu_state(layer).perm`)."""
    state = cpu_state(layer)
    R, C = state.shape
    stop = R if stop is None else stop

    weight = WORKSPACE.device_buffer((stop - start) * C, torch.device("cpu")).view(stop - start, C)
    _run(layer, state, _EMPTY, _EMPTY, weight.numpy(), (stop - start) * C, start, stop)
    return weight


def serves(layer, device: torch.device) -> bool:
    """Whether these kernels serve `layer` with its payload on `device`."""
    return device.type == "cpu" and layer.method in CPU_METHODS and refusal(layer) is None


def row_chunks(layer):
    """(start, stop, rows start..stop of the float32 weight) over the whole layer, a
    DECODE_CHUNK_WEIGHTS-sized chunk at a time in the workspace (each valid until the next)."""
    R, C = cpu_state(layer).shape
    step = max(1, DECODE_CHUNK_WEIGHTS // C)
    for start in range(0, R, step):
        stop = min(R, start + step)
        yield start, stop, decoded_weight(layer, start, stop)


def forward_decode_gemm(layer, x: torch.Tensor) -> torch.Tensor:
    state = cpu_state(layer)
    R, C = state.shape
    if state.perm is not None:
        x = x[..., state.perm]

    bias = None if layer.bias is None else layer.bias.to(x.dtype)
    if DECODE_CHUNK_WEIGHTS // C >= R:
        return F.linear(x, WORKSPACE.weight_like(decoded_weight(layer), x), bias)
    out = torch.empty(*x.shape[:-1], R, dtype=x.dtype)
    for start, stop, chunk in row_chunks(layer):
        out[..., start:stop] = F.linear(x, WORKSPACE.weight_like(chunk, x), None if bias is None else bias[start:stop])
    return out


def runtime_threads(model: torch.nn.Module, threads: int | None = None) -> int:
    """Set the threads of generation with a quantized model on the CPU: the kernels split
    each quantized layer over `threads` (default: torch's current count) with their own pool;
    torch's ops run on one thread while a step feeds one token (they are too small to gain
    from threads, and torch's spinning workers would take the cores the kernels' workers
    need: measured 77 against 48 ms a decode step of the demo model, int4 layout) and on
    `threads` for a step of several tokens (prefill: a forward pre-hook on `model` switches).
    Returns `threads`."""
    n = int(threads) if threads else max(1, torch.get_num_threads())
    set_kernel_threads(n)
    torch.set_num_threads(1)
    if not getattr(model, "_pvq_thread_hook", None):
        def switch(module, args, kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            if ids is None:
                ids = kwargs.get("inputs_embeds")
            tokens = ids.shape[1] if ids is not None and ids.ndim >= 2 else 1
            want = kernel_threads() if tokens > 1 else 1
            if torch.get_num_threads() != want:
                torch.set_num_threads(want)

        model._pvq_thread_hook = model.register_forward_pre_hook(switch, with_kwargs=True)
    return n
