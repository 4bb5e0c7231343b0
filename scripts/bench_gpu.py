"""MultiMax's GPU kernels (Triton, flex) on a CUDA device: correctness against `naive`, then time
against SDPA/FlashAttention in bf16 (`experiments/bench_gpu.py` says what is measured). Writes JSON.

    .venv/bin/python scripts/bench_gpu.py --output outputs/bench_gpu.json
    .venv/bin/python scripts/bench_gpu.py --quick     # two lengths: a smoke run, claims nothing
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/ is a repository folder, not installed

import torch  # noqa: E402

from _cli import HelpFormatter  # noqa: E402  (scripts/ is first on sys.path when run)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768],
                        help="sequence lengths to time")
    parser.add_argument("--repeats", type=int, default=10, help="timed repeats per measurement (median reported)")
    parser.add_argument("--output", default="outputs/bench_gpu.json", help="JSON path")
    parser.add_argument("--quick", action="store_true", help="smoke run: two lengths, three repeats")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("no CUDA device: this benchmark measures the GPU kernels (the CPU ones: scripts/bench_attention.py)")
    from experiments.bench_gpu import GPU_QUICK, bench_gpu, check_gpu_kernels, gpu_summary

    if args.quick:
        vars(args).update(GPU_QUICK)
    checks = check_gpu_kernels()
    for case, diffs in checks.items():
        print(case, " ".join(f"{k}={v:.1e}" for k, v in diffs.items()))
    results = {"checks": checks, **bench_gpu(args.lengths, args.repeats), "quick": args.quick}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=1))
    if args.quick:
        print("QUICK smoke run: two lengths; these ratios are not measurements of the targets.")
    print(gpu_summary(results))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
