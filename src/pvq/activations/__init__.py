"""Activation quantization of linear-layer inputs: PVQ and round-to-nearest, per token.

This is **simulated (fake) quantization**: the input of every chosen linear layer is
quantized and dequantized again in floating point in the forward pass, and the layer
then multiplies the float reconstruction with its (float or dequantized) weight. The
reconstruction is exactly what a real low-bit pipeline would decode (the same grid, the
same float16 scales and gains), so the accuracy figures are those of real quantization;
no integer kernel runs and nothing is saved. `encode_activations` / `decode_activations`
are the real thing (codes bit-packed, scales / gains stored), used to measure the bits
and the cost of encoding (bench/act_quant_speed.py), and, with ``encode=True``, inside
the forward pass too (same output, slower).

Methods (`ActQuantConfig.method`), each token's input row cut into groups of D values:

* ``"rtn"``: uniform round-to-nearest with one float16 scale per group. Symmetric
  (default): the mid-rise grid of `pvq.codec.scalar.uniform_rtn`, all 2^b codes used,
  ``step = 2 c absmax / (2^b - 1)`` (c = `clip_ratio`), reconstruction
  ``step * (q + 1/2)``, ``q = clamp(floor(x / step), -2^(b-1), 2^(b-1) - 1)``; costs
  ``b + 16 / D`` bits per value. Asymmetric: the min-max grid of the weight RTN
  (`pvq.methods.rtn.grid_params`) over the clipped range, a b-bit zero point per group
  too: ``b + (16 + b) / D``.
* ``"pvq"``: each group x is mapped to the pyramid point p of P(D, K) of maximal cosine
  (`pvq.codec.search`, K = `pulses_for_bits(D, bits)`, by default the paper's
  projection search, which costs a few operations per value), the unit shape
  ``u = p / ||p||`` and the least-squares gain ``s = <x, u>``; reconstruction ``s u``.
  Gains: ``"fp16"`` (one float16 gain per group: ``(code_bits + 16) / D``) or ``"beta"``
  (`gain_bits`-bit indices into the Beta(D/2, D(G-1)/2) codebook of
  `pvq.codec.BetaGainQuantizer`, scaled by a float16 norm of the token's row, the level
  nearest to s: ``(code_bits + gain_bits) / D + 16 / C``). ``code_bits`` =
  ceil(log2 N(D, K)), what the Fischer code of a shape occupies.

Bits per value count everything a real encoder stores (`ActQuantConfig.bits_per_value`,
checked against the bytes of `encode_activations` in the tests).

`install_act_quant(model, config, layer_names)` attaches an `ActQuantizer` as the child
``input_quantizer`` of each named linear (nn.Linear or QuantizedLinear), applied by the
layer's input-transform pre-hook (`pvq.methods.input_transforms`, after an online rotation
when the model has one); the model's state_dict does not change. Layers reading the very same input tensor (q/k/v, gate/up) share one quantization
per forward (a one-entry cache keyed on the tensor's identity and version). The settings
are described by a JSON-ready record (`act_quant_of(model)`) that packed checkpoints store
and `install_act_quant_record` rebuilds on load. Inference only: no gradient flows through
the quantizers. PVQ runs on the host (numpy/numba); on an accelerator the activations
travel to the host and back.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch
from torch import nn

from pvq.codec import (
    BetaGainQuantizer,
    code_bits,
    decode,
    encode,
    nearest_level,
    pack_codes,
    pulses_for_bits,
    search,
    unpack_codes,
)
from pvq.codec.counts import table_bytes
from pvq.codec.errors import CodecError
from pvq.settings import POSITIVE, integer, number, setting

from pvq.methods.base import QuantizationError, is_int, is_number, stored_float16
from pvq.methods.input_transforms import INPUT_TRANSFORMS, attach_input_transform, detach_input_transform
from pvq.methods.pvq import MAX_TABLE_BYTES, check_gain_settings

__all__ = [
    "ACT_GAINS",
    "ACT_METHODS",
    "ACT_SEARCH_METHODS",
    "QUANTIZER_ATTRIBUTE",
    "RECORD_KIND",
    "ActPayload",
    "ActQuantConfig",
    "ActQuantError",
    "ActQuantizer",
    "act_quant_of",
    "act_quant_summary",
    "check_act_quant",
    "decode_activations",
    "encode_activations",
    "fake_quantize",
    "install_act_quant",
    "install_act_quant_record",
    "remove_act_quant",
]

ACT_METHODS = ("rtn", "pvq")
ACT_GAINS = ("fp16", "beta")
ACT_SEARCH_METHODS = ("paper", "greedy", "refined")
RTN_MIN_BITS, RTN_MAX_BITS = 2, 8
PVQ_MAX_BITS = 8
RECORD_KIND = "simulated-activation-quantization"
RECORD_VERSION = 1
QUANTIZER_ATTRIBUTE = INPUT_TRANSFORMS[1]  # "input_quantizer", child of each quantized linear
_MODEL_ATTRIBUTE = "_pvq_act_quant"
_FP16_MAX = float(np.finfo(np.float16).max)


class ActQuantError(QuantizationError):
    """Activation-quantization settings or inputs that cannot work (the message says what to change)."""


def _divisors_hint(widths: Iterable[int], near: int) -> str:
    """Common divisors of all widths (> 1) closest to `near`, as text."""
    widths = sorted({int(w) for w in widths})
    g = 0
    for w in widths:
        g = math.gcd(g, w)
    divs = [d for d in range(2, g + 1) if g % d == 0]
    below = [d for d in divs if d < near][-1:]
    above = [d for d in divs if d > near][:1]
    if not below + above:
        return "-1 (one group per token)"
    return f"{' or '.join(str(d) for d in below + above)} (divisors of {', '.join(map(str, widths))}), or -1 for one group per token"


@functools.lru_cache(maxsize=64)
def _pulses(D: int, bits: float) -> int:
    return pulses_for_bits(D, bits)


@functools.lru_cache(maxsize=16)
def _beta_codebook(D: int, G: int, bits: int, reconstruction: str) -> np.ndarray:
    return BetaGainQuantizer(D, G, bits, reconstruction).codebook


@dataclass(frozen=True)
class ActQuantConfig:
    """Settings of the activation quantizer (see the module docstring).

    method: "rtn" | "pvq"; bits: rtn: integer code bits per value (2..8); pvq: shape
    bits per value, fractional allowed (K = pulses_for_bits(D, bits)); group_size: D,
    values per group along a token's row (-1: the whole row, one group per token);
    symmetric / clip_ratio: rtn grid (clip_ratio in (0, 1] scales the range the grid
    spans); gain ("fp16" | "beta"), gain_bits, reconstruction: pvq gains; search_method:
    pvq shape search ("paper": projection and rounding, the default, ~20x faster than
    "greedy" for the same shape SNR at D >= 64; "greedy", "refined"); encode: pvq in the
    forward pass through the real Fischer encoder and decoder (same output, slower).
    """

    method: str = setting("pvq", option="act_method")  # pvq.oneshot.Recipe.act declares the flag (none: no config)
    bits: float = setting(4.0, "rtn: integer bits per value (2..8); pvq: shape bits per value, fractional allowed",
                          number(above=0), option="act_bits", requires=("act_method", "!none"))
    group_size: int = setting(64, "values per group D along each token's input (a divisor of every layer's input "
                              "width; -1: one group per token)", integer, option="act_group_size",
                              requires=("act_method", "!none"))
    symmetric: bool = setting(True, "rtn: min-max grid with a zero point (default symmetric)",
                              option="act_asymmetric", negate=True, requires=("act_method", "rtn"))
    clip_ratio: float = setting(1.0, "rtn: clip ratio of the range the grid spans", number(above=0),
                                option="act_clip", requires=("act_method", "rtn"))
    gain: str = setting("fp16", "pvq gains: one float16 per group, or Beta-quantile indices with a float16 norm per "
                        "token", choices=ACT_GAINS, option="act_gain", requires=("act_method", "pvq"))
    gain_bits: int = setting(8, "bits per pvq 'beta' gain index", POSITIVE, option="act_gain_bits",
                             requires=("act_method", "pvq"))
    reconstruction: str = "centroid"
    search_method: str = setting("paper", "pvq shape search (paper: projection and rounding, the fastest)",
                                 choices=ACT_SEARCH_METHODS, option="act_search", requires=("act_method", "pvq"))
    encode: bool = setting(False, "pvq: go through the real encoder and decoder in the forward pass (same result, "
                           "slower)", option="act_encode", requires=("act_method", "pvq"))

    def __post_init__(self) -> None:
        if self.method not in ACT_METHODS:
            raise ActQuantError(f"activation method must be one of {ACT_METHODS}, got {self.method!r}")
        if not is_number(self.bits) or not math.isfinite(float(self.bits)):
            raise ActQuantError(f"activation bits must be a number, got {self.bits!r}")
        if self.method == "rtn":
            if float(self.bits) != int(self.bits) or not RTN_MIN_BITS <= self.bits <= RTN_MAX_BITS:
                raise ActQuantError(
                    f"rtn activation bits must be an integer in {RTN_MIN_BITS}..{RTN_MAX_BITS}, got {self.bits!r}"
                )
        elif not 0 < self.bits <= PVQ_MAX_BITS:
            raise ActQuantError(f"pvq activation shape bits must be in (0, {PVQ_MAX_BITS}], got {self.bits!r}")
        if not is_int(self.group_size) or not (self.group_size == -1 or self.group_size >= 2):
            raise ActQuantError(
                f"activation group_size must be an integer >= 2 or -1 (one group per token), got {self.group_size!r}"
            )
        for name in ("symmetric", "encode"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise ActQuantError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if not is_number(self.clip_ratio) or not 0 < self.clip_ratio <= 1:
            raise ActQuantError(f"clip_ratio must be in (0, 1], got {self.clip_ratio!r}")
        if self.gain not in ACT_GAINS:
            raise ActQuantError(f"activation gain must be one of {ACT_GAINS}, got {self.gain!r}")
        check_gain_settings(self.gain_bits, self.reconstruction, ActQuantError, "activation ")
        if self.search_method not in ACT_SEARCH_METHODS:
            raise ActQuantError(f"search_method must be one of {ACT_SEARCH_METHODS}, got {self.search_method!r}")
        if self.method == "pvq" and self.group_size != -1:
            self.pulses(self.group_size)  # checks the pyramid is usable

    # ------------------------------------------------------------------ sizes

    def group_for(self, width: int) -> int:
        """D for a row of `width` values; ActQuantError (saying what to pick) if it does not divide."""
        D = width if self.group_size == -1 else self.group_size
        if width % D:
            raise ActQuantError(
                f"activation group size {D} does not divide the layer input width {width}; "
                f"use --act-group-size {_divisors_hint([width], D)}"
            )
        if self.method == "pvq":
            self.pulses(D)
            if self.gain == "beta" and width // D < 2:
                raise ActQuantError(
                    f"pvq 'beta' gains need at least 2 groups per token (width {width}, D {D}); "
                    "use a smaller group size or gain 'fp16'"
                )
        return D

    def pulses(self, D: int) -> int:
        """K for pvq groups of D values (ActQuantError if the budget buys no pulse or the
        enumeration tables would be too large)."""
        try:
            K = _pulses(int(D), float(self.bits))
        except CodecError as e:
            raise ActQuantError(f"cannot size the activation pyramid for D={D}: {e}") from None
        if K < 1:
            raise ActQuantError(
                f"{self.bits} shape bits per value buy no pulse for D={D} "
                f"(N(D, 1) = {2 * D} codes need log2({2 * D}) / {D} bits per value); raise --act-bits or --act-group-size"
            )
        need = table_bytes(int(D), K)
        if need > MAX_TABLE_BYTES:
            raise ActQuantError(
                f"D={D} with {self.bits} shape bits (K={K}) needs {need / 2**20:.0f} MiB of enumeration tables "
                f"(limit {MAX_TABLE_BYTES >> 20} MiB); lower --act-bits or --act-group-size"
            )
        return K

    def code_bits(self, D: int) -> int:
        """Bits of one stored code of a group of D values (pvq: ceil(log2 N(D, K)); rtn: D * bits)."""
        if self.method == "rtn":
            return D * int(self.bits)
        return code_bits(int(D), self.pulses(D))

    def bits_per_value(self, width: int) -> float:
        """Stored bits per activation value for rows of `width` values (codes, scales, gains,
        zero points, row norms; no byte padding)."""
        D = self.group_for(width)
        if self.method == "rtn":
            b = int(self.bits)
            return b + (16 if self.symmetric else 16 + b) / D
        gain = 16 if self.gain == "fp16" else self.gain_bits
        extra = 16 / width if self.gain == "beta" else 0.0
        return (self.code_bits(D) + gain) / D + extra

    def describe(self, width: int | None = None) -> str:
        """One line, e.g. 'pvq D=192 K=573 fp16 gains (paper search)'."""
        gs = "per token" if self.group_size == -1 else f"D={self.group_size}"
        if self.method == "rtn":
            grid = "symmetric" if self.symmetric else "asymmetric"
            text = f"rtn {int(self.bits)}-bit {grid} {gs}" + (f" clip {self.clip_ratio:g}" if self.clip_ratio != 1 else "")
        else:
            K = f" K={self.pulses(self.group_size)}" if self.group_size != -1 else ""
            gain = "fp16 gains" if self.gain == "fp16" else f"{self.gain_bits}-bit beta gains"
            text = f"pvq {gs}{K} shape bits {self.bits:g}, {gain} ({self.search_method} search{', real encode' if self.encode else ''})"
        if width is not None:
            text += f", {self.bits_per_value(width):.4f} bits/value at width {width}"
        return text

    # ------------------------------------------------------------------ records

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["bits"] = float(d["bits"])
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ActQuantConfig:
        if not isinstance(data, dict):
            raise ActQuantError(f"activation quantization config must be an object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ActQuantError(f"unknown activation quantization setting(s) {unknown}; known: {sorted(known)}")
        return cls(**data)


# =========================================================================== the quantizers


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _rows(x: torch.Tensor, config: ActQuantConfig) -> tuple[torch.Tensor, int, int]:
    """x as (T, C) and (D, G); checks the width and finiteness."""
    if x.ndim < 1 or x.shape[-1] < 1:
        raise ActQuantError(f"activations must have a last axis of values, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ActQuantError(f"activations must be floating point, got {x.dtype}")
    C = int(x.shape[-1])
    D = config.group_for(C)
    return x.reshape(-1, C), D, C // D


def _rtn_symmetric_scale(groups: torch.Tensor, config: ActQuantConfig) -> torch.Tensor:
    b = int(config.bits)
    absmax = groups.abs().amax(dim=-1, keepdim=True) * config.clip_ratio
    step16 = (2.0 * absmax / (2**b - 1)).to(torch.float16)
    if not torch.isfinite(step16).all():
        raise ActQuantError(f"an activation group's range {float(absmax.max()):.6g} overflows the float16 scale")
    return step16


def _rtn_symmetric_codes(groups: torch.Tensor, step16: torch.Tensor, bits: int) -> torch.Tensor:
    step = step16.to(groups.dtype)
    safe = torch.where(step > 0, step, torch.ones_like(step))
    return torch.floor(groups / safe).clamp(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)


def _rtn_symmetric_values(codes: torch.Tensor, step16: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    step = step16.to(dtype)
    return torch.where(step > 0, (codes.to(dtype) + 0.5) * step, torch.zeros((), dtype=dtype))


def _rtn_asymmetric_params(groups: torch.Tensor, config: ActQuantConfig) -> tuple[torch.Tensor, torch.Tensor]:
    from pvq.methods.rtn import grid_params

    c = config.clip_ratio
    ends = torch.stack([groups.amin(dim=-1) * c, groups.amax(dim=-1) * c], dim=-1).to(torch.float32)
    try:
        scale16, zero = grid_params(ends, int(config.bits))  # range [min(lo, 0), max(hi, 0)]
    except QuantizationError as e:
        raise ActQuantError(f"activations: {e}") from None
    return scale16[..., None], zero[..., None]


def _rtn_asymmetric_codes(groups, scale16, zero, bits) -> torch.Tensor:
    maxq = (1 << bits) - 1
    return (torch.round(groups / scale16.to(groups.dtype)) + zero.to(groups.dtype)).clamp(0, maxq)


def _rtn_asymmetric_values(codes, scale16, zero, dtype) -> torch.Tensor:
    return (codes.to(dtype) - zero.to(dtype)) * scale16.to(dtype)


def _rtn_fake(x2: torch.Tensor, config: ActQuantConfig, D: int, G: int) -> torch.Tensor:
    w = _work_dtype(x2)
    groups = x2.to(w).reshape(-1, G, D)
    b = int(config.bits)
    if config.symmetric:
        step16 = _rtn_symmetric_scale(groups, config)
        out = _rtn_symmetric_values(_rtn_symmetric_codes(groups, step16, b), step16, w)
    else:
        scale16, zero = _rtn_asymmetric_params(groups, config)
        out = _rtn_asymmetric_values(_rtn_asymmetric_codes(groups, scale16, zero, b), scale16, zero, w)
    return out.reshape(x2.shape)


def _unit_shapes(points: np.ndarray) -> np.ndarray:
    p = points.astype(np.float64)
    return p / np.sqrt((p * p).sum(axis=1))[:, None]


def _host_rows(x2: torch.Tensor) -> np.ndarray:
    arr = x2.detach().to(device="cpu", dtype=torch.float64).numpy()
    if not np.isfinite(arr).all():
        raise ActQuantError("activations contain non-finite values (NaN or inf)")
    return arr


def _pvq_parts(rows: np.ndarray, config: ActQuantConfig, D: int, G: int) -> dict[str, np.ndarray]:
    """Shapes and stored gains of rows (T, C) float64: points (T*G, D) int32, and
    'gains' float16 (T, G) or 'gain_indices' (T, G) + 'row_norms' float16 (T,)."""
    K = config.pulses(D)
    groups = rows.reshape(-1, D)
    points = search(groups, K, config.search_method)
    u = _unit_shapes(points)
    s = np.einsum("ij,ij->i", groups, u).reshape(-1, G)  # least-squares gains (>= 0: p has x's signs)
    if config.gain == "fp16":
        return {"points": points, "gains": stored_float16(s, "activation gain", ActQuantError)}
    norms16 = stored_float16(np.sqrt((rows * rows).sum(axis=1)), "activation row norm", ActQuantError)
    norms = norms16.astype(np.float64)
    codebook = _beta_codebook(D, G, config.gain_bits, config.reconstruction)
    ratio = np.divide(s, norms[:, None], out=np.zeros_like(s), where=norms[:, None] > 0)
    idx = nearest_level(ratio, codebook).astype(np.uint8 if config.gain_bits <= 8 else np.uint16)
    return {"points": points, "gain_indices": idx, "row_norms": norms16}


def _pvq_gains(parts: dict[str, np.ndarray], config: ActQuantConfig, D: int, G: int) -> np.ndarray:
    """Gains (T*G,) float64 of stored gains (the one formula for fake and real decode)."""
    if config.gain == "fp16":
        return parts["gains"].astype(np.float64).reshape(-1)
    codebook = _beta_codebook(D, G, config.gain_bits, config.reconstruction)
    return (codebook[parts["gain_indices"].astype(np.int64)] * parts["row_norms"].astype(np.float64)[:, None]).reshape(-1)


def _pvq_values(points: np.ndarray, gains: np.ndarray, shape, like: torch.Tensor) -> torch.Tensor:
    out = _unit_shapes(points) * gains[:, None]
    return torch.from_numpy(out.reshape(shape)).to(device=like.device, dtype=_work_dtype(like))


def fake_quantize(x: torch.Tensor, config: ActQuantConfig) -> torch.Tensor:
    """Simulated (fake) quantization: x quantized per token (groups of D along the last
    axis) and dequantized again, same shape and dtype as x. With ``config.encode`` (pvq)
    the shapes go through the real Fischer encoder and decoder on the way."""
    x2, D, G = _rows(x, config)
    if x2.shape[0] == 0:
        return x.clone()
    with torch.no_grad():
        if config.method == "rtn":
            out = _rtn_fake(x2.detach(), config, D, G)
        elif config.encode:
            return decode_activations(encode_activations(x, config)).to(device=x.device, dtype=x.dtype)
        else:
            parts = _pvq_parts(_host_rows(x2), config, D, G)
            out = _pvq_values(parts["points"], _pvq_gains(parts, config, D, G), x2.shape, x2)
    return out.to(x.dtype).reshape(x.shape)


# =========================================================================== real encode / decode


@dataclass
class ActPayload:
    """Encoded activations: the stored arrays (bit-packed codes, float16 scales / gains,
    ...), the config and the activations' shape."""

    config: ActQuantConfig
    shape: tuple[int, ...]
    tensors: dict[str, np.ndarray]

    @property
    def stored_bytes(self) -> int:
        return int(sum(t.nbytes for t in self.tensors.values()))

    @property
    def bits_per_value(self) -> float:
        n = int(np.prod(self.shape))
        return self.stored_bytes * 8 / n if n else float("nan")


def encode_activations(x: torch.Tensor, config: ActQuantConfig) -> ActPayload:
    """Real quantization of activations x (..., C): what a low-bit pipeline would store.

    rtn: ``codes`` (all codes bit-packed at `bits`, offset to be non-negative), ``scales``
    float16 (T, G) and, asymmetric, ``zeros`` bit-packed at `bits`. pvq: ``codes`` (the
    Fischer codes of the T*G shapes, bit-packed at code_bits(D, K)) and ``gains`` float16
    (T, G) or ``gain_indices`` (bit-packed at gain_bits) + ``row_norms`` float16 (T,)."""
    x2, D, G = _rows(x, config)
    T = x2.shape[0]
    b = int(config.bits)
    tensors: dict[str, np.ndarray] = {}
    with torch.no_grad():
        if config.method == "rtn":
            groups = x2.detach().to(_work_dtype(x2)).reshape(-1, G, D).cpu()
            if config.symmetric:
                step16 = _rtn_symmetric_scale(groups, config)
                codes = _rtn_symmetric_codes(groups, step16, b) + 2 ** (b - 1)
                tensors["scales"] = step16.reshape(T, G).numpy()
            else:
                scale16, zero = _rtn_asymmetric_params(groups, config)
                codes = _rtn_asymmetric_codes(groups, scale16, zero, b)
                tensors["scales"] = scale16.reshape(T, G).numpy()
                tensors["zeros"] = pack_codes(zero.reshape(-1).numpy().astype(np.uint64), b)
            tensors["codes"] = pack_codes(codes.reshape(-1).to(torch.int64).numpy().astype(np.uint64), b)
        else:
            parts = _pvq_parts(_host_rows(x2), config, D, G) if T else {"points": np.zeros((0, D), np.int32),
                                                                       "gains": np.zeros((0, G), np.float16)}
            K = config.pulses(D)
            tensors["codes"] = pack_codes(encode(parts.pop("points"), K, D) if T else np.zeros((0, 1), np.uint64),
                                          config.code_bits(D))
            if "gain_indices" in parts:
                tensors["gain_indices"] = pack_codes(parts["gain_indices"].reshape(-1).astype(np.uint64), config.gain_bits)
                tensors["row_norms"] = parts["row_norms"]
            else:
                tensors["gains"] = parts["gains"]
    return ActPayload(config=config, shape=tuple(int(s) for s in x.shape), tensors=tensors)


def decode_activations(payload: ActPayload) -> torch.Tensor:
    """The activations a payload encodes, float64 of the source's shape; equal to
    `fake_quantize` of the source (up to the final cast to the source's dtype)."""
    config = payload.config
    C = int(payload.shape[-1])
    D = config.group_for(C)
    G = C // D
    T = int(np.prod(payload.shape[:-1])) if len(payload.shape) > 1 else 1
    t = payload.tensors
    b = int(config.bits)
    try:
        if config.method == "rtn":
            scales = torch.from_numpy(np.asarray(t["scales"]).reshape(T, G, 1))
            codes = torch.from_numpy(unpack_codes(t["codes"], T * C, b)[:, 0].astype(np.int64)).reshape(T, G, D)
            if config.symmetric:
                out = _rtn_symmetric_values(codes - 2 ** (b - 1), scales, torch.float64)
            else:
                zero = torch.from_numpy(unpack_codes(t["zeros"], T * G, b)[:, 0].astype(np.int64)).reshape(T, G, 1)
                out = _rtn_asymmetric_values(codes, scales, zero, torch.float64)
            return out.reshape(payload.shape)
        K = config.pulses(D)
        points = decode(unpack_codes(t["codes"], T * G, config.code_bits(D)), D, K) if T else np.zeros((0, D), np.int32)
        if config.gain == "fp16":
            parts = {"gains": np.asarray(t["gains"]).reshape(T, G)}
        else:
            idx = unpack_codes(t["gain_indices"], T * G, config.gain_bits)[:, 0].reshape(T, G)
            parts = {"gain_indices": idx, "row_norms": np.asarray(t["row_norms"])}
        gains = _pvq_gains(parts, config, D, G)
        return torch.from_numpy((_unit_shapes(points) * gains[:, None]).reshape(payload.shape))
    except KeyError as e:
        raise ActQuantError(f"activation payload lacks {e.args[0]!r}") from None
    except CodecError as e:
        raise ActQuantError(f"corrupt activation payload: {e}") from None


# =========================================================================== the module


class _SharedInput:
    """One-entry cache shared by the quantizers of a model: layers fed the very same
    tensor (q/k/v, gate/up) quantize it once. Keyed on identity and version counter."""

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.x = None
        self.version = None
        self.config = None
        self.out = None

    def get(self, x: torch.Tensor, config: ActQuantConfig):
        if self.x is not x or self.config != config:
            return None
        try:
            if x._version != self.version:
                return None
        except RuntimeError:  # inference tensors have no version counter
            return None
        return self.out

    def put(self, x: torch.Tensor, config: ActQuantConfig, out: torch.Tensor) -> None:
        try:
            version = x._version
        except RuntimeError:
            self.clear()
            return
        self.x, self.version, self.config, self.out = x, version, config, out


class ActQuantizer(nn.Module):
    """Simulated (fake) quantization of a layer's input: ``forward(x)`` returns
    `fake_quantize(x, config)`. Holds no parameters or buffers. ``calls``, ``values`` and
    ``seconds`` count the work done (cache hits excluded)."""

    def __init__(self, config: ActQuantConfig, name: str | None = None) -> None:
        super().__init__()
        if not isinstance(config, ActQuantConfig):
            raise ActQuantError(f"config must be an ActQuantConfig, got {type(config).__name__}")
        self.config = config
        self.layer_name = name
        self.shared: _SharedInput | None = None
        self.calls = 0
        self.values = 0
        self.seconds = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.shared is not None:
            hit = self.shared.get(x, self.config)
            if hit is not None:
                return hit
        t0 = time.perf_counter()
        try:
            out = fake_quantize(x, self.config)
        except ActQuantError as e:
            where = f"input of {self.layer_name!r}" if self.layer_name else "activations"
            raise ActQuantError(f"{where}: {e}") from None
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        self.values += x.numel()
        if self.shared is not None:
            self.shared.put(x, self.config, out)
        return out

    def extra_repr(self) -> str:
        return f"simulated (fake) quantization: {self.config.describe()}"


def act_quant_of(model: nn.Module) -> dict[str, Any] | None:
    """The activation-quantization record of a model (JSON-ready), or None."""
    return getattr(model, _MODEL_ATTRIBUTE, None)


def _input_width(module: nn.Module, name: str) -> int:
    width = getattr(module, "in_features", None)
    if not isinstance(module, nn.Module) or not is_int(width):
        raise ActQuantError(f"{name!r} is a {type(module).__name__}, not a linear layer with in_features")
    return int(width)


def check_act_quant(model: nn.Module, config: ActQuantConfig, layer_names: Iterable[str]) -> dict[int, float]:
    """Check that every named layer exists and takes inputs the config can quantize;
    returns {input width: bits per value}. ActQuantError naming the layer and the fix."""
    if not isinstance(config, ActQuantConfig):
        raise ActQuantError(f"config must be an ActQuantConfig, got {type(config).__name__}")
    names = list(layer_names)
    if not names:
        raise ActQuantError("no layers to quantize the activations of")
    widths: dict[str, int] = {}
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ActQuantError(f"layer {name!r} is not a module of the model") from None
        widths[name] = _input_width(module, name)
    out: dict[int, float] = {}
    for name, width in widths.items():
        if width in out:
            continue
        try:
            out[width] = config.bits_per_value(width)
        except ActQuantError as e:
            if config.group_size != -1 and width % config.group_size:
                raise ActQuantError(
                    f"activation group size {config.group_size} does not divide the input width {width} of {name!r}; "
                    f"use --act-group-size {_divisors_hint(widths.values(), config.group_size)}"
                ) from None
            raise ActQuantError(f"{name!r} (input width {width}): {e}") from None
    return out


def install_act_quant(model: nn.Module, config: ActQuantConfig, layer_names: Iterable[str]) -> dict[str, Any]:
    """Quantize the inputs of the named linears (simulated, see the module docstring);
    returns the record, also attached to the model. Install after weight quantization:
    the calibration Hessians of `pvq.calibrate` are collected from float activations
    (QuaRot does the same), and a model that already has quantizers is refused."""
    if act_quant_of(model) is not None or any(isinstance(m, ActQuantizer) for m in model.modules()):
        raise ActQuantError("the model already quantizes its activations; remove_act_quant(model) first")
    names = sorted(set(layer_names))
    bpv = check_act_quant(model, config, names)
    shared = _SharedInput()
    for name in names:
        module = model.get_submodule(name)
        quantizer = ActQuantizer(config, name)
        quantizer.shared = shared
        attach_input_transform(module, QUANTIZER_ATTRIBUTE, quantizer)
    record = {
        "kind": RECORD_KIND,
        "version": RECORD_VERSION,
        "config": config.to_dict(),
        "layers": names,
        "bits_per_value": {str(w): v for w, v in sorted(bpv.items())},
        "weights_calibrated_with": "float activations",
    }
    setattr(model, _MODEL_ATTRIBUTE, record)
    return record


def remove_act_quant(model: nn.Module) -> None:
    """Undo `install_act_quant` (the model computes with float activations again)."""
    for module in list(model.modules()):
        if isinstance(module._modules.get(QUANTIZER_ATTRIBUTE), ActQuantizer):
            detach_input_transform(module, QUANTIZER_ATTRIBUTE)
    if hasattr(model, _MODEL_ATTRIBUTE):
        delattr(model, _MODEL_ATTRIBUTE)


def install_act_quant_record(model: nn.Module, record: dict[str, Any]) -> None:
    """Rebuild the activation quantizers a record describes (e.g. from a checkpoint)."""
    if not isinstance(record, dict):
        raise ActQuantError(f"activation quantization record is a {type(record).__name__}, not an object")
    if record.get("kind") != RECORD_KIND:
        raise ActQuantError(f"unknown activation quantization kind {record.get('kind')!r} (this pvq builds {RECORD_KIND!r})")
    version = record.get("version")
    if not is_int(version) or version < 1:
        raise ActQuantError(f"activation quantization record version {version!r} is not a valid version")
    if version > RECORD_VERSION:
        raise ActQuantError(f"activation quantization record version {version} is newer than this pvq ({RECORD_VERSION}); upgrade pvq")
    layers = record.get("layers")
    if not isinstance(layers, list) or not all(isinstance(n, str) for n in layers):
        raise ActQuantError("activation quantization record lacks its list of layers")
    config = ActQuantConfig.from_dict(record.get("config"))
    rebuilt = install_act_quant(model, config, layers)
    recorded = record.get("bits_per_value")
    if recorded is not None and recorded != rebuilt["bits_per_value"]:
        remove_act_quant(model)
        raise ActQuantError(f"activation quantization record says {recorded} bits per value, the rebuilt quantizers {rebuilt['bits_per_value']}")
    setattr(model, _MODEL_ATTRIBUTE, dict(record))


def act_quant_summary(record: dict[str, Any] | None) -> str | None:
    """One line describing an activation-quantization record (None: float activations)."""
    if record is None:
        return None
    config = ActQuantConfig.from_dict(record["config"])
    bpv = ", ".join(f"{v:.4f} at width {w}" for w, v in record.get("bits_per_value", {}).items())
    return (f"simulated (fake) quantization, {config.describe()}; bits/value {bpv}; inputs of "
            f"{len(record['layers'])} linear layers; weights calibrated with float activations")
