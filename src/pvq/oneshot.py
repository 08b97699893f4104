"""One runner for every path that quantizes a model: the main job, `pvq sweep`, the benchmarks
and the Python API (llm-compressor's ``oneshot`` idea).

    result = oneshot(model, tokenizer, Recipe(method="pvq", config={...}, rotate=True))
    result.model.save_pretrained(...)   # or pvq.checkpoint.save_checkpoint(result.model, ...)

Order: refuse bad settings (method config, activation quantization against the model)
-> calibration windows (only when the method needs a Hessian or the recipe fine-tunes or
allocates bits; sampled from the float model unless a text is given) -> fused rotation ->
the per-layer bit allocation under `target_bpw` (`pvq.calibrate.allocation`) ->
layer-by-layer quantization (resumable in `work_dir`) -> the quantized linears become
`QuantizedLinear`s owning their payloads (`pvq.checkpoint.quantized_model`) -> fine-tuning of
their continuous parameters towards the float model (`pvq.calibrate.finetune`, resumable) -> the
token embedding and head stored at 8 bits (`pvq.runtime.embedding`; its settings are
refused at the start, not here) -> simulated activation quantization. ``method=None``
("float") skips the weights and keeps the model float (rotation and activations only).
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from torch import nn

from pvq.errors import PVQError
from pvq.calibrate.calibration import SAMPLED
from pvq.calibrate.finetune import FinetuneConfig, finetune, teacher_rows, teacher_targets
from pvq.checkpoint import quantized_model
from pvq.runtime.embedding import DEFAULT_EMBEDDINGS, check_embeddings, quantize_embeddings
from pvq.checkpoint.hf import finite_absmax, mark_quantized, pack_layers
from pvq.models import adapter_for
from pvq.memory import release_freed_memory
from pvq.models.streaming import StreamedModel, StreamError
from pvq.calibrate import (
    QuantizeResult,
    allocate_bits,
    calibration_data,
    quantize_model,
    quantize_weights,
)
from pvq.methods import METHODS, QuantizationError, get_method
from pvq.activations import ACT_METHODS, ActQuantConfig, check_act_quant, install_act_quant
from pvq.rotation import rotate_model
from pvq.settings import MAX_SEED, COMPUTE_DTYPE_NAMES, RunSettings, excerpt, number, setting, setting_of

__all__ = ["COMPUTE_DTYPES", "DeviceError", "OneshotResult", "Recipe", "oneshot", "resolve_device"]

COMPUTE_DTYPES = {name: getattr(torch, name) for name in COMPUTE_DTYPE_NAMES}


class DeviceError(PVQError, ValueError):
    """A device name that is not a device, or one this machine does not have."""


def resolve_device(choice: str | torch.device | None, label: str = "device") -> str:
    """The device to compute on: "auto" (or None) is cuda when present, else cpu; anything
    else must be a device this machine has (DeviceError naming `label` otherwise)."""
    if choice is None or choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(choice)
    except (RuntimeError, TypeError, ValueError):
        raise DeviceError(f"{label} {str(choice)!r} is not a device (cpu, cuda, cuda:N or auto)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"{label} {choice}: this machine has no CUDA device (torch {torch.__version__}); use cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise DeviceError(f"{label} {choice}: only {torch.cuda.device_count()} CUDA device(s)")
    return str(device)


#: the run settings a method field may name as its flag (GPTVQ's seed: --seed)
_RUN_FIELDS = frozenset(f.name for f in fields(RunSettings))


@dataclass(kw_only=True)
class Recipe(RunSettings):
    """Everything that decides the quantized model: the calibration, seed, rotation and
    fine-tuning settings of `pvq.settings.RunSettings`, and

    method: rtn | gptq | pvq | gptvq, or None for float weights; config: its config
    fields (those left out take the config class's defaults, which are `pvq quantize`'s:
    `Recipe()` makes what `pvq quantize` makes); act: fields of `ActQuantConfig`
    (simulated activation quantization) or None; dense_dtype: how the float tensors are
    stored; target_bpw: bits per weight over the quantized linears that the per-layer
    allocation must meet (`pvq.calibrate.allocation`), None: one setting for every layer;
    embeddings: RTN config fields (bits, group_size) the token embedding and the head are
    stored with (`pvq.runtime.embedding`; default DEFAULT_EMBEDDINGS), None: kept as dense
    tensors (as they always are with float weights, method None).
    """

    method: str | None = setting("pvq", "quantization method", choices=tuple(METHODS))
    config: dict[str, Any] = field(default_factory=dict)
    act: dict[str, Any] | None = setting(
        None, "quantize the inputs of every quantized linear layer: round-to-nearest or PVQ", option="act_method",
        option_default="none", choices=("none", *ACT_METHODS), group="act")
    dense_dtype: str = "float16"
    target_bpw: float | None = setting(
        None, "bits per weight over the quantized linears, allocated per layer: each layer's setting (PVQ shape "
        "bits, scalar bits, VQ index bits) chosen from its measured distortion (default: the same setting for every "
        "layer)", number(above=0), group="quality")
    embeddings: dict[str, Any] | None = field(default_factory=lambda: dict(DEFAULT_EMBEDDINGS))

    def check(self) -> None:
        """Refuse, naming the field, settings that would fail after the long part (or as a
        bare TypeError): the method config, counts, seeds, dtypes, act fields, calib_text."""
        from pvq.checkpoint.hf import DENSE_DTYPES

        self.method_config()  # unknown method or config field: QuantizationError naming it
        for name in ("calib_windows", "calib_seqlen", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise QuantizationError(f"recipe field {name} must be a positive integer, got {value!r}")
        if self.calib_seqlen < 2:
            raise QuantizationError(f"recipe field calib_seqlen must be at least 2, got {self.calib_seqlen}")
        for name in ("seed", "rotate_seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEED:
                raise QuantizationError(f"recipe field {name} must be an integer in 0..2**32-1, got {excerpt(value)}")
        if not isinstance(self.rotate, bool):
            raise QuantizationError(f"recipe field rotate must be True or False, got {self.rotate!r}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise QuantizationError(f"recipe field compute_dtype must be one of {sorted(COMPUTE_DTYPES)}, got "
                                    f"{self.compute_dtype!r}")
        if self.dense_dtype not in DENSE_DTYPES:
            raise QuantizationError(f"recipe field dense_dtype must be one of {sorted(DENSE_DTYPES)}, got "
                                    f"{self.dense_dtype!r}")
        if self.act is not None:
            _check_fields("act", self.act, ActQuantConfig)
            ActQuantConfig(**self.act)  # ActQuantError for bad values
        if self.finetune is not None:
            from pvq.calibrate.finetune import FinetuneConfig, FinetuneError

            if self.method is None:
                raise QuantizationError("recipe field finetune needs quantized weights (method is None)")
            _check_fields("finetune", self.finetune, FinetuneConfig)
            try:
                config = FinetuneConfig(**self.finetune)
            except FinetuneError as e:
                raise QuantizationError(str(e)) from None
            if self.calib_windows < config.val_windows + 1:
                raise QuantizationError(f"fine-tuning holds out {config.val_windows} of the {self.calib_windows} "
                                        "calibration windows and needs at least one more to train on")
        if self.target_bpw is not None:
            from pvq.calibrate.allocation import check_target

            if self.method is None:
                raise QuantizationError("recipe field target_bpw needs quantized weights (method is None)")
            check_target(self.method, self.method_config(), self.target_bpw)
        if self.embeddings is not None and self.method is not None:  # float weights keep a dense embedding
            _check_fields("embeddings", self.embeddings, get_method("rtn").config_class)
            try:
                config = get_method("rtn").make_config(self.embeddings)
            except QuantizationError as e:
                raise QuantizationError(f"recipe field embeddings: {e}") from None
            if not 4 <= config.bits <= 8:
                raise QuantizationError(f"recipe field embeddings: bits must be in 4..8, got {config.bits}")
        if self.calib_text is not None and not isinstance(self.calib_text, (str, os.PathLike)):
            raise QuantizationError(f"recipe field calib_text must be a path or None, got "
                                    f"{type(self.calib_text).__name__}")

    def stream_obstacle(self, windows_given: bool) -> str | None:
        """Why this recipe cannot run on a streamed model (None: it can)."""
        if self.rotate:
            return "the fused rotation needs the whole float model at once (quantize without --stream to rotate)"
        if self.method is None:
            return "streaming quantizes weights; a float model (method None) has nothing to stream"
        if self.finetune is not None:
            return ("fine-tuning (on by default) is not streamed: its teacher pass runs the whole float model and "
                    "its steps the whole quantized one (add --fast for the one-shot model, or drop --stream)")
        if self.target_bpw is not None:
            return ("the bit allocation measures every layer of the float model first (drop --stream or "
                    "--target-bpw)")
        if not windows_given and self.needs_calibration() and self.calib_text == SAMPLED:
            return ("sampling calibration text runs the whole float model token by token; a streamed model needs a "
                    "calibration text file (--calib-text)")
        return None

    def method_config(self) -> Any:
        """The validated config object of the method (None for float weights). A method field
        whose flag is a recipe field (GPTVQ's k-means `seed` is the job's `--seed`) takes the
        recipe's value unless `config` gives it, as on the command line."""
        if self.method is None:
            return None
        method = get_method(self.method)
        if self.config is not None and not isinstance(self.config, dict):
            return method.make_config(self.config)
        shared = {f.name: getattr(self, how.option) for f in fields(method.config_class)
                  if (how := setting_of(f)) is not None and how.option in _RUN_FIELDS}
        return method.make_config({**shared, **(self.config or {})})

    def needs_calibration(self) -> bool:
        """Whether calibration windows are needed: for the Hessians, the fine-tuning or the allocation."""
        return self.method is not None and (self.needs_hessian() or self.finetune is not None
                                            or self.target_bpw is not None)

    def needs_hessian(self) -> bool:
        return self.method is not None and get_method(self.method).needs_hessian(self.method_config())

    def calibration(self, model: nn.Module, tokenizer: Any, progress: bool = True,
                    can_sample: bool = True) -> tuple[torch.Tensor | None, str]:
        """(the calibration windows this recipe asks for, where they came from in one line);
        (None, "none") when the method needs none. From `calib_text`, else WikiText-2 where
        reachable, else sampled from the (unrotated float) model, seeded
        (`pvq.calibrate.calibration_data`)."""
        if not self.needs_calibration():
            return None, "none"
        return calibration_data(tokenizer, self.calib_text, self.calib_windows, self.calib_seqlen, self.seed,
                                model=model if can_sample else None, progress=progress)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if self.method is not None:
            out["config"] = asdict(self.method_config())  # every field, defaults included
        return out


def _check_fields(name: str, value: Any, cls: type) -> None:
    """QuantizationError unless `value` is a dict of `cls`'s field names (recipe field `name`)."""
    from dataclasses import fields as dataclass_fields

    if not isinstance(value, dict):
        raise QuantizationError(f"recipe field {name} must be a dict of {cls.__name__} fields or None, got "
                                f"{type(value).__name__}")
    known = [f.name for f in dataclass_fields(cls)]
    unknown = sorted(str(k) for k in value if k not in known)
    if unknown:
        raise QuantizationError(f"unknown {name} field(s) {', '.join(map(repr, unknown))}; known: {', '.join(known)}")


@dataclass
class OneshotResult:
    model: nn.Module  # quantized in place: QuantizedLinear layers owning their payloads
    quantized: QuantizeResult | None  # per-layer payloads and report (None for float weights)
    rotation: dict[str, Any] | None
    act_record: dict[str, Any] | None
    windows: torch.Tensor | None  # the calibration windows used (None without calibration)
    seconds: dict[str, float]  # calibration, rotation, allocation, quantization, finetune
    finetune: Any = None  # the pvq.calibrate.finetune.FinetuneReport (None: not fine-tuned)
    embeddings: dict[str, Any] | None = None  # the quantized embedding's record (None: kept dense)
    allocation: Any = None  # the pvq.calibrate.allocation.Allocation (None: one setting for every layer)
    before_finetune: nn.Module | None = None  # with keep_before_finetune: the one-shot model, stored alike
    calibration: str = "none"  # where the calibration windows came from ("given": passed in)

    @property
    def bits_per_weight_nominal(self) -> float | None:
        if self.quantized is None:
            return None
        qcfg = self.model.config.quantization_config
        weights = sum(qt.shape[0] * qt.shape[1] for qt in self.quantized.values())
        total = 0.0
        for name, qt in self.quantized.items():
            method, config = qcfg.layer_settings(name)
            total += get_method(method).nominal_bits_per_weight(config, qt.shape[1]) * qt.shape[0] * qt.shape[1]
        return total / weights


def oneshot(
    model: nn.Module,
    tokenizer: Any,
    recipe: Recipe,
    *,
    windows: torch.Tensor | None = None,
    device: str = "cpu",
    work_dir: str | None = None,
    progress: bool = True,
    stream: StreamedModel | None = None,
    offload_activations: bool = False,
    keep_before_finetune: bool = False,
) -> OneshotResult:
    """Quantize `model` in place as `recipe` says (see the module docstring). With `stream`
    (then `model` is `stream.model`) the blocks are read one at a time and packed as soon
    as each is done, so the float model is never held whole. With `keep_before_finetune` and
    a fine-tuning recipe, `result.before_finetune` is a copy of the quantized model before its
    fine-tuning (embeddings stored the same way), so one run gives both points of a sweep."""
    recipe.check()  # QuantizationError for bad settings, before any work
    config = recipe.method_config()
    if stream is not None:
        if model is not stream.model:
            raise QuantizationError("with stream=, the model must be stream.model")
        obstacle = recipe.stream_obstacle(windows_given=windows is not None)
        if obstacle is not None:
            raise StreamError(f"cannot stream: {obstacle}")
    for name, tensor in model.state_dict().items():
        if tensor.device.type == "meta":
            continue  # a streamed block: checked when it is read
        if tensor.is_floating_point() and finite_absmax(tensor) is None:
            raise QuantizationError(f"model tensor {name!r} has non-finite values; refusing to quantize the model")
    adapter = adapter_for(model)
    if recipe.method is not None and recipe.embeddings is not None:
        check_embeddings(model, recipe.embeddings)  # refused now, not after the quantization
    layer_names = adapter.quantized_layer_names(model)
    act_config = ActQuantConfig(**recipe.act) if recipe.act is not None else None
    if act_config is not None:
        check_act_quant(model, act_config, layer_names)
    seconds = {"calibration": 0.0, "rotation": 0.0, "allocation": 0.0, "quantization": 0.0, "finetune": 0.0}

    calibration = "given" if windows is not None else "none"
    if windows is None and recipe.needs_calibration():
        t0 = time.perf_counter()
        windows, calibration = recipe.calibration(model, tokenizer, progress=progress, can_sample=stream is None)
        seconds["calibration"] = time.perf_counter() - t0
    # the fine-tuning's teacher: the float model's distributions on the windows, top-k, taken
    # now (before the rotation, which preserves the function) so no float copy is kept
    teacher = None
    if recipe.method is not None and recipe.finetune is not None:
        t0 = time.perf_counter()
        tuning = FinetuneConfig(**recipe.finetune)
        teacher = teacher_targets(model, windows, tuning.teacher_topk, device=device, progress=progress,
                                  rows=teacher_rows(windows.shape[0], tuning))
        seconds["teacher"] = time.perf_counter() - t0
    # The rotation comes after the calibration windows (sampled from the unrotated model, so
    # the same with and without it) and before any Hessian is collected.
    rotation = None
    if recipe.rotate:
        t0 = time.perf_counter()
        rotation = rotate_model(model, seed=recipe.rotate_seed)
        seconds["rotation"] = time.perf_counter() - t0
    result, allocation, tuned, embeddings, before = None, None, None, None, None
    if recipe.method is not None:
        layer_configs = None
        if recipe.target_bpw is not None:
            t0 = time.perf_counter()
            allocation = allocate_bits(model, adapter, windows, recipe.method, config, recipe.target_bpw,
                                       device=device, batch_size=recipe.batch_size,
                                       compute_dtype=COMPUTE_DTYPES[recipe.compute_dtype], work_dir=work_dir,
                                       progress=progress)
            layer_configs = allocation.configs
            seconds["allocation"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        streaming = {}
        if stream is not None:  # each finished block's layers are packed at once: no float weight stays
            def pack_block(i: int, layers: dict) -> None:
                pack_layers(model, layers, recipe.method, config)
                release_freed_memory()

            streaming = dict(stream=stream, on_block_done=pack_block)
        if recipe.needs_hessian():
            result = quantize_model(model, adapter, windows, recipe.method, config, device=device, work_dir=work_dir,
                                    batch_size=recipe.batch_size, compute_dtype=COMPUTE_DTYPES[recipe.compute_dtype],
                                    progress=progress, offload_activations=offload_activations,
                                    layer_configs=layer_configs, **streaming)
        else:
            result = quantize_weights(model, adapter, recipe.method, config, layer_configs=layer_configs, **streaming)
        seconds["quantization"] = time.perf_counter() - t0
        if stream is None:
            quantized_model(model, dict(result), recipe.method, config, dense_dtype=recipe.dense_dtype,
                            layer_configs=layer_configs)
        else:
            mark_quantized(model, sorted(result), recipe.method, config, dense_dtype=recipe.dense_dtype)
        release_freed_memory()  # the float weights the packed layers replaced
        if teacher is not None:
            if keep_before_finetune:
                before = copy.deepcopy(model)
            t0 = time.perf_counter()
            tuned = finetune(model, teacher, windows, recipe.finetune, work_dir=work_dir, device=device,
                             progress=progress)
            seconds["finetune"] = time.perf_counter() - t0 + seconds.pop("teacher")
        if recipe.embeddings is not None:  # data-free, after the fine-tuning (which keeps them float)
            for m in (model,) if before is None else (model, before):
                embeddings = quantize_embeddings(m, recipe.embeddings)
                m.config.quantization_config.embeddings = embeddings
    act_record = install_act_quant(model, act_config, layer_names) if act_config is not None else None
    return OneshotResult(model, result, rotation, act_record, windows if recipe.needs_calibration() else None, seconds,
                         finetune=tuned, allocation=allocation, embeddings=embeddings, before_finetune=before,
                         calibration=calibration)
