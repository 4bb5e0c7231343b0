"""Train the same tiny models on the same data with softmax (HF eager), MultiMax, 1.5-entmax and
sparsemax attention (same seed, same budget) and compare accuracy, loss and attention metrics.

Tasks: the generated keyword-counting text task (tiny BERT, MiniLM's tokenizer) and scikit-learn's
digits (tiny ViT). Attention metrics on a fixed probe batch, averaged over layers, heads and real
query rows: normalised entropy, top-1 mass, share of exactly-zero weights, and the MultiMax paper's
sparsity S and multi-modality M computed on x = log p - log p_max (the normaliser's input up to a
row shift; eps = log 0.05, s = 0.01). Writes JSON and a PNG chart, prints a markdown table (from the
repository root):

    .venv/bin/python -m experiments.compare_attention             # 300 steps each: benchmarks/results/compare_attention.json
    .venv/bin/python -m experiments.compare_attention --quick     # smoke run: 4 steps each, claims nothing
"""

from __future__ import annotations

import argparse
import os

import torch
from transformers import (
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
)

import hf_multimax  # noqa: F401  (registers the attention implementations)
from hf_multimax.analysis.metrics import entropy, multimodality, relative_log_scores, sparsity, top_k_mass
from hf_multimax.training.callbacks import SM_EPS, SM_REF_PROB
from hf_multimax.training.finetune import main as finetune
from hf_multimax.training.tasks import generated_digits, generated_keyword_task, offline_tokenizer_path

from .harness import HelpFormatter, output_path, write_results

__all__ = ["ATTENTIONS", "attention_metrics", "compare_attention", "main", "markdown_table", "plot"]

# name in the results -> attn_implementation
ATTENTIONS = {"softmax": "eager", "multimax": "multimax", "entmax15": "entmax15", "sparsemax": "sparsemax"}


@torch.no_grad()
def attention_metrics(model, inputs) -> dict[str, float]:
    model.eval()
    attentions = model(**inputs, output_attentions=True).attentions
    rows = {k: [] for k in ("entropy", "top1", "zeros", "S", "M")}
    for probs in attentions:
        probs = probs.float()
        valid = probs.sum(-1) > 0
        x = relative_log_scores(probs)
        rows["entropy"].append(entropy(probs)[valid])
        rows["top1"].append(top_k_mass(probs, 1)[valid])
        rows["zeros"].append((probs == 0).float().mean(-1)[valid])
        rows["S"].append(sparsity(x, probs, eps=SM_EPS, s=SM_REF_PROB)[valid])
        rows["M"].append(multimodality(x, probs, eps=SM_EPS)[valid])
    return {k: torch.cat(v).mean().item() for k, v in rows.items()}


def _trainer_flags(attn: str, out: str, steps: int) -> list[str]:
    """The budget every run shares."""
    return [
        "--attn_implementation", ATTENTIONS[attn], "--output_dir", out, "--do_train", "--do_eval", "--max_steps",
        str(steps), "--learning_rate", "3e-3", "--per_device_train_batch_size", "32", "--report_to", "none",
        "--save_strategy", "no", "--use_cpu", "--seed", "0", "--disable_tqdm", "true",
        "--logging_steps", str(max(1, steps // 5)),
    ]


def run_text(attn: str, steps: int, workdir: str, tiny_bert: str, tokenizer_path: str):
    out = os.path.join(workdir, f"text_{attn}")
    metrics = finetune("text_classification", ["--model_name_or_path", tiny_bert, "--tokenizer_name", tokenizer_path,
                                               *_trainer_flags(attn, out, steps)])
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    probe = tokenizer(list(generated_keyword_task(32, seed=7)["text"]), padding=True, return_tensors="pt")
    model = AutoModelForSequenceClassification.from_pretrained(out, attn_implementation=ATTENTIONS[attn])
    return metrics, attention_metrics(model, dict(probe))


def run_digits(attn: str, steps: int, workdir: str):
    out = os.path.join(workdir, f"digits_{attn}")
    metrics = finetune("image_classification", _trainer_flags(attn, out, steps))
    probe = torch.tensor(generated_digits(32, seed=1)["pixel_values"])
    model = AutoModelForImageClassification.from_pretrained(out, attn_implementation=ATTENTIONS[attn])
    return metrics, attention_metrics(model, {"pixel_values": probe})


def compare_attention(attentions=tuple(ATTENTIONS), steps: int = 300, workdir: str = "outputs/compare_attention_runs") -> dict:
    """Both tasks with each of `attentions` (keys of `ATTENTIONS`); runs are saved under `workdir`.
    Returns `{"steps", "tasks": {task: {attention: {eval_accuracy, eval_loss, <attention metrics>}}}}`."""
    tokenizer_path = str(offline_tokenizer_path())
    tiny_bert = os.path.join(workdir, "tiny_bert_init")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_labels=2)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(tiny_bert)

    results = {"steps": steps, "tasks": {"text": {}, "digits": {}}}
    for attn in attentions:
        for task, (metrics, attention) in (("text", run_text(attn, steps, workdir, tiny_bert, tokenizer_path)),
                                           ("digits", run_digits(attn, steps, workdir))):
            results["tasks"][task][attn] = {"eval_accuracy": metrics["eval_accuracy"],
                                            "eval_loss": metrics["eval_loss"], **attention}
    return results


def plot(results: dict, path: str) -> None:
    """Bars per task (rows) and measure (columns)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ["eval_accuracy", "entropy", "zeros", "S", "M"]
    fig, axes = plt.subplots(2, len(keys), figsize=(3.2 * len(keys), 6), squeeze=False)
    for row, task in enumerate(("text", "digits")):
        for col, key in enumerate(keys):
            names = list(results["tasks"][task])
            axes[row][col].bar(names, [results["tasks"][task][n][key] for n in names],
                               color=["gray", "tab:blue", "tab:orange", "tab:green"][: len(names)])
            axes[row][col].set_title(f"{task}: {key}", fontsize=9)
            axes[row][col].tick_params(axis="x", labelsize=7, rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def markdown_table(results: dict) -> str:
    lines = ["| task | attention | accuracy | loss | entropy | top-1 | zeros | S | M |",
             "|---|---|---|---|---|---|---|---|---|"]
    for task, by_attn in results["tasks"].items():
        for attn, r in by_attn.items():
            lines.append(f"| {task} | {attn} | {r['eval_accuracy']:.3f} | {r['eval_loss']:.3f} | {r['entropy']:.3f} | "
                         f"{r['top1']:.3f} | {r['zeros']:.3f} | {r['S']:.3f} | {r['M']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m experiments.compare_attention", description=__doc__,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="training steps per attention implementation")
    parser.add_argument("--attentions", nargs="+", default=list(ATTENTIONS), choices=list(ATTENTIONS), help="attention implementations to compare")
    parser.add_argument("--output", default=None, help="JSON path, the PNG beside it (default: benchmarks/results/compare_attention.json; with --quick outputs/compare_attention_quick.json)")
    parser.add_argument("--workdir", default="outputs/compare_attention_runs", help="where the training runs write")
    parser.add_argument("--quick", action="store_true", help="smoke run: 4 steps each; claims nothing")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps = 4
    results = compare_attention(args.attentions, args.steps, args.workdir)
    results["quick"] = args.quick
    write_results(results, output_path("compare_attention", "quick" if args.quick else None, args.output), plot)
    print(markdown_table(results))
    if args.quick:
        print("SMOKE RUN (--quick): 4 training steps; these numbers compare nothing.")
    return results


if __name__ == "__main__":
    main()
