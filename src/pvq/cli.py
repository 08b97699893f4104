"""Command-line interface: `pvq <command>`.

Over 500 lines because it holds every subcommand's parser and its (thin) handler.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from pvq.errors import PVQError
from pvq.options import (
    NONNEGATIVE,
    POSITIVE,
    SEED,
    SEQLEN,
    act_config,
    add_act_options,
    add_quantize_options,
    add_setting_options,
)


class CLIError(PVQError):
    """A command line that cannot run (conflicting or out-of-range options)."""




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


def _act_config(args: argparse.Namespace) -> dict | None:
    """ActQuantConfig fields from `pvq eval`'s activation options (None: float activations)."""
    return act_config(vars(args))


def _default_device(choice: str) -> str:
    from pvq.oneshot import resolve_device

    return resolve_device(choice, "--device")


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
    from pvq.options import recipe_text, resolve_quantize_options, settings_from_values

    v = resolve_quantize_options(args)  # defaults < --recipe < flags; conflicts refused here
    fields = settings_from_values(JobOptions, v)
    opts = JobOptions(**fields | {"device": _default_device(fields["device"]), "recipe_text": recipe_text(v)})
    report = run_quantize_job(opts)
    if "rank" not in report and not report.get("dry_run"):  # under torchrun, rank 0 prints
        print(format_report(report))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    import contextlib
    import json

    from pvq.eval.harness import prepare_tasks
    from pvq.eval.perplexity import wikitext2_test
    from pvq.runtime import decoded_weights
    from pvq.generate import warm_imports
    from pvq.memory import resident_memory_bytes
    from pvq.models import adapter_for
    from pvq.activations import (
        ActQuantConfig,
        act_quant_of,
        act_quant_summary,
        install_act_quant,
    )

    act = _act_config(args)
    _check_writable(args.json, "--json")
    if args.no_ppl and not args.tasks:
        raise CLIError("--no-ppl leaves nothing to evaluate; give --tasks")
    # resolve the task names and read every local task file before the model: an unknown
    # task or a missing or malformed file fails at once
    plan = prepare_tasks(args.tasks, args.tasks_dir, args.limit) if args.tasks else None
    eval_text = None if args.no_ppl else wikitext2_test(args.eval_text)  # before the model, too
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
    try:
        with decoded_weights(model) if args.decode_once else contextlib.nullcontext():
            _evaluate(args, model, tokenizer, eval_text, plan, out)
    finally:
        if plan is not None:
            plan.close()
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


def _evaluate(args, model, tokenizer, eval_text, plan, out) -> None:
    import math

    from pvq.eval.harness import average_accuracy, results_table, run_tasks, task_rows
    from pvq.eval.perplexity import perplexity_details
    from pvq.calibrate import encode_text

    rows = []
    if eval_text is not None:
        text = eval_text
        ids = encode_text(tokenizer, text.text)
        res = perplexity_details(model, ids, seqlen=args.seqlen, max_windows=args.max_windows or None,
                                 batch_size=args.batch_size)
        if not math.isfinite(res.ppl):
            raise CLIError(f"{args.model}: perplexity is {res.ppl} (the model's log-probabilities are not finite)")
        out.update(ppl=res.ppl, nll=res.nll, windows=res.n_windows, seqlen=res.seqlen, tokens=res.n_tokens,
                   seconds=res.seconds, eval_data=text.describe())
        print(f"{text.describe()} perplexity {res.ppl:.3f} over {res.n_windows} windows of {res.seqlen} tokens "
              f"({res.seconds:.0f} s)")
        rows.append(("wikitext2", f"ppl ({res.seqlen})", res.ppl, None, f"{res.n_windows} windows"))
    if plan is not None:
        results = run_tasks(model, tokenizer, plan, batch_size=args.task_batch_size,
                            bootstrap_iters=args.bootstrap_iters)
        rows += task_rows(results)
        out["tasks"] = {name: r.to_dict() for name, r in results.items()}
        out["limit"] = args.limit
        out["average_accuracy"] = average_accuracy(results)
        print()
        print(results_table(rows))
        sources = sorted(set(plan.sources.values()))
        print(f"scored by lm-evaluation-harness; data: {'; '.join(sources)}")
        if out["average_accuracy"] is not None:
            print(f"average accuracy (acc_norm where reported, else acc) over {len(results)} tasks: "
                  f"{out['average_accuracy']:.4f}" + (f"  [first {args.limit} items per task]" if args.limit else ""))
    return None


def _cmd_sweep(args: argparse.Namespace) -> int:
    from pvq.options import settings_from_values
    from pvq.sweep import SweepOptions, run_sweep

    fields = settings_from_values(SweepOptions, vars(args))
    opts = SweepOptions(**fields | {"device": _default_device(fields["device"])})
    run_sweep(opts)
    print((Path(args.out) / "results.md").read_text())
    print(f"written: {args.out}/results.csv, results.md, ppl_vs_bpw.png"
          + (", acc_vs_bpw.png" if args.tasks else "") + ", points/*.json")
    return 0


def _load_any(spec: str, device: str, dtype: str, verify: bool = True, layout: str = "packed"):
    """(model, tokenizer, description) of a pvq checkpoint directory or a float model spec."""
    from pvq.checkpoint import INDEX_FILE, is_checkpoint, is_legacy_checkpoint, load_checkpoint
    from pvq.models import load_model

    if is_checkpoint(spec) or is_legacy_checkpoint(spec):
        if not verify:
            print(f"warning: {spec}: --no-verify: loaded without checking its files against {INDEX_FILE}",
                  file=sys.stderr)
        model, tokenizer, info = load_checkpoint(spec, device=device, dtype=dtype, verify=verify, layout=layout)
        qc = info["quantization_config"]
        return model, tokenizer, (f"pvq checkpoint ({qc['method']}, {info['stats']['bits_per_weight']:.3f} bits/weight, "
                                  f"{info['layout']} layout)")
    import torch

    model, tokenizer, _ = load_model(spec, device=device, dtype=getattr(torch, dtype))
    return model, tokenizer, "float model" + ("" if dtype == "float32" else f" ({dtype})")


def _load_for_generation(args: argparse.Namespace, device: str, dtype: str, chat: bool):
    """What `pvq generate` and `pvq chat` share: threads, the load (in --layout), the tokenizer
    and its chat template checked, batch-1 threads for a quantized model, the warm-up.
    Returns (model, tokenizer, description, threads text, warm-up seconds, resident bytes
    before and after the load)."""
    import torch

    from pvq.chat_template import check_text
    from pvq.runtime import QuantizedLinear
    from pvq.runtime.cpu_kernels import runtime_threads
    from pvq.checkpoint.load_checks import check_generation_config
    from pvq.generate import warm_imports, warm_up
    from pvq.memory import resident_memory_bytes

    for option in ("prompt", "system"):  # text from the command line: UTF-8, before the load
        if getattr(args, option, None) is not None:
            check_text(getattr(args, option), f"--{option}")
    check_generation_config(Path(args.model))  # before anything is loaded (the loading contract checks it again)
    if args.threads:
        torch.set_num_threads(args.threads)
    warm_imports(args.model)
    rss0 = resident_memory_bytes()
    model, tokenizer, what = _load_any(args.model, device, dtype, verify=not args.no_verify, layout=args.layout)
    rss1 = resident_memory_bytes()
    if tokenizer is None:
        raise CLIError(f"{args.model} has no tokenizer")
    if chat and not getattr(tokenizer, "chat_template", None):
        raise CLIError(f"{args.model}: its tokenizer has no chat template; use `pvq generate` without --chat")
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    if layers and layers[0]._buffers[next(iter(layers[0].payload_spec))].device.type == "cpu":
        # a quantized model on the CPU: the kernels take the threads, torch's small ops one
        n = runtime_threads(model)
        threads = f"{n} kernel threads, torch ops on 1 at one token"
    else:
        threads = f"{torch.get_num_threads()} torch threads"
    return model, tokenizer, what, threads, warm_up(model), rss0, rss1


def _cmd_chat(args: argparse.Namespace) -> int:
    from pvq.chat import run_chat
    from pvq.chat_template import ChatTemplateError

    model, tokenizer, what, _, warm_s, _, _ = _load_for_generation(args, "cpu", "float32", chat=True)
    print(f"{args.model}: {what}; kernels ready in {warm_s:.1f} s", file=sys.stderr)
    try:
        run_chat(model, tokenizer, system=args.system, max_new_tokens=args.max_new_tokens)
    except ChatTemplateError as e:  # the template fails on the first rendering: name the model
        raise ChatTemplateError(f"{args.model}: {e}") from None
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from pvq.chat_template import ChatTemplateError
    from pvq.generate import generate_text
    from pvq.memory import resident_memory_bytes

    device = _default_device(args.device)
    model, tokenizer, what, threads, warm_s, rss0, rss1 = _load_for_generation(args, device, args.dtype, args.chat)
    print(f"{args.model}: {what}", file=sys.stderr)
    try:
        stats = generate_text(model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens, chat=args.chat,
                              out=sys.stdout)
    except ChatTemplateError as e:  # name the model whose template it is
        raise ChatTemplateError(f"{args.model}: {e}") from None
    mib = 2**20
    kernels = ", ".join(f"{k} ({n} layers)" for k, n in sorted(stats["kernels"].items())) or "torch F.linear (float)"
    lines = [
        f"prefill          {stats['prompt_tokens']} tokens in {stats['prefill_seconds']:.2f} s "
        f"({stats['prefill_tokens_per_second']:.1f} tokens/s)",
        f"decode           {stats['new_tokens']} tokens, {stats['decode_tokens_per_second']:.2f} tokens/s "
        f"(greedy, {threads})",
        f"kernels          {kernels}",
        f"warm-up          {warm_s:.2f} s before the prompt (loading the kernels' code: C built at install, numba "
        f"compiled once per machine and cached)",
    ]
    if rss0 is not None and rss1 is not None:
        lines.append(f"memory           +{(rss1 - rss0) / mib:.0f} MiB resident after load; "
                     f"{resident_memory_bytes() / mib:.0f} MiB now")
    print("\n" + "\n".join(lines), file=sys.stderr)
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from pvq.checkpoint import load_checkpoint, verify_checkpoint

    index = verify_checkpoint(args.checkpoint)
    model, _, info = load_checkpoint(args.checkpoint)  # decodes every layer once, loads the tokenizer
    st = info["stats"]
    print(f"{args.checkpoint}: ok: {len(index['files'])} files match their sha256; {st['quantized_layers']} quantized "
          f"layers decode ({st['bits_per_weight']:.4f} bits/weight, {st['quantized_bytes']} payload bytes)")
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from pvq.checkpoint.reencode import convert_checkpoint

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
    gains = layer_gains(model, args.pvq_group_size, args.layers)
    title = f"{args.model}{' rotated' if args.rotate else ''}: normalised group gains, D={args.pvq_group_size}"
    plot_gain_histograms(gains, args.out, quantity=args.quantity, title=title)
    print(f"{args.out}: {len(gains)} layers ({', '.join(g.name for g in gains)})")
    return 0


class _HelpFormatter(argparse.HelpFormatter):
    """--help shows every option's default (unless its help already states it)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text or action.default in (None, False, argparse.SUPPRESS)
                or (not action.option_strings and action.nargs not in ("?", "*"))):
            return text
        return text + " (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad command line is one line on stderr (and exit code 2), like every
    other error of the CLI; --help lists defaults."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pvq", description="Pyramid Vector Quantization for LLMs")
    sub = parser.add_subparsers(dest="command", required=True)
    # options of every command
    common = _Parser(add_help=False)
    out = common.add_argument_group("output")
    out.add_argument("--quiet", "-q", action="store_true",
                     help="no progress bars and no notices: only the result and errors")
    out.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="warning",
                     help="messages shown on stderr (info: one line per block and per layer)")
    out.add_argument("--debug", action="store_true", help="show the full traceback of an error")

    snr = sub.add_parser(
        "snr", parents=[common],
        help="SNR of PVQ vs scalar, Lloyd-Max, E8 and the Shannon bound on a Gaussian source (paper Fig. 3)",
    )
    snr.add_argument("--samples", type=POSITIVE, default=512, help="Gaussian rows of 1024 values (default 512)")
    snr.add_argument("--dims", type=int, nargs="+", default=[8, 16, 32, 64, 128], help="PVQ group sizes D")
    snr.add_argument("--seed", type=SEED, default=0)
    snr.add_argument("--plot", default="pvq_snr.png", help="output PNG (default pvq_snr.png)")
    snr.add_argument("--csv", default=None, help="also write the table as CSV")
    snr.add_argument("--quick", action="store_true", help="fewer samples and rates, for a smoke test")
    snr.set_defaults(func=_cmd_snr)

    q = sub.add_parser("quantize", parents=[common],
                       help="quantize a model into a packed checkpoint, load it back and measure it (the main job)",
                       description="Quantize MODEL into a packed checkpoint at --out, load it back and report bits "
                                   "per weight, size, quality against the float model, time and memory. Options "
                                   "are grouped by method: giving one of another method's is an error.")
    add_quantize_options(q)
    q.set_defaults(func=_cmd_quantize)

    ev = sub.add_parser("eval", parents=[common], help="WikiText-2 perplexity and zero-shot tasks of a float model or a packed checkpoint")
    ev.add_argument("model", help="packed checkpoint directory, hub id, local directory, .gguf, or smollm2-135m")
    ev.add_argument("--seqlen", type=SEQLEN, default=2048)
    ev.add_argument("--max-windows", type=NONNEGATIVE, default=0, help="first N windows only (0: all)")
    ev.add_argument("--batch-size", type=POSITIVE, default=1)
    ev.add_argument("--decode-once", action="store_true",
                    help="decode every quantized layer once and keep the float weights while evaluating (faster, "
                         "the float model's memory); default: packed, each forward decodes layer by layer")
    ev.add_argument("--eval-text", default=None,
                    help="WikiText-2 raw test file (default: $PVQ_WIKITEXT2_TEST, else the datasets cache or hub, "
                         "else ../shared/assets)")
    ev.add_argument("--json", default=None, help="also write the result as JSON")
    ev.add_argument("--device", default="auto", help="where the model runs (auto: cuda if present, else cpu)")
    ev.add_argument("--tasks", default=None,
                    help="zero-shot tasks scored by lm-evaluation-harness, comma-separated: 'all' (the six local "
                         "tasks piqa, arc_easy, arc_challenge, hellaswag, winogrande, lambada_openai, served from "
                         "--tasks-dir) or any lm-eval task name (its data from the datasets cache or the hub)")
    ev.add_argument("--limit", type=POSITIVE, default=None, help="first N items of each task only (quick runs)")
    ev.add_argument("--tasks-dir", default=None,
                    help="task data folder (default: $PVQ_TASKS_DIR, else ../shared/assets/tasks beside the checkout)")
    ev.add_argument("--task-batch-size", type=POSITIVE, default=16, help="sequences per forward when scoring tasks")
    ev.add_argument("--bootstrap-iters", type=NONNEGATIVE, default=1000,
                    help="lm-eval's bootstrap resamples for the stderr of perplexity-like metrics (0: no stderr at all)")
    ev.add_argument("--no-ppl", action="store_true", help="skip WikiText-2 perplexity (tasks only)")
    add_act_options(ev)
    ev.set_defaults(func=_cmd_eval)

    sw = sub.add_parser(
        "sweep", parents=[common], help="a grid of methods x bit widths on one model: points (resumable), results.csv/.md, Pareto plots",
        description="bits per method: rtn/gptq integer bits with a float16 scale and zero point per --group-size "
                    "columns (b + (16 + b)/g); pvq D=--pvq-group-size (16) with b shape bits and 4-bit fitted gains "
                    "(b + 4/16 = b + 0.25, plus a float16 norm per row); gptvq 2-D vectors with b index bits and "
                    "codebooks costing <= 0.25 bits per weight. Every other setting is the method's default (pvq "
                    "quantize's). Each point is also fine-tuned, as pvq quantize does by default: a fine-tuned point "
                    "beside each one-shot point (the same quantization serves both; the plots draw the fine-tuned "
                    "curves dashed); --fast sweeps the one-shot points only.")
    from pvq.sweep import SweepOptions

    add_setting_options(sw, SweepOptions)  # every flag from SweepOptions' fields (pvq.settings)
    sw.set_defaults(func=_cmd_sweep)

    gen = sub.add_parser("generate", parents=[common], help="stream greedy text from a pvq checkpoint (or a float model) and time it")
    gen.add_argument("model", help="pvq checkpoint directory, or a float model: hub id, local directory, .gguf, smollm2-135m")
    gen.add_argument("--prompt", required=True, help="the text to continue")
    gen.add_argument("--max-new-tokens", type=POSITIVE, default=64, help="tokens to generate (default 64)")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    gen.add_argument("--device", default="cpu", help="cpu (default), cuda, or auto")
    gen.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                     help="dtype of the dense tensors and the compute (default float32)")
    gen.add_argument("--threads", type=NONNEGATIVE, default=0, help="torch threads (default: torch's default)")
    gen.add_argument("--layout", default="auto", choices=["auto", "packed", "int8", "int4"],
                     help="how PVQ layers are held while generating: packed: the stored codes (the smallest, slowest); "
                          "int4 / int8: transcoded at load to small-integer points + a float32 scale per group (about "
                          "0.75 / 1.25 bytes per weight at D=16); auto: int4 where it holds every PVQ layer, else "
                          "packed (default: auto)")
    gen.add_argument("--no-verify", action="store_true",
                     help=f"load a pvq checkpoint without its integrity check (e.g. one saved by plain "
                          f"save_pretrained, which writes no {'pvq_index.json'})")
    gen.set_defaults(func=_cmd_generate)

    chat = sub.add_parser("chat", parents=[common], help="talk to a model: a multi-turn conversation in the terminal "
                                                         "(chat template, streamed replies, KV cache kept between turns)")
    chat.add_argument("model", help="pvq checkpoint directory, or a float model: hub id, local directory, .gguf, smollm2-135m")
    chat.add_argument("--system", default=None, help="a system message to start the conversation with")
    chat.add_argument("--max-new-tokens", type=POSITIVE, default=256, help="longest reply in tokens (default 256)")
    chat.add_argument("--layout", default="auto", choices=["auto", "packed", "int8", "int4"],
                      help="as for `pvq generate` (default: auto)")
    chat.add_argument("--threads", type=NONNEGATIVE, default=0, help="torch threads (default: torch's default)")
    chat.add_argument("--no-verify", action="store_true", help="load a pvq checkpoint without its integrity check")
    chat.set_defaults(func=_cmd_chat)

    ver = sub.add_parser("verify", parents=[common], help="check a pvq checkpoint: every file's sha256, every layer's payload decodes")
    ver.add_argument("checkpoint")
    ver.set_defaults(func=_cmd_verify)

    conv = sub.add_parser("convert", parents=[common], help="rewrite an older checkpoint (pvq 0.1 manifest.json, or Fischer-ordered "
                          "PVQ codes) in the current format, PVQ codes in the split order the fast kernels read")
    conv.add_argument("old", help="the checkpoint directory to convert")
    conv.add_argument("new", help="the directory to write")
    conv.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint at NEW")
    conv.add_argument("--max-shard-size", default=None, help="largest safetensors shard (default: transformers')")
    conv.set_defaults(func=_cmd_convert)

    pl = sub.add_parser("plot", help="plots of a model")
    plot_sub = pl.add_subparsers(dest="plot", required=True)
    pg = plot_sub.add_parser(
        "gains", parents=[common], help="histograms of normalised group gains against the Beta(D/2, D(G-1)/2) law (paper 3.4, App. D)")
    pg.add_argument("model", help="hub id, local directory, .gguf, or smollm2-135m")
    from pvq.settings import default_of

    pg.add_argument("--pvq-group-size", type=POSITIVE, default=default_of(SweepOptions, "pvq_group_size"),
                    help="D, columns per group (default: PVQ's, %(default)s)")
    pg.add_argument("--rotate", action="store_true", help="rotate the model first (the paper's setting)")
    pg.add_argument("--rotate-seed", type=SEED, default=0)
    pg.add_argument("--layers", nargs="+", default=None,
                    help="layer names (default: q/o/up/down_proj of the first, middle and last block)")
    pg.add_argument("--quantity", choices=["energy", "gain"], default="energy",
                    help="plot u = ||w_g||^2/||w||^2 (Beta density) or the gain sqrt(u) (transformed density)")
    pg.add_argument("--out", default="gains.png")
    pg.set_defaults(func=_cmd_plot_gains)
    return parser


def _configure_output(args: argparse.Namespace) -> None:
    """Progress bars and log messages as --quiet and --log-level say."""
    import logging

    from pvq.progress import set_progress

    quiet = getattr(args, "quiet", False)
    set_progress(not quiet)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    logger = logging.getLogger("pvq")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel("ERROR" if quiet else getattr(args, "log_level", "warning").upper())
    if quiet:  # transformers' own bars (GGUF conversion, weight loading) and notices
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args, unknown = parser.parse_known_args(argv)
    except SystemExit as e:  # --help (0), or a bad command line, already printed in one line (2)
        return e.code if isinstance(e.code, int) else 2
    if unknown:
        print(f"pvq {args.command}: error: unrecognized arguments: {' '.join(unknown)} (see pvq {args.command} "
              "--help)", file=sys.stderr)
        return 2
    import logging

    from pvq.progress import progress_enabled, set_progress

    logger = logging.getLogger("pvq")
    saved = (logger.handlers[:], logger.propagate, logger.level, progress_enabled())
    _configure_output(args)
    try:
        return args.func(args)
    except (PVQError, OSError) as e:  # the message says what to change (OSError: names the file)
        if getattr(args, "debug", False):
            raise
        message = " ".join(str(e).split())  # one line, whatever the library's message looked like
        print(f"pvq {args.command}: error: {message}", file=sys.stderr)
        return 2
    except Exception as e:  # an I/O failure a library reports in its own type (safetensors: a full disk)
        from pvq.fileio import as_os_error

        if as_os_error(e) is None or getattr(args, "debug", False):
            raise
        print(f"pvq {args.command}: error: {' '.join(str(e).split())[:300]}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if getattr(args, "debug", False):
            raise
        import signal

        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not interrupt the message
        print(f"pvq {args.command}: interrupted"
              + ("; rerun the same command to resume from the finished blocks, if any" if args.command == "quantize"
                 else ""), file=sys.stderr)
        return 130
    finally:  # main() called in-process (tests, scripts) leaves logging and progress bars as it found them
        logger.handlers[:] = saved[0]
        logger.propagate = saved[1]
        logger.setLevel(saved[2])
        set_progress(saved[3])


if __name__ == "__main__":
    sys.exit(main())
