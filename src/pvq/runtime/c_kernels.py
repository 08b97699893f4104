"""The C kernels (`pvq._pvqkernels`, built from src/pvq/runtime/c/pvqkernels.c by `pip install`
where a C compiler is present), called through ctypes (which releases the GIL).

They serve what the numba kernels serve (`pvq_fast`, `compute_layout`'s int8 and int4, `grid_fast`), with the
same weights bit for bit (tests compare them), and split rows over their own thread pool.
`available()` says whether they are in use: not when the extension was not built (no
compiler: the numba kernels run, with one notice) or when ``PVQ_KERNELS=numba`` is set.
"""

from __future__ import annotations

import ctypes
import os

import numpy as np
import torch

__all__ = ["CallArgs", "LayerArgs", "available", "c_args_for", "run"]

#: The interface version this binding speaks (PVQ_KERNELS_ABI in pvqkernels.c).
ABI = 4

_P = ctypes.c_void_p
_I = ctypes.c_int64


class LayerArgs(ctypes.Structure):
    """Mirrors ``LayerArgs`` in pvqkernels.c (checked against its size at load)."""

    _fields_ = [
        ("words", _P), ("stream", _P), ("n_words", _I), ("n_stream", _I), ("nbits", _I), ("D", _I), ("G", _I),
        ("K", _I), ("total", _I), ("levels", _I),
        ("offs", _P), ("divs", _P), ("recs", _P), ("guide", _P), ("gscale", _P), ("lbase", _P), ("leaf64", _P),
        ("inv_norm", _P),
        ("gain_mode", _I), ("gbits", _I), ("n_esc", _I),
        ("gains16", _P), ("gidx", _P), ("codebook", _P), ("row_scale", _P), ("esc_pos", _P), ("esc_gain", _P),
        ("points", _P), ("scales", _P),
        ("nibbles", _P), ("x_ptr", _P), ("x_col", _P), ("x_delta", _P),
        ("codes", _P), ("bits", _I), ("gs", _I), ("gscales", _P), ("zeros", _P), ("C", _I),
    ]


class CallArgs(ctypes.Structure):
    _fields_ = [("x", _P), ("B", _I), ("out", _P), ("weight", _P), ("points_out", _P), ("scales_out", _P),
                ("row0", _I), ("R", _I)]


_LIB = None
_TRIED = False


def _load():
    global _LIB, _TRIED
    if _TRIED:
        return _LIB
    _TRIED = True
    if os.environ.get("PVQ_KERNELS", "").lower() == "numba":
        return None
    try:
        from pvq import _pvqkernels
    except ImportError:
        _warn_once("the C kernels were not built (no C compiler when pvq was installed; reinstall with one)")
        return None
    lib = ctypes.CDLL(_pvqkernels.__file__)
    lib.pvq_run.restype = ctypes.c_int64
    lib.pvq_run.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                            ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.pvq_layer_args_size.restype = ctypes.c_int64
    lib.pvq_call_args_size.restype = ctypes.c_int64
    lib.pvq_has_avx2.restype = ctypes.c_int
    abi = getattr(lib, "pvq_abi", None)
    if abi is not None:
        abi.restype = ctypes.c_int
    if (abi is None or abi() != ABI or lib.pvq_layer_args_size() != ctypes.sizeof(LayerArgs)
            or lib.pvq_call_args_size() != ctypes.sizeof(CallArgs)):
        _warn_once("the built C kernels do not match this pvq version (reinstall pvq to rebuild them)")
        return None
    _LIB = lib
    return lib


_WARNED = False


def _warn_once(why: str) -> None:
    global _WARNED
    if not _WARNED:
        _WARNED = True
        import warnings

        warnings.warn(f"pvq: {why}; the numba kernels run instead (same results, slower)", stacklevel=3)


def available() -> bool:
    """Whether the C kernels are in use (built, and not turned off with PVQ_KERNELS=numba)."""
    return _load() is not None


def simd() -> str:
    """The C kernels' instruction set: "avx2+fma" or "portable C" ("" when not in use)."""
    lib = _load()
    return "" if lib is None else ("avx2+fma" if lib.pvq_has_avx2() else "portable C")


def _ptr(a: np.ndarray) -> int:
    return a.ctypes.data


def c_args_for(kind: str, args: tuple) -> tuple[LayerArgs, tuple] | None:
    """The C arguments of a numba kernel's argument tuple (`cpu_kernels.PVQCpuState.args`),
    and the arrays they point into (to keep alive); None if the C kernels are not in use."""
    if _load() is None:
        return None
    la = LayerArgs()
    keep: list[np.ndarray] = []

    def arr(a, dtype):
        a = np.ascontiguousarray(a, dtype=dtype)
        keep.append(a)
        return _ptr(a)

    if kind == "pvq-fast":
        (words, stream, nbits, D, G, K, total, offs, divs, recs, guide, gscale, lbase, leaf32, inv_norm,
         gain_mode, gains16, gidx, gbits, codebook, row_scale, esc_pos, esc_gain) = args
        la.words, la.stream = arr(words, np.uint64), arr(stream, np.uint8)
        la.n_words, la.n_stream = words.shape[0], stream.shape[0]
        la.nbits, la.D, la.G, la.K, la.total, la.levels = int(nbits), int(D), int(G), int(K), int(total), offs.shape[0]
        la.offs, la.divs, la.recs = arr(offs, np.int64), arr(divs, np.int64), arr(recs, np.float64)
        la.guide, la.gscale, la.lbase = arr(guide, np.uint8), arr(gscale, np.float64), arr(lbase, np.int64)
        la.leaf64 = arr(_leaf_table(leaf32), np.uint64)
        la.inv_norm = arr(inv_norm, np.float64)
        la.gain_mode, la.gbits, la.n_esc = int(gain_mode), int(gbits), esc_pos.shape[1]
        la.gains16, la.gidx = arr(gains16, np.int16), arr(gidx, np.uint8)
        la.codebook, la.row_scale = arr(codebook, np.float64), arr(row_scale, np.float64)
        la.esc_pos, la.esc_gain = arr(esc_pos, np.int64), arr(esc_gain, np.float64)
    elif kind == "int8":
        points, scales, D = args
        la.points, la.scales = arr(points, np.int8), arr(scales, np.float32)
        la.D, la.G = int(D), scales.shape[1]
    elif kind == "int4":
        nibbles, scales, D, x_ptr, x_col, x_delta = args
        la.nibbles, la.scales = arr(nibbles, np.uint8), arr(scales, np.float32)
        la.x_ptr, la.x_col, la.x_delta = arr(x_ptr, np.int64), arr(x_col, np.int32), arr(x_delta, np.int8)
        la.D, la.G = int(D), scales.shape[1]
    elif kind == "grid-fast":
        codes, bits, gs, G, scales, zeros = args
        la.codes, la.bits, la.gs = arr(codes, np.uint8), int(bits), int(gs)
        la.gscales, la.zeros = arr(scales, np.float32), arr(zeros, np.int32)
        la.C = int(G) * int(gs)
    else:
        return None
    return la, tuple(keep)


_LEAF64: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _leaf_table(leaf32: np.ndarray) -> np.ndarray:
    """Each P(4, k) leaf as one uint64: its packed int8 coordinates (low 32 bits) and its
    squared norm (high 32), so one load gives both (cached per table)."""
    got = _LEAF64.get(id(leaf32))
    if got is None or got[0] is not leaf32:
        pts = leaf32.view(np.int8).reshape(-1, 4).astype(np.int64)
        table = leaf32.astype(np.uint64) | ((pts * pts).sum(axis=1).astype(np.uint64) << np.uint64(32))
        got = _LEAF64[id(leaf32)] = (leaf32, table)
    return got[1]


_KINDS = {"pvq-fast": 0, "int8": 1, "grid-fast": 2, "int4": 3}


def run(kind: str, layer_args: LayerArgs, lo: int, hi: int, *, x: np.ndarray | None = None, out: np.ndarray | None = None,
        weight: np.ndarray | None = None, row0: int = 0, R: int = 0, points_out: np.ndarray | None = None,
        scales_out: np.ndarray | None = None, threads: int = 1) -> int:
    """One kernel call over rows lo..hi: GEMV (x, out), decode (weight rows from row0) or
    transcode (points_out, scales_out). Returns -1, the first bad flat index, or raises
    MemoryError."""
    ca = CallArgs()
    mode = 0
    if weight is not None:
        mode = 1
        ca.weight, ca.row0 = _ptr(weight), row0
    elif points_out is not None:
        mode = 2
        ca.points_out, ca.scales_out = _ptr(points_out), _ptr(scales_out)
    else:
        ca.x, ca.B, ca.out = _ptr(x), x.shape[0], _ptr(out)
    ca.R = R
    # the pool's workers spin for the next call only while torch's ops run on one thread
    spin = 1 if threads > 1 and torch.get_num_threads() == 1 else 0
    bad = _LIB.pvq_run(_KINDS[kind], ctypes.byref(layer_args), ctypes.byref(ca), lo, hi, mode, threads, spin)
    if bad == -2:
        raise MemoryError("pvq C kernel: out of memory for its row buffers")
    return int(bad)
