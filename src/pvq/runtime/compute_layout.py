"""Compute layouts of PVQ layers: transcoded at load for speed (``pvq.load(..., layout=...)``).

At load each PVQ layer's codes are decoded once into its pyramid points and one float32
scale per group (``float32(gain / ||p||)``, exactly as the packed kernels form it), held as

* "int8": the points as int8 (|p_i| <= K <= 127): ``1 + 4/D`` bytes per weight (1.25 at
  D = 16, 0.31x float32);
* "int4": the points clamped to [-8, 7] as nibbles (two per byte), and per row the few
  points outside that range as escapes (column int32, the difference int8; 0.08% of the
  demo model's weights): ``0.5 + 4/D`` bytes per weight plus 5 bytes an escape (0.75 at
  D = 16, 0.19x float32).

against ``(code_bits + gain_bits) / D / 8`` (0.41 for the default) of the stored ("packed")
layout. A weight is ``float32(p) * scale`` in every layout, bit for bit, so layouts differ
only by the order of float32 sums. The GEMV is a plain small-integer x float32 product per
group (no decode); prefill decodes the layer into the shared workspace and calls
`F.linear`. The checkpoint on disk does not change; the packed payload is released after
the transcode (`release_payload`), so a model in a compute layout computes but cannot be
saved (`QuantizedLinear.state_dict` refuses in one line).
"""

from __future__ import annotations

import numba as nb
import numpy as np

__all__ = ["LAYOUTS", "Int4Weights", "Int8Weights", "apply_layout", "int4_rows", "int8_rows", "transcode",
           "transcode_int8"]

#: Layouts `pvq.load` accepts: "packed" (as stored, the default), "int8" and "int4"; "auto"
#: picks int4 where it holds every PVQ layer, else packed (`resolve_layout`).
LAYOUTS = ("packed", "int8", "int4", "auto")


@nb.njit(inline="always", fastmath={"contract", "reassoc", "nsz"})
def _int8_row(r, x, points, scales, D, out, weight, row0, pr):
    """Row r of the layer from points[pr] (its int8 points): GEMV into out[:, r] or the weight row."""
    G = scales.shape[1]
    p = points[pr]
    if weight.shape[0] != 0:
        for g in range(G):
            s = scales[r, g]
            for i in range(D):
                weight[r - row0, g * D + i] = np.float32(p[g * D + i]) * s
        return
    for b in range(x.shape[0]):
        a = np.float32(0.0)
        for g in range(G):
            d = np.float32(0.0)
            for i in range(D):
                d += np.float32(p[g * D + i]) * x[b, g * D + i]
            a += scales[r, g] * d
        out[b, r] = a


@nb.njit(cache=True, nogil=True, fastmath={"contract", "reassoc", "nsz"})
def int8_rows(lo, hi, x, points, scales, D, out, weight, row0):
    """Rows lo..hi: ``out[b, r] = sum_g scales[r, g] * <points[r, g], x[b, g]>`` (weight empty)
    or ``weight[r - row0] = float32(points[r]) * scales[r, group]``. Returns -1."""
    for r in range(lo, hi):
        _int8_row(r, x, points, scales, D, out, weight, row0, r)
    return -1


@nb.njit(cache=True, nogil=True, fastmath={"contract", "reassoc", "nsz"})
def int4_rows(lo, hi, x, nibbles, scales, D, x_ptr, x_col, x_delta, out, weight, row0):
    """As `int8_rows`, the points read from nibbles (less 8) plus the row's escapes."""
    G = scales.shape[1]
    C = G * D
    pts = np.empty((1, C), np.int8)
    p = pts[0]
    for r in range(lo, hi):
        q = nibbles[r]
        for j in range(C // 2):
            v = np.int32(q[j])
            p[2 * j] = np.int8((v & 15) - 8)
            p[2 * j + 1] = np.int8((v >> 4) - 8)
        for e in range(x_ptr[r], x_ptr[r + 1]):
            p[x_col[e]] = np.int8(np.int32(p[x_col[e]]) + np.int32(x_delta[e]))
        _int8_row(r, x, pts, scales, D, out, weight, row0, 0)
    return -1


class Int8Weights:
    """A PVQ layer's weight in the int8 compute layout: points (R, C) int8, scales (R, G) float32."""

    kind = "int8"
    kernel = staticmethod(int8_rows)  # the numba kernel of the layout (`cpu_kernels.cpu_state`); static: a numba
    # dispatcher read through an instance would bind to it

    def __init__(self, points: np.ndarray, scales: np.ndarray) -> None:
        self.points, self.scales = points, scales

    @property
    def nbytes(self) -> int:
        return int(self.points.nbytes + self.scales.nbytes)

    def int8_points(self) -> np.ndarray:
        return self.points

    def kernel_args(self, D: int) -> tuple:
        return (self.points, self.scales, np.int64(D))


class Int4Weights:
    """The int4 compute layout: nibbles (R, C/2) uint8 of clamp(p, -8, 7) + 8 (low nibble
    first), scales (R, G) float32, and the escapes of each row r: columns
    ``x_col[x_ptr[r]:x_ptr[r+1]]`` (int32) where p differs from its clamp by ``x_delta`` (int8)."""

    kind = "int4"
    kernel = staticmethod(int4_rows)

    def __init__(self, nibbles, scales, x_ptr, x_col, x_delta) -> None:
        self.nibbles, self.scales, self.x_ptr, self.x_col, self.x_delta = nibbles, scales, x_ptr, x_col, x_delta

    @classmethod
    def from_int8(cls, w: Int8Weights) -> "Int4Weights":
        p = w.points
        q = np.clip(p, -8, 7)
        rows, cols = np.nonzero(p != q)
        delta = (p[rows, cols].astype(np.int16) - q[rows, cols]).astype(np.int8)
        u = (q + 8).astype(np.uint8)
        nibbles = np.ascontiguousarray(u[:, 0::2] | (u[:, 1::2] << 4))
        x_ptr = np.zeros(p.shape[0] + 1, np.int64)
        np.cumsum(np.bincount(rows, minlength=p.shape[0]), out=x_ptr[1:])
        return cls(nibbles, w.scales, x_ptr, cols.astype(np.int32), delta)

    @property
    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in (self.nibbles, self.scales, self.x_ptr, self.x_col, self.x_delta)))

    def int8_points(self) -> np.ndarray:
        lo = (self.nibbles & 15).astype(np.int16) - 8
        hi = (self.nibbles >> 4).astype(np.int16) - 8
        p = np.empty((self.nibbles.shape[0], 2 * self.nibbles.shape[1]), np.int16)
        p[:, 0::2], p[:, 1::2] = lo, hi
        rows = np.repeat(np.arange(p.shape[0]), np.diff(self.x_ptr))
        p[rows, self.x_col] += self.x_delta
        return p.astype(np.int8)

    def kernel_args(self, D: int) -> tuple:
        return (self.nibbles, self.scales, np.int64(D), self.x_ptr, self.x_col, self.x_delta)


def int8_refusal(layer) -> str | None:
    """None if the compute layouts hold this PVQ layer exactly, else why not (one line, naming it)."""
    from pvq.runtime.cpu_kernels import refusal
    from pvq.runtime.pvq_fast import fast_pvq_supported

    lay = layer.layout
    why = refusal(layer)
    if why is None:
        D, K = int(lay["group_size"]), int(lay["pulses"])
        if K > 127:
            why = f"pulses K={K} (int8 holds |p_i| <= 127)"
        elif not fast_pvq_supported(D, K):
            why = f"group size {D} with K={K} (the int8 transcoder decodes D = 8, 16, 32 with every leaf tabulated)"
    return None if why is None else f"{layer._label()}: the compute layouts cannot hold {why}; load it with layout='packed'"


def transcode(layer, layout: str):
    """A PVQ layer's weights in `layout` ("int8" or "int4")."""
    w = transcode_int8(layer)
    return w if layout == "int8" else Int4Weights.from_int8(w)


def transcode_int8(layer) -> Int8Weights:
    """Decode a PVQ layer's stored codes into the int8 layout (codes range-checked, scales finite)."""
    from pvq.runtime.cpu_kernels import run_transcode
    from pvq.runtime.errors import LayerDecodeError

    why = int8_refusal(layer)
    if why is not None:
        from pvq.runtime.errors import CheckpointError

        raise CheckpointError(why)
    R = layer.out_features
    G = int(layer.layout["num_groups"])
    points = np.empty((R, layer.in_features), np.int8)
    scales = np.empty((R, G), np.float32)
    run_transcode(layer, points, scales)
    if not np.isfinite(scales).all():
        raise LayerDecodeError(f"{layer._label()}: decoded weight has non-finite values")
    return Int8Weights(points, scales)


def resolve_layout(model, layout: str) -> str:
    """`layout` itself, or for "auto" (what `pvq generate` and `pvq chat` use): "int4" when it
    holds every PVQ layer on the CPU, else "packed"."""
    from pvq.runtime.linear import QuantizedLinear

    if layout != "auto":
        return layout
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear) and m.method == "pvq"]
    if layers and all(m.codes.device.type == "cpu" and int8_refusal(m) is None for m in layers):
        return "int4"
    return "packed"


def apply_layout(model, layout: str) -> str:
    """Put every PVQ layer of `model` in `layout` ("packed": nothing to do; "int8" or "int4":
    transcode and release the packed payload; "auto": `resolve_layout`). Returns the layout."""
    from pvq.runtime.linear import QuantizedLinear

    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    layout = resolve_layout(model, layout)
    if layout != "packed":
        pvq_layers = [m for m in model.modules() if isinstance(m, QuantizedLinear) and m.method == "pvq"]
        for m in pvq_layers:  # refuse before transcoding anything
            if m.codes.device.type != "cpu":
                raise ValueError(f"{m._label()}: the {layout} layout is a CPU layout; the model is on {m.codes.device}")
            why = int8_refusal(m)
            if why is not None:
                from pvq.runtime.errors import CheckpointError

                raise CheckpointError(why)
        for m in pvq_layers:
            m.release_payload(transcode(m, layout))
    return layout
