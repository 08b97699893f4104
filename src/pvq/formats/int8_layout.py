"""The int8 compute layout of PVQ layers: opt-in, for speed (``pvq.load(..., layout="int8")``).

At load each PVQ layer's codes are decoded once (`pvq_fast.pvq_fast_points`) into its
pyramid points as int8 (|p_i| <= K <= 127) and one float32 scale ``gain / ||p||`` per group:
``1 + 4 / D`` bytes per weight in memory (1.25 for D = 16, 0.31x float32), against
``(code_bits + gain_bits) / D / 8`` (0.41 for the default) of the stored layout. A weight
is ``float32(p) * scale``, bit for bit the weight the stored-layout kernel forms, so the
two layouts differ only by the order of float32 sums. The GEMV is a plain int8 x float32
product per group (no decode); prefill decodes the layer into the shared workspace and
calls `F.linear`. The checkpoint on disk does not change; the packed payload is released
after the transcode (`release_payload`), so a model in this layout computes but cannot be
saved (`QuantizedLinear.state_dict` refuses in one line).
"""

from __future__ import annotations

import numba as nb
import numpy as np

__all__ = ["LAYOUTS", "int8_rows", "int8_bytes_per_weight"]

#: Compute layouts `pvq.load` accepts: "packed" (as stored, the default) and "int8".
LAYOUTS = ("packed", "int8")


def int8_bytes_per_weight(group_size: int) -> float:
    return 1.0 + 4.0 / group_size


@nb.njit(cache=True, nogil=True, fastmath={"contract", "reassoc", "nsz"})
def int8_rows(lo, hi, x, points, scales, D, out, weight, row0):
    """Rows lo..hi: ``out[b, r] = sum_g scales[r, g] * <points[r, g], x[b, g]>`` (weight empty)
    or ``weight[r] = float32(points[r]) * scales[r, group]``. Returns -1."""
    B = x.shape[0]
    G = scales.shape[1]
    gemv = weight.shape[0] == 0
    for r in range(lo, hi):
        p = points[r]
        if not gemv:
            for g in range(G):
                s = scales[r, g]
                for i in range(D):
                    weight[r - row0, g * D + i] = np.float32(p[g * D + i]) * s
            continue
        for b in range(B):
            a = np.float32(0.0)
            for g in range(G):
                d = np.float32(0.0)
                for i in range(D):
                    d += np.float32(p[g * D + i]) * x[b, g * D + i]
                a += scales[r, g] * d
            out[b, r] = a
    return -1


class Int8Weights:
    """A PVQ layer's weight in the int8 compute layout: points (R, C) int8, scales (R, G) float32."""

    def __init__(self, points: np.ndarray, scales: np.ndarray) -> None:
        self.points, self.scales = points, scales

    @property
    def nbytes(self) -> int:
        return int(self.points.nbytes + self.scales.nbytes)


def int8_refusal(layer) -> str | None:
    """None if the int8 layout holds this PVQ layer exactly, else why not (one line, naming it)."""
    from .cpu_kernels import refusal
    from .pvq_fast import fast_pvq_supported

    lay = layer.layout
    why = refusal(layer)
    if why is None:
        D, K = int(lay["group_size"]), int(lay["pulses"])
        if K > 127:
            why = f"pulses K={K} (int8 holds |p_i| <= 127)"
        elif not fast_pvq_supported(D, K):
            why = f"group size {D} with K={K} (the int8 transcoder decodes D = 8, 16, 32 with every leaf tabulated)"
    return None if why is None else f"{layer._label()}: the int8 layout cannot hold {why}; load it with layout='packed'"


def transcode_int8(layer) -> Int8Weights:
    """Decode a PVQ layer's stored codes into the int8 layout (codes range-checked, scales finite)."""
    from .cpu_kernels import _ROWS, _raise_bad, cpu_state
    from .errors import LayerDecodeError
    from .pvq_fast import pvq_fast_points

    why = int8_refusal(layer)
    if why is not None:
        from .errors import CheckpointError

        raise CheckpointError(why)
    state = cpu_state(layer)
    R = layer.out_features
    G = int(layer.layout["num_groups"])
    points = np.empty((R, layer.in_features), np.int8)
    scales = np.empty((R, G), np.float32)
    bad = _ROWS.run(pvq_fast_points, 0, R, 4e-9 * R * layer.in_features, *state.args, points, scales)
    if bad >= 0:
        _raise_bad(layer, int(bad))
    if not np.isfinite(scales).all():
        raise LayerDecodeError(f"{layer._label()}: decoded weight has non-finite values")
    return Int8Weights(points, scales)


def apply_layout(model, layout: str) -> int:
    """Put every PVQ layer of `model` in `layout` ("packed": nothing to do; "int8":
    transcode and release the packed payload). Returns the bytes the layers then hold."""
    import torch

    from .linear import QuantizedLinear

    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    if layout == "int8":
        pvq_layers = [m for m in layers if m.method == "pvq"]
        for m in pvq_layers:  # refuse before transcoding anything
            if m.codes.device.type != "cpu":
                raise ValueError(f"{m._label()}: the int8 layout is a CPU layout; the model is on {m.codes.device}")
            why = int8_refusal(m)
            if why is not None:
                from .errors import CheckpointError

                raise CheckpointError(why)
        for m in pvq_layers:
            weights = transcode_int8(m)
            m.release_payload(weights)
    total = 0
    for m in layers:
        compute = m.__dict__.get("_compute")
        total += compute.nbytes if compute is not None else m.stored_bytes
    return total
