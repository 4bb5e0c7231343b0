"""Build time of a 32-layer model with and without `import hf_multimax`, in fresh processes
(`experiments/bench_build_time.py` says what is measured). Writes JSON and a PNG chart.

    .venv/bin/python scripts/bench_build_time.py              # 7 fresh processes per variant
    .venv/bin/python scripts/bench_build_time.py --quick      # smoke run: 2 processes, 8 layers, no claim
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/ is a repository folder, not installed

from experiments.bench_build_time import QUICK, bench_build_time, plot, summary  # noqa: E402
from experiments.harness import write_results  # noqa: E402
from _cli import HelpFormatter  # noqa: E402  (scripts/ is first on sys.path when run)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--repeats", type=int, default=7, help="fresh processes per variant, interleaved")
    parser.add_argument("--layers", type=int, default=32, help="decoder layers of the Llama model")
    parser.add_argument("--output", default="outputs/bench_build_time.json", help="JSON path (the PNG goes beside it)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 processes, 8 layers, claims nothing")
    args = parser.parse_args(argv)
    if args.quick:
        vars(args).update(QUICK)
    results = bench_build_time(args.repeats, args.layers, quick=args.quick)
    write_results(results, args.output, plot)
    print(summary(results))


if __name__ == "__main__":
    main()
