"""The fusion study: joint training against OGM-GE, RollingQ, attribution regularization, RollingQ +
attribution and the unimodal ensemble (each modality's model trained alone, logits averaged), on the
constructed complementary task (where imbalance costs accuracy by construction, Bayes accuracy known)
and digits as two views (real images, constructed imbalance). Every method: the same seeds (the data
is fixed, so each seed is a paired comparison with joint), the same budget and the same early
stopping on a validation split. Per method and measure: mean and 95% t-interval over seeds; per method
against joint: the paired difference, its 95% interval and the paired t-test's p; per method the rate
of runs that collapse onto one modality (from the repository root):

    .venv/bin/python -m experiments.fusion.compare            # benchmarks/results/fusion_compare{.json,.md,_<task>.png}
    .venv/bin/python -m experiments.fusion.compare --quick    # smoke run into outputs/fusion_compare_quick: claims nothing
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch

from ..harness import RESULTS, HelpFormatter
from .data import FusionCollator, complementary_bayes_accuracy, load_fusion_task, split_validation
from .recipe import FusionArguments, run_fusion

__all__ = ["COLLAPSE", "MEASURES", "METHODS", "PROTOCOL", "QUICK", "collapsed", "compare_fusion", "interval",
           "main", "paired", "summarize"]

TASKS = ("complementary", "digits")
# Table order; "ensemble" is two unimodal runs per seed.
METHODS = ("joint", "ogm_ge", "rollingq", "attribution", "rollingq_attribution", "ensemble")
# The same budget and early-stopping rule for every method of a task (max epochs, patience, batch).
PROTOCOL = {
    "complementary": {"epochs": 12, "patience": 4, "task": "b at 3.5 on 1 of 4 tokens"},
    "digits": {"epochs": 30, "patience": 5},
}
SEEDS = (0, 1, 2, 3, 4)
# A run has collapsed onto one modality when the CLS query's attention mass on it (test set, last
# fusion layer) is above this.
COLLAPSE = 0.9
MEASURES = ("accuracy", "weak_probe", "accuracy_dominant_noise", "attention_dominant", "share_dominant")
QUICK = {"seeds": [0], "overrides": {"epochs": 2, "patience": 1, "warmup_noise_epochs": 0},
         "data": {"complementary": {"num_train": 64, "num_validation": 32, "num_test": 32}}}


def interval(values: list[float], level: float = 0.95) -> dict:
    """Mean, and the t-interval of the mean (None with fewer than 2 values)."""
    from scipy import stats

    mean = statistics.fmean(values)
    if len(values) < 2:
        return {"mean": mean, "low": None, "high": None, "n": len(values)}
    half = stats.t.ppf(0.5 + level / 2, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": len(values)}


def paired(values: list[float], baseline: list[float]) -> dict:
    """Per-seed differences `values - baseline`: their mean and t-interval, the paired t-test's two-sided
    p, and how many seeds are better / worse."""
    from scipy import stats

    diffs = [v - b for v, b in zip(values, baseline, strict=True)]
    result = interval(diffs)
    p = None
    if len(diffs) > 1 and statistics.pstdev(diffs) > 0:
        p = float(stats.ttest_rel(values, baseline).pvalue)
    elif len(diffs) > 1:
        p = 1.0 if diffs[0] == 0 else 0.0
    result.update({"p": p, "better": sum(d > 0 for d in diffs), "worse": sum(d < 0 for d in diffs)})
    return result


def collapsed(row: dict) -> str | None:
    """"dominant" / "weak" when the attention mass on that modality exceeds COLLAPSE, else None."""
    if row.get("attention_dominant") is None:
        return None
    if row["attention_dominant"] > COLLAPSE:
        return "dominant"
    if row["attention_dominant"] < 1 - COLLAPSE:
        return "weak"
    return None


def _rate(count: int, n: int) -> dict:
    from scipy import stats

    ci = stats.binomtest(count, n).proportion_ci(0.95, method="exact") if n else None
    return {"count": count, "n": n, "rate": count / n if n else None,
            "low": ci.low if ci else None, "high": ci.high if ci else None}


def summarize(rows: dict[str, list[dict]]) -> dict:
    """method -> {measure: interval, "vs_joint": {measure: paired}, "collapse": rate}; `rows[method]` is
    one measure dict per seed, in the same seed order for every method."""
    summary = {}
    for method, runs in rows.items():
        entry = {}
        for measure in MEASURES:
            values = [r[measure] for r in runs if r.get(measure) is not None]
            entry[measure] = interval(values) if len(values) == len(runs) and values else None
        if method != "joint" and "joint" in rows:
            entry["vs_joint"] = {
                m: paired([r[m] for r in runs], [r[m] for r in rows["joint"]])
                for m in MEASURES if entry[m] is not None and summary["joint"][m] is not None}
        kinds = [collapsed(r) for r in runs]
        entry["collapse"] = None if runs[0].get("attention_dominant") is None else {
            "any": _rate(sum(k is not None for k in kinds), len(kinds)),
            "dominant": _rate(kinds.count("dominant"), len(kinds)),
            "weak": _rate(kinds.count("weak"), len(kinds))}
        summary[method] = entry
    return summary


def _measures(report: dict, dominant: str, weak: str) -> dict:
    return {
        "accuracy": report["accuracy"],
        "weak_probe": report[f"probe_accuracy/{weak}"],
        "accuracy_dominant_noise": report[f"accuracy_noise/{dominant}"],
        "attention_dominant": report[f"attention_mass/{dominant}"],
        "share_dominant": report[f"attribution_share/{dominant}"],
    }


@torch.no_grad()
def _logits(model, dataset, collator) -> tuple[torch.Tensor, torch.Tensor]:
    from torch.utils.data import DataLoader

    model.eval()
    logits, labels = [], []
    for batch in DataLoader(dataset, batch_size=256, collate_fn=collator):
        logits.append(model(**batch).logits.float())
        labels.append(batch["labels"])
    return torch.cat(logits), torch.cat(labels)


def ensemble_measures(models: dict, dataset, names, sizes, seed: int) -> dict:
    """The unimodal ensemble: each modality's model (the others hidden) on its own modality, logits
    averaged; accuracy clean and with the dominant modality replaced by noise (the same noise as
    `fusion_report`: `torch.manual_seed(seed)` before the pass)."""
    out = {}
    for mode, noise in (("accuracy", ()), ("accuracy_dominant_noise", (names[0],))):
        summed, labels = 0, None
        for name, model in models.items():
            torch.manual_seed(seed)
            hidden = [n for n in names if n != name]
            logits, labels = _logits(model, dataset, FusionCollator(names, sizes, noise=noise, mask=hidden))
            summed = summed + logits
        out[mode] = (summed / len(models)).argmax(-1).eq(labels).double().mean().item()
    return out


def _run(task, method, seed, data, overrides, only=None):
    protocol = {k: v for k, v in {**PROTOCOL[task], **overrides}.items() if k != "task"}  # "task": a label
    args = FusionArguments(task=task, method=method, seed=seed, only=only, disable_tqdm=True, **protocol)
    result = run_fusion(args, data, return_model=only is not None)
    model = result.pop("model", None)
    return result, model


def _slim(result: dict) -> dict:
    """What the JSON keeps of a run: its report (no AIR trace), epochs, runtime and traces."""
    report = {k: v for k, v in result["report"].items() if k != "air_trace"}
    return {"report": report, "epochs_trained": result["epochs_trained"], "best_epoch": result["best_epoch"],
            "train_runtime": result["train_runtime"], "history": {k: result["history"][k] for k in
                                                                 ("monitor", "validation", "ogm", "rollingq")}}


def compare_fusion(tasks=TASKS, methods=METHODS, seeds=SEEDS, out_dir=RESULTS, overrides: dict | None = None,
                   data_overrides: dict | None = None, plot: bool = True, quick: bool = False,
                   resume: bool = True) -> dict:
    """Run every (task, method, seed), writing `fusion_compare.json` after each run (a rerun with
    `resume` skips the runs it holds) and, at the end, `fusion_compare.md` and `fusion_compare_<task>.png`."""
    overrides, data_overrides = dict(overrides or {}), dict(data_overrides or {})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "fusion_compare.json"
    content = {"quick": quick, "seeds": list(seeds), "protocol": {t: {**PROTOCOL[t], **overrides} for t in tasks},
               "collapse_threshold": COLLAPSE, "overrides": overrides, "data_overrides": data_overrides,
               "torch_threads": 1, "tasks": {}}
    if resume and path.exists():  # keep the runs of every task whose protocol and data are unchanged
        previous = json.loads(path.read_text())
        for task in tasks:
            same = all(previous.get(key) == content[key] for key in ("quick", "overrides", "data_overrides"))
            if same and previous.get("protocol", {}).get(task) == content["protocol"][task] and task in previous.get("tasks", {}):
                content["tasks"][task] = previous["tasks"][task]
    torch.set_num_threads(1)
    started = time.time()
    for task in tasks:
        datasets, names, sizes, classes = load_fusion_task(task, seed=0, **data_overrides.get(task, {}))
        datasets = split_validation(datasets, fraction=0.2, seed=0)
        data = (datasets, names, sizes, classes)
        entry = content["tasks"].setdefault(task, {"modalities": names, "runs": {}})
        entry["sizes"] = {split: len(ds) for split, ds in datasets.items()}
        if task == "complementary":
            entry["bayes_accuracy"] = complementary_bayes_accuracy(datasets["test"], **{
                k: v for k, v in data_overrides.get(task, {}).items() if k not in ("num_train", "num_validation", "num_test")})
        # Seeds outer, methods inner: a study cut short still holds complete paired sets of seeds.
        for seed in seeds:
            for method in methods:
                done = entry["runs"].setdefault(method, {})
                if str(seed) in done:
                    continue
                tick = time.time()
                if method == "ensemble":
                    parts, models = {}, {}
                    for name in names:
                        result, models[name] = _run(task, "unimodal", seed, data, overrides, only=name)
                        parts[name] = _slim(result)
                    measures = ensemble_measures(models, datasets["test"], names, sizes, seed)
                    measures.update({"weak_probe": parts[names[1]]["report"][f"probe_accuracy/{names[1]}"],
                                     "attention_dominant": None, "share_dominant": None})
                    measures.update({f"unimodal_accuracy/{n}": parts[n]["report"]["accuracy"] for n in names})
                    done[str(seed)] = {"measures": measures, "unimodal": parts, "wall_s": time.time() - tick}
                else:
                    result, _ = _run(task, method, seed, data, overrides)
                    done[str(seed)] = {"measures": _measures(result["report"], names[0], names[1]), **_slim(result),
                                       "wall_s": time.time() - tick}
                print(f"[{time.time() - started:6.0f}s] {task} {method} seed {seed}: "
                      + ", ".join(f"{k} {v:.3f}" for k, v in done[str(seed)]["measures"].items() if v is not None),
                      flush=True)
                path.write_text(json.dumps(content, indent=1))
        rows = {m: [entry["runs"][m][str(s)]["measures"] for s in seeds] for m in methods if m in entry["runs"]}
        entry["summary"] = summarize(rows)
        path.write_text(json.dumps(content, indent=1))
        if plot:
            from .plots import plot_fusion_study

            plot_fusion_study(rows, entry, out / f"fusion_compare_{task}.png", title=f"{task} ({len(seeds)} seeds)")
    content["wall_s_this_call"] = time.time() - started
    markdown = "\n".join(results_markdown(task, content["tasks"][task], len(seeds)) for task in tasks)
    path.write_text(json.dumps(content, indent=1))
    (out / "fusion_compare.md").write_text(markdown)
    content["markdown"] = markdown
    return content


def _cell(stat: dict | None, digits: int = 3) -> str:
    if stat is None:
        return "n/a"
    if stat["low"] is None:
        return f"{stat['mean']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} ({stat['low']:.{digits}f}, {stat['high']:.{digits}f})"


def _diff(stat: dict | None) -> str:
    if stat is None:
        return "n/a"
    p = "n/a" if stat["p"] is None else f"{stat['p']:.3f}"
    if stat["low"] is None:
        return f"{stat['mean']:+.3f}"
    return f"{stat['mean']:+.3f} ({stat['low']:+.3f}, {stat['high']:+.3f}) p={p}"


def results_markdown(task: str, entry: dict, num_seeds: int) -> str:
    """The task's tables: per method mean (95% interval); per method minus joint, paired; collapse."""
    dominant, weak = entry["modalities"]
    summary = entry["summary"]
    labels = {"accuracy": "accuracy", "weak_probe": f"{weak} probe",
              "accuracy_dominant_noise": f"accuracy, {dominant} -> noise",
              "attention_dominant": f"attention on {dominant}", "share_dominant": f"attribution share of {dominant}"}
    lines = [f"### {task} ({dominant} = dominant, {weak} = weak; {num_seeds} seeds, mean (95% t-interval))", ""]
    if "bayes_accuracy" in entry:
        bayes = entry["bayes_accuracy"]
        lines += [f"Bayes-optimal test accuracy: both {bayes['both']:.3f}, {dominant} alone {bayes['a']:.3f}, "
                  f"{weak} alone {bayes['b']:.3f}.", ""]
    lines += ["| method | " + " | ".join(labels.values()) + " | collapsed runs |",
              "|---" * (len(labels) + 2) + "|"]
    for method, row in summary.items():
        collapse = row["collapse"]
        rate = "n/a" if collapse is None else (f"{collapse['any']['count']}/{collapse['any']['n']}"
                                               f" ({collapse['dominant']['count']} on {dominant}, "
                                               f"{collapse['weak']['count']} on {weak})")
        lines.append(f"| {method} | " + " | ".join(_cell(row[m]) for m in labels) + f" | {rate} |")
    lines += ["", f"Each method minus joint, paired by seed: mean difference (95% t-interval) and paired t-test p:", "",
              "| method | " + " | ".join(labels[m] for m in ("accuracy", "weak_probe", "accuracy_dominant_noise")) + " |",
              "|---|---|---|---|"]
    for method, row in summary.items():
        if method == "joint":
            continue
        lines.append(f"| {method} | " + " | ".join(_diff(row["vs_joint"].get(m)) for m in
                                                   ("accuracy", "weak_probe", "accuracy_dominant_noise")) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m experiments.fusion.compare", description=__doc__,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS), help="tasks")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), help="methods")
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS), help="training seeds (the data is fixed)")
    parser.add_argument("--out_dir", default=None,
                        help=f"where the JSON, markdown and plots go (default: {RESULTS}; with --quick outputs/fusion_compare_quick)")
    parser.add_argument("--no_plot", action="store_true", help="skip the plots")
    parser.add_argument("--no_resume", action="store_true", help="rerun the runs the output JSON already holds")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: one seed, 2 epochs, a 64-sample complementary task; claims nothing")
    args = parser.parse_args(argv)
    overrides, data_overrides, seeds = {}, {}, args.seeds
    if args.quick:
        overrides, data_overrides, seeds = QUICK["overrides"], QUICK["data"], QUICK["seeds"]
    out_dir = args.out_dir or ("outputs/fusion_compare_quick" if args.quick else RESULTS)
    content = compare_fusion(args.tasks, args.methods, seeds, out_dir, overrides, data_overrides,
                             plot=not args.no_plot, quick=args.quick, resume=not args.no_resume)
    print(content["markdown"])
    if args.quick:
        print("SMOKE RUN (--quick): one seed, 2 epochs; these numbers compare nothing.")
    return content


if __name__ == "__main__":
    main()
