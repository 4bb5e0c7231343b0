"""OGM-GE, on-the-fly gradient modulation with generalization enhancement (Peng et al., "Balanced
Multimodal Learning via On-the-fly Gradient Modulation", CVPR 2022), for the fusion model.

At every optimizer step, over the step's training samples:

    s_m     = sum_i softmax(logits_m(x_i))[y_i]          (modality m's score on the true class)
    ratio_m = s_m / mean_{k != m} s_k                     (M = 2: the paper's s_a / s_v and s_v / s_a)
    k_m     = 1 - tanh(alpha * relu(ratio_m - 1))         (1 for every modality that does not lead)

and the gradients of modality m's encoder and projection are multiplied by k_m; with `noise=True`
(GE) a modulated branch (k_m < 1) also gets Gaussian noise N(0, std(g)^2) per parameter tensor, std
of that tensor's unmodulated gradient g (the reference code's `grad * coeff + N(0, grad.std())`).

`logits_m` is our fusion model's analogue of the paper's per-modality half of a concatenation
classifier: the same fusion layers and classifier with only modality m's tokens visible to the CLS
query (the other modalities masked out of the attention), computed without gradients.

Two choices the paper leaves open, made here: the noise goes to the modulated branch only (the
reference code adds it to both encoders, including the one with k = 1), so a branch that is not
modulated keeps exactly the gradient backpropagation gave it; and modulation starts at `start_epoch`
(the benchmark's recipe starts it after its warm-up, as RollingQ's rotations).
"""

from __future__ import annotations

import torch
from transformers import TrainerCallback

__all__ = ["OGMGECallback", "modality_scores", "modulate_gradients", "ogm_ge_coefficients"]


def ogm_ge_coefficients(scores: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`scores` [M] (summed true-class probabilities per modality) -> (coefficients [M], ratios [M])."""
    scores = scores.double()
    num = scores.numel()
    if num < 2:
        raise ValueError(f"OGM-GE needs >= 2 modalities, got scores of shape {tuple(scores.shape)}")
    others = (scores.sum() - scores) / (num - 1)
    ratios = scores / others.clamp_min(torch.finfo(torch.float64).tiny)
    coefficients = 1.0 - torch.tanh(alpha * torch.relu(ratios - 1.0))
    return coefficients, ratios


@torch.no_grad()
def modality_scores(model, modality_inputs: dict, labels: torch.Tensor, modality_attention_mask: dict | None = None
                    ) -> torch.Tensor:
    """[M] sum over the batch of softmax(logits_m)[label], logits_m with only modality m's tokens
    visible to the fusion layers (the model's mode is kept: dropout as in the training step)."""
    fusion_inputs, masks = model.fusion.embed_modalities(modality_inputs, modality_attention_mask)
    scores = []
    for m in range(len(fusion_inputs)):
        only = [mask if k == m else torch.zeros_like(mask) for k, mask in enumerate(masks)]
        logits = model._classify(model.fusion.fuse(fusion_inputs, only))
        scores.append(torch.softmax(logits.float(), dim=-1).gather(1, labels[:, None]).sum())
    return torch.stack(scores)


def branch_parameters(model, name: str) -> list[tuple[str, torch.nn.Parameter]]:
    """Modality `name`'s encoder (if any) and projection parameters."""
    prefixes = (f"fusion.encoders.{name}.", f"fusion.projections.{name}.")
    return [(n, p) for n, p in model.named_parameters() if n.startswith(prefixes)]


@torch.no_grad()
def modulate_gradients(model, coefficients, noise: bool = False, generator: torch.Generator | None = None) -> None:
    """Multiply each modality's branch gradients by its coefficient; with `noise`, add N(0, std(g)^2) to
    every gradient tensor g of a branch whose coefficient is < 1. Branches with coefficient 1 are not
    touched."""
    names = model.config.modality_names
    for name, coefficient in zip(names, [float(c) for c in coefficients], strict=True):
        if coefficient >= 1.0:
            continue
        for _, parameter in branch_parameters(model, name):
            grad = parameter.grad
            if grad is None:
                continue
            std = grad.float().std().item() if grad.numel() > 1 else 0.0
            grad.mul_(coefficient)
            if noise and std > 0:
                sample = torch.randn(grad.shape, generator=generator, dtype=torch.float32, device="cpu")
                grad.add_(sample.to(grad) * std)


class OGMGECallback(TrainerCallback):
    """OGM-GE in a `Trainer` run: a forward hook on the model records the modality scores of each
    training batch (summed over gradient-accumulation steps), and before each optimizer step the
    branch gradients are modulated (`modulate_gradients`). The epoch means of the coefficients and
    ratios go into `state.log_history` (`ogm/coefficient/<m>`, `ogm/ratio/<m>`) and `history`.

    Args:
        alpha (`float`): the paper's alpha (its experiments use 0.1 - 0.8). Default: `0.5`.
        noise (`bool`): GE, Gaussian noise on the modulated gradients. Default: `True`.
        start_epoch (`int`): first (0-based) epoch that modulates. Default: `0`.
        end_epoch (`int`, *optional*): last epoch that modulates (inclusive). Default: none.
        seed (`int`): seed of the noise. Default: `0`.
    """

    def __init__(self, alpha: float = 0.5, noise: bool = True, start_epoch: int = 0, end_epoch: int | None = None,
                 seed: int = 0):
        if alpha < 0:
            raise ValueError(f"alpha={alpha} must be >= 0")
        self.alpha, self.noise, self.start_epoch, self.end_epoch = alpha, noise, start_epoch, end_epoch
        self.generator = torch.Generator().manual_seed(seed)
        self.history: list[dict] = []
        self._handle = None
        self._scores = None
        self._epoch_sums, self._epoch_steps = None, 0

    def _record(self, module, args, kwargs, output):
        if not (module.training and torch.is_grad_enabled()) or kwargs.get("labels") is None:
            return
        scores = modality_scores(module, kwargs["modality_inputs"], kwargs["labels"],
                                 kwargs.get("modality_attention_mask"))
        self._scores = scores if self._scores is None else self._scores + scores

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._handle = model.register_forward_hook(self._record, with_kwargs=True)

    def on_train_end(self, args, state, control, **kwargs):
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _active(self, state) -> bool:
        epoch = int(state.epoch or 0.0)  # the epoch in progress (0-based) during a step
        return epoch >= self.start_epoch and (self.end_epoch is None or epoch <= self.end_epoch)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        scores, self._scores = self._scores, None
        if scores is None or not self._active(state):
            return
        coefficients, ratios = ogm_ge_coefficients(scores, self.alpha)
        modulate_gradients(model, coefficients, noise=self.noise, generator=self.generator)
        row = torch.cat([coefficients, ratios]).float()
        self._epoch_sums = row if self._epoch_sums is None else self._epoch_sums + row
        self._epoch_steps += 1

    def on_epoch_end(self, args, state, control, **kwargs):
        if not self._epoch_steps:
            return
        names = kwargs["model"].config.modality_names if kwargs.get("model") is not None else None
        mean = (self._epoch_sums / self._epoch_steps).tolist()
        num = len(mean) // 2
        names = names or [str(i) for i in range(num)]
        values = {f"ogm/coefficient/{n}": mean[i] for i, n in enumerate(names)}
        values.update({f"ogm/ratio/{n}": mean[num + i] for i, n in enumerate(names)})
        self.history.append({"epoch": state.epoch, **values})
        state.log_history.append({"epoch": state.epoch, "step": state.global_step, **values})
        self._epoch_sums, self._epoch_steps = None, 0
