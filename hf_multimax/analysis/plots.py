"""Pictures: attention maps, MultiMax modulator curves, metric curves (PNG via matplotlib)."""

from __future__ import annotations

import torch

from ..layers.multimax import MultiMaxModulator
from ..ops.multimax import naive_multimax_modulate

__all__ = ["plot_attention_maps", "plot_metric_curves", "plot_modulator_curves"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_attention_maps(attentions, path, tokens=None, sample: int = 0, max_heads: int = 8):
    """Grid of attention maps, layers as rows and heads as columns, for one sample of the batch.

    Args:
        attentions: the `attentions` tuple of a model output (`[B, H, Q, K]` per layer).
        tokens (`list[str]`, *optional*): axis labels.
    """
    plt = _pyplot()
    layers = len(attentions)
    heads = min(max_heads, attentions[0].shape[1])
    fig, axes = plt.subplots(layers, heads, figsize=(2.2 * heads, 2.2 * layers), squeeze=False)
    for i, layer in enumerate(attentions):
        for h in range(heads):
            ax = axes[i][h]
            ax.imshow(layer[sample, h].detach().float().cpu(), cmap="viridis", vmin=0, vmax=1)
            ax.set_title(f"layer {i} head {h}", fontsize=8)
            if tokens is not None and len(tokens) <= 24:
                ax.set_xticks(range(len(tokens)), tokens, rotation=90, fontsize=6)
                ax.set_yticks(range(len(tokens)), tokens, fontsize=6)
            else:
                ax.set_xticks([]), ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_modulator_curves(model, path, x_range=(-6.0, 6.0)):
    """sigma(x) of every MultiMax module after training against the identity (softmax)."""
    plt = _pyplot()
    x = torch.linspace(*x_range, 400)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.plot(x, x, color="black", linestyle="--", label="identity (softmax)")
    for name, module in model.named_modules():
        if isinstance(module, MultiMaxModulator):
            theta = module.theta().detach().float()
            if theta.dim() > 1:  # per head: the head-average curve
                theta = theta.mean(-1)
            affine = module.affine_params()
            if affine is not None:
                affine = affine.detach().float()
                affine = affine.mean(-1) if affine.dim() > 1 else affine
            ax.plot(x, naive_multimax_modulate(x, theta, affine), label=name.removesuffix(".multimax"))
    ax.set_xlabel("scaled score x")
    ax.set_ylabel("sigma(x)")
    ax.set_title("MultiMax modulator per layer")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_metric_curves(log_history, keys, path):
    """Curves of logged metrics (e.g. `attention/entropy/layer_0`) over training steps."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in keys:
        points = [(h["step"], h[key]) for h in log_history if key in h]
        if points:
            ax.plot(*zip(*points), marker=".", label=key)
    ax.set_xlabel("step")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


