"""The math of simulated activation quantization, per token and group: round-to-nearest
(symmetric or with a zero point) and PVQ (points on the pyramid, float16 or Beta-quantile
gains), as a fake-quantize in the forward pass and as a real encode/decode pair."""

from __future__ import annotations

from dataclasses import dataclass
import numpy as np
import torch
from pvq.codec import decode, encode, nearest_level, pack_codes, search, unpack_codes
from pvq.codec.errors import CodecError
from pvq.methods.base import QuantizationError, stored_float16
from pvq.activations.config import ActQuantConfig, ActQuantError, _beta_codebook


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
