"""MultiMax attention backends against SDPA softmax, measured in the same run.

B=1, H=8, D=64, causal, order-2 scalars away from identity. For each sequence length: forward time
(no grad) and forward+backward time (median of repeats after a warm-up; the first call's extra
time, mostly compilation, is reported separately), and peak memory of forward+backward (peak RSS
growth, each in a fresh process). Also an end-to-end `generate` tokens/s on a tiny Llama.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hf_multimax.ops.multimax import BACKENDS

from .harness import (
    forward_backward_step,
    machine,
    peak_memory_mib,
    plot_against_baseline,
    sweep,
    time_forward_backward,
    timed,
)

__all__ = ["MAX_LEN", "QUICK", "bench_attention", "summary"]

H, D = 8, 64
# Where each backend stops being run (memory or time): eager materialises H*L*L fp32 scores several times.
MAX_LEN = {"eager": 2048, "chunked": 16384, "fused": 16384, "flex": 16384, "sdpa": 16384}
# The CI smoke run: tiny sizes, one repeat.
QUICK = {"lengths": [128, 256], "memory_lengths": [256], "repeats": 1, "generate_tokens": 4}


def make_inputs(length: int, requires_grad: bool, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, H, length, D, generator=g).requires_grad_(requires_grad) for _ in range(3))
    theta = (torch.randn(8, generator=g) * 0.2).requires_grad_(requires_grad)
    return [q, k, v, theta]


def run(backend: str, q, k, v, theta):
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return BACKENDS[backend](q, k, v, theta, is_causal=True)[0]


def time_backend(backend: str, length: int, repeats: int) -> dict:
    # CPU flex has no backward.
    return time_forward_backward(lambda *x: run(backend, *x), lambda grad: make_inputs(length, grad), repeats,
                                 backward=backend != "flex")


def memory_step(backend: str, length: int):
    """The forward+backward whose peak `peak_memory_mib` measures (in its fresh process)."""
    return forward_backward_step(lambda *x: run(backend, *x), make_inputs(64, True), make_inputs(length, True))


def generate_throughput(impl: str, new_tokens: int, repeats: int) -> float:
    import hf_multimax  # noqa: F401  (registers attn_implementation="multimax")
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=impl).eval()
    prompt = torch.randint(0, 1000, (1, 64), generator=torch.Generator().manual_seed(0))

    def gen():
        with torch.no_grad():
            model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)

    median, _ = timed(gen, repeats)
    return new_tokens / median


def bench_attention(lengths, memory_lengths, backends, repeats: int, generate_tokens: int) -> dict:
    """Every measurement of the module docstring for `backends` (names in `MAX_LEN`; SDPA, the
    baseline, is always measured)."""
    unknown = sorted(set(backends) - set(MAX_LEN))
    if unknown:
        raise ValueError(f"unknown backend(s) {unknown}; choose from {sorted(MAX_LEN)}")
    backends = ["sdpa", *(b for b in backends if b != "sdpa")]
    rows = {n: {"length": n} for n in lengths}
    sweep(rows, [(n, b) for n in lengths for b in backends if n <= MAX_LEN[b]],
          lambda b, n: time_backend(b, n, repeats), "timing")
    sweep(rows, [(n, b) for n in memory_lengths for b in backends if b != "flex" and n <= MAX_LEN[b]],
          lambda b, n: {"peak_mib": peak_memory_mib(f"{__name__}:memory_step", b, n)}, "peak memory")
    tokens = {impl: generate_throughput(impl, generate_tokens, repeats) for impl in ("sdpa", "multimax")}
    return {
        "machine": machine(),
        "shape": {"B": 1, "H": H, "D": D, "causal": True},
        "backends": backends,
        "rows": [rows[n] for n in sorted(rows)],
        "generate_tokens_per_s": {**tokens, "ratio": tokens["multimax"] / tokens["sdpa"]},
    }


def plot(results: dict, path: str) -> None:
    plot_against_baseline(
        results, results["backends"], path, baseline="sdpa", label="multimax", baseline_label="SDPA softmax",
        panels=[("forward_s", "forward time / SDPA", False),
                ("forward_backward_s", "forward+backward time / SDPA", False),
                ("peak_mib", "fwd+bwd peak memory / SDPA", False)],
        title=f"MultiMax backends vs SDPA on {results['machine']['cpu']} ({results['machine']['threads']} threads)",
    )


def summary(results: dict) -> str:
    """Per length, each backend's ratios to SDPA; then the `generate` ratio."""
    lines = []
    for row in results["rows"]:
        sdpa = row.get("sdpa", {})
        cells = []
        for b in results["backends"][1:]:
            r = row.get(b, {})
            ratios = [f"{k.split('_s')[0]} {r[k] / sdpa[k]:.2f}x" for k in ("forward_s", "forward_backward_s", "peak_mib")
                      if k in r and sdpa.get(k)]
            if ratios:
                cells.append(f"{b}: " + ", ".join(ratios))
        lines.append(f"L={row['length']}: " + " | ".join(cells))
    lines.append(f"generate tokens/s multimax/sdpa: {results['generate_tokens_per_s']['ratio']:.2f}")
    return "\n".join(lines)
