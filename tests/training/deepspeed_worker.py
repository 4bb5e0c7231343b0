"""Run by tests/training/test_deepspeed.py under torch.distributed.run (DeepSpeed ZeRO-3 on the CPU
accelerator, gloo) or alone with PLAIN=1 (no DeepSpeed): a few MultiMaxTrainer steps from a saved
checkpoint, then the model is saved (gathered) and rank 0 writes the logged losses to <out>/result.json."""

import json
import os
import sys

import torch
import transformers as tf
from datasets import Dataset

from hf_multimax.training import MultiMaxTrainer

model_dir, out_dir, per_device_batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
plain = bool(os.environ.get("PLAIN"))
zero3 = {"zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True},
         "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto", "gradient_accumulation_steps": "auto"}
args = tf.TrainingArguments(
    output_dir=out_dir, max_steps=4, per_device_train_batch_size=per_device_batch, learning_rate=1e-2,
    lr_scheduler_type="constant", logging_steps=1, report_to="none", save_strategy="no", use_cpu=True, seed=0,
    data_seed=0, disable_tqdm=True, average_tokens_across_devices=False,  # as in ddp_worker.py
    ddp_backend=None if plain else "gloo", deepspeed=None if plain else zero3,
)
if not plain:
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")  # the CPU accelerator's default backend is oneCCL
model = tf.AutoModelForCausalLM.from_pretrained(model_dir)  # ZeRO-3: built partitioned (zero.Init)
ids = torch.randint(0, 64, (96, 64), generator=torch.Generator().manual_seed(1)).tolist()
trainer = MultiMaxTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": ids, "labels": ids}))
trainer.train()
trainer.save_model(os.path.join(out_dir, "model"))
if int(os.environ.get("RANK", "0")) == 0:
    with open(os.path.join(out_dir, "result.json"), "w") as f:
        json.dump({"losses": [h["loss"] for h in trainer.state.log_history if "loss" in h]}, f)

from worker_exit import leave  # noqa: E402  (this folder is the script's)

leave()
