"""Benchmark SparseMix attention against dense SDPA softmax attention, measured in the same run
(`experiments/bench_sparsemix.py` says what is measured). Writes JSON and a PNG chart.

    .venv/bin/python scripts/bench_sparsemix.py                  # full sweep, 1024..16384
    .venv/bin/python scripts/bench_sparsemix.py --quick          # smoke run: tiny sizes, claims nothing
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/ is a repository folder, not installed

import torch  # noqa: E402

from experiments.bench_sparsemix import MAX_LEN, QUICK, bench_sparsemix, plot, summary  # noqa: E402
from experiments.harness import write_results  # noqa: E402
from _cli import HelpFormatter  # noqa: E402  (scripts/ is first on sys.path when run)
from hf_multimax import SparseMixSettings  # noqa: E402
from hf_multimax.ops.sparsemix import SELECTORS  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384], help="sequence lengths to time")
    parser.add_argument("--memory_lengths", type=int, nargs="+", default=[16384], help="lengths whose peak memory is measured (fresh process each)")
    parser.add_argument("--variants", nargs="+", default=["sdpa", "blocked", "eager", "flex"], choices=list(MAX_LEN), help="what to time (sdpa is the dense baseline)")
    parser.add_argument("--block_size", type=int, default=SparseMixSettings.block_size, help="SparseMix block size")
    parser.add_argument("--top_k", type=int, default=SparseMixSettings.top_k, help="key blocks kept per query block besides sink and local")
    parser.add_argument("--selector", default="auto", choices=["auto", *SELECTORS], help="what ranks the key blocks (SparseMixSettings.selector; auto: block_rotary on the benchmark's Llama)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per measurement (median reported)")
    parser.add_argument("--output", default="outputs/bench_sparsemix.json", help="JSON path (the PNG goes beside it)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--quick", action="store_true", help="CI smoke run: tiny sizes, one repeat")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        vars(args).update(QUICK)
    results = bench_sparsemix(args.lengths, args.memory_lengths, args.variants, args.repeats, args.block_size,
                              args.top_k, args.selector)
    write_results(results, args.output, plot)
    print(summary(results))


if __name__ == "__main__":
    main()
