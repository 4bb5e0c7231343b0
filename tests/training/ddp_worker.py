"""Run by tests/training/test_ddp.py under torch.distributed.run (or alone): a few MultiMaxTrainer
steps, then every rank writes its MultiMax scalars and the logged losses to <out>/rank<N>.json."""

import json
import os
import sys

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

import hf_multimax  # noqa: F401
from hf_multimax.training import MultiMaxTrainer, MultiMaxTrainingArguments, multimax_scalars
from hf_multimax.training.tasks import generated_keyword_task

model_dir, tokenizer_dir, out_dir, per_device_batch = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
data = generated_keyword_task(256, seed=0).map(lambda b: tokenizer(b["text"]), batched=True, remove_columns=["text"])
model = AutoModelForSequenceClassification.from_pretrained(model_dir, attn_implementation="multimax")
args = MultiMaxTrainingArguments(
    output_dir=out_dir, max_steps=6, per_device_train_batch_size=per_device_batch, learning_rate=3e-3,
    logging_steps=1, report_to="none", save_strategy="no", use_cpu=True, seed=0, data_seed=0, disable_tqdm=True,
    # The default (True) multiplies the loss by the number of processes before backward, and the
    # logged loss with it (2x here); False logs the plain mean, comparable with one process.
    average_tokens_across_devices=False,
    ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
)
trainer = MultiMaxTrainer(model=model, args=args, train_dataset=data, data_collator=DataCollatorWithPadding(tokenizer))
trainer.train()
rank = int(os.environ.get("RANK", "0"))
with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
    json.dump({"scalars": multimax_scalars(trainer.model),
               "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
               "world_size": torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1}, f)

from worker_exit import leave  # noqa: E402  (this folder is the script's)

leave()
