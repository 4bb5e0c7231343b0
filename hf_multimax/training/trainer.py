"""`Trainer` for models with the plugin's attention, whatever the method: MultiMax scalars in their own
optimizer group, auxiliary losses (the SparseMix scorers' KL term) added to the loss and logged, and
the method's model card (`hub.card`) in the output folder. `MultiMaxTrainer` and
`MultiMaxTrainingArguments` are the first names of the two classes, kept as aliases."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from transformers import Trainer, TrainingArguments

from ..integrations.aux_losses import collect_aux_losses
from ..layers.sparsemix import SparseMixScorer
from .optim import separate_multimax_group

__all__ = ["AttentionPluginTrainer", "AttentionPluginTrainingArguments", "MultiMaxTrainer",
           "MultiMaxTrainingArguments"]


@dataclass
class AttentionPluginTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus the plugin's optimizer settings (every Trainer flag still works)."""

    multimax_lr_multiplier: float = field(
        default=10.0,
        metadata={"help": "Learning rate of the MultiMax scalars = learning_rate * this. They get no weight decay."},
    )

    def __post_init__(self):
        if self.use_cpu or not torch.accelerator.is_available():
            # Pinned memory only helps copies to an accelerator; without one torch warns on every loader.
            self.dataloader_pin_memory = False
        super().__post_init__()
        if self.multimax_lr_multiplier <= 0:
            raise ValueError(f"multimax_lr_multiplier={self.multimax_lr_multiplier} must be > 0")


class AttentionPluginTrainer(Trainer):
    """A `Trainer` for models with plugin attention, of any method (MultiMax, SparseMix, ...):

    - the optimizer gives the MultiMax scalars their own group: no weight decay and
      `learning_rate * multimax_lr_multiplier` (10 unless `args` says otherwise);
    - `compute_loss` adds the auxiliary losses of the forward (the SparseMix KL term,
      `kl_weight * mean over layers`), with a weight per optimizer step that does not depend on
      the number of gradient accumulation steps, and logs each term (`sparsemix_kl`) beside the loss;
    - `create_model_card` (and so `push_to_hub`) writes the card of the checkpoint's method
      (`hub.build_model_card`: its settings, the run's eval results, last training values and hardware);
      a model without plugin attention gets `Trainer`'s own card.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._aux_history: dict[str, list[float]] = {}
        if self.args.n_gpu > 1 and any(isinstance(m, SparseMixScorer) for m in self.model.modules()):
            # nn.DataParallel runs its replicas in threads, which do not see the collector opened here.
            raise ValueError(
                f"SparseMix's KL term cannot be collected under nn.DataParallel (n_gpu={self.args.n_gpu}): launch one "
                "process per GPU with torchrun or accelerate launch (DDP) instead"
            )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        with collect_aux_losses() as aux:
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                                 num_items_in_batch=num_items_in_batch)
        if aux.terms:
            extra = aux.loss()
            if self._loss_is_scaled_for_ga(num_items_in_batch):
                # Trainer will not divide this loss by the accumulation steps (it is already a share
                # of the whole batch): divide the per-micro-batch mean term here instead.
                extra = extra / getattr(self, "current_gradient_accumulation_steps", 1)
            loss = loss + extra.to(loss.dtype)
            for name, value in aux.values().items():
                self._aux_history.setdefault(name, []).append(value)
        return (loss, outputs) if return_outputs else loss

    def _loss_is_scaled_for_ga(self, num_items_in_batch) -> bool:
        # The rule Trainer.training_step applies before dividing the loss by the accumulation steps.
        if self.loss_is_scaled_for_ga is not None:
            return self.loss_is_scaled_for_ga
        return (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs:  # training logs: the mean of each auxiliary term since the last one
            for name, values in self._aux_history.items():
                if values:
                    logs[name] = sum(values) / len(values)
                    values.clear()
        super().log(logs, *args, **kwargs)

    def create_model_card(self, language=None, license=None, tags=None, model_name=None, finetuned_from=None,
                          tasks=None, dataset_tags=None, dataset=None, dataset_args=None):
        """The card of the model's method in `output_dir/README.md`, so `trainer.push_to_hub()` publishes it."""
        if not self.is_world_process_zero():
            return
        from ..hub.card import build_model_card, checkpoint_methods, last_training_values, run_hardware

        if not checkpoint_methods(self.model):
            return super().create_model_card(language=language, license=license, tags=tags, model_name=model_name,
                                             finetuned_from=finetuned_from, tasks=tasks, dataset_tags=dataset_tags,
                                             dataset=dataset, dataset_args=dataset_args)
        evals = [h for h in self.state.log_history if any(k.startswith("eval_") for k in h)]
        repo_id = self.args.hub_model_id or model_name or os.path.basename(os.path.abspath(self.args.output_dir))
        card = build_model_card(
            self.model, repo_id, base_model=finetuned_from,
            training_data=dataset if isinstance(dataset, str) else None, license=license or "apache-2.0",
            eval_results={k: v for k, v in evals[-1].items() if k.startswith("eval_")} if evals else None,
            training_args=f"max_steps={self.args.max_steps}, learning_rate={self.args.learning_rate}, "
            f"multimax_lr_multiplier={getattr(self.args, 'multimax_lr_multiplier', None)}",
            hardware=run_hardware(self.args),
            training_log=last_training_values(self.state.log_history),
        )
        card.save(os.path.join(self.args.output_dir, "README.md"))

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        multiplier = getattr(self.args, "multimax_lr_multiplier", 10.0)
        separate_multimax_group(optimizer, self.model if model is None else model, multiplier)
        return optimizer


# The first names, from when MultiMax was the only method: kept so existing code and scripts run.
MultiMaxTrainer = AttentionPluginTrainer
MultiMaxTrainingArguments = AttentionPluginTrainingArguments
