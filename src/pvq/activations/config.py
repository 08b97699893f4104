"""Settings of simulated activation quantization: `ActQuantConfig` (method, bits, groups,
gains, search) and its validation against a model's layer widths."""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from typing import Any
import numpy as np
from pvq.codec import BetaGainQuantizer, code_bits, pulses_for_bits
from pvq.codec.counts import table_bytes
from pvq.codec.errors import CodecError
from pvq.settings import POSITIVE, integer, number, setting
from pvq.methods.base import QuantizationError, is_int, is_number
from pvq.methods.input_transforms import INPUT_TRANSFORMS
from pvq.methods.pvq import MAX_TABLE_BYTES, check_gain_settings


ACT_METHODS = ("rtn", "pvq")


ACT_GAINS = ("fp16", "beta")


ACT_SEARCH_METHODS = ("paper", "greedy", "refined")


RTN_MIN_BITS = 2


RTN_MAX_BITS = 8


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
