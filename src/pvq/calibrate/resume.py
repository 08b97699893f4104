"""Resuming `quantize_model` from its work directory: whether a saved state belongs to
this run (settings, model fingerprint), which finished blocks are intact (file digests,
and the contents against the recorded settings and weights), replaying and restoring
them, discarding the rest. See `workdir.py` for the files themselves."""

from __future__ import annotations

import logging

import math
from pathlib import Path
import torch
from pvq.methods import QuantizationError, QuantizedTensor, check_payload, get_method
from pvq.calibrate import workdir as wd
from pvq.calibrate.records import LayerReport, jsonable
from pvq.calibrate.capture import _module_home, run_block
from pvq.calibrate.moe_routing import _expert_index
from pvq.calibrate.capture import _load_snapshot, _snapshot

log = logging.getLogger(__name__)


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
def _restore_block(model, adapter, method_obj, work_dir, i, result) -> dict[str, QuantizedTensor]:
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
    result.block_seconds.append(None)  # its weights' digest: checked by `_verified_contents` before the resume
    return {name: layers[name] for name in (adapter.layer_name(i, lin) for lin in adapter.block_linear_names(block))}
