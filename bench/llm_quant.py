"""Weight quantization of the benchmark model: RTN, GPTQ, GPTVQ and PVQ in one pipeline, one table.

Run:  python bench/llm_quant.py [--rows ROW ...] [--full] [--out bench-out/llm_quant]

Protocol (issue 3): calibration = 128 random windows of 512 tokens from the tokenized
WikiText-2 validation text (seed 0, the same windows for every method); perplexity on the
WikiText-2 raw test text joined by blank lines, first 40 non-overlapping windows of 512
tokens ("quick"; `--full` adds all windows of 2048). Each row starts from a fresh copy of
the float model. Rows whose method does not use a Hessian (RTN, PVQ without Hessian) are
quantized directly from the weights (no calibration forwards, so no proxy loss).

Resumable: every finished row is kept as JSON under --out and skipped on a rerun; a
row interrupted mid-way resumes from its last finished block (pipeline work dir).
Bits per weight are measured from the stored tensors of all quantized linears.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import sys
import time
from pathlib import Path

import torch

from pvq.eval.perplexity import perplexity_details, wikitext2_test_text
from pvq.models import adapter_for, load_model
from pvq.pipeline import encode_text, quantize_model, windows_from_ids
from pvq.quant import get_method
from pvq.rotation import rotate_model

SHARED = Path(__file__).resolve().parents[2] / "shared" / "assets" / "wikitext-2"

# name -> (method, config fields[, options]); None = the float model. Options:
# {"rotate": True} = fused randomized-Hadamard rotation (seed 0) before quantizing.
ROWS: dict[str, tuple | None] = {"float": None, "float-rot": ("float", {}, {"rotate": True})}
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
# the same settings after the fused Hadamard rotation (issue 4)
for _name in ("rtn-3b-g64", "gptq-3b-g64", "gptq-3b-g64-act", "pvq-d64-s3-fp16", "pvq-d16-s3-beta4", "pvq-d16-s3-emp4",
              "pvq-d32-s3.125-emp4", "pvq-d16-s3-beta4-nohessian", "pvq-d32-s2.375-emp4", "pvq-d16-s2.25-beta4"):
    ROWS[f"{_name}-rot"] = (*ROWS[_name], {"rotate": True})


def uses_hessian(method: str, cfg: dict) -> bool:
    return method in ("gptq", "gptvq") or (method == "pvq" and cfg.get("use_hessian", True))


def quantize_directly(model, adapter, method_name: str, config) -> dict:
    """Weight-only methods: quantize each linear from its weight alone, in place."""
    method = get_method(method_name)
    out = {}
    for name in adapter.quantized_layer_names(model):
        module = model.get_submodule(name)
        qt = method.quantize(module.weight.data.float(), None, config)
        module.weight.data.copy_(method.dequantize(qt).to(module.weight.dtype))
        out[name] = qt
    return out


def run_row(name, spec, base_model, tokenizer, windows, eval_ids, args, out_dir: Path) -> dict:
    model = copy.deepcopy(base_model)
    row: dict = {"row": name}
    options = spec[2] if spec is not None and len(spec) > 2 else {}
    if options.get("rotate"):
        t0 = time.perf_counter()
        rotate_model(model, seed=0)
        row["rotate_seconds"] = time.perf_counter() - t0
        row["rotated"] = True
    if spec is not None and spec[0] != "float":
        method_name, fields = spec[:2]
        method = get_method(method_name)
        config = method.config_class(**fields)
        adapter = adapter_for(model)
        t0 = time.perf_counter()
        if uses_hessian(method_name, fields):
            result = quantize_model(
                model, adapter, windows, method_name, config, work_dir=out_dir / f"{name}.work",
                batch_size=args.batch_size, compute_dtype=getattr(torch, args.compute_dtype),
            )
            losses = [r.proxy_loss for r in result.report if r.proxy_loss is not None]
            row["mean_proxy_loss"] = sum(losses) / len(losses) if losses else None
        else:
            result = quantize_directly(model, adapter, method_name, config)
        row["quant_seconds"] = time.perf_counter() - t0
        stored = sum(qt.stored_bytes for qt in result.values())
        weights = sum(qt.shape[0] * qt.shape[1] for qt in result.values())
        row.update(method=method_name, config=fields, bpw_measured=stored * 8 / weights,
                   bpw_nominal=method.nominal_bits_per_weight(config, base_model.config.hidden_size))
    quick = perplexity_details(model, eval_ids, seqlen=512, max_windows=40, progress=False)
    row["ppl_quick"] = quick.ppl
    if args.full:
        row["ppl_full"] = perplexity_details(model, eval_ids, seqlen=2048, progress=False).ppl
    row["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return row


def print_table(results: dict[str, dict]) -> None:
    base = results.get("float", {}).get("ppl_quick")
    gptq_time = {name: r["quant_seconds"] for name, r in results.items() if r.get("method") == "gptq"}
    print("\n| row | method | bpw nominal | bpw measured | PPL quick (40x512) | vs float | PPL full (2048) "
          "| quant time s | mean proxy loss |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in ROWS:
        r = results.get(name)
        if r is None:
            continue
        full = f"{r['ppl_full']:.2f}" if "ppl_full" in r else "-"
        ratio = f"{r['ppl_quick'] / base:.3f}x" if base else "-"
        loss = f"{r['mean_proxy_loss']:.4g}" if r.get("mean_proxy_loss") is not None else "-"
        print(f"| {name} | {r.get('method', 'float')} | {r.get('bpw_nominal', 16):.3f} | {r.get('bpw_measured', 16):.3f} "
              f"| {r['ppl_quick']:.2f} | {ratio} | {full} | {r.get('quant_seconds', 0):.0f} | {loss} |")
    if gptq_time:
        print(f"\nGPTQ quantization time per row (s), for the PVQ time ratio: "
              f"{ {k: round(v) for k, v in gptq_time.items()} }")
    print("peak RSS is the process maximum so far (MiB), in each row's JSON.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--out", default="bench-out/llm_quant")
    parser.add_argument("--calib-windows", type=int, default=128)
    parser.add_argument("--calib-seqlen", type=int, default=512)
    parser.add_argument("--compute-dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--full", action="store_true", help="also all windows of 2048 tokens")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not SHARED.is_dir():
        sys.exit(f"benchmark data not found at {SHARED} (../shared beside the checkout)")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    model, tokenizer, _ = load_model(args.model)
    valid_ids = encode_text(tokenizer, (SHARED / "tokenized" / "valid.txt").read_text(encoding="utf-8"))
    windows = windows_from_ids(valid_ids, args.calib_windows, args.calib_seqlen, seed=0, source="valid.txt")
    eval_ids = encode_text(tokenizer, wikitext2_test_text(SHARED / "raw" / "wiki.test.raw"))
    settings = {k: getattr(args, k) for k in ("model", "calib_windows", "calib_seqlen", "compute_dtype", "batch_size")}

    results = {}
    for name in ROWS:
        path = out_dir / f"{name}.json"
        if path.is_file():
            saved = json.loads(path.read_text())
            if saved.get("settings") == settings:
                results[name] = saved
    for name in args.rows:
        if name in results and (not args.full or "ppl_full" in results[name]):
            print(f"{name}: kept from {out_dir}", flush=True)
            continue
        print(f"{name}: running", flush=True)
        row = run_row(name, ROWS[name], model, tokenizer, windows, eval_ids, args, out_dir)
        row["settings"] = settings
        tmp = out_dir / f".{name}.json.tmp"
        tmp.write_text(json.dumps(row, indent=2) + "\n")
        os.replace(tmp, out_dir / f"{name}.json")
        results[name] = row
        print(json.dumps(row), flush=True)
    print_table(results)


if __name__ == "__main__":
    main()
