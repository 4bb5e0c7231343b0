"""Benchmark SparseMix decoding (generate with a KV cache) against dense SDPA at long context, measured
in the same run (`experiments/bench_sparsemix_decode.py` says what is measured). Writes JSON and a
PNG chart and prints the table.

    .venv/bin/python scripts/bench_sparsemix_decode.py --threads 1              # 16k context
    .venv/bin/python scripts/bench_sparsemix_decode.py --quick                  # smoke run: tiny sizes, claims nothing
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/ is a repository folder, not installed

import torch  # noqa: E402

from experiments.bench_sparsemix_decode import QUICK, VARIANTS, bench_sparsemix_decode, decode_summary, plot_decode  # noqa: E402
from experiments.harness import write_results  # noqa: E402
from _cli import HelpFormatter  # noqa: E402  (scripts/ is first on sys.path when run)
from hf_multimax import SparseMixSettings  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--context", type=int, default=16384, help="prompt tokens in the cache before decoding")
    parser.add_argument("--new_tokens", type=int, default=32, help="tokens generated per timed run")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per model (median reported)")
    parser.add_argument("--block_size", type=int, default=SparseMixSettings.block_size, help="SparseMix block size")
    parser.add_argument("--top_k", type=int, default=SparseMixSettings.top_k, help="key blocks kept per query block besides sink and local")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--output", default="outputs/bench_sparsemix_decode.json", help="JSON path (the PNG goes beside it)")
    parser.add_argument("--models", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                        help="what to time (sdpa, the baseline, always is; sparsemix_<selector> for each selector)")
    parser.add_argument("--quick", action="store_true", help="CI smoke run: tiny sizes, one repeat")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        vars(args).update(QUICK)
    results = bench_sparsemix_decode(args.context, args.new_tokens, args.repeats, args.block_size, args.top_k,
                                     names=args.models)
    results["quick"] = args.quick
    write_results(results, args.output, plot_decode)
    print(decode_summary(results))
    if args.quick:
        print("SMOKE RUN (--quick): tiny sizes, the ratios mean nothing")


if __name__ == "__main__":
    main()
