"""Two-or-more-modality classification tasks as `datasets.Dataset`s, their collator, and the
warm-up callback that switches the collator to noise.

Rows hold one modality per column (named after the modality), its [tokens, features] array stored
flattened (a fixed-size Arrow list reads ~10x faster than `Array2D`), and `label`; `FusionCollator`
restores the token axis.
"""

from __future__ import annotations

import numpy as np
import torch
from datasets import Dataset, DatasetDict, Features, Sequence, Value
from transformers import TrainerCallback

__all__ = [
    "TASKS",
    "FusionCollator",
    "ModalityWarmupCallback",
    "digits_two_view_dataset",
    "load_fusion_task",
    "complementary_bayes_accuracy",
    "complementary_dataset",
    "split_validation",
    "synthetic_imbalance_dataset",
]


def _to_dataset(views: dict[str, np.ndarray], labels: np.ndarray) -> Dataset:
    features = {name: Sequence(Value("float32"), length=x.shape[1] * x.shape[2]) for name, x in views.items()}
    features["label"] = Value("int64")
    data = {name: x.reshape(len(x), -1).astype(np.float32) for name, x in views.items()}
    data["label"] = labels.astype(np.int64)
    return Dataset.from_dict(data, features=Features(features)).with_format("torch")


def synthetic_imbalance_dataset(
    num_train: int = 4000,
    num_test: int = 2000,
    seed: int = 0,
    num_classes: int = 6,
    num_tokens: int = 8,
    dim: int = 16,
    strength_a: float = 1.0,
    strength_b: float = 3.0,
) -> DatasetDict:
    """The synthetic benchmark of docs/methods.md: modality `a` (easy) carries the class prototype at
    `strength_a` on every token, modality `b` (harder) at `strength_b` on one random token only; unit
    Gaussian noise everywhere; prototypes are random unit vectors, one set per modality.

    Returns `DatasetDict(train, test)` with columns `a`, `b` (num_tokens * dim, flattened) and `label`; the same
    `seed` gives the same data.
    """
    rng = np.random.default_rng(seed)
    prototypes = rng.standard_normal((2, num_classes, dim))
    prototypes /= np.linalg.norm(prototypes, axis=-1, keepdims=True)
    total = num_train + num_test
    labels = rng.integers(0, num_classes, total)
    a = rng.standard_normal((total, num_tokens, dim)) + strength_a * prototypes[0, labels][:, None, :]
    b = rng.standard_normal((total, num_tokens, dim))
    position = rng.integers(0, num_tokens, total)
    b[np.arange(total), position] += strength_b * prototypes[1, labels]
    train = _to_dataset({"a": a[:num_train], "b": b[:num_train]}, labels[:num_train])
    test = _to_dataset({"a": a[num_train:], "b": b[num_train:]}, labels[num_train:])
    return DatasetDict(train=train, test=test)


def digits_two_view_dataset(test_size: float = 0.33, seed: int = 0, degrade_std: float = 0.6) -> DatasetDict:
    """scikit-learn's bundled 8x8 digits as two views: `top` (rows 0-3) and `bottom` (rows 4-7), each
    4 tokens (image rows) of 8 pixels. Pixels are scaled to [0, 1], `bottom` is degraded with Gaussian
    noise of std `degrade_std` (so `top` dominates), then every pixel is standardised with the training
    split's mean and std. Stratified split with `seed`. Needs scikit-learn (dev extra).
    """
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as err:
        raise ImportError("digits_two_view_dataset needs scikit-learn: pip install 'hf-multimax[dev]'") from err
    digits = load_digits()
    images = digits.images.astype(np.float64) / 16.0  # [N, 8, 8]
    rng = np.random.default_rng(seed)
    bottom = images[:, 4:] + degrade_std * rng.standard_normal(images[:, 4:].shape)
    index = np.arange(len(images))
    train_idx, test_idx = train_test_split(index, test_size=test_size, random_state=seed, stratify=digits.target)
    views = {"top": images[:, :4], "bottom": bottom}
    for name, view in views.items():
        mean, std = view[train_idx].mean(0), view[train_idx].std(0)
        views[name] = (view - mean) / np.where(std > 1e-6, std, 1.0)  # constant border pixels stay 0
    return DatasetDict(
        train=_to_dataset({k: v[train_idx] for k, v in views.items()}, digits.target[train_idx]),
        test=_to_dataset({k: v[test_idx] for k, v in views.items()}, digits.target[test_idx]),
    )


def _complementary_arrays(total: int, rng, prototypes_a, prototypes_b, num_tokens_a, num_tokens_b, strength_a, strength_b):
    num_classes = prototypes_b.shape[0]
    labels = rng.integers(0, num_classes, total)
    a = rng.standard_normal((total, num_tokens_a, prototypes_a.shape[1])) + strength_a * prototypes_a[labels // 2][:, None, :]
    b = rng.standard_normal((total, num_tokens_b, prototypes_b.shape[1]))
    position = rng.integers(0, num_tokens_b, total)
    b[np.arange(total), position] += strength_b * prototypes_b[labels]
    return a, b, labels


def _complementary_parameters(seed, num_classes, dim_a, dim_b):
    rng = np.random.default_rng(seed)
    prototypes_a = rng.standard_normal((num_classes // 2, dim_a))
    prototypes_b = rng.standard_normal((num_classes, dim_b))
    prototypes_a /= np.linalg.norm(prototypes_a, axis=-1, keepdims=True)
    prototypes_b /= np.linalg.norm(prototypes_b, axis=-1, keepdims=True)
    return rng, prototypes_a, prototypes_b


def complementary_dataset(
    num_train: int = 2000,
    num_validation: int = 1000,
    num_test: int = 2000,
    seed: int = 0,
    num_classes: int = 8,
    num_tokens_a: int = 4,
    num_tokens_b: int = 4,
    dim_a: int = 8,
    dim_b: int = 16,
    strength_a: float = 1.5,
    strength_b: float = 3.5,
) -> DatasetDict:
    """The constructed task where imbalance costs accuracy: classes come in pairs (y // 2); modality `a`
    (dominant: the pair's prototype at `strength_a` on every one of its few low-dimensional tokens) tells
    the pair and nothing else, modality `b` (weak: the class's own prototype at `strength_b` on one random
    token of `num_tokens_b`) tells the class, but with a low signal-to-noise ratio. Unit Gaussian noise
    everywhere, unit-norm random prototypes. A model that uses only `a` is at most 50% correct; the label
    needs both, and `a`'s part is learnt first. The Bayes-optimal accuracy under the known generative
    model: `complementary_bayes_accuracy`.

    Returns `DatasetDict(train, validation, test)` with columns `a`, `b` and `label`; the same `seed`
    gives the same data (train / validation / test drawn in this order).
    """
    if num_classes % 2:
        raise ValueError(f"num_classes={num_classes} must be even (classes come in pairs)")
    rng, prototypes_a, prototypes_b = _complementary_parameters(seed, num_classes, dim_a, dim_b)
    split = {}
    for name, count in (("train", num_train), ("validation", num_validation), ("test", num_test)):
        a, b, labels = _complementary_arrays(count, rng, prototypes_a, prototypes_b, num_tokens_a, num_tokens_b,
                                             strength_a, strength_b)
        split[name] = _to_dataset({"a": a, "b": b}, labels)
    return DatasetDict(split)


def complementary_bayes_accuracy(dataset: Dataset, seed: int = 0, num_classes: int = 8, num_tokens_a: int = 4,
                                 num_tokens_b: int = 4, dim_a: int = 8, dim_b: int = 16, strength_a: float = 1.5,
                                 strength_b: float = 3.5) -> dict[str, float]:
    """Accuracy on `dataset` (a split of `complementary_dataset` with the same settings) of the Bayes
    classifiers under the true generative model (uniform prior): both modalities, `a` alone, `b` alone.
    log p(a | y) = strength_a * sum_t <a_t, P_a[y // 2]> + const, log p(b | y) = logsumexp_t
    strength_b * <b_t, P_b[y]> + const (the signal's token is uniform)."""
    _, prototypes_a, prototypes_b = _complementary_parameters(seed, num_classes, dim_a, dim_b)
    a = np.asarray(dataset["a"], dtype=np.float64).reshape(-1, num_tokens_a, dim_a)
    b = np.asarray(dataset["b"], dtype=np.float64).reshape(-1, num_tokens_b, dim_b)
    labels = np.asarray(dataset["label"])
    log_a = strength_a * np.einsum("ntd,cd->nc", a, prototypes_a[np.arange(num_classes) // 2])
    scores_b = strength_b * np.einsum("ntd,cd->nct", b, prototypes_b)
    peak = scores_b.max(-1, keepdims=True)
    log_b = (peak + np.log(np.exp(scores_b - peak).sum(-1, keepdims=True)))[..., 0]

    def accuracy(log_likelihood):
        # Ties (a alone cannot tell a pair apart) are broken at random: the expected accuracy.
        best = log_likelihood.max(-1, keepdims=True)
        winners = np.isclose(log_likelihood, best, rtol=0, atol=1e-9)
        return float((winners[np.arange(len(labels)), labels] / winners.sum(-1)).mean())

    return {"both": accuracy(log_a + log_b), "a": accuracy(log_a), "b": accuracy(log_b)}


def split_validation(datasets: DatasetDict, fraction: float = 0.2, seed: int = 0) -> DatasetDict:
    """A `validation` split carved out of `train` (a fixed random `fraction`), if there is none."""
    if "validation" in datasets:
        return datasets
    parts = datasets["train"].train_test_split(test_size=fraction, seed=seed)
    return DatasetDict(train=parts["train"], validation=parts["test"], test=datasets["test"])


# name -> (builder, modality names (dominant first), token features per modality, classes)
TASKS = {
    "synthetic": (synthetic_imbalance_dataset, ["a", "b"], [16, 16], 6),
    "digits": (digits_two_view_dataset, ["top", "bottom"], [8, 8], 10),
    "complementary": (complementary_dataset, ["a", "b"], [8, 16], 8),
}


def load_fusion_task(name: str, **kwargs) -> tuple[DatasetDict, list[str], list[int], int]:
    """-> (datasets, modality names, token feature sizes, number of classes) of a task in `TASKS`."""
    if name not in TASKS:
        raise ValueError(f"unknown fusion task {name!r}; allowed: {sorted(TASKS)}")
    builder, names, sizes, classes = TASKS[name]
    return builder(**kwargs), list(names), list(sizes), classes


class FusionCollator:
    """Rows -> `{"modality_inputs": {name: [B, T, d]}, "labels": [B]}`, with d = `feature_sizes[m]`.

    `noise` / `zero` name modalities to replace: by Gaussian noise with the batch's mean and std of that
    modality, or by zeros (the corrupted/missing-modality protocol; also the warm-up that gives the
    dominant modality a head start). `mask` names modalities whose tokens the fusion attention does not
    see (`modality_attention_mask` all 0): the model of the other modalities alone. Both are attributes so a callback can change them between epochs.
    """

    def __init__(self, modality_names, feature_sizes, noise=(), zero=(), mask=()):
        self.modality_names = list(modality_names)
        self.feature_sizes = list(feature_sizes)
        if len(self.feature_sizes) != len(self.modality_names):
            raise ValueError(f"FusionCollator: feature_sizes={self.feature_sizes} needs one size per modality {self.modality_names}")
        self.noise = set(noise)
        self.zero = set(zero)
        self.mask = set(mask)
        unknown = (self.noise | self.zero | self.mask) - set(self.modality_names)
        if unknown:
            raise ValueError(f"FusionCollator: unknown modalities {sorted(unknown)}; allowed: {self.modality_names}")

    def __call__(self, rows):
        inputs = {}
        for name, size in zip(self.modality_names, self.feature_sizes):
            x = torch.stack([torch.as_tensor(row[name], dtype=torch.float32) for row in rows])
            x = x.view(x.shape[0], -1, size)
            if name in self.noise:
                x = torch.randn_like(x) * x.std() + x.mean()
            elif name in self.zero:
                x = torch.zeros_like(x)
            inputs[name] = x
        labels = torch.as_tensor([int(row["label"]) for row in rows], dtype=torch.long)
        batch = {"modality_inputs": inputs, "labels": labels}
        if self.mask:
            # Masked modalities are hidden from the fusion attention: a unimodal model of the others.
            batch["modality_attention_mask"] = {name: torch.zeros(inputs[name].shape[:2], dtype=torch.long)
                                                for name in self.mask}
        return batch


class ModalityWarmupCallback(TrainerCallback):
    """Replaces `modalities` by noise in the training collator for the first `epochs` epochs (the
    benchmark's head start for the dominant modality)."""

    def __init__(self, collator, modalities, epochs: int):
        self.collator, self.modalities, self.epochs = collator, set(modalities), epochs

    def on_epoch_begin(self, args, state, control, **kwargs):
        in_warmup = state.epoch is not None and state.epoch < self.epochs - 1e-6
        self.collator.noise = set(self.modalities) if in_warmup else set()

    def on_train_end(self, args, state, control, **kwargs):
        self.collator.noise = set()
