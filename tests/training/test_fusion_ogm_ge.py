"""OGM-GE (hf_multimax/training/fusion/ogm_ge.py) against the paper's formula computed by hand on a tiny
batch: the per-modality scores, the coefficients, the dominant branch's gradients scaled (and noised
with GE), the weak branch's untouched; and the callback inside a real Trainer step."""

import math

import pytest
import torch

from hf_multimax.modeling.multimodal_fusion import MultimodalFusionConfig, MultimodalFusionForSequenceClassification
from hf_multimax.training.fusion import OGMGECallback, modality_scores, modulate_gradients, ogm_ge_coefficients


def tiny_model(seed=0):
    torch.manual_seed(seed)
    config = MultimodalFusionConfig(modality_names=["a", "b"], modality_input_sizes=[3, 5], num_labels=4,
                                    hidden_size=8, projection_hidden_size=8)
    return MultimodalFusionForSequenceClassification(config).eval()


def tiny_batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    inputs = {"a": torch.randn(6, 2, 3, generator=g), "b": torch.randn(6, 4, 5, generator=g)}
    return inputs, torch.tensor([0, 1, 2, 3, 0, 1])


def test_coefficients_match_the_paper_by_hand():
    alpha = 0.3
    s_a, s_v = 2.4, 0.8
    coefficients, ratios = ogm_ge_coefficients(torch.tensor([s_a, s_v]), alpha)
    # ratio_a = s_a / s_v = 3 > 1: k_a = 1 - tanh(alpha * (3 - 1)); the other ratio is 1/3 < 1: k_v = 1.
    assert ratios.tolist() == pytest.approx([3.0, 1 / 3])
    assert coefficients.tolist() == pytest.approx([1 - math.tanh(alpha * 2.0), 1.0])
    # Equal scores: nobody leads, nobody is modulated.
    assert ogm_ge_coefficients(torch.tensor([1.5, 1.5]), alpha)[0].tolist() == pytest.approx([1.0, 1.0])
    # alpha = 0: OGM off.
    assert ogm_ge_coefficients(torch.tensor([5.0, 0.1]), 0.0)[0].tolist() == pytest.approx([1.0, 1.0])


def test_scores_are_the_true_class_probabilities_with_one_modality_visible():
    model = tiny_model()
    inputs, labels = tiny_batch()
    scores = modality_scores(model, inputs, labels)
    for m, other in ((0, "b"), (1, "a")):
        # Hiding the other modality from the attention by its mask gives the same logits.
        mask = {other: torch.zeros(inputs[other].shape[:2], dtype=torch.long)}
        with torch.no_grad():
            probs = torch.softmax(model(modality_inputs=inputs, modality_attention_mask=mask).logits, -1)
        assert scores[m].item() == pytest.approx(probs[torch.arange(6), labels].sum().item(), rel=1e-5)


def _grads(model, inputs, labels):
    model.zero_grad()
    model(modality_inputs=inputs, labels=labels).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_dominant_branch_scaled_weak_branch_untouched():
    model = tiny_model()
    inputs, labels = tiny_batch()
    before = _grads(model, inputs, labels)
    scores = modality_scores(model, inputs, labels)
    coefficients, _ = ogm_ge_coefficients(scores, alpha=0.8)
    dominant = int(scores.argmax())
    names = ["a", "b"]
    k = 1 - math.tanh(0.8 * (scores[dominant] / scores[1 - dominant] - 1).item())
    assert coefficients[dominant].item() == pytest.approx(k) and coefficients[1 - dominant].item() == 1.0
    modulate_gradients(model, coefficients, noise=False)
    for name, parameter in model.named_parameters():
        if parameter.grad is None:
            continue
        if name.startswith(f"fusion.projections.{names[dominant]}."):
            torch.testing.assert_close(parameter.grad, before[name] * k)
        else:  # the weak branch, fusion layers, embeddings and classifier keep their gradients exactly
            assert torch.equal(parameter.grad, before[name]), name


def test_ge_noise_goes_to_the_modulated_branch_only_with_its_gradient_std():
    model = tiny_model()
    inputs, labels = tiny_batch()
    before = _grads(model, inputs, labels)
    coefficients = torch.tensor([0.5, 1.0])  # a is modulated
    modulate_gradients(model, coefficients, noise=True, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    for name, parameter in model.named_parameters():
        if parameter.grad is None:
            continue
        if name.startswith("fusion.projections.a."):
            noise = torch.randn(parameter.grad.shape, generator=g) * before[name].std()
            torch.testing.assert_close(parameter.grad, before[name] * 0.5 + noise)
        else:
            assert torch.equal(parameter.grad, before[name]), name


def test_callback_modulates_inside_a_trainer_step(tmp_path):
    from torch.utils.data import Dataset

    from hf_multimax.training.fusion import FusionTrainer, FusionTrainingArguments

    inputs, labels = tiny_batch()

    class Rows(Dataset):
        def __len__(self):
            return 6

        def __getitem__(self, i):
            return i

    def collate(indices):
        return {"modality_inputs": {k: v[indices] for k, v in inputs.items()}, "labels": labels[indices]}

    model = tiny_model()
    seen = {}

    class Spy(OGMGECallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            seen["scores"] = self._scores.clone()
            seen["before"] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            super().on_pre_optimizer_step(args, state, control, model=model, **kwargs)
            seen["after"] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    callback = Spy(alpha=0.5, noise=False)
    args = FusionTrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=6, max_steps=1,
                                   learning_rate=0.0, optim="sgd", max_grad_norm=0.0, report_to="none",
                                   use_cpu=True, save_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
                                   remove_unused_columns=False, logging_strategy="no", seed=0)
    FusionTrainer(model=model, args=args, train_dataset=Rows(), data_collator=collate, callbacks=[callback]).train()
    coefficients, _ = ogm_ge_coefficients(seen["scores"], 0.5)
    lead = ["a", "b"][int(seen["scores"].argmax())]
    for name, grad in seen["before"].items():
        expected = grad * coefficients[["a", "b"].index(lead)] if name.startswith(f"fusion.projections.{lead}.") else grad
        torch.testing.assert_close(seen["after"][name], expected.to(grad.dtype))
    assert callback.history and f"ogm/coefficient/{lead}" in callback.history[0]
    assert callback._handle is None  # the hook is removed at the end of training
