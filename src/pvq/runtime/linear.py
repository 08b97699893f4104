"""`QuantizedLinear`: a linear layer whose weight lives only as a method's packed payload.

The layer is built *empty* from (in_features, out_features, method, config): the method's
`payload_spec` (`pvq.methods`) gives the name, shape and dtype of every stored array
(bit-packed codes, scales, gains, codebooks, norms, permutations), and each becomes a
**persistent buffer**, so ``model.state_dict()`` is the checkpoint and
``load_state_dict`` / transformers' ``from_pretrained`` fill it. No float weight is ever
held: a forward decodes the weight where it needs it (one layer at a time) through the
kernel chosen in `pvq.runtime.kernels.select_kernel`, the one place a faster kernel
plugs in.

Float16 arrays of a payload (scales, gains, norms, codebook scales) are held as their
int16 bit patterns (the spec says "float16", the buffer is int16): every buffer of the
payload is an integer tensor, so ``model.to(dtype)``, ``model.half()`` or
``from_pretrained(dtype=...)`` can never change a stored bit. Decoding views them back.
The layer's bias, when it has one, is an ordinary float parameter.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from pvq.codec.errors import CodecError
from pvq.methods import (
    QuantizationError,
    QuantizedTensor,
    TensorSpec,
    check_payload,
    get_method,
)
from pvq.methods.input_transforms import attach_input_transform, input_transforms_of

from pvq.runtime.errors import CheckpointError, LayerCodecError, LayerDecodeError, LayerInputError
from pvq.runtime.kernels import cpu_kernel_for, select_kernel

__all__ = ["STORAGE_DTYPES", "PackedPayload", "QuantizedLinear", "replace_linear", "decoded_weights", "tuned_weights"]

#: torch dtype holding each numpy dtype of a payload spec (float16 as its int16 bits).
STORAGE_DTYPES: dict[str, torch.dtype] = {
    "uint8": torch.uint8,
    "int8": torch.int8,
    "int16": torch.int16,
    "int32": torch.int32,
    "float16": torch.int16,
}


def _to_buffer(arr: np.ndarray, spec: TensorSpec) -> torch.Tensor:
    arr = np.ascontiguousarray(arr)
    if spec.dtype == "float16":
        arr = arr.view(np.int16)
    return torch.from_numpy(arr.copy())


def _to_array(buf: torch.Tensor, spec: TensorSpec) -> np.ndarray:
    arr = buf.detach().cpu().numpy()
    return arr.view(np.float16) if spec.dtype == "float16" else arr


class PackedPayload:
    """The stored arrays of a packed module (`QuantizedLinear`, the quantized embedding): the
    persistent buffers of `payload_spec`, filled, read, measured and checked one way. The
    module sets `payload_spec`, `method` and `_label()`."""

    def _register_payload(self, device) -> None:
        for tname, spec in self.payload_spec.items():
            if hasattr(nn.Module, tname) or tname in ("bias", "weight"):
                raise QuantizationError(f"payload tensor name {tname!r} of method {self.method!r} collides with a module attribute")
            self.register_buffer(tname, torch.empty(spec.shape, dtype=STORAGE_DTYPES[spec.dtype], device=device))

    def set_payload(self, tensors: dict[str, np.ndarray]) -> None:
        """Fill the stored arrays (QuantizationError naming the layer and field if they do not fit the spec)."""
        check_payload({k: np.asarray(v) for k, v in tensors.items()}, self.payload_spec, self._label())
        for tname, spec in self.payload_spec.items():
            buf = getattr(self, tname)
            setattr(self, tname, _to_buffer(np.asarray(tensors[tname]), spec).to(buf.device))

    @property
    def stored_bytes(self) -> int:
        return int(sum(getattr(self, t).numel() * getattr(self, t).element_size() for t in self.payload_spec))

    def payload(self) -> dict[str, np.ndarray]:
        """The stored arrays as numpy (host views where the buffers are on the CPU; float16 restored)."""
        return {t: _to_array(getattr(self, t), spec) for t, spec in self.payload_spec.items()}

    def check_payload(self) -> None:
        """CheckpointError naming the layer and field if a buffer's shape or dtype left the spec
        (e.g. a checkpoint whose tensors transformers loaded as they were stored)."""
        for tname, spec in self.payload_spec.items():
            buf = getattr(self, tname)
            want = STORAGE_DTYPES[spec.dtype]
            if tuple(buf.shape) != tuple(spec.shape) or buf.dtype != want:
                raise CheckpointError(
                    f"{self._label()}: stored tensor {tname!r} is {str(buf.dtype).removeprefix('torch.')} "
                    f"{tuple(buf.shape)}, the {self.method} payload spec says {spec.dtype} {tuple(spec.shape)}"
                )
            if buf.device.type == "meta":
                raise CheckpointError(f"{self._label()}: stored tensor {tname!r} received no value")
        try:
            get_method(self.method).check_stored(self.config, self.payload(), self._label())
        except QuantizationError as e:
            raise CheckpointError(str(e)) from None

    def payload_key(self) -> tuple:
        """Changes whenever a stored buffer is replaced or written: what kernels key their cached state on."""
        return tuple((getattr(self, t).data_ptr(), getattr(self, t)._version) for t in self.payload_spec)



class QuantizedLinear(PackedPayload, nn.Module):
    """``y = x W^T + b`` with W decoded from the stored payload of `method` (rtn, gptq, pvq, gptvq).

    Args:
        in_features, out_features: the layer's shape (W is out_features x in_features).
        method: a `pvq.methods` method name; config: its config object or a dict of its fields.
        bias: whether the layer has a bias (a float parameter of `dtype`).
        name: the layer's name in its model, for error messages.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        method: str,
        config: Any = None,
        bias: bool = False,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.method = method
        method_obj = get_method(method)
        self.config = method_obj.make_config(config)
        self.layer_name = name
        shape = (self.out_features, self.in_features)
        self.layout = method_obj.layout(self.config, shape)
        self.payload_spec: dict[str, TensorSpec] = method_obj.payload_spec(self.config, shape)
        self._register_payload(device)
        if bias:
            self.bias = nn.Parameter(torch.empty(self.out_features, dtype=dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self.last_kernel: str | None = None  # name of the kernel the last forward used
        self._decoded_weight: torch.Tensor | None = None  # set only inside kernels.decoded_weights
        self._tuned_weight = None  # a TunableWeight, set only inside kernels.tuned_weights (fine-tuning)

    # ------------------------------------------------------------------ building

    @classmethod
    def from_quantized(
        cls, qt: QuantizedTensor, config: Any, bias: torch.Tensor | None = None, *, name: str | None = None
    ) -> QuantizedLinear:
        """A layer holding `qt`'s payload (checked against the spec of (config, shape)) and `bias`."""
        R, C = (int(s) for s in qt.shape)
        layer = cls(C, R, qt.method, config, bias=bias is not None,
                    dtype=bias.dtype if bias is not None else None, name=name)
        layer.set_payload(qt.tensors)
        if bias is not None:
            layer.bias.data.copy_(bias.detach())
        return layer

    # ------------------------------------------------------------------ stored data

    def _label(self) -> str:
        return f"layer {self.layer_name!r} ({self.method})" if self.layer_name else f"quantized layer ({self.method})"

    @property
    def bits_per_weight(self) -> float:
        return self.stored_bytes * 8 / (self.out_features * self.in_features)

    def quantized_tensor(self) -> QuantizedTensor:
        """The payload as a `QuantizedTensor` (copies) with the layout as its meta."""
        return QuantizedTensor(self.method, (self.out_features, self.in_features),
                               {t: a.copy() for t, a in self.payload().items()}, dict(self.layout))

    @property
    def payload_released(self) -> bool:
        """True once the packed payload was released for a compute layout (`release_payload`)."""
        return self.__dict__.get("_compute") is not None

    def release_payload(self, compute) -> None:
        """Compute from `compute` (`compute_layout.Int8Weights` or `Int4Weights`) from now on and free the packed
        buffers: the layer still runs, but it has no checkpoint to give (`state_dict` refuses)."""
        self._compute = compute
        self._cpu_state = None
        for tname, spec in self.payload_spec.items():
            self._buffers[tname] = torch.empty(0, dtype=STORAGE_DTYPES[spec.dtype], device=self._buffers[tname].device)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if self.payload_released:
            raise CheckpointError(f"{self._label()}: this model was loaded in a compute layout and holds no packed "
                                  "payload to save; load the checkpoint with layout='packed' to save or convert it")
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def dequantize(self) -> torch.Tensor:
        """The float32 weight (out_features, in_features) on the host, decoded now.

        A codec failure (code out of range, truncated stream) is a `LayerCodecError`, any
        other decoder failure a `LayerDecodeError`, both naming the layer. A layer in the int8
        or int4 compute layout returns points x scales (what its kernels compute with)."""
        compute = self.__dict__.get("_compute")
        if compute is not None:
            G = compute.scales.shape[1]
            pts = torch.from_numpy(compute.int8_points()).view(self.out_features, G, -1).to(torch.float32)
            return (pts * torch.from_numpy(compute.scales)[:, :, None]).view(self.out_features, self.in_features)
        qt = QuantizedTensor(self.method, (self.out_features, self.in_features), self.payload(), self.layout)
        try:
            weight = get_method(self.method).dequantize(qt)
        except Exception as e:  # noqa: BLE001 - any decoder failure must name the layer
            if isinstance(e, CodecError) or isinstance(e.__context__, CodecError):  # methods wrap codec errors
                raise LayerCodecError(f"{self._label()}: cannot decode the stored codes: {e}") from e
            raise LayerDecodeError(f"{self._label()}: cannot dequantize: {type(e).__name__}: {e}") from e
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise LayerDecodeError(f"{self._label()}: decoded weight has shape {tuple(weight.shape)}")
        return weight

    def check_decode(self) -> None:
        """Decode once and refuse non-finite weights (a damaged payload fails here, naming the layer).
        Layers the CPU kernels serve are decoded a row chunk at a time into their workspace, so
        that checking a model at load needs no float copy of its largest layer."""
        from pvq.runtime import cpu_kernels

        if cpu_kernels.serves(self, getattr(self, next(iter(self.payload_spec))).device):
            chunks = (chunk for _, _, chunk in cpu_kernels.row_chunks(self))
        else:
            chunks = (self.dequantize(),)
        for chunk in chunks:
            if not torch.isfinite(chunk).all():
                raise LayerDecodeError(f"{self._label()}: decoded weight has non-finite values")

    # ------------------------------------------------------------------ nn.Module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = cpu_kernel_for(self, x)  # the CPU kernels, chosen once per layer (a few checks a call)
        if kernel is None:
            self._check_input(x)
            kernel = select_kernel(self, x)
        self.last_kernel = kernel.name
        return kernel.forward(self, x)

    def _check_input(self, x: torch.Tensor) -> None:
        """A clear error where torch would give a cryptic one (or a kernel silently copy the
        payload to another device on every call): the input must be floating point, as wide
        as the layer, and on the payload's device. Any float dtype is served (computed in it)."""
        if not x.is_floating_point():
            raise LayerInputError(f"{self._label()}: expects a floating-point input, got {x.dtype}")
        if x.ndim == 0 or x.shape[-1] != self.in_features:
            raise LayerInputError(f"{self._label()}: expects inputs of width {self.in_features}, got shape "
                                  f"{tuple(x.shape)}")
        device = self._buffers[next(iter(self.payload_spec))].device
        if x.device != device:
            raise LayerInputError(f"{self._label()}: input on {x.device} but the packed payload is on {device}; "
                                  f"move the model (model.to({str(x.device)!r})) or the input")

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"method={self.method}, bits_per_weight={self.bits_per_weight:.4g}")


def replace_linear(model: nn.Module, name: str, layer: nn.Module) -> nn.Module:
    """Put `layer` in place of the module `name` of `model`; returns the module it replaced."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = parent._modules.get(child)
    if old is None:
        raise CheckpointError(f"{name!r} is not a module of the model")
    # input transforms (online rotation, activation quantizer) move with the layer
    for tname, transform in input_transforms_of(old).items():
        attach_input_transform(layer, tname, transform)
    parent._modules[child] = layer
    return old


@contextlib.contextmanager
def decoded_weights(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Decode every quantized layer of `model` once and keep the float weights until the
    block ends: for evaluation loops that run many forwards (perplexity, tasks, sweeps),
    at the memory cost of the float model. Outside it the model holds packed data only."""
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    try:
        for layer in layers:
            layer._decoded_weight = layer.dequantize()
        yield model
    finally:
        for layer in layers:
            layer._decoded_weight = None


@contextlib.contextmanager
def tuned_weights(model: torch.nn.Module, tunables: dict) -> Iterator[torch.nn.Module]:
    """Inside it, each quantized layer named in `tunables` ({layer name: TunableWeight})
    computes with the weight its TunableWeight builds (gradients reach its parameters);
    the stored payload is not touched."""
    layers = {name: model.get_submodule(name) for name in tunables}
    try:
        for name, layer in layers.items():
            object.__setattr__(layer, "_tuned_weight", tunables[name])  # not a submodule: not in the state_dict
        yield model
    finally:
        for layer in layers.values():
            object.__setattr__(layer, "_tuned_weight", None)
