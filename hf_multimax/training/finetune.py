"""The fine-tuning tasks behind `scripts/finetune_*.py`: data, model, `AttentionPluginTrainer`, train,
evaluate, save. Every `TrainingArguments` flag applies (resume, logging, accelerate/torchrun...)."""

from __future__ import annotations

import math

import numpy as np
import torch
from transformers import (
    AutoImageProcessor,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    DataCollatorWithPadding,
    HfArgumentParser,
    LlamaConfig,
    ViTConfig,
    ViTImageProcessorPil,
    set_seed,
)

from .callbacks import MultiMaxLoggingCallback
from .tasks import (
    MINILM_HUB_ID,
    DataArguments,
    ModelArguments,
    accuracy_metric,
    describe_data,
    generated_digits,
    generated_keyword_task,
    generated_language,
    load_model,
    load_raw_dataset,
    offline_tokenizer_path,
)
from .trainer import AttentionPluginTrainer, AttentionPluginTrainingArguments

__all__ = ["TASKS", "main", "parse_args", "run_causal_lm", "run_image_classification", "run_text_classification"]


def parse_args(args=None, task: str | None = None):
    description = None
    if task is not None:  # the task's own description first; the many Trainer flags follow ours
        description = (f"Fine-tuning: {' '.join(TASKS[task].__doc__.split())} Any attention implementation "
                       "(default: MultiMax), and every TrainingArguments flag (--output_dir is required); the first "
                       "groups of flags below are this script's.")
    parser = HfArgumentParser((ModelArguments, DataArguments, AttentionPluginTrainingArguments),
                              description=description,
                              usage="%(prog)s --output_dir DIR [--do_train] [--do_eval] [options]")
    return parser.parse_args_into_dataclasses(args=args)


def _tokenizer(model_args):
    return AutoTokenizer.from_pretrained(
        model_args.tokenizer_name or model_args.model_name_or_path or offline_tokenizer_path()
    )


def _classification_metrics():
    metric = accuracy_metric()

    def compute(eval_pred):
        logits, labels = eval_pred
        return metric.compute(predictions=np.argmax(logits, axis=-1), references=labels)

    return compute


def _probe(collator, dataset, n=8):
    rows = [dataset[i] for i in range(min(n, len(dataset)))]
    batch = collator(rows)
    return {k: v for k, v in batch.items() if k != "labels"}


def _train_and_evaluate(trainer, training_args, probe=None, perplexity: bool = False, base_model=None, data=None):
    if probe is not None:
        trainer.add_callback(MultiMaxLoggingCallback(probe))
    metrics = {}
    if training_args.do_train:
        result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        trainer.save_model()
        if trainer.processing_class is not None:
            trainer.processing_class.save_pretrained(training_args.output_dir)
        trainer.log_metrics("train", result.metrics)
        trainer.save_metrics("train", result.metrics)
        trainer.save_state()
        metrics.update(result.metrics)
    if training_args.do_eval:
        eval_metrics = trainer.evaluate()
        if perplexity and "eval_loss" in eval_metrics:  # a language model's metric only
            eval_metrics["eval_perplexity"] = math.exp(min(eval_metrics["eval_loss"], 50))
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
        metrics.update(eval_metrics)
    if training_args.do_train:  # the card records what the run knows: base model, data, its metrics
        trainer.create_model_card(finetuned_from=base_model, dataset=data)
        if training_args.push_to_hub:  # save_model pushed before the card knew them: push the final folder
            trainer.push_to_hub(finetuned_from=base_model, dataset=data)
    return metrics


def run_text_classification(model_args, data_args, training_args):
    """Sequence classification. Defaults: the packaged all-MiniLM-L6-v2 and the generated
    keyword-counting task."""
    set_seed(training_args.seed)
    base_model = model_args.model_name_or_path or MINILM_HUB_ID
    if model_args.model_name_or_path is None:
        model_args.model_name_or_path = offline_tokenizer_path()
    raw = load_raw_dataset(data_args, generated_keyword_task)
    tokenizer = _tokenizer(model_args)
    labels = sorted(set(raw["train"][data_args.label_column]))
    label2id = {label: i for i, label in enumerate(labels)}

    def preprocess(batch):
        out = tokenizer(batch[data_args.text_column], truncation=True, max_length=data_args.max_seq_length)
        out["labels"] = [label2id[label] for label in batch[data_args.label_column]]
        return out

    data = raw.map(preprocess, batched=True, remove_columns=raw["train"].column_names)
    model = load_model(
        AutoModelForSequenceClassification, model_args, num_labels=len(labels),
        id2label={i: str(label) for label, i in label2id.items()}, label2id={str(k): v for k, v in label2id.items()},
    )
    collator = DataCollatorWithPadding(tokenizer)
    trainer = AttentionPluginTrainer(
        model=model, args=training_args, train_dataset=data["train"], eval_dataset=data["validation"],
        processing_class=tokenizer, data_collator=collator, compute_metrics=_classification_metrics(),
    )
    return _train_and_evaluate(trainer, training_args, _probe(collator, data["validation"]), base_model=base_model,
                               data=describe_data(data_args, generated_keyword_task))


def tiny_llama_config(vocab_size):
    return LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)


def run_causal_lm(model_args, data_args, training_args):
    """Causal language modelling. Defaults: a tiny random Llama with MiniLM's tokenizer, trained on
    generated repeated sentences."""
    set_seed(training_args.seed)
    raw = load_raw_dataset(data_args, generated_language)
    tokenizer = _tokenizer(model_args)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    def preprocess(batch):
        return tokenizer(batch[data_args.text_column], truncation=True, max_length=data_args.max_seq_length)

    data = raw.map(preprocess, batched=True, remove_columns=raw["train"].column_names)
    model = load_model(AutoModelForCausalLM, model_args, lambda: tiny_llama_config(len(tokenizer)))
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    trainer = AttentionPluginTrainer(
        model=model, args=training_args, train_dataset=data["train"], eval_dataset=data["validation"],
        processing_class=tokenizer, data_collator=collator,
    )
    return _train_and_evaluate(trainer, training_args, _probe(collator, data["validation"]), perplexity=True,
                               base_model=model_args.model_name_or_path,  # None: a random initialisation
                               data=describe_data(data_args, generated_language))


def tiny_vit_config(num_labels=10):
    return ViTConfig(image_size=8, patch_size=2, num_channels=3, hidden_size=64, num_hidden_layers=2,
                     num_attention_heads=4, intermediate_size=128, num_labels=num_labels)


def digits_image_processor():
    """What turns a user's picture into the default model's input: RGB, 8x8, intensities in [0, 1]
    (the grey digits are stored that way, the grey value in all three channels). Saved beside the
    model, so the published model runs in `pipeline("image-classification")` as is."""
    return ViTImageProcessorPil(do_resize=True, size={"height": 8, "width": 8}, do_rescale=True,
                                rescale_factor=1 / 255, do_normalize=False, do_convert_rgb=True)


def run_image_classification(model_args, data_args, training_args):
    """Image classification. Defaults: a tiny random ViT (8x8 RGB images, 2x2 patches) on
    scikit-learn's bundled digits. A model path needs a dataset whose `pixel_values` fit it."""
    set_seed(training_args.seed)
    raw = load_raw_dataset(data_args, generated_digits)
    # Integer class ids over every split: a small training sample need not hold every class.
    seen = {int(label) for split in raw.values() for label in split[data_args.label_column]}
    num_labels = max(seen) + 1
    data = raw.with_format("torch")
    model = load_model(AutoModelForImageClassification, model_args, lambda: tiny_vit_config(num_labels))

    def collate(rows):
        return {"pixel_values": torch.stack([r["pixel_values"] for r in rows]),
                "labels": torch.tensor([int(r[data_args.label_column]) for r in rows])}

    # A pretrained model brings its own processor; the default tiny ViT gets the digits' one.
    processor = (AutoImageProcessor.from_pretrained(model_args.model_name_or_path)
                 if model_args.model_name_or_path else digits_image_processor())
    trainer = AttentionPluginTrainer(
        model=model, args=training_args, train_dataset=data["train"], eval_dataset=data["validation"],
        processing_class=processor, data_collator=collate, compute_metrics=_classification_metrics(),
    )
    return _train_and_evaluate(trainer, training_args, _probe(collate, data["validation"]),
                               base_model=model_args.model_name_or_path, data=describe_data(data_args, generated_digits))


TASKS = {
    "text_classification": run_text_classification,
    "causal_lm": run_causal_lm,
    "image_classification": run_image_classification,
}


def main(task: str, args=None):
    if task not in TASKS:
        raise ValueError(f"task={task!r} is not supported; choose from {sorted(TASKS)}")
    model_args, data_args, training_args = parse_args(args, task)
    _quiet_replicas(training_args)
    return TASKS[task](model_args, data_args, training_args)


def _quiet_replicas(training_args) -> None:
    """Under torchrun/accelerate every process runs this script: only the main one shows progress
    bars and notices; the others keep their errors."""
    if training_args.process_index == 0:
        return
    import datasets
    import transformers

    datasets.utils.logging.disable_progress_bar()
    datasets.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
