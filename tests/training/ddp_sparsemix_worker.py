"""Run by tests/training/test_ddp.py under torch.distributed.run (or alone): a few MultiMaxTrainer
steps of a SparseMix causal LM on inputs long enough for the sparse path and its KL term; every
rank writes its scorer weights' sum and the logged losses to <out>/rank<N>.json."""

import json
import os
import sys

import torch
import transformers as tf
from datasets import Dataset

import hf_multimax  # noqa: F401
from hf_multimax.training import MultiMaxTrainer

out_dir, per_device_batch = sys.argv[1], int(sys.argv[2])
torch.manual_seed(0)
config = tf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, max_position_embeddings=128)
# Every eligible query block in the KL: the term does not depend on each rank's random draw.
config.sparsemix = {"block_size": 8, "top_k": 2, "kl_weight": 0.5, "kl_query_blocks": 64}
model = tf.AutoModelForCausalLM.from_config(config, attn_implementation="sparsemix")
ids = torch.randint(0, 64, (96, 64), generator=torch.Generator().manual_seed(1)).tolist()
args = tf.TrainingArguments(
    output_dir=out_dir, max_steps=4, per_device_train_batch_size=per_device_batch, learning_rate=3e-3,
    logging_steps=1, report_to="none", save_strategy="no", use_cpu=True, seed=0, data_seed=0, disable_tqdm=True,
    average_tokens_across_devices=False,  # as in ddp_worker.py: the logged loss stays comparable
    ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
)
trainer = MultiMaxTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": ids, "labels": ids}))
trainer.train()
rank = int(os.environ.get("RANK", "0"))
scorers = {n: p.detach().double().sum().item() for n, p in trainer.model.named_parameters() if ".sparsemix." in n}
with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
    json.dump({"scorers": scorers, "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
               "kl": [h["sparsemix_kl"] for h in trainer.state.log_history if "loss" in h]}, f)

from worker_exit import leave  # noqa: E402  (this folder is the script's)

leave()
