"""Command-line interface: `pvq <command>`."""

from __future__ import annotations

import argparse
import sys


def _cmd_snr(args: argparse.Namespace) -> int:
    from pvq.eval.snr import run_snr_experiment

    run_snr_experiment(
        samples=args.samples,
        seed=args.seed,
        dimensions=args.dims,
        out_png=args.plot,
        out_csv=args.csv,
        quick=args.quick,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pvq", description="Pyramid Vector Quantization for LLMs")
    sub = parser.add_subparsers(dest="command", required=True)

    snr = sub.add_parser(
        "snr",
        help="SNR of PVQ vs scalar, Lloyd-Max, E8 and the Shannon bound on a Gaussian source (paper Fig. 3)",
    )
    snr.add_argument("--samples", type=int, default=512, help="Gaussian rows of 1024 values (default 512)")
    snr.add_argument("--dims", type=int, nargs="+", default=[8, 16, 32, 64, 128], help="PVQ group sizes D")
    snr.add_argument("--seed", type=int, default=0)
    snr.add_argument("--plot", default="pvq_snr.png", help="output PNG (default pvq_snr.png)")
    snr.add_argument("--csv", default=None, help="also write the table as CSV")
    snr.add_argument("--quick", action="store_true", help="fewer samples and rates, for a smoke test")
    snr.set_defaults(func=_cmd_snr)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
