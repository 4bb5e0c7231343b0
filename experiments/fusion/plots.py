"""Training traces of the fusion comparison: attention mass per modality, AIR with rotation events,
attribution shares (matplotlib, dev extra)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

__all__ = ["plot_fusion_study", "plot_fusion_traces"]

COLORS = {"joint": "tab:gray", "rollingq": "tab:blue", "attribution": "tab:orange"}


def plot_fusion_traces(runs: dict[str, list[dict]], names: list[str], path, title: str = "") -> None:
    """One figure, three panels over epochs (one line per method and seed): attention mass of the CLS
    query on each modality, AIR (rotations marked), attribution share of each modality."""
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    styles = ["-", "--", ":", "-."]
    for method, results in runs.items():
        color = COLORS.get(method)
        for seed_index, result in enumerate(results):
            label = method if seed_index == 0 else None
            monitor = result["history"]["monitor"]
            epochs = [h["epoch"] for h in monitor]
            for i, name in enumerate(names):
                axes[0].plot(epochs, [h[f"fusion/attention_mass/{name}"] for h in monitor], styles[i % 4], color=color,
                             alpha=0.7, label=f"{label}: {name}" if label else None)
                axes[2].plot(epochs, [h[f"fusion/attribution_share/{name}"] for h in monitor], styles[i % 4],
                             color=color, alpha=0.7, label=f"{label}: {name}" if label else None)
            trace = result["history"]["rollingq"]
            axes[1].plot([h["epoch"] for h in trace], [h["rollingq/air"] for h in trace], color=color, alpha=0.7,
                         label=label)
            rotated = [h for h in trace if h["rollingq/rotated"]]
            axes[1].scatter([h["epoch"] for h in rotated], [h["rollingq/air"] for h in rotated], marker="v",
                            color=color, s=28, zorder=3, label=f"{method}: rotation" if label and rotated else None)
    axes[0].set(title="attention mass of the CLS query", xlabel="epoch", ylim=(0, 1))
    axes[1].set(title=f"AIR = cos(q, k_{names[0]}) - cos(q, k_{names[1]}) (train)", xlabel="epoch")
    axes[1].axhline(0, color="black", lw=0.5)
    axes[2].set(title="attribution share (grad x input)", xlabel="epoch", ylim=(0, 1))
    for ax in axes:
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_fusion_study(rows: dict[str, list[dict]], entry: dict, path, title: str = "") -> None:
    """One figure per task for `experiments.fusion.compare`: per measure a panel, per method each seed's
    value (dots) and the mean with its 95% t-interval (bar); the Bayes-optimal accuracy as a line where
    the task has one."""
    dominant, weak = entry["modalities"]
    panels = [("accuracy", "accuracy"), ("weak_probe", f"{weak} probe"),
              ("accuracy_dominant_noise", f"accuracy, {dominant} -> noise"),
              ("attention_dominant", f"attention on {dominant}")]
    methods = list(rows)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2))
    for ax, (measure, label) in zip(axes, panels):
        for x, method in enumerate(methods):
            values = [r[measure] for r in rows[method] if r.get(measure) is not None]
            if not values:
                continue
            color = STUDY_COLORS.get(method, "black")
            ax.scatter([x + 0.08 * (i - len(values) / 2) for i in range(len(values))], values, s=14, color=color,
                       alpha=0.6)
            stat = entry["summary"][method][measure]
            if stat and stat["low"] is not None:
                ax.errorbar([x + 0.3], [stat["mean"]], yerr=[[stat["mean"] - stat["low"]], [stat["high"] - stat["mean"]]],
                            fmt="o", color=color, capsize=3)
        if measure == "accuracy" and "bayes_accuracy" in entry:
            ax.axhline(entry["bayes_accuracy"]["both"], color="black", lw=0.8, ls="--", label="Bayes (both)")
            ax.axhline(entry["bayes_accuracy"]["a"], color="gray", lw=0.8, ls=":", label=f"Bayes ({dominant} alone)")
            ax.legend(fontsize=7)
        if measure == "attention_dominant":
            ax.axhline(0.9, color="red", lw=0.6, ls=":")
            ax.axhline(0.1, color="red", lw=0.6, ls=":")
        ax.set_xticks(range(len(methods)), [m.replace("_", "\n") for m in methods], fontsize=7)
        ax.set_title(label, fontsize=9)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


STUDY_COLORS = {"joint": "tab:gray", "ogm_ge": "tab:green", "rollingq": "tab:blue", "attribution": "tab:orange",
                "rollingq_attribution": "tab:purple", "ensemble": "tab:red"}
