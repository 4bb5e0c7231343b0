"""The imbalance report of a trained fusion model (BalanceBenchmark's protocol, docs/methods.md): accuracy,
per-modality linear-probe accuracy on detached features, accuracy with each modality zeroed or
replaced by noise, attention mass of the CLS query, attribution shares, AIR."""

from __future__ import annotations

import torch
from accelerate.utils import send_to_device
from torch.utils.data import DataLoader

from hf_multimax.training.fusion import rollingq_statistics
from hf_multimax.training.tasks import accuracy_metric

from .data import FusionCollator

__all__ = ["fusion_report", "linear_probe_accuracy", "probe_features"]


def probe_features(fusion_input: torch.Tensor) -> torch.Tensor:
    """[B, T, H] fusion input of one modality -> [B, 2H] (mean and max over tokens): the max keeps a
    class signal that sits on a single token (modality b of the synthetic benchmark)."""
    return torch.cat([fusion_input.mean(1), fusion_input.amax(1)], dim=-1)


def linear_probe_accuracy(train_x, train_y, test_x, test_y, num_classes: int, l2: float = 1e-3, steps: int = 100) -> float:
    """Multinomial logistic regression (standardised features, L2 `l2`, full-batch L-BFGS in float64)
    fitted on train, accuracy on test."""
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    xtr, xte = ((train_x - mean) / std).double(), ((test_x - mean) / std).double()
    weight = torch.zeros(xtr.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(xtr @ weight + bias, train_y) + l2 * weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    with torch.no_grad():
        return (xte @ weight + bias).argmax(-1).eq(test_y).double().mean().item()


@torch.no_grad()
def _pass(model, dataset, collator, batch_size, want_features=False):
    device = next(model.parameters()).device
    logits, labels, mass, shares, features = [], [], [], [], []
    for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collator):
        batch = send_to_device(batch, device)
        out = model(**batch, output_attentions=True, output_attributions=True, output_fusion_inputs=want_features)
        logits.append(out.logits.float().cpu())
        labels.append(batch["labels"].cpu())
        mass.append(out.modality_attention_mass.float().cpu())
        shares.append(out.attribution_shares.float().cpu())
        if want_features:
            features.append([probe_features(x).float().cpu() for x in out.fusion_inputs])
    per_modality = [torch.cat(f) for f in zip(*features)] if want_features else None
    return torch.cat(logits), torch.cat(labels), torch.cat(mass), torch.cat(shares), per_modality


def fusion_report(model, train_dataset, test_dataset, *, batch_size: int = 256, seed: int = 0,
                  air_trace: list | None = None, mask=()) -> dict:
    """Everything the comparison table needs, measured on `test_dataset` (probes fitted on
    `train_dataset`). The model is put in eval mode and restored.

    Returns `accuracy`, `probe_accuracy/<m>`, `accuracy_zeroed/<m>`, `accuracy_noise/<m>`,
    `attention_mass/<m>`, `attribution_share/<m>`, `air` (on the test data), `num_rotations`, and
    `air_trace` if given. `mask` names modalities hidden from the model (a unimodal run; see
    `FusionCollator`), in every pass.
    """
    names, sizes = model.config.modality_names, model.config.modality_input_sizes
    metric = accuracy_metric()
    was_training = model.training
    model.eval()
    try:
        clean = FusionCollator(names, sizes, mask=mask)
        logits, labels, mass, shares, test_feats = _pass(model, test_dataset, clean, batch_size, want_features=True)
        _, train_labels, _, _, train_feats = _pass(model, train_dataset, clean, batch_size, want_features=True)
        report = {"accuracy": metric.compute(predictions=logits.argmax(-1), references=labels)["accuracy"]}
        for i, name in enumerate(names):
            report[f"probe_accuracy/{name}"] = linear_probe_accuracy(
                train_feats[i], train_labels, test_feats[i], labels, model.config.num_labels)
        for i, name in enumerate(names):
            for mode in ("zeroed", "noise"):
                torch.manual_seed(seed)  # the same noise for every model compared
                collator = FusionCollator(names, sizes, mask=mask,
                                           **({"zero": [name]} if mode == "zeroed" else {"noise": [name]}))
                corrupted = _pass(model, test_dataset, collator, batch_size)[0]
                report[f"accuracy_{mode}/{name}"] = metric.compute(predictions=corrupted.argmax(-1), references=labels)["accuracy"]
        for i, name in enumerate(names):
            report[f"attention_mass/{name}"] = mass[:, i].mean().item()
            report[f"attribution_share/{name}"] = shares[:, i].mean().item()
        loader = DataLoader(test_dataset, batch_size=batch_size, collate_fn=clean)
        measured = model.rollingq_update(rollingq_statistics(model, loader), apply=False)[-1]
        report["air"] = measured["air"]
        report["num_rotations"] = measured["num_rotations"]
    finally:
        model.train(was_training)
    if air_trace is not None:
        report["air_trace"] = list(air_trace)
    return report
