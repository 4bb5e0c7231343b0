"""Trainer callbacks of the fusion model: RollingQ's epoch-end step and per-epoch imbalance
monitoring. Their measurements go into `state.log_history` (so `trainer_state.json` keeps them)."""

from __future__ import annotations

import torch
from accelerate.utils import send_to_device
from torch.utils.data import DataLoader
from transformers import TrainerCallback

__all__ = ["FusionMonitorCallback", "RollingQCallback", "imbalance_snapshot", "rollingq_statistics"]


@torch.no_grad()
def rollingq_statistics(model, dataloader) -> list[dict]:
    """Per fusion layer, RollingQ's sums (query, per-modality keys, cosines) over all of `dataloader`,
    in eval mode without gradients (the model's mode is restored)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    totals = None
    try:
        for batch in dataloader:
            batch = send_to_device(batch, device)
            stats = model(modality_inputs=batch["modality_inputs"], output_rollingq_statistics=True).rollingq_statistics
            if totals is None:
                totals = [dict(s) for s in stats]
            else:
                for total, s in zip(totals, stats):
                    for key in total:
                        total[key] = total[key] + s[key]
    finally:
        model.train(was_training)
    return totals


def _append_log(state, values: dict) -> None:
    entry = {"epoch": state.epoch, "step": state.global_step, **values}
    state.log_history.append(entry)


class RollingQCallback(TrainerCallback):
    """At each epoch end: measure the attention imbalance (AIR) over the training data and, when the
    model's `config.rollingq` is enabled, rotate the CLS query (`model.rollingq_update`). AIR is logged
    for every model (`rollingq/air`, `rollingq/rotated`, `rollingq/num_rotations`, last fusion layer), so
    a joint baseline gets the same trace.

    Args:
        dataloader (`DataLoader`): the training data as the model sees it, without augmentation (the
            warm-up's noise would make the modality it replaces look under-attended).
        start_epoch (`int`): before the end of this epoch AIR is only measured. While a warm-up replaces
            the weak modality by noise, a rotation toward it cannot help and only spends the
            `max_rotations` budget. Default: `0`.

    After the last epoch AIR is only measured: no training follows to adapt to a rotation.
    """

    def __init__(self, dataloader: DataLoader, start_epoch: int = 0):
        self.dataloader = dataloader
        self.start_epoch = start_epoch
        self.history: list[dict] = []

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        epoch = state.epoch or 0.0
        apply = self.start_epoch + 1 - 1e-6 <= epoch < args.num_train_epochs - 1e-6
        results = model.rollingq_update(rollingq_statistics(model, self.dataloader), apply=apply)
        last = results[-1]
        values = {"rollingq/air": last["air"], "rollingq/rotated": float(any(r["rotated"] for r in results)),
                  "rollingq/num_rotations": last["num_rotations"]}
        self.history.append({"epoch": state.epoch, **values})
        _append_log(state, values)


@torch.no_grad()
def imbalance_snapshot(model, batch) -> dict[str, float]:
    """Mean attention mass of the last fusion layer's CLS query and mean attribution share, per
    modality, on one batch (eval mode; the model's mode is restored)."""
    was_training = model.training
    model.eval()
    try:
        out = model(**batch, output_attentions=True, output_attributions=True)
    finally:
        model.train(was_training)
    names = model.config.modality_names
    values = {}
    for i, name in enumerate(names):
        values[f"fusion/attention_mass/{name}"] = out.modality_attention_mass[:, i].mean().item()
        values[f"fusion/attribution_share/{name}"] = out.attribution_shares[:, i].mean().item()
    return values


class FusionMonitorCallback(TrainerCallback):
    """At each epoch end (and before training), attention mass and attribution shares per modality on
    a fixed probe batch (`fusion/attention_mass/<m>`, `fusion/attribution_share/<m>`)."""

    def __init__(self, probe_batch: dict):
        self.probe_batch = probe_batch
        self.history: list[dict] = []

    def _measure(self, state, model):
        batch = send_to_device(self.probe_batch, next(model.parameters()).device)
        values = imbalance_snapshot(model, batch)
        self.history.append({"epoch": state.epoch or 0.0, **values})
        _append_log(state, values)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._measure(state, model)

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        self._measure(state, model)
