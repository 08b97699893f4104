"""Codes that learn, checked move by move: how well the quadratic model of fine-tuning's code
updates predicts what a move does to the loss, on the windows that gave the gradient and on
held-out windows (issue 30).

Run:  python bench/code_moves.py CHECKPOINT [--layers 1 15 29] [--moves 10 100] [--windows 4 26] [--heldout 4]

For a fine-tuned checkpoint of the benchmark model (e.g. `pvq quantize --out CHECKPOINT`),
the loss is the top-64 KL to the float model on the main job's calibration windows (512
tokens of the WikiText-2 validation text, seed 0). The mean gradient with respect to every
quantized layer's weight is taken on the first N windows for each N of `--windows` (the
fine-tuning trains on the first 28), the curvature by fine-tuning's method
(`finetune._curvature`) from the two windows before the held-out ones, whatever N; then, one layer at a time, the moves the model
ranks best are applied and the loss measured again: on the last `--heldout` windows (those
the fine-tuning holds out) and, for the smallest N, on the N windows themselves. If the
held-out change approaches the predicted one as N grows, what bounds code updates is the
amount of gradient data. 2 threads; about 10 minutes here with the defaults.
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
    parser.add_argument("--windows", type=int, nargs="+", default=[4, 26], help="gradient windows (the first N)")
    parser.add_argument("--heldout", type=int, default=4, help="held-out windows (the last ones of the 32)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import pvq  # noqa: F401  (registers the checkpoint format with transformers)
    from transformers import AutoModelForCausalLM

    from pvq.calibrate import windows_from_ids
    from pvq.calibrate.finetune import (FISHER_WINDOWS, FinetuneConfig, _checkpointed_blocks, _curvature, _topk_kl,
                                        _Trainable, _val_kl, teacher_targets)
    from pvq.models import load_model
    from pvq.models.loading import encode_text
    from pvq.runtime import tuned_weights

    counts = sorted(set(args.windows))
    n_max, total = counts[-1], 32
    if counts[0] < 1 or args.heldout < 1:
        raise SystemExit("--windows and --heldout take positive counts")
    if n_max + FISHER_WINDOWS + args.heldout > total:
        raise SystemExit(f"--windows {n_max} + {FISHER_WINDOWS} curvature windows + --heldout {args.heldout} > {total}")
    float_model, tokenizer, _ = load_model("smollm2-135m")
    ids = encode_text(tokenizer, SHARED.read_text(encoding="utf-8"))
    windows = windows_from_ids(ids, total, 512, seed=0, source="valid.txt")
    held = windows[total - args.heldout:]
    fisher_rows = windows[total - args.heldout - FISHER_WINDOWS:total - args.heldout]  # the same for every N
    first = windows[:counts[0]]
    teacher = teacher_targets(float_model, windows[:n_max], 64)
    teacher_held = teacher_targets(float_model, held, 64)
    del float_model
    model = AutoModelForCausalLM.from_pretrained(args.checkpoint).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    trainable = _Trainable(model, FinetuneConfig(code_fraction=0.01), torch.device("cpu"))
    for p in trainable.params.values():
        p.requires_grad_(True)

    def loss(W, T) -> float:  # the held-out figure fine-tuning itself reports
        return _val_kl(model, trainable, W, T, torch.device("cpu"), tuned=True)

    grads = {}
    with _checkpointed_blocks(model, True):
        trainable.track_grads(True)
        with tuned_weights(model, trainable.tunables):
            for i in range(n_max):
                _topk_kl(model(windows[i:i + 1], use_cache=False).logits, teacher[i:i + 1]).backward()
                if i + 1 in counts:
                    grads[i + 1] = {k: tw.grad_sum.float() / (i + 1) for k, tw in trainable.movable.items()}
        curvature = _curvature(model, trainable, fisher_rows, torch.device("cpu"), 0)
    base_held, base_first = loss(held, teacher_held), loss(first, teacher[:counts[0]])
    print(f"loss (top-64 KL): {base_held:.5f} on the {args.heldout} held-out windows, {base_first:.5f} on the first "
          f"{counts[0]}")
    print(f"| layer | gradient windows | moves | groups predicted to gain | predicted | actual, held-out "
          f"| actual, on the first {counts[0]} |")
    print("|---|---|---|---|---|---|---|")
    for name in sorted(trainable.movable):
        if not any(f"layers.{k}." in name for k in args.layers):
            continue
        tw = trainable.movable[name]
        F = curvature[name].float()
        for n in counts:
            delta, candidates = tw.code_moves(grads[n][name], F)
            gaining = int(torch.isfinite(delta).sum())
            for count in args.moves:
                count = min(count, gaining)
                rows = torch.topk(delta, count, largest=False).indices
                groups = tw.code_groups()
                old = groups[rows].clone()
                groups[rows] = candidates[rows]
                tw.codes_changed = True
                held_change = loss(held, teacher_held) - base_held
                own = f"{loss(first, teacher[:counts[0]]) - base_first:+.5f}" if n == counts[0] else "-"
                groups[rows] = old
                print(f"| {name.removeprefix('model.')} | {n} | {count} | {gaining} of {delta.numel()} "
                      f"| {float(delta[rows].sum()):+.5f} | {held_change:+.5f} | {own} |", flush=True)


if __name__ == "__main__":
    main()
