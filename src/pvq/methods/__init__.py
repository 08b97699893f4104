"""Quantization algorithms, one module per method, each a pure function of (weight, Hessian, config).

Registry: METHODS[name] -> Method, the one contract every caller reads (the pipeline,
the CLI, the sweep, the benchmarks, the quantized layer and the checkpoint): config
class, whether a Hessian is needed, nominal bits, layout and payload spec for a layer
shape, quantize, dequantize (see `base.py`). Adding a method is one new module plus one
`Method` line here. Modules are imported lazily so that `pvq.methods` imports fast and a
broken optional method cannot break the others.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import Any, Callable

from pvq.methods.base import (
    QuantizationError,
    QuantizedTensor,
    TensorSpec,
    TunableWeight,
    check_payload,
    check_weight,
    proxy_loss,
)


@dataclass(frozen=True)
class Method:
    name: str
    module: str  # pvq.methods.<module> implements the contract of base.py

    def _mod(self):
        return importlib.import_module(f"pvq.methods.{self.module}")

    @property
    def config_class(self) -> type:
        return self._mod().CONFIG

    def make_config(self, config: Any = None) -> Any:
        """A validated config object from None (defaults), a dict of its fields or a config object."""
        cls = self.config_class
        if config is None:
            return cls()
        if isinstance(config, cls):
            return config
        if isinstance(config, dict):
            known = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(config) - known)
            if unknown:
                raise QuantizationError(
                    f"{self.name} config has no field(s) {', '.join(map(repr, unknown))}; known: {', '.join(sorted(known))}"
                )
            return cls(**config)
        raise QuantizationError(f"{self.name} config must be a {cls.__name__} or a dict, got {type(config).__name__}")

    def needs_hessian(self, config: Any = None) -> bool:
        return bool(self._mod().needs_hessian(self.make_config(config)))

    def layout(self, config: Any, shape: tuple[int, int]) -> dict[str, Any]:
        return self._mod().layout(self.make_config(config), tuple(int(s) for s in shape))

    def payload_spec(self, config: Any, shape: tuple[int, int]) -> dict[str, TensorSpec]:
        return self._mod().payload_spec(self.make_config(config), tuple(int(s) for s in shape))

    @property
    def quantize(self) -> Callable[..., QuantizedTensor]:
        return self._mod().quantize

    @property
    def dequantize(self) -> Callable[[QuantizedTensor], Any]:
        return self._mod().dequantize

    @property
    def rate_ladder(self) -> Callable[[Any], list]:
        """(config) -> the configs a per-layer bit allocation chooses from (increasing bits)."""
        return self._mod().rate_ladder

    @property
    def tunable(self) -> Callable[[QuantizedTensor], TunableWeight]:
        """(qt) -> the layer's weight as a function of its continuous arrays (`base.TunableWeight`)."""
        return self._mod().tunable

    def check_stored(self, config: Any, tensors: dict[str, Any], where: str) -> None:
        """QuantizationError naming `where` if stored arrays that fit the spec still hold values
        no quantizer writes: non-finite float16 fields, and the method's own checks (its
        module's optional `check_stored(config, tensors, where)`), without decoding."""
        from pvq.methods.base import check_stored_values

        config = self.make_config(config)
        check_stored_values(tensors, where)
        own = getattr(self._mod(), "check_stored", None)
        if own is not None:
            own(config, tensors, where)

    @property
    def nominal_bits_per_weight(self) -> Callable[..., float]:
        """(config, columns=None) -> the bits per weight the settings promise."""
        return self._mod().nominal_bits_per_weight


METHODS: dict[str, Method] = {
    m.name: m for m in (Method("rtn", "rtn"), Method("gptq", "gptq"), Method("pvq", "pvq"), Method("gptvq", "gptvq"))
}


def uses_hessian(name: str, config: Any) -> bool:
    """Whether method `name` with `config` (its config object or a dict of its fields)
    needs a calibration Hessian (`Method.needs_hessian`)."""
    return get_method(name).needs_hessian(config)


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise QuantizationError(f"unknown method {name!r}; known: {', '.join(sorted(METHODS))}") from None


__all__ = ["METHODS", "Method", "QuantizationError", "QuantizedTensor", "TensorSpec", "TunableWeight", "check_payload", "check_weight",
           "get_method", "proxy_loss", "uses_hessian"]
