"""The model quantization pipeline: calibration data and layer-by-layer quantization."""

from pvq.calibrate.allocation import Allocation, allocate_bits
from pvq.calibrate.calibration import (CalibrationError, calibration_data, calibration_windows, encode_text, sample_windows,
                                      windows_from_ids)
from pvq.calibrate.quantize_model import quantize_model, quantize_weights
from pvq.calibrate.capture import HessianAccumulator, capture_block_inputs
from pvq.calibrate.records import LayerReport, PipelineError, QuantizeResult
from pvq.calibrate.workdir import WorkDirError

__all__ = [
    "Allocation",
    "CalibrationError",
    "HessianAccumulator",
    "LayerReport",
    "PipelineError",
    "QuantizeResult",
    "WorkDirError",
    "allocate_bits",
    "calibration_data",
    "calibration_windows",
    "capture_block_inputs",
    "encode_text",
    "quantize_model",
    "quantize_weights",
    "sample_windows",
    "windows_from_ids",
]
