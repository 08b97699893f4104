"""Fine-tuning of a quantized model's continuous parameters, its codes fixed.

After the one-shot quantization every stored array that is a real number can still move
without changing what is stored or its size: PVQ gains (float16 gains, or the row norms
and fitted gain levels of codebook gains), RTN/GPTQ scales, GPTVQ centroids, and the
model's float norms and biases. `finetune` trains them (Adam) to minimise the KL
divergence from the float model's next-token distributions to the quantized model's, on
the calibration windows, end to end (the whole model at once; block-output MSE was not
tried). The last `val_windows` windows are held out: the KL on them is measured every
`eval_every` steps, the best parameters are kept, and training stops after `patience`
evaluations without improvement. The discrete codes (pyramid shapes, grid codes, gain
indices, GPTVQ assignments) never change: each method's `tunable(qt)`
(`pvq.methods.TunableWeight`) builds the weight from them and the trained values, and
hands back a payload of the same spec.

Resumable: with a work directory the state (step, parameters, Adam moments, best
parameters, history) is written atomically at every evaluation, and a rerun with the
same settings continues from it; the batches of a step are a function of (seed, step),
so an interrupted run ends with the bytes of an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from pvq.errors import PVQError
from pvq.fileio import sha256_file
from pvq.runtime import QuantizedLinear, tuned_weights
from pvq.calibrate import workdir as wd
from pvq.methods import get_method
from pvq.methods.base import is_int, is_number
from pvq.settings import POSITIVE, number, setting

log = logging.getLogger(__name__)

__all__ = ["FinetuneConfig", "FinetuneError", "FinetuneReport", "finetune"]

STATE_DIR = "finetune"


class FinetuneError(PVQError, ValueError):
    """Fine-tuning settings or inputs that cannot work."""


@dataclass(frozen=True)
class FinetuneConfig:
    """steps: optimizer steps at most; lr: Adam's learning rate, relative to each trained
    tensor's RMS (so gains, scales and norms of any magnitude move alike); batch: windows
    per step; val_windows: calibration windows held out (the last ones) for early
    stopping; eval_every: steps between evaluations (and state saves); patience:
    evaluations without improvement before stopping; dense: also train the float norms
    and biases; seed: the order of the training windows."""

    steps: int = setting(60, "fine-tuning optimizer steps at most (early stopping on held-out windows)", POSITIVE,
                         option="finetune_steps", requires=("finetune", True))
    lr: float = setting(2e-3, "Adam learning rate, relative to each trained tensor's RMS", number(above=0),
                        option="finetune_lr", requires=("finetune", True))
    batch: int = setting(2, "calibration windows per fine-tuning step", POSITIVE, option="finetune_batch",
                         requires=("finetune", True))
    val_windows: int = setting(4, "calibration windows held out for early stopping (the last ones)", POSITIVE,
                               option="finetune_val_windows", requires=("finetune", True))
    eval_every: int = 10
    patience: int = 2
    dense: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch", "val_windows", "eval_every", "patience"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise FinetuneError(f"finetune {name} must be a positive integer, got {value!r}")
        if not is_int(self.seed):
            raise FinetuneError(f"finetune seed must be an integer, got {self.seed!r}")
        if not is_number(self.lr) or not math.isfinite(self.lr) or self.lr <= 0:
            raise FinetuneError(f"finetune lr must be a positive number, got {self.lr!r}")
        if not isinstance(self.dense, bool):
            raise FinetuneError(f"finetune dense must be True or False, got {self.dense!r}")


@dataclass
class FinetuneReport:
    steps: int  # optimizer steps taken (this run and any it resumed)
    best_step: int  # the step whose parameters were kept (0: the one-shot result)
    stopped_early: bool
    val_kl_before: float  # held-out KL (nats/token) of the one-shot model
    val_kl_best: float  # during training (float32 parameters)
    val_kl_stored: float  # with the parameters rounded to what is stored: the model as saved
    kept: str  # "tuned" or "one-shot" (tuning did not lower the stored model's held-out KL)
    train_windows: int
    val_windows: int
    trained_values: int  # continuous values trained (payload arrays + dense)
    seconds: float
    resumed_from: int = 0
    history: list[dict[str, float]] = field(default_factory=list)

    def describe(self) -> str:
        return (f"{self.steps} steps (kept step {self.best_step}{', stopped early' if self.stopped_early else ''}), "
                f"held-out KL {self.val_kl_before:.4f} -> {self.val_kl_stored:.4f} nats/token as stored "
                f"({self.trained_values} values trained on {self.train_windows} windows, {self.val_windows} held out; "
                f"{self.seconds:.0f} s{'; kept the one-shot model' if self.kept == 'one-shot' else ''})")


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


def _kl(student_logits: torch.Tensor, teacher_logprobs: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student)."""
    logq = F.log_softmax(student_logits.float(), dim=-1).flatten(0, -2)
    logp = teacher_logprobs.float().flatten(0, -2)
    return F.kl_div(logq, logp, log_target=True, reduction="sum") / logp.shape[0]


class _Trainable:
    """The tensors fine-tuning moves: each layer's TunableWeight parameters and the dense
    norms and biases, with named access for the state file."""

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
        self.initial = {k: p.detach().clone() for k, p in self.params.items()}

    def values(self) -> dict[str, torch.Tensor]:
        return {k: p.detach().clone() for k, p in self.params.items()}

    def load(self, values: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(values[k].to(p.device, p.dtype))

    def digest(self) -> str:
        h = hashlib.sha256()
        for k in sorted(self.initial):
            t = self.initial[k].detach().to("cpu").contiguous()
            h.update(k.encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()


def finetune(
    model: nn.Module,
    reference: nn.Module,
    windows: torch.Tensor,
    config: FinetuneConfig | dict | None = None,
    *,
    work_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
) -> FinetuneReport:
    """Fine-tune `model` (packed `QuantizedLinear`s) in place towards `reference` (the float
    model) on `windows` (n, seqlen) token ids; see the module docstring. The layers'
    payloads are rewritten with the kept values (same spec, codes untouched) and the dense
    parameters rounded to the dtype the checkpoint stores them in.
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
    train, val = windows[:-n_val], windows[-n_val:]
    t_start = time.perf_counter()
    homes = (next(model.parameters()).device, next(reference.parameters()).device)
    model.to(device)
    reference.to(device)
    was_training = model.training, reference.training
    model.eval()
    reference.eval()
    requires = {n: p.requires_grad for n, p in model.named_parameters()}
    trainable = None
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in reference.parameters():
            p.requires_grad_(False)
        trainable = _Trainable(model, config, device)
        for p in trainable.params.values():
            p.requires_grad_(True)
        report = _train(model, reference, trainable, train, val, config, device, work_dir, progress, on_step)
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(requires.get(n, False))
        model.train(was_training[0])
        reference.train(was_training[1])
        model.to(homes[0])
        reference.to(homes[1])
    report.seconds = time.perf_counter() - t_start
    return report


def _val_kl(model, trainable, val, teacher_val, device, tuned: bool) -> float:
    total = 0.0
    with torch.no_grad():
        for i in range(val.shape[0]):
            ids = val[i:i + 1].to(device)
            if tuned:
                with tuned_weights(model, trainable.tunables):
                    logits = model(ids).logits
            else:
                logits = model(ids).logits
            total += float(_kl(logits, teacher_val[i:i + 1].to(device)))
    return total / val.shape[0]


def _settings(config: FinetuneConfig, train: torch.Tensor, val: torch.Tensor, trainable: _Trainable) -> dict[str, Any]:
    h = hashlib.sha256(train.numpy().tobytes())
    h.update(val.numpy().tobytes())
    return {"config": asdict(config), "windows_sha256": h.hexdigest(), "windows_shape": [list(train.shape),
            list(val.shape)], "parameters_sha256": trainable.digest(), "torch": torch.__version__}


def _train(model, reference, trainable: _Trainable, train, val, config: FinetuneConfig, device, work_dir, progress,
           on_step) -> FinetuneReport:
    from pvq.progress import progress_bar

    groups = []
    for k, p in trainable.params.items():
        rms = float(trainable.initial[k].float().pow(2).mean().sqrt())
        groups.append({"params": [p], "lr": config.lr * (rms if rms > 0 and math.isfinite(rms) else 1.0), "name": k})
    opt = torch.optim.Adam(groups)

    with torch.no_grad():
        teacher_val = torch.cat([F.log_softmax(reference(val[i:i + 1].to(device)).logits.float(), dim=-1).to("cpu",
                                 torch.float16) for i in range(val.shape[0])])
    settings = _settings(config, train, val, trainable)
    state_dir = Path(work_dir) / STATE_DIR if work_dir is not None else None
    step, best_step, stale, history = 0, 0, 0, []
    best_values = trainable.values()
    val_before = None
    done = False
    resumed = 0
    if state_dir is not None:
        loaded = _read_state(state_dir, settings)
        if loaded is not None:
            meta, tensors = loaded
            trainable.load({k: tensors[f"current/{k}"] for k in trainable.params})
            best_values = {k: tensors[f"best/{k}"] for k in trainable.params}
            _load_adam(opt, tensors)
            step, best_step, stale, history = meta["step"], meta["best_step"], meta["stale"], meta["history"]
            val_before, best_val, done = meta["val_kl_before"], meta["best_val"], meta["done"]
            resumed = step
            log.info("fine-tuning resumes from %s at step %d", state_dir, step)
    if val_before is None:
        val_before = _val_kl(model, trainable, val, teacher_val, device, tuned=False)
        best_val = val_before
        history.append({"step": 0, "val_kl": val_before})

    n_train = train.shape[0]
    stopped_early = bool(done and step < config.steps)
    bar = progress_bar(total=config.steps, initial=step, desc="fine-tuning", unit="step", enabled=progress)
    running = []
    try:
        while not done and step < config.steps:
            ids = train[_batches(n_train, config.batch, config.seed, step)].to(device)
            with torch.no_grad():
                teacher = F.log_softmax(reference(ids).logits.float(), dim=-1)
            with tuned_weights(model, trainable.tunables):
                loss = _kl(model(ids).logits, teacher)
            del teacher
            if not torch.isfinite(loss):
                raise FinetuneError(f"fine-tuning loss became {float(loss)} at step {step + 1}; lower --finetune-lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            running.append(float(loss.detach()))
            bar.set_postfix(kl=f"{running[-1]:.4f}", best=f"{best_val:.4f}")
            bar.update(1)
            if step % config.eval_every == 0 or step == config.steps:
                val_kl = _val_kl(model, trainable, val, teacher_val, device, tuned=True)
                history.append({"step": step, "train_kl": sum(running) / len(running), "val_kl": val_kl})
                running = []
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
                        best_val=best_val, done=done))
            if on_step is not None:
                on_step(step, running[-1] if running else float(loss.detach()))
    finally:
        bar.close()

    # keep the best parameters, stored as the checkpoint holds them, and measure that model
    original = {name: layer.payload() for name, layer in trainable.layers.items()}  # the one-shot payloads
    trainable.load(best_values)
    with torch.no_grad():
        for name, layer in trainable.layers.items():
            layer.set_payload(trainable.tunables[name].payload())
    _round_dense(model)
    val_stored = _val_kl(model, trainable, val, teacher_val, device, tuned=False)
    kept = "tuned"
    if val_stored >= val_before:  # rounding to the stored dtypes (or no step at all) gained nothing
        kept = "one-shot"
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
