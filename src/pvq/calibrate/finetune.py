"""Fine-tuning of a quantized model towards the float model: its continuous parameters and,
where the method allows it, its discrete codes.

After the one-shot quantization every stored array that is a real number can still move
without changing what is stored or its size: PVQ gains (float16 gains, or the row norms
and fitted gain levels of codebook gains), RTN/GPTQ scales, GPTVQ centroids, and the
model's float norms and biases. `finetune` trains them (Adam) to minimise the KL
divergence from the float model's next-token distributions to the quantized model's, on
the calibration windows, end to end.

The teacher is not kept: its distributions are computed once, before the model is
quantized (`teacher_targets`), on the windows the steps will read (`teacher_rows`), and
kept as the top `teacher_topk` tokens of every position with the log of the rest's mass: a
few MB instead of a second float model. The loss is
the KL between those (k + 1)-bin distributions (the "top-k KL"; a lower bound of the full
KL, equal to it when the rest's mass is zero), and so is every held-out figure this
module reports. Each step runs its windows one at a time (gradients accumulate) through
decoder blocks under activation checkpointing, and the loss and its gradient are computed
64 positions at a time, so one window's logits, their gradient and one block's activations
are what the backward pass holds. On the CPU codebook lookups add their gradients in a
fixed order (`methods.base.lookup`), so a rerun repeats its bytes.

Codes that learn (`code_fraction` > 0, in the spirit of PV-Tuning): the gradient of the
loss with respect to every layer's weight is summed over the steps between evaluations;
at each evaluation the diagonal of the loss's curvature is estimated from a few windows
(`_curvature`: the Fisher with labels sampled from the model, per weight),
every code group (a pyramid point, a grid code, a centroid assignment) gets the valid
move a quadratic model of the loss says lowers it most (`TunableWeight.code_moves`), and
the `code_fraction` of each layer's groups with the largest predicted gain are proposed.
The moves are applied and kept if the held-out KL falls; else a quarter of them (the best
ones), then a sixteenth, a sixty-fourth (a backtracking line search: the diagonal model
misses how moves chosen alike add up). Codes stay valid and sizes unchanged.

The last `val_windows` windows are held out: the KL on them is measured every
`eval_every` steps, the best parameters and codes are kept, and training stops after
`patience` evaluations without improvement. A loss that becomes NaN or inf stops the
training with the best model kept, and the report says so.

Resumable: with a work directory the state (step, parameters, codes, Adam moments, best
parameters, history) is written atomically at every evaluation, and a rerun with the
same settings continues from it; the batches of a step are a function of (seed, step),
so an interrupted run ends with the bytes of an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from pvq.errors import PVQError
from pvq.fileio import sha256_file
from pvq.memory import release_freed_memory
from pvq.runtime import QuantizedLinear, tuned_weights
from pvq.calibrate import workdir as wd
from pvq.methods import get_method
from pvq.methods.base import is_int, is_number
from pvq.settings import NONNEGATIVE_NUMBER, POSITIVE, number, setting

log = logging.getLogger(__name__)

__all__ = ["FinetuneConfig", "FinetuneError", "FinetuneReport", "TeacherTargets", "finetune", "recorded_settings",
           "teacher_rows", "teacher_targets"]

STATE_DIR = "finetune"
_SWITCH = ("fast", False)  # the fine-tuning flags apply unless --fast


class FinetuneError(PVQError, ValueError):
    """Fine-tuning settings or inputs that cannot work."""


PRECISIONS = ("float32", "bfloat16")
SCHEDULES = ("constant", "cosine")


def lr_factor(schedule: str, step: int, steps: int) -> float:
    """The learning rate of optimizer step `step` (0-based) of `steps`, relative to the base
    rate: 1 throughout (constant), or half a cosine from 1 towards 0 (cosine; the last step
    keeps a small positive rate)."""
    if schedule == "constant":
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * step / steps))


def training_autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast context of the training passes for `precision` on `device` (a null one
    for float32)."""
    if precision == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


@dataclass(frozen=True)
class FinetuneConfig:
    """steps: optimizer steps at most; lr: Adam's learning rate, relative to each trained
    tensor's RMS (so gains, scales and norms of any magnitude move alike); batch: windows
    per step; val_windows: calibration windows held out (the last ones) for early
    stopping; code_fraction: the share of each layer's code groups a code update may move
    (0: codes fixed); teacher_topk: tokens of the teacher's distribution kept per
    position; precision: the arithmetic of the training passes (float32, or bfloat16
    autocast); schedule: the learning rate over the steps (constant, or cosine);
    eval_every: steps between evaluations, code updates and state saves; patience:
    evaluations without improvement before stopping; dense: also train the float norms
    and biases; checkpointing: recompute each decoder block in the backward pass instead
    of holding its activations; seed: the order of the training windows."""

    steps: int = setting(10, "fine-tuning optimizer steps at most (early stopping on held-out windows)", POSITIVE,
                         option="finetune_steps", requires=_SWITCH)
    lr: float = setting(2e-3, "Adam learning rate, relative to each trained tensor's RMS", number(above=0),
                        option="finetune_lr", requires=_SWITCH)
    batch: int = setting(2, "calibration windows per fine-tuning step", POSITIVE, option="finetune_batch",
                         requires=_SWITCH)
    val_windows: int = setting(4, "calibration windows held out for early stopping (the last ones)", POSITIVE,
                               option="finetune_val_windows", requires=_SWITCH)
    code_fraction: float = setting(
        0.0, "codes that learn: at each evaluation move up to this share of every layer's code groups (PVQ "
        "pyramid points by one pulse, grid codes by one step, GPTVQ assignments to another centroid) where a "
        "quadratic model of the loss (gradient and sampled-Fisher curvature) predicts the largest gain, kept only if "
        "the held-out KL falls, else a quarter of them, ... (0: codes stay fixed)",
        NONNEGATIVE_NUMBER, option="finetune_code_fraction", requires=_SWITCH)
    teacher_topk: int = setting(64, "tokens of the float model's next-token distribution kept per position (the "
                                "rest is one bin)", POSITIVE, option="finetune_teacher_topk", requires=_SWITCH)
    precision: str = setting("float32", "arithmetic of the training steps' forward and backward passes: float32, "
                             "or bfloat16 autocast (float32 parameters, loss and held-out figures; faster where the "
                             "device multiplies bfloat16 natively, but more memory)", choices=PRECISIONS,
                             option="finetune_precision", requires=_SWITCH)
    schedule: str = setting("constant", "learning-rate schedule over the steps: constant, or cosine (half a cosine "
                            "from the base rate towards 0)", choices=SCHEDULES, option="finetune_schedule",
                            requires=_SWITCH)
    eval_every: int = 5
    patience: int = 2
    dense: bool = True
    checkpointing: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch", "val_windows", "eval_every", "patience", "teacher_topk"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise FinetuneError(f"finetune {name} must be a positive integer, got {value!r}")
        if not is_int(self.seed):
            raise FinetuneError(f"finetune seed must be an integer, got {self.seed!r}")
        if not is_number(self.lr) or not math.isfinite(self.lr) or self.lr <= 0:
            raise FinetuneError(f"finetune lr must be a positive number, got {self.lr!r}")
        if not is_number(self.code_fraction) or not 0 <= self.code_fraction <= 1:
            raise FinetuneError(f"finetune code_fraction must be a number in 0..1, got {self.code_fraction!r}")
        if self.precision not in PRECISIONS:
            raise FinetuneError(f"finetune precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.schedule not in SCHEDULES:
            raise FinetuneError(f"finetune schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        for name in ("dense", "checkpointing"):
            if not isinstance(getattr(self, name), bool):
                raise FinetuneError(f"finetune {name} must be True or False, got {getattr(self, name)!r}")


@dataclass
class FinetuneReport:
    steps: int  # optimizer steps taken (this run and any it resumed)
    best_step: int  # the step whose parameters were kept (0: the one-shot result)
    stopped_early: bool
    val_kl_before: float  # held-out top-k KL (nats/token) of the one-shot model
    val_kl_best: float  # during training (float32 parameters)
    val_kl_stored: float  # with the parameters rounded to what is stored: the model as saved
    kept: str  # "tuned" or "one-shot" (tuning did not lower the stored model's held-out KL)
    train_windows: int
    val_windows: int
    trained_values: int  # continuous values trained (payload arrays + dense)
    seconds: float
    resumed_from: int = 0
    teacher_topk: int = 0
    code_rounds: int = 0  # code updates tried
    code_rounds_kept: int = 0  # of which the held-out KL kept
    codes_moved: int = 0  # code groups that differ from the one-shot model's in the kept model
    code_groups: int = 0  # code groups that could move
    diverged: str | None = None  # why training stopped on a non-finite loss (the best model was kept)
    history: list[dict[str, float]] = field(default_factory=list)

    def describe(self) -> str:
        codes = "codes unchanged"
        if self.code_rounds:
            codes = (f"{self.codes_moved} of {self.code_groups} code groups moved ({self.code_rounds_kept} of "
                     f"{self.code_rounds} code updates kept)")
        return (f"{self.steps} steps (kept step {self.best_step}{', stopped early' if self.stopped_early else ''}), "
                f"held-out top-{self.teacher_topk} KL {self.val_kl_before:.4f} -> {self.val_kl_stored:.4f} "
                f"nats/token as stored ({self.trained_values} values trained on {self.train_windows} windows, "
                f"{self.val_windows} held out; {codes}; {self.seconds:.0f} s"
                f"{'; kept the one-shot model' if self.kept == 'one-shot' else ''})"
                + (f"; {self.diverged}" if self.diverged else ""))


# -- the teacher ------------------------------------------------------------------------------

@dataclass
class TeacherTargets:
    """The float model's next-token distributions on n windows of L tokens: the top k
    tokens of every position (`index` (n, L, k) int32, their log-probabilities `logp` (n,
    L, k) float32) and `rest` (n, L) float32, the log of every other token's total mass."""

    index: torch.Tensor
    logp: torch.Tensor
    rest: torch.Tensor

    @property
    def k(self) -> int:
        return int(self.index.shape[-1])

    def __getitem__(self, rows) -> "TeacherTargets":
        return TeacherTargets(self.index[rows], self.logp[rows], self.rest[rows])

    def to(self, device) -> "TeacherTargets":
        return TeacherTargets(self.index.to(device), self.logp.to(device), self.rest.to(device))


def teacher_targets(model: nn.Module, windows: torch.Tensor, k: int = 64, *, device: str | torch.device = "cpu",
                    progress: bool = False, rows: list[int] | None = None) -> TeacherTargets:
    """`model`'s distributions on `windows` (n, L) kept top-k (see TeacherTargets), one
    window at a time in float32; with `rows`, only those windows' (the others' log-
    probabilities are NaN, so a loss that reads them is not finite and stops the training)."""
    from pvq.progress import progress_bar

    windows = torch.as_tensor(windows).to("cpu", torch.long)
    n, L = windows.shape
    index = torch.zeros(n, L, k, dtype=torch.int32)
    logp = torch.full((n, L, k), math.nan)
    rest = torch.full((n, L), math.nan)
    rows = range(n) if rows is None else sorted(set(rows))
    if any(not 0 <= i < n for i in rows):
        raise FinetuneError(f"teacher rows must be window indices in 0..{n - 1}")
    home = next(model.parameters()).device
    was_training = model.training
    model.to(device).eval()
    try:
        with torch.no_grad():
            for i in progress_bar(rows, desc="teacher distributions", unit="window", enabled=progress):
                full = torch.log_softmax(model(windows[i:i + 1].to(device), use_cache=False).logits[0].float(), dim=-1)
                if k > full.shape[-1]:
                    raise FinetuneError(f"finetune teacher_topk {k} exceeds the vocabulary ({full.shape[-1]} tokens)")
                top, idx = full.topk(k, dim=-1)
                index[i], logp[i] = idx.to("cpu", torch.int32), top.cpu()
                rest[i] = _log_rest(top.double()).float().cpu()
    finally:
        model.to(home)
        model.train(was_training)
        release_freed_memory()
    return TeacherTargets(index, logp, rest)


def teacher_rows(n_windows: int, config: "FinetuneConfig") -> list[int]:
    """The calibration windows whose teacher targets a fine-tuning with `config` reads: those
    its steps train on (the first steps' batches) and the held-out ones. With 32 windows and
    the default 10 steps of 2, 8 of the 28 training windows are never read."""
    n_train = n_windows - config.val_windows
    if n_train < 1:
        return list(range(n_windows))
    used = {w for step in range(config.steps) for w in _batches(n_train, config.batch, config.seed, step)}
    return sorted(used) + list(range(n_train, n_windows))


def _log_rest(top_logp: torch.Tensor) -> torch.Tensor:
    """log(1 - sum exp(top_logp)) over the last axis, kept finite (at least log 1e-12)."""
    mass = top_logp.exp().sum(dim=-1)
    return torch.log1p(-mass.clamp(max=1 - 1e-12))


#: positions whose loss terms exist at once: the KL's temporaries (the log-softmax and the
#: terms of its gradient, each positions x vocabulary floats) are that many positions long
KL_CHUNK = 64


def _position_kl(z: torch.Tensor, index: torch.Tensor, logp: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of each row of float32 logits z (n, V), over the teacher's
    top-k tokens and the rest as one bin (n,)."""
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    s_top = z.gather(-1, index.long()) - lse
    s_rest = _log_rest(s_top.double()).float()
    return (logp.exp() * (logp - s_top)).sum(dim=-1) + rest.exp() * (rest - s_rest)


class _ChunkedTopkKL(torch.autograd.Function):
    """The mean of `_position_kl` over all positions, its value and its gradient computed
    `KL_CHUNK` positions at a time in the forward pass: the backward pass keeps one
    gradient the size of the logits instead of the several full-size temporaries that
    autograd through the whole log-softmax holds (about 300 MiB at the demo model's
    49152-token vocabulary and 512 positions). The same per-position arithmetic."""

    @staticmethod
    def forward(ctx, logits, index, logp, rest):
        V = logits.shape[-1]
        z, index, logp, rest = logits.reshape(-1, V), index.reshape(-1, index.shape[-1]), logp.reshape(
            -1, logp.shape[-1]), rest.reshape(-1)
        n = z.shape[0]
        kl = torch.empty(n, dtype=torch.float32, device=z.device)
        grad = torch.empty(z.shape, dtype=logits.dtype, device=z.device) if ctx.needs_input_grad[0] else None
        for a in range(0, n, KL_CHUNK):
            b = min(n, a + KL_CHUNK)
            if grad is None:
                kl[a:b] = _position_kl(z[a:b].float(), index[a:b], logp[a:b], rest[a:b])
                continue
            with torch.enable_grad():
                zc = z[a:b].detach().float().requires_grad_(True)
                terms = _position_kl(zc, index[a:b], logp[a:b], rest[a:b])
                (g,) = torch.autograd.grad(terms.sum(), zc)
            kl[a:b], grad[a:b] = terms.detach(), g
        ctx.save_for_backward(grad)
        ctx.shape, ctx.n = logits.shape, n
        return kl.mean()

    @staticmethod
    @once_differentiable
    def backward(ctx, upstream):
        (grad,) = ctx.saved_tensors  # scaled in place: one backward pass (no retain_graph)
        return grad.mul_(upstream / ctx.n).reshape(ctx.shape), None, None, None


def _topk_kl(logits: torch.Tensor, teacher: TeacherTargets) -> torch.Tensor:
    """Mean over positions of KL(teacher || student) over the teacher's top-k tokens and the
    rest as one bin; logits (b, L, V), teacher for the same b windows."""
    if torch.is_grad_enabled() and logits.requires_grad:
        return _ChunkedTopkKL.apply(logits, teacher.index, teacher.logp, teacher.rest)
    with torch.no_grad():
        return _ChunkedTopkKL.apply(logits.detach(), teacher.index, teacher.logp, teacher.rest)


# -- what is trained ---------------------------------------------------------------------------

def _batches(n_train: int, batch: int, seed: int, step: int) -> list[int]:
    """Training window indices of `step` (0-based): consecutive slices of per-epoch
    permutations seeded by (seed, epoch): a function of the step alone, so a resumed run
    takes the same batches."""
    out = []
    for k in range(step * batch, (step + 1) * batch):
        epoch, pos = divmod(k, n_train)
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        out.append(int(torch.randperm(n_train, generator=g)[pos]))
    return out


class _Trainable:
    """The tensors fine-tuning moves: each layer's TunableWeight parameters and the dense
    norms and biases, and the codes of the layers whose codes may move, with named access
    for the state file."""

    def __init__(self, model: nn.Module, config: FinetuneConfig, device: torch.device) -> None:
        self.layers = {name: m for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}
        if not self.layers:
            raise FinetuneError("the model has no quantized layers to fine-tune")
        self.tunables = {}
        for name, layer in self.layers.items():
            self.tunables[name] = get_method(layer.method).tunable(layer.quantized_tensor()).to(device)
        self.params: dict[str, torch.Tensor] = {}
        for name, tw in self.tunables.items():
            for pname, p in tw.named_parameters():
                self.params[f"{name}::{pname}"] = p
        if config.dense:  # norm weights and biases
            self.params.update({f"dense::{k}": p for k, p in model.named_parameters()
                                if p.ndim == 1 and p.is_floating_point()})
        self.movable = ({name: tw for name, tw in self.tunables.items() if tw.codes_kind is not None}
                        if config.code_fraction > 0 else {})
        self.initial = {k: p.detach().clone() for k, p in self.params.items()}
        self.initial_codes = {name: tw.code_groups().clone() for name, tw in self.movable.items()}

    def values(self) -> dict[str, torch.Tensor]:
        out = {k: p.detach().clone() for k, p in self.params.items()}
        out.update({f"codes::{name}": tw.code_groups().clone() for name, tw in self.movable.items()})
        return out

    def load(self, values: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(values[k].to(p.device, p.dtype))
            for name, tw in self.movable.items():
                tw.code_groups().copy_(values[f"codes::{name}"].to(tw.code_groups().device))
                tw.codes_changed = not torch.equal(tw.code_groups().cpu(), self.initial_codes[name].cpu())

    def codes_moved(self) -> int:
        return sum(int((tw.code_groups().cpu() != self.initial_codes[n].cpu()).any(dim=1).sum())
                   for n, tw in self.movable.items())

    def track_grads(self, on: bool) -> None:
        for tw in self.movable.values():
            tw.grad_sum = torch.zeros(tw.qt.shape, dtype=torch.bfloat16, device=tw.code_groups().device) if on else None

    def digest(self) -> str:
        h = hashlib.sha256()
        for k in sorted(self.initial):
            t = self.initial[k].detach().to("cpu").contiguous()
            h.update(k.encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        for k in sorted(self.initial_codes):
            h.update(k.encode())
            h.update(self.initial_codes[k].cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()


#: training windows whose sampled-label gradients estimate the curvature at each code update
FISHER_WINDOWS = 2


def _curvature(model: nn.Module, trainable: _Trainable, windows: torch.Tensor, device, seed: int
               ) -> dict[str, torch.Tensor]:
    """Every movable layer's diagonal curvature (R, C) of the mean per-token loss: the
    Fisher with labels sampled from the model's own next-token distribution (seeded), which
    for the KL equals its Gauss-Newton matrix, taken per position as in K-FAC,
    L * sum_t (dL/dy_t)^2 (x_t)^2 for the mean loss over a window's L positions (every
    weight its own value: a rank-1 or per-window estimate misses exactly the weights whose
    large gradients make a move look good), averaged over `windows`."""
    gen = torch.Generator().manual_seed(seed)
    sums = {}
    for name, tw in trainable.movable.items():
        sums[name], tw.grad_sum = tw.grad_sum, None  # these gradients are not the loss's
        tw.fisher = torch.zeros(tw.qt.shape, dtype=torch.bfloat16, device=device)
    positions = 0
    try:
        with tuned_weights(model, trainable.tunables):
            for i in range(windows.shape[0]):
                logits = model(windows[i:i + 1].to(device), use_cache=False).logits[0].float()
                with torch.no_grad():
                    labels = torch.multinomial(torch.softmax(logits, dim=-1).cpu(), 1, generator=gen)[:, 0]
                nn.functional.cross_entropy(logits, labels.to(device)).backward()
                positions = logits.shape[0]
        return {name: tw.fisher.mul_(positions / windows.shape[0]) for name, tw in trainable.movable.items()}  # bfloat16
    finally:
        for name, tw in trainable.movable.items():
            tw.fisher, tw.grad_sum = None, sums[name]


#: shares of the proposed moves tried at each code update, largest first (a backtracking line
#: search: moves chosen one by one under a diagonal curvature add up coherently, so the whole
#: set can raise the loss where each of its moves alone would lower it)
LINE_SEARCH = (1.0, 1 / 4, 1 / 16, 1 / 64)


def _propose_moves(trainable: _Trainable, fraction: float, grad_steps: int, curvature: dict[str, torch.Tensor]
                   ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Up to `fraction` of each movable layer's code groups, best first: those whose best move
    the quadratic model (the mean gradient of the last `grad_steps` steps, the `curvature`)
    predicts to lower the loss most; {layer: (group rows, their moved codes)}."""
    out = {}
    for name, tw in trainable.movable.items():
        delta, candidates = tw.code_moves(tw.grad_sum.float() / max(grad_steps, 1), curvature[name].float())
        n = min(int(fraction * delta.numel()), int(torch.isfinite(delta).sum()))
        if n >= 1:
            rows = torch.topk(delta, n, largest=False).indices
            out[name] = (rows, candidates[rows])
    return out


def _apply_moves(trainable: _Trainable, proposals: dict, share: float) -> tuple[int, dict]:
    """Apply the best `share` of every layer's proposed moves; (groups moved, undo record)."""
    undo, moved = {}, 0
    for name, (rows, candidates) in proposals.items():
        n = math.ceil(share * rows.numel())
        tw = trainable.movable[name]
        groups = tw.code_groups()
        idx = rows[:n].to(groups.device)
        undo[name] = (idx, groups[idx].clone(), tw.codes_changed)
        groups[idx] = candidates[:n].to(groups.device, groups.dtype)
        tw.codes_changed = True
        moved += n
    return moved, undo


def _undo_moves(trainable: _Trainable, undo: dict) -> None:
    for name, (rows, old, changed) in undo.items():
        tw = trainable.movable[name]
        tw.code_groups()[rows] = old
        tw.codes_changed = changed


def _code_update(model, trainable: _Trainable, train, val, teacher_val, device, codes: dict, grad_steps: int,
                 val_kl: float, entry: dict, seed: int) -> float:
    """One round of codes that learn (module docstring): curvature, proposals, the line
    search on the held-out KL. Updates `codes` (rounds, kept, fraction) and `entry` (the
    tries); returns the held-out KL of the model it leaves."""
    rows = [(FISHER_WINDOWS * codes["rounds"] + i) % train.shape[0] for i in range(FISHER_WINDOWS)]
    proposals = _propose_moves(trainable, codes["fraction"], grad_steps,
                               _curvature(model, trainable, train[rows], device, seed))
    tries = []
    for share in LINE_SEARCH:
        moved, undo = _apply_moves(trainable, proposals, share)
        if moved == 0:
            break
        tries.append([moved, _val_kl(model, trainable, val, teacher_val, device, tuned=True)])
        if tries[-1][1] < val_kl:
            codes["kept"] += 1
            codes["fraction"] *= share  # the size that worked
            break
        _undo_moves(trainable, undo)
    else:
        codes["fraction"] *= LINE_SEARCH[-1] / 2
    if not tries:
        return val_kl
    codes["rounds"] += 1
    entry.update(codes_moved=tries[-1][0], val_kl_codes=tries[-1][1], code_tries=tries)
    return min(val_kl, tries[-1][1])


@contextlib.contextmanager
def _checkpointed_blocks(model: nn.Module, on: bool) -> Iterator[None]:
    """Each decoder block recomputed in the backward pass (torch.utils.checkpoint,
    non-reentrant) instead of holding its activations, for the duration."""
    if not on:
        yield
        return
    from torch.utils.checkpoint import checkpoint

    from pvq.models.adapters import adapter_for_type

    blocks = list(adapter_for_type(model.config.model_type).get_blocks(model))
    for block in blocks:
        inner = block.forward

        def wrapped(*args, _inner=inner, **kwargs):
            if not torch.is_grad_enabled():
                return _inner(*args, **kwargs)
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        block.forward = wrapped
    try:
        yield
    finally:
        for block in blocks:
            del block.forward  # the class's forward again


def finetune(
    model: nn.Module,
    teacher: nn.Module | TeacherTargets,
    windows: torch.Tensor,
    config: FinetuneConfig | dict | None = None,
    *,
    work_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
) -> FinetuneReport:
    """Fine-tune `model` (packed `QuantizedLinear`s) in place towards `teacher` (the float
    model, or its `teacher_targets` on `windows`) on `windows` (n, seqlen) token ids; see
    the module docstring. The layers' payloads are rewritten with the kept values (same
    spec) and the dense parameters rounded to the dtype the checkpoint stores them in.
    `on_step(step, loss)` is called after every optimizer step (tests interrupt there)."""
    if config is None:
        config = FinetuneConfig()
    elif isinstance(config, dict):
        unknown = sorted(set(config) - set(FinetuneConfig.__dataclass_fields__))
        if unknown:
            raise FinetuneError(f"unknown finetune field(s) {', '.join(map(repr, unknown))}")
        config = FinetuneConfig(**config)
    windows = torch.as_tensor(windows).to("cpu", torch.long)
    if windows.ndim != 2 or windows.shape[1] < 2:
        raise FinetuneError(f"windows must be (n_windows, seqlen >= 2) token ids, got shape {tuple(windows.shape)}")
    n_val = config.val_windows
    if windows.shape[0] < n_val + 1:
        raise FinetuneError(f"fine-tuning holds out {n_val} calibration window(s) and needs at least one more to "
                            f"train on; got {windows.shape[0]} (raise --calib-windows or lower --finetune-val-windows)")
    device = torch.device(device)
    t_start = time.perf_counter()
    rows = teacher_rows(windows.shape[0], config)
    if not isinstance(teacher, TeacherTargets):
        teacher = teacher_targets(teacher, windows, config.teacher_topk, device=device, progress=progress, rows=rows)
    if tuple(teacher.index.shape[:2]) != tuple(windows.shape):
        raise FinetuneError(f"teacher targets for windows of shape {tuple(teacher.index.shape[:2])}, given windows "
                            f"of shape {tuple(windows.shape)}")
    missing = [rows[i] for i in torch.isnan(teacher.rest[rows]).any(dim=1).nonzero()[:, 0].tolist()]
    if missing:
        raise FinetuneError(f"the teacher targets lack window(s) {missing[:8]} that these settings train or evaluate "
                            f"on (taken with teacher_rows of other settings?)")
    home = next(model.parameters()).device
    model.to(device)
    was_training = model.training
    model.eval()
    requires = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        trainable = _Trainable(model, config, device)
        for p in trainable.params.values():
            p.requires_grad_(True)
        with _checkpointed_blocks(model, config.checkpointing):
            report = _train(model, trainable, windows, teacher, config, device, work_dir, progress, on_step)
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(requires.get(n, False))
        model.train(was_training)
        model.to(home)
    report.seconds = time.perf_counter() - t_start
    return report


def _val_kl(model, trainable, val, teacher_val: TeacherTargets, device, tuned: bool) -> float:
    total = 0.0
    with torch.no_grad():
        for i in range(val.shape[0]):
            ids = val[i:i + 1].to(device)
            with tuned_weights(model, trainable.tunables) if tuned else contextlib.nullcontext():
                logits = model(ids, use_cache=False).logits
            total += float(_topk_kl(logits, teacher_val[i:i + 1].to(device)))
    release_freed_memory()
    return total / val.shape[0]


def recorded_settings(fields: FinetuneConfig | dict[str, Any]) -> dict[str, Any]:
    """The fine-tuning settings a resumable state or a sweep point records: every field, but
    `schedule` only when it is not the constant default, so what was recorded before the
    option existed (the same training) still matches."""
    out = asdict(fields) if isinstance(fields, FinetuneConfig) else dict(fields)
    if out.get("schedule") == "constant":
        del out["schedule"]
    return out


def _settings(config: FinetuneConfig, train: torch.Tensor, val: torch.Tensor, trainable: _Trainable) -> dict[str, Any]:
    h = hashlib.sha256(train.numpy().tobytes())
    h.update(val.numpy().tobytes())
    return {"config": recorded_settings(config), "windows_sha256": h.hexdigest(), "windows_shape": [list(train.shape),
            list(val.shape)], "parameters_sha256": trainable.digest(), "torch": torch.__version__}


def _train(model, trainable: _Trainable, windows, teacher: TeacherTargets, config: FinetuneConfig, device, work_dir,
           progress, on_step) -> FinetuneReport:
    from pvq.progress import progress_bar

    n_val = config.val_windows
    train, val = windows[:-n_val], windows[-n_val:]
    teacher_train, teacher_val = teacher[:-n_val], teacher[-n_val:]
    groups = []
    for k, p in trainable.params.items():
        rms = float(trainable.initial[k].float().pow(2).mean().sqrt())
        groups.append({"params": [p], "lr": config.lr * (rms if rms > 0 and math.isfinite(rms) else 1.0), "name": k})
    opt = torch.optim.Adam(groups)
    base_lr = [g["lr"] for g in opt.param_groups]

    settings = _settings(config, train, val, trainable)
    state_dir = Path(work_dir) / STATE_DIR if work_dir is not None else None
    step, best_step, stale, history = 0, 0, 0, []
    codes = {"rounds": 0, "kept": 0, "fraction": config.code_fraction}
    best_values = trainable.values()
    val_before = None
    done = False
    resumed = 0
    diverged = None
    if state_dir is not None:
        loaded = _read_state(state_dir, settings)
        if loaded is not None:
            meta, tensors = loaded
            trainable.load({k: tensors[f"current/{k}"] for k in best_values})
            best_values = {k: tensors[f"best/{k}"] for k in best_values}
            _load_adam(opt, tensors)
            step, best_step, stale, history = meta["step"], meta["best_step"], meta["stale"], meta["history"]
            val_before, best_val, done = meta["val_kl_before"], meta["best_val"], meta["done"]
            codes, diverged = meta["codes"], meta.get("diverged")
            resumed = step
            log.info("fine-tuning resumes from %s at step %d", state_dir, step)
    if val_before is None:
        val_before = _val_kl(model, trainable, val, teacher_val, device, tuned=False)
        best_val = val_before
        history.append({"step": 0, "val_kl": val_before})

    n_train = train.shape[0]
    stopped_early = bool(done and step < config.steps and diverged is None)
    bar = progress_bar(total=config.steps, initial=step, desc="fine-tuning", unit="step", enabled=progress)
    running = []
    grad_steps = 0  # steps summed in the layers' grad_sum since the last code update
    trainable.track_grads(bool(trainable.movable))
    try:
        while not done and step < config.steps:
            opt.zero_grad(set_to_none=True)
            loss_sum = 0.0
            with tuned_weights(model, trainable.tunables):
                for w in _batches(n_train, config.batch, config.seed, step):  # one window at a time
                    with training_autocast(config.precision, device):
                        logits = model(train[w:w + 1].to(device), use_cache=False).logits
                    loss = _topk_kl(logits, teacher_train[w:w + 1].to(device)) / config.batch
                    del logits  # the loss holds its gradient: the logits can go before the backward pass
                    if not torch.isfinite(loss):
                        break
                    loss.backward()
                    loss_sum += float(loss.detach())
            if not torch.isfinite(loss):
                diverged = (f"the loss became {float(loss.detach())} at step {step + 1}; training stopped and the best model "
                            f"(step {best_step}) was kept (lower --finetune-lr)")
                log.warning("fine-tuning: %s", diverged)
                done = True
                break
            factor = lr_factor(config.schedule, step, config.steps)  # a function of the step: resumes exactly
            for g, lr in zip(opt.param_groups, base_lr):
                g["lr"] = lr * factor
            opt.step()
            release_freed_memory()  # what the step's passes freed (its peak stays: see pvq.memory)
            step += 1
            grad_steps += 1
            running.append(loss_sum)
            bar.set_postfix(kl=f"{running[-1]:.4f}", best=f"{best_val:.4f}")
            bar.update(1)
            if step % config.eval_every == 0 or step == config.steps:
                val_kl = _val_kl(model, trainable, val, teacher_val, device, tuned=True)
                entry = {"step": step, "train_kl": sum(running) / len(running), "val_kl": val_kl}
                running = []
                if trainable.movable and codes["fraction"] > 0:
                    val_kl = _code_update(model, trainable, train, val, teacher_val, device, codes, grad_steps,
                                          val_kl, entry, seed=config.seed * 1_000_003 + step)
                    trainable.track_grads(True)  # a fresh sum for the next round
                    grad_steps = 0
                history.append(entry)
                log.info("fine-tuning step %d: held-out KL %.5f (best %.5f at step %d)", step, val_kl, best_val,
                         best_step)
                if val_kl < best_val:
                    best_val, best_step, stale = val_kl, step, 0
                    best_values = trainable.values()
                else:
                    stale += 1
                if stale >= config.patience:
                    done = stopped_early = True
                if step == config.steps:
                    done = True
                if state_dir is not None:
                    _write_state(state_dir, settings, trainable, best_values, opt, dict(
                        step=step, best_step=best_step, stale=stale, history=history, val_kl_before=val_before,
                        best_val=best_val, done=done, codes=codes, diverged=None))
            if on_step is not None:
                on_step(step, running[-1] if running else loss_sum)
    finally:
        bar.close()
        trainable.track_grads(False)
    if diverged is not None and state_dir is not None:
        _write_state(state_dir, settings, trainable, best_values, opt, dict(
            step=step, best_step=best_step, stale=stale, history=history, val_kl_before=val_before,
            best_val=best_val, done=True, codes=codes, diverged=diverged))

    # keep the best parameters, stored as the checkpoint holds them, and measure that model
    original = {name: layer.payload() for name, layer in trainable.layers.items()}  # the one-shot payloads
    trainable.load(best_values)
    with torch.no_grad():
        for name, layer in trainable.layers.items():
            layer.set_payload(trainable.tunables[name].payload())
    _round_dense(model)
    val_stored = _val_kl(model, trainable, val, teacher_val, device, tuned=False)
    kept = "tuned"
    moved = trainable.codes_moved()
    if val_stored >= val_before:  # rounding to the stored dtypes (or no step at all) gained nothing
        kept, moved = "one-shot", 0
        with torch.no_grad():
            for name, layer in trainable.layers.items():
                layer.set_payload(original[name])
            for k, p in trainable.params.items():
                if k.startswith("dense::"):
                    p.copy_(trainable.initial[k])
        val_stored = val_before
    return FinetuneReport(
        steps=step, best_step=best_step, stopped_early=stopped_early, val_kl_before=val_before, val_kl_best=best_val,
        val_kl_stored=val_stored, kept=kept, train_windows=n_train, val_windows=val.shape[0],
        trained_values=sum(p.numel() for p in trainable.params.values()), seconds=0.0, resumed_from=resumed,
        teacher_topk=teacher.k, code_rounds=codes["rounds"], code_rounds_kept=codes["kept"], codes_moved=moved,
        code_groups=sum(tw.code_groups().shape[0] for tw in trainable.movable.values()), diverged=diverged,
        history=history)


def _round_dense(model: nn.Module) -> None:
    """A pvq model's dense tensors rounded to the dtype its checkpoint stores them in."""
    from pvq.checkpoint.hf import PVQQuantizationConfig, round_dense_to_storage

    qcfg = getattr(model.config, "quantization_config", None)
    if isinstance(qcfg, PVQQuantizationConfig):
        round_dense_to_storage(model, qcfg.dense_dtype)


# -- state file ---------------------------------------------------------------------------------

def _adam_tensors(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {}
    for group in opt.param_groups:
        p = group["params"][0]
        st = opt.state.get(p, {})
        if "exp_avg" in st:  # a tensor no batch has reached yet (an expert no token chose) has none
            out[f"adam_m/{group['name']}"] = st["exp_avg"]
            out[f"adam_v/{group['name']}"] = st["exp_avg_sq"]
            out[f"adam_step/{group['name']}"] = torch.as_tensor(st["step"], dtype=torch.float32).reshape(1)
    return out


def _load_adam(opt: torch.optim.Optimizer, tensors: dict) -> None:
    for group in opt.param_groups:
        p, name = group["params"][0], group["name"]
        if f"adam_m/{name}" in tensors:
            opt.state[p] = {"step": tensors[f"adam_step/{name}"].reshape(()).clone(),
                            "exp_avg": tensors[f"adam_m/{name}"].to(p.device, p.dtype).clone(),
                            "exp_avg_sq": tensors[f"adam_v/{name}"].to(p.device, p.dtype).clone()}


def _write_state(state_dir: Path, settings: dict, trainable: _Trainable, best_values: dict, opt, meta: dict) -> None:
    """The tensors first, then the JSON naming their digest: a state is whole or absent."""
    state_dir.mkdir(parents=True, exist_ok=True)
    tensors = {f"current/{k}": v for k, v in trainable.values().items()}
    tensors.update({f"best/{k}": v for k, v in best_values.items()})
    tensors.update(_adam_tensors(opt))
    digest = wd.atomic_save_tensors(state_dir / "state.safetensors", tensors)
    wd.atomic_write_json(state_dir / "state.json", {"settings": settings, **meta, "tensors_sha256": digest})


def _read_state(state_dir: Path, settings: dict):
    """(meta, tensors) of a saved state made with `settings`, else None (a mismatched or
    damaged state is discarded with a warning: fine-tuning starts afresh)."""
    from safetensors.torch import load_file

    meta_path, tensor_path = state_dir / "state.json", state_dir / "state.safetensors"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("settings") != json.loads(json.dumps(settings)):
            log.warning("%s holds fine-tuning state of other settings; fine-tuning starts afresh", state_dir)
            return None
        if sha256_file(tensor_path) != meta["tensors_sha256"]:
            log.warning("%s: the fine-tuning state does not match its digest; fine-tuning starts afresh", state_dir)
            return None
        return meta, load_file(str(tensor_path))
    except (OSError, ValueError, KeyError) as e:
        log.warning("%s: unreadable fine-tuning state (%s); fine-tuning starts afresh", state_dir, e)
        return None
