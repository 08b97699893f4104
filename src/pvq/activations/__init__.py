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

from pvq.activations.config import ACT_GAINS, ACT_METHODS, ACT_SEARCH_METHODS, ActQuantConfig, ActQuantError, QUANTIZER_ATTRIBUTE, RECORD_KIND
from pvq.activations.quantizers import ActPayload, decode_activations, encode_activations, fake_quantize
from pvq.activations.modules import ActQuantizer, act_quant_of, act_quant_summary, check_act_quant, install_act_quant, install_act_quant_record, remove_act_quant

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
