"""Compare schemes analytically (memory and FLOPs), no data or weights needed.

    python examples/compare_schemes.py [MODEL] [--input-size 224]

PA vs ABC vs the single-binary baselines on one architecture, as in the paper's Table 7.
"""

from __future__ import annotations

import argparse

from binarize_cli.analyze.report import analytic_report

CONFIGS = (("pa", 4, 5), ("pa", 8, 7), ("abc", 5, 5), ("bireal", 1, 1), ("xnor", 1, 1))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", nargs="?", default="resnet18")
    parser.add_argument("--input-size", type=int, default=224)
    args = parser.parse_args()

    print(
        f"{'scheme':>8} {'M':>2} {'N':>2} {'memory Mbit':>12} {'saving':>7} {'FLOPs':>9} {'speedup':>8}"
    )
    for scheme, m, n in CONFIGS:
        data = analytic_report(args.model, scheme, m, n, input_size=args.input_size).to_dict()
        print(
            f"{scheme:>8} {m:>2} {n:>2} {data['memory_bits'] / 1e6:>12.1f} {data['memory_saving']:>6.2f}x "
            f"{data['flops']:>9.2e} {data['speedup']:>7.2f}x"
        )


if __name__ == "__main__":
    main()
