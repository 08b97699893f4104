"""What a quantize job will need, predicted from the model's dimensions before any weight is read.

`plan_job_memory(config, ...)` builds the model on the meta device, which allocates
nothing. It counts the parameters it needs and predicts the peak host memory of each phase
of `pvq quantize`, with and without `--stream`. The formula (docs/scaling.md) uses these
symbols, all in bytes:

- P: all parameters; Pd: the dense ones (embedding, norms, head when untied: everything
  that is not a quantized linear); Pb: the largest decoder block; Pl: the quantized
  linears of the largest block;
- A = n x L x H x c: the calibration activations (n windows of L tokens, hidden size H,
  c bytes per value of the compute dtype);
- G: the largest quantization group's Hessians, sum over its layers of 12 x in^2 (a float64
  sum and a float32 copy);
- M = 96 r x in + 10 in^2: the method's working memory for its largest layer (r rows), fitted
  to GPTQ's measured peaks on 1024 x 4096, 4096 x 1024 and 2048 x 2048 layers (copies of
  the weight, codes, packing, dequantization and proxy loss per weight; the damped
  Hessian's float64 Cholesky work per in^2). PVQ measures at or below it;
- F = 4 b x L (3 I + 4 H): one batch's forward temporaries (b windows, MLP width I);
- Q = bpw / 8 x (P - Pd): the packed layers;
- R0: the process before the job (interpreter, torch, transformers; measured).

Phases:
- quantize: R0 + 4P + 3A + 8 Pl + G + M + F + Q (3A: a block's inputs, its outputs and the
  resumable copy being written). Streamed: 4 (P - Pd) becomes the largest block, so R0 + 4 Pd
  + 4 Pb + 3A + 8 Pl + G + M + F + Q. With --offload-activations the activations are files,
  one per batch of b windows, and 3A becomes 2A b / n (one batch in, one out).
- save: R0 + 4 Pd + Q (the model) + 2 Pd (the stored copy of the dense tensors) + min(S, Q +
  2 Pd) (the shard being written is serialised in memory; S: --max-shard-size, transformers'
  default 50 GB).
- evaluate: R0 + 4P (the float reference) + 4 Pd + Q (the loaded checkpoint) + 4 (P - Pd)
  (its layers decoded once) + 6 L x V x 4 (logits). Streamed: the reference is one block
  at a time and the layers stay packed, so R0 + 4 Pd + Q + 4 Pd + 4 Pb + 2 x E x L x H x 4
  (the evaluation windows' hidden states) + 6 L x V x 4.

- finetune (the default; not with --fast): R0 + 4 Pd + Q (the quantized model) + c (P - Pd)
  (the tunable layers' codes: c = 1 byte a weight for PVQ's int8 points, plus 8 / D for its
  int64 gain index a group, 2 for grid codes' int16 steps, 8 / d for GPTVQ's int64
  assignments) + 4 (P - Pd) with code updates (the summed bfloat16 gradients and
  curvature) + 8 Pl (one block's weights built again in its backward pass) + T + Z, with T
  = 4 L (Nb H + 12 H + 5 I + 2 V) + 8 a L^2 for one window (the decoder blocks'
  checkpointed inputs, one block's activations, the logits and their gradient, the loss's
  other terms being 64 positions long; a attention heads) and Z = n L (8 k + 4) the
  teacher's top-k targets (n windows, k tokens a position). The float teacher is not kept:
  the quantize phase holds Z too, and taking the targets costs R0 + 4P + 12 L V. These are
  the tensors alive at the peak; the resident memory is higher by what glibc's heap keeps
  of the tensors the passes freed (under 32 MiB each, they come from the heap): on the
  demo model a step peaks at 1402-1412 MiB with every buffer of 128 KiB or more mapped and
  unmapped on its own (MALLOC_MMAP_THRESHOLD_=131072: about the tensors alive) and at 1772-1984
  MiB with glibc's default (`bench/finetune_memory.py`, docs/scaling.md); mapping them
  makes a step 49-79% slower (four runs each), so the job keeps the default and hands the free heap back
  after each step and phase (malloc_trim).

Under torchrun (N processes, Nl of them on this host) each process holds its own copy of
everything above except the activations, which it holds for its 1/N of the batches; its
Hessian products stay per batch until the group's pass ends, so G becomes G (8 k + 4) / 12
with k = ceil(batches / N). The quantize and save phases are summed over the Nl local
processes (the other ranks wait for rank 0's save, then exit before it evaluates).

Device memory (with --device cuda) is one block and its batch: 4 Pb + 8 Pl + G + M + F + 2
x b x L x H x c. Disk: the checkpoint (Q + 2 Pd) and the work directory (Q + A).
"""

from __future__ import annotations

import functools
import resource
from dataclasses import dataclass
from pathlib import Path

import torch

from pvq.errors import PVQError


class MemoryPlanError(PVQError, ValueError):
    """A run predicted not to fit the memory this machine has."""


@dataclass
class MemoryPlan:
    phases: dict[str, int]  # predicted peak host bytes per phase
    device_bytes: int  # one block on the compute device
    disk_bytes: dict[str, int]  # checkpoint, work directory
    terms: dict[str, int]  # the formula's symbols

    @property
    def peak_bytes(self) -> int:
        return max(self.phases.values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.get)

    def describe(self, available: int | None = None) -> str:
        gib = 2**30
        lines = ["predicted memory (pvq.memory; docs/scaling.md)"]
        for phase, value in self.phases.items():
            lines.append(f"  host, {phase:<10} {value / gib:8.2f} GiB")
        lines.append(f"  peak             {self.peak_bytes / gib:8.2f} GiB ({self.peak_phase})")
        lines.append(f"  device (cuda)    {self.device_bytes / gib:8.2f} GiB (one block and its batch)")
        for what, value in self.disk_bytes.items():
            lines.append(f"  disk, {what:<10} {value / gib:8.2f} GiB")
        if available is not None:
            lines.append(f"  available now    {available / gib:8.2f} GiB (MemAvailable + this process)")
        return "\n".join(lines)


def _status_bytes(field: str) -> int | None:
    """A kB field of /proc/self/status (Linux) in bytes, None where unknown."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_memory_bytes() -> int:
    """Peak resident memory of this process since start or since the last
    `reset_peak_memory` (Linux: VmHWM; elsewhere ru_maxrss, which cannot be reset)."""
    peak = _status_bytes("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def resident_memory_bytes() -> int | None:
    """Resident memory of this process now (Linux VmRSS), None where unknown."""
    return _status_bytes("VmRSS")


def reset_peak_memory() -> bool:
    """Start a new peak-memory measurement (Linux >= 4.0: writing 5 to clear_refs resets
    VmHWM to the current RSS). Returns False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def release_freed_memory() -> None:
    """Hand the heap's free pages back to the system (glibc's malloc_trim; a no-op
    elsewhere). Tensors of up to 32 MiB come from glibc's heap, which keeps what they
    freed: after the float weights are replaced, and between fine-tuning steps, the
    resident memory would otherwise stay at its highest."""
    try:
        _libc().malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        pass


def steady_heap(threshold: int = 1 << 20) -> None:
    """Buffers of `threshold` bytes or more from their own mappings (glibc's mmap threshold
    fixed instead of rising after each free), so a freed one goes back to the system instead
    of staying in the heap as free space (what `--stream` sets for its blocks)."""
    try:
        _libc().mallopt(-3, threshold)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError, TypeError):
        pass


@functools.cache
def _libc():
    import ctypes
    import ctypes.util

    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def available_host_bytes() -> int | None:
    """Memory this job could use: MemAvailable plus what the process already holds."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    except (OSError, ValueError, IndexError):
        return None
    avail = info.get("MemAvailable")
    if avail is None:
        return None
    try:  # a container's limit (cgroup v2) can be below what the machine has free
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
        if limit != "max":
            avail = min(avail, int(limit) - used)
    except (OSError, ValueError):
        pass
    return max(0, avail) + (resident_memory_bytes() or 0)


def _sizes(config) -> dict[str, int]:
    """Parameter counts of a model built on the meta device from `config`."""
    from transformers import AutoModelForCausalLM

    from pvq.models.adapters import adapter_for_type

    adapter = adapter_for_type(getattr(config, "model_type", None))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    adapter.prepare(model)
    blocks = adapter.get_blocks(model)
    total = sum(p.numel() for p in model.parameters())
    block_params, block_linears, linears_total, groups, layer_work = 0, 0, 0, 0, 0
    for block in blocks:
        b = sum(p.numel() for p in block.parameters())
        lin = 0
        for group in adapter.block_groups(block):
            g = 0
            for name in group:
                m = block.get_submodule(name)
                lin += m.weight.numel()
                g += 12 * m.in_features ** 2
                layer_work = max(layer_work, 96 * m.out_features * m.in_features + 10 * m.in_features ** 2)
            groups = max(groups, g)
        block_params, block_linears = max(block_params, b), max(block_linears, lin)
        linears_total += lin
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return {"P": total, "Pd": total - linears_total, "Pb": block_params, "Pl": block_linears, "G": groups,
            "M": layer_work, "H": text.hidden_size, "I": getattr(text, "intermediate_size", text.hidden_size),
            "V": text.vocab_size, "Nb": len(blocks), "heads": getattr(text, "num_attention_heads", 1)}


def plan_job_memory(config, *, bits_per_weight: float, calib_windows: int, calib_seqlen: int, batch_size: int,
                    compute_dtype_bytes: int, eval_windows: int, eval_seqlen: int, evaluate: bool, stream: bool,
                    calibrate: bool = True, baseline: int | None = None, offload_activations: bool = False,
                    processes: int = 1, local_processes: int = 1,
                    shard_bytes: int = 50 * 10**9, finetune_topk: int | None = None, code_bytes: float = 1.0,
                    code_updates: bool = False) -> MemoryPlan:
    """The formula of the module docstring for one job."""
    s = _sizes(config)
    P, Pd, Pb, Pl, G, M, H, I, V = (s[k] for k in ("P", "Pd", "Pb", "Pl", "G", "M", "H", "I", "V"))
    R0 = baseline if baseline is not None else (resident_memory_bytes() or 0)
    L = calib_seqlen
    A = -(-calib_windows // processes) * L * H * compute_dtype_bytes if calibrate else 0
    F = 4 * batch_size * L * (3 * I + 4 * H) if calibrate else 0
    Gc = G if calibrate else 0
    if processes > 1 and calibrate:  # per-batch products until each group's pass ends
        batches = -(-calib_windows // batch_size)
        Gc = G * (8 * -(-batches // processes) + 4) // 12
    Q = int(bits_per_weight / 8 * (P - Pd))
    acts = 2 * A * min(batch_size, calib_windows) // calib_windows if offload_activations else 3 * A
    if stream:
        quantize = R0 + 4 * Pd + 4 * Pb + acts + 8 * Pl + Gc + M + F + Q
    else:
        quantize = R0 + 4 * P + acts + 8 * Pl + Gc + M + F + Q
    phases = {"quantize": quantize, "save": R0 + 4 * Pd + Q + 2 * Pd + min(shard_bytes, Q + 2 * Pd)}
    if finetune_topk is not None:
        Nb, heads = s["Nb"], s["heads"]
        T = 4 * L * (Nb * H + 12 * H + 5 * I + 2 * V) + 8 * heads * L * L
        Z = calib_windows * L * (8 * finetune_topk + 4)
        phases["teacher"] = R0 + 4 * P + 12 * L * V + Z
        phases["quantize"] += Z
        phases["finetune"] = (R0 + 4 * Pd + Q + int(code_bytes * (P - Pd)) + (4 * (P - Pd) if code_updates else 0)
                              + 8 * Pl + T + Z)
    if evaluate:
        logits = 6 * eval_seqlen * V * 4
        if stream:
            phases["evaluate"] = R0 + 4 * Pd + Q + 4 * Pd + 4 * Pb + 2 * eval_windows * eval_seqlen * H * 4 + logits
        else:
            phases["evaluate"] = R0 + 4 * P + 4 * Pd + Q + 4 * (P - Pd) + logits
    for phase in ("quantize", "save"):  # the other ranks wait for rank 0's save, then exit before it evaluates
        phases[phase] *= local_processes
    device = 4 * Pb + 8 * Pl + Gc + M + F + 2 * batch_size * L * H * compute_dtype_bytes
    disk = {"checkpoint": Q + 2 * Pd, "work dir": Q + A}
    return MemoryPlan(phases, device, disk, {**s, "R0": R0, "A": A, "F": F, "Q": Q})


def check_fits(plan: MemoryPlan, available: int | None, what: str = "this run") -> None:
    """MemoryPlanError when the predicted peak exceeds `available` (None: unknown, no check)."""
    if available is None or plan.peak_bytes <= available:
        return
    gib = 2**30
    raise MemoryPlanError(
        f"{what} is predicted to need {plan.peak_bytes / gib:.2f} GiB of host memory ({plan.peak_phase}), "
        f"more than the {available / gib:.2f} GiB available; try --stream, fewer --calib-windows, --no-eval, "
        "or --ignore-memory-check to run anyway")
