"""`PVQLinear`: a linear layer whose weight lives as the packed arrays of a checkpoint.

The stored arrays of a `QuantizedTensor` (bit-packed uint8 code streams, float16 scales
or gains, integer permutations, ...) are held unchanged as non-persistent buffers, so
they follow the module across devices but never get cast by ``model.to(dtype)`` /
``model.half()`` (a stored float16 scale stays the float16 the checkpoint holds).

Two modes, identical outputs:

* ``"load"``: the weight is dequantized once (at construction, or when switching mode)
  into a float buffer ``weight``; forward is ``F.linear``.
* ``"fly"``: nothing is cached; every forward decodes the packed codes again with the
  method's ``dequantize`` and then applies ``F.linear``. Memory holds only the packed
  arrays (the method's decoders are CPU numpy/numba code, so on an accelerator the
  packed arrays travel to the host and the weight back, once per call).
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pvq.codec.errors import CodecError
from pvq.quant import QuantizedTensor, get_method

from .errors import LayerCodecError, LayerDecodeError

__all__ = ["MODES", "PVQLinear", "dequantize_layer"]

MODES = ("load", "fly")


def dequantize_layer(qt: QuantizedTensor, name: str | None = None) -> torch.Tensor:
    """``get_method(qt.method).dequantize(qt)`` checked to be a finite float tensor of qt.shape.

    Any failure is re-raised as `LayerDecodeError` (`LayerCodecError`, also a
    `CodecError`, when the codec rejected the codes) whose message names the layer.
    """
    label = f"layer {name!r}" if name else "quantized layer"
    try:
        weight = get_method(qt.method).dequantize(qt)
    except CodecError as e:
        raise LayerCodecError(f"{label} ({qt.method}): cannot decode the stored codes: {e}") from e
    except Exception as e:  # noqa: BLE001 - any decoder failure must name the layer
        raise LayerDecodeError(f"{label} ({qt.method}): cannot dequantize: {type(e).__name__}: {e}") from e
    if not isinstance(weight, torch.Tensor):
        raise LayerDecodeError(f"{label} ({qt.method}): dequantize returned {type(weight).__name__}, not a tensor")
    if tuple(weight.shape) != tuple(qt.shape):
        raise LayerDecodeError(f"{label} ({qt.method}): dequantized weight has shape {tuple(weight.shape)}, expected {tuple(qt.shape)}")
    if not torch.isfinite(weight).all():
        raise LayerDecodeError(f"{label} ({qt.method}): dequantized weight has non-finite values")
    return weight


def _buffer_name(tensor_name: str) -> str:
    safe = "".join(ch if ch.isalnum() or ch == "_" else "_" for ch in tensor_name)
    return f"stored_{safe}"


def _to_torch(arr: np.ndarray) -> torch.Tensor:
    arr = np.ascontiguousarray(arr)
    if not arr.flags.writeable:
        arr = arr.copy()
    return torch.from_numpy(arr)


class PVQLinear(torch.nn.Module):
    """``y = x W^T + b`` with W rebuilt from a `QuantizedTensor`'s stored arrays.

    Args:
        qt: the quantized weight (method, shape (out_features, in_features), tensors, meta).
        bias: optional bias (out_features,), stored as a parameter named ``bias``.
        mode: ``"load"`` (dequantize once, keep a float weight) or ``"fly"`` (decode every call).
        dtype: dtype of the dequantized weight in ``"load"`` mode (``"fly"`` uses the input's dtype).
        name: the layer's name in its model, used in error messages.
        decoded: an already dequantized weight for ``"load"`` mode (skips a second decode).
    """

    def __init__(
        self,
        qt: QuantizedTensor,
        *,
        bias: torch.Tensor | None = None,
        mode: str = "load",
        dtype: torch.dtype = torch.float32,
        name: str | None = None,
        decoded: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        R, C = (int(s) for s in qt.shape)
        self.out_features, self.in_features = R, C
        self.method = qt.method
        self.meta: dict[str, Any] = copy.deepcopy(qt.meta)
        self.proxy_loss = qt.proxy_loss
        self.layer_name = name
        self._stored: dict[str, str] = {}  # tensor name -> buffer name, in stored order
        for tname in sorted(qt.tensors):
            bname = _buffer_name(tname)
            if bname in self._stored.values():
                raise ValueError(f"stored tensor names of layer {name!r} collide after sanitising: {tname!r}")
            self._stored[tname] = bname
            self.register_buffer(bname, _to_torch(np.asarray(qt.tensors[tname])), persistent=False)
        if bias is not None:
            if tuple(bias.shape) != (R,):
                raise ValueError(f"bias of layer {name!r} has shape {tuple(bias.shape)}, expected ({R},)")
            self.bias = torch.nn.Parameter(bias.detach().to(dtype), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self.mode = mode
        self._weight_dtype = dtype
        if mode == "load":
            w = decoded if decoded is not None else dequantize_layer(self.quantized_tensor(), name)
            self.register_buffer("weight", w.detach().to(dtype).contiguous(), persistent=False)

    # ------------------------------------------------------------------ stored data

    @property
    def stored_bytes(self) -> int:
        return int(sum(getattr(self, b).numel() * getattr(self, b).element_size() for b in self._stored.values()))

    @property
    def bits_per_weight(self) -> float:
        return self.stored_bytes * 8 / (self.out_features * self.in_features)

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        """The stored arrays as torch tensors (on the module's device), by their tensor name."""
        return {t: getattr(self, b) for t, b in self._stored.items()}

    def quantized_tensor(self) -> QuantizedTensor:
        """The `QuantizedTensor` this layer holds (numpy copies of the stored arrays on the host)."""
        tensors = {t: getattr(self, b).detach().cpu().numpy().copy() for t, b in self._stored.items()}
        return QuantizedTensor(
            method=self.method,
            shape=(self.out_features, self.in_features),
            tensors=tensors,
            meta=copy.deepcopy(self.meta),
            proxy_loss=self.proxy_loss,
        )

    def _decode(self) -> torch.Tensor:
        # Fly mode: the arrays are only read, so they need no copy on the host.
        tensors = {t: getattr(self, b).detach().cpu().numpy() for t, b in self._stored.items()}
        qt = QuantizedTensor(self.method, (self.out_features, self.in_features), tensors, copy.deepcopy(self.meta))
        return dequantize_layer(qt, self.layer_name)

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 weight (out_features, in_features), decoded from the stored arrays now."""
        return self._decode()

    def set_mode(self, mode: str, dtype: torch.dtype | None = None) -> None:
        """Switch between ``"load"`` (decode now, cache the weight) and ``"fly"`` (drop the cache)."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode == "load":
            dtype = dtype or self._weight_dtype
            device = next(iter(self.stored_tensors().values())).device if self._stored else None
            w = self._decode().to(dtype)
            if device is not None:
                w = w.to(device)
            self.register_buffer("weight", w.contiguous(), persistent=False)
        elif "weight" in self._buffers:
            del self._buffers["weight"]
        self.mode = mode

    # ------------------------------------------------------------------ nn.Module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "load":
            return F.linear(x, self.weight, self.bias)
        w = self._decode().to(device=x.device, dtype=x.dtype)
        return F.linear(x, w, self.bias)

    def _apply(self, fn, recurse=True):
        # Stored arrays move with the module but keep their dtype: a cast would change
        # the bits the decoder reads (and numpy has no bfloat16).
        order = list(self._buffers)
        stored = {b: self._buffers.pop(b) for b in self._stored.values()}
        try:
            super()._apply(fn, recurse)
        finally:
            for b, t in stored.items():
                if t is not None:
                    moved = fn(t)
                    if moved.dtype != t.dtype:
                        moved = t.to(device=moved.device)
                    stored[b] = moved
            rest = dict(self._buffers)
            self._buffers.clear()
            for b in order:
                self._buffers[b] = stored[b] if b in stored else rest.pop(b)
            self._buffers.update(rest)
        return self

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"method={self.method}, bits_per_weight={self.bits_per_weight:.4g}, mode={self.mode}"
        )
