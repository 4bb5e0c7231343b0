"""MultiMax on a CUDA GPU: the Triton and flex kernels against `naive` (outputs and every gradient),
then forward and forward+backward time against SDPA (FlashAttention) in bf16, B=1, H=16, D=64,
causal, L = 1k..32k, ratios to SDPA in the same run. Writes JSON (from the repository root):

    .venv/bin/python -m experiments.bench_gpu              # benchmarks/results/bench_gpu.json
    .venv/bin/python -m experiments.bench_gpu --quick      # two lengths: a smoke run, claims nothing
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from hf_multimax.ops.multimax import flex_multimax_attention, naive_multimax_attention, triton_multimax_attention

from .harness import HelpFormatter, output_path

__all__ = ["GPU_QUICK", "bench_gpu", "check_gpu_kernels", "gpu_summary", "main"]

KERNELS = {"triton": triton_multimax_attention, "flex": flex_multimax_attention}
GPU_QUICK = {"lengths": [1024, 2048], "repeats": 3}


def check_gpu_kernels() -> dict:
    """Max abs differences to `naive` (fp32 reference) of output and gradients, per kernel and case."""
    results = {}
    g = torch.Generator(device="cuda").manual_seed(0)
    for kernel_name, kernel in KERNELS.items():
        for dtype in (torch.float32, torch.bfloat16):
            for causal, kv_heads, length in ((True, 8, 257), (False, 2, 300)):
                q = torch.randn(2, 8, length, 64, device="cuda", generator=g)
                k, v = (torch.randn(2, kv_heads, length, 64, device="cuda", generator=g) for _ in range(2))
                keep = torch.ones(2, 1, length, length, dtype=torch.bool, device="cuda")
                keep[1, ..., length // 2:] = False
                theta = torch.randn(8, device="cuda", generator=g) * 0.3
                leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)] + [theta.clone().requires_grad_()]
                ref_leaves = [t.detach().float().requires_grad_() for t in leaves]
                out, _ = kernel(*leaves, is_causal=causal, mask=keep)
                ref, _ = naive_multimax_attention(*ref_leaves, is_causal=causal, mask=keep)
                w = torch.randn(ref.shape, device="cuda", generator=g)
                got = torch.autograd.grad((out.float() * w).sum(), leaves)
                want = torch.autograd.grad((ref * w).sum(), ref_leaves)
                key = f"{kernel_name} {str(dtype).split('.')[-1]} {'causal' if causal else 'padded'} kv{kv_heads} L{length}"
                results[key] = {"out": (out.float() - ref).abs().max().item(),
                                **{f"d{n}": ((a.float() - b).abs().max() / b.abs().max().clamp_min(1)).item()
                                   for n, a, b in zip(("q", "k", "v", "theta"), got, want)}}
    return results


def _time(fn, repeats):
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return sorted(times)[len(times) // 2]


def bench_gpu(lengths, repeats: int) -> dict:
    rows = []
    for length in lengths:
        q, k, v = (torch.randn(1, 16, length, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        theta = (torch.randn(8, device="cuda") * 0.2).requires_grad_()
        grad = torch.randn_like(q)
        runs = {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)}
        runs.update({name: (lambda kern=kern: kern(q, k, v, theta, is_causal=True)[0]) for name, kern in KERNELS.items()})
        row = {"length": length}
        for name, run in runs.items():
            with torch.no_grad():
                fwd = _time(run, repeats)
            both = _time(lambda: run().backward(grad), repeats)
            row[name] = {"forward_s": fwd, "forward_backward_s": both}
        rows.append(row)
    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "shape": {"B": 1, "H": 16, "D": 64, "causal": True, "dtype": "bfloat16"}, "rows": rows}


def gpu_summary(results: dict) -> str:
    lines = [f"{results['device']}:"]
    for row in results["rows"]:
        s = row["sdpa"]
        cells = [f"{name} fwd {row[name]['forward_s'] / s['forward_s']:.2f}x, fwd+bwd "
                 f"{row[name]['forward_backward_s'] / s['forward_backward_s']:.2f}x" for name in KERNELS]
        lines.append(f"L={row['length']}: " + " | ".join(cells))
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m experiments.bench_gpu", description=__doc__,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768],
                        help="sequence lengths to time")
    parser.add_argument("--repeats", type=int, default=10, help="timed repeats per measurement (median reported)")
    parser.add_argument("--output", default=None, help="JSON path (default: benchmarks/results/bench_gpu.json; with --quick outputs/bench_gpu_quick.json)")
    parser.add_argument("--quick", action="store_true", help="smoke run: two lengths, three repeats")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("no CUDA device: this benchmark measures the GPU kernels (the CPU ones: python -m experiments.bench_attention)")
    if args.quick:
        vars(args).update(GPU_QUICK)
    checks = check_gpu_kernels()
    for case, diffs in checks.items():
        print(case, " ".join(f"{k}={v:.1e}" for k, v in diffs.items()))
    results = {"checks": checks, **bench_gpu(args.lengths, args.repeats), "quick": args.quick}
    output = Path(output_path("bench_gpu", "quick" if args.quick else None, args.output))
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=1))
    print(gpu_summary(results))
    print(f"wrote {output}")
    if args.quick:
        print("SMOKE RUN (--quick): two lengths; these ratios are not measurements of the targets.")
    return results


if __name__ == "__main__":
    main()
