"""SparseMix fine-tuning through the real Trainer: the KL term trains the scorers, is logged, and the
model learns a task that needs attention beyond the local block."""

import math

import torch
import transformers as tf
from datasets import Dataset

from hf_multimax.layers.sparsemix import SparseMixScorer
from hf_multimax.training import MultiMaxTrainer


def copy_task(n, half=48, seed=0):
    """Random tokens, then the same tokens again: the second half is predictable only by attending
    48 positions back, i.e. 6 blocks of 8 away."""
    g = torch.Generator().manual_seed(seed)
    first = torch.randint(3, 64, (n, half), generator=g)
    ids = torch.cat([first, first], dim=1)
    labels = ids.clone()
    labels[:, :half] = -100
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()})


def test_trainer_learns_with_sparse_attention_and_logs_the_kl(tmp_path):
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    config.sparsemix = {"block_size": 8, "top_k": 2, "kl_weight": 0.1}
    model = tf.AutoModelForCausalLM.from_config(config, attn_implementation="sparsemix")
    scorer = model.model.layers[0].self_attn.sparsemix
    w_key = scorer.w_key.detach().clone()
    args = tf.TrainingArguments(output_dir=str(tmp_path), max_steps=60, per_device_train_batch_size=16,
                                learning_rate=3e-3, logging_steps=20, report_to=[], save_strategy="no",
                                disable_tqdm=True, use_cpu=True, seed=0)
    trainer = MultiMaxTrainer(model=model, args=args, train_dataset=copy_task(640))
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 3 and all(entry["sparsemix_kl"] > 0 for entry in logs)
    # The second half is uniform over 61 tokens unless copied from 48 positions back: a loss well
    # under log(61) means the sparse attention found the far blocks.
    assert logs[-1]["loss"] < 0.9 * math.log(61), logs
    assert not torch.equal(scorer.w_key.detach(), w_key), "the KL term trains the scorer"
    assert isinstance(scorer, SparseMixScorer) and model.config.sparsemix["top_k"] == 2
