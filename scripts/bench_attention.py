"""Benchmark MultiMax attention backends against SDPA softmax, measured in the same run
(`experiments/bench_attention.py` says what is measured). Writes JSON and a PNG chart.

    .venv/bin/python scripts/bench_attention.py                  # full sweep, 512..16384
    .venv/bin/python scripts/bench_attention.py --quick          # smoke run: tiny sizes, claims nothing
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/ is a repository folder, not installed

from experiments.bench_attention import MAX_LEN, QUICK, bench_attention, plot, summary  # noqa: E402
from experiments.bench_models import FULL_MODELS, QUICK_MODELS, bench_models, models_summary  # noqa: E402
from experiments.harness import write_results  # noqa: E402
from _cli import HelpFormatter  # noqa: E402  (scripts/ is first on sys.path when run)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384], help="sequence lengths to time")
    parser.add_argument("--memory_lengths", type=int, nargs="+", default=[2048, 8192], help="lengths whose peak memory is measured (fresh process each)")
    parser.add_argument("--backends", nargs="+", default=["sdpa", "eager", "chunked", "fused", "flex"], choices=list(MAX_LEN), help="what to time (sdpa is the baseline)")
    parser.add_argument("--no_models", action="store_true", help="skip the model-level rows (experiments/bench_models.py)")
    parser.add_argument("--no_busy", action="store_true", help="skip the generate row with the other core busy")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per measurement (median reported)")
    parser.add_argument("--generate_tokens", type=int, default=64, help="new tokens of the greedy-generation measurement")
    parser.add_argument("--output", default="outputs/bench_attention.json", help="JSON path (the PNG goes beside it)")
    parser.add_argument("--quick", action="store_true", help="CI smoke run: tiny sizes, one repeat")
    args = parser.parse_args(argv)
    if args.quick:
        vars(args).update(QUICK)
    results = bench_attention(args.lengths, args.memory_lengths, args.backends, args.repeats, args.generate_tokens)
    if not args.no_models:
        sizes = QUICK_MODELS if args.quick else FULL_MODELS
        results["models"] = bench_models(**sizes, busy=not (args.quick or args.no_busy))
    write_results(results, args.output, plot)
    if args.quick:
        print("QUICK smoke run: tiny sizes and one repeat; these ratios are not measurements of the targets.")
    print(summary(results))
    if "models" in results:
        print(models_summary(results["models"]))


if __name__ == "__main__":
    main()
