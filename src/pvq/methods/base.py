"""What every quantization method returns, and the proxy loss they are judged by.

A method is one module (`rtn.py`, `gptq.py`, `pvq.py`, `gptvq.py`) exposing one contract:
    CONFIG                              its typed, validated config class
    needs_hessian(config) -> bool       whether quantize needs a calibration Hessian
    nominal_bits_per_weight(config, columns) -> float
    layout(config, shape) -> dict       the JSON-able settings the decoder reads
    payload_spec(config, shape) -> {name: TensorSpec}   the stored arrays, before any data
    quantize(weight, hessian, config) -> QuantizedTensor
    dequantize(qt) -> torch.Tensor (float32, shape qt.shape)
    tunable(qt) -> TunableWeight        the weight as a differentiable function of its
                                        continuous stored arrays, codes fixed (fine-tuning)
    rate_ladder(config) -> [config]     the settings a per-layer bit allocation chooses from
`QuantizedTensor.tensors` holds exactly the arrays `payload_spec` announces (numpy:
bit-packed codes as uint8, scales, gains, ...) and `meta` at least the `layout`. Because
the spec follows from (config, shape) alone, a quantized layer can be built empty and
filled by `load_state_dict`. Bits per weight are measured from the stored arrays, never
computed from nominal settings.
"""

from __future__ import annotations

from pvq.errors import PVQError

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


class QuantizationError(PVQError, ValueError):
    """Input a quantizer cannot work with: non-finite weights, mismatched shapes,
    a layer width that is not a multiple of the group size, bad settings."""


@dataclass(frozen=True)
class TensorSpec:
    """Shape and numpy dtype name of one stored array of a quantized layer."""

    shape: tuple[int, ...]
    dtype: str  # "uint8", "int8", "int16", "int32" or "float16"

    @property
    def nbytes(self) -> int:
        """Bytes an array of this spec takes."""
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize

    def matches(self, arr: np.ndarray) -> bool:
        return tuple(arr.shape) == tuple(self.shape) and arr.dtype.name == self.dtype


def check_payload(tensors: dict[str, np.ndarray], spec: dict[str, TensorSpec], where: str) -> None:
    """QuantizationError naming `where` and the field unless `tensors` is exactly `spec`."""
    missing, extra = sorted(set(spec) - set(tensors)), sorted(set(tensors) - set(spec))
    if missing or extra:
        raise QuantizationError(f"{where}: stored tensors {sorted(tensors)} differ from the spec {sorted(spec)}")
    for name, ts in spec.items():
        arr = tensors[name]
        if not ts.matches(arr):
            raise QuantizationError(
                f"{where}: tensor {name!r} is {arr.dtype.name} {tuple(arr.shape)}, the spec says {ts.dtype} {tuple(ts.shape)}"
            )


@dataclass
class QuantizedTensor:
    method: str
    shape: tuple[int, int]  # (out_features, in_features)
    tensors: dict[str, np.ndarray]
    meta: dict[str, Any]
    proxy_loss: float | None = None  # tr((W - Q) H (W - Q)^T) when a Hessian was given
    extra: dict[str, Any] = field(default_factory=dict)  # diagnostics, never stored

    @property
    def stored_bytes(self) -> int:
        return int(sum(t.nbytes for t in self.tensors.values()))

    @property
    def bits_per_weight(self) -> float:
        return self.stored_bytes * 8 / (self.shape[0] * self.shape[1])


def check_weight(weight: torch.Tensor, hessian: torch.Tensor | None = None) -> None:
    """Raise QuantizationError for a weight/Hessian pair no method can quantize."""
    if weight.ndim != 2:
        raise QuantizationError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    if not torch.isfinite(weight).all():
        bad = (~torch.isfinite(weight)).nonzero()[0].tolist()
        raise QuantizationError(f"weight has non-finite values (first at row {bad[0]}, column {bad[1]})")
    if hessian is not None:
        C = weight.shape[1]
        if tuple(hessian.shape) != (C, C):
            raise QuantizationError(f"Hessian shape {tuple(hessian.shape)} does not match in_features {C}")
        if not torch.isfinite(hessian).all():
            raise QuantizationError("Hessian has non-finite values")


def proxy_loss(weight: torch.Tensor, quantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """Layer-wise proxy loss tr((W - Q) H (W - Q)^T) (paper eq. 1), in float64."""
    delta = (weight - quantized).double()
    return float(torch.einsum("ij,jk,ik->", delta, hessian.double(), delta))


def as_float32(weight: torch.Tensor) -> torch.Tensor:
    """The weight as contiguous CPU float32 (a view when it already is); refuses empty layers."""
    if weight.numel() == 0:
        raise QuantizationError(f"weight is empty (shape {tuple(weight.shape)})")
    return weight.detach().to(device="cpu", dtype=torch.float32).contiguous()


def check_config(config: Any, cls: type) -> Any:
    """`config` (None = ``cls()`` defaults) as an instance of `cls`, else QuantizationError."""
    if config is None:
        return cls()
    if not isinstance(config, cls):
        raise QuantizationError(f"config must be a {cls.__name__}, got {type(config).__name__}")
    return config


def is_int(value) -> bool:
    """An integer that is not a bool (config fields: True is not a count)."""
    return not isinstance(value, (bool, np.bool_)) and isinstance(value, (int, np.integer))


def is_number(value) -> bool:
    """An int or float that is not a bool."""
    return not isinstance(value, (bool, np.bool_)) and isinstance(value, (int, float, np.integer, np.floating))


class _FisherLinear(torch.autograd.Function):
    """x @ W^T whose backward also adds sum_t (dL/dy_t)^2 (x_t)^2 (R, C) to `acc`: the
    per-position diagonal Gauss-Newton of W, from what the weight's gradient already
    computes (one more matmul); x is saved like F.linear's, so checkpointing applies."""

    @staticmethod
    def forward(ctx, x, weight, acc):
        ctx.save_for_backward(x, weight)
        ctx.acc = acc
        return F.linear(x, weight)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        g = grad_out.reshape(-1, grad_out.shape[-1])
        xs = x.reshape(-1, x.shape[-1])
        ctx.acc.add_((g.float().pow(2).T @ xs.float().pow(2)).to(ctx.acc.dtype))
        return grad_out @ weight, g.T @ xs, None


def predicted_change(grad: torch.Tensor, curvature: torch.Tensor, change: torch.Tensor) -> torch.Tensor:
    """The quadratic model of the loss change, <g, dW> + 1/2 sum F dW^2, summed over the
    last axis."""
    return (grad * change).sum(dim=-1) + 0.5 * (curvature * change * change).sum(dim=-1)


def lookup(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``table[index]`` (rows of ``table`` picked by an integer ``index`` of any shape), with
    a backward pass that adds in a fixed order. Plain indexing's backward is an accumulating
    ``index_put_``, which PyTorch's CPU kernel runs with atomic adds once it is large: the
    gradient of a shared codebook then differs in its last bits from run to run, and so do
    the fine-tuned checkpoints. On the CPU ``gather``'s backward (``scatter_add_``) sums
    serially; on CUDA it is the one with atomics, and indexing's is the sorted, ordered one."""
    if table.device.type != "cpu":
        return table[index]
    rows = table.reshape(table.shape[0], -1)
    flat = index.reshape(-1, 1).expand(-1, rows.shape[1])
    return rows.gather(0, flat).reshape(*index.shape, *table.shape[1:])


class TunableWeight(torch.nn.Module):
    """One layer's weight as a differentiable function of the continuous arrays of its
    payload (gains, scales, norms, codebooks): what fine-tuning (`pvq.calibrate.finetune`)
    trains, and, where a method allows it, the discrete codes it may move.

    A method's ``tunable(qt)`` returns a subclass that keeps the decoded codes as buffers
    and the continuous arrays as float32 parameters, builds W (float32, qt.shape) in
    ``build()`` and hands the payload back in ``payload()``: the same arrays under the
    same names, shapes and dtypes, the trained ones rounded to their stored dtype. So
    fine-tuning cannot change what a layer stores or its size.

    Codes that learn (`codes_kind` not None): ``code_groups()`` is the codes buffer viewed
    as (N, m), one row per code group (a pyramid point, a grid code, a centroid
    assignment), and ``code_moves(grad, curvature)`` proposes for every group the valid
    code that a quadratic model of the loss, <g, dW> + 1/2 sum F dW^2 (g = dL/dW, F the
    diagonal curvature, (R, C)), says lowers it most, with that predicted change.
    Fine-tuning writes the chosen rows into ``code_groups()`` and sets ``codes_changed``;
    ``payload()`` then encodes the codes again. While ``grad_sum`` is a tensor every
    backward pass adds dL/dW to it; while ``fisher`` is, ``linear`` adds the curvature's
    statistics to it.
    """

    #: what the codes are, for reports ("pyramid points", ...); None: they cannot move
    codes_kind: str | None = None

    def __init__(self, qt: QuantizedTensor) -> None:
        super().__init__()
        self.qt = qt
        self.grad_sum: torch.Tensor | None = None
        self.fisher: torch.Tensor | None = None
        self.codes_changed = False

    def build(self) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self) -> torch.Tensor:
        W = self.build()
        if self.grad_sum is not None and W.requires_grad:
            W.register_hook(self._add_grad)
        return W

    def _add_grad(self, grad: torch.Tensor) -> None:
        self.grad_sum.add_(grad.to(self.grad_sum.dtype))

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The layer's output with the built weight; while ``fisher`` is a tensor, the
        backward pass adds the curvature statistics of `_FisherLinear` to it."""
        W = self().to(x.dtype)
        bias = None if bias is None else bias.to(x.dtype)
        if self.fisher is None:
            return F.linear(x, W, bias)
        y = _FisherLinear.apply(x, W, self.fisher)
        return y if bias is None else y + bias

    def code_groups(self) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} codes cannot move")

    def code_moves(self, grad: torch.Tensor, curvature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover
        """(predicted change of the loss (N,), +inf where no move lowers it; moved codes (N, m))."""
        raise NotImplementedError(f"{type(self).__name__} codes cannot move")

    def trained(self) -> dict[str, np.ndarray]:
        """The payload arrays the trained parameters (and moved codes) replace (name -> stored array)."""
        raise NotImplementedError  # pragma: no cover - abstract

    def payload(self) -> dict[str, np.ndarray]:
        out = dict(self.qt.tensors)
        for name, arr in self.trained().items():
            old = out[name]
            if arr.shape != old.shape or arr.dtype != old.dtype:
                raise QuantizationError(f"tuned array {name!r} is {arr.dtype} {arr.shape}, stored {old.dtype} {old.shape}")
            out[name] = arr
        return out


def check_stored_values(tensors: dict[str, np.ndarray], where: str) -> None:
    """QuantizationError naming `where` and the field if a stored float16 array holds NaN or
    inf (no quantizer writes one: `stored_float16` refuses them), read from the bit pattern
    so that it is cheap on the int16 buffers a layer holds."""
    for name, arr in tensors.items():
        if np.asarray(arr).dtype == np.float16:
            bits = np.asarray(arr).view(np.uint16)
            bad = np.flatnonzero((bits & 0x7C00) == 0x7C00)
            if bad.size:
                raise QuantizationError(f"{where}: stored {name!r} has non-finite values "
                                        f"({bad.size} of {bits.size}, first at flat index {int(bad[0])})")


def check_permutation(perm: np.ndarray, n: int, what: str) -> None:
    """QuantizationError unless `perm` holds each of 0..n-1 exactly once."""
    perm = np.asarray(perm).astype(np.int64).reshape(-1)
    if perm.shape != (n,) or perm.min(initial=0) < 0 or perm.max(initial=0) >= n or np.bincount(perm, minlength=n).max(initial=1) != 1:
        raise QuantizationError(f"{what} is not a permutation of {n} columns (an entry out of range or repeated)")


def stored_float16(values: np.ndarray | torch.Tensor, what: str,
                   error: type[Exception] = QuantizationError) -> np.ndarray:
    """Values (numpy or torch) as the float16 array a payload stores; `error` naming `what`
    when one overflows float16."""
    arr = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    with np.errstate(over="ignore"):
        out = arr.astype(np.float16)
    if not np.all(np.isfinite(out)):
        raise error(f"{what} {float(np.max(np.abs(arr))):.6g} overflows float16")
    return out
