"""Quantizing larger models: peak host memory and time, in memory vs streamed, 1 vs 2 processes.

Run:  python bench/scale.py [--sizes 0.1b 0.5b 1.5b] [--out bench-out/scale.json]

Each size is a synthetic Llama built from a config, with random weights (std 0.02), saved
as bfloat16 safetensors in 1 GB shards under bench-out/scale-models/ (made once). The
tokenizer is the demo model's (SmolLM2, vocabulary 49152). Every run is `pvq quantize` in
a fresh process with the same settings: GPTQ 4-bit g128, 8 calibration windows of 256
tokens of the WikiText-2 validation text, evaluation on 2 windows of 256. The runs are:
- in memory: the default path;
- streamed: `--stream`;
- streamed, 1 thread: the same with OMP_NUM_THREADS=1;
- streamed, 2 processes: `torchrun --nproc-per-node 2 --no-python pvq quantize ... --stream`
  (torchrun gives each process one thread).

The last column compares the checkpoint's files with the in-memory run's; for the
2-process run, with the 1-thread run's when it was made (same threads per process: CPU
matrix products may round differently with another thread count).

For each run the table gives the peak resident memory (VmHWM) of the process, or of rank 0
under torchrun, as a ratio to the float32 model's size. Beside it is pvq.memory's prediction
for the same settings (`pvq quantize ... --dry-run`, run separately; `--repredict FILE`
recomputes it for the rows of an earlier results file), the mean wall seconds per block, the whole job's
seconds, and whether the checkpoint's files are byte-identical to the in-memory run's.
GPTQ stands in for PVQ here because time is not what is measured: the memory does not
depend on the method beyond its packed size, while PVQ's encoder would make the 1.5B runs
hours long on 2 cores.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

SHARED = Path(__file__).resolve().parents[2] / "shared" / "assets" / "wikitext-2"
SIZES = {  # name: (hidden, layers, intermediate, heads, kv heads)
    "0.1b": (768, 12, 2048, 12, 4),
    "0.5b": (1024, 24, 4096, 16, 4),
    "1.5b": (2048, 28, 6144, 16, 4),
}
# name: (extra flags, processes, threads per process: None = torch's default)
RUNS = {"in memory": ([], 1, None), "streamed": (["--stream"], 1, None),
        "streamed, 1 thread": (["--stream"], 1, 1), "streamed, 2 processes": (["--stream"], 2, 1)}
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
               "tokenizer.json", "tokenizer_config.json", "recipe.yaml", "pvq_index.json")


def make_model(size: str, root: Path) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from pvq.models import demo_model_path

    out = root / size
    if (out / "config.json").is_file():
        return out
    hidden, layers, inter, heads, kv = SIZES[size]
    config = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=inter,
                         num_attention_heads=heads, num_key_value_heads=kv, vocab_size=49152,
                         max_position_embeddings=2048, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    tmp = root / f".{size}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, max_shard_size="1GB")
    gguf = demo_model_path("smollm2-135m")
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
    tmp.rename(out)
    return out


def job(args: list[str], out: Path, processes: int = 1, threads: int | None = None) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(f"{out}.work", ignore_errors=True)
    pvq = shutil.which("pvq") or str(Path(sys.executable).parent / "pvq")
    if processes > 1:
        cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc-per-node", str(processes), "--no-python", pvq]
    else:
        cmd = [pvq]
    t0 = time.perf_counter()
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    run = subprocess.run([*cmd, "quantize", *args, "--out", str(out), "--quiet"], capture_output=True, text=True, env=env)
    if run.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{run.stderr[-3000:]}")
    report = json.loads((out / "job_report.json").read_text())
    report["process_seconds"] = time.perf_counter() - t0
    return report


def predicted_peak(args: list[str]) -> int:
    """pvq.memory's predicted peak (bytes) for these job arguments, from `--dry-run`."""
    pvq = shutil.which("pvq") or str(Path(sys.executable).parent / "pvq")
    run = subprocess.run([pvq, "quantize", *args, "--out", "bench-out/scale-out/never", "--dry-run",
                          "--ignore-memory-check"], capture_output=True, text=True)
    for line in run.stdout.splitlines():
        if line.strip().startswith("peak"):
            return int(float(line.split()[1]) * 2**30)
    raise SystemExit(f"no prediction in:\n{run.stdout}\n{run.stderr}")


def job_args(size: str, run: str, root: Path) -> list[str]:
    common = ["--method", "gptq", "--bits", "4", "--group-size", "128", "--calib-text", str(SHARED / "tokenized" /
              "valid.txt"), "--calib-windows", "8", "--calib-seqlen", "256", "--batch-size", "4",
              "--eval-text", str(SHARED / "raw" / "wiki.test.raw"), "--eval-windows", "2", "--eval-seqlen", "256",
              "--device", "cpu"]
    return [str(root / size), *common, *RUNS[run][0]]


def reference(name: str, runs: dict) -> str | None:
    """The run whose files this one's must equal (same threads per process where possible)."""
    if name == "streamed, 2 processes" and "streamed, 1 thread" in runs:
        return "streamed, 1 thread"
    return "in memory" if "in memory" in runs and name != "in memory" else None


def digest(out: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(out.iterdir())
            if f.name in MODEL_FILES or f.name.startswith("model-")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", nargs="*", default=list(SIZES))
    ap.add_argument("--runs", nargs="*", default=list(RUNS), choices=list(RUNS))
    ap.add_argument("--out", default="bench-out/scale.json")
    ap.add_argument("--repredict", nargs="*", default=[], help="results files whose predictions to recompute")
    args = ap.parse_args()
    root = Path("bench-out/scale-models")
    root.mkdir(parents=True, exist_ok=True)
    if args.repredict:
        rows = [r for f in args.repredict for r in json.loads(Path(f).read_text())]
        for r in rows:
            r["predicted_peak_bytes"] = predicted_peak(job_args(r["size"], r["run"], root))
        table(rows, args.out)
        return
    rows = []
    for size in args.sizes:
        make_model(size, root)
        runs = {}
        for name in args.runs:
            report = job(job_args(size, name, root),
                         Path(f"bench-out/scale-out/{size}-{name.replace(' ', '_').replace(',', '')}"), RUNS[name][1],
                         RUNS[name][2])
            runs[name] = report
            blocks = [s for s in report["block_seconds"] if s is not None]
            row = {
                "size": size, "run": name, "parameters": report["float_model_memory_bytes"] // 4,
                "float32_bytes": report["float_model_memory_bytes"], "peak_bytes": report["peak_memory_bytes"],
                "predicted_peak_bytes": predicted_peak(job_args(size, name, root)),
                "seconds_per_block": sum(blocks) / len(blocks), "job_seconds": report["wall_seconds"],
                "compared_with": reference(name, runs),
                "identical_to_in_memory": (digest(Path(report["checkpoint"])) ==
                                           digest(Path(runs[reference(name, runs)]["checkpoint"]))
                                           if reference(name, runs) else None),
                "threads": RUNS[name][2] or int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    table(rows, args.out)


def table(rows: list[dict], out: str) -> None:
    gib = 2**30
    print("\n| model | run | threads | float32 model | peak RSS | peak / float32 | predicted | predicted / measured | s per block | job s | same files as |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']} ({r['parameters'] / 1e9:.2f}B) | {r['run']} | {r['threads']} | {r['float32_bytes'] / gib:.2f} GiB | "
              f"{r['peak_bytes'] / gib:.2f} GiB | {r['peak_bytes'] / r['float32_bytes']:.2f}x | "
              f"{r['predicted_peak_bytes'] / gib:.2f} GiB | {r['predicted_peak_bytes'] / r['peak_bytes']:.2f} | "
              f"{r['seconds_per_block']:.1f} | {r['job_seconds']:.0f} | "
              f"{same(r)} |")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(rows, indent=2) + "\n")


def same(r: dict) -> str:
    ref = r.get("compared_with", "in memory")
    if r["identical_to_in_memory"] is None:
        return "-"
    return f"{ref}: {'yes' if r['identical_to_in_memory'] else 'NO'}"


if __name__ == "__main__":
    main()
