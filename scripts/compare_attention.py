"""Train the same tiny models on the same data with softmax (HF eager), MultiMax, 1.5-entmax and
sparsemax attention (same seed, same budget) and compare accuracy, loss and attention metrics.

Tasks: the generated keyword-counting text task (tiny BERT, MiniLM's tokenizer) and scikit-learn's
digits (tiny ViT). Attention metrics on a fixed probe batch, averaged over layers, heads and real
query rows: normalised entropy, top-1 mass, share of exactly-zero weights, and the MultiMax paper's
sparsity S and multi-modality M computed on x = log p - log p_max (the normaliser's input up to a
row shift; eps = log 0.05, s = 0.01).

    python scripts/compare_attention.py [--steps 300] [--output outputs/compare_attention.json]
"""

import argparse
import json
import os

import torch
from transformers import AutoModelForImageClassification, AutoModelForSequenceClassification, BertConfig

import hf_multimax  # noqa: F401
from hf_multimax.analysis.metrics import entropy, multimodality, relative_log_scores, sparsity, top_k_mass
from hf_multimax.training.callbacks import SM_EPS, SM_REF_PROB
from hf_multimax.training.finetune import main as finetune
from hf_multimax.training.tasks import generated_digits, generated_keyword_task, offline_tokenizer_path

ATTENTIONS = {"softmax": "eager", "multimax": "multimax", "entmax15": "entmax15", "sparsemax": "sparsemax"}


@torch.no_grad()
def attention_metrics(model, inputs):
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


def run_text(attn, args, tiny_bert, tokenizer_path):
    out = os.path.join(args.workdir, f"text_{attn}")
    metrics = finetune("text_classification", [
        "--model_name_or_path", tiny_bert, "--tokenizer_name", tokenizer_path, "--attn_implementation",
        ATTENTIONS[attn], "--output_dir", out, "--do_train", "--do_eval", "--max_steps", str(args.steps),
        "--learning_rate", "3e-3", "--per_device_train_batch_size", "32", "--report_to", "none", "--save_strategy",
        "no", "--use_cpu", "--seed", "0", "--disable_tqdm", "true", "--logging_steps", str(max(1, args.steps // 5)),
    ])
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    probe = tokenizer(list(generated_keyword_task(32, seed=7)["text"]), padding=True, return_tensors="pt")
    model = AutoModelForSequenceClassification.from_pretrained(out, attn_implementation=ATTENTIONS[attn])
    return metrics, attention_metrics(model, dict(probe))


def run_digits(attn, args):
    out = os.path.join(args.workdir, f"digits_{attn}")
    metrics = finetune("image_classification", [
        "--attn_implementation", ATTENTIONS[attn], "--output_dir", out, "--do_train", "--do_eval", "--max_steps",
        str(args.steps), "--learning_rate", "3e-3", "--per_device_train_batch_size", "32", "--report_to", "none",
        "--save_strategy", "no", "--use_cpu", "--seed", "0", "--disable_tqdm", "true",
        "--logging_steps", str(max(1, args.steps // 5)),
    ])
    probe = torch.tensor(generated_digits(32, seed=1)["pixel_values"])
    model = AutoModelForImageClassification.from_pretrained(out, attn_implementation=ATTENTIONS[attn])
    return metrics, attention_metrics(model, {"pixel_values": probe})


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--attentions", nargs="+", default=list(ATTENTIONS), choices=list(ATTENTIONS))
    parser.add_argument("--output", default="outputs/compare_attention.json")
    parser.add_argument("--workdir", default="outputs/compare_attention_runs")
    args = parser.parse_args(argv)

    tokenizer_path = str(offline_tokenizer_path())
    tiny_bert = os.path.join(args.workdir, "tiny_bert_init")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_labels=2)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(tiny_bert)

    results = {"steps": args.steps, "tasks": {"text": {}, "digits": {}}}
    for attn in args.attentions:
        for task, (metrics, attention) in (("text", run_text(attn, args, tiny_bert, tokenizer_path)),
                                           ("digits", run_digits(attn, args))):
            results["tasks"][task][attn] = {"eval_accuracy": metrics["eval_accuracy"],
                                            "eval_loss": metrics["eval_loss"], **attention}

    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(results, f, indent=2)
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
    png = os.path.splitext(args.output)[0] + ".png"
    fig.savefig(png, dpi=100)
    print("| task | attention | accuracy | loss | entropy | top-1 | zeros | S | M |")
    print("|---|---|---|---|---|---|---|---|---|")
    for task, by_attn in results["tasks"].items():
        for attn, r in by_attn.items():
            print(f"| {task} | {attn} | {r['eval_accuracy']:.3f} | {r['eval_loss']:.3f} | {r['entropy']:.3f} | "
                  f"{r['top1']:.3f} | {r['zeros']:.3f} | {r['S']:.3f} | {r['M']:.3f} |")
    print(f"wrote {args.output} and {png}")
    return results


if __name__ == "__main__":
    main()
