"""Codes that learn, checked move by move: how well the quadratic model of fine-tuning's code
updates predicts what a move does to the loss (issue 30).

Run:  python bench/code_moves.py CHECKPOINT [--layers 1 15 29] [--moves 10 100] [--windows 4]

For a fine-tuned checkpoint of the benchmark model (e.g. `pvq quantize --out CHECKPOINT`),
the loss is the top-64 KL to the float model on the first `--windows` calibration windows
(the main job's: 512 tokens of the WikiText-2 validation text, seed 0). Its gradient with
respect to every quantized layer's weight is taken on those windows, the curvature as the
fine-tuning takes it (`finetune._curvature`, two further windows); then, one layer at a
time, the N proposed moves the model ranks best are applied and the loss measured again on
the same windows. Printed per layer and N: the predicted change (linear and quadratic
terms) and the actual one. 2 threads; about 4 minutes here.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

SHARED = Path(__file__).resolve().parents[2] / "shared" / "assets" / "wikitext-2" / "tokenized" / "valid.txt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 15, 29], help="decoder blocks to look at")
    parser.add_argument("--moves", type=int, nargs="+", default=[10, 100], help="moves applied at once per layer")
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import pvq  # noqa: F401  (registers the checkpoint format with transformers)
    from transformers import AutoModelForCausalLM

    from pvq.calibrate import windows_from_ids
    from pvq.calibrate.finetune import (FinetuneConfig, _checkpointed_blocks, _curvature, _topk_kl, _Trainable,
                                        teacher_targets)
    from pvq.models import load_model
    from pvq.models.loading import encode_text
    from pvq.runtime import tuned_weights

    float_model, tokenizer, _ = load_model("smollm2-135m")
    ids = encode_text(tokenizer, SHARED.read_text(encoding="utf-8"))
    windows = windows_from_ids(ids, 32, 512, seed=0, source="valid.txt")
    n = args.windows
    W = windows[:n]
    teacher = teacher_targets(float_model, W, 64)
    del float_model
    model = AutoModelForCausalLM.from_pretrained(args.checkpoint).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    trainable = _Trainable(model, FinetuneConfig(code_fraction=0.01), torch.device("cpu"))
    for p in trainable.params.values():
        p.requires_grad_(True)

    def loss() -> float:
        with torch.no_grad(), tuned_weights(model, trainable.tunables):
            return sum(float(_topk_kl(model(W[i:i + 1], use_cache=False).logits, teacher[i:i + 1]))
                       for i in range(n)) / n

    with _checkpointed_blocks(model, True):
        trainable.track_grads(True)
        with tuned_weights(model, trainable.tunables):
            for i in range(n):
                (_topk_kl(model(W[i:i + 1], use_cache=False).logits, teacher[i:i + 1]) / n).backward()
        curvature = _curvature(model, trainable, windows[n:n + 2], torch.device("cpu"), 0)
    base = loss()
    print(f"loss (top-64 KL on {n} windows) {base:.5f}")
    print("| layer | moves | groups predicted to gain | predicted | linear term | quadratic term | actual |")
    print("|---|---|---|---|---|---|---|")
    for name in sorted(trainable.movable):
        if not any(f"layers.{k}." in name for k in args.layers):
            continue
        tw = trainable.movable[name]
        g, F = tw.grad_sum.float(), curvature[name].float()
        delta, candidates = tw.code_moves(g, F)
        gaining = int(torch.isfinite(delta).sum())
        for count in args.moves:
            count = min(count, gaining)
            rows = torch.topk(delta, count, largest=False).indices
            groups = tw.code_groups()
            old = groups[rows].clone()
            W0 = tw().detach()
            groups[rows] = candidates[rows]
            tw.codes_changed = True
            dW = tw().detach() - W0
            actual = loss() - base
            groups[rows] = old
            print(f"| {name.removeprefix('model.')} | {count} | {gaining} of {delta.numel()} "
                  f"| {float(delta[rows].sum()):+.5f} | {float((g * dW).sum()):+.5f} "
                  f"| {float(0.5 * (F * dW * dW).sum()):+.5f} | {actual:+.5f} |", flush=True)


if __name__ == "__main__":
    main()
