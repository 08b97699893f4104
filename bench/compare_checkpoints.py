"""Which stored tensors of two checkpoints differ, and in how many values (run-to-run bytes).

Run:  python bench/compare_checkpoints.py DIR_A DIR_B

Reads each directory's `model.safetensors` (no model is built) and prints the tensors whose
values differ bit for bit, with the count of differing values, then the totals: e.g. two runs of the
same `pvq quantize` command, to see whether a seeded run repeats its bytes (docs/results.md
section 12.4).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a")
    parser.add_argument("b")
    args = parser.parse_args()
    a, b = (load_file(str(Path(d) / "model.safetensors")) for d in (args.a, args.b))
    if a.keys() != b.keys():
        raise SystemExit(f"the checkpoints store different tensors: {sorted(a.keys() ^ b.keys())[:5]} ...")
    values = 0
    differ = []
    for name in sorted(a):
        if a[name].shape != b[name].shape or a[name].dtype != b[name].dtype:
            raise SystemExit(f"{name}: {a[name].dtype} {a[name].shape} against {b[name].dtype} {b[name].shape}")
        bits = f"u{a[name].dtype.itemsize}"  # compared bit for bit (so -0.0 or a NaN counts too)
        n = int(np.count_nonzero(a[name].view(bits) != b[name].view(bits)))
        if n:
            differ.append(name)
            values += n
            print(f"{name}: {n} of {a[name].size} values differ")
    print(f"{len(differ)} of {len(a)} tensors differ, {values} values in all")


if __name__ == "__main__":
    main()
