"""`Trainer` glue: MultiMax scalars in their own optimizer group."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from transformers import Trainer, TrainingArguments

from .optim import separate_multimax_group

__all__ = ["MultiMaxTrainer", "MultiMaxTrainingArguments"]


@dataclass
class MultiMaxTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus the MultiMax optimizer settings (every Trainer flag still works)."""

    multimax_lr_multiplier: float = field(
        default=10.0,
        metadata={"help": "Learning rate of the MultiMax scalars = learning_rate * this. They get no weight decay."},
    )

    def __post_init__(self):
        super().__post_init__()
        if self.multimax_lr_multiplier <= 0:
            raise ValueError(f"multimax_lr_multiplier={self.multimax_lr_multiplier} must be > 0")


class MultiMaxTrainer(Trainer):
    """A `Trainer` whose optimizer gives the MultiMax scalars their own group: no weight decay and
    `learning_rate * multimax_lr_multiplier` (10 unless `args` says otherwise)."""

    def create_model_card(self, language=None, license=None, tags=None, model_name=None, finetuned_from=None,
                          tasks=None, dataset_tags=None, dataset=None, dataset_args=None):
        """Our MultiMax card in `output_dir/README.md`, so `trainer.push_to_hub()` publishes it."""
        if not self.is_world_process_zero():
            return
        if not getattr(self.model.config, "multimax", None):
            return super().create_model_card(language=language, license=license, tags=tags, model_name=model_name,
                                             finetuned_from=finetuned_from, tasks=tasks, dataset_tags=dataset_tags,
                                             dataset=dataset, dataset_args=dataset_args)
        from ..hub.card import build_model_card

        evals = [h for h in self.state.log_history if any(k.startswith("eval_") for k in h)]
        repo_id = self.args.hub_model_id or model_name or os.path.basename(os.path.abspath(self.args.output_dir))
        card = build_model_card(
            self.model, repo_id, base_model=finetuned_from or self.model.config._name_or_path or None,
            training_data=dataset if isinstance(dataset, str) else None, license=license or "apache-2.0",
            eval_results={k: v for k, v in evals[-1].items() if k.startswith("eval_")} if evals else None,
            training_args=f"max_steps={self.args.max_steps}, learning_rate={self.args.learning_rate}, "
            f"multimax_lr_multiplier={getattr(self.args, 'multimax_lr_multiplier', None)}",
        )
        card.save(os.path.join(self.args.output_dir, "README.md"))

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        multiplier = getattr(self.args, "multimax_lr_multiplier", 10.0)
        separate_multimax_group(optimizer, self.model if model is None else model, multiplier)
        return optimizer
