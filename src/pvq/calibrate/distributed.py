"""Several processes, one result: the pipeline under `torchrun` (torch.distributed; gloo
on CPU, nccl on GPU).

What each rank does:
- Calibration: the global batches (fixed by the batch size) are dealt round-robin, batch j
  to rank j mod N. Each rank keeps the block inputs of its own batches only.
- Hessians: each rank computes x^T x for its batches (float32 products, as in one process).
  The products are then summed in float64 in global batch order on every rank: batch j's
  product is broadcast by its owner. So the sum is the one a single process computes, bit
  for bit, whatever N is.
- Layers: the layers of a quantization group are dealt round-robin over the ranks. Each
  rank quantizes its own, and the results are broadcast from their owners. A layer that
  fails on one rank fails the block on every rank, naming the rank and the error.
- Writing: rank 0 writes the checkpoint and evaluates. The checkpoint is byte-identical
  for any N.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pvq.errors import PVQError


class DistributedError(PVQError, RuntimeError):
    """A rank failed; raised on every rank with the failing rank's message."""


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def active(self) -> bool:
        return self.size > 1

    def owner(self, index: int) -> int:
        """The rank that owns item `index` of a round-robin deal."""
        return index % self.size

    def owns(self, index: int) -> bool:
        return index % self.size == self.rank


def world() -> World:
    """This process's rank and the number of ranks (one rank outside torchrun)."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def init_from_environment(device: str = "cpu") -> World:
    """Join the process group torchrun describes (env:// rendezvous): gloo for CPU work,
    nccl when the job computes on CUDA; each rank then computes on cuda:LOCAL_RANK."""
    if not launched_by_torchrun():
        return World()
    if not dist.is_initialized():
        backend = "nccl" if str(device).startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    return world()


def local_batches(n_windows: int, batch_size: int, w: World) -> list[tuple[int, int]]:
    """The (start, end) window ranges of this rank's global batches, in global order."""
    out = []
    for j, b0 in enumerate(range(0, n_windows, batch_size)):
        if w.owns(j):
            out.append((b0, min(n_windows, b0 + batch_size)))
    return out


def local_windows(windows: torch.Tensor, batch_size: int, w: World) -> torch.Tensor:
    """This rank's windows: its batches concatenated (cut again at `batch_size` they are
    the same batches, since only the last global batch can be short)."""
    if not w.active:
        return windows
    parts = [windows[b0:b1] for b0, b1 in local_batches(windows.shape[0], batch_size, w)]
    if not parts:
        raise DistributedError(f"rank {w.rank} has no calibration batch: {windows.shape[0]} windows in batches of "
                               f"{batch_size} are fewer than {w.size} processes")
    return torch.cat(parts)


def sum_in_global_order(parts: dict[int, torch.Tensor], rows: dict[int, int], n_batches: int, shape, w: World,
                        tag: str = "", device: torch.device | str = "cpu"):
    """The sum over global batches of per-batch float64 products, in global batch order (as
    one process adds them), on every rank, and the total row count. `parts` / `rows`: this
    rank's products and row counts by local batch index; `tag` names the layer, so that ranks
    that are not at the same layer fail instead of mixing their sums; `device`: where the
    products live (the compute device; nccl broadcasts CUDA tensors)."""
    counts = [None] * w.size
    dist.all_gather_object(counts, (tag, {k: int(v) for k, v in rows.items()}))
    tags = {t for t, _ in counts}
    if len(tags) > 1:
        raise DistributedError(f"the ranks are at different layers ({', '.join(sorted(tags))}); they must resume "
                               "from the same block")
    total, rows_total = None, 0
    for j in range(n_batches):
        owner, k = w.owner(j), j // w.size
        n = counts[owner][1].get(k, 0)
        if not n:
            continue  # the layer never ran in this batch (an expert no token of it reached)
        buf = parts[k] if owner == w.rank else torch.empty(shape, dtype=torch.float64, device=device)
        dist.broadcast(buf, src=owner)
        rows_total += n
        if total is None:
            total = buf.clone()
        else:
            total += buf
    return total, rows_total


def agree_on_start(start: int, w: World) -> int:
    """The first block every rank can resume from (the smallest of the ranks' starts)."""
    if not w.active:
        return start
    value = torch.tensor([start], dtype=torch.int64)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return int(value)


def share(owned: dict[int, object], n_items: int, w: World) -> list[object]:
    """Every rank's results of a round-robin deal of `n_items` (each broadcast by its owner)."""
    out = []
    for index in range(n_items):
        box = [owned.get(index)] if w.owns(index) else [None]
        dist.broadcast_object_list(box, src=w.owner(index))
        out.append(box[0])
    return out


def barrier(w: World) -> None:
    if w.active:
        dist.barrier()
