"""Per-layer bit allocation under a global budget (`--target-bpw`).

Each quantized linear l may take any setting c of its method's rate ladder
(`Method.rate_ladder`: for PVQ the shape bits in steps of 1/4, which fixes K; for
RTN/GPTQ the integer bits; for GPTVQ the index bits). Its cost b_l(c) is exact: the
stored bits of the payload spec of (c, shape), which is what the checkpoint will hold.
Its distortion e_l(c) is measured: a cheap trial quantization (`_trial_setting`) of up to
`TRIAL_ROWS` evenly spaced rows, ``e = sum_r f_r sum_j H_jj (W_rj - Q_rj)^2`` scaled to all
rows, where H_jj is the mean square of input j over the calibration tokens (one forward
pass of the float model) and f_r the mean squared gradient of the next-token loss at
output channel r (backward passes over `FISHER_WINDOWS` windows: the empirical Fisher).
So e estimates, to second order, how much the layer's error raises the loss, and layers
compare on one scale (`SENSITIVITY = "proxy"` drops f: every layer's output error alike,
which gave early blocks too few bits, docs/benchmarks.md). The allocation minimises
``sum_l e_l(c_l)`` subject to ``sum_l b_l(c_l) <= target * weights``, a multiple-choice
knapsack solved by dynamic programming over the budget (`solve_allocation`). Layers' own
settings are recorded in the checkpoint (`layer_overrides`).

The objective is a diagonal, second-order estimate, not the end loss itself: whether the
allocation beats one setting everywhere is measured (`bench/llm_quant.py`, docs/benchmarks.md), not
assumed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pvq.models.adapters import ArchitectureAdapter
from pvq.methods import QuantizationError, get_method

from pvq.calibrate import workdir as wd
from pvq.calibrate.records import PipelineError, jsonable

log = logging.getLogger(__name__)

__all__ = ["Allocation", "LayerStatistics", "allocate_bits", "check_target", "ladder_range", "layer_statistics",
           "solve_allocation", "stored_bits"]

#: How a layer's trial error is weighted: "fisher" (each output channel by its mean squared
#: gradient of the next-token loss: the error's expected loss increase, comparable across
#: layers) or "proxy" (the layer's output error alone, every layer alike).
SENSITIVITY = "fisher"
#: Rows of each layer quantized in the trial that measures its distortion curve.
TRIAL_ROWS = 128
ALLOCATION_FILE = "allocation.json"


def stored_bits(method: str, config: Any, shape: tuple[int, int]) -> int:
    """Bits the payload of a (rows, columns) layer takes with `config` (from its spec alone)."""
    return 8 * sum(s.nbytes for s in get_method(method).payload_spec(config, shape).values())


def ladder_range(method: str, config: Any) -> tuple[float, float]:
    """The nominal bits per weight of the cheapest and dearest settings of `config`'s rate
    ladder (QuantizationError when it has none)."""
    ladder = get_method(method).rate_ladder(config)
    if not ladder:
        raise QuantizationError(f"{method}: no setting to allocate from")
    nominal = []
    for c in ladder:
        try:
            nominal.append(get_method(method).nominal_bits_per_weight(c))
        except QuantizationError:  # per-row groups: their overhead depends on the width
            nominal.append(get_method(method).nominal_bits_per_weight(c, 4096))
    return min(nominal), max(nominal)


def check_target(method: str, config: Any, target_bpw: Any) -> None:
    """QuantizationError unless `target_bpw` is a finite number inside the method's ladder range."""
    from pvq.methods.base import is_number

    if not is_number(target_bpw) or not math.isfinite(target_bpw) or target_bpw <= 0:
        raise QuantizationError(f"target_bpw must be a positive number of bits per weight, got {target_bpw!r}")
    lo, hi = ladder_range(method, config)
    if not lo <= target_bpw <= hi + 1:
        raise QuantizationError(f"target_bpw {target_bpw} is outside what {method}'s settings reach "
                                f"(about {lo:.3g} to {hi:.3g} bits per weight)")


@dataclass
class Allocation:
    method: str
    target_bpw: float
    configs: dict[str, Any]  # layer -> its config
    bits: dict[str, int]  # layer -> stored bits of its payload
    weights: dict[str, int]  # layer -> rows x columns
    distortion: dict[str, float]  # layer -> measured trial distortion at its setting
    field: str  # the config field the ladder varies
    seconds: float = 0.0

    @property
    def bits_per_weight(self) -> float:
        return sum(self.bits.values()) / sum(self.weights.values())

    def histogram(self) -> dict[str, int]:
        """How many layers took each value of the varied field."""
        counts: dict[str, int] = {}
        for c in self.configs.values():
            key = f"{getattr(c, self.field):g}"
            counts[key] = counts.get(key, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: float(kv[0])))

    def describe(self) -> str:
        spread = ", ".join(f"{k}: {v}" for k, v in self.histogram().items())
        return (f"target {self.target_bpw:g} bits/weight, allocated {self.bits_per_weight:.4f} "
                f"({len(self.configs)} layers by {self.field}: {spread})")

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "target_bpw": self.target_bpw, "field": self.field,
                "bits_per_weight": self.bits_per_weight, "histogram": self.histogram(), "seconds": self.seconds,
                "layers": {n: {self.field: getattr(c, self.field), "bits": self.bits[n],
                               "distortion": self.distortion[n]} for n, c in self.configs.items()}}


#: Units the budget is cut into for the dynamic program (each layer's cost rounded up to one).
BUDGET_UNITS = 100_000


def solve_allocation(costs: dict[str, list[int]], distortions: dict[str, list[float]], budget: int) -> dict[str, int]:
    """{layer: index into its ladder} minimising the summed distortion with the summed cost
    within `budget`: the multiple-choice knapsack solved by dynamic programming over the
    budget cut into BUDGET_UNITS units (costs rounded up, so the choice always fits), then
    the bits the rounding left spent greedily on the upgrades with the largest distortion
    drop per bit. PipelineError when even the cheapest settings exceed the budget."""
    import numpy as np

    names = sorted(costs)
    cheapest = sum(min(costs[n]) for n in names)
    if cheapest > budget:
        raise PipelineError(f"the budget ({budget} bits) is below the cheapest setting of every layer ({cheapest} bits)")
    U = BUDGET_UNITS
    unit = budget / U
    dp = np.zeros(U + 1)  # least distortion of the layers so far within b units
    picks = []
    for n in names:
        new = np.full(U + 1, np.inf)
        pick = np.zeros(U + 1, dtype=np.int16)
        for k, (c, d) in enumerate(zip(costs[n], distortions[n])):
            u = int(math.ceil(c / unit - 1e-9))
            if u > U or not math.isfinite(d):
                continue
            cand = np.full(U + 1, np.inf)
            cand[u:] = dp[: U + 1 - u] + d
            better = cand < new
            new[better], pick[better] = cand[better], k
        dp = new
        picks.append(pick)
    if not math.isfinite(dp[U]):  # rounding up made the cheapest settings miss: take them
        best = {n: min(range(len(costs[n])), key=lambda k: costs[n][k]) for n in names}
    else:
        best, b = {}, U
        for n, pick in zip(reversed(names), reversed(picks)):
            k = int(pick[b])
            best[n] = k
            b -= int(math.ceil(costs[n][k] / unit - 1e-9))
    spent = sum(costs[n][best[n]] for n in names)
    while True:  # spend what the rounding left
        move, gain = None, 0.0
        for n in names:
            k = best[n]
            for j in range(len(costs[n])):
                extra = costs[n][j] - costs[n][k]
                drop = distortions[n][k] - distortions[n][j]
                if extra > 0 and drop > 0 and spent + extra <= budget and drop / extra > gain:
                    move, gain = (n, j, extra), drop / extra
        if move is None:
            break
        n, j, extra = move
        best[n] = j
        spent += extra
    return best


#: Calibration windows (at most) whose next-token loss is backpropagated for the output sensitivities.
FISHER_WINDOWS = 16


@dataclass
class LayerStatistics:
    """Per quantized linear: ``inputs[j]`` = mean over tokens of x_j^2 (the diagonal of its
    input Hessian, per token) and ``outputs[o]`` = mean over tokens of (dL/dy_o)^2 (the
    empirical Fisher of its output channels under the model's next-token loss)."""

    inputs: dict[str, torch.Tensor]
    outputs: dict[str, torch.Tensor]


def layer_statistics(model: nn.Module, adapter: ArchitectureAdapter, windows: torch.Tensor, *, device="cpu",
                     batch_size: int = 8, compute_dtype: torch.dtype = torch.float32,
                     progress: bool = True) -> LayerStatistics:
    """`LayerStatistics` of every quantized linear from the (float) model: input moments over
    all `windows`, output-gradient moments from the next-token loss of the first
    FISHER_WINDOWS of them (one window per backward pass)."""
    from pvq.progress import progress_bar

    names = adapter.quantized_layer_names(model)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {n: 0 for n in names}
    gsums: dict[str, torch.Tensor] = {}
    gcounts: dict[str, int] = {n: 0 for n in names}
    collect_inputs = [True]
    hooks = []

    def pre_hook_for(name):
        def hook(module, args):
            if collect_inputs[0]:
                x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
                sums[name] = sums.get(name, 0) + (x * x).sum(dim=0).cpu()
                counts[name] += x.shape[0]
        return hook

    def out_hook_for(name):
        def hook(module, args, out):
            if out.requires_grad:
                def grad_hook(g):
                    g = g.detach().reshape(-1, g.shape[-1]).double()
                    gsums[name] = gsums.get(name, 0) + (g * g).sum(dim=0).cpu()
                    gcounts[name] += g.shape[0]
                out.register_hook(grad_hook)
        return hook

    for name in names:
        module = model.get_submodule(name)
        hooks.append(module.register_forward_pre_hook(pre_hook_for(name)))
        hooks.append(module.register_forward_hook(out_hook_for(name)))
    home = next(model.parameters()).device
    dtypes = {p.dtype for p in model.parameters()}
    was_training = model.training
    embedding = model.get_input_embeddings().weight
    requires = embedding.requires_grad
    model.eval()
    try:
        model.to(device=device, dtype=compute_dtype) if dtypes != {compute_dtype} else model.to(device)
        with torch.no_grad():
            batches = range(0, windows.shape[0], batch_size)
            for start in progress_bar(batches, desc="allocation: input statistics", unit="batch", enabled=progress):
                model(windows[start:start + batch_size].to(device))
        collect_inputs[0] = False
        embedding.requires_grad_(True)  # the graph reaches every layer's output
        n = min(FISHER_WINDOWS, windows.shape[0])
        for i in progress_bar(range(n), desc="allocation: output sensitivities", unit="window", enabled=progress):
            ids = windows[i:i + 1].to(device)
            logits = model(ids).logits[:, :-1].float()
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                     reduction="sum")
            loss.backward()
            embedding.grad = None
    finally:
        embedding.requires_grad_(requires)
        for h in hooks:
            h.remove()
        model.train(was_training)
        if dtypes != {compute_dtype} and len(dtypes) == 1:
            model.to(device=home, dtype=next(iter(dtypes)))
        else:
            model.to(home)
    inputs, outputs = {}, {}
    for name in names:
        module = model.get_submodule(name)
        # a layer no token reached (an expert never chosen): every column / channel alike
        inputs[name] = sums[name] / counts[name] if counts[name] else torch.ones(module.in_features, dtype=torch.float64)
        outputs[name] = (gsums[name] / gcounts[name] if gcounts[name]
                         else torch.ones(module.out_features, dtype=torch.float64))
    return LayerStatistics(inputs, outputs)


def _trial_setting(method: str, config: Any) -> tuple[Any, Any]:
    """(method object, config) of the cheap trial quantization standing in for `config`:
    under a diagonal Hessian GPTQ has no error feedback, so its trial is RTN at the same
    bits and group size; PVQ's is PVQ without the Hessian (least-squares gains); GPTVQ's
    is GPTVQ itself under the diagonal Hessian."""
    if method == "gptq":
        return get_method("rtn"), get_method("rtn").make_config({"bits": config.bits, "group_size": config.group_size})
    if any(f.name == "use_hessian" for f in dataclasses.fields(config)):
        return get_method(method), dataclasses.replace(config, use_hessian=False)
    return get_method(method), config


def _trial_distortions(method: str, ladder: list[Any], weight: torch.Tensor, diag: torch.Tensor,
                       row_weights: torch.Tensor | None = None) -> list[float]:
    """Measured distortion of each ladder setting on up to TRIAL_ROWS evenly spaced rows (see
    the module docstring), each row's error weighted by `row_weights` (None: alike)."""
    R = weight.shape[0]
    rows = torch.linspace(0, R - 1, min(R, TRIAL_ROWS)).round().long().unique()
    W = weight.detach().to("cpu", torch.float32)[rows].contiguous()
    d = diag.to(torch.float64)
    f = torch.ones(len(rows), dtype=torch.float64) if row_weights is None else row_weights.to(torch.float64)[rows]
    scale = float(row_weights.to(torch.float64).sum() / f.sum()) if row_weights is not None else R / len(rows)
    H = torch.diag(d).to(torch.float32)
    out = []
    for c in ladder:
        try:
            method_obj, c = _trial_setting(method, c)
            qt = method_obj.quantize(W, H if method_obj.needs_hessian(c) else None, c)
        except QuantizationError:
            out.append(math.inf)
            continue
        Q = torch.as_tensor(method_obj.dequantize(qt)).to(torch.float64)
        err = ((W.double() - Q) ** 2 * d[None, :]).sum(dim=1)
        out.append(float((err * f).sum()) * scale)
    return out


def allocate_bits(model: nn.Module, adapter: ArchitectureAdapter, windows: torch.Tensor, method: str, config: Any,
                  target_bpw: float, *, device="cpu", batch_size: int = 8, compute_dtype: torch.dtype = torch.float32,
                  work_dir: str | Path | None = None, progress: bool = True) -> Allocation:
    """Choose every quantized linear's setting from `config`'s rate ladder so that the stored
    bits per weight over all of them meet `target_bpw` (see the module docstring). With a
    work directory the result is kept there and reused by a rerun on the same model,
    windows and settings."""
    import time

    from pvq.progress import progress_bar

    t0 = time.perf_counter()
    method_obj = get_method(method)
    config = method_obj.make_config(config)
    check_target(method, config, target_bpw)
    ladder = method_obj.rate_ladder(config)
    varied = [f.name for f in dataclasses.fields(config)
              if len({json.dumps(jsonable(getattr(c, f.name))) for c in ladder}) > 1]
    field_name = varied[0] if varied else "bits"
    names = adapter.quantized_layer_names(model)
    shapes = {n: (model.get_submodule(n).out_features, model.get_submodule(n).in_features) for n in names}

    key = None
    cache = Path(work_dir) / ALLOCATION_FILE if work_dir is not None else None
    if cache is not None:
        h = hashlib.sha256(json.dumps({"method": method, "config": jsonable(config), "target": float(target_bpw),
                                       "trial_rows": TRIAL_ROWS, "windows": wd.windows_digest(windows),
                                       "sensitivity": SENSITIVITY, "fisher_windows": FISHER_WINDOWS,
                                       "batch_size": batch_size, "dtype": str(compute_dtype)}, sort_keys=True).encode())
        h.update(wd.module_digest(model).encode())
        key = h.hexdigest()
        if cache.is_file():
            try:
                saved = json.loads(cache.read_text())
                if saved.get("key") == key:
                    configs = {n: method_obj.make_config(saved["configs"][n]) for n in names}
                    alloc = Allocation(method, float(target_bpw), configs,
                                       {n: stored_bits(method, configs[n], shapes[n]) for n in names},
                                       {n: shapes[n][0] * shapes[n][1] for n in names},
                                       {n: float(saved["distortion"][n]) for n in names}, field_name,
                                       seconds=float(saved.get("seconds", 0.0)))
                    log.info("bit allocation reused from %s", cache)
                    return alloc
            except (OSError, ValueError, KeyError, QuantizationError) as e:
                log.warning("%s unreadable (%s); allocating afresh", cache, e)

    stats = layer_statistics(model, adapter, windows, device=device, batch_size=batch_size,
                             compute_dtype=compute_dtype, progress=progress)
    costs, distortions = {}, {}
    for name in progress_bar(names, desc="allocation: trial quantizations", unit="layer", enabled=progress):
        weight = model.get_submodule(name).weight
        costs[name] = []
        for c in ladder:
            try:
                costs[name].append(stored_bits(method, c, shapes[name]))
            except QuantizationError:
                costs[name].append(2**62)  # a setting this shape cannot take
        distortions[name] = _trial_distortions(method, ladder, weight, stats.inputs[name],
                                               stats.outputs[name] if SENSITIVITY == "fisher" else None)
    weights = {n: shapes[n][0] * shapes[n][1] for n in names}
    budget = int(math.floor(float(target_bpw) * sum(weights.values())))
    choice = solve_allocation(costs, distortions, budget)
    configs = {n: ladder[choice[n]] for n in names}
    alloc = Allocation(method, float(target_bpw), configs, {n: costs[n][choice[n]] for n in names}, weights,
                       {n: distortions[n][choice[n]] for n in names}, field_name,
                       seconds=time.perf_counter() - t0)
    log.info("bit allocation: %s", alloc.describe())
    if cache is not None:
        wd.claim(Path(work_dir))
        wd.atomic_write_json(cache, {"key": key, "configs": {n: jsonable(c) for n, c in configs.items()},
                                     "distortion": alloc.distortion, "seconds": alloc.seconds})
    return alloc
