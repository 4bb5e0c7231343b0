"""FSDP2 (`fully_shard`, 2 CPU processes on gloo) trains MultiMax and SparseMix models: the plugin's
parameters are sharded like the others (1-D, fetched through the layer's forward), the losses match
one process with the same global batch, and the gathered model saves and reloads with what it learned.
(accelerate's FSDP plugin, which Trainer uses, does not run on CPU, hence the plain loop.)"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.training.test_ddp import free_port

WORKER = str(Path(__file__).with_name("fsdp_worker.py"))


@pytest.mark.slow  # tens of seconds (fresh processes, several processes, a compile or a smoke run): CI runs -m slow
@pytest.mark.parametrize("method", ["multimax", "sparsemix"])
def test_fully_shard_matches_one_process_and_saves(method, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    for name in ("fsdp", "single"):
        (tmp_path / name).mkdir()
    fsdp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(free_port()), WORKER, str(tmp_path / "fsdp"), method],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert fsdp.returncode == 0, fsdp.stderr[-4000:]
    single = subprocess.run([sys.executable, WORKER, str(tmp_path / "single"), method], capture_output=True, text=True,
                            env=env, timeout=600)
    assert single.returncode == 0, single.stderr[-4000:]
    sharded, one = (json.loads((tmp_path / n / "result.json").read_text()) for n in ("fsdp", "single"))
    assert sharded["sharded"] and not one["sharded"]
    assert one["losses"][-1] < one["losses"][0]
    for a, b in zip(sharded["losses"], one["losses"]):
        assert abs(a - b) < 1e-4, (sharded["losses"], one["losses"])
    reloaded = {n: AutoModelForCausalLM.from_pretrained(tmp_path / n / "model") for n in ("fsdp", "single")}
    assert reloaded["fsdp"].config._attn_implementation == method
    plugin = {n: p for n, p in reloaded["fsdp"].named_parameters() if f".{method}." in n}
    assert plugin and any(p.detach().abs().sum() > 0 for p in plugin.values())
    reference = dict(reloaded["single"].named_parameters())
    for name, p in plugin.items():
        torch.testing.assert_close(p, reference[name], atol=1e-5, rtol=1e-4)
