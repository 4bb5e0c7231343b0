"""Reproduce max-margin token selection: gradient descent on attention weights converges in
direction to the attention-SVM solution (Tarzanagh et al., arXiv 2306.13596 / 2308.16898).

Setting (docs/max-margin.md, maths in docs/methods.md, section 4): n=6 inputs, T=8 unit-norm Gaussian tokens, d=10, labels +-1, logistic loss,
normalised GD with lr 0.1 from zero for 2000 steps, float64, many seeds in one batched tensor.
Reports mean corr(W, W_mm) over seeds, against the SVM of the tokens GD selects (local) and of the
globally optimal tokens; writes JSON and a PNG (from the repository root):

    .venv/bin/python -m experiments.max_margin                # 50 seeds, 2000 steps
    .venv/bin/python -m experiments.max_margin --quick        # smoke run: 8 seeds, 300 steps, claims nothing
"""

import argparse
import json
import os

import numpy as np

from hf_multimax.analysis.max_margin import make_problem, track_gradient_descent

from .harness import HelpFormatter, output_path


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m experiments.max_margin", description=__doc__,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--seeds", type=int, default=50, help="independent problems, trained as one batch")
    parser.add_argument("--steps", type=int, default=2000, help="gradient steps")
    parser.add_argument("--lr", type=float, default=0.1, help="normalised-GD learning rate")
    parser.add_argument("--n", type=int, default=6, help="inputs per problem")
    parser.add_argument("--T", type=int, default=8, help="tokens per input")
    parser.add_argument("--d", type=int, default=10, help="token dimension")
    parser.add_argument("--output", default=None, help="JSON path, the PNG beside it (default: benchmarks/results/max_margin.json; with --quick outputs/max_margin_quick.json)")
    parser.add_argument("--quick", action="store_true", help="smoke run (8 seeds, 300 steps): claims nothing")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.steps = 8, 300
    args.output = output_path("max_margin", "quick" if args.quick else None, args.output)

    problem = make_problem(args.seeds, args.n, args.T, args.d, seed=0)
    record = sorted({int(s) for s in np.unique(np.geomspace(1, args.steps, 40).round())} | {10, 100, 500, 1000, args.steps})
    record = [s for s in record if s <= args.steps]
    result = {"quick": args.quick, "setting": vars(args), "curves": {}}
    for local in (True, False):
        run = track_gradient_descent(problem, args.steps, args.lr, record=record, local=local)
        key = "local" if local else "global"
        result["curves"][key] = {
            str(step): {"mean": c.mean().item(), "std": c.std().item(), "min": c.min().item()}
            for step, c in run["corr"].items()
        }
        result["gd_selects_global_optimum"] = run["global_optimal_share"]
    final = result["curves"]["local"][str(args.steps)]["mean"]
    result["final_mean_corr_local"] = final

    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(result, f, indent=2)
    png = os.path.splitext(args.output)[0] + ".png"
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for key, label in (("local", "W_mm of the tokens GD selects"), ("global", "W_mm of the globally optimal tokens")):
        steps = [int(s) for s in result["curves"][key]]
        mean = np.array([v["mean"] for v in result["curves"][key].values()])
        std = np.array([v["std"] for v in result["curves"][key].values()])
        ax.plot(steps, mean, label=label)
        ax.fill_between(steps, mean - std, mean + std, alpha=0.2)
    ax.set_xscale("log")
    ax.set_xlabel("gradient descent step")
    ax.set_ylabel("corr(W, W_mm)")
    ax.set_title(f"Max-margin token selection: {args.seeds} seeds, n={args.n}, T={args.T}, d={args.d}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    for step in (10, 100, 500, 1000, args.steps):
        if str(step) in result["curves"]["local"]:
            c = result["curves"]["local"][str(step)]
            print(f"step {step:5d}: mean corr {c['mean']:.4f} (min {c['min']:.4f})")
    print(f"GD selects the globally optimal token for {result['gd_selects_global_optimum']:.1%} of inputs")
    print(f"wrote {args.output} and {png}")
    return result


if __name__ == "__main__":
    main()
