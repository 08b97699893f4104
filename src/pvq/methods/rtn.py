"""Round-to-nearest on an asymmetric min-max integer grid, per group of input columns.

Also home of the grid itself (one concept, one place), which `gptq.py` reuses:

* `grid_params(w, bits)`: scale and zero point of the groups along the last axis of w.
  The range is ``[min(w_min, 0), max(w_max, 0)]`` (zero always representable, so the
  zero point is an integer in ``[0, 2^b - 1]``), ``scale = range / (2^b - 1)`` rounded
  *up* to float16 (so the grid still spans the range and every weight is within half a
  step of its reconstruction) *before* the zero point and the codes are computed from
  it, so the stored scale is the one actually used. An all-zero group gets the range
  [-1, 1] (as GPTQ).
* `grid_quantize(w, scale, zero, bits)`: codes ``clamp(round(w / s) + z, 0, 2^b - 1)``.
* `grid_dequantize(codes, scale, zero)`: ``(code - z) * s`` in float32; the quantizers
  build their result with this very function, so dequantizing the stored payload
  reproduces it bit for bit.
* `pack_grid` / `unpack_grid`: the stored payload, ``codes`` (R*C codes, row-major,
  bit-packed at b bits), ``scales`` (float16, (R, G)) and ``zeros`` (R*G zero points,
  row-major, bit-packed at b bits).

Groups are `group_size` consecutive input columns; ``group_size`` -1 or 0 means one group
per output channel (row). The layer width must be a multiple of the group size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pvq.codec import pack_codes, packed_size, unpack_codes
from pvq.codec.errors import CodecError
from pvq.settings import count, integer, setting

from pvq.methods.base import (QuantizationError, QuantizedTensor, TensorSpec, TunableWeight, as_float32,
                              check_config, check_weight, predicted_change, proxy_loss, stored_float16)

__all__ = [
    "CONFIG",
    "RTNConfig",
    "dequantize",
    "grid_dequantize",
    "grid_params",
    "grid_quantize",
    "layout",
    "needs_hessian",
    "nominal_bits_per_weight",
    "payload_spec",
    "pack_grid",
    "quantize",
    "rate_ladder",
    "tunable",
    "resolve_group_size",
    "unpack_grid",
]

MIN_BITS, MAX_BITS = 2, 8


def check_bits(bits) -> None:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)):
        raise QuantizationError(f"bits must be an integer in {MIN_BITS}..{MAX_BITS}, got {bits!r}")
    if not MIN_BITS <= bits <= MAX_BITS:
        raise QuantizationError(f"bits must be in {MIN_BITS}..{MAX_BITS}, got {bits}")


def check_group_size(group_size) -> None:
    if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)):
        raise QuantizationError(f"group_size must be an integer (-1 or 0: one group per row), got {group_size!r}")
    if group_size < -1:
        raise QuantizationError(f"group_size must be positive, or -1 / 0 for one group per row, got {group_size}")


@dataclass(frozen=True)
class RTNConfig:
    """bits: 2..8 per weight; group_size: input columns per (scale, zero) pair, -1/0 = per row."""

    bits: int = setting(4, "integer bits per weight", count(2))
    group_size: int = setting(128, "input columns per float16 scale and zero point (-1: one per output row)", integer)

    def __post_init__(self) -> None:
        check_bits(self.bits)
        check_group_size(self.group_size)


CONFIG = RTNConfig


def resolve_group_size(group_size: int, columns: int) -> int:
    """Effective group size for a layer of `columns` inputs; QuantizationError if it does not divide."""
    if group_size in (-1, 0):
        return columns
    if group_size > columns:
        raise QuantizationError(f"group_size {group_size} is larger than in_features {columns}; "
                                f"pick a divisor of {columns} or -1 for one group per row")
    if columns % group_size != 0:
        below = max(d for d in range(1, group_size) if columns % d == 0) if group_size > 1 else None
        above = next((d for d in range(group_size + 1, columns + 1) if columns % d == 0), None)
        near = [str(d) for d in (below, above) if d is not None and d > 1]
        hint = f" (nearest: {' or '.join(near)})" if near else ""
        raise QuantizationError(
            f"in_features {columns} is not divisible by group_size {group_size}; "
            f"pick a divisor of {columns}{hint} or -1 for one group per row"
        )
    return group_size


def nominal_bits_per_weight(config: RTNConfig, columns: int | None = None) -> float:
    """bits + (16-bit scale + bits-bit zero) / group_size; per-row groups need `columns`."""
    gs = config.group_size
    if gs in (-1, 0):
        if columns is None:
            raise QuantizationError("per-row groups (group_size -1/0): pass columns to get the nominal bits")
        gs = columns
    return config.bits + (16 + config.bits) / gs


def needs_hessian(config: RTNConfig) -> bool:
    """Never: RTN rounds the weights alone (a Hessian, when given, only scores the result)."""
    return False


def layout(config: RTNConfig, shape: tuple[int, int]) -> dict:
    """What the decoder reads: bits, the layer's resolved group size and group count."""
    R, C = (int(s) for s in shape)
    gs = resolve_group_size(config.group_size, C)
    return {"bits": int(config.bits), "group_size": int(gs), "num_groups": int(C // gs), "code_order": "row-major"}


def payload_spec(config: RTNConfig, shape: tuple[int, int]) -> dict[str, TensorSpec]:
    """``codes`` and ``zeros`` bit-packed at `bits` (uint8 streams), ``scales`` float16 (R, G)."""
    R, C = (int(s) for s in shape)
    lay = layout(config, shape)
    bits, G = lay["bits"], lay["num_groups"]
    return {
        "codes": TensorSpec((packed_size(R * C, bits),), "uint8"),
        "scales": TensorSpec((R, G), "float16"),
        "zeros": TensorSpec((packed_size(R * G, bits),), "uint8"),
    }


# --------------------------------------------------------------------------- the grid


def grid_params(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale float16, zero int32) of the groups along the last axis of `w` (float32).

    Asymmetric min-max over ``[min(w, 0), max(w, 0)]``; the scale is rounded to
    float16 first, upwards (a tiny range gets the smallest subnormal; overflow raises),
    and the zero point ``round(-min / scale)`` is computed with the rounded scale.
    """
    maxq = (1 << bits) - 1
    xmin = w.amin(dim=-1).clamp(max=0.0)
    xmax = w.amax(dim=-1).clamp(min=0.0)
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, torch.full_like(xmin, -1.0), xmin)
    xmax = torch.where(empty, torch.full_like(xmax, 1.0), xmax)
    scale = (xmax - xmin) / maxq
    scale16 = scale.to(torch.float16)
    # round the scale up, never down, so the grid still spans the group's range
    scale16 = torch.where(scale16.float() < scale, torch.nextafter(scale16, torch.full_like(scale16, float("inf"))), scale16)
    if not torch.isfinite(scale16).all():
        worst = float((xmax - xmin).max())
        raise QuantizationError(f"a group's range {worst:.6g} overflows the float16 scale")
    zero = torch.round(-xmin / scale16.float()).clamp(0, maxq).to(torch.int32)
    return scale16, zero


def grid_quantize(w: torch.Tensor, scale16: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes (int32) ``clamp(round(w / s) + z, 0, 2^b - 1)``; scale/zero broadcast against w."""
    maxq = (1 << bits) - 1
    return (torch.round(w / scale16.float()) + zero).clamp(0, maxq).to(torch.int32)


def grid_dequantize(codes: torch.Tensor, scale16: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``(code - z) * s`` in float32 (broadcasting); the reconstruction of record."""
    return (codes - zero).to(torch.float32) * scale16.float()


def grid_reconstruct(codes: torch.Tensor, scale16: torch.Tensor, zero: torch.Tensor, group_size: int) -> torch.Tensor:
    """Weights (R, C) float32 from codes (R, C) and per-group scale/zero (R, G)."""
    R, C = codes.shape
    G = C // group_size
    q = grid_dequantize(codes.view(R, G, group_size), scale16[:, :, None], zero[:, :, None])
    return q.reshape(R, C)


def _pack(values: torch.Tensor, bits: int) -> np.ndarray:
    return pack_codes(values.reshape(-1).numpy().astype(np.uint64), bits)


def pack_grid(codes: torch.Tensor, scale16: torch.Tensor, zero: torch.Tensor, bits: int) -> dict[str, np.ndarray]:
    """The stored arrays: ``codes`` and ``zeros`` bit-packed at `bits`, ``scales`` float16 (R, G)."""
    return {
        "codes": _pack(codes, bits),
        "scales": np.ascontiguousarray(scale16.numpy().astype(np.float16)),
        "zeros": _pack(zero, bits),
    }


def unpack_grid(
    tensors: dict[str, np.ndarray], rows: int, columns: int, groups: int, bits: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of `pack_grid`: (codes (R, C) int32, scale float16 (R, G), zero int32 (R, G))."""
    try:
        codes = unpack_codes(tensors["codes"], rows * columns, bits)[:, 0].astype(np.int32)
        zeros = unpack_codes(tensors["zeros"], rows * groups, bits)[:, 0].astype(np.int32)
    except KeyError as e:
        raise QuantizationError(f"stored tensors lack {e.args[0]!r}") from None
    except CodecError as e:
        raise QuantizationError(f"corrupt grid payload: {e}") from None
    scales = np.asarray(tensors["scales"])
    if scales.dtype != np.float16 or scales.shape != (rows, groups):
        raise QuantizationError(f"scales must be float16 of shape {(rows, groups)}, got {scales.dtype} {scales.shape}")
    return (
        torch.from_numpy(codes.reshape(rows, columns)),
        torch.from_numpy(scales.copy()),
        torch.from_numpy(zeros.reshape(rows, groups)),
    )


# --------------------------------------------------------------------------- the method


def quantize(weight: torch.Tensor, hessian: torch.Tensor | None = None, config: RTNConfig | None = None) -> QuantizedTensor:
    """Round every weight to its group's min-max grid (the Hessian only scores the result)."""
    config = check_config(config, RTNConfig)
    check_weight(weight, hessian)
    W = as_float32(weight)
    R, C = W.shape
    gs = resolve_group_size(config.group_size, C)
    G = C // gs
    groups = W.view(R, G, gs)
    scale16, zero = grid_params(groups, config.bits)
    codes = grid_quantize(groups, scale16[:, :, None], zero[:, :, None], config.bits).reshape(R, C)
    Q = grid_reconstruct(codes, scale16, zero, gs)
    qt = QuantizedTensor(
        method="rtn",
        shape=(R, C),
        tensors=pack_grid(codes, scale16, zero, config.bits),
        meta={"bits": int(config.bits), "group_size": int(gs), "num_groups": int(G), "code_order": "row-major"},
    )
    if hessian is not None:
        qt.proxy_loss = proxy_loss(W, Q, hessian.detach().to("cpu"))
    qt.extra["nominal_bits_per_weight"] = nominal_bits_per_weight(config, C)
    return qt


def dequantize(qt: QuantizedTensor) -> torch.Tensor:
    R, C = qt.shape
    meta = qt.meta
    bits, gs, G = int(meta["bits"]), int(meta["group_size"]), int(meta["num_groups"])
    if gs * G != C:
        raise QuantizationError(f"meta group_size {gs} x num_groups {G} does not match in_features {C}")
    codes, scale16, zero = unpack_grid(qt.tensors, R, C, G, bits)
    return grid_reconstruct(codes, scale16, zero, gs)


class TunableGrid(TunableWeight):
    """RTN/GPTQ weight with the zero points fixed, the float16 scales (R, G) trained and
    the integer codes held as int16 steps (code - zero) that can move one grid step
    (`code_moves`); GPTQ's act-order permutation (``perm``, when stored) is applied as in
    its dequantize."""

    codes_kind = "grid codes"

    def __init__(self, qt: QuantizedTensor) -> None:
        super().__init__(qt)
        R, C = qt.shape
        meta = qt.meta
        self.bits, gs, G = int(meta["bits"]), int(meta["group_size"]), int(meta["num_groups"])
        codes, scale16, zero = unpack_grid(qt.tensors, R, C, G, self.bits)
        self.register_buffer("zeros", zero.to(torch.int16))
        self.register_buffer("steps", (codes.view(R, G, gs) - zero[:, :, None]).to(torch.int16))
        self.scales = torch.nn.Parameter(scale16.float())
        perm = qt.tensors.get("perm")
        if perm is not None:
            perm = torch.from_numpy(np.asarray(perm).astype(np.int64))
            inverse = torch.empty_like(perm)
            inverse[perm] = torch.arange(C)
            self.register_buffer("perm", perm)
            self.register_buffer("inverse_perm", inverse)
        else:
            self.perm = self.inverse_perm = None

    def build(self) -> torch.Tensor:
        W = (self.steps.to(torch.float32) * self.scales[:, :, None]).reshape(self.qt.shape)
        return W if self.inverse_perm is None else W[:, self.inverse_perm]

    def code_groups(self) -> torch.Tensor:
        return self.steps.view(-1, 1)

    def code_moves(self, grad: torch.Tensor, curvature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every code one step down the gradient (within 0..2^bits - 1), with its predicted
        change -|g| s + F s^2 / 2 (s the group's scale; +inf where the step would leave the
        grid or is predicted not to help)."""
        with torch.no_grad():
            g = grad.to(torch.float32)
            F = curvature
            if self.perm is not None:  # into the stored column order
                g, F = g[:, self.perm], F[:, self.perm]
            R, G, gs = self.steps.shape
            g, F = g.reshape(R, G, gs), F.reshape(R, G, gs)
            direction = -torch.sign(g)
            codes = self.steps.to(torch.int32) + self.zeros.to(torch.int32)[:, :, None] + direction.to(torch.int32)
            inside = (codes >= 0) & (codes <= (1 << self.bits) - 1) & (direction != 0)
            change = (direction * self.scales.detach()[:, :, None])[..., None]
            delta = predicted_change(g[..., None], F[..., None], change)
            delta = torch.where(inside & (delta < 0), delta, torch.tensor(torch.inf))
            moved = self.steps + direction.to(torch.int16)
            return delta.reshape(-1), moved.reshape(-1, 1)

    def trained(self) -> dict[str, np.ndarray]:
        out = {"scales": stored_float16(self.scales, "scale")}
        if self.codes_changed:
            R, G, gs = self.steps.shape
            codes = (self.steps.to(torch.int32) + self.zeros.to(torch.int32)[:, :, None]).reshape(R, G * gs)
            out["codes"] = _pack(codes.cpu(), self.bits)
        return out


def tunable(qt: QuantizedTensor) -> TunableWeight:
    """The layer's weight as a function of its scales (`TunableGrid`)."""
    return TunableGrid(qt)


def rate_ladder(config):
    """The settings a per-layer bit allocation chooses from: `config` with 2..8 bits."""
    import dataclasses

    return [dataclasses.replace(config, bits=b) for b in range(2, 9)]
