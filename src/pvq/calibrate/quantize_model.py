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


import logging
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from pvq.models.adapters import ArchitectureAdapter
from pvq.methods import QuantizationError, QuantizedTensor, get_method
from pvq.methods import proxy_loss as _proxy_loss

from pvq.calibrate import workdir as wd
from pvq.calibrate.distributed import DistributedError, agree_on_start, barrier, local_windows, share, world
from pvq.calibrate.records import LayerReport, PipelineError, QuantizeResult, jsonable
from pvq.calibrate.resume import _block_digest, _check_resumable, _discard_blocks, _replay_block, _restore_block, _verified_blocks, _verified_contents
from pvq.calibrate.capture import HessianAccumulator, _module_home, capture_block_inputs, hidden_shape, run_block
from pvq.calibrate.moe_routing import _expert_index, _force_routed, _forced_hessians
from pvq.calibrate.capture import _load_snapshot, _snapshot

log = logging.getLogger(__name__)


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
            layers = _restore_block(model, adapter, method_obj, work_dir, i, result)
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


