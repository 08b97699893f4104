"""Layer-by-layer (sequential) quantization of a causal LM with any `pvq.methods` method.

Algorithm (GPTQ-style sequential quantization, paper section 3.3):

1. Block inputs. The calibration windows are run through the model with a forward
   pre-hook on decoder block 0 that records the block's positional arguments (the hidden
   states) and keyword arguments (attention mask, position ids, rotary `position_embeddings`
   (cos, sin), cache flags, ...), then raises a private `_StopForward` so that nothing past
   the embedding is computed. Only the adapter's `pre_block` modules and block 0 visit the
   compute device for this. The hidden states live on the CPU, the per-batch keyword
   arguments (small) on the compute device.
2. Block by block (one block on the compute device at a time), for each sequential group
   of linears (adapter.block_groups): forward the block inputs through the block with
   forward hooks on the group's linears that accumulate H = (1/N) sum_n x_n x_n^T over the
   N = n_windows * seqlen token vectors x_n entering the layer; the forward is cut short
   (`_StopForward`) as soon as every linear of the group has been reached. Each linear is
   then quantized from its original float32 weight and H, and its weight replaced by the
   dequantized one, so the next group's inputs are recomputed through the already-quantized
   layers. Finally the quantized block is run on all inputs to make the next block's inputs.
3. Hessians: every batch's x^T x is computed in float32 (from the compute dtype) and summed
   in float64, then divided by N, made exactly symmetric (upper triangle mirrored) and
   handed to the method as float32. Layers that receive the very same input tensor
   (q/k/v, gate/up) share one product per batch. The 1/N
   normalisation makes the proxy loss tr((W - Q) H (W - Q)^T) an average per token (GPTQ's
   reference code uses 2/N; the factor changes no argmin and cancels in GPTQ's relative
   dampening).
4. `compute_dtype` (default float32) is the dtype of the calibration forwards only: with
   bfloat16 the block is cast for the forwards (fast on CPUs with AVX512-BF16/AMX), while
   the weights handed to the quantizer are always the original ones in float32, the
   Hessians are float32/float64 as above, and the model ends with exact float copies of the
   dequantized weights in its own dtype. With float32 nothing is cast.
5. Resume (when `work_dir` is given): after each block, its QuantizedTensors, its outputs
   and then the state file are written atomically (see `workdir.py`); a rerun with the same
   method, config, calibration windows, batch size, compute dtype and model continues
   after the last finished block and gives the same bytes as an uninterrupted run. A
   finished block is trusted only if its files match their digests and its layers match
   the settings and dequantize to the weights recorded for it (`_verified_contents`);
   anything else is recomputed, never shipped.

The model is modified in place: every quantized linear ends up holding its dequantized
weight, so the returned model can be evaluated directly.
"""

from __future__ import annotations

from pvq.errors import PVQError

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from pvq.models.adapters import ArchitectureAdapter
from pvq.methods import QuantizationError, QuantizedTensor, get_method
from pvq.methods import proxy_loss as _proxy_loss

from pvq.calibrate import workdir as wd
from pvq.calibrate.distributed import DistributedError, World, agree_on_start, barrier, local_windows, share, sum_in_global_order, world

log = logging.getLogger(__name__)


class _StopForward(Exception):
    """Raised from a hook to end a forward pass early (private to this module)."""


class PipelineError(PVQError, RuntimeError):
    """Settings or model state the pipeline cannot work with."""


@dataclass
class LayerReport:
    name: str  # full module name, e.g. model.layers.3.mlp.down_proj
    block: int
    group: int
    shape: tuple[int, int]
    proxy_loss: float | None
    bits_per_weight: float
    seconds: float  # quantize + dequantize time of this layer
    resumed: bool = False  # loaded from the work directory instead of computed
    tokens: int | None = None  # calibration token vectors routed to the layer (None: no Hessian)
    force_routed: bool = False  # an expert whose Hessian came from every token of its block (too few routed)
    expert: int | None = None  # the expert the layer belongs to (mixture-of-experts blocks)


class QuantizeResult(dict):
    """{full layer name: QuantizedTensor}, in quantization order, with the per-layer
    `report` (list of LayerReport), `block_seconds` (per block; None for resumed blocks)
    and `resumed_blocks` (how many blocks came from the work directory)."""

    def __init__(self) -> None:
        super().__init__()
        self.report: list[LayerReport] = []
        self.block_seconds: list[float | None] = []
        self.resumed_blocks: int = 0

    @property
    def measured_bits_per_weight(self) -> float:
        """Bytes stored for all the quantized layers x 8 / their weight count."""
        weights = sum(qt.shape[0] * qt.shape[1] for qt in self.values())
        return sum(qt.stored_bytes for qt in self.values()) * 8 / weights

    def experts_summary(self) -> dict[str, Any] | None:
        """Per expert (block, index): the calibration tokens the router sent it and whether its
        Hessians were force-routed; None for a model without experts."""
        experts: dict[str, dict[str, Any]] = {}
        for r in self.report:
            if r.expert is not None:
                key = r.name.rsplit(".", 1)[0]  # model.layers.3.mlp.experts.5
                entry = experts.setdefault(key, {"block": r.block, "expert": r.expert, "tokens": r.tokens,
                                                 "force_routed": False})
                entry["force_routed"] |= r.force_routed
        if not experts:
            return None
        tokens = [e["tokens"] for e in experts.values() if e["tokens"] is not None]
        return {"experts": len(experts), "min_tokens": min(tokens, default=None), "max_tokens": max(tokens, default=None),
                "force_routed": sorted(k for k, e in experts.items() if e["force_routed"]), "per_expert": experts}

    @property
    def mean_proxy_loss(self) -> float | None:
        """Mean of the layers' proxy losses (None when no layer has one: no Hessian)."""
        losses = [r.proxy_loss for r in self.report if r.proxy_loss is not None]
        return sum(losses) / len(losses) if losses else None


# -- small helpers ------------------------------------------------------------------------------
def _map_tensors(obj, fn):
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple):
        return tuple(_map_tensors(o, fn) for o in obj)
    if isinstance(obj, list):
        return [_map_tensors(o, fn) for o in obj]
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    return obj


def _cast_floating(dtype):
    return lambda t: t.to(dtype) if t.is_floating_point() else t


def _module_home(module: nn.Module) -> torch.device:
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


def _first_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _batches(n: int, batch_size: int):
    for b0 in range(0, n, batch_size):
        yield b0, min(n, b0 + batch_size)


def _resolve_method(method):
    """A registered method name, or any object with quantize/dequantize/config_class."""
    if isinstance(method, str):
        return method, get_method(method)
    for attr in ("quantize", "dequantize", "config_class"):
        if not hasattr(method, attr):
            raise PipelineError(f"method object {method!r} has no {attr!r}")
    return getattr(method, "name", type(method).__name__), method


def _resolve_config(method_obj, config):
    cls = method_obj.config_class
    if config is None:
        return cls()
    if isinstance(config, dict):
        return cls(**config)
    return config


def jsonable(obj) -> Any:
    """A JSON-safe copy (dataclasses as dicts, unknown objects as strings, sorted keys)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


# -- step 1: inputs of block 0 ------------------------------------------------------------------
class BlockArguments:
    """The keyword arguments decoder blocks are called with, for one batch: one set per
    block kind (Gemma's sliding and full attention layers get other masks and rotary
    embeddings; a family without kinds has one set)."""

    def __init__(self, kind_attribute: str | None, by_kind: dict[Any, dict]):
        self.kind_attribute, self.by_kind = kind_attribute, by_kind

    def for_block(self, block: nn.Module) -> dict:
        return self.by_kind[_kind(block, self.kind_attribute)]


def _kind(block: nn.Module, path: str | None) -> Any:
    """The value at a dotted attribute path of a block ("self_attn.layer_type"), or None."""
    value: Any = block
    for part in path.split(".") if path else ():
        value = getattr(value, part, None)
    return None if value is block else value


def block_kinds(adapter: ArchitectureAdapter, blocks: nn.ModuleList) -> list[Any]:
    """Each block's kind (None for all when the description names no kind attribute)."""
    return [_kind(b, adapter.block_kind) for b in blocks]


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module,
    adapter: ArchitectureAdapter,
    windows: torch.Tensor,
    batch_size: int,
    device: torch.device,
    compute_dtype: torch.dtype,
    offload_to: Path | None = None,
    keep_hidden: bool = True,
    stream: Any = None,
) -> tuple[Any, list[BlockArguments]]:
    """Hidden states entering block 0 for every window (CPU, compute dtype) and the
    keyword arguments the blocks are called with, per batch and block kind (on `device`).
    The forward runs up to the first block of the last kind to appear (block 0 alone for
    a family without kinds). `offload_to`: a work directory to write the hidden states to,
    batch by batch (`workdir.OffloadedActivations`); `keep_hidden=False`: the arguments only
    (the hidden states are None); `stream`: the blocks the forward runs through are read
    for it and dropped again (the arguments do not depend on their weights)."""
    blocks = adapter.get_blocks(model)
    first: dict[Any, int] = {}
    for i, kind in enumerate(block_kinds(adapter, blocks)):
        first.setdefault(kind, i)
    last = max(first.values())
    for i in range(last + 1) if stream is not None else ():
        stream.load_block(i)
    movers = [model.get_submodule(p) for p in adapter.pre_block] + [blocks[i] for i in range(last + 1)]
    homes = [_module_home(m) for m in movers]
    for m in movers:
        m.to(device)
    captured: dict[str, Any] = {}

    def pre_hook_for(kind: Any, index: int):
        def pre_hook(module, args, kwargs):
            if index == 0:
                captured["args"] = args
            captured.setdefault("kwargs", {})[kind] = dict(kwargs)
            if index == last:
                raise _StopForward
        return pre_hook

    handles = [blocks[i].register_forward_pre_hook(pre_hook_for(kind, i), with_kwargs=True)
               for kind, i in first.items()]
    hidden_parts, kwargs_list = [], []
    try:
        for b0, b1 in _batches(windows.shape[0], batch_size):
            captured.clear()
            try:
                model(input_ids=windows[b0:b1].to(device), use_cache=False)
            except _StopForward:
                pass
            if "args" not in captured or len(captured.get("kwargs", {})) != len(first):
                raise PipelineError(f"the forward pass never reached {adapter.block_prefix(last)}")
            by_kind, first_kind = {}, next(iter(first))  # the kind of block 0
            for kind, kwargs in captured["kwargs"].items():
                hidden_kw = kwargs.pop("hidden_states", None)  # the hidden states are not an argument to keep
                if kind == first_kind:
                    args = captured["args"]
                    if len(args) > 1:
                        raise PipelineError(f"{adapter.block_prefix(0)} got {len(args) - 1} extra positional arguments")
                    hidden = args[0] if args else hidden_kw
                by_kind[kind] = _map_tensors(kwargs, _cast_floating(compute_dtype))
            kwargs_list.append(BlockArguments(adapter.block_kind, by_kind))
            if not keep_hidden:
                continue
            if offload_to is not None:
                if not hidden_parts:
                    hidden_parts = wd.OffloadedActivations(offload_to, 0, (windows.shape[0], *hidden.shape[1:]),
                                                           compute_dtype, fresh=True)
                hidden_parts[b0:b1] = hidden.detach().to("cpu", compute_dtype)
            else:
                hidden_parts.append(hidden.detach().to("cpu", compute_dtype))
    finally:
        for handle in handles:
            handle.remove()
        for m, home in zip(movers, homes):
            m.to(home)
        for i in range(last + 1) if stream is not None else ():
            stream.drop_block(i)
    if not keep_hidden:
        return None, kwargs_list
    return (hidden_parts if offload_to is not None else torch.cat(hidden_parts)), kwargs_list


# -- step 2: Hessians -------------------------------------------------------------------------
def gram(x: torch.Tensor) -> torch.Tensor:
    """x^T x of the rows of x (N, C): a float32 matmul (from the compute dtype), returned
    in float64 for accumulation. (BLAS ssyrk, half the flops, measured no faster here.)"""
    x32 = x.to(torch.float32)
    return (x32.T @ x32).to(torch.float64)


class HessianAccumulator:
    """Forward hooks on a group of linears summing x^T x (float32 products, float64 sums).

    Raises _StopForward once every hooked layer has run in the current forward pass
    (if `stop_early`)."""

    def __init__(self, modules: dict[str, nn.Module], stop_early: bool = True, world: World | None = None,
                 n_batches: int = 0):
        self.modules = modules
        self.stop_early = stop_early
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {name: 0 for name in modules}
        # under torchrun: this rank's products by local batch, summed in global order by `finish`
        self.world = world if world is not None and world.active else None
        self.n_batches = n_batches
        self._parts: dict[str, dict[int, torch.Tensor]] = {name: {} for name in modules}
        self._rows: dict[str, dict[int, int]] = {name: {} for name in modules}
        self._batch = -1
        self._seen: set[str] = set()
        self._last_x: torch.Tensor | None = None
        self._last_product: torch.Tensor | None = None
        self._handles = []

    def __enter__(self):
        for name, mod in self.modules.items():
            self._handles.append(mod.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._last_x = self._last_product = None
        return False

    def new_pass(self) -> None:
        self._seen.clear()
        self._last_x = self._last_product = None
        self._batch += 1

    def finish(self) -> None:
        """After the calibration pass: under torchrun, the global sums and counts on every
        rank (one process's summation order; see `pvq.calibrate.distributed`)."""
        if self.world is None:
            return
        for name, module in self.modules.items():  # the same order on every rank
            device = next(iter(module.parameters()), torch.empty(0)).device
            total, rows = sum_in_global_order(self._parts[name], self._rows[name], self.n_batches,
                                              (module.in_features, module.in_features), self.world, tag=name,
                                              device=device)
            self._parts[name] = {}
            if total is not None:
                self.sums[name] = total
            self.counts[name] = rows

    def _hook(self, name: str):
        def hook(module, inputs, output):
            x = inputs[0]
            if x is self._last_x:
                product = self._last_product
            else:
                product = gram(x.detach().reshape(-1, x.shape[-1]))
                self._last_x, self._last_product = x, product
            rows = x.numel() // x.shape[-1]
            if self.world is not None:
                parts = self._parts[name]
                parts[self._batch] = parts[self._batch] + product if self._batch in parts else product
                self._rows[name][self._batch] = self._rows[name].get(self._batch, 0) + rows
            elif name in self.sums:
                self.sums[name] += product
            else:
                self.sums[name] = product.clone()
            self.counts[name] += rows
            self._seen.add(name)
            if self.stop_early and len(self._seen) == len(self.modules):
                raise _StopForward

        return hook

    def hessians(self, names=None) -> dict[str, torch.Tensor]:
        out = {}
        for name in self.modules if names is None else names:
            if not self.counts[name]:
                raise PipelineError(f"layer {name} was never called during the calibration forward")
            upper = torch.triu(self.sums[name])
            H = (upper + torch.triu(upper, 1).T) / self.counts[name]  # exactly symmetric: mirror the upper triangle
            out[name] = H.to(torch.float32)
        return out


@torch.no_grad()
def run_block(block, hidden, kwargs_list, batch_size, device, on_batch_start=None, collect=True):
    outputs = (hidden.empty_like() if isinstance(hidden, wd.OffloadedActivations) else torch.empty_like(hidden)) \
        if collect else None
    for j, (b0, b1) in enumerate(_batches(hidden.shape[0], batch_size)):
        if on_batch_start is not None:
            on_batch_start()
        x = hidden[b0:b1].to(device)
        try:
            out = _first_output(block(x, **kwargs_list[j].for_block(block)))
        except _StopForward:
            continue
        if collect:
            outputs[b0:b1] = out.to("cpu", hidden.dtype)
    return outputs


# -- the driver -------------------------------------------------------------------------------
def quantize_model(
    model: nn.Module,
    adapter: ArchitectureAdapter,
    windows: torch.Tensor,
    method: str | Any,
    config: Any = None,
    device: str | torch.device = "cpu",
    work_dir: str | Path | None = None,
    resume: bool = True,
    batch_size: int = 8,
    progress: bool = True,
    compute_dtype: torch.dtype = torch.float32,
    quant_device: str | torch.device = "cpu",
    on_layer: Callable[[LayerReport, QuantizedTensor], None] | None = None,
    stream: Any = None,
    on_block_done: Callable[[int, dict[str, QuantizedTensor]], None] | None = None,
    offload_activations: bool = False,
    layer_configs: dict[str, Any] | None = None,
) -> QuantizeResult:
    """Quantize every linear the adapter lists, block by block; see the module docstring.

    model: a causal LM (modified in place: quantized linears hold dequantized weights).
    adapter: from `pvq.models.adapter_for(model)`.
    windows: (n_windows, seqlen) int64 calibration token ids.
    method: a registered method name ("rtn", "gptq", "pvq") or an object with
        `quantize`, `dequantize`, `config_class` (and optionally `name`).
    config: an instance of the method's config class, a dict of its fields, or None
        (the defaults).
    device: where blocks run (one at a time); inputs/outputs stay on the CPU.
    work_dir: enables resuming (see module docstring); None keeps nothing on disk.
    resume: continue a matching previous run in work_dir; False starts afresh there.
    batch_size: windows per forward pass (part of the settings a resume must match: it
        changes the Hessian summation order).
    compute_dtype: dtype of the calibration forwards (float32 or bfloat16 / float16).
    quant_device: device of the weight and Hessian handed to the method.
    on_layer: called after each newly quantized layer with (report, QuantizedTensor).
    stream: where the blocks come from when the model is not in memory (a
        `pvq.models.streaming.StreamedModel`: `load_block(i)` / `drop_block(i)`); None:
        the model holds every block.
    on_block_done: called with (block index, {layer name: QuantizedTensor}) once a block
        is finished (quantized, or restored from the work directory) and its outputs
        computed: the streaming caller packs the block's layers there, dropping their
        float weights.
    offload_activations: keep the blocks' inputs and outputs in the work directory, one file
        per batch, instead of in memory (needs `work_dir`).
    layer_configs: {layer name: config} for layers quantized with other settings than
        `config` (the bit allocation's), part of the settings a resume must match.
    """
    method_name, method_obj = _resolve_method(method)
    config = _resolve_config(method_obj, config)
    layer_configs = {k: _resolve_config(method_obj, v) for k, v in (layer_configs or {}).items()}
    device = torch.device(device)
    windows = torch.as_tensor(windows).to("cpu", torch.long)
    if windows.ndim != 2 or windows.shape[0] < 1 or windows.shape[1] < 1:
        raise PipelineError(f"windows must be a non-empty (n_windows, seqlen) tensor, got shape {tuple(windows.shape)}")
    if batch_size < 1:
        raise PipelineError(f"batch_size must be >= 1, got {batch_size}")
    if offload_activations and work_dir is None:
        raise PipelineError("offload_activations keeps the activations in the work directory: give a work_dir")
    if not (compute_dtype.is_floating_point):
        raise PipelineError(f"compute_dtype must be a floating dtype, got {compute_dtype}")
    adapter.prepare(model)
    adapter.validate(model)
    blocks = adapter.get_blocks(model)
    n_blocks = len(blocks)
    w = world()  # under torchrun: this rank's batches only (pvq.calibrate.distributed)
    n_batches = -(-windows.shape[0] // batch_size)
    if w.active:
        progress = progress and w.rank == 0
        if work_dir is not None:  # each rank resumes its own batches' state
            if w.rank == 0:
                wd.claim(Path(work_dir))
            barrier(w)
            work_dir = Path(work_dir) / f"rank{w.rank}-of-{w.size}"

    result = QuantizeResult()
    was_training = model.training
    model.eval()
    try:
        start, hidden_resumed, state, replay = 0, None, None, False
        if work_dir is not None:
            work_dir = Path(work_dir)
            wd.claim(work_dir)
            settings = {
                "method": method_name,
                "config": jsonable(config),
                "config_class": f"{type(config).__module__}.{type(config).__qualname__}",
                "adapter": adapter.name,
                "n_blocks": n_blocks,
                "batch_size": batch_size,
                "compute_dtype": str(compute_dtype).removeprefix("torch."),
                "calibration_shape": list(windows.shape),
                "calibration_sha256": wd.windows_digest(windows),
            }
            if offload_activations:  # recorded only when on: older states stay resumable
                settings["offload_activations"] = True
            if layer_configs:
                settings["layer_configs"] = {k: jsonable(v) for k, v in sorted(layer_configs.items())}
            fingerprint = {
                "rest": wd.module_digest(model, skip_prefix=adapter.blocks),
                "blocks": [_block_digest(blocks, i, stream) for i in range(n_blocks)],
            }
            try:
                state = wd.read_state(work_dir) if resume else None
            except wd.WorkDirDamaged as e:
                log.warning("%s: starting the quantization afresh", e)
                state = None
                wd.clear(work_dir)
            if not resume:
                wd.clear(work_dir)
            if state is not None:
                _check_resumable(state, settings, fingerprint, work_dir)
                start, replay = _verified_blocks(work_dir, state, n_blocks, offload_activations)
                good = _verified_contents(model, adapter, method_name if isinstance(method, str) else None, method_obj,
                                          (config, layer_configs), work_dir, state, start, stream)
                if good < start:
                    start, replay = good, good > 0
            else:
                state = {**settings, "model_fingerprint": fingerprint, "quantized_blocks": [], "blocks_done": 0,
                         "files": {}}
                wd.write_state(work_dir, {**state, "device": str(device)})
            common = agree_on_start(start, w)  # under torchrun every rank resumes from the same block
            if common < start:  # another rank stopped earlier: redo from its block, like a damaged one
                log.warning("rank %d: the other ranks finished %d blocks, this one %d; redoing from block %d",
                            w.rank, common, start, common)
                _discard_blocks(work_dir, state, common)
                start, replay = common, common > 0
            if start and start < n_blocks and not replay and not offload_activations:
                hidden_resumed = wd.load_hidden(work_dir, start - 1)
            if start:
                log.info("resuming from %s: %d of %d blocks already quantized", work_dir, start, n_blocks)
        result.resumed_blocks = start

        def restore(i: int) -> None:
            if stream is not None:
                stream.load_block(i)
            layers = _restore_block(model, adapter, method_obj, work_dir, i, state, result)
            nonlocal hidden
            if replay:
                hidden = _replay_block(model, adapter, i, hidden, kwargs_list, batch_size, device, compute_dtype)
            if on_block_done is not None:
                on_block_done(i, layers)

        if start >= n_blocks:
            for i in range(start):
                restore(i)
            return result

        resume_offloaded = offload_activations and 0 < start < n_blocks and not replay
        hidden, kwargs_list = capture_block_inputs(model, adapter, local_windows(windows, batch_size, w), batch_size,
                                                   device, compute_dtype,
                                                   offload_to=work_dir if offload_activations else None,
                                                   keep_hidden=not resume_offloaded, stream=stream)
        if resume_offloaded:
            hidden = wd.OffloadedActivations.recorded(work_dir, start, hidden_shape(windows, batch_size, w, model),
                                                      compute_dtype, state["files"])
        if hidden_resumed is not None:
            if hidden_resumed.shape != hidden.shape or hidden_resumed.dtype != hidden.dtype:
                raise wd.WorkDirError(
                    f"saved block inputs have shape {tuple(hidden_resumed.shape)} {hidden_resumed.dtype}, "
                    f"expected {tuple(hidden.shape)} {hidden.dtype}"
                )
            hidden = hidden_resumed
        if replay:  # the saved block inputs were damaged: run the good blocks again to remake them
            log.warning("recomputing the inputs of block %d by running the %d finished blocks again", start, start)
        for i in range(start):
            restore(i)

        from pvq.progress import progress_bar

        bar = progress_bar(total=n_blocks, initial=start, desc="quantizing blocks", unit="block", enabled=progress)
        try:
            for i in range(start, n_blocks):
                t0 = time.perf_counter()
                last = i == n_blocks - 1
                if stream is not None:
                    stream.load_block(i)
                layers, infos, hidden_next = _quantize_block(
                    model, adapter, i, hidden, kwargs_list, method_obj, (config, layer_configs), device,
                    batch_size, compute_dtype, torch.device(quant_device), result, on_layer, need_outputs=not last,
                    n_batches=n_batches,
                )
                dt = time.perf_counter() - t0
                result.block_seconds.append(dt)
                if work_dir is not None:
                    files = {k: v for k, v in state.get("files", {}).items()
                             if k != wd.HIDDEN_FILE and not k.startswith(wd.ACTIVATIONS_DIR + "/")}
                    try:  # the state file last: it lists block i only once everything of it is on disk
                        files.update(wd.save_block(work_dir, i, layers, infos))
                        if not last and offload_activations:
                            files.update(hidden_next.digests)
                        elif not last:
                            files[wd.HIDDEN_FILE] = wd.save_hidden(work_dir, hidden_next, i)
                        new_state = {**state, "files": files, "blocks_done": i + 1,
                                     "quantized_blocks": state["quantized_blocks"][:i] + [wd.module_digest(blocks[i])]}
                        wd.write_state(work_dir, {**new_state, "device": str(device)})
                    except BaseException:
                        wd.remove_block(work_dir, i)  # not listed by the state file: nothing half-written stays
                        raise
                    state.update(new_state)
                    if last:
                        wd.remove_activations(work_dir)
                if on_block_done is not None:
                    on_block_done(i, layers)
                hidden = hidden_next
                last_loss = result.report[-1].proxy_loss
                bar.set_postfix(loss=f"{last_loss:.4g}" if last_loss is not None else "-", block_s=f"{dt:.1f}")
                bar.update(1)
                log.info("block %d/%d done in %.2f s", i + 1, n_blocks, dt)
        finally:
            bar.close()
        return result
    finally:
        model.train(was_training)


@torch.no_grad()
def quantize_weights(model: nn.Module, adapter: ArchitectureAdapter, method: str, config: Any = None, *,
                     stream: Any = None, on_block_done=None, layer_configs: dict[str, Any] | None = None
                     ) -> QuantizeResult:
    """Methods that need no Hessian (rtn, pvq without it): quantize every linear the
    adapter lists from its weight alone, in place (no calibration forwards; no proxy loss).
    Returns {layer name: QuantizedTensor} with a per-layer `report`, like `quantize_model`
    (`stream`, `on_block_done` and `layer_configs` as there)."""
    method_name, method_obj = _resolve_method(method)
    config = _resolve_config(method_obj, config)
    layer_configs = {k: _resolve_config(method_obj, v) for k, v in (layer_configs or {}).items()}
    adapter.prepare(model)
    adapter.validate(model)
    result = QuantizeResult()
    for i, block in enumerate(adapter.get_blocks(model)):
        if stream is not None:
            stream.load_block(i)
        layers = {}
        for lin in adapter.block_linear_names(block):
            name = adapter.layer_name(i, lin)
            module = block.get_submodule(lin)
            t0 = time.perf_counter()
            qt = method_obj.quantize(module.weight.data.float(), None, layer_configs.get(name, config))
            module.weight.data.copy_(torch.as_tensor(method_obj.dequantize(qt)).to(module.weight.dtype))
            result[name] = layers[name] = qt
            result.report.append(LayerReport(name, i, -1, tuple(qt.shape), qt.proxy_loss, qt.bits_per_weight,
                                             time.perf_counter() - t0, expert=_expert_index(adapter, lin)))
        if on_block_done is not None:
            on_block_done(i, layers)
    return result


def _with_current_defaults(state: dict) -> dict:
    """The saved settings with each method config read by this pvq (a config field added
    since, at its default, is no difference)."""
    try:
        method = get_method(state["method"])
        norm = lambda c: jsonable(method.make_config(c))  # noqa: E731
        state = {**state, "config": norm(state["config"])}
        if "layer_configs" in state:
            state["layer_configs"] = {k: norm(v) for k, v in state["layer_configs"].items()}
    except (KeyError, TypeError, QuantizationError):
        pass  # compared as saved: a difference is reported below
    return state


def _check_resumable(state: dict, settings: dict, fingerprint: dict, work_dir: Path) -> None:
    state = _with_current_defaults(state)
    diffs = [
        f"{k}: saved {state.get(k)!r}, now {v!r}" for k, v in settings.items() if k != "calibration_sha256" and state.get(k) != v
    ]
    if "layer_configs" in state and "layer_configs" not in settings:
        diffs.append("layer_configs: saved per-layer settings (a bit allocation), now none")
    if bool(state.get("offload_activations")) != bool(settings.get("offload_activations")):
        diffs.append(f"offload_activations: saved {bool(state.get('offload_activations'))}, now "
                     f"{bool(settings.get('offload_activations'))}")
    if state.get("calibration_sha256") != settings["calibration_sha256"] and not any(d.startswith("calibration_shape") for d in diffs):
        diffs.append("calibration windows: same shape, different token ids")
    if diffs:
        raise wd.WorkDirError(
            f"work directory {work_dir} holds a run with different settings ({'; '.join(diffs)}); "
            "use another --work-dir, or delete this one to start afresh (resume=False in Python)"
        )
    saved = state["model_fingerprint"]
    done = int(state["blocks_done"])
    quantized = state.get("quantized_blocks", [])
    problems = []
    if saved["rest"] != fingerprint["rest"]:
        problems.append("embedding/norm/head weights differ")
    if len(saved["blocks"]) != len(fingerprint["blocks"]):
        problems.append(f"{len(saved['blocks'])} blocks saved, {len(fingerprint['blocks'])} now")
    else:
        for i, (old, now) in enumerate(zip(saved["blocks"], fingerprint["blocks"])):
            ok = now == old or (i < done and i < len(quantized) and now == quantized[i])
            if not ok:
                problems.append(f"block {i} weights differ")
                break
    if problems:
        raise wd.WorkDirError(
            f"work directory {work_dir} was made from a different model ({'; '.join(problems)}); "
            "load the same model afresh, use another work directory, or pass resume=False"
        )


def _verified_blocks(work_dir: Path, state: dict, n_blocks: int, offloaded: bool = False) -> tuple[int, bool]:
    """(finished blocks whose files match their recorded digests, whether the block inputs
    must be recomputed). The first damaged block and every later one are discarded (and
    the state rewritten), with a warning; so is a damaged hidden-state file."""
    done = int(state["blocks_done"])
    files = state.get("files", {})
    good = 0
    for i in range(done):
        names = [p.name for p in wd.block_paths(work_dir, i)]
        if not all(wd.intact(work_dir, n, files) for n in names):
            log.warning("work directory %s: block %d does not match its recorded digest (damaged or edited); "
                        "discarding it and the %d block(s) after it, recomputing them", work_dir, i, done - i - 1)
            break
        good = i + 1
    replay = False
    if good < done:
        _discard_blocks(work_dir, state, good)
        replay = good > 0
    elif 0 < good < n_blocks and not wd.activations_intact(work_dir, files, good, offloaded):
        log.warning("work directory %s: the saved inputs of block %d do not match their recorded digest; "
                    "recomputing them", work_dir, good)
        replay = True
    return good, replay


def _verified_contents(model, adapter, method_name, method_obj, configs, work_dir: Path, state: dict, done: int,
                       stream) -> int:
    """How many of the `done` finished blocks hold what the state recorded. A block whose file
    digests match the state (which anyone can rewrite) must also hold, for each of its
    linears, the method (`method_name`: a registered method's; None for a method object),
    shape, layout and payload arrays the run's settings give (where the method describes
    them), and the weights they dequantize to must give the digest recorded for the
    quantized block. The first block that does not (an edit with its digest rewritten) is
    discarded with every later one, with a warning, and recomputed: an altered block is
    never shipped."""
    quantized = state.get("quantized_blocks", [])
    for i in range(done):
        problem = _block_content_problem(model, adapter, method_name, method_obj, configs, work_dir, i,
                                         quantized[i] if i < len(quantized) else None, stream)
        if problem is not None:
            log.warning("work directory %s: block %d does not hold what the state recorded (%s: edited, its digest "
                        "rewritten); discarding it and the %d block(s) after it, recomputing them", work_dir, i,
                        problem, done - i - 1)
            _discard_blocks(work_dir, state, i)
            return i
    return done


@torch.no_grad()
def _block_content_problem(model, adapter, method_name, method_obj, configs, work_dir, i, recorded, stream) -> str | None:
    """What is wrong with finished block i's saved layers (None: they are the run's). The
    model's block is left as it was."""
    from pvq.methods.base import check_payload

    if recorded is None:
        return "no digest is recorded for the quantized block"
    config, layer_configs = configs
    if stream is not None:
        stream.load_block(i)
    try:
        try:
            layers, _ = wd.load_block(work_dir, i)
        except wd.WorkDirError as e:
            return str(e)
        block = adapter.get_blocks(model)[i]
        weights = {}
        for lin in adapter.block_linear_names(block):
            name = adapter.layer_name(i, lin)
            qt, mod = layers.get(name), block.get_submodule(lin)
            if qt is None:
                return f"layer {name} is missing"
            if method_name is not None and qt.method != method_name:
                return f"layer {name} says method {qt.method!r}, the run uses {method_name!r}"
            if tuple(qt.shape) != tuple(mod.weight.shape):
                return f"layer {name} has shape {tuple(qt.shape)}, the model's weight {tuple(mod.weight.shape)}"
            cfg = layer_configs.get(name, config)
            try:
                if hasattr(method_obj, "layout"):
                    layout = method_obj.layout(cfg, qt.shape)
                    wrong = sorted(k for k, v in layout.items() if qt.meta.get(k) != v)
                    if wrong:
                        return (f"layer {name}: meta {wrong[0]}={qt.meta.get(wrong[0])!r}, the settings give "
                                f"{layout[wrong[0]]!r}")
                if hasattr(method_obj, "payload_spec"):
                    check_payload(qt.tensors, method_obj.payload_spec(cfg, qt.shape), name)
                deq = torch.as_tensor(method_obj.dequantize(qt)).detach().to("cpu", torch.float32)
            except Exception as e:  # noqa: BLE001 - hostile payloads make decoders raise anything
                return f"layer {name}: {type(e).__name__}: {e}"
            if tuple(deq.shape) != tuple(mod.weight.shape):
                return f"layer {name} dequantizes to shape {tuple(deq.shape)}"
            weights[mod] = deq
        kept = {mod: mod.weight.detach().clone() for mod in weights}
        try:  # the digest of the block with these weights, taken as the original run took it
            for mod, deq in weights.items():
                mod.weight.copy_(deq.to(mod.weight.device, mod.weight.dtype))
            digest = wd.module_digest(block)
        finally:
            for mod, w in kept.items():
                mod.weight.copy_(w)
        if digest != recorded:
            return "its weights differ from the quantized block the state recorded"
        return None
    finally:
        if stream is not None:
            stream.drop_block(i)


@torch.no_grad()
def _replay_block(model, adapter, i, hidden, kwargs_list, batch_size, device, compute_dtype) -> torch.Tensor:
    """Outputs of the (restored, quantized) block i exactly as `_quantize_block` computed them:
    the block cast to the compute dtype for the forward, then put back."""
    block = adapter.get_blocks(model)[i]
    home = _module_home(block)
    cast = {t.dtype for t in block.parameters()} != {compute_dtype}
    snapshot = _snapshot(block) if cast else None
    try:
        block.to(device=device, dtype=compute_dtype) if cast else block.to(device)
        return run_block(block, hidden, kwargs_list, batch_size, device)
    finally:
        block.to(home)
        if cast:
            _load_snapshot(block, snapshot)


def _discard_blocks(work_dir: Path, state: dict, keep: int) -> None:
    """Forget block `keep` and every later one (their files and the saved inputs), in the
    state file too."""
    wd.discard_from(work_dir, keep)
    names = {n for i in range(keep) for n in (p.name for p in wd.block_paths(work_dir, i))}
    state["files"] = {k: v for k, v in state.get("files", {}).items() if k in names}
    state["blocks_done"] = keep
    state["quantized_blocks"] = state.get("quantized_blocks", [])[:keep]
    wd.write_state(work_dir, state)


def hidden_shape(windows: torch.Tensor, batch_size: int, w: World, model: nn.Module) -> tuple[int, int, int]:
    """Shape of the hidden states of this rank's calibration windows."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    n = local_windows(windows, batch_size, w).shape[0]
    return (n, windows.shape[1], config.hidden_size)


def _block_digest(blocks, i: int, stream) -> str:
    """Block i's digest (a streamed block is read for it, then dropped again)."""
    if stream is None:
        return wd.module_digest(blocks[i])
    stream.load_block(i)
    try:
        return wd.module_digest(blocks[i])
    finally:
        stream.drop_block(i)


@torch.no_grad()
def _restore_block(model, adapter, method_obj, work_dir, i, state, result) -> dict[str, QuantizedTensor]:
    layers, infos = wd.load_block(work_dir, i)
    block = adapter.get_blocks(model)[i]
    for lin in adapter.block_linear_names(block):
        name = adapter.layer_name(i, lin)
        if name not in layers:
            raise wd.WorkDirError(f"{wd.block_paths(work_dir, i)[1]} lacks layer {name}")
        qt = layers[name]
        mod = block.get_submodule(lin)
        deq = torch.as_tensor(method_obj.dequantize(qt))
        mod.weight.copy_(deq.to(mod.weight.device, mod.weight.dtype))
        info = infos[name]
        result[name] = qt
        result.report.append(
            LayerReport(name, i, info.get("group", -1), tuple(qt.shape), qt.proxy_loss, qt.bits_per_weight,
                        info.get("seconds", math.nan), resumed=True, tokens=info.get("tokens"),
                        force_routed=bool(info.get("force_routed", False)), expert=_expert_index(adapter, lin))
        )
    result.block_seconds.append(None)
    quantized = state.get("quantized_blocks", [])
    if i < len(quantized) and wd.module_digest(block) != quantized[i]:
        log.warning("block %d: weights dequantized from the work directory differ from those of the original run "
                    "(is the method's dequantize deterministic?)", i)
    return {name: layers[name] for name in (adapter.layer_name(i, lin) for lin in adapter.block_linear_names(block))}


def _quantize_block(
    model, adapter, i, hidden, kwargs_list, method_obj, configs, device, batch_size, compute_dtype,
    quant_device, result, on_layer, need_outputs, n_batches=0,
):
    """Quantize block i's groups; `configs` = (config, {layer name: config of its own})."""
    config, layer_configs = configs
    w = world()
    block = adapter.get_blocks(model)[i]
    home = _module_home(block)
    groups = adapter.block_groups(block)
    experts = adapter.experts_of(block)
    linears = {lin: block.get_submodule(lin) for group in groups for lin in group}
    originals = {lin: m.weight.detach().to("cpu", torch.float32, copy=True) for lin, m in linears.items()}
    param_dtypes = {t.dtype for t in block.parameters()}
    cast = param_dtypes != {compute_dtype}
    snapshot = _snapshot(block) if cast else None
    dequantized: dict[str, torch.Tensor] = {}
    layers: dict[str, QuantizedTensor] = {}
    infos: dict[str, dict] = {}
    ok = False
    try:
        block.to(device=device, dtype=compute_dtype) if cast else block.to(device)
        for g, group in enumerate(groups):
            modules = {lin: linears[lin] for lin in group}
            with HessianAccumulator(modules, world=w, n_batches=n_batches) as acc:
                run_block(block, hidden, kwargs_list, batch_size, device, on_batch_start=acc.new_pass, collect=False)
            acc.finish()
            tokens = dict(acc.counts)
            forced = _force_routed(adapter, experts, group, tokens)
            hessians = acc.hessians([lin for lin in group if lin not in forced])
            del acc
            if forced:
                hessians.update(_forced_hessians(block, experts, forced, {lin: linears[lin] for lin in forced},
                                                 hidden, kwargs_list, batch_size, device, w, n_batches))
            # the group's layers dealt over the ranks (all of them in one process), results shared
            owned = {k: _quantize_layer(method_obj, layer_configs.get(adapter.layer_name(i, lin), config),
                                        adapter.layer_name(i, lin), originals[lin], hessians[lin], quant_device)
                     for k, lin in enumerate(group) if w.owns(k)}
            if w.active:  # payloads travel, dequantized weights are remade (deterministic) on each rank
                owned = {k: o if isinstance(o, str) else (o[0], o[1], None) for k, o in owned.items()}
                outcomes = share(owned, len(group), w)
            else:
                outcomes = [owned[k] for k in range(len(group))]
            for k, outcome in enumerate(outcomes):
                if isinstance(outcome, BaseException):
                    raise outcome
                if isinstance(outcome, str):
                    raise DistributedError(f"rank {w.owner(k)} of {w.size}: {adapter.layer_name(i, group[k])}: "
                                           f"{outcome}")
            for lin, (qt, dt, deq) in zip(group, outcomes):
                name = adapter.layer_name(i, lin)
                W = originals[lin]
                if deq is None:
                    deq = torch.as_tensor(method_obj.dequantize(qt)).detach().to("cpu", torch.float32)
                with torch.no_grad():
                    modules[lin].weight.copy_(deq.to(modules[lin].weight.device, modules[lin].weight.dtype))
                dequantized[lin] = deq
                layers[name] = qt
                expert = _expert_index(adapter, lin)
                infos[name] = {"group": g, "seconds": round(dt, 6), "bits_per_weight": qt.bits_per_weight,
                               "tokens": tokens[lin], "force_routed": lin in forced, "expert": expert}
                rep = LayerReport(name, i, g, tuple(W.shape), qt.proxy_loss, qt.bits_per_weight, dt,
                                  tokens=tokens[lin], force_routed=lin in forced, expert=expert)
                result[name] = qt
                result.report.append(rep)
                log.info("%s: proxy loss %.6g, %.3f bits/weight, %.2f s", name, qt.proxy_loss, qt.bits_per_weight, dt)
                if on_layer is not None:
                    on_layer(rep, qt)
        outputs = run_block(block, hidden, kwargs_list, batch_size, device) if need_outputs else None
        ok = True
    finally:
        # back home in the model's own dtype, with exact float copies of the dequantized
        # weights (or, after an error, the original weights: the model is left as it was)
        block.to(home)
        with torch.no_grad():
            if cast:
                _load_snapshot(block, snapshot)
            for lin, m in linears.items():
                src = dequantized[lin] if ok else originals[lin]
                m.weight.copy_(src.to(m.weight.device, m.weight.dtype))
        if not ok:
            for name in layers:
                result.pop(name, None)
            result.report[:] = [r for r in result.report if r.block != i]
    return layers, infos, outputs


def _quantize_layer(method_obj, config, name: str, W: torch.Tensor, H: torch.Tensor, quant_device):
    """(QuantizedTensor with its proxy loss, seconds, dequantized weight), or the error:
    the exception in one process, its text under torchrun (sent to every rank, so that all
    of them stop together)."""
    try:
        t0 = time.perf_counter()
        # copies: a method may work in place on what it is given
        qt = method_obj.quantize(W.to(quant_device, copy=True), H.to(quant_device, copy=True), config)
        deq = torch.as_tensor(method_obj.dequantize(qt)).detach().to("cpu", torch.float32)
        dt = time.perf_counter() - t0
        if tuple(deq.shape) != tuple(W.shape):
            raise QuantizationError(f"{name}: dequantized shape {tuple(deq.shape)} != weight shape {tuple(W.shape)}")
        if qt.proxy_loss is None:
            qt.proxy_loss = _proxy_loss(W, deq, H.cpu())
        return qt, dt, deq
    except Exception as e:  # noqa: BLE001 - every failure must reach the other ranks
        if world().active:
            log.error("%s: %s: %s", name, type(e).__name__, e)
            return f"{type(e).__name__}: {e}"
        return e


def _expert_index(adapter, lin: str) -> int | None:
    """The expert index of a block-relative linear name ("mlp.experts.5.down_proj" -> 5)."""
    prefix = adapter.moe.experts + "." if adapter.moe is not None else None
    return int(lin[len(prefix):].split(".")[0]) if prefix and lin.startswith(prefix) else None


def _force_routed(adapter, experts, group, tokens: dict[str, int]) -> dict[str, int]:
    """The group's expert linears whose expert was routed fewer calibration tokens than the
    widest input of its linears (the hidden size or the expert width: below it a Hessian is
    rank-deficient): {linear: expert index}."""
    if experts is None:
        return {}
    threshold = max(experts[0].gate_up_proj.in_features, experts[0].down_proj.in_features)
    out = {}
    for lin in group:
        e = _expert_index(adapter, lin)
        if e is not None and tokens[lin] < threshold:
            out[lin] = e
    if out:
        log.info("%d expert layer(s) routed fewer than %d calibration tokens: force-routed for their Hessians",
                 len(out), threshold)
    return out


def _forced_hessians(block, experts, forced: dict[str, int], modules: dict[str, nn.Module], hidden, kwargs_list,
                     batch_size, device, w=None, n_batches=0) -> dict[str, torch.Tensor]:
    """Hessians of the force-routed experts' linears from every token entering the block (the
    block's output still adds only the router's choices)."""
    experts.forced = frozenset(forced.values())
    try:
        with HessianAccumulator(modules, stop_early=False, world=w, n_batches=n_batches) as acc:
            run_block(block, hidden, kwargs_list, batch_size, device, on_batch_start=acc.new_pass, collect=False)
        acc.finish()
        return acc.hessians()
    finally:
        experts.forced = frozenset()


def _snapshot(block: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every parameter and buffer of `block` (before it is cast)."""
    tensors = list(block.named_parameters(remove_duplicate=False)) + list(block.named_buffers(remove_duplicate=False))
    return {name: t.detach().clone() for name, t in tensors}


def _load_snapshot(block: nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    """Put every parameter and buffer of `block` back to its snapshot (dtype and values)."""
    tensors = list(block.named_parameters(remove_duplicate=False)) + list(block.named_buffers(remove_duplicate=False))
    for name, t in tensors:
        t.data = snapshot[name].to(t.device)
