"""Weight (and activation) quantization of the benchmark model: RTN, GPTQ, GPTVQ and PVQ, one table.

Run:  python bench/llm_quant.py [--rows ROW ...] [--full] [--out bench-out/llm_quant]
      python bench/llm_quant.py --study rotation     # the issue-4 rows only (see below)

Protocol (issue 3): calibration = 128 random windows of 512 tokens from the tokenized
WikiText-2 validation text (seed 0, the same windows for every method); perplexity on the
WikiText-2 raw test text joined by blank lines, first 40 non-overlapping windows of 512
tokens ("quick"; `--full` adds all windows of 2048; `--concat` adds the same windows of the
rows concatenated as they are, "".join(rows), the text on which the issue's reference
figures were measured: the float model gives 28.74 there, 29.19 on ours). Each row
starts from a fresh copy of the float model. Rows whose method does not use a Hessian (RTN, PVQ without Hessian) are
quantized directly from the weights (no calibration forwards, so no proxy loss).

Resumable: every finished row is kept as JSON under --out and skipped on a rerun; a
row interrupted mid-way resumes from its last finished block (pipeline work dir; rows
that differ only in their activation quantization share one).
Bits per weight are measured from the stored tensors of all quantized linears.

Rotation and activations (issue 4, the paper's Table 3 layout). A row may carry
``rotate`` (the fused randomized-Hadamard rotation of `pvq.rotation`, seed 0, applied to
the row's copy of the float model before calibration) and ``act`` (an
`ActQuantConfig`: **simulated (fake) quantization** of the input of every quantized
linear, per token, installed after the weights are quantized, so the weights are
calibrated with float activations as in QuaRot; the head and the KV cache stay float).
Rows of `--study rotation`:

* weight-only at ~3.25 bits per weight, each with and without rotation: RTN and GPTQ
  3-bit with a scale per 64 (3.30 bpw with the zero point), PVQ D=16 with 3-bit shapes
  and 4-bit fitted gains (3.25 + row norms); (rows for GPTQ with act-order and PVQ with
  Beta gains, rotated, exist too: `--rows gptq-3b-g64-act-rot pvq-d16-s3-beta4-rot`);
* weights and activations at ~4.1 bits each, all rotated: weights RTN / GPTQ 4-bit with
  a scale and zero point per 192 (4.10 bpw) or PVQ D=16, 3.875-bit shapes, 4-bit fitted
  gains (4.125 bpw); activations RTN 4-bit symmetric with a float16 scale per 192 values
  (clip ratio 0.9, QuaRot's) or PVQ D=192 with 4-bit shapes and a float16 gain: both
  4.083 bits per value, equal bits. (The paper's groups of 128 do not divide the
  benchmark model's hidden size 576; 192 divides 576 and 1536.) Two rows with float
  weights isolate the activations.

Smoke tests: `--eval-windows N` evaluates on the first N windows only, `--smoke-layers N`
keeps only the first N decoder blocks of the model (PPL then means nothing; the path is
exercised end to end on the real weights and shapes). Rows run with either are kept
apart from protocol rows (they enter the row's settings); use another --out anyway.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import sys
from pathlib import Path

import torch

from pvq.eval.perplexity import next_token_agreement, perplexity_details, wikitext2_test_rows
from pvq.runtime import decoded_weights
from pvq.models import adapter_for, load_model
from pvq.oneshot import Recipe, oneshot
from pvq.calibrate import encode_text, windows_from_ids
from pvq.calibrate.allocation import ladder_range
from pvq.methods import get_method
from pvq.activations import ActQuantConfig, ActQuantizer

SHARED = Path(__file__).resolve().parents[2] / "shared" / "assets" / "wikitext-2"

# name -> (method, config fields) or (method, config fields, extras); None = the float model.
# method None with extras: float weights (extras: {"rotate": bool, "act": ActQuantConfig fields}).
ROWS: dict[str, tuple | None] = {"float": None}
for _bits in (2, 3, 4):
    for _gs, _tag in ((64, "g64"), (-1, "pc")):
        ROWS[f"rtn-{_bits}b-{_tag}"] = ("rtn", {"bits": _bits, "group_size": _gs})
        ROWS[f"gptq-{_bits}b-{_tag}"] = ("gptq", {"bits": _bits, "group_size": _gs})
    ROWS[f"gptq-{_bits}b-g64-act"] = ("gptq", {"bits": _bits, "group_size": 64, "act_order": True})
ROWS.update({
    "pvq-d64-s3-fp16": ("pvq", {"group_size": 64, "shape_bits": 3.0, "gain": "fp16"}),
    "pvq-d16-s3-beta4": ("pvq", {"group_size": 16, "shape_bits": 3.0, "gain": "beta", "gain_bits": 4}),
    "pvq-d16-s3-beta4-nohessian": ("pvq", {"group_size": 16, "shape_bits": 3.0, "gain": "beta", "gain_bits": 4,
                                           "use_hessian": False}),
    "pvq-d16-s3-emp4": ("pvq", {"group_size": 16, "shape_bits": 3.0, "gain": "empirical", "gain_bits": 4}),
    "pvq-d16-s3-emp4-nohessian": ("pvq", {"group_size": 16, "shape_bits": 3.0, "gain": "empirical", "gain_bits": 4,
                                          "use_hessian": False}),
    "pvq-d16-s3-emp4-noact": ("pvq", {"group_size": 16, "shape_bits": 3.0, "gain": "empirical", "gain_bits": 4,
                                      "act_order": False}),
    "pvq-d32-s3.125-emp4": ("pvq", {"group_size": 32, "shape_bits": 3.125, "gain": "empirical", "gain_bits": 4}),
    "pvq-d32-s2.375-emp4": ("pvq", {"group_size": 32, "shape_bits": 2.375, "gain": "empirical", "gain_bits": 4}),
    # matching GPTVQ's ~2.25 and ~4.25 bits per weight (issue 5)
    "pvq-d32-s2.125-emp4": ("pvq", {"group_size": 32, "shape_bits": 2.125, "gain": "empirical", "gain_bits": 4}),
    "pvq-d32-s4.125-emp4": ("pvq", {"group_size": 32, "shape_bits": 4.125, "gain": "empirical", "gain_bits": 4}),
    "pvq-d16-s2.25-emp4": ("pvq", {"group_size": 16, "shape_bits": 2.25, "gain": "empirical", "gain_bits": 4}),
    "pvq-d64-s2.25-fp16": ("pvq", {"group_size": 64, "shape_bits": 2.25, "gain": "fp16"}),
    "pvq-d16-s2.25-beta4": ("pvq", {"group_size": 16, "shape_bits": 2.25, "gain": "beta", "gain_bits": 4}),
})
# GPTVQ, 2-D vectors, b index bits per weight; codebooks of 192 columns (divides 576 and 1536)
# x rows_per_group rows (6 / 24 / 96 divide 192, 576 and 1536), 8-bit entries + a float16
# scale each: 2.236, 3.226 and 4.223 bits per weight with the codebooks.
for _bits, _rows in ((2, 6), (3, 24), (4, 96)):
    ROWS[f"gptvq-d2-b{_bits}"] = ("gptvq", {"dim": 2, "bits": float(_bits), "group_size": 192 * _rows,
                                            "group_columns": 192})
# the same settings after the fused Hadamard rotation (issue 4; more rotated rows below)
for _name in ("rtn-3b-g64", "gptq-3b-g64", "gptq-3b-g64-act", "pvq-d64-s3-fp16", "pvq-d16-s3-beta4", "pvq-d16-s3-emp4",
              "pvq-d32-s3.125-emp4", "pvq-d16-s3-beta4-nohessian", "pvq-d32-s2.375-emp4", "pvq-d16-s2.25-beta4"):
    ROWS[f"{_name}-rot"] = (*ROWS[_name], {"rotate": True})

# ---- issue 4: rotation, and weights + activations (simulated activation quantization)
ROT = {"rotate": True}
A_RTN = {"method": "rtn", "bits": 4, "group_size": 192, "clip_ratio": 0.9}  # 4 + 16/192 = 4.083 bits/value
A_PVQ = {"method": "pvq", "bits": 4.0, "group_size": 192, "gain": "fp16"}  # (768 + 16)/192 = 4.083 bits/value
W_PVQ_4 = {"group_size": 16, "shape_bits": 3.875, "gain": "empirical", "gain_bits": 4}  # 4.125 bpw
ROTATION_STUDY = [
    "float", "float-rot",
    "rtn-3b-g64", "rtn-3b-g64-rot", "gptq-3b-g64", "gptq-3b-g64-rot", "pvq-d16-s3-emp4", "pvq-d16-s3-emp4-rot",
    "a4-rtn-rot", "a4-pvq-rot",
    "w4a4-rtn-rtn-rot", "w4a4-gptq-rtn-rot", "w4a4-pvq-rtn-rot", "w4a4-pvq-pvq-rot",
]
ROWS.update({
    "float-rot": (None, {}, ROT),
    "a4-rtn-rot": (None, {}, {**ROT, "act": A_RTN}),
    "a4-pvq-rot": (None, {}, {**ROT, "act": A_PVQ}),
    "w4a4-rtn-rtn-rot": ("rtn", {"bits": 4, "group_size": 192}, {**ROT, "act": A_RTN}),
    "w4a4-gptq-rtn-rot": ("gptq", {"bits": 4, "group_size": 192, "act_order": True}, {**ROT, "act": A_RTN}),
    "w4a4-pvq-rtn-rot": ("pvq", W_PVQ_4, {**ROT, "act": A_RTN}),
    "w4a4-pvq-pvq-rot": ("pvq", W_PVQ_4, {**ROT, "act": A_PVQ}),
})
# ---- issue 15: fine-tuning of the continuous parameters (extras "finetune": FinetuneConfig fields)
# and the per-layer bit allocation (extras "target_bpw": the base setting's nominal bits per
# weight, so the allocated row spends at most what the uniform one does)
# ~3.25, ~2.25, ~2.5 and ~4.25 bits per weight
QUALITY_BASES = ["pvq-d16-s3-emp4", "gptq-3b-g64", "gptvq-d2-b3", "pvq-d32-s2.125-emp4", "gptq-2b-g64", "gptvq-d2-b2",
                 "pvq-d16-s2.25-emp4", "pvq-d32-s4.125-emp4", "gptq-4b-g64", "gptvq-d2-b4"]
QUALITY_STUDY = []


def nominal_bpw(name: str) -> float:
    """The bits per weight a ROWS entry's setting promises at the model's width (576)."""
    method, fields = ROWS[name][:2]
    return get_method(method).nominal_bits_per_weight(get_method(method).make_config(fields), 576)


#: the share of each layer's code groups a code update may move in the "-ftc" rows
CODE_FRACTION = 0.002
for _name in QUALITY_BASES:
    _method, _fields = ROWS[_name][:2]
    ROWS[f"{_name}-ft"] = (_method, _fields, {"finetune": {}})
    # codes that learn: the same fine-tuning with code updates (issue 30)
    ROWS[f"{_name}-ftc"] = (_method, _fields, {"finetune": {"code_fraction": CODE_FRACTION}})
    QUALITY_STUDY += [_name, f"{_name}-ft", f"{_name}-ftc"]
    # a setting at the bottom of its method's ladder (GPTQ's 2 bits) leaves the allocation
    # nothing to choose under its own budget: no allocated rows
    if nominal_bpw(_name) <= ladder_range(_method, get_method(_method).make_config(_fields))[0]:
        continue
    _target = round(nominal_bpw(_name), 4)
    ROWS[f"{_name}-alloc"] = (_method, _fields, {"target_bpw": _target})
    ROWS[f"{_name}-alloc-ft"] = (_method, _fields, {"target_bpw": _target, "finetune": {}})
    QUALITY_STUDY += [f"{_name}-alloc", f"{_name}-alloc-ft"]
# GPTQ and GPTVQ have no uniform setting at ~2.5 bpw (integer bits; GPTVQ's next index width
# costs ~2.7 with 6-row codebooks): the allocation reaches it by mixing layers' bits, under the
# budget the ~2.5 PVQ row spends (GPTVQ from the 24-row codebooks of its 3-bit row, whose
# 2-bit setting costs 2.06)
_TARGET_2_5 = round(nominal_bpw("pvq-d16-s2.25-emp4"), 4)
for _name, _base in (("gptq-g64-alloc-2.5", "gptq-3b-g64"), ("gptvq-d2-alloc-2.5", "gptvq-d2-b3")):
    ROWS[_name] = (*ROWS[_base][:2], {"target_bpw": _TARGET_2_5})
    ROWS[f"{_name}-ft"] = (*ROWS[_base][:2], {"target_bpw": _TARGET_2_5, "finetune": {}})
    QUALITY_STUDY += [_name, f"{_name}-ft"]
# Beta gains with escapes (2 exact gains per row for groups beyond the top level) at the
# bits of the 3-bit rows, and the embedding + tied head stored at 8 / 6 bits (extras "embeddings")
EMB8, EMB6 = {"bits": 8, "group_size": 64}, {"bits": 6, "group_size": 64}
ROWS.update({
    "pvq-d16-s2.94-beta4-esc2": ("pvq", {"group_size": 16, "shape_bits": 2.9375, "gain": "beta", "gain_bits": 4,
                                         "gain_escapes": 2}),
    "pvq-d16-s2.94-emp4-esc2": ("pvq", {"group_size": 16, "shape_bits": 2.9375, "gain": "empirical", "gain_bits": 4,
                                        "gain_escapes": 2}),
    "pvq-d16-s3-emp4-emb8": (*ROWS["pvq-d16-s3-emp4"], {"embeddings": EMB8}),
    "pvq-d16-s3-emp4-ft-emb8": (*ROWS["pvq-d16-s3-emp4"], {"finetune": {}, "embeddings": EMB8}),
    "pvq-d16-s3-emp4-ft-emb6": (*ROWS["pvq-d16-s3-emp4"], {"finetune": {}, "embeddings": EMB6}),
    # GPTVQ at ~4.25 bpw lost held-out KL at the default learning rate (the one-shot model was
    # kept): the same fine-tuning at a quarter of it
    "gptvq-d2-b4-ft-lr5e-4": (*ROWS["gptvq-d2-b4"], {"finetune": {"lr": 5e-4}}),
    # the fused rotation before PVQ, then fine-tuning
    "pvq-d16-s3-emp4-rot-ft": (*ROWS["pvq-d16-s3-emp4"], {"rotate": True, "finetune": {}}),
})
QUALITY_STUDY += ["gptvq-d2-b4-ft-lr5e-4", "pvq-d16-s3-beta4", "pvq-d16-s2.94-beta4-esc2", "pvq-d16-s2.94-emp4-esc2", "pvq-d16-s3-emp4-emb8",
                  "pvq-d16-s3-emp4-ft-emb8", "pvq-d16-s3-emp4-ft-emb6", "pvq-d16-s3-emp4-rot",
                  "pvq-d16-s3-emp4-rot-ft"]
STUDIES = {"rotation": ROTATION_STUDY, "quality": ["float", *QUALITY_STUDY]}


def row_spec(spec) -> tuple[str | None, dict, dict]:
    """(method or None for float weights, config fields, extras) of a ROWS entry."""
    if spec is None:
        return None, {}, {}
    method, fields, *rest = spec
    return method, fields, (rest[0] if rest else {})


def weights_work_dir(name: str) -> str:
    """The pipeline work directory of a row. Activation quantization is installed after the
    weights are quantized, so rows that differ only in their activations share one: the
    first row (in ROWS order) with the same weights names it."""
    method, fields, extras = row_spec(ROWS[name])
    weights = (method, fields, bool(extras.get("rotate")), extras.get("target_bpw"))
    for other, spec in ROWS.items():
        m, f, e = row_spec(spec)
        if (m, f, bool(e.get("rotate")), e.get("target_bpw")) == weights:
            return f"{other}.work"
    return f"{name}.work"


def run_row(name, spec, base_model, tokenizer, windows, eval_ids, args, out_dir: Path, kept: dict | None = None) -> dict:
    """Quantize and evaluate one row. With `kept` (the row's saved JSON), only the
    evaluations it lacks are run; its quantization is then rebuilt (for calibrated rows from
    the finished work directory, which takes seconds) and its saved figures are kept."""
    model = copy.deepcopy(base_model)
    row: dict = {"row": name}
    method_name, fields, extras = row_spec(spec)
    recipe = Recipe(method=method_name, config=dict(fields), rotate=bool(extras.get("rotate")), act=extras.get("act"),
                    compute_dtype=args.compute_dtype, batch_size=args.batch_size, calib_windows=args.calib_windows,
                    calib_seqlen=args.calib_seqlen, finetune=_finetune(extras.get("finetune"), args),
                    target_bpw=extras.get("target_bpw"), embeddings=extras.get("embeddings"))
    result = oneshot(model, tokenizer, recipe, windows=windows if recipe.needs_calibration() else None,
                     work_dir=str(out_dir / weights_work_dir(name)), progress=True)
    if recipe.rotate:
        row.update(rotate=True, rotate_seconds=result.seconds["rotation"])
    if method_name is not None:
        method = get_method(method_name)
        q = result.quantized
        if q.mean_proxy_loss is not None:
            row["mean_proxy_loss"] = q.mean_proxy_loss
        row["quant_seconds"] = result.seconds["quantization"] + result.seconds["allocation"]
        row["whole_model_bits_per_parameter"] = whole_model_bits_per_parameter(model, base_model)
        if result.embeddings is not None:
            row["embeddings"] = result.embeddings["config"]
        if result.allocation is not None:
            row.update(target_bpw=recipe.target_bpw, allocation=result.allocation.histogram(),
                       allocation_seconds=result.seconds["allocation"])
        if result.finetune is not None:
            ft = result.finetune
            row.update(finetune=ft.describe(), finetune_seconds=result.seconds["finetune"], finetune_steps=ft.steps,
                       finetune_kept=ft.kept, finetune_val_kl=[ft.val_kl_before, ft.val_kl_stored],
                       finetune_history=ft.history)
        row.update(method=method_name, config=fields, bpw_measured=q.measured_bits_per_weight,
                   bpw_nominal=method.nominal_bits_per_weight(recipe.method_config(), base_model.config.hidden_size))
    if result.act_record is not None:
        act = ActQuantConfig(**extras["act"])
        record = result.act_record
        widths = [model.get_submodule(n).in_features for n in record["layers"]]
        per_width = {int(w): v for w, v in record["bits_per_value"].items()}
        row.update(act=act.to_dict(), act_simulated=True, act_describe=act.describe(),
                   bits_per_activation=sum(per_width[w] * w for w in widths) / sum(widths))
    if kept is not None:
        row = {**row, **kept}
    with decoded_weights(model):  # many forwards: decode each quantized layer once
        _evaluate_row(row, model, eval_ids, args)
        if "kl_vs_float" not in row and method_name is not None:
            agreement = next_token_agreement(base_model, model, eval_ids["blank-lines"][: 8 * 512], seqlen=512,
                                             progress=False)
            row.update(kl_vs_float=agreement["kl"], top1_agreement=agreement["top1_agreement"])
    row["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return row


def _finetune(fields: dict | None, args) -> dict | None:
    """A row's fine-tuning settings with --finetune-precision applied."""
    if fields is None or args.finetune_precision is None:
        return fields
    return {**fields, "precision": args.finetune_precision}


def whole_model_bits_per_parameter(model, float_model) -> float:
    """Every stored byte per parameter of the float model: packed payloads plus the dense
    tensors at 16 bits (tied ones once), as the checkpoint holds them."""
    from pvq.runtime import QuantizedLinear
    from pvq.runtime.embedding import QuantizedEmbedding

    payload = sum(m.stored_bytes for m in model.modules() if isinstance(m, (QuantizedLinear, QuantizedEmbedding)))
    seen, dense = set(), 0
    for name, t in model.state_dict().items():
        if t.is_floating_point() and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            dense += t.numel() * 2
    params = sum(p.numel() for p in {p.data_ptr(): p for p in float_model.parameters()}.values())
    return (payload + dense) * 8 / params


def _evaluate_row(row: dict, model, eval_ids, args) -> None:
    if "ppl_quick" not in row:
        quick = perplexity_details(model, eval_ids["blank-lines"], seqlen=512, max_windows=args.eval_windows, progress=False)
        row["ppl_quick"] = quick.ppl
        row["eval_windows"] = quick.n_windows
        quantizers = [m for m in model.modules() if isinstance(m, ActQuantizer)]
        if quantizers:
            row["act_quant_seconds"] = sum(m.seconds for m in quantizers)
            row["ppl_seconds"] = quick.seconds
    if args.concat and "ppl_quick_concat" not in row:
        row["ppl_quick_concat"] = perplexity_details(model, eval_ids["concat"], seqlen=512, max_windows=args.eval_windows,
                                                     progress=False).ppl
    if args.full and "ppl_full" not in row:
        row["ppl_full"] = perplexity_details(model, eval_ids["blank-lines"], seqlen=2048, progress=False).ppl


def print_table(results: dict[str, dict]) -> None:
    base = results.get("float", {}).get("ppl_quick")
    gptq_time = {name: r["quant_seconds"] for name, r in results.items() if r.get("method") == "gptq"}
    windows = sorted({r.get("eval_windows", 40) for r in results.values()})
    print(f"\n| row | method | rotated | activations (simulated) | bpw nominal | bpw measured | bits/activation "
          f"| PPL quick ({'/'.join(map(str, windows))}x512) | vs float | PPL quick, \"\".join | PPL full (2048) "
          f"| quant time s | mean proxy loss |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in ROWS:
        r = results.get(name)
        if r is None:
            continue
        full = f"{r['ppl_full']:.2f}" if "ppl_full" in r else "-"
        concat = f"{r['ppl_quick_concat']:.2f}" if "ppl_quick_concat" in r else "-"
        ratio = f"{r['ppl_quick'] / base:.3f}x" if base else "-"
        loss = f"{r['mean_proxy_loss']:.4g}" if r.get("mean_proxy_loss") is not None else "-"
        bpa = f"{r['bits_per_activation']:.3f}" if r.get("bits_per_activation") else "16"
        act = r["act"]["method"] if r.get("act") else "float"
        print(f"| {name} | {r.get('method', 'float')} | {'yes' if r.get('rotate') else 'no'} | {act} "
              f"| {r.get('bpw_nominal', 16):.3f} | {r.get('bpw_measured', 16):.3f} | {bpa} "
              f"| {r['ppl_quick']:.2f} | {ratio} | {concat} | {full} | {r.get('quant_seconds', 0):.0f} | {loss} |")
    if gptq_time:
        print(f"\nGPTQ quantization time per row (s), for the PVQ time ratio: "
              f"{ {k: round(v) for k, v in gptq_time.items()} }")
    print("peak RSS is the process maximum so far (MiB), in each row's JSON.")
    if any(r.get("act") for r in results.values()):
        print("activations: simulated (fake) quantization of every quantized linear's input, per token "
              "(quantize + dequantize in float); weights calibrated with float activations.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", default=None, choices=list(ROWS), help="rows to run (default: all)")
    parser.add_argument("--study", choices=sorted(STUDIES), default=None,
                        help="run the rows of one study (rotation: issue 4's weight-only and weights+activations rows)")
    parser.add_argument("--eval-windows", type=int, default=40,
                        help="perplexity windows of 512 tokens (default 40, the protocol; fewer for a smoke test)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--out", default="bench-out/llm_quant")
    parser.add_argument("--calib-windows", type=int, default=128)
    parser.add_argument("--calib-seqlen", type=int, default=512)
    parser.add_argument("--compute-dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--full", action="store_true", help="also all windows of 2048 tokens")
    parser.add_argument("--concat", action="store_true",
                        help='also the quick windows of "".join(rows), the text of the issue\'s reference figures '
                             "(float 28.74 there); adds the figure to kept rows (calibrated rows are rebuilt from "
                             "their finished work directory)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--finetune-precision", choices=["float32", "bfloat16"], default=None,
                        help="arithmetic of the fine-tuned rows' training passes (default: the fine-tuning's own, "
                             "float32); enters the rows' settings")
    parser.add_argument("--table", action="store_true",
                        help="only print the table of the rows already kept under --out (those of --rows or "
                             "--study if given; loads no model)")
    parser.add_argument("--smoke-layers", type=int, default=0,
                        help="smoke test: keep only the first N decoder blocks (0: all, the protocol)")
    args = parser.parse_args()
    if args.rows is None:
        args.rows = STUDIES[args.study] if args.study else list(ROWS)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not SHARED.is_dir():
        sys.exit(f"benchmark data not found at {SHARED} (../shared beside the checkout)")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    settings = {k: getattr(args, k) for k in ("model", "calib_windows", "calib_seqlen", "compute_dtype", "batch_size")}
    if args.eval_windows != 40:  # the protocol's 40 stays implicit, so that rows kept from before still match
        settings["eval_windows"] = args.eval_windows
    if args.smoke_layers:
        settings["smoke_layers"] = args.smoke_layers
    if args.finetune_precision:
        settings["finetune_precision"] = args.finetune_precision
    results = {}
    for name in ROWS:
        path = out_dir / f"{name}.json"
        if path.is_file():
            saved = json.loads(path.read_text())
            if saved.get("settings") == settings:
                results[name] = saved
    if args.table:  # the kept rows of --rows / --study (default: all)
        kept = {name: r for name, r in results.items() if name in args.rows}
        print_quality_table(kept) if args.study == "quality" else print_table(kept)
        return

    model, tokenizer, _ = load_model(args.model)
    if args.smoke_layers:
        blocks = adapter_for(model).get_blocks(model)
        parent, _, attr = adapter_for(model).blocks.rpartition(".")
        setattr(model.get_submodule(parent), attr, torch.nn.ModuleList(list(blocks)[: args.smoke_layers]))
        model.config.num_hidden_layers = args.smoke_layers
    valid_ids = encode_text(tokenizer, (SHARED / "tokenized" / "valid.txt").read_text(encoding="utf-8"))
    windows = windows_from_ids(valid_ids, args.calib_windows, args.calib_seqlen, seed=0, source="valid.txt")
    rows_ = wikitext2_test_rows(SHARED / "raw" / "wiki.test.raw")
    eval_ids = {"blank-lines": encode_text(tokenizer, "\n\n".join(rows_)),  # the protocol (= wikitext2_test_text)
                "concat": encode_text(tokenizer, "".join(rows_))}  # the variant of the reference figures
    for name in args.rows:
        kept = results.get(name)
        if kept is not None and (not args.full or "ppl_full" in kept) and (not args.concat or "ppl_quick_concat" in kept):
            print(f"{name}: kept from {out_dir}", flush=True)
            continue
        print(f"{name}: {'adding evaluations to the kept row' if kept else 'running'}", flush=True)
        row = run_row(name, ROWS[name], model, tokenizer, windows, eval_ids, args, out_dir, kept=kept)
        row["settings"] = settings
        tmp = out_dir / f".{name}.json.tmp"
        tmp.write_text(json.dumps(row, indent=2) + "\n")
        os.replace(tmp, out_dir / f"{name}.json")
        results[name] = row
        print(json.dumps(row), flush=True)
    if args.study == "quality":
        print_quality_table(results)
    else:
        print_table(results)


def print_quality_table(results: dict[str, dict]) -> None:
    """Issue 15's table: each base setting plain, fine-tuned, allocated, allocated + fine-tuned."""
    base = results.get("float", {}).get("ppl_quick")
    print("\n| row | method | bit allocation | fine-tuned | embedding + head | bpw (linears) | bits/param (whole model) "
          "| PPL quick | vs float | KL vs float | top-1 | quant s (with allocation) | fine-tune s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in STUDIES["quality"]:
        r = results.get(name)
        if r is None or name == "float":
            continue
        alloc = f"target {r['target_bpw']:g}" if r.get("target_bpw") else "-"
        ft = "-" if "finetune" not in r else ("yes" if r.get("finetune_kept") == "tuned" else "no gain, one-shot kept")
        # a row reuses the quantization (and fine-tuning) of the first row with its weights (same work directory)
        base_name = weights_work_dir(name).removesuffix(".work")
        made_by = results.get(base_name, r)
        tuned_by = results.get(f"{base_name}-ft", r) if r.get("embeddings") and "finetune" in r else r
        ratio = f"{r['ppl_quick'] / base:.3f}x" if base else "-"
        tune_s = f"{tuned_by['finetune_seconds']:.0f}" if "finetune_seconds" in tuned_by else "-"
        emb = r.get("embeddings")
        emb = f"{emb['bits']}-bit g{emb['group_size']}" if emb else "float16"
        method = r["method"] + (", rotated" if r.get("rotate") else "")
        print(f"| {name} | {method} | {alloc} | {ft} | {emb} | {r['bpw_measured']:.3f} "
              f"| {r.get('whole_model_bits_per_parameter', float('nan')):.3f} | {r['ppl_quick']:.2f} | {ratio} "
              f"| {r.get('kl_vs_float', float('nan')):.4f} | {100 * r.get('top1_agreement', float('nan')):.1f}% "
              f"| {made_by.get('quant_seconds', 0):.0f} | {tune_s} |")


if __name__ == "__main__":
    main()
