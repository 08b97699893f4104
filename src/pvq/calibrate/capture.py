"""What the sequential quantization feeds on: the inputs of the first decoder block
(`capture_block_inputs`, the embedding run once and stopped), a block run over
calibration batches (`run_block`), and the layer Hessians accumulated from the inputs of
every linear (`HessianAccumulator`, with MoE experts' token counts)."""

from __future__ import annotations

from pathlib import Path
from typing import Any
import torch
from torch import nn
from pvq.models.adapters import ArchitectureAdapter
from pvq.calibrate import workdir as wd
from pvq.calibrate.distributed import World, local_windows, sum_in_global_order
from pvq.calibrate.records import PipelineError


class _StopForward(Exception):
    """Raised from a hook to end a forward pass early (private to this module)."""


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


def hidden_shape(windows: torch.Tensor, batch_size: int, w: World, model: nn.Module) -> tuple[int, int, int]:
    """Shape of the hidden states of this rank's calibration windows."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    n = local_windows(windows, batch_size, w).shape[0]
    return (n, windows.shape[1], config.hidden_size)


def _snapshot(block: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every parameter and buffer of `block` (before it is cast)."""
    tensors = list(block.named_parameters(remove_duplicate=False)) + list(block.named_buffers(remove_duplicate=False))
    return {name: t.detach().clone() for name, t in tensors}


def _load_snapshot(block: nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    """Put every parameter and buffer of `block` back to its snapshot (dtype and values)."""
    tensors = list(block.named_parameters(remove_duplicate=False)) + list(block.named_buffers(remove_duplicate=False))
    for name, t in tensors:
        t.data = snapshot[name].to(t.device)
