"""lm-evaluation-harness against pvq's former hand-written scorer, on the same items.

    python bench/lm_eval_parity.py [--model smollm2-135m] [--limit 100] [--json out.json]

Scores the six local tasks (first --limit items each) of the float model twice: with
`pvq.eval.tasks`' own batched log-likelihood scorer (the code this replaces) and with
lm-eval (`pvq.eval.harness`, lm-eval's HFLM and its metrics over the same local items),
then prints each metric from both and, per request, the largest difference between the
two log-likelihoods and how many greedy flags differ. Run once, at the commit that added
the lm-eval route, before the hand-written scorer was removed (docs/results.md).
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--tasks-dir", default=None)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import lm_eval
    from lm_eval.models.huggingface import HFLM

    from pvq.eval import tasks as own
    from pvq.eval.harness import _quiet_lm_eval, prepare_tasks
    from pvq.models import load_model

    model, tokenizer, _ = load_model(args.model)
    model.eval()
    plan = prepare_tasks("all", args.tasks_dir, args.limit)
    t0 = time.perf_counter()
    ours = own.evaluate_tasks(model, tokenizer, "all", tasks_dir=args.tasks_dir, limit=args.limit,
                              batch_size=args.batch_size)
    t_ours = time.perf_counter() - t0
    _quiet_lm_eval()
    t0 = time.perf_counter()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size, backend="causal")
    out = lm_eval.simple_evaluate(model=lm, tasks=plan.tasks, limit=args.limit, bootstrap_iters=1000,
                                  log_samples=True, verbosity="ERROR")
    t_lm = time.perf_counter() - t0
    plan.close()

    rows, report = [], {"limit": args.limit, "seconds_own": t_ours, "seconds_lm_eval": t_lm,
                        "torch_threads": torch.get_num_threads(), "tasks": {}}
    for name in plan.names:
        items = own.load_task(name, args.tasks_dir, args.limit)
        requests = [req for item in items for req in item.requests]
        mine = own.loglikelihoods(model, tokenizer, requests, args.batch_size, progress=False)
        theirs = []
        for sample in sorted(out["samples"][name], key=lambda s: s["doc_id"]):
            theirs += [tuple(r[0]) if isinstance(r[0], (list, tuple)) else tuple(r) for r in sample["resps"]]
        assert len(theirs) == len(mine), (name, len(theirs), len(mine))
        dll = max(abs(float(t[0]) - m.logprob) for t, m in zip(theirs, mine))
        dgreedy = sum(bool(t[1]) != m.greedy for t, m in zip(theirs, mine))
        metrics = out["results"][name]
        task = {"requests": len(mine), "max_abs_loglik_diff": dll, "greedy_flags_differing": dgreedy, "metrics": {}}
        for m in ours[name].metrics:
            theirs_value = metrics[f"{m.name},none"]
            task["metrics"][m.name] = {"own": m.value, "lm_eval": theirs_value}
            rows.append((name, m.name, m.value, theirs_value, len(mine), dll, dgreedy))
        report["tasks"][name] = task
    print(f"first {args.limit} items per task; own scorer {t_ours:.0f} s, lm-eval {t_lm:.0f} s "
          f"({torch.get_num_threads()} torch threads)\n")
    print("| task | metric | own scorer | lm-eval | requests | max abs loglik diff | greedy flags differing |")
    print("|---|---|---|---|---|---|---|")
    for name, metric, a, b, n, dll, dg in rows:
        print(f"| {name} | {metric} | {a:.4f} | {b:.4f} | {n} | {dll:.2e} | {dg} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
