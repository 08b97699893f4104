"""Every supported family, quantized with the main job's PVQ settings: tiny-config rows.

Run:  python bench/families.py [--threads 2] [--steps 300] [--out bench-out/families.json]

No full-precision model of these families can be had offline (the one real model,
SmolLM2-135M, is the Llama row of the main job: docs/quantize.md "The report"). So each family is a
tiny model built from its transformers config (hidden 128, 4 layers, byte vocabulary of
256; MoE: 4 experts, top-2) and *trained* here for `--steps` AdamW steps on bytes of the
WikiText-2 validation text, so that float vs quantized perplexity means something (an
untrained model's is about the vocabulary size whatever is done to it). Then:
calibration on 64 windows of 128 bytes of the same text, `pvq.oneshot` with the main job's
PVQ defaults (D=16, 3-bit shapes, fitted gains: about 3.27 bits per weight), and
perplexity of the float and the quantized model on the first 64 windows of 128 bytes of the
WikiText-2 raw test text, with KL and top-1 agreement against float. Times are wall
seconds with `--threads` torch threads.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import transformers

from pvq.eval.perplexity import next_token_agreement, perplexity_details, wikitext2_test_text
from pvq.oneshot import Recipe, oneshot
from pvq.options import default_method_config

SHARED = Path(__file__).resolve().parents[2] / "shared" / "assets" / "wikitext-2"
COMMON = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=256, max_position_embeddings=256, tie_word_embeddings=True)
MOE = dict(num_experts_per_tok=2, moe_intermediate_size=128)
FAMILIES = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {"head_dim": 32}),
    "gemma2": ("Gemma2Config", {"head_dim": 32, "sliding_window": 64}),
    "gemma3_text": ("Gemma3TextConfig", {"head_dim": 32, "sliding_window": 64}),
    "phi3": ("Phi3Config", {"pad_token_id": 0}),
    "mixtral": ("MixtralConfig", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen2_moe": ("Qwen2MoeConfig", {"num_experts": 4, "shared_expert_intermediate_size": 256, **MOE}),
    "qwen3_moe": ("Qwen3MoeConfig", {"num_experts": 4, "head_dim": 32, **MOE}),
}


def byte_ids(text: str) -> torch.Tensor:
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def build(family: str, seed: int = 0):
    name, extra = FAMILIES[family]
    config = getattr(transformers, name)(**{**COMMON, **extra})
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config)


def train(model, ids: torch.Tensor, steps: int, batch: int = 16, seqlen: int = 128, seed: int = 0) -> float:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        starts = torch.randint(0, ids.numel() - seqlen - 1, (batch,), generator=g)
        x = torch.stack([ids[s:s + seqlen] for s in starts.tolist()])
        loss = model(input_ids=x, labels=x, use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    return float(loss.detach())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--families", nargs="*", default=list(FAMILIES))
    ap.add_argument("--out", default="bench-out/families.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    train_ids = byte_ids((SHARED / "tokenized" / "valid.txt").read_text(encoding="utf-8"))
    test_ids = byte_ids(wikitext2_test_text())
    g = torch.Generator().manual_seed(1)
    starts = torch.randint(0, train_ids.numel() - 129, (64,), generator=g).tolist()
    calibration = torch.stack([train_ids[s:s + 128] for s in starts])
    config = default_method_config("pvq")
    rows = []
    for family in args.families:
        model = build(family)
        t0 = time.perf_counter()
        train_loss = train(model, train_ids, args.steps)
        train_s = time.perf_counter() - t0
        import copy

        reference = copy.deepcopy(model)
        float_ppl = perplexity_details(model, test_ids, seqlen=128, max_windows=64, batch_size=8, progress=False)
        t0 = time.perf_counter()
        result = oneshot(model, None, Recipe(method="pvq", config=config), windows=calibration, progress=False)
        quant_s = time.perf_counter() - t0
        quant_ppl = perplexity_details(model, test_ids, seqlen=128, max_windows=64, batch_size=8, progress=False)
        agreement = next_token_agreement(reference, model, test_ids[:64 * 128], seqlen=128, batch_size=8)
        experts = result.quantized.experts_summary()
        row = {
            "family": family, "params": sum(p.numel() for p in reference.parameters()),
            "train_steps": args.steps, "train_loss": train_loss, "train_seconds": train_s,
            "quantized_layers": len(result.quantized), "bits_per_weight": result.quantized.measured_bits_per_weight,
            "quantize_seconds": quant_s, "ppl_float": float_ppl.ppl, "ppl_pvq": quant_ppl.ppl,
            "kl": agreement["kl"], "top1": agreement["top1_agreement"],
            "experts": None if experts is None else {k: v for k, v in experts.items() if k != "per_expert"},
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{args.threads} torch threads; {args.steps} training steps; PVQ {json.dumps(config, sort_keys=True)}\n")
    print("| family | params | quantized layers | bpw (measured) | quantize s | PPL float | PPL PVQ | ratio | KL | top-1 | experts (min..max routed tokens, force-routed) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        e = r["experts"]
        experts = "" if e is None else f"{e['experts']} ({e['min_tokens']}..{e['max_tokens']}, {len(e['force_routed'])})"
        print(f"| {r['family']} | {r['params'] / 1e6:.2f}M | {r['quantized_layers']} | {r['bits_per_weight']:.4f} | "
              f"{r['quantize_seconds']:.1f} | {r['ppl_float']:.3f} | {r['ppl_pvq']:.3f} | "
              f"{r['ppl_pvq'] / r['ppl_float']:.3f} | {r['kl']:.4f} | {100 * r['top1']:.1f}% | {experts} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"threads": args.threads, "steps": args.steps, "config": config, "rows": rows},
                                         indent=2) + "\n")


if __name__ == "__main__":
    main()
