"""Where a decode step of a pvq model spends its time: forward hooks around every layer.

Run:  python bench/profile_decode.py pvq-out [--layout packed|int8|int4] [--threads 2]
      [--policy runtime|shared] [--steps 10]

Loads the checkpoint in `--layout`, feeds a 16-token prompt, then times `--steps` decode
steps (one token each, KV cache), summing the time spent inside each kind of quantized
layer (q_proj, ..., down_proj, the head) and reporting the rest ("other": attention,
norms, rotary, residuals, transformers' Python). The hooks themselves add a little to every
layer's time. `--policy runtime`: the threads `pvq generate` uses (`runtime_threads`: the
kernels take --threads, torch's ops one); `shared`: torch and the kernels both on --threads.
For the int4 layout it also prints the fraction of weights held as escapes.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

# bench/layer_kernels.py would shadow the `kernels` package transformers imports: keep this folder off the path
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--layout", default="int4", choices=["packed", "int8", "int4"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--policy", default="runtime", choices=["runtime", "shared"])
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()

    import torch

    import pvq
    from pvq.runtime import QuantizedLinear
    from pvq.runtime.cpu_kernels import runtime_threads, set_kernel_threads

    torch.set_num_threads(args.threads)
    model, _, _ = pvq.load(args.checkpoint, layout=args.layout, load_tokenizer=False)
    if args.policy == "runtime":
        runtime_threads(model, args.threads)
    else:
        set_kernel_threads(args.threads)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantizedLinear) or n.endswith("lm_head")]
    spent: dict[str, float] = {}
    starts: dict[int, float] = {}

    def pre(module, _):
        starts[id(module)] = time.perf_counter()

    def post(module, _, __):
        kind = module._profile_kind
        spent[kind] = spent.get(kind, 0.0) + time.perf_counter() - starts.pop(id(module))

    for name, module in layers:
        object.__setattr__(module, "_profile_kind", name.split(".")[-1])
        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)
    ids = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        out = model(ids, use_cache=True)
        past = out.past_key_values
        tok = ids[:, -1:]
        for _ in range(2):  # warm-up steps, not counted
            out = model(tok, past_key_values=past, use_cache=True)
            past = out.past_key_values
        spent.clear()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            out = model(tok, past_key_values=past, use_cache=True)
            past = out.past_key_values
        step = (time.perf_counter() - t0) / args.steps
    per = {k: v / args.steps for k, v in spent.items()}
    linears = sum(v for k, v in per.items() if k != "lm_head")
    print(f"{args.layout} layout, {args.threads} threads, policy {args.policy}: decode step {step * 1e3:.1f} ms; "
          f"quantized linears {linears * 1e3:.1f} ms (" + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in per.items()
                                                          if k != "lm_head")
          + f"), head {per.get('lm_head', 0.0) * 1e3:.1f} ms, other {(step - sum(per.values())) * 1e3:.1f} ms")
    if args.layout == "int4":
        escapes = weights = 0
        for _, m in layers:
            compute = m.__dict__.get("_compute")
            if compute is not None:
                escapes += int(compute.x_ptr[-1])
                weights += m.out_features * m.in_features
        print(f"int4 escapes: {escapes} of {weights} weights ({100 * escapes / weights:.3f}%)")


if __name__ == "__main__":
    main()
