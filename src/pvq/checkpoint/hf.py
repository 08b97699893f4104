"""transformers integration: a pvq model is a normal Hugging Face model directory.

`import pvq` registers the quantization method ``"pvq"`` with transformers
(`register_quantization_config` / `register_quantizer`, the route AQLM, VPTQ and HIGGS
use), so ``AutoModelForCausalLM.from_pretrained(dir)`` rebuilds a pvq checkpoint:

* `PVQQuantizationConfig` is the ``quantization_config`` of ``config.json``: the format
  version, the method and its config (once), per-layer overrides, the list of quantized
  layers, the rotation record, the activation-quantization record and the dtype the
  dense tensors are stored in. It is validated field by field when read.
* `PVQHfQuantizer` turns every listed ``nn.Linear`` of the model (still on the meta
  device, so no float weight of a quantized layer is ever allocated) into an empty
  `QuantizedLinear` whose persistent buffers transformers then fills from the
  safetensors shards, installs the recorded online rotations and activation quantizers,
  and after loading checks every payload against its spec. Saving goes through
  transformers' ``save_pretrained``; the quantizer hands it the state_dict with the dense
  floats in the stored dtype (float16, bfloat16 where a value would overflow).

`quantized_model` turns a model whose linears were quantized by the pipeline into the
same structure in memory, so the in-memory model and the reloaded one are one thing.

Over 500 lines because the quantization_config's validation of every stored field and the
quantizer's load hooks that rely on it are one piece: transformers' side of the format.
"""

from __future__ import annotations

from pvq.errors import PVQError

import copy
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from pvq.methods import QuantizationError, QuantizedTensor, get_method
from pvq.activations import ActQuantError, act_quant_of, install_act_quant_record
from pvq.methods.input_transforms import input_transforms_of
from pvq.rotation import RotationError, install_rotation, refresh_online_transforms, rotation_of

from pvq.checkpoint.index import FORMAT_VERSION, QUANT_METHOD, _VERIFIED, stored_block_count
from pvq.runtime.errors import CheckpointActQuantError, CheckpointError, CheckpointRotationError, CheckpointVersionError
from pvq.runtime.embedding import embedding_record, install_embeddings
from pvq.runtime.linear import STORAGE_DTYPES, PackedPayload, QuantizedLinear, replace_linear

__all__ = [
    "DENSE_DTYPES",
    "FORMAT_VERSION",
    "QUANT_METHOD",
    "PVQHfQuantizer",
    "PVQQuantizationConfig",
    "dense_state_dict",
    "quantized_model",
    "register_with_transformers",
]

DENSE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_FP16_MAX = float(torch.finfo(torch.float16).max)
_FIELDS = ("quant_method", "format_version", "pvq_version", "method", "config", "layers", "layer_overrides",
           "rotation", "act_quant", "dense_dtype", "embeddings")


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise CheckpointError(f"quantization_config: {message}")


def _as_current(format_version: int, method: Any, config: dict[str, Any]) -> dict[str, Any]:
    """A method config as this format version reads it: format 4 stored PVQ codes in
    Fischer's order only, and had no "enumeration" field to say so."""
    if format_version == 4 and method == "pvq" and "enumeration" not in config:
        return {**config, "enumeration": "fischer"}
    return config


class PVQQuantizationConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of a pvq model (see the module docstring).

    method / config: the method of every quantized layer and its config fields;
    layers: the quantized modules' names; layer_overrides: {layer: {"method", "config"}}
    for layers quantized with other settings; rotation / act_quant: the JSON records of
    `pvq.rotation` and `pvq.activations` (None: none); dense_dtype: how the
    float tensors that are not quantized are stored; embeddings: the record of a quantized
    embedding and head (`pvq.runtime.embedding`), None: stored as dense tensors.
    """

    def __init__(
        self,
        method: str = "pvq",
        config: dict[str, Any] | None = None,
        layers: list[str] | None = None,
        layer_overrides: dict[str, dict[str, Any]] | None = None,
        rotation: dict[str, Any] | None = None,
        act_quant: dict[str, Any] | None = None,
        dense_dtype: str = "float16",
        embeddings: dict[str, Any] | None = None,
        format_version: int = FORMAT_VERSION,
        pvq_version: str | None = None,
        quant_method: str = QUANT_METHOD,
        **unknown: Any,
    ) -> None:
        from pvq.version import __version__

        _need(not unknown, f"unknown field(s) {', '.join(map(repr, sorted(unknown)))}; known: {', '.join(_FIELDS)}")
        _need(isinstance(quant_method, str) and quant_method == QUANT_METHOD,
              f"quant_method is {quant_method!r}, not {QUANT_METHOD!r}")
        _need(isinstance(method, str), f"method must be a method name, got {method!r}")
        _need(pvq_version is None or isinstance(pvq_version, str), f"pvq_version must be a string, got {pvq_version!r}")
        if isinstance(format_version, bool) or not isinstance(format_version, int) or format_version < 1:
            raise CheckpointVersionError(f"quantization_config: format_version {format_version!r} is not a version number")
        if format_version > FORMAT_VERSION:
            raise CheckpointVersionError(
                f"quantization_config: format_version {format_version} is newer than this pvq reads ({FORMAT_VERSION}); "
                "upgrade pvq"
            )
        if format_version < FORMAT_VERSION - 1:
            raise CheckpointVersionError(
                f"quantization_config: format_version {format_version} is an older pvq layout; convert it with "
                "`pvq convert OLD NEW`"
            )
        self.quant_method = QUANT_METHOD
        self.format_version = FORMAT_VERSION
        self.pvq_version = pvq_version or __version__
        self.method = method
        _need(config is None or isinstance(config, dict), f"config must be an object of the method's fields, got {config!r}")
        self.config = _as_current(format_version, method, dict(config or {}))
        self._config_obj = self._method_config("", method, self.config)
        _need(isinstance(layers, list) and all(isinstance(n, str) and n for n in layers),
              "'layers' must be a list of module names")
        _need(len(set(layers)) == len(layers), "'layers' names a module twice")
        self.layers = list(layers)
        overrides = layer_overrides or {}
        _need(isinstance(overrides, dict), "'layer_overrides' must be an object")
        self._override_objs: dict[str, tuple[str, Any]] = {}
        for name, entry in overrides.items():
            _need(name in self.layers, f"layer_overrides names {name!r}, which is not in 'layers'")
            _need(isinstance(entry, dict) and set(entry) <= {"method", "config"},
                  f"layer_overrides[{name!r}] must be an object with 'method' and 'config'")
            m = entry.get("method", method)
            entry_config = entry.get("config") or {}
            if isinstance(entry_config, dict):
                entry_config = _as_current(format_version, m, entry_config)
                overrides = {**overrides, name: {**entry, "config": entry_config}}
            self._override_objs[name] = (m, self._method_config(f"layer_overrides[{name!r}].", m, entry_config))
        self.layer_overrides = copy.deepcopy(overrides)
        _need(rotation is None or isinstance(rotation, dict), "'rotation' must be an object or null")
        _need(act_quant is None or isinstance(act_quant, dict), "'act_quant' must be an object or null")
        self.rotation = copy.deepcopy(rotation)
        self.act_quant = copy.deepcopy(act_quant)
        _need(isinstance(dense_dtype, str) and dense_dtype in DENSE_DTYPES,
              f"dense_dtype must be one of {sorted(DENSE_DTYPES)}, got {dense_dtype!r}")
        self.dense_dtype = dense_dtype
        self.embeddings = None if embeddings is None else copy.deepcopy(embedding_record(embeddings))

    @staticmethod
    def _method_config(where: str, method: Any, config: Any) -> Any:
        _need(isinstance(config, dict), f"{where}config must be an object")
        try:
            return get_method(method).make_config(config)
        except QuantizationError as e:
            raise CheckpointError(f"quantization_config: {where}{e}") from None
        except TypeError as e:
            raise CheckpointError(f"quantization_config: {where}config: {e}") from None

    def layer_settings(self, name: str) -> tuple[str, Any]:
        """(method, config object) of one quantized layer."""
        return self._override_objs.get(name, (self.method, self._config_obj))

    def to_dict(self) -> dict[str, Any]:
        out = {
            "quant_method": self.quant_method,
            "format_version": self.format_version,
            "pvq_version": self.pvq_version,
            "method": self.method,
            "config": copy.deepcopy(self.config),
            "layers": list(self.layers),
            "layer_overrides": copy.deepcopy(self.layer_overrides),
            "rotation": copy.deepcopy(self.rotation),
            "act_quant": copy.deepcopy(self.act_quant),
            "dense_dtype": self.dense_dtype,
        }
        if self.embeddings is not None:  # absent otherwise: the config of earlier checkpoints, byte for byte
            out["embeddings"] = copy.deepcopy(self.embeddings)
        return out

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()


def finite_absmax(value: torch.Tensor, chunk: int = 1 << 20) -> float | None:
    """max |x| of a float tensor, None if any value is not finite; in chunks, so that a large
    embedding costs a few MiB of temporaries, not copies of itself."""
    flat = value.detach().reshape(-1)
    best = 0.0
    for start in range(0, flat.numel(), chunk):
        part = flat[start:start + chunk]
        if not bool(torch.isfinite(part).all()):
            return None
        if part.numel():
            best = max(best, float(part.abs().max()))
    return best


def _store_dtype(value: torch.Tensor, dense: torch.dtype, absmax: float) -> torch.dtype:
    """The dtype a dense float tensor is stored in: `dense`, or bfloat16 where float16
    would overflow one of its values (a bfloat16 tensor stays bfloat16)."""
    if dense == torch.float16 and (value.dtype == torch.bfloat16 or absmax > _FP16_MAX):
        return torch.bfloat16
    return dense


def dense_state_dict(model: nn.Module, dense_dtype: str = "float16") -> dict[str, torch.Tensor]:
    """The model's state_dict with every float tensor cast to its stored dtype (payload
    buffers are integers and stay as they are); a non-finite value is refused, naming the tensor."""
    dense = DENSE_DTYPES[dense_dtype]
    out = {}
    cast: dict[tuple, torch.Tensor] = {}  # tied tensors (one storage) stay one tensor, so transformers saves them once
    for key, value in model.state_dict().items():
        if value.is_floating_point():
            if value.device.type == "meta":
                raise CheckpointError(f"tensor {key!r} is on the meta device (has no value) and cannot be saved")
            ident = (value.device.type, value.untyped_storage().data_ptr(), value.storage_offset(),
                     tuple(value.shape), tuple(value.stride()), value.dtype)
            if ident not in cast:
                absmax = finite_absmax(value)
                if absmax is None:
                    raise CheckpointError(f"tensor {key!r} has non-finite values; refusing to save it")
                cast[ident] = value.to(_store_dtype(value, dense, absmax))
            value = cast[ident]
        out[key] = value
    return out


def round_dense_to_storage(model: nn.Module, dense_dtype: str = "float16") -> None:
    """Round every float parameter and buffer in place to what its stored dtype holds, so
    that the in-memory model computes exactly what the saved and reloaded one does."""
    dense = DENSE_DTYPES[dense_dtype]
    with torch.no_grad():
        for tensor in model.state_dict(keep_vars=True).values():  # what is saved (non-persistent buffers are not)
            if tensor.is_floating_point() and tensor.device.type != "meta":
                absmax = finite_absmax(tensor)
                store = _store_dtype(tensor, dense, absmax if absmax is not None else 0.0)
                if store != tensor.dtype:
                    flat = tensor.view(-1) if tensor.is_contiguous() else None
                    if flat is None:
                        tensor.copy_(tensor.to(store))
                    else:  # in chunks: a few MiB of temporaries, even for a large embedding
                        for start in range(0, flat.numel(), 1 << 20):
                            part = flat[start:start + (1 << 20)]
                            part.copy_(part.to(store))


_SAFETENSORS_DTYPES = {"U8": "uint8", "I8": "int8", "I16": "int16", "I32": "int32", "I64": "int64", "U16": "uint16",
                       "U32": "uint32", "F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64",
                       "BOOL": "bool"}


def _verify_local_index(checkpoint_files: list[str]) -> None:
    """On transformers' own route too: a checkpoint directory with a pvq integrity index is
    verified against it (every file's size and sha256) before anything is loaded. Without
    an index (saved by plain save_pretrained) a warning says it is unverified."""
    import logging

    from pvq.checkpoint.index import INDEX_FILE, verify_checkpoint

    from pvq.checkpoint.load_checks import checked_directory

    root = Path(checkpoint_files[0]).parent
    if root.resolve() in (_VERIFIED.get(), checked_directory()):  # verified by the caller, or by the guard
        return
    if (root / INDEX_FILE).exists() or (root / INDEX_FILE).is_symlink():
        verify_checkpoint(root)
    else:
        logging.getLogger(__name__).warning("%s has no %s (saved by plain save_pretrained): loading it unverified",
                                            root, INDEX_FILE)


def _check_stored_payloads(model: nn.Module, checkpoint_files: list[str]) -> None:
    """Compare the safetensors headers (shapes and dtypes, no data read) with the model,
    before transformers loads anything: every quantized layer's payload must match its spec
    (an error names the layer and the field instead of a size-mismatch report), and the
    stored keys must be exactly the model's (no tensor silently initialised at random, none
    ignored)."""
    from safetensors import safe_open

    stored: dict[str, tuple[tuple[int, ...], str]] = {}
    for path in checkpoint_files:
        if not str(path).endswith(".safetensors"):
            continue
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                sl = f.get_slice(key)
                stored[key] = (tuple(sl.get_shape()), _SAFETENSORS_DTYPES.get(sl.get_dtype(), sl.get_dtype()))
    from pvq.models.streaming import loaded_keys

    names = loaded_keys(model, stored)
    stored = {names[key]: value for key, value in stored.items()}
    tied = set((model.get_expanded_tied_weights_keys() or {}) if hasattr(model, "get_expanded_tied_weights_keys") else {})
    expected = set(model.state_dict().keys())
    missing = sorted(expected - set(stored) - tied)
    unexpected = sorted(set(stored) - expected)
    if missing or unexpected:
        raise CheckpointError(
            "the stored tensors do not match the model"
            + (f"; missing: {', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}" if missing else "")
            + (f"; not in the model: {', '.join(unexpected[:6])}{' ...' if len(unexpected) > 6 else ''}" if unexpected else "")
        )
    for name, module in model.named_modules():
        if not isinstance(module, PackedPayload):
            continue
        for tname, spec in module.payload_spec.items():
            key = f"{name}.{tname}"  # present: the key comparison above refused missing ones
            want = (tuple(spec.shape), str(STORAGE_DTYPES[spec.dtype]).removeprefix("torch."))
            if stored[key] != want:
                shape, dtype = stored[key]
                raise CheckpointError(
                    f"layer {name!r} ({module.method}): stored tensor {tname!r} is {dtype} {shape}, the "
                    f"{module.method} payload spec says {spec.dtype} {tuple(spec.shape)}"
                    + (" (held as int16 bits)" if spec.dtype == "float16" else "")
                )


def _linear(model: nn.Module, name: str, what: str) -> nn.Linear:
    """The nn.Linear `name` of `model`, else CheckpointError ("{what} {name!r} ...")."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise CheckpointError(f"{what} {name!r}, which is not a module of the "
                              f"{getattr(model.config, 'model_type', '?')} model") from None
    if not isinstance(module, nn.Linear):
        raise CheckpointError(f"{what} {name!r}, which is a {type(module).__name__} in the model, not nn.Linear")
    return module


class PVQHfQuantizer(HfQuantizer):
    """Loads pre-quantized pvq models (see the module docstring); quantizing happens in pvq."""

    requires_calibration = True
    quantization_config: PVQQuantizationConfig

    def _process_model_before_weight_loading(self, model, **kwargs):
        from pvq.models.adapters import adapter_for_type

        cfg = self.quantization_config
        try:  # fused experts become one linear per expert, as when they were quantized
            adapter_for_type(getattr(model.config, "model_type", None)).prepare(model)
        except PVQError as e:
            raise CheckpointError(f"config.json: {e}") from None
        # The online rotations and activation quantizers hold no stored tensors: they are
        # rebuilt from their records on the CPU (the model itself is still on meta).
        with torch.device("cpu"):
            if cfg.rotation is not None:
                try:
                    install_rotation(model, cfg.rotation)
                except (RotationError, ValueError) as e:
                    raise CheckpointRotationError(f"the recorded rotation cannot be rebuilt: {e}") from e
            for name in cfg.layers:
                module = _linear(model, name, "quantization_config lists layer")
                method, config = cfg.layer_settings(name)
                try:
                    with torch.device("meta"):
                        layer = QuantizedLinear(module.in_features, module.out_features, method, config,
                                                bias=module.bias is not None,
                                                dtype=module.bias.dtype if module.bias is not None else None, name=name)
                except QuantizationError as e:
                    raise CheckpointError(f"layer {name!r}: the recorded {method} config does not fit its shape: {e}") from None
                replace_linear(model, name, layer)
            if cfg.embeddings is not None:
                install_embeddings(model, cfg.embeddings)
            if cfg.act_quant is not None:
                try:
                    install_act_quant_record(model, cfg.act_quant)
                except ActQuantError as e:
                    raise CheckpointActQuantError(f"the recorded activation quantization cannot be rebuilt: {e}") from e
        files = [str(f) for f in (kwargs.get("checkpoint_files") or [])]
        if files:
            _verify_local_index(files)
            _check_stored_payloads(model, files)
        return model

    def update_attn_implementation(self, config):
        """Called with the model's config before the model is built: the layer count the
        config asks for must be the one the quantized layers cover (no building of a huge
        model from a tampered config.json)."""
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        try:
            blocks = stored_block_count(self.quantization_config.layers, getattr(config, "model_type", None))
        except PVQError as e:
            raise CheckpointError(f"config.json: {e}") from None
        n_layers = getattr(text, "num_hidden_layers", None)
        if blocks is not None and n_layers != blocks:
            raise CheckpointError(f"config.json says num_hidden_layers {n_layers!r}, the quantization_config's layers "
                                  f"cover {blocks} decoder blocks")
        return config

    def _process_model_after_weight_loading(self, model, **kwargs):
        refresh_online_transforms(model)
        for key, value in model.state_dict().items():
            if value.is_floating_point() and value.device.type != "meta" and finite_absmax(value) is None:
                raise CheckpointError(f"stored tensor {key!r} has non-finite values")
        for module in model.modules():
            if isinstance(module, PackedPayload):
                module.check_payload()
                # own the payload: a buffer loaded as it is stored can be a view into the memory-mapped
                # shard, which would keep the whole file (its dense tensors too) mapped and resident
                for name in module.payload_spec:
                    buf = getattr(module, name)
                    if buf.device.type == "cpu":
                        setattr(module, name, buf.clone())
                device = getattr(module, next(iter(module.payload_spec))).device
                for transform in input_transforms_of(module).values():
                    transform.to(device)
        # Stored values are checked above; the one range no value check sees is a PVQ code beyond
        # its pyramid's size, so PVQ layers are decoded once (pvq.load decodes or transcodes every
        # layer itself, after its layout). Grid codes and GPTVQ indices cannot be out of range.
        if _VERIFIED.get() is None:
            for module in model.modules():
                if isinstance(module, QuantizedLinear) and module.method == "pvq":
                    module.check_decode()
        return model

    def get_state_dict_and_metadata(self, model):
        # transformers' save_pretrained asks for the state_dict before it writes config.json
        ready_to_save(model)
        return dense_state_dict(model, self.quantization_config.dense_dtype), {}

    def is_serializable(self):
        return True

    @property
    def is_trainable(self) -> bool:
        return False


_REGISTERED = False


def register_with_transformers() -> None:
    """Register ``"pvq"`` with transformers' quantizer registry (once; `import pvq` does it)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers.quantizers.auto import (
        AUTO_QUANTIZATION_CONFIG_MAPPING,
        AUTO_QUANTIZER_MAPPING,
        register_quantization_config,
        register_quantizer,
    )

    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(PVQQuantizationConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(PVQHfQuantizer)
    from pvq.checkpoint.load_checks import guard_from_pretrained

    guard_from_pretrained()
    _REGISTERED = True


def quantized_model(
    model: nn.Module,
    quantized: dict[str, QuantizedTensor],
    method: str,
    config: Any,
    *,
    dense_dtype: str = "float16",
    layer_configs: dict[str, Any] | None = None,
) -> nn.Module:
    """Turn `model` (a transformers causal LM) into a pvq model in place and return it.

    Every linear named in `quantized` becomes a `QuantizedLinear` holding that payload
    (checked against the spec of (config, shape)); its float weight is dropped. The
    model gets a `PVQQuantizationConfig` (recording its rotation and activation
    quantization as they are now and when saved) and the quantizer transformers uses on
    save, and its dense tensors are rounded to `dense_dtype` so that save and reload
    give bit-identical logits. `layer_configs`: {layer: config} of layers quantized with
    settings of their own (recorded as the config's layer_overrides)."""
    pack_layers(model, quantized, method, config, layer_configs)
    return mark_quantized(model, sorted(quantized), method, config, dense_dtype=dense_dtype,
                          layer_configs=layer_configs)


def pack_layers(model: nn.Module, quantized: dict[str, QuantizedTensor], method: str, config: Any,
                layer_configs: dict[str, Any] | None = None) -> None:
    """Replace each linear named in `quantized` by a `QuantizedLinear` holding its payload,
    in place (the float weight is dropped): what the streaming pipeline does block by block."""
    method_obj = get_method(method)
    config = method_obj.make_config(config)
    layer_configs = layer_configs or {}
    for name in sorted(quantized):
        qt = quantized[name]
        if qt.method != method:
            raise CheckpointError(f"layer {name!r} was quantized with {qt.method}, not {method}")
        module = _linear(model, name, "quantized layer")
        if tuple(qt.shape) != (module.out_features, module.in_features):
            raise CheckpointError(f"quantized layer {name!r} has shape {tuple(qt.shape)}, the model's linear "
                                  f"{(module.out_features, module.in_features)}")
        layer = QuantizedLinear.from_quantized(qt, method_obj.make_config(layer_configs.get(name, config)), module.bias,
                                               name=name)
        device = module.weight.device
        replace_linear(model, name, layer.to(device))


def mark_quantized(model: nn.Module, layers: list[str], method: str, config: Any, *,
                   dense_dtype: str = "float16", layer_configs: dict[str, Any] | None = None) -> nn.Module:
    """Give a model whose `layers` are packed (`pack_layers`) its pvq quantization config and
    save-time quantizer, and round its dense tensors to `dense_dtype`; returns the model."""
    register_with_transformers()
    method_obj = get_method(method)
    config = method_obj.make_config(config)
    for name in layers:
        if not isinstance(model.get_submodule(name), QuantizedLinear):
            raise CheckpointError(f"layer {name!r} is not packed")
    overrides = {}
    for name, layer_config in sorted((layer_configs or {}).items()):
        layer_config = asdict(method_obj.make_config(layer_config))
        if layer_config != asdict(config):
            overrides[name] = {"method": method, "config": layer_config}
    qcfg = PVQQuantizationConfig(method=method, config=asdict(config), layers=sorted(layers),
                                 layer_overrides=overrides, rotation=rotation_of(model), act_quant=act_quant_of(model),
                                 dense_dtype=dense_dtype)
    model.config.quantization_config = qcfg
    model.hf_quantizer = PVQHfQuantizer(qcfg, pre_quantized=True)
    model.quantization_method = QUANT_METHOD
    round_dense_to_storage(model, dense_dtype)
    return model


def ready_to_save(model: nn.Module) -> None:
    """Before any save: record the rotation and activation quantization as they are now
    (quantizers installed after `quantized_model` included) and check every payload
    against its spec (CheckpointError naming the layer)."""
    refresh_records(model)
    for module in model.modules():
        if isinstance(module, PackedPayload):
            module.check_payload()


def refresh_records(model: nn.Module) -> PVQQuantizationConfig:
    """The model's quantization config with its rotation and activation records as they are now."""
    qcfg = getattr(model.config, "quantization_config", None)
    if not isinstance(qcfg, PVQQuantizationConfig):
        raise CheckpointError("the model is not a pvq model (its config has no pvq quantization_config)")
    rotation, act = rotation_of(model), act_quant_of(model)
    transforms = [t for m in model.modules() for t in input_transforms_of(m)]
    if rotation is None and "input_rotation" in transforms:
        raise CheckpointError("the model has online Hadamard transforms but no rotation record; it cannot be rebuilt on load")
    if act is None and "input_quantizer" in transforms:
        raise CheckpointError("the model has activation quantizers but no activation quantization record; "
                              "it cannot be rebuilt on load")
    qcfg.rotation = copy.deepcopy(rotation)
    qcfg.act_quant = copy.deepcopy(act)
    return qcfg


def bits_per_weight(model: nn.Module) -> float:
    """Measured bits per weight over the model's quantized layers (stored bytes x 8 / weights)."""
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    weights = sum(m.in_features * m.out_features for m in layers)
    return sum(m.stored_bytes for m in layers) * 8 / weights if weights else math.nan
