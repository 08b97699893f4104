"""Sweeps: a grid of methods x bit widths on one model, one JSON file per point, then a
CSV, a Markdown table and the Pareto plots (perplexity / average accuracy against the
measured bits per weight), as in the paper's figures.

What "bits" means per method (`method_config`): "bits" is the one setting a sweep varies;
every other setting is the method config's default (`pvq quantize`'s, `pvq.settings`) unless
the sweep's own option for it (--group-size, --pvq-group-size, --pvq-gain-bits,
--vq-columns) says otherwise, so a point is the checkpoint `pvq quantize` makes at that width:

* ``rtn``, ``gptq``: integer bits b (2..8) with a float16 scale and a b-bit zero point per
  group of `group_size` input columns (default 128, the methods' own): b + (16 + b) / 128,
  e.g. 3.148 at b = 3 (--group-size 64: 3.297).
* ``pvq``: D = `pvq_group_size` (default 16), shape bits = b (fractional allowed; K is the
  largest pulse count with code_bits(D, K) <= b D), 4-bit gains fitted per layer
  (``gain="empirical"``) and a float16 norm per row, Hessian-aware: code_bits / D + 4 / D +
  16 / columns, e.g. 3.25 + 0.03 at b = 3.
* ``gptvq`` (optional): 2-D vectors with b index bits per weight (2b an integer), int8
  codebooks of 2^(2b) entries over `vq_columns` columns x the fewest rows that keep the
  codebook cost at or below 0.25 bits per weight.

With fine-tuning (`finetune`, the default; `pvq sweep --fast` leaves it out) every quantized setting gives two
points from one quantization: the one-shot point ``<method>-<bits>b`` (the same as a sweep
without fine-tuning, so kept points are shared) and ``<method>-<bits>b-ft``, its
continuous parameters fine-tuned (`pvq.calibrate.finetune`); the plots draw them as two curves.

Each point starts from a fresh copy of the float model (rotated first with --rotate),
is quantized (methods without a Hessian directly from the weights, the others through
`pvq.calibrate.quantize_model` on the sweep's calibration windows, the same for every
point), and is evaluated on WikiText-2 perplexity and, if asked, zero-shot tasks. Bits
per weight are measured from the stored tensors of the quantized linears.

Resumable: a finished point is written atomically as ``<out>/points/<name>.json``
together with the settings that produced it; a rerun reuses a point whose settings are
identical and refuses one whose settings differ (`redo_changed` recomputes it instead);
a point interrupted during quantization continues from its last finished block
(``<out>/points/<name>.work``, removed once the point is written).
"""

from __future__ import annotations

from pvq.errors import PVQError

import copy
import csv
import io
import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import Any, Sequence

import torch

from pvq.eval.perplexity import default_wikitext2_test_path, perplexity_details, wikitext2_test_text
from pvq.eval.harness import TaskPlan, average_accuracy, prepare_tasks, resolve_task_names, run_tasks
from pvq.eval.tasks import default_tasks_dir
from pvq.fileio import sha256_file
from pvq.runtime import decoded_weights
from pvq.models import load_model
from pvq.oneshot import Recipe, oneshot
from pvq.calibrate import calibration_data, encode_text
from pvq.calibrate.calibration import SAMPLED
from pvq.calibrate.finetune import recorded_settings
from pvq.calibrate.workdir import atomic_write_json, atomic_write_text
from pvq.methods import QuantizationError, get_method, uses_hessian
from pvq.settings import (
    DEFAULT_MODEL,
    POSITIVE,
    EvalSettings,
    RunSettings,
    default_of,
    excerpt,
    integer,
    numbers,
    setting,
    words,
)

log = logging.getLogger(__name__)

SWEEP_METHODS = ("rtn", "gptq", "pvq", "gptvq")
#: the most bits per weight a gptvq point spends on its codebooks (about what pvq spends on its gains)
SIDE_BITS = 0.25
FLOAT_POINT = "float"


class SweepError(PVQError, ValueError):
    """Sweep settings that cannot run, or a kept point made with other settings."""


def _default(method: str, name: str) -> Any:
    return default_of(get_method(method).config_class, name)


@dataclass(kw_only=True)
class SweepOptions(RunSettings, EvalSettings):
    """A sweep: the calibration, seed, rotation and fine-tuning (`RunSettings`; finetune:
    FinetuneConfig fields, a fine-tuned point per setting) and the evaluation
    (`EvalSettings`; eval_windows None: all) of every point, and the grid. The grid's
    fixed settings default to the method configs' own (`pvq quantize`'s), so a sweep point
    is the checkpoint `pvq quantize` makes at that width. Each field is declared once,
    with the flag `pvq sweep` offers for it (`pvq.options.add_setting_options`)."""

    model: str = setting(DEFAULT_MODEL, "hub id, local directory, .gguf, or smollm2-135m")
    methods: Sequence[str] = setting(("rtn", "gptq", "pvq"), f"comma-separated: {', '.join(SWEEP_METHODS)}", words)
    bits: Sequence[float] = setting((2, 3, 4), "comma-separated bit widths", numbers)
    out: str = setting("sweep-out", "output folder (points/*.json, results.csv/.md, *.png)")
    group_size: int = setting(_default("rtn", "group_size"), "rtn/gptq: input columns per scale and zero point "
                              "(-1: one per output row)", integer)
    pvq_group_size: int = setting(_default("pvq", "group_size"), "pvq: dimension D", POSITIVE)
    pvq_gain_bits: int = setting(_default("pvq", "gain_bits"), "pvq: bits per fitted gain index", POSITIVE)
    vq_columns: int = setting(_default("gptvq", "group_columns"), "gptvq: columns per codebook block", POSITIVE)
    tasks: Sequence[str] = setting((), "zero-shot tasks per point, comma-separated or 'all'", words)
    tasks_dir: str | None = setting(None, "task data folder (default: $PVQ_TASKS_DIR or ../shared/assets/tasks)")
    limit: int | None = setting(None, "first N items of each task", POSITIVE)
    task_batch_size: int = setting(16, "sequences per forward when scoring tasks", POSITIVE)
    float_point: bool = setting(True, "leave out the float reference point", option="no_float", negate=True)
    device: str = setting("cpu", "compute device (auto: cuda if present)", option_default="auto")
    redo_changed: bool = setting(False, "recompute kept points whose settings differ (default: refuse with the "
                                 "differences)")
    progress: bool = True


@dataclass(frozen=True)
class Point:
    name: str
    method: str | None  # None: the float model
    bits: float | None
    config: dict[str, Any] = field(default_factory=dict)
    finetuned: bool = False  # the continuous parameters fine-tuned after the quantization


# ----------------------------------------------------------------------------- the grid


def _integer_bits(method: str, bits: float) -> int:
    if float(bits) != int(bits) or not 2 <= int(bits) <= 8:
        raise SweepError(f"{method}: bits must be an integer in 2..8, got {bits:g}")
    return int(bits)


def method_config(method: str, bits: float, opts: SweepOptions) -> dict[str, Any]:
    """The config fields of `method` at sweep width `bits` (see the module docstring),
    checked by building the method's config (SweepError names what is wrong)."""
    if method in ("rtn", "gptq"):
        fields: dict[str, Any] = {"bits": _integer_bits(method, bits), "group_size": opts.group_size}
    elif method == "pvq":
        fields = {"group_size": opts.pvq_group_size, "shape_bits": float(bits), "gain_bits": opts.pvq_gain_bits}
    elif method == "gptvq":
        dim = 2
        if abs(bits * dim - round(bits * dim)) > 1e-9:
            raise SweepError(f"gptvq: bits x 2 must be an integer (2-D vectors), got bits {bits:g}")
        codebook_bits = (1 << round(bits * dim)) * dim * 8 + 16  # int8 entries + float16 scale
        rows = math.ceil(codebook_bits / (SIDE_BITS * opts.vq_columns))
        fields = {"dim": dim, "bits": float(bits), "group_size": rows * opts.vq_columns,
                  "group_columns": opts.vq_columns, "seed": opts.seed}  # k-means++ seeded as `pvq quantize --seed`
    else:
        raise SweepError(f"unknown method {method!r}; a sweep takes: {', '.join(SWEEP_METHODS)}")
    try:
        config = get_method(method).config_class(**fields)
    except QuantizationError as e:
        raise SweepError(f"{method} at {bits:g} bits: {e}") from None
    return asdict(config)


def point_name(method: str, bits: float, finetuned: bool = False) -> str:
    return f"{method}-{bits:g}b" + ("-ft" if finetuned else "")


def plan_points(opts: SweepOptions) -> list[Point]:
    """The grid's points (float first when asked), each with its checked config."""
    methods = list(dict.fromkeys(opts.methods))
    if not methods:
        raise SweepError("no methods given")
    unknown = [m for m in methods if m not in SWEEP_METHODS]
    if unknown:
        raise SweepError(f"unknown method{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                         f"a sweep takes: {', '.join(SWEEP_METHODS)}")
    if not opts.bits:
        raise SweepError("no bit widths given")
    points = [Point(FLOAT_POINT, None, None)] if opts.float_point else []
    for method in methods:
        for bits in dict.fromkeys(float(b) for b in opts.bits):
            config = method_config(method, bits, opts)
            points.append(Point(point_name(method, bits), method, bits, config))
            if opts.finetune is not None:
                points.append(Point(point_name(method, bits, True), method, bits, config, finetuned=True))
    return points


def point_settings(point: Point, opts: SweepOptions, task_names: list[str]) -> dict[str, Any]:
    """Everything a point's figures depend on; a kept point is reused only if equal."""
    eval_text = Path(opts.eval_text) if opts.eval_text else default_wikitext2_test_path()
    settings: dict[str, Any] = {
        "model": opts.model,
        "method": point.method or "float",
        "config": point.config,
        "rotate": {"enabled": True, "seed": opts.rotate_seed} if opts.rotate else {"enabled": False},
        "eval": {"text": str(eval_text), "seqlen": opts.eval_seqlen, "windows": opts.eval_windows},
        "tasks": {"names": task_names, "limit": opts.limit, "scorer": "lm-eval",
                  "dir": str(opts.tasks_dir or default_tasks_dir())} if task_names else None,
    }
    if point.finetuned:
        settings["finetune"] = recorded_settings(opts.finetune)
    if point.method is not None and (uses_hessian(point.method, point.config) or point.finetuned):
        calib: dict[str, Any] = {"windows": opts.calib_windows, "seqlen": opts.calib_seqlen, "seed": opts.seed,
                                 "batch_size": opts.batch_size, "compute_dtype": opts.compute_dtype}
        if opts.calib_text and str(opts.calib_text) != SAMPLED:
            calib.update(text=str(opts.calib_text), sha256=sha256_file(opts.calib_text))
        else:
            calib["text"] = ("sampled from the model" if opts.calib_text else
                             "WikiText-2 where reachable, else sampled from the model")
        settings["calibration"] = calib
    return settings


def _diff(saved: Any, now: Any, prefix: str = "") -> list[str]:
    if isinstance(saved, dict) and isinstance(now, dict):
        out = []
        for k in sorted(set(saved) | set(now), key=str):
            out += _diff(saved.get(k), now.get(k), f"{prefix}{k}.")
        return out
    return [] if saved == now else [f"{prefix.rstrip('.')}: kept {saved!r}, now {now!r}"]


# ----------------------------------------------------------------------------- one point


class _Calibration:
    """The sweep's calibration windows, made on first use (the same for every point)."""

    def __init__(self, base_model, tokenizer, opts: SweepOptions):
        self.base_model, self.tokenizer, self.opts = base_model, tokenizer, opts
        self._windows: torch.Tensor | None = None

    def windows(self) -> torch.Tensor:
        if self._windows is None:
            o = self.opts
            # sampled from the unrotated float model, so the same with and without --rotate
            self._windows, self.source = calibration_data(self.tokenizer, o.calib_text, o.calib_windows,
                                                          o.calib_seqlen, o.seed, model=self.base_model)
        return self._windows


def run_point(point: Point, base_model, tokenizer, calibration: _Calibration, eval_ids: torch.Tensor,
              tasks: TaskPlan | None, opts: SweepOptions, work_dir: Path,
              oneshot_point: Point | None = None) -> list[dict[str, Any]]:
    """Quantize a fresh copy of the float model as `point` says and evaluate it: its row,
    then, for a fine-tuned point given its `oneshot_point`, that point's row too (the model
    before the fine-tuning of the same run)."""
    t_start = time.perf_counter()
    model = copy.deepcopy(base_model)
    shared = {f.name: getattr(opts, f.name) for f in dataclass_fields(RunSettings)}  # calibration, seed, rotation
    recipe = Recipe(**shared | {"method": point.method, "config": dict(point.config),
                                "finetune": dict(opts.finetune) if point.finetuned else None})
    result = oneshot(model, tokenizer, recipe, windows=calibration.windows() if recipe.needs_calibration() else None,
                     device=opts.device, work_dir=str(work_dir), progress=opts.progress,
                     keep_before_finetune=oneshot_point is not None)
    row: dict[str, Any] = {"point": point.name, "method": point.method or "float", "bits": point.bits}
    if point.method is None:
        row.update(bpw_nominal=16.0, bpw_measured=16.0, quant_seconds=0.0, mean_proxy_loss=None)
    else:
        q = result.quantized
        row.update(bpw_nominal=result.bits_per_weight_nominal, bpw_measured=q.measured_bits_per_weight,
                   quant_seconds=result.seconds["quantization"], mean_proxy_loss=q.mean_proxy_loss,
                   quantized_layers=len(q), finetuned=point.finetuned)
    rows = []
    if oneshot_point is not None:
        first = {**row, "point": oneshot_point.name, "finetuned": False}
        rows.append(_evaluate(result.before_finetune, first, tokenizer, eval_ids, tasks, opts, t_start))
    if result.finetune is not None:
        row.update(finetune_seconds=result.seconds["finetune"], finetune_kept=result.finetune.kept,
                   finetune_val_kl=[result.finetune.val_kl_before, result.finetune.val_kl_stored])
    model = result.model
    del result
    return [*rows, _evaluate(model, row, tokenizer, eval_ids, tasks, opts, t_start)]


def _evaluate(model, row: dict[str, Any], tokenizer, eval_ids: torch.Tensor, tasks: TaskPlan | None,
              opts: SweepOptions, t_start: float) -> dict[str, Any]:
    """`row` with the perplexity (and task scores) of `model`."""
    model.to(opts.device)
    t0 = time.perf_counter()
    with decoded_weights(model):  # many forwards: decode each quantized layer once
        ppl = perplexity_details(model, eval_ids, seqlen=opts.eval_seqlen, max_windows=opts.eval_windows,
                                 progress=opts.progress)
        row.update(ppl=ppl.ppl, eval_windows=ppl.n_windows, eval_seqlen=ppl.seqlen)
        if tasks is not None:
            scores = {name: r.to_dict() for name, r in
                      run_tasks(model, tokenizer, tasks, batch_size=opts.task_batch_size,
                                progress=opts.progress).items()}
            row.update(tasks=scores, avg_acc=average_accuracy(scores))
    row["eval_seconds"] = time.perf_counter() - t0
    row["wall_seconds"] = time.perf_counter() - t_start
    return row


# ----------------------------------------------------------------------------- the sweep


def _read_point(path: Path, point: Point | None = None) -> dict[str, Any]:
    """The kept file of `point`, checked: readable, a settings/row pair, a row with its
    figures, and a row of this very point (a file whose row names another point, or
    another method, would put that point's figures in this one's place in the table)."""
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise SweepError(f"kept point {path} cannot be read ({type(e).__name__}: {e}); delete it to recompute the "
                         "point") from None
    if not isinstance(saved, dict) or "settings" not in saved or "row" not in saved:
        raise SweepError(f"kept point {path} is not a sweep point (no settings/row); delete it to recompute it")
    row = saved["row"]
    numbers = ("bpw_nominal", "bpw_measured", "ppl")
    if not isinstance(row, dict) or not isinstance(row.get("point"), str) or any(
            isinstance(row.get(k), bool) or not isinstance(row.get(k), (int, float)) for k in numbers):
        raise SweepError(f"kept point {path} is damaged (its row lacks {', '.join(numbers)} or the point name); "
                         "delete it to recompute the point")
    method = None if point is None else point.method or "float"
    if point is not None and (row["point"] != point.name or row.get("method") != method):
        raise SweepError(f"kept point {path} holds the row of another point (point {excerpt(row['point'])}, method "
                         f"{excerpt(row.get('method'))}, not {point.name}, {method}); delete it to recompute the point")
    return saved


def run_sweep(opts: SweepOptions) -> list[dict[str, Any]]:
    """Run (or resume) the sweep; returns the rows of the grid's points in plan order and
    writes results.csv, results.md and the plots under opts.out."""
    points = plan_points(opts)
    task_names = resolve_task_names(list(opts.tasks)) if opts.tasks else []
    out = Path(opts.out)
    point_dir = out / "points"
    point_dir.mkdir(parents=True, exist_ok=True)

    rows: dict[str, dict] = {}
    pending: list[tuple[Point, dict]] = []
    for point in points:
        settings = point_settings(point, opts, task_names)
        path = point_dir / f"{point.name}.json"
        if path.is_file():
            saved = _read_point(path, point)
            if saved["settings"] == settings:
                rows[point.name] = saved["row"]
                log.info("%s: kept from %s", point.name, path)
                continue
            if not opts.redo_changed:
                diffs = "; ".join(_diff(saved["settings"], settings))
                raise SweepError(f"point {point.name} in {path} was made with different settings ({diffs}); "
                                 "use another --out, delete the file, or --redo-changed to recompute it")
        pending.append((point, settings))

    if pending:
        tasks = prepare_tasks(task_names, opts.tasks_dir, opts.limit) if task_names else None  # fail early
        eval_text = wikitext2_test_text(opts.eval_text)  # checked before the model is loaded
        try:
            base_model, tokenizer, _ = load_model(opts.model, device="cpu")
            if tokenizer is None:
                raise SweepError(f"{opts.model} has no tokenizer")
            eval_ids = encode_text(tokenizer, eval_text)
            calibration = _Calibration(base_model, tokenizer, opts)
            # a fine-tuned point whose one-shot twin is pending too gives both from one quantization
            all_settings = {p.name: s for p, s in pending}
            twins = {p.name: q for p, _ in pending for q, _ in pending
                     if p.finetuned and q.name == point_name(p.method, p.bits)}
            runs = [p for p, _ in pending if p not in twins.values()]
            for k, point in enumerate(runs, 1):
                twin = twins.get(point.name)
                names = point.name + (f" and {twin.name}" if twin is not None else "")
                print(f"[sweep {k}/{len(runs)}] {names}: running", flush=True)
                work_dir = point_dir / f"{point.name}.work"
                for row in run_point(point, base_model, tokenizer, calibration, eval_ids, tasks, opts, work_dir,
                                     oneshot_point=twin):
                    atomic_write_json(point_dir / f"{row['point']}.json",
                                      {"settings": all_settings[row["point"]], "row": row}, sort_keys=False)
                    rows[row["point"]] = row
                    print(f"[sweep {k}/{len(runs)}] {row['point']}: {format_point(row)}", flush=True)
                shutil.rmtree(work_dir, ignore_errors=True)  # its blocks are no longer needed to resume
        finally:
            if tasks is not None:
                tasks.close()

    ordered = [rows[p.name] for p in points]
    write_reports(ordered, out, title=f"{opts.model}{' (rotated)' if opts.rotate else ''}", task_names=task_names,
                  limit=opts.limit)
    return ordered


def format_point(row: dict[str, Any]) -> str:
    text = f"bpw {row['bpw_measured']:.3f}, PPL {row['ppl']:.2f}"
    if row.get("avg_acc") is not None:
        text += f", avg acc {row['avg_acc']:.4f}"
    return text


# ----------------------------------------------------------------------------- reports


def _task_columns(rows: list[dict], task_names: list[str]) -> list[tuple[str, str]]:
    cols = []
    for name in task_names:
        metrics: list[str] = []
        for r in rows:
            for m in (r.get("tasks", {}).get(name, {}).get("metrics", {})):
                if m not in metrics:
                    metrics.append(m)
        cols += [(name, m) for m in metrics]
    return cols


def results_table_rows(rows: list[dict], task_names: list[str]) -> tuple[list[str], list[list[str]]]:
    """(header, rows of strings) shared by the CSV and the Markdown table."""
    tcols = _task_columns(rows, task_names)
    header = ["point", "method", "bits", "bpw_nominal", "bpw_measured", "ppl"]
    header += [f"{t}:{m}" for t, m in tcols]
    if task_names:
        header.append("avg_acc")
    header += ["quant_seconds", "finetune_seconds", "mean_proxy_loss"]

    def num(v, fmt):
        return "" if v is None else format(v, fmt)

    table = []
    for r in rows:
        cells = [r["point"], r["method"], num(r.get("bits"), "g"), num(r["bpw_nominal"], ".4f"),
                 num(r["bpw_measured"], ".4f"), num(r["ppl"], ".4f")]
        for t, m in tcols:
            cells.append(num(r.get("tasks", {}).get(t, {}).get("metrics", {}).get(m, {}).get("value"), ".4f"))
        if task_names:
            cells.append(num(r.get("avg_acc"), ".4f"))
        cells += [num(r.get("quant_seconds"), ".1f"), num(r.get("finetune_seconds"), ".1f"),
                  num(r.get("mean_proxy_loss"), ".4g")]
        table.append(cells)
    return header, table


def write_reports(rows: list[dict], out: Path, title: str, task_names: list[str], limit: int | None = None) -> None:
    header, table = results_table_rows(rows, task_names)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(table)
    atomic_write_text(out / "results.csv", buf.getvalue())
    lines = [f"# Sweep: {title}", ""]
    windows = sorted({r["eval_windows"] for r in rows})
    seqlens = sorted({r["eval_seqlen"] for r in rows})
    lines.append(f"PPL: WikiText-2 test, {'/'.join(map(str, windows))} windows of {'/'.join(map(str, seqlens))} tokens. "
                 "bpw: bits per weight of the quantized linears as stored.")
    if task_names:
        lines.append(f"Tasks: {', '.join(task_names)}" + (f", first {limit} items each" if limit else ", all items")
                     + "; avg_acc = mean of acc_norm where reported, else acc.")
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c or "-" for c in cells) + " |" for cells in table]
    atomic_write_text(out / "results.md", "\n".join(lines) + "\n")
    plot_pareto(rows, out / "ppl_vs_bpw.png", "ppl", "WikiText-2 perplexity", title, log_y=True)
    if task_names:
        plot_pareto(rows, out / "acc_vs_bpw.png", "avg_acc", "average zero-shot accuracy", title, log_y=False)


def plot_pareto(rows: list[dict], path: Path, key: str, ylabel: str, title: str, log_y: bool) -> None:
    """One line per method of `key` against the measured bits per weight (fine-tuned
    points a dashed line of the method's colour); the float model a dashed black line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] != "float"))
    for i, method in enumerate(methods):
        for tuned in (False, True):
            pts = sorted((r["bpw_measured"], r[key]) for r in rows
                         if r["method"] == method and bool(r.get("finetuned")) == tuned and r.get(key) is not None
                         and math.isfinite(r[key]))
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], color=colors[i % len(colors)],
                        marker="s" if tuned else "o", linestyle="--" if tuned else "-",
                        label=f"{method}, fine-tuned" if tuned else method)
    for r in rows:
        if r["method"] == "float" and r.get(key) is not None:
            ax.axhline(r[key], color="k", linestyle="--", linewidth=1, label=f"float model ({r[key]:.3g})")
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("bits per weight (measured)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


__all__ = ["FLOAT_POINT", "SIDE_BITS", "SWEEP_METHODS", "Point", "SweepError", "SweepOptions",
           "method_config", "plan_points", "point_settings", "run_point", "run_sweep", "write_reports"]
