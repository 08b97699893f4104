"""Runtime of the demo model: float32, bfloat16, pvq checkpoints and llama.cpp, one table.

Run:  python bench/runtime.py --pvq pvq-out [--gptq gptq-out] [--threads 2] [--out bench-out/runtime.json]

Rows "pvq", "pvq-int8" and "pvq-int4" load the same checkpoint in the packed (as stored)
and the two compute layouts (`pvq.load(..., layout=...)`), with the threads `pvq generate`
uses for a quantized model (`runtime_threads`: the kernels take --threads; torch's ops take
one thread in a decode step, --threads in the prefill). Every row runs in a fresh process (this script with --worker), so resident memory is that
of one model alone: the increase of VmRSS over the process after its imports (torch,
transformers, pvq, the Llama modelling code, the codec's compiled code, or llama_cpp) were
done, right after the load and again after the prefill and decode runs (a float model
loaded from safetensors is memory-mapped: its weights count once a forward has touched
them; "vs float32" compares the after-the-run figures). Per row:

* bytes: the checkpoint directory on disk (pvq rows), the GGUF file (llama.cpp), or the
  parameters at 4 / 2 bytes each (float32 / bfloat16 rows: what a safetensors file of them holds);
* load: seconds from the call to a model ready to run (pvq: `pvq.load`, verified, every
  layer decoded once as a check; float rows: transformers' `from_pretrained` of the model
  saved once as float32 safetensors in --float-dir, made from the GGUF when missing);
* warm-up (not in the table's speeds): one 8-token forward and one decode step first, where
  the kernels load their compiled code (numba's on-disk cache; compiled once per machine);
* prefill: tokens/s of one forward over `--prompt-tokens` tokens (KV cache on; the logits of
  the last position only, as transformers' `generate` asks for them);
* decode: tokens/s of `--new-tokens` greedy steps after it, one token per forward, KV cache;
* linear share: the fraction of the decode steps' time spent inside the linear layers
  (nn.Linear and QuantizedLinear forwards, timed with hooks in a second run of 8 decode steps);
* llama.cpp: the `llama-cpp-python` package on the demo model's original Q4_1 GGUF,
  `Llama.eval` for the prompt and then one token at a time, greedy (argmax of the logits),
  the same thread count; the row says "not installed" when the package is missing.
Token ids are drawn at random (seeded): speed does not depend on the text.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


ROWS = ("float32", "bfloat16", "pvq", "pvq-int8", "pvq-int4", "gptq", "llama.cpp")


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def _torch_worker(row: str, args) -> dict:
    import torch
    import transformers  # noqa: F401
    from transformers.models.llama import modeling_llama  # noqa: F401

    import pvq
    from pvq.runtime import QuantizedLinear
    torch.set_num_threads(args.threads)
    from pvq.generate import warm_imports

    source = {"pvq": args.pvq, "pvq-int8": args.pvq, "pvq-int4": args.pvq, "gptq": args.gptq}.get(row)
    warm_imports(source or args.float_dir)
    rss0 = _rss()
    t0 = time.perf_counter()
    if source is not None:
        layout = row.split("-")[1] if row.startswith("pvq-") else "packed"
        model, _, info = pvq.load(source, layout=layout, load_tokenizer=False)  # as the float rows: no tokenizer
        from pvq.runtime.cpu_kernels import runtime_threads

        runtime_threads(model, args.threads)  # as `pvq generate` runs a quantized model
        nbytes = sum(f.stat().st_size for f in Path(source).rglob("*") if f.is_file())
        what = f"{info['quantization_config']['method']} {info['stats']['bits_per_weight']:.3f} bpw, {layout} layout"
    else:
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[row]
        model = transformers.AutoModelForCausalLM.from_pretrained(args.float_dir, dtype=dtype, local_files_only=True)
        nbytes = sum(p.numel() for p in model.parameters()) * (4 if row == "float32" else 2)
        what = f"{row} (safetensors, transformers)"
    load_s = time.perf_counter() - t0
    rss = _rss() - rss0
    model.eval()
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (1, args.prompt_tokens), generator=gen)

    def run(hooks: bool, steps: int) -> tuple[float, float, float]:
        linear_s = [0.0]
        handles = []
        if hooks:
            starts = {}

            def pre(m, a):
                starts[id(m)] = time.perf_counter()

            def post(m, a, o):
                linear_s[0] += time.perf_counter() - starts.pop(id(m))

            for m in model.modules():
                if isinstance(m, (torch.nn.Linear, QuantizedLinear)):
                    handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = model(prompt, use_cache=True, logits_to_keep=1)  # as generate(): the last position's logits
            prefill = time.perf_counter() - t0
            past = out.past_key_values
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            linear_s[0] = 0.0
            t0 = time.perf_counter()
            for _ in range(steps):
                out = model(tok, past_key_values=past, use_cache=True)
                past = out.past_key_values
                tok = out.logits[:, -1].argmax(-1, keepdim=True)
            decode = time.perf_counter() - t0
        for h in handles:
            h.remove()
        return prefill, decode, linear_s[0]

    # warm-up outside the timed part: the kernels' first call loads their compiled code from
    # numba's on-disk cache (or compiles it, once per machine)
    t0 = time.perf_counter()
    with torch.inference_mode():
        warm = model(prompt[:, :8], use_cache=True)
        model(prompt[:, 8:9], past_key_values=warm.past_key_values, use_cache=True)
    del warm
    warm_s = time.perf_counter() - t0
    threads_note = (f"torch {args.threads}" if source is None else
                    f"kernels {args.threads}, torch ops 1 at one token, {args.threads} at several")
    prefill, decode, _ = run(hooks=False, steps=args.new_tokens)
    rss_run = _rss() - rss0
    _, decode_hooked, linear = run(hooks=True, steps=min(8, args.new_tokens))
    kernels = sorted({m.last_kernel for m in model.modules() if isinstance(m, QuantizedLinear) and m.last_kernel})
    return {
        "row": row, "what": what, "bytes": nbytes, "rss_bytes": rss, "rss_after_run_bytes": rss_run, "threads_note": threads_note,
        "load_seconds": load_s, "warmup_seconds": warm_s,
        "prefill_tokens_per_second": args.prompt_tokens / prefill,
        "decode_tokens_per_second": args.new_tokens / decode,
        "linear_share": linear / decode_hooked, "threads": args.threads,
        "kernels": kernels,
    }


def _llama_cpp_worker(args) -> dict:
    try:
        import llama_cpp
    except ImportError:
        return {"row": "llama.cpp", "what": "not installed (pip install llama-cpp-python)"}
    import numpy as np

    from pvq.models import demo_model_path

    gguf = demo_model_path(args.model) if args.model == "smollm2-135m" else Path(args.model)
    rss0 = _rss()
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=args.prompt_tokens + args.new_tokens + 8,
                          n_threads=args.threads, n_batch=args.prompt_tokens, verbose=False, logits_all=False)
    load_s = time.perf_counter() - t0
    rss = _rss() - rss0
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, llm.n_vocab(), args.prompt_tokens).tolist()
    t0 = time.perf_counter()
    llm.eval(prompt)
    prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.new_tokens):
        llm.eval([int(llm.sample(temp=0.0))])  # greedy: temperature 0 takes the argmax
    decode = time.perf_counter() - t0
    return {
        "row": "llama.cpp", "what": f"llama.cpp {getattr(llama_cpp, '__version__', '?')}, {gguf.name}",
        "bytes": gguf.stat().st_size, "rss_bytes": rss, "rss_after_run_bytes": _rss() - rss0, "load_seconds": load_s,
        "prefill_tokens_per_second": args.prompt_tokens / prefill,
        "decode_tokens_per_second": args.new_tokens / decode, "linear_share": None, "threads": args.threads,
        "kernels": [],
    }


def table(results: list[dict]) -> str:
    ref = next((r for r in results if r["row"] == "float32" and "rss_bytes" in r), None)
    mib = 2**20
    lines = ["| row | model | bytes (MiB) | resident after load (MiB) | resident after the run (MiB) | vs float32 | "
             "load s | warm-up s | prefill tok/s | decode tok/s | decode vs float32 | linear share of decode | kernels |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "rss_bytes" not in r:
            lines.append(f"| {r['row']} | {r['what']} | - | - | - | - | - | - | - | - | - | - | - |")
            continue
        vs = f"{r['rss_after_run_bytes'] / ref['rss_after_run_bytes']:.2f}x" if ref else "-"
        dvs = f"{r['decode_tokens_per_second'] / ref['decode_tokens_per_second']:.2f}x" if ref else "-"
        share = f"{100 * r['linear_share']:.0f}%" if r.get("linear_share") is not None else "-"
        lines.append(
            f"| {r['row']} | {r['what']}; threads: {r.get('threads_note', '-')} | {r['bytes'] / mib:.1f} | {r['rss_bytes'] / mib:.0f} | "
            f"{r['rss_after_run_bytes'] / mib:.0f} | {vs} | "
            f"{r['load_seconds']:.1f} | {r.get('warmup_seconds', float('nan')):.1f} | {r['prefill_tokens_per_second']:.0f} | {r['decode_tokens_per_second']:.2f} | "
            f"{dvs} | {share} | {', '.join(r['kernels']) or '-'} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="the float model (and llama.cpp's GGUF)")
    parser.add_argument("--float-dir", default="bench-out/float32-hf",
                        help="the float model saved as float32 safetensors (made from --model when missing)")
    parser.add_argument("--pvq", default=None, help="a pvq checkpoint directory (the default `pvq quantize` output)")
    parser.add_argument("--gptq", default=None, help="a GPTQ 4-bit pvq checkpoint directory")
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--out", default="bench-out/runtime.json")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = _llama_cpp_worker(args) if args.worker == "llama.cpp" else _torch_worker(args.worker, args)
        print("RESULT " + json.dumps(result))
        return
    if not (Path(args.float_dir) / "config.json").is_file() and {"float32", "bfloat16"} & set(args.rows):
        # the float rows load a float32 safetensors directory, as a user of transformers would
        from pvq.models import load_model

        model, tokenizer, _ = load_model(args.model)
        if getattr(model, "hf_quantizer", None) is not None:  # a GGUF load: its weights are plain float32 now
            model.hf_quantizer.remove_quantization_config(model)
        model.save_pretrained(args.float_dir)
        tokenizer.save_pretrained(args.float_dir)
        del model
    results = []
    for row in args.rows:
        if row in ("pvq", "pvq-int8", "gptq") and getattr(args, row.split("-")[0]) is None:
            continue
        cmd = [sys.executable, __file__, "--worker", row, "--model", args.model, "--float-dir", args.float_dir,
               "--threads", str(args.threads),
               "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens)]
        for name in ("pvq", "gptq"):
            if getattr(args, name):
                cmd += [f"--{name}", getattr(args, name)]
        print(f"[runtime] {row} ...", file=sys.stderr, flush=True)
        done = subprocess.run(cmd, capture_output=True, text=True)
        line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
        if done.returncode != 0 or line is None:  # recorded as failed, the other rows still run
            tail = (done.stderr.strip().splitlines() or [""])[-1][:200]
            results.append({"row": row, "what": f"failed (exit code {done.returncode}): {tail}"})
        else:
            results.append(json.loads(line[len("RESULT "):]))
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"threads {args.threads}, prompt {args.prompt_tokens} tokens, {args.new_tokens} greedy decode steps, "
          f"one fresh process per row")
    print(table(results))


if __name__ == "__main__":
    main()
