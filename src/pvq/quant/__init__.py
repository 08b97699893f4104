"""Quantization algorithms, one per module, each a pure function of (weight, Hessian).

Registry: METHODS[name] -> Method(config_class, quantize, dequantize). Modules are
imported lazily so that `pvq.quant` imports fast and a broken optional method cannot
break the others.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

from .base import QuantizationError, QuantizedTensor, check_weight, proxy_loss


@dataclass(frozen=True)
class Method:
    name: str
    module: str  # pvq.quant.<module> defines CONFIG, quantize, dequantize, nominal_bits_per_weight

    def _mod(self):
        return importlib.import_module(f"pvq.quant.{self.module}")

    @property
    def config_class(self) -> type:
        return self._mod().CONFIG

    @property
    def quantize(self) -> Callable[..., QuantizedTensor]:
        return self._mod().quantize

    @property
    def dequantize(self) -> Callable[[QuantizedTensor], Any]:
        return self._mod().dequantize

    @property
    def nominal_bits_per_weight(self) -> Callable[..., float]:
        """(config, columns=None) -> the bits per weight the settings promise."""
        return self._mod().nominal_bits_per_weight


METHODS: dict[str, Method] = {
    m.name: m for m in (Method("rtn", "rtn"), Method("gptq", "gptq"), Method("pvq", "pvq"), Method("gptvq", "gptvq"))
}


def uses_hessian(name: str, config: Any) -> bool:
    """Whether method `name` with `config` (its config object or a dict of its fields)
    needs a calibration Hessian: gptq and gptvq always, pvq unless use_hessian is False,
    rtn never (its weights are quantized from the weights alone)."""
    get_method(name)
    if name == "rtn":
        return False
    if name == "pvq":
        flag = config.get("use_hessian", True) if isinstance(config, dict) else getattr(config, "use_hessian", True)
        return bool(flag)
    return True


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise QuantizationError(f"unknown method {name!r}; known: {', '.join(sorted(METHODS))}") from None


__all__ = ["METHODS", "Method", "QuantizationError", "QuantizedTensor", "check_weight", "get_method", "proxy_loss",
           "uses_hessian"]
