"""The main job: quantize a model, write the packed checkpoint, load it back, measure it.

`run_quantize_job` is what `pvq quantize` runs; it returns the report it prints so that
tests and benchmarks can read the same figures a user sees.

Over 500 lines because it is the main job's stages (quantize, save, reload, measure)
and the report a user reads, which the benchmarks read too.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch

from pvq.errors import PVQError
from pvq.eval.perplexity import (
    EvalDataError,
    EvalText,
    next_token_agreement,
    perplexity_details,
    wikitext2_test,
)
from pvq.calibrate.finetune import FinetuneConfig
from pvq.checkpoint import check_destination, load_checkpoint, save_checkpoint, shard_size_bytes
from pvq.checkpoint.index import RECIPE_FILE
from pvq.runtime import decoded_weights
from pvq.memory import (
    MemoryPlan,
    MemoryPlanError,
    available_host_bytes,
    check_fits,
    peak_memory_bytes,
    plan_job_memory,
    reset_peak_memory,
    resident_memory_bytes,
)
from pvq.models import adapter_for, load_model, start_token_id
from pvq.oneshot import Recipe, oneshot
from pvq.calibrate import encode_text, sample_windows
from pvq.calibrate.records import jsonable
from pvq.calibrate.workdir import check_claimable
from pvq.methods import get_method
from pvq.activations import act_quant_summary
from pvq.settings import DEFAULT_MODEL, HESSIAN_METHODS, EvalSettings, setting

log = logging.getLogger(__name__)



class JobError(PVQError, ValueError):
    """Job options that cannot run on the chosen model."""


@dataclass(kw_only=True)
class JobOptions(Recipe, EvalSettings):
    """The main job: a `Recipe` (what decides the checkpoint), the evaluation after it
    (`EvalSettings`; eval_windows None: all) and where and how to run it. Each field is
    declared once, with the flag `pvq quantize` offers for it (`pvq.options`)."""

    model: str = setting(DEFAULT_MODEL, "hub id, local directory, .gguf file, or the demo alias smollm2-135m")
    out: str = setting("pvq-out", "checkpoint directory to write", stored=False, in_recipe=False)
    overwrite: bool = setting(False, "replace an existing checkpoint at --out", stored=False, in_recipe=False)
    max_shard_size: str | None = setting(  # transformers' default when None
        None, "largest safetensors shard, e.g. 2GB or 500MB (default: transformers' 50GB)", stored=False)
    work_dir: str | None = setting(  # resumable state; default <out>.work
        None, "resumable state (default: <out>.work); a rerun continues there", stored=False, in_recipe=False)
    device: str = setting("cpu", "compute device for one block at a time (auto: cuda if present)",
                          option_default="auto", stored=False)
    # read the model block by block from its safetensors shards (pvq.models.streaming): the
    # float model is never held whole, neither for quantizing nor for the evaluation
    stream: bool = setting(False, "read the model block by block from its safetensors shards: the float model is "
                           "never held whole (a local directory; needs --calib-text)", stored=False)
    # print the predicted memory and disk use (pvq.memory) and stop
    dry_run: bool = setting(False, "print the predicted peak memory and disk use, then stop", stored=False)
    ignore_memory_check: bool = setting(False, "run even when the predicted peak memory exceeds what is available",
                                        stored=False, in_recipe=False)
    offload_activations: bool = setting(False, "keep the calibration activations in the work directory, one file "
                                        "per batch, instead of in memory", methods=HESSIAN_METHODS, group="hessian",
                                        stored=False)
    evaluate: bool = setting(True, "skip perplexity and agreement with the float model", option="no_eval",
                             negate=True, group="eval", stored=False)
    agreement_windows: int = 8
    # the settings that made this checkpoint (pvq.options.recipe_text), stored in it as
    # recipe.yaml so that `pvq quantize --recipe CKPT/recipe.yaml` makes it again
    recipe_text: str | None = None


def _distinct(tensors):
    """The tensors, tied ones (one storage, or one meta tensor object) once."""
    seen = set()
    for t in tensors:
        key = id(t) if t.device.type == "meta" else t.data_ptr()
        if key not in seen:
            seen.add(key)
            yield t


def float_model_memory_bytes(model: torch.nn.Module) -> int:
    """Bytes the model's parameters and buffers take in their dtypes (tied tensors once);
    for a streamed skeleton, what the whole model would take."""
    return sum(t.numel() * t.element_size() for t in _distinct([*model.parameters(), *model.buffers()]))


def float_model_bytes(model: torch.nn.Module, bytes_per_value: int = 2) -> int:
    """Size of the model's parameters stored in 16 bits (tied tensors once)."""
    return sum(p.numel() * bytes_per_value for p in _distinct(model.parameters()))


def dir_bytes(path: str | Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def run_quantize_job(opts: JobOptions) -> dict[str, Any]:
    """The main job (module docstring). Under torchrun every rank runs it: the ranks share
    the calibration and the layers (`pvq.calibrate.distributed`), rank 0 writes the
    checkpoint and evaluates it, and the other ranks return {"rank": r} once it is written."""
    from pvq.calibrate.distributed import barrier, init_from_environment

    t_start = time.perf_counter()
    w = init_from_environment(opts.device)
    if w.active and opts.device.startswith("cuda"):
        import os

        opts = replace(opts, device=f"cuda:{os.environ.get('LOCAL_RANK', '0')}")
    recipe = Recipe(**{f.name: getattr(opts, f.name) for f in fields(Recipe)} | {"config": dict(opts.config)})
    get_method(opts.method)  # an unknown method fails here, naming the known ones
    recipe.check()  # bad settings fail here, before the model is loaded
    config = recipe.method_config()
    # everything that can fail after the long part is checked before it
    check_destination(Path(opts.out), opts.overwrite)
    work_dir = opts.work_dir or f"{opts.out.rstrip('/')}.work"
    out_r, work_r = Path(opts.out).resolve(), Path(work_dir).resolve()
    if out_r == work_r or out_r in work_r.parents or work_r in out_r.parents:
        raise JobError(f"--work-dir {work_dir} and --out {opts.out} must be separate directories")
    if recipe.needs_calibration() and w.rank == 0:  # rank 0 claims it for every rank (pipeline)
        check_claimable(Path(work_dir))
    if opts.max_shard_size is not None:
        shard_size_bytes(opts.max_shard_size)
    for what, n in (("--calib-windows", opts.calib_windows), ("--batch-size", opts.batch_size),
                    ("--agreement-windows", opts.agreement_windows)):
        if n < 1:
            raise JobError(f"{what} must be at least 1, got {n}")
    if opts.eval_windows is not None and opts.eval_windows < 1:
        raise JobError(f"--eval-windows must be at least 1 (0 on the command line: all), got {opts.eval_windows}")
    if opts.stream:
        _check_streamable(opts, recipe)
    eval_text, eval_missing = None, None
    if opts.evaluate:
        try:
            eval_text = wikitext2_test(opts.eval_text)
        except EvalDataError as e:
            if opts.eval_text is not None:
                raise
            eval_missing = str(e)
            log.warning("%s; the quantized model will be compared with the float model on held-out text sampled "
                        "from the float model (KL, top-1 agreement; no perplexity)", e)

    plan = _memory_plan(opts, recipe, config, w, eval_text)
    available = available_host_bytes()
    if opts.dry_run:
        print(plan.describe(available))
    if not opts.ignore_memory_check:
        try:
            check_fits(plan, available)
        except MemoryPlanError as e:
            raise JobError(str(e)) from None
    if opts.dry_run:
        return {"dry_run": True, "model": opts.model, "memory_plan": asdict(plan), "predicted_peak_memory_bytes":
                plan.peak_bytes, "available_memory_bytes": available}
    stream = None
    if opts.stream:
        model, tokenizer, source, stream = _open_stream(opts.model)
    else:
        model, tokenizer, source = load_model(opts.model, device="cpu")
    adapter_for(model)  # an unsupported architecture is refused before calibration and quantization
    positions = getattr(model.config, "max_position_embeddings", None)
    for what, n in (("--calib-seqlen", opts.calib_seqlen), ("--eval-seqlen", opts.eval_seqlen)):
        if isinstance(positions, int) and n > positions:
            raise JobError(f"{what} {n} is longer than the model's {positions} positions")
        if n < 2:
            raise JobError(f"{what} must be at least 2, got {n}")
    model_memory = float_model_memory_bytes(model)
    float16_bytes = float_model_bytes(model)

    # Calibration windows first (sampled from the float model, or tokenized from a file), then
    # the quantization's own memory: what the process holds beyond what it held before
    # (runtime, the float model, the windows) at the phase's peak; the model is quantized in place.
    t0 = time.perf_counter()
    windows, calibration = recipe.calibration(model, tokenizer, can_sample=stream is None)
    calib_seconds = time.perf_counter() - t0
    peak_before = peak_memory_bytes()
    rss_before = resident_memory_bytes()
    peak_reset = reset_peak_memory() and rss_before is not None
    result = oneshot(model, tokenizer, recipe, windows=windows, device=opts.device, work_dir=work_dir, stream=stream,
                     offload_activations=opts.offload_activations)
    quant_peak = peak_memory_bytes()
    if w.rank != 0:
        barrier(w)  # rank 0 has written the checkpoint
        return {"rank": w.rank, "world_size": w.size, "quantized_layers": len(result.quantized)}

    quantized = result.quantized
    layer_report = [
        {"layer": r.name, "proxy_loss": r.proxy_loss, "bits_per_weight": r.bits_per_weight, "seconds": r.seconds,
         **({"tokens": r.tokens} if r.tokens is not None else {}),
         **({"force_routed": True} if r.force_routed else {})}
        for r in quantized.report
    ]
    report: dict[str, Any] = {
        "model": opts.model,
        "method": opts.method,
        "config": asdict(config),
        "checkpoint": str(opts.out),
        "bits_per_weight_nominal": result.bits_per_weight_nominal,
        "bits_per_weight_measured": quantized.measured_bits_per_weight,
        "float16_model_bytes": float16_bytes,
        "float_model_memory_bytes": model_memory,
        "quantization_peak_memory_bytes": quant_peak,
        "memory_before_quantization_bytes": rss_before,
        # None where the phase's peak cannot be isolated (no resettable VmHWM)
        "quantization_working_memory_bytes": quant_peak - rss_before if peak_reset else None,
        "quantized_layers": len(quantized),
        "calibration_seconds": calib_seconds,
        "calibration_data": calibration,
        "quantization_seconds": result.seconds["quantization"],
        "block_seconds": quantized.block_seconds,
        "rotation": rotation_summary(result.rotation),
        "rotation_seconds": result.seconds["rotation"],
        "act_quant": act_quant_summary(result.act_record),
        "bits_per_activation": _mean_bits_per_activation(model, result.act_record) if result.act_record else None,
        "mean_proxy_loss": _mean([r["proxy_loss"] for r in layer_report]),
        "experts": quantized.experts_summary(),
        "allocation": result.allocation.to_dict() if result.allocation is not None else None,
        "allocation_seconds": result.seconds["allocation"],
        "finetune": asdict(result.finetune) if result.finetune is not None else None,
        "finetune_seconds": result.seconds["finetune"],
        "embeddings": result.embeddings,
        "predicted_memory": plan.phases,
        "predicted_peak_memory_bytes": plan.peak_bytes,
        "streamed": opts.stream,
        "source": jsonable(source),
        "recipe": recipe.to_dict(),
    }
    save_checkpoint(model, opts.out, tokenizer=tokenizer, overwrite=opts.overwrite, max_shard_size=opts.max_shard_size,
                    report={"layers": layer_report, "source": jsonable(source), "recipe": recipe.to_dict()},
                    extra_files={RECIPE_FILE: opts.recipe_text} if opts.recipe_text is not None else None)
    report["checkpoint_bytes"] = dir_bytes(opts.out)
    # every byte counted: all the stored tensors (packed layers, embedding, norms, head) per parameter
    tensor_bytes = sum(f.stat().st_size for f in Path(opts.out).glob("*.safetensors"))
    report["tensor_file_bytes"] = tensor_bytes
    report["parameters"] = float16_bytes // 2
    report["bits_per_parameter_whole_model"] = tensor_bytes * 8 / report["parameters"]
    report["world_size"] = w.size
    barrier(w)

    if opts.evaluate:
        del model, result, quantized, stream  # the float reference is loaded (or streamed) afresh
        loaded, _, info = load_checkpoint(opts.out)
        t0 = time.perf_counter()
        if opts.stream:  # packed layers through the kernels: decoding them all would hold a float copy
            _evaluate_streamed(report, opts, tokenizer, loaded, eval_text)
        else:
            reference, _, _ = load_model(opts.model, device="cpu")
            # evaluation runs many forwards: each quantized layer is decoded once for it (same outputs
            # as the packed path, which decodes layer by layer in every forward)
            with decoded_weights(loaded):
                _evaluate(report, opts, tokenizer, reference, loaded, eval_text)
        if eval_missing is not None:
            report["eval_data_missing"] = eval_missing
        report.update(
            eval_seconds=time.perf_counter() - t0,
            loaded_model_bytes=info["stats"]["quantized_bytes"] + info["stats"]["dense_bytes_in_memory"],
        )
    report["wall_seconds"] = time.perf_counter() - t_start
    report["peak_memory_bytes"] = max(peak_before, peak_memory_bytes())
    # the job's report (timings) lives beside the checkpoint files, outside its integrity index
    Path(opts.out, "job_report.json").write_text(json.dumps(report, indent=2, sort_keys=True, allow_nan=False) + "\n")
    return report


def _evaluate(report: dict[str, Any], opts: JobOptions, tokenizer, reference, loaded, eval_text: EvalText | None) -> None:
    """Perplexity of both models (when there is evaluation text), KL and top-1 agreement."""
    if eval_text is not None:
        ids = encode_text(tokenizer, eval_text.text)
        ppl_float = perplexity_details(reference, ids, seqlen=opts.eval_seqlen, max_windows=opts.eval_windows)
        ppl_quant = perplexity_details(loaded, ids, seqlen=opts.eval_seqlen, max_windows=opts.eval_windows)
        report.update(ppl_float=ppl_float.ppl, ppl_quantized=ppl_quant.ppl, eval_windows=ppl_quant.n_windows,
                      eval_data=eval_text.describe())
        n_agree = min(opts.agreement_windows, ppl_quant.n_windows)
        agree_ids = ids[: n_agree * opts.eval_seqlen]
    else:  # no evaluation text: held-out text sampled from the float model (another seed than calibration)
        agree_ids = sample_windows(reference, opts.agreement_windows, opts.eval_seqlen, opts.seed + 1,
                                   start_token_id(tokenizer, reference))
        report["eval_data"] = (f"{opts.agreement_windows} held-out windows sampled from the float model "
                               f"(seed {opts.seed + 1}); no WikiText-2 test text found")
    act_seconds = act_quant_seconds(loaded)
    agreement = next_token_agreement(reference, loaded, agree_ids, seqlen=opts.eval_seqlen, progress=True)
    report.update(eval_seqlen=opts.eval_seqlen, kl_vs_float=agreement["kl"],
                  top1_agreement=agreement["top1_agreement"], agreement_tokens=agreement["n_tokens"])
    if act_seconds is not None:
        report["act_quant_seconds_in_ppl"] = act_seconds


def _memory_plan(opts: JobOptions, recipe: Recipe, config, w, eval_text: EvalText | None) -> MemoryPlan:
    """pvq.memory's prediction for this job (every process of a torchrun job on this host
    together), from the model's config alone."""
    import os

    from pvq.models.loading import load_config

    model_config = load_config(opts.model)
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    bpw = get_method(opts.method).nominal_bits_per_weight(config, text.hidden_size)
    eval_windows = opts.eval_windows
    if eval_windows is None:  # all of the text: estimated at 4 characters per token
        eval_windows = len(eval_text.text) // 4 // opts.eval_seqlen if eval_text is not None else 0
    return plan_job_memory(model_config, bits_per_weight=bpw, calib_windows=opts.calib_windows,
                           calib_seqlen=opts.calib_seqlen, batch_size=opts.batch_size,
                           compute_dtype_bytes=torch.finfo(getattr(torch, opts.compute_dtype)).bits // 8,
                           eval_windows=eval_windows, eval_seqlen=opts.eval_seqlen, evaluate=opts.evaluate,
                           stream=opts.stream, calibrate=recipe.needs_calibration(),
                           offload_activations=opts.offload_activations,
                           processes=w.size, local_processes=int(os.environ.get("LOCAL_WORLD_SIZE", w.size)),
                           **_finetune_memory(opts, recipe),
                           **({"shard_bytes": shard_size_bytes(opts.max_shard_size)} if opts.max_shard_size else {}))


def _finetune_memory(opts: JobOptions, recipe: Recipe) -> dict[str, Any]:
    """plan_job_memory's fine-tuning arguments: the teacher's k, the bytes a weight's codes
    take while tuned, whether codes move."""
    if opts.finetune is None or recipe.method is None:
        return {}
    config = FinetuneConfig(**opts.finetune)
    method_config = recipe.method_config()
    code_bytes = {"pvq": 1.0, "rtn": 2.0, "gptq": 2.0}.get(recipe.method)
    if code_bytes is None:  # gptvq: an int64 assignment per vector of d weights
        code_bytes = 8.0 / int(getattr(method_config, "dim", 1))
    elif recipe.method == "pvq" and getattr(method_config, "gain", "fp16") != "fp16":  # an int64 gain index a group
        code_bytes += 8.0 / int(method_config.group_size)
    return {"finetune_topk": config.teacher_topk, "code_bytes": code_bytes, "code_updates": config.code_fraction > 0}


def _check_streamable(opts: JobOptions, recipe: Recipe) -> None:
    """--stream settings that cannot work, refused before any model is read."""
    from pvq.models import resolve_spec

    spec = resolve_spec(opts.model)
    if spec["kind"] != "local":
        raise JobError(f"--stream reads a local checkpoint directory of safetensors shards; {opts.model!r} is a "
                       f"{spec['kind']} model (download or convert it to a directory first, or drop --stream)")
    obstacle = recipe.stream_obstacle(windows_given=False)
    if obstacle is not None:
        raise JobError(f"--stream: {obstacle}")


def _open_stream(spec: str):
    """(skeleton model, tokenizer, source info, StreamedModel) of a local checkpoint directory."""
    from transformers import AutoTokenizer

    from pvq.models import resolve_spec
    from pvq.models.streaming import StreamedModel

    info = {"spec": spec, **resolve_spec(spec)}
    t0 = time.perf_counter()
    stream = StreamedModel(info["path"])
    tokenizer = AutoTokenizer.from_pretrained(info["path"], local_files_only=True)
    model = stream.model
    info.update(model_type=model.config.model_type, architecture=type(model).__name__,
                parameters=sum(p.numel() for p in model.parameters()), dtype="float32", device="cpu",
                load_seconds=round(time.perf_counter() - t0, 3), streamed=True)
    return model, tokenizer, info, stream


def _evaluate_streamed(report: dict[str, Any], opts: JobOptions, tokenizer, loaded, eval_text: EvalText | None) -> None:
    """`_evaluate` for a streamed job: the float reference runs block by block from the shards."""
    from pvq.eval.perplexity import token_windows
    from pvq.eval.streamed import streamed_comparison, streamed_reference
    from pvq.models import resolve_spec
    from pvq.models.streaming import StreamedModel

    if eval_text is None:
        report["eval_data"] = "not measured: no evaluation text (a streamed float model cannot be sampled from)"
        return
    windows = token_windows(encode_text(tokenizer, eval_text.text), opts.eval_seqlen, opts.eval_windows)
    reference = streamed_reference(StreamedModel(resolve_spec(opts.model)["path"]), windows)
    comparison = streamed_comparison(reference, loaded, min(opts.agreement_windows, windows.shape[0]))
    report.update(ppl_float=comparison["ppl_float"], ppl_quantized=comparison["ppl_quantized"],
                  eval_windows=comparison["n_windows"], eval_data=eval_text.describe(), eval_seqlen=opts.eval_seqlen,
                  kl_vs_float=comparison["kl"], top1_agreement=comparison["top1_agreement"],
                  agreement_tokens=comparison["n_tokens"])


def rotation_summary(record: dict[str, Any] | None) -> str | None:
    """One line describing a rotation record (None: not rotated)."""
    if record is None:
        return None
    res = record["residual"]
    parts = [f"residual {res['n']} = {res['K']}x{res['n'] // res['K']} {res['construction']}",
             f"per-head V/O {record['head_dim']}"]
    if record["online"]:
        on = next(iter(record["online"].values()))
        parts.append(f"online before down_proj {on['n']} = {on['K']}x{on['n'] // on['K']} {on['construction']}")
    return f"randomized Hadamard, seed {record['seed']}: " + ", ".join(parts)


def _mean_bits_per_activation(model: torch.nn.Module, record: dict[str, Any]) -> float:
    """Bits per activation value averaged over the quantized inputs of one token (each
    layer's input width weighted once; layers sharing an input count separately)."""
    per_width = {int(w): v for w, v in record["bits_per_value"].items()}
    widths = [model.get_submodule(name).in_features for name in record["layers"]]
    return sum(per_width[w] * w for w in widths) / sum(widths)


def act_quant_seconds(model: torch.nn.Module) -> float | None:
    """Seconds the model's activation quantizers have spent so far (None: it has none)."""
    from pvq.activations import ActQuantizer

    found = [m.seconds for m in model.modules() if isinstance(m, ActQuantizer)]
    return sum(found) if found else None


def _experts_line(summary: dict[str, Any]) -> str:
    forced = summary["force_routed"]
    text = (f"experts          {summary['experts']} quantized; calibration tokens routed per expert "
            f"{summary['min_tokens']}..{summary['max_tokens']}")
    if forced:
        shown = ", ".join(f"{k} ({summary['per_expert'][k]['tokens']})" for k in forced[:4])
        text += (f"; {len(forced)} with fewer than the hidden size force-routed for their Hessians: {shown}"
                 + (" ..." if len(forced) > 4 else "") + " (every expert: job_report.json)")
    return text


def format_report(report: dict[str, Any]) -> str:
    mib = 2**20
    lines = [
        f"model            {report['model']}",
        f"method           {report['method']}  {json.dumps(report['config'], sort_keys=True)}",
        *([f"calibration      {report['calibration_data']}"] if report.get("calibration_data", "none") != "none" else []),
        f"bits/weight      nominal {report['bits_per_weight_nominal']:.4f}   measured {report['bits_per_weight_measured']:.4f}"
        f"   ({report['quantized_layers']} quantized linear layers)",
        f"whole model      {report['bits_per_parameter_whole_model']:.4f} bits per parameter: "
        f"{report['tensor_file_bytes'] / mib:.1f} MiB of safetensors for {report['parameters'] / 1e6:.1f}M parameters "
        "(the quantized linears above, the embedding, norms and head as stored)",
        f"size             checkpoint {report['checkpoint_bytes'] / mib:.1f} MiB   vs float16 model "
        f"{report['float16_model_bytes'] / mib:.1f} MiB   ({report['checkpoint_bytes'] / report['float16_model_bytes']:.3f}x)",
        "proxy loss       " + (f"mean over layers {report['mean_proxy_loss']:.4g}" if report["mean_proxy_loss"] is not None
                                 else "none (the method uses no Hessian)"),
    ]
    if report.get("experts"):
        lines.append(_experts_line(report["experts"]))
    if report.get("allocation"):
        a = report["allocation"]
        spread = ", ".join(f"{k}: {v}" for k, v in a["histogram"].items())
        lines.append(f"bit allocation   target {a['target_bpw']:g} bits/weight, {a['bits_per_weight']:.4f} allocated "
                     f"(layers by {a['field']}: {spread}; {report['allocation_seconds']:.0f} s)")
    if report.get("finetune"):
        f = report["finetune"]
        codes = (f"{f['codes_moved']} of {f['code_groups']} code groups moved ({f['code_rounds_kept']} of "
                 f"{f['code_rounds']} code updates kept)" if f.get("code_rounds") else "codes unchanged")
        lines.append(f"fine-tuning      {f['steps']} steps, kept step {f['best_step']}"
                     f"{' (stopped early)' if f['stopped_early'] else ''}: held-out top-{f['teacher_topk']} KL "
                     f"{f['val_kl_before']:.4f} -> {f['val_kl_stored']:.4f} nats/token as stored; "
                     f"{f['trained_values']} continuous values trained, {codes}; {report['finetune_seconds']:.0f} s"
                     + ("; no gain: the one-shot model was kept" if f["kept"] == "one-shot" else "")
                     + (f"; {f['diverged']}" if f.get("diverged") else ""))
    if report.get("embeddings"):
        e = report["embeddings"]
        head = ("the tied head served from the same table" if e["tied"] else
                f"the head {e['head']!r} quantized the same way" if e["head"] else "no head")
        lines.append(f"embedding        {e['embedding']!r} round-to-nearest, {e['config']['bits']} bits, a float16 scale "
                     f"and zero point per {e['config']['group_size']} columns; {head}")
    if report.get("rotation"):
        lines.append(f"rotation         {report['rotation']}")
    if report.get("act_quant"):
        lines.append(f"activations      {report['act_quant']}")
        lines.append(f"bits/activation  {report['bits_per_activation']:.4f} (mean over the quantized layer inputs)")
    if "ppl_quantized" in report:
        lines.append(f"perplexity       {report.get('eval_data', 'WikiText-2 test')}, {report['eval_windows']} windows x "
                     f"{report['eval_seqlen']}: "
                     f"float {report['ppl_float']:.2f}   quantized {report['ppl_quantized']:.2f}")
    elif "eval_data" in report:
        lines.append(f"perplexity       not measured: {report['eval_data']}")
    if "kl_vs_float" in report:
        lines.append(f"vs float         KL {report['kl_vs_float']:.4f} nats/token   top-1 agreement "
                     f"{100 * report['top1_agreement']:.1f}% ({report['agreement_tokens']} tokens)")
        if report.get("loaded_model_bytes") is not None:
            lines.append(
                f"loaded model     {report['loaded_model_bytes'] / mib:.1f} MiB of tensors after pvq.load (packed "
                f"payloads + the float32 norms and any dense embedding or head) vs {report['float_model_memory_bytes'] / mib:.1f} MiB for "
                f"the float model ({report['loaded_model_bytes'] / report['float_model_memory_bytes']:.3f}x); "
                "`pvq generate` reports resident memory")
        if report.get("act_quant_seconds_in_ppl") is not None:
            lines.append(f"act. quantizer   {report['act_quant_seconds_in_ppl']:.1f} s of the quantized model's perplexity "
                         f"run (simulated quantization, host)")
    lines += [
        f"time             total {report['wall_seconds']:.0f} s (calibration data {report['calibration_seconds']:.0f} s, "
        f"quantization {report['quantization_seconds']:.0f} s"
        + (f", fine-tuning {report['finetune_seconds']:.0f} s" if report.get("finetune") else "") + ")",
        _memory_line(report),
        f"checkpoint       {report['checkpoint']}",
    ]
    return "\n".join(lines)


def _memory_line(report: dict[str, Any]) -> str:
    mib = 2**20
    model = report["float_model_memory_bytes"]
    work = report["quantization_working_memory_bytes"]
    if report.get("streamed"):
        phase = (f"quantization {report['quantization_peak_memory_bytes'] / mib:.0f} MiB at its peak, streamed: "
                 f"{report['quantization_peak_memory_bytes'] / model:.2f}x the float32 model ({model / mib:.0f} MiB, "
                 "never held whole)")
    elif work is None:
        phase = f"quantization phase peak {report['quantization_peak_memory_bytes'] / mib:.0f} MiB (process peak)"
    else:
        what = "quantization" + (" and fine-tuning" if report.get("finetune") else "")
        phase = (f"{what} {report['quantization_peak_memory_bytes'] / mib:.0f} MiB at its peak = "
                 f"{report['memory_before_quantization_bytes'] / mib:.0f} MiB held before (runtime + float model "
                 f"{model / mib:.0f} MiB) + {work / mib:.0f} MiB working memory; float model + working memory = "
                 f"{(model + work) / model:.2f}x the float model")
    return (f"peak memory      {phase}; whole job {report['peak_memory_bytes'] / mib:.0f} MiB (predicted "
            f"{report['predicted_peak_memory_bytes'] / mib:.0f} MiB, pvq.memory)")


def _mean(values):
    """Mean of the values that exist; None when none does (valid JSON, unlike NaN)."""
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None
