"""joint / RollingQ / attribution regularization over 3 seeds on the synthetic benchmark and the digits
two-view task: the results table of docs/fusion.md (mean +- std over seeds), the targets checked
against joint training, JSON, the markdown table and plots (from the repository root):

    .venv/bin/python -m experiments.fusion.compare             # benchmarks/results/compare_fusion{.json,.md,_<task>.png}
    .venv/bin/python -m experiments.fusion.compare --quick     # smoke run: 2 epochs, one seed, claims nothing
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from tqdm.auto import tqdm

from ..harness import RESULTS, HelpFormatter
from .data import TASKS, load_fusion_task
from .recipe import METHODS, FusionArguments, run_fusion

__all__ = ["QUICK", "TARGETS", "check_targets", "compare_fusion", "main", "results_table", "summarize"]

# The targets (synthetic benchmark, mean of 3 seeds), each method against joint training.
TARGETS = {"noise_accuracy_gain": 0.10, "weak_probe_gain": 0.15, "share_tolerance": 0.1}
# The smoke run: every task and method once, a few epochs on a small synthetic set.
QUICK = {"seeds": [0], "epochs": 2, "warmup_noise_epochs": 1, "num_train": 64, "num_test": 32}


def _columns(report: dict, dominant: str, weak: str) -> dict[str, float]:
    return {
        "acc": report["accuracy"],
        "weak_probe": report[f"probe_accuracy/{weak}"],
        "attention_dominant": report[f"attention_mass/{dominant}"],
        "acc_dominant_noise": report[f"accuracy_noise/{dominant}"],
        "share_dominant": report[f"attribution_share/{dominant}"],
    }


def summarize(runs: dict[str, list[dict]], names: list[str]) -> dict[str, dict[str, tuple[float, float]]]:
    """method -> column -> (mean, std over seeds); dominant modality = names[0], weak = names[1]."""
    summary = {}
    for method, results in runs.items():
        columns = [_columns(r["report"], names[0], names[1]) for r in results]
        summary[method] = {
            key: (statistics.fmean(c[key] for c in columns),
                  statistics.stdev(c[key] for c in columns) if len(columns) > 1 else 0.0)
            for key in columns[0]
        }
    return summary


def check_targets(summary: dict, attribution_target: float = 0.5) -> dict[str, dict]:
    """Per method other than joint: gains over joint (noise accuracy of the dominant modality, weak
    modality's probe) and, for the attribution method, the distance of its share to the target."""
    joint = summary["joint"]
    checks = {}
    for method in (m for m in summary if m != "joint"):
        row = summary[method]
        noise_gain = row["acc_dominant_noise"][0] - joint["acc_dominant_noise"][0]
        probe_gain = row["weak_probe"][0] - joint["weak_probe"][0]
        checks[method] = {
            "noise_accuracy_gain": noise_gain, "noise_accuracy_met": noise_gain >= TARGETS["noise_accuracy_gain"],
            "weak_probe_gain": probe_gain, "weak_probe_met": probe_gain >= TARGETS["weak_probe_gain"],
        }
        if method == "attribution":
            distance = abs(row["share_dominant"][0] - attribution_target)
            checks[method].update({"share_distance": distance, "share_met": distance <= TARGETS["share_tolerance"]})
    return checks


def results_table(summary: dict, names: list[str]) -> str:
    """Markdown table with docs/fusion.md's columns (mean +- std over seeds)."""
    dominant, weak = names[0], names[1]
    header = (f"| method | acc | {weak} probe | attention on {dominant} | acc with {dominant}->noise | "
              f"share of {dominant} |\n|---|---|---|---|---|---|\n")
    rows = []
    for method, row in summary.items():
        cells = [f"{row[k][0]:.3f} ± {row[k][1]:.3f}" for k in
                 ("acc", "weak_probe", "attention_dominant", "acc_dominant_noise", "share_dominant")]
        rows.append(f"| {method} | " + " | ".join(cells) + " |")
    return header + "\n".join(rows) + "\n"


def compare_fusion(tasks=("synthetic", "digits"), methods=METHODS, seeds=(0, 1, 2), out_dir=RESULTS,
                   overrides: dict | None = None, plot: bool = True, quick: bool = False) -> dict:
    """Run every (task, method, seed), write `compare_fusion.json`, `compare_fusion.md` and
    `compare_fusion_<task>.png` into `out_dir`; return the JSON content."""
    overrides = dict(overrides or {})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    content = {"quick": quick, "seeds": list(seeds), "overrides": overrides, "targets": TARGETS, "tasks": {}}
    jobs = [(t, m, s) for t in tasks for m in methods for s in seeds]
    progress = tqdm(jobs, desc="compare_fusion", unit="run")
    data, runs = {}, {t: {m: [] for m in methods} for t in tasks}
    for task, method, seed in progress:
        progress.set_postfix(task=task, method=method, seed=seed)
        args = FusionArguments(task=task, method=method, seed=seed, disable_tqdm=True, **overrides)
        if task not in data:
            kwargs = {"seed": args.data_seed}
            if task == "synthetic":
                kwargs.update({k: v for k, v in (("num_train", args.num_train), ("num_test", args.num_test)) if v})
            data[task] = load_fusion_task(task, **kwargs)
        runs[task][method].append(run_fusion(args, data[task]))
    markdown = []
    for task in tasks:
        names = data[task][1]
        summary = summarize(runs[task], names)
        checks = check_targets(summary) if "joint" in summary else {}
        content["tasks"][task] = {"modalities": names, "summary": summary, "checks": checks, "runs": runs[task]}
        markdown.append(f"### {task} (modalities {names[0]} = dominant, {names[1]} = weak; mean ± std of "
                        f"{len(seeds)} seeds)\n\n" + results_table(summary, names))
        for method, check in checks.items():
            parts = [f"{dominant_noise(check)}", f"{names[1]} probe {check['weak_probe_gain']:+.3f} "
                     f"({'met' if check['weak_probe_met'] else 'missed'})"]
            if "share_distance" in check:
                parts.append(f"|share of {names[0]} - 0.5| = {check['share_distance']:.3f} "
                             f"({'met' if check['share_met'] else 'missed'})")
            markdown.append(f"- {method} vs joint: " + "; ".join(parts))
        markdown.append("")
        if plot:
            from .plots import plot_fusion_traces

            plot_fusion_traces(runs[task], names, out / f"compare_fusion_{task}.png", title=task)
    (out / "compare_fusion.json").write_text(json.dumps(content, indent=1))
    (out / "compare_fusion.md").write_text("\n".join(markdown))
    content["markdown"] = "\n".join(markdown)
    return content


def dominant_noise(check: dict) -> str:
    return (f"acc with dominant->noise {check['noise_accuracy_gain']:+.3f} "
            f"({'met' if check['noise_accuracy_met'] else 'missed'})")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m experiments.fusion.compare", description=__doc__,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS), help="benchmark tasks")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), help="fusion methods to compare")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="training seeds (mean and std over them)")
    parser.add_argument("--epochs", type=int, default=None, help="Override the recipe's 30 epochs.")
    parser.add_argument("--warmup_noise_epochs", type=int, default=None, help="Override the recipe's 5 warm-up epochs.")
    parser.add_argument("--num_train", type=int, default=None, help="Synthetic task: training samples.")
    parser.add_argument("--num_test", type=int, default=None, help="Synthetic task: test samples.")
    parser.add_argument("--out_dir", default=None,
                        help=f"where the JSON, markdown table and plots go (default: {RESULTS}; with --quick outputs/compare_fusion_quick)")
    parser.add_argument("--no_plot", action="store_true", help="skip the plots")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 epochs, one seed, 64 synthetic samples; claims nothing")
    args = parser.parse_args(argv)
    if args.quick:
        vars(args).update(QUICK)
    out_dir = args.out_dir or ("outputs/compare_fusion_quick" if args.quick else RESULTS)
    overrides = {k: getattr(args, k) for k in ("epochs", "warmup_noise_epochs", "num_train", "num_test")
                 if getattr(args, k) is not None}
    content = compare_fusion(args.tasks, args.methods, args.seeds, out_dir, overrides, plot=not args.no_plot,
                             quick=args.quick)
    print(content["markdown"])
    print(json.dumps({t: c["checks"] for t, c in content["tasks"].items()}, indent=1))
    if args.quick:
        print("SMOKE RUN (--quick): 2 epochs, one seed; these numbers compare nothing.")
    return content


if __name__ == "__main__":
    main()
