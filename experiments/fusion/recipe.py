"""One training run of the fusion model with one method (joint, OGM-GE, RollingQ, attribution
regularization, RollingQ + attribution, or one modality alone) on one task, the way docs/methods.md's
synthetic benchmark was validated (results: docs/fusion.md): per-token MLP encoders (width 32),
single-head CLS attention with logits x4, SGD lr 0.01 momentum 0.9; synthetic and digits: the first 5
epochs with the weaker modality replaced by noise. With `patience` and a `validation` split: the
epoch with the best validation accuracy is kept, training stops after `patience` epochs without a
better one (the same rule for every method)."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field

import torch
from torch.utils.data import DataLoader
from transformers import AutoModelForSequenceClassification, TrainerCallback, set_seed

from hf_multimax.modeling.multimodal_fusion import MultimodalFusionConfig
from hf_multimax.training.fusion import (
    FusionMonitorCallback,
    FusionTrainer,
    FusionTrainingArguments,
    OGMGECallback,
    RollingQCallback,
)

from .data import TASKS, FusionCollator, ModalityWarmupCallback, load_fusion_task
from .report import fusion_report

__all__ = ["METHODS", "BestValidationCallback", "FusionArguments", "build_fusion_model", "run_fusion"]

# "unimodal": the same model with every modality but `--only` hidden from the fusion attention.
METHODS = ("joint", "ogm_ge", "rollingq", "attribution", "rollingq_attribution", "unimodal")
TASK_DEFAULTS = {"synthetic": {"epochs": 30, "batch_size": 64, "warmup_noise_epochs": 5},
                 "digits": {"epochs": 40, "batch_size": 32, "warmup_noise_epochs": 5},
                 "complementary": {"epochs": 20, "batch_size": 64, "warmup_noise_epochs": 0}}


@dataclass
class FusionArguments:
    """Settings of one run (`python -m experiments.fusion --help` lists them)."""

    task: str = field(default="synthetic", metadata={"help": f"One of {sorted(TASKS)}."})
    method: str = field(default="joint", metadata={"help": f"One of {list(METHODS)}."})
    seed: int = field(default=0, metadata={"help": "Seed of model init, shuffling and noise (the data is fixed)."})
    data_seed: int = field(default=0, metadata={"help": "Seed of the task's data."})
    num_train: int | None = field(default=None, metadata={"help": "Synthetic / complementary: training samples (default 4000 / 2000)."})
    num_test: int | None = field(default=None, metadata={"help": "Synthetic / complementary: test samples (default 2000)."})
    epochs: int | None = field(default=None, metadata={"help": "Training epochs (default: 30 synthetic, 40 digits)."})
    warmup_noise_epochs: int | None = field(default=None, metadata={
        "help": "First epochs with the weaker modality replaced by noise (default: 5 synthetic and digits, 0 complementary)."})
    only: str | None = field(default=None, metadata={"help": "Method unimodal: the one modality the model sees."})
    patience: int | None = field(default=None, metadata={
        "help": "Early stopping on validation accuracy (needs a validation split): keep the best epoch, stop after "
                "this many epochs without a better one. Default: none (train every epoch, keep the last)."})
    batch_size: int | None = field(default=None, metadata={"help": "Default: 64 synthetic, 32 digits."})
    learning_rate: float = 0.01
    momentum: float = 0.9
    max_grad_norm: float = field(default=0.0, metadata={"help": "Gradient clipping; 0 = none (the benchmark's plain SGD)."})
    hidden_size: int = 32
    projection_hidden_size: int = 32
    attention_logit_scale: float = 4.0
    attn_implementation: str = field(default="sdpa", metadata={"help": "eager, sdpa or multimax (fusion attention)."})
    rollingq_beta: float = 0.3
    rollingq_sigma: float = 5.0
    rollingq_max_rotations: int = 10
    rollingq_start_epoch: int | None = field(default=None, metadata={
        "help": "First epoch whose end may rotate (0-based); default: after the noise warm-up."})
    attribution_weight: float = 1.0
    attribution_target: str | None = field(default=None, metadata={"help": "Comma-separated ratios, default equal."})
    ogm_alpha: float = field(default=0.5, metadata={"help": "OGM-GE's alpha (coefficient 1 - tanh(alpha * relu(ratio - 1)))."})
    ogm_noise: bool = field(default=True, metadata={"help": "OGM-GE's Gaussian noise on the modulated gradients (GE)."})
    output_dir: str | None = field(default=None, metadata={"help": "Where to save the model and results.json."})
    disable_tqdm: bool = False
    threads: int | None = field(default=None, metadata={
        "help": "CPU threads for the run. Default: 1, unless OMP_NUM_THREADS is set. The model's matrices are "
                "too small to split across threads, and with 2 threads every op waits for both cores: on a "
                "2-core machine with the other core busy a run took 76 s on 2 threads and 16 s on 1."})

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"task={self.task!r} is unknown; allowed: {sorted(TASKS)}")
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r} is unknown; allowed: {list(METHODS)}")
        # digits has 1,203 training images against the benchmark's 4,000 samples: smaller batches and
        # more epochs give it a comparable number of SGD steps.
        defaults = TASK_DEFAULTS[self.task]
        self.epochs = defaults["epochs"] if self.epochs is None else self.epochs
        self.batch_size = defaults["batch_size"] if self.batch_size is None else self.batch_size
        if self.warmup_noise_epochs is None:
            self.warmup_noise_epochs = defaults["warmup_noise_epochs"]
        if (self.method == "unimodal") != (self.only is not None):
            raise ValueError(f"method={self.method!r}, only={self.only!r}: `only` names the modality of method unimodal")
        if self.epochs < 1 or not 0 <= self.warmup_noise_epochs < self.epochs:
            raise ValueError(f"epochs={self.epochs}, warmup_noise_epochs={self.warmup_noise_epochs}: need "
                             "epochs >= 1 and 0 <= warmup_noise_epochs < epochs")


def build_fusion_model(args: FusionArguments, modality_names, input_sizes, num_labels):
    """The classification model of `args.method` (randomly initialised with `args.seed`)."""
    target = None
    if args.attribution_target:
        target = [float(r) for r in args.attribution_target.split(",")]
    config = MultimodalFusionConfig(
        modality_names=modality_names,
        modality_input_sizes=input_sizes,
        num_labels=num_labels,
        hidden_size=args.hidden_size,
        projection_hidden_size=args.projection_hidden_size,
        attention_logit_scale=args.attention_logit_scale,
        rollingq={"enabled": args.method in ("rollingq", "rollingq_attribution"), "beta": args.rollingq_beta, "sigma": args.rollingq_sigma,
                  "max_rotations": args.rollingq_max_rotations},
        attribution_weight=args.attribution_weight if args.method in ("attribution", "rollingq_attribution") else 0.0,
        attribution_target=target,
    )
    set_seed(args.seed)
    return AutoModelForSequenceClassification.from_config(config, attn_implementation=args.attn_implementation)


@contextlib.contextmanager
def _threads(threads: int | None):
    """Run with `threads` intra-op threads (default: 1 unless the user set OMP_NUM_THREADS), then
    restore the process's setting."""
    if threads is None:
        threads = None if "OMP_NUM_THREADS" in os.environ else 1
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class BestValidationCallback(TrainerCallback):
    """Early stopping, the same rule for every method: at each epoch end from `start_epoch` on, accuracy on
    `dataloader` (the validation split); the best epoch's weights and buffers (RollingQ's rotation
    included) are kept in memory and put back at the end of training; training stops after `patience`
    epochs without a strictly better accuracy."""

    def __init__(self, dataloader: DataLoader, patience: int, start_epoch: int = 0):
        self.dataloader, self.patience, self.start_epoch = dataloader, patience, start_epoch
        self.best, self.best_epoch, self.best_state, self.history = -1.0, None, None, []

    @torch.no_grad()
    def _accuracy(self, model) -> float:
        was_training = model.training
        model.eval()
        correct = total = 0
        try:
            for batch in self.dataloader:
                logits = model(**batch).logits
                correct += int(logits.argmax(-1).eq(batch["labels"]).sum())
                total += len(batch["labels"])
        finally:
            model.train(was_training)
        return correct / total

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        epoch = round(state.epoch or 0.0)
        if epoch < self.start_epoch + 1:
            return
        accuracy = self._accuracy(model)
        self.history.append({"epoch": epoch, "validation_accuracy": accuracy})
        state.log_history.append({"epoch": state.epoch, "step": state.global_step, "validation_accuracy": accuracy})
        if accuracy > self.best:
            self.best, self.best_epoch = accuracy, epoch
            self.best_state = copy.deepcopy(model.state_dict())
        elif epoch - self.best_epoch >= self.patience:
            control.should_training_stop = True

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.best_state is not None:
            model.load_state_dict(self.best_state)


def run_fusion(args: FusionArguments, data=None, return_model: bool = False) -> dict:
    """Train, report and (with `output_dir`) save. `data` may pass an already loaded
    `load_fusion_task(...)` result. Returns `{"args", "report", "history", "train_runtime",
    "epochs_trained", "best_epoch"}`, and the trained `"model"` with `return_model`."""
    if data is None:
        kwargs = {"seed": args.data_seed}
        if args.task in ("synthetic", "complementary"):
            kwargs.update({k: v for k, v in (("num_train", args.num_train), ("num_test", args.num_test)) if v})
        data = load_fusion_task(args.task, **kwargs)
    datasets, names, sizes, num_labels = data
    model = build_fusion_model(args, names, sizes, num_labels)
    hidden = [n for n in names if n != args.only] if args.only else []
    if args.only and args.only not in names:
        raise ValueError(f"only={args.only!r} is not a modality of task {args.task!r}: {names}")
    collator = FusionCollator(names, sizes, mask=hidden)
    clean = FusionCollator(names, sizes, mask=hidden)
    probe = clean([datasets["test"][i] for i in range(min(512, len(datasets["test"])))])
    start = args.warmup_noise_epochs if args.rollingq_start_epoch is None else args.rollingq_start_epoch
    rollingq = RollingQCallback(DataLoader(datasets["train"], batch_size=256, collate_fn=clean), start_epoch=start)
    monitor = FusionMonitorCallback(probe)
    callbacks = [ModalityWarmupCallback(collator, names[1:], args.warmup_noise_epochs), rollingq, monitor]
    ogm = early = None
    if args.method == "ogm_ge":
        ogm = OGMGECallback(alpha=args.ogm_alpha, noise=args.ogm_noise, start_epoch=args.warmup_noise_epochs,
                            seed=args.seed)
        callbacks.append(ogm)
    if args.patience is not None:
        if "validation" not in datasets:
            raise ValueError("patience (early stopping) needs a validation split")
        early = BestValidationCallback(DataLoader(datasets["validation"], batch_size=256, collate_fn=clean),
                                       args.patience, start_epoch=args.warmup_noise_epochs)
        callbacks.append(early)
    with tempfile.TemporaryDirectory() as scratch:
        training_args = FusionTrainingArguments(
            output_dir=args.output_dir or scratch,
            num_train_epochs=args.epochs,
            per_device_train_batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            optim="sgd",
            optim_args=f"momentum={args.momentum}",
            lr_scheduler_type="constant",
            weight_decay=0.0,
            max_grad_norm=args.max_grad_norm,
            logging_strategy="epoch",
            save_strategy="no",
            eval_strategy="no",
            report_to="none",
            seed=args.seed,
            remove_unused_columns=False,  # the collator reads the modality columns
            dataloader_num_workers=0,  # the warm-up callback switches the collator in this process
            disable_tqdm=args.disable_tqdm,
            use_cpu=not torch.cuda.is_available(),
        )
        trainer = FusionTrainer(model=model, args=training_args, train_dataset=datasets["train"],
                                data_collator=collator, callbacks=callbacks)
        with _threads(args.threads):
            start = time.perf_counter()
            trainer.train()
            runtime = time.perf_counter() - start
            report = fusion_report(model, datasets["train"], datasets["test"], seed=args.seed,
                                   air_trace=[h["rollingq/air"] for h in rollingq.history], mask=hidden)
    result = {
        "args": asdict(args),
        "report": report,
        "history": {"rollingq": rollingq.history, "monitor": monitor.history,
                    "train_log": [h for h in trainer.state.log_history if "loss" in h],
                    "ogm": ogm.history if ogm else [], "validation": early.history if early else []},
        "epochs_trained": round(trainer.state.epoch or 0.0),
        "best_epoch": early.best_epoch if early else None,
        "train_runtime": runtime,
    }
    if args.output_dir:
        model.save_pretrained(args.output_dir)
        with open(os.path.join(args.output_dir, "results.json"), "w") as f:
            json.dump(result, f, indent=1)
    if return_model:
        result["model"] = model
    return result
