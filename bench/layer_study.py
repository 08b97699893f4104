"""Quantizer settings compared on real layers of the benchmark model, by proxy loss.

Run:  python bench/layer_study.py [--rotate] [--study default|gains | --configs JSON]

Collects the input Hessians H = X^T X / n of 20 linear layers (blocks 0, 3, 10, 20, 29 x
q_proj, o_proj, up_proj, down_proj) of the float model on 32 calibration windows of 512
tokens (tokenized WikiText-2 validation text, seed 0; inputs of the float model, not the
sequential pipeline's), then quantizes each layer with every setting and prints the summed
proxy loss tr((W - Q) H (W - Q)^T), its geometric-mean ratio to the first setting, and
the stored bits per weight. Seconds per setting, not minutes per model: a quick way to
choose settings before a perplexity run (bench/llm_quant.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from pvq.models import load_model
from pvq.calibrate import encode_text, windows_from_ids
from pvq.methods import get_method

VALID = Path(__file__).resolve().parents[2] / "shared" / "assets" / "wikitext-2" / "tokenized" / "valid.txt"
LAYERS = [f"model.layers.{i}.{m}" for i in (0, 3, 10, 20, 29)
          for m in ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")]
DEFAULT = {
    "gptq-4b-g64": ["gptq", {"bits": 4, "group_size": 64}],
    "gptq-3b-g64": ["gptq", {"bits": 3, "group_size": 64}],
    "gptq-3b-g64-act": ["gptq", {"bits": 3, "group_size": 64, "act_order": True}],
    "pvq-d16-s3-emp4-noact": ["pvq", {"group_size": 16, "shape_bits": 3.0, "gain": "empirical", "act_order": False}],
    "pvq-d16-s3-emp4": ["pvq", {"group_size": 16, "shape_bits": 3.0, "gain": "empirical"}],
    "pvq-d64-s3-fp16": ["pvq", {"group_size": 64, "shape_bits": 3.0, "gain": "fp16"}],
    "pvq-d32-s3.125-emp4": ["pvq", {"group_size": 32, "shape_bits": 3.125, "gain": "empirical"}],
}
# Beta gains with escapes against the fitted ("empirical") gains at equal bits: 2 escape
# slots per row cost 48 bits, paid for by 1/16 bit less per weight of shape (2.9375)
GAINS = {
    "beta4": ["pvq", {"group_size": 16, "shape_bits": 3.0, "gain": "beta"}],
    "beta4-esc2": ["pvq", {"group_size": 16, "shape_bits": 3.0, "gain": "beta", "gain_escapes": 2}],
    "beta4-esc2-s2.94": ["pvq", {"group_size": 16, "shape_bits": 2.9375, "gain": "beta", "gain_escapes": 2}],
    "beta4-esc4-s2.94": ["pvq", {"group_size": 16, "shape_bits": 2.9375, "gain": "beta", "gain_escapes": 4}],
    "beta5-s2.94": ["pvq", {"group_size": 16, "shape_bits": 2.9375, "gain": "beta", "gain_bits": 5}],
    "emp4": ["pvq", {"group_size": 16, "shape_bits": 3.0, "gain": "empirical"}],
    "emp4-esc2-s2.94": ["pvq", {"group_size": 16, "shape_bits": 2.9375, "gain": "empirical", "gain_escapes": 2}],
}
STUDIES = {"default": DEFAULT, "gains": GAINS}


def layer_hessians(rotate: bool) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    model, tokenizer, _ = load_model("smollm2-135m")
    if rotate:
        from pvq.rotation import rotate_model

        rotate_model(model, seed=0)
    windows = windows_from_ids(encode_text(tokenizer, VALID.read_text(encoding="utf-8")), 32, 512, seed=0,
                               source="valid.txt")
    sums: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}

    def hook(name):
        def fn(module, inputs, output):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + x.T @ x
            rows[name] = rows.get(name, 0) + x.shape[0]
        return fn

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in LAYERS]
    with torch.no_grad():
        for i in range(0, windows.shape[0], 4):
            model(windows[i : i + 4])
    for h in handles:
        h.remove()
    return {n: (model.get_submodule(n).weight.detach().float().clone(), (sums[n] / rows[n]).float()) for n in LAYERS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rotate", action="store_true", help="fused Hadamard rotation (seed 0) first")
    parser.add_argument("--configs", default=None, help='JSON {label: [method, {config fields}]}')
    parser.add_argument("--study", choices=sorted(STUDIES), default="default", help="a named set of settings")
    args = parser.parse_args()
    if not VALID.is_file():
        sys.exit(f"calibration text not found at {VALID} (../shared beside the checkout)")
    configs = json.loads(args.configs) if args.configs else STUDIES[args.study]
    layers = layer_hessians(args.rotate)
    losses = {}
    print("| setting | bpw stored | summed proxy loss | geomean ratio to first | seconds |\n|---|---|---|---|---|")
    for label, (method_name, fields) in configs.items():
        method = get_method(method_name)
        config = method.config_class(**fields)
        t0 = time.perf_counter()
        qts = [method.quantize(W, H, config) for W, H in layers.values()]
        seconds = time.perf_counter() - t0
        losses[label] = np.array([qt.proxy_loss for qt in qts])
        bpw = sum(qt.stored_bytes for qt in qts) * 8 / sum(W.numel() for W, _ in layers.values())
        ratio = float(np.exp(np.log(losses[label] / losses[next(iter(configs))]).mean()))
        print(f"| {label} | {bpw:.3f} | {losses[label].sum():.4g} | {ratio:.3f} | {seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
