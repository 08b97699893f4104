"""Per-layer proxy losses of two calibrated rows of bench/llm_quant.py, side by side.

Run:  python bench/compare_layer_losses.py ROW_A ROW_B [--out bench-out/llm_quant] [--top 8]

Reads the per-layer proxy losses tr((W - Q) H (W - Q)^T) that the pipeline recorded in
each row's work directory (`<out>/<row>.work/block_*.json`) and prints the layers where
ROW_A loses most against ROW_B, and the median ratio over all layers: a mean proxy loss
in the table can hide a few layers that fail.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


def layer_losses(work_dir: Path) -> dict[str, float]:
    files = sorted(work_dir.glob("block_*.json"))
    if not files:
        sys.exit(f"no finished blocks in {work_dir}")
    out = {}
    for f in files:
        for name, info in json.loads(f.read_text())["layers"].items():
            out[name] = float(info["proxy_loss"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("row_a")
    parser.add_argument("row_b")
    parser.add_argument("--out", default="bench-out/llm_quant")
    parser.add_argument("--top", type=int, default=8)
    args = parser.parse_args()
    a = layer_losses(Path(args.out) / f"{args.row_a}.work")
    b = layer_losses(Path(args.out) / f"{args.row_b}.work")
    common = [n for n in a if n in b]
    ratios = {n: a[n] / b[n] for n in common if b[n] > 0}
    print(f"| layer | {args.row_a} | {args.row_b} | ratio |\n|---|---|---|---|")
    for n in sorted(ratios, key=lambda n: a[n] - b[n], reverse=True)[: args.top]:
        print(f"| {n} | {a[n]:.4g} | {b[n]:.4g} | {ratios[n]:.3g} |")
    print(f"\n{len(common)} layers in both; median ratio {statistics.median(ratios.values()):.3f}; "
          f"sum {sum(a[n] for n in common):.4g} vs {sum(b[n] for n in common):.4g}")


if __name__ == "__main__":
    main()
