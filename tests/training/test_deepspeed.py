"""DeepSpeed ZeRO-3 (CPU accelerator, 2 processes on gloo) through the real Trainer: MultiMax scalars
and SparseMix scorers are partitioned like every parameter (they are fetched through the layer's
forward, which ZeRO-3 hooks), the losses match one process without DeepSpeed on the same global
batch, and the gathered checkpoint holds the same trained parameters.

DeepSpeed is installed off the venv's path (scripts/setup.sh says why): the workers get it on their
PYTHONPATH, and a user's run does not see it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig

from tests.training.test_ddp import free_port

WORKER = str(Path(__file__).with_name("deepspeed_worker.py"))
DEEPSPEED_PATH = Path(sys.prefix) / "test-extras"  # where scripts/setup.sh installs it


def test_a_users_save_does_not_import_deepspeed(tmp_path):
    # Where DeepSpeed is importable, accelerate imports it in save_pretrained and it warns "Setting
    # accelerator to CPU" on machines without CUDA.
    code = (
        "import sys, hf_multimax\n"
        "from transformers import AutoModelForCausalLM, LlamaConfig\n"
        "config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,\n"
        "                     num_attention_heads=4, num_key_value_heads=2)\n"
        f"AutoModelForCausalLM.from_config(config, attn_implementation='multimax').save_pretrained({str(tmp_path)!r})\n"
        "print('deepspeed' in sys.modules)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DS_ACCELERATOR")}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split()[-1] == "False", "deepspeed is importable in the venv: run bash scripts/setup.sh again"
    assert "Setting accelerator to CPU" not in run.stderr


@pytest.mark.skipif(not (DEEPSPEED_PATH / "deepspeed").is_dir(),
                    reason=f"DeepSpeed is not in {DEEPSPEED_PATH}: bash scripts/setup.sh installs it there")
@pytest.mark.slow  # tens of seconds (fresh processes, several processes, a compile or a smoke run): CI runs -m slow
@pytest.mark.parametrize("method", ["multimax", "sparsemix"])
def test_zero3_matches_one_process(method, tmp_path):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=128)
    if method == "sparsemix":  # long enough inputs for the sparse path; every query block in the KL
        config.sparsemix = {"block_size": 8, "top_k": 2, "kl_weight": 0.5, "kl_query_blocks": 64}
    AutoModelForCausalLM.from_config(config, attn_implementation=method).save_pretrained(tmp_path / "init")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(DEEPSPEED_PATH), os.environ.get("PYTHONPATH")]))}
    for name in ("zero3", "plain"):
        (tmp_path / name).mkdir()
    zero3 = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(free_port()), WORKER, str(tmp_path / "init"), str(tmp_path / "zero3"), "4"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert zero3.returncode == 0, zero3.stderr[-4000:]
    plain = subprocess.run([sys.executable, WORKER, str(tmp_path / "init"), str(tmp_path / "plain"), "8"],
                           capture_output=True, text=True, env={**env, "PLAIN": "1"}, timeout=600)
    assert plain.returncode == 0, plain.stderr[-4000:]
    a, b = (json.loads((tmp_path / n / "result.json").read_text())["losses"] for n in ("zero3", "plain"))
    assert len(a) == len(b) == 4
    for x, y in zip(a, b):
        assert abs(x - y) < 1e-3, (a, b)
    saved, reference = (load_file(tmp_path / n / "model" / "model.safetensors") for n in ("zero3", "plain"))
    plugin = [k for k in reference if f".{method}." in k]
    assert plugin and all(saved[k].shape == reference[k].shape for k in plugin)
    assert max((saved[k] - reference[k]).abs().max().item() for k in plugin) < 1e-4
    assert max(reference[k].abs().max().item() for k in plugin) > 0.01, "they trained"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "zero3" / "model")
    assert reloaded.config._attn_implementation == method
