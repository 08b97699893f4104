"""Command-line interface: `pvq <command>`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from pvq.errors import PVQError


class CLIError(PVQError):
    """A command line that cannot run (conflicting or out-of-range options)."""


def _count(minimum: int):
    """An argparse type: an integer >= minimum (argparse prints the one-line error otherwise)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    parse.__name__ = f"integer >= {minimum}"
    return parse


POSITIVE, NONNEGATIVE, SEQLEN = _count(1), _count(0), _count(2)


def _cmd_snr(args: argparse.Namespace) -> int:
    from pvq.eval.snr import run_snr_experiment

    run_snr_experiment(
        samples=args.samples,
        seed=args.seed,
        dimensions=args.dims,
        out_png=args.plot,
        out_csv=args.csv,
        quick=args.quick,
    )
    return 0


def _method_config(args: argparse.Namespace) -> dict:
    """The chosen method's config fields from the command-line options."""
    if args.method == "pvq":
        cfg = dict(group_size=args.group_size, shape_bits=args.shape_bits, gain=args.gain, gain_bits=args.gain_bits,
                   use_hessian=not args.no_hessian, percdamp=args.percdamp, hessian_refine=not args.no_refine)
    elif args.method == "gptvq":
        cfg = dict(dim=args.vq_dim, bits=args.vq_bits, group_size=args.vq_group_size, group_columns=args.vq_columns,
                   codebook_update=args.codebook_update, kmeans_iters=args.kmeans_iters, init=args.vq_init,
                   assignment=args.vq_assignment, percdamp=args.percdamp, seed=args.seed)
    else:
        cfg = dict(bits=args.bits, group_size=args.group_size)
        if args.method == "gptq":
            cfg.update(act_order=args.act_order, percdamp=args.percdamp)
    return cfg


def _add_act_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "activation quantization (simulated / fake quantization: each linear's input is quantized per token "
        "and dequantized in float in the forward pass; the weights are calibrated with float activations)")
    g.add_argument("--act-method", choices=["none", "rtn", "pvq"], default="none",
                   help="quantize the inputs of every quantized linear layer: round-to-nearest or PVQ (default none)")
    g.add_argument("--act-bits", type=float, default=4.0,
                   help="rtn: integer bits per value (2..8); pvq: shape bits per value, fractional allowed (default 4)")
    g.add_argument("--act-group-size", type=int, default=64,
                   help="values per group D along each token's input (a divisor of every layer's input width; "
                        "-1: one group per token; default 64)")
    g.add_argument("--act-gain", choices=["fp16", "beta"], default="fp16",
                   help="pvq gains: one float16 per group, or Beta-quantile indices with a float16 norm per token")
    g.add_argument("--act-gain-bits", type=int, default=8, help="bits per pvq 'beta' gain index (default 8)")
    g.add_argument("--act-search", choices=["paper", "greedy", "refined"], default="paper",
                   help="pvq shape search (default paper: projection and rounding, the fastest)")
    g.add_argument("--act-asymmetric", action="store_true", help="rtn: min-max grid with a zero point (default symmetric)")
    g.add_argument("--act-clip", type=float, default=1.0, help="rtn: clip ratio of the range the grid spans (default 1)")
    g.add_argument("--act-encode", action="store_true",
                   help="pvq: go through the real Fischer encoder and decoder in the forward pass (same result, slower)")


def _act_config(args: argparse.Namespace) -> dict | None:
    """ActQuantConfig fields from the command-line options (None: float activations)."""
    if args.act_method == "none":
        return None
    bits = args.act_bits
    if args.act_method == "rtn" and float(bits).is_integer():
        bits = int(bits)
    return dict(method=args.act_method, bits=bits, group_size=args.act_group_size, symmetric=not args.act_asymmetric,
                clip_ratio=args.act_clip, gain=args.act_gain, gain_bits=args.act_gain_bits,
                search_method=args.act_search, encode=args.act_encode)


def _default_device(choice: str) -> str:
    import torch

    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(choice)
    except (RuntimeError, ValueError):
        raise CLIError(f"--device {choice!r} is not a device (cpu, cuda, cuda:N or auto)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {choice}: this machine has no CUDA device (torch {torch.__version__}); use cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise CLIError(f"--device {choice}: only {torch.cuda.device_count()} CUDA device(s)")
    return choice


def _check_writable(path: str | None, option: str) -> None:
    """Refuse, before any long work, an output file whose folder does not exist or is not writable."""
    if path is None:
        return
    folder = Path(path).expanduser().resolve().parent
    if not folder.is_dir():
        raise CLIError(f"{option} {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise CLIError(f"{option} {path}: folder {folder} is not writable")


def _cmd_quantize(args: argparse.Namespace) -> int:
    from pvq.jobs import JobOptions, format_report, run_quantize_job

    opts = JobOptions(
        model=args.model, method=args.method, config=_method_config(args), out=args.out,
        calib_text=args.calib_text, calib_windows=args.calib_windows, calib_seqlen=args.calib_seqlen,
        seed=args.seed, device=_default_device(args.device), compute_dtype=args.compute_dtype,
        batch_size=args.batch_size, work_dir=args.work_dir, eval_text=args.eval_text,
        eval_seqlen=args.eval_seqlen, eval_windows=args.eval_windows or None, evaluate=not args.no_eval,
        overwrite=args.overwrite, rotate=args.rotate, rotate_seed=args.rotate_seed, act=_act_config(args),
        max_shard_size=args.max_shard_size,
    )
    report = run_quantize_job(opts)
    print(format_report(report))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    import contextlib
    import json

    from pvq.eval.tasks import load_task, resolve_task_names
    from pvq.formats import decoded_weights
    from pvq.generate import warm_imports
    from pvq.jobs import resident_memory_bytes
    from pvq.models import adapter_for
    from pvq.quant.activations import ActQuantConfig, act_quant_of, act_quant_summary, install_act_quant

    act = _act_config(args)
    _check_writable(args.json, "--json")
    task_names = resolve_task_names(args.tasks) if args.tasks else []
    if args.no_ppl and not task_names:
        raise CLIError("--no-ppl leaves nothing to evaluate; give --tasks")
    if args.limit is not None and args.limit < 1:
        raise CLIError(f"--limit must be >= 1, got {args.limit}")
    # read every task file before the model: a missing or malformed file fails at once
    task_items = {name: load_task(name, args.tasks_dir, args.limit) for name in task_names}
    device = _default_device(args.device)
    warm_imports(args.model)
    rss0 = resident_memory_bytes()
    model, tokenizer, what = _load_any(args.model, device, "float32")
    if act is not None and act_quant_of(model) is not None:
        raise CLIError(f"{args.model} already records activation quantization ({act_quant_summary(act_quant_of(model))}); "
                       "drop --act-method to use it")
    if act is not None:
        install_act_quant(model, ActQuantConfig(**act), adapter_for(model).quantized_layer_names(model))
    if act_quant_of(model) is not None:
        what += f"\nactivations: {act_quant_summary(act_quant_of(model))}"
    if tokenizer is None:
        raise CLIError(f"{args.model} has no tokenizer to encode the evaluation text")
    rss1 = resident_memory_bytes()
    out: dict = {"model": args.model, "kind": what, "act_quant": act_quant_of(model)}
    if rss0 is not None and rss1 is not None:
        out["resident_bytes_after_load"] = rss1 - rss0
        what += f"; +{(rss1 - rss0) / 2**20:.0f} MiB resident after load"
    print(f"{args.model}: {what}")
    with decoded_weights(model) if args.decode_once else contextlib.nullcontext():
        _evaluate(args, model, tokenizer, task_names, task_items, out)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


def _evaluate(args, model, tokenizer, task_names, task_items, out) -> None:
    import math

    from pvq.eval.perplexity import perplexity_details, wikitext2_test_text
    from pvq.eval.tasks import average_accuracy, evaluate_task, results_table, task_rows
    from pvq.pipeline import encode_text

    rows = []
    if not args.no_ppl:
        ids = encode_text(tokenizer, wikitext2_test_text(args.eval_text))
        res = perplexity_details(model, ids, seqlen=args.seqlen, max_windows=args.max_windows or None,
                                 batch_size=args.batch_size)
        if not math.isfinite(res.ppl):
            raise CLIError(f"{args.model}: perplexity is {res.ppl} (the model's log-probabilities are not finite)")
        out.update(ppl=res.ppl, nll=res.nll, windows=res.n_windows, seqlen=res.seqlen, tokens=res.n_tokens,
                   seconds=res.seconds)
        print(f"WikiText-2 test perplexity {res.ppl:.3f} over {res.n_windows} windows of {res.seqlen} tokens "
              f"({res.seconds:.0f} s)")
        rows.append(("wikitext2", f"ppl ({res.seqlen})", res.ppl, None, f"{res.n_windows} windows"))
    if task_names:
        results = {name: evaluate_task(model, tokenizer, name, batch_size=args.task_batch_size, items=items)
                   for name, items in task_items.items()}
        rows += task_rows(results)
        out["tasks"] = {name: r.to_dict() for name, r in results.items()}
        out["limit"] = args.limit
        out["average_accuracy"] = average_accuracy(results)
        print()
        print(results_table(rows))
        if out["average_accuracy"] is not None:
            print(f"average accuracy (acc_norm where reported, else acc) over {len(results)} tasks: "
                  f"{out['average_accuracy']:.4f}" + (f"  [first {args.limit} items per task]" if args.limit else ""))
    return None


def _float_list(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _cmd_sweep(args: argparse.Namespace) -> int:
    from pvq.sweep import SweepOptions, run_sweep

    opts = SweepOptions(
        model=args.model, methods=[m.strip() for m in args.methods.split(",") if m.strip()], bits=args.bits,
        out=args.out, group_size=args.group_size, pvq_group_size=args.pvq_group_size, pvq_gain_bits=args.pvq_gain_bits,
        vq_columns=args.vq_columns, rotate=args.rotate, rotate_seed=args.rotate_seed, calib_text=args.calib_text,
        calib_windows=args.calib_windows, calib_seqlen=args.calib_seqlen, seed=args.seed, eval_text=args.eval_text,
        eval_seqlen=args.eval_seqlen, eval_windows=args.eval_windows or None,
        tasks=args.tasks.split(",") if args.tasks else (), tasks_dir=args.tasks_dir, limit=args.limit,
        task_batch_size=args.task_batch_size, float_point=not args.no_float, device=_default_device(args.device),
        compute_dtype=args.compute_dtype, batch_size=args.batch_size, redo_changed=args.redo_changed,
    )
    run_sweep(opts)
    print((Path(args.out) / "results.md").read_text())
    print(f"written: {args.out}/results.csv, results.md, ppl_vs_bpw.png"
          + (", acc_vs_bpw.png" if args.tasks else "") + ", points/*.json")
    return 0


def _load_any(spec: str, device: str, dtype: str, verify: bool = True):
    """(model, tokenizer, description) of a pvq checkpoint directory or a float model spec."""
    from pvq.formats import INDEX_FILE, is_checkpoint, is_legacy_checkpoint, load_checkpoint
    from pvq.models import load_model

    if is_checkpoint(spec) or is_legacy_checkpoint(spec):
        if not verify:
            print(f"warning: {spec}: --no-verify: loaded without checking its files against {INDEX_FILE}",
                  file=sys.stderr)
        model, tokenizer, info = load_checkpoint(spec, device=device, dtype=dtype, verify=verify)
        qc = info["quantization_config"]
        return model, tokenizer, f"pvq checkpoint ({qc['method']}, {info['stats']['bits_per_weight']:.3f} bits/weight)"
    import torch

    model, tokenizer, _ = load_model(spec, device=device, dtype=getattr(torch, dtype))
    return model, tokenizer, "float model" + ("" if dtype == "float32" else f" ({dtype})")


def _cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from pvq.generate import generate_text, warm_imports
    from pvq.jobs import resident_memory_bytes

    if args.threads:
        torch.set_num_threads(args.threads)
    device = _default_device(args.device)
    warm_imports(args.model)
    rss0 = resident_memory_bytes()
    model, tokenizer, what = _load_any(args.model, device, args.dtype, verify=not args.no_verify)
    rss1 = resident_memory_bytes()
    if tokenizer is None:
        raise CLIError(f"{args.model} has no tokenizer")
    print(f"{args.model}: {what}", file=sys.stderr)
    stats = generate_text(model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens, chat=args.chat,
                          out=sys.stdout)
    mib = 2**20
    kernels = ", ".join(f"{k} ({n} layers)" for k, n in sorted(stats["kernels"].items())) or "torch F.linear (float)"
    lines = [
        f"prefill          {stats['prompt_tokens']} tokens in {stats['prefill_seconds']:.2f} s "
        f"({stats['prefill_tokens_per_second']:.1f} tokens/s)",
        f"decode           {stats['new_tokens']} tokens, {stats['decode_tokens_per_second']:.2f} tokens/s "
        f"(greedy, {torch.get_num_threads()} torch threads)",
        f"kernels          {kernels}",
    ]
    if rss0 is not None and rss1 is not None:
        lines.append(f"memory           +{(rss1 - rss0) / mib:.0f} MiB resident after load; "
                     f"{resident_memory_bytes() / mib:.0f} MiB now")
    print("\n" + "\n".join(lines), file=sys.stderr)
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from pvq.formats import load_checkpoint, verify_checkpoint

    index = verify_checkpoint(args.checkpoint)
    model, _, info = load_checkpoint(args.checkpoint)  # decodes every layer once, loads the tokenizer
    st = info["stats"]
    print(f"{args.checkpoint}: ok: {len(index['files'])} files match their sha256; {st['quantized_layers']} quantized "
          f"layers decode ({st['bits_per_weight']:.4f} bits/weight, {st['quantized_bytes']} payload bytes)")
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from pvq.formats.reencode import convert_checkpoint

    index, changed = convert_checkpoint(args.old, args.new, overwrite=args.overwrite,
                                        max_shard_size=args.max_shard_size)
    print(f"{args.new}: written ({len(index['files'])} files, {len(changed)} PVQ layers re-encoded in the split "
          "order); load it with pvq.load or transformers.AutoModelForCausalLM.from_pretrained after `import pvq`")
    return 0


def _cmd_plot_gains(args: argparse.Namespace) -> int:
    from pvq.eval.gains import layer_gains, plot_gain_histograms
    from pvq.models import load_model

    model, _, _ = load_model(args.model, checksum=False)
    if args.rotate:
        from pvq.rotation import rotate_model

        rotate_model(model, seed=args.rotate_seed)
    gains = layer_gains(model, args.group_size, args.layers)
    title = f"{args.model}{' rotated' if args.rotate else ''}: normalised group gains, D={args.group_size}"
    plot_gain_histograms(gains, args.out, quantity=args.quantity, title=title)
    print(f"{args.out}: {len(gains)} layers ({', '.join(g.name for g in gains)})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pvq", description="Pyramid Vector Quantization for LLMs")
    sub = parser.add_subparsers(dest="command", required=True)

    snr = sub.add_parser(
        "snr",
        help="SNR of PVQ vs scalar, Lloyd-Max, E8 and the Shannon bound on a Gaussian source (paper Fig. 3)",
    )
    snr.add_argument("--samples", type=POSITIVE, default=512, help="Gaussian rows of 1024 values (default 512)")
    snr.add_argument("--dims", type=int, nargs="+", default=[8, 16, 32, 64, 128], help="PVQ group sizes D")
    snr.add_argument("--seed", type=NONNEGATIVE, default=0)
    snr.add_argument("--plot", default="pvq_snr.png", help="output PNG (default pvq_snr.png)")
    snr.add_argument("--csv", default=None, help="also write the table as CSV")
    snr.add_argument("--quick", action="store_true", help="fewer samples and rates, for a smoke test")
    snr.set_defaults(func=_cmd_snr)

    q = sub.add_parser("quantize", help="quantize a model into a packed checkpoint, load it back and measure it (the main job)")
    q.add_argument("model", nargs="?", default="smollm2-135m",
                   help="hub id, local directory, .gguf file, or the demo alias smollm2-135m (default)")
    q.add_argument("--method", choices=["pvq", "gptq", "gptvq", "rtn"], default="pvq")
    q.add_argument("--out", default="pvq-out", help="checkpoint directory to write (default pvq-out)")
    q.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint at --out")
    q.add_argument("--max-shard-size", default=None,
                   help="largest safetensors shard, e.g. 2GB or 500MB (default: transformers' default, 50GB)")
    q.add_argument("--group-size", type=int, default=16,
                   help="columns per group: PVQ dimension D, or the scalar group size (-1: per output channel)")
    q.add_argument("--shape-bits", type=float, default=3.0, help="PVQ shape bits per weight, fractional allowed")
    q.add_argument("--gain", choices=["fp16", "beta", "empirical"], default="empirical",
                   help="PVQ gain storage: float16, Beta-quantile indices, or per-layer fitted levels")
    q.add_argument("--gain-bits", type=int, default=4, help="bits per PVQ gain index (beta, empirical)")
    q.add_argument("--no-hessian", action="store_true", help="plain PVQ: no Hessian error feedback")
    q.add_argument("--no-refine", action="store_true", help="PVQ: skip the Hessian-weighted shape refinement")
    q.add_argument("--bits", type=int, default=4, help="bits per weight for rtn/gptq")
    q.add_argument("--act-order", action="store_true", help="gptq: process columns by descending Hessian diagonal")
    q.add_argument("--vq-dim", type=int, default=2, choices=[1, 2, 4],
                   help="gptvq: vector dimension d (consecutive input columns per vector)")
    q.add_argument("--vq-bits", type=float, default=3.0,
                   help="gptvq: index bits per weight (2^(bits*d) centroids per codebook; bits*d an integer)")
    q.add_argument("--vq-group-size", type=int, default=4096,
                   help="gptvq: weights sharing one codebook (a multiple of --vq-columns); codebooks cost "
                        "(8*K*d + 16) / group size bits per weight")
    q.add_argument("--vq-columns", type=int, default=256, help="gptvq: columns per codebook block")
    q.add_argument("--codebook-update", action=argparse.BooleanOptionalAction, default=True,
                   help="gptvq: least-squares codebook update after assignment (default on)")
    q.add_argument("--kmeans-iters", type=NONNEGATIVE, default=10, help="gptvq: EM iterations of the codebook initialisation")
    q.add_argument("--vq-init", choices=["kpp", "mahalanobis"], default="kpp",
                   help="gptvq: k-means initialisation (kpp: seeded k-means++; mahalanobis: the paper's)")
    q.add_argument("--vq-assignment", choices=["diag", "block"], default="diag",
                   help="gptvq: Hessian-weighted lookup, diagonal (paper) or the full d x d block metric")
    q.add_argument("--percdamp", type=float, default=0.01, help="Hessian damping, fraction of its mean diagonal")
    q.add_argument("--calib-text", default=None,
                   help="calibration text file (default: text sampled from the model itself, seeded)")
    q.add_argument("--calib-windows", type=POSITIVE, default=32, help="calibration windows (paper: 128)")
    q.add_argument("--calib-seqlen", type=SEQLEN, default=512, help="tokens per calibration window (paper: 2048)")
    q.add_argument("--seed", type=NONNEGATIVE, default=0)
    q.add_argument("--rotate", action="store_true",
                   help="rotate the float model first (fused randomized Hadamard, online Hadamard before down_proj); "
                        "recorded in the checkpoint and rebuilt on load")
    q.add_argument("--rotate-seed", type=NONNEGATIVE, default=0, help="seed of the rotation's random signs (default 0)")
    _add_act_args(q)
    q.add_argument("--device", default="auto", help="compute device for one block at a time (auto: cuda if present)")
    q.add_argument("--compute-dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="dtype of the calibration forwards (Hessians are always accumulated in float32+)")
    q.add_argument("--batch-size", type=POSITIVE, default=8, help="calibration windows per forward")
    q.add_argument("--work-dir", default=None, help="resumable state (default: <out>.work); a rerun continues there")
    q.add_argument("--eval-text", default=None, help="WikiText-2 raw test file (default: ../shared/assets/...)")
    q.add_argument("--eval-seqlen", type=SEQLEN, default=512)
    q.add_argument("--eval-windows", type=NONNEGATIVE, default=40, help="perplexity windows (0: all)")
    q.add_argument("--no-eval", action="store_true", help="skip perplexity and agreement with the float model")
    q.set_defaults(func=_cmd_quantize)

    ev = sub.add_parser("eval", help="WikiText-2 perplexity and zero-shot tasks of a float model or a packed checkpoint")
    ev.add_argument("model", help="packed checkpoint directory, hub id, local directory, .gguf, or smollm2-135m")
    ev.add_argument("--seqlen", type=SEQLEN, default=2048)
    ev.add_argument("--max-windows", type=NONNEGATIVE, default=0, help="first N windows only (0: all)")
    ev.add_argument("--batch-size", type=POSITIVE, default=1)
    ev.add_argument("--decode-once", action="store_true",
                    help="decode every quantized layer once and keep the float weights while evaluating (faster, "
                         "the float model's memory); default: packed, each forward decodes layer by layer")
    ev.add_argument("--eval-text", default=None, help="WikiText-2 raw test file")
    ev.add_argument("--json", default=None, help="also write the result as JSON")
    ev.add_argument("--device", default="auto", help="where the model runs (auto: cuda if present, else cpu)")
    ev.add_argument("--tasks", default=None,
                    help="zero-shot tasks, comma-separated, or 'all': piqa, arc_easy, arc_challenge, hellaswag, "
                         "winogrande, lambada_openai (scored as lm-evaluation-harness does)")
    ev.add_argument("--limit", type=POSITIVE, default=None, help="first N items of each task only (quick runs)")
    ev.add_argument("--tasks-dir", default=None,
                    help="task data folder (default: $PVQ_TASKS_DIR, else ../shared/assets/tasks beside the checkout)")
    ev.add_argument("--task-batch-size", type=POSITIVE, default=16, help="sequences per forward when scoring tasks")
    ev.add_argument("--no-ppl", action="store_true", help="skip WikiText-2 perplexity (tasks only)")
    _add_act_args(ev)
    ev.set_defaults(func=_cmd_eval)

    sw = sub.add_parser(
        "sweep", help="a grid of methods x bit widths on one model: points (resumable), results.csv/.md, Pareto plots",
        description="bits per method: rtn/gptq integer bits with a float16 scale and zero point per --group-size "
                    "columns (b + (16 + b)/g); pvq D=--pvq-group-size (16) with b shape bits and 4-bit fitted gains "
                    "(b + 4/16 = b + 0.25, plus a float16 norm per row); gptvq 2-D vectors with b index bits and "
                    "codebooks costing <= 0.25 bits per weight.")
    sw.add_argument("model", nargs="?", default="smollm2-135m", help="hub id, local directory, .gguf, or smollm2-135m")
    sw.add_argument("--methods", default="rtn,gptq,pvq", help="comma-separated: rtn, gptq, pvq, gptvq")
    sw.add_argument("--bits", type=_float_list, default=[2.0, 3.0, 4.0], help="comma-separated bit widths (default 2,3,4)")
    sw.add_argument("--out", default="sweep-out", help="output folder (points/*.json, results.csv/.md, *.png)")
    sw.add_argument("--group-size", type=int, default=64, help="rtn/gptq: columns per scale and zero point (default 64)")
    sw.add_argument("--pvq-group-size", type=int, default=16, help="pvq: dimension D (default 16)")
    sw.add_argument("--pvq-gain-bits", type=int, default=4, help="pvq: bits per fitted gain index (default 4)")
    sw.add_argument("--vq-columns", type=int, default=256, help="gptvq: columns per codebook block (default 256)")
    sw.add_argument("--rotate", action="store_true", help="rotate every point's float model first (fused Hadamard)")
    sw.add_argument("--rotate-seed", type=NONNEGATIVE, default=0)
    sw.add_argument("--calib-text", default=None, help="calibration text file (default: sampled from the model, seeded)")
    sw.add_argument("--calib-windows", type=POSITIVE, default=32)
    sw.add_argument("--calib-seqlen", type=SEQLEN, default=512)
    sw.add_argument("--seed", type=NONNEGATIVE, default=0)
    sw.add_argument("--eval-text", default=None, help="WikiText-2 raw test file (default: ../shared/assets/...)")
    sw.add_argument("--eval-seqlen", type=SEQLEN, default=512)
    sw.add_argument("--eval-windows", type=NONNEGATIVE, default=40, help="perplexity windows (0: all)")
    sw.add_argument("--tasks", default=None, help="zero-shot tasks per point, comma-separated or 'all'")
    sw.add_argument("--limit", type=POSITIVE, default=None, help="first N items of each task")
    sw.add_argument("--tasks-dir", default=None, help="task data folder (default: $PVQ_TASKS_DIR or ../shared/assets/tasks)")
    sw.add_argument("--task-batch-size", type=POSITIVE, default=16)
    sw.add_argument("--no-float", action="store_true", help="leave out the float reference point")
    sw.add_argument("--redo-changed", action="store_true",
                    help="recompute kept points whose settings differ (default: refuse with the differences)")
    sw.add_argument("--device", default="auto", help="compute device (auto: cuda if present)")
    sw.add_argument("--compute-dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    sw.add_argument("--batch-size", type=POSITIVE, default=8, help="calibration windows per forward")
    sw.set_defaults(func=_cmd_sweep)

    gen = sub.add_parser("generate", help="stream greedy text from a pvq checkpoint (or a float model) and time it")
    gen.add_argument("model", help="pvq checkpoint directory, or a float model: hub id, local directory, .gguf, smollm2-135m")
    gen.add_argument("--prompt", required=True, help="the text to continue")
    gen.add_argument("--max-new-tokens", type=POSITIVE, default=64, help="tokens to generate (default 64)")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    gen.add_argument("--device", default="cpu", help="cpu (default), cuda, or auto")
    gen.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                     help="dtype of the dense tensors and the compute (default float32)")
    gen.add_argument("--threads", type=NONNEGATIVE, default=0, help="torch threads (default: torch's default)")
    gen.add_argument("--no-verify", action="store_true",
                     help=f"load a pvq checkpoint without its integrity check (e.g. one saved by plain "
                          f"save_pretrained, which writes no {'pvq_index.json'})")
    gen.set_defaults(func=_cmd_generate)

    ver = sub.add_parser("verify", help="check a pvq checkpoint: every file's sha256, every layer's payload decodes")
    ver.add_argument("checkpoint")
    ver.set_defaults(func=_cmd_verify)

    conv = sub.add_parser("convert", help="rewrite an older checkpoint (pvq 0.1 manifest.json, or Fischer-ordered "
                          "PVQ codes) in the current format, PVQ codes in the split order the fast kernels read")
    conv.add_argument("old", help="the checkpoint directory to convert")
    conv.add_argument("new", help="the directory to write")
    conv.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint at NEW")
    conv.add_argument("--max-shard-size", default=None, help="largest safetensors shard (default: transformers')")
    conv.set_defaults(func=_cmd_convert)

    pl = sub.add_parser("plot", help="plots of a model")
    plot_sub = pl.add_subparsers(dest="plot", required=True)
    pg = plot_sub.add_parser(
        "gains", help="histograms of normalised group gains against the Beta(D/2, D(G-1)/2) law (paper 3.4, App. D)")
    pg.add_argument("model", help="hub id, local directory, .gguf, or smollm2-135m")
    pg.add_argument("--group-size", type=int, default=16, help="D, columns per group (default 16)")
    pg.add_argument("--rotate", action="store_true", help="rotate the model first (the paper's setting)")
    pg.add_argument("--rotate-seed", type=NONNEGATIVE, default=0)
    pg.add_argument("--layers", nargs="+", default=None,
                    help="layer names (default: q/o/up/down_proj of the first, middle and last block)")
    pg.add_argument("--quantity", choices=["energy", "gain"], default="energy",
                    help="plot u = ||w_g||^2/||w||^2 (Beta density) or the gain sqrt(u) (transformed density)")
    pg.add_argument("--out", default="gains.png")
    pg.set_defaults(func=_cmd_plot_gains)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (PVQError, OSError) as e:  # the message says what to change (OSError: names the file)
        if args.debug:
            raise
        message = " ".join(str(e).split())  # one line, whatever the library's message looked like
        print(f"pvq {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.debug:
            raise
        import signal

        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not interrupt the message
        print(f"pvq {args.command}: interrupted"
              + ("; rerun the same command to resume from the finished blocks, if any" if args.command == "quantize"
                 else ""), file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
