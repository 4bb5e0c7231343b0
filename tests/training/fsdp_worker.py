"""Run by tests/training/test_fsdp.py under torch.distributed.run (or alone): a few SGD steps of a tiny
Llama with MultiMax or SparseMix, sharded with FSDP2's `fully_shard` (per decoder layer and the root)
on gloo; each process trains on its share of one global batch. Rank 0 gathers the full state dict,
saves the model with save_pretrained and writes the losses (mean over ranks) to <out>/result.json."""

import json
import os
import sys

import torch
import torch.distributed as dist
import transformers as tf

from hf_multimax import collect_aux_losses

out_dir, method = sys.argv[1], sys.argv[2]
world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
if world > 1:
    dist.init_process_group("gloo")
torch.manual_seed(0)
config = tf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, max_position_embeddings=128)
if method == "sparsemix":
    config.sparsemix = {"block_size": 8, "top_k": 2, "kl_weight": 0.5, "kl_query_blocks": 64}
model = tf.AutoModelForCausalLM.from_config(config, attn_implementation=method)
if world > 1:
    from torch.distributed.fsdp import fully_shard
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
opt = torch.optim.SGD(model.parameters(), lr=0.5)
ids = torch.randint(0, 64, (8, 64), generator=torch.Generator().manual_seed(1))
local = ids.chunk(world)[rank]
losses = []
model.train()
for step in range(4):
    with collect_aux_losses() as aux:
        out = model(local, labels=local)
    loss = out.loss + aux.loss()
    loss.backward()
    opt.step()
    opt.zero_grad()
    mean = loss.detach().clone()
    if world > 1:
        dist.all_reduce(mean)
    losses.append(mean.item() / world)
attention = model.model.layers[0].self_attn
sharded = type(attention.multimax.t1 if method == "multimax" else attention.sparsemix.w_key).__name__ == "DTensor"
if world > 1:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
else:
    state = model.state_dict()
if rank == 0:
    plain = tf.AutoModelForCausalLM.from_config(config, attn_implementation=method)
    plain.load_state_dict(state)
    plain.save_pretrained(os.path.join(out_dir, "model"))
    with open(os.path.join(out_dir, "result.json"), "w") as f:
        json.dump({"losses": losses, "sharded": sharded}, f)

from worker_exit import leave  # noqa: E402  (this folder is the script's)

leave()
