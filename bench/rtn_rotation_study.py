"""Why round-to-nearest gets worse after the Hadamard rotation on the benchmark model.

Run:  python bench/rtn_rotation_study.py [--bits 3] [--group-size 64] [--eval-windows 8]

The `rtn-3b-g64-rot` row of bench/llm_quant.py has a far higher perplexity than
`rtn-3b-g64`, although the rotated float model computes the same function (`float-rot`).
This study quantizes the model with RTN (no calibration) with and without the fused
rotation (`pvq.rotation.rotate_model`, seed 0) and prints, per configuration:

* the relative weight error ||W - Q||^2 / ||W||^2 averaged over the layers of each kind
  (does rotation make the weights harder to round? It is what a coherence argument
  predicts it should improve);
* WikiText-2 perplexity (first --eval-windows windows of 512 tokens, quick) when every
  quantized linear is rounded, and when one kind of layer, or the first / last two
  blocks, are left in float (is one place responsible?).

Every row starts from a fresh copy of the (rotated) float model.
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections import defaultdict
from pathlib import Path

import torch

from pvq.eval.perplexity import perplexity_details, wikitext2_test_text
from pvq.models import adapter_for, load_model
from pvq.calibrate import encode_text
from pvq.methods import get_method
from pvq.rotation import rotate_model

SHARED = Path(__file__).resolve().parents[2] / "shared" / "assets" / "wikitext-2"


def left_in_float(n_blocks: int) -> dict[str, tuple[str, ...]]:
    """label -> substrings of the layer names kept in float."""
    return {
        "nothing": (),
        "down_proj": ("down_proj",),
        "q_proj, k_proj": ("q_proj", "k_proj"),
        "v_proj, o_proj": ("v_proj", "o_proj"),
        "gate_proj, up_proj": ("gate_proj", "up_proj"),
        "blocks 0-1": (".layers.0.", ".layers.1."),
        "last two blocks": (f".layers.{n_blocks - 2}.", f".layers.{n_blocks - 1}."),
    }


def rounded_copy(base, method, config, skip: tuple[str, ...]):
    """A copy of `base` whose quantized linears are RTN-rounded, except names containing `skip`."""
    model = copy.deepcopy(base)
    for name in adapter_for(model).quantized_layer_names(model):
        if any(s in name for s in skip):
            continue
        module = model.get_submodule(name)
        qt = method.quantize(module.weight.data.float(), None, config)
        module.weight.data.copy_(method.dequantize(qt).to(module.weight.dtype))
    return model


def relative_errors(model, method, config) -> dict[str, float]:
    sums: dict[str, list[float]] = defaultdict(list)
    for name in adapter_for(model).quantized_layer_names(model):
        W = model.get_submodule(name).weight.data.float()
        Q = torch.as_tensor(method.dequantize(method.quantize(W.clone(), None, config)))
        sums[name.rsplit(".", 1)[-1]].append(float((W - Q).pow(2).sum() / W.pow(2).sum()))
    return {k: sum(v) / len(v) for k, v in sorted(sums.items())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not SHARED.is_dir():
        sys.exit(f"benchmark data not found at {SHARED} (../shared beside the checkout)")
    model, tokenizer, _ = load_model(args.model)
    ids = encode_text(tokenizer, wikitext2_test_text(SHARED / "raw" / "wiki.test.raw"))
    method = get_method("rtn")
    config = method.config_class(bits=args.bits, group_size=args.group_size)
    rotated = copy.deepcopy(model)
    rotate_model(rotated, seed=0)
    choices = left_in_float(len(adapter_for(model).get_blocks(model)))

    plain_err, rot_err = relative_errors(model, method, config), relative_errors(rotated, method, config)
    print(f"\nRTN {args.bits}-bit, group {args.group_size}: mean relative weight error ||W-Q||^2/||W||^2")
    print("| layer kind | original | rotated |\n|---|---|---|")
    for kind in plain_err:
        print(f"| {kind} | {plain_err[kind]:.4f} | {rot_err[kind]:.4f} |")

    print(f"\nWikiText-2 PPL, first {args.eval_windows} windows of 512 tokens")
    print("| model | left in float | PPL |\n|---|---|---|")
    for tag, base, labels in (("original", model, ["nothing"]), ("rotated", rotated, list(choices))):
        for label in labels:
            q = rounded_copy(base, method, config, choices[label])
            ppl = perplexity_details(q, ids, seqlen=512, max_windows=args.eval_windows, progress=False).ppl
            print(f"| {tag} | {label} | {ppl:.2f} |", flush=True)
    for tag, base in (("original", model), ("rotated", rotated)):
        ppl = perplexity_details(base, ids, seqlen=512, max_windows=args.eval_windows, progress=False).ppl
        print(f"| {tag} float | everything | {ppl:.2f} |")


if __name__ == "__main__":
    main()
