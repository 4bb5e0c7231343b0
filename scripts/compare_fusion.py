"""joint / RollingQ / attribution regularization over 3 seeds on the synthetic benchmark and the digits
two-view task: docs/compare_fusion.{json,md} and docs/compare_fusion_<task>.png.

    .venv/bin/python scripts/compare_fusion.py                      # the README's numbers
    .venv/bin/python scripts/compare_fusion.py --epochs 10 --seeds 0 --out_dir /tmp/quick
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/ is a repository folder, not installed

import hf_multimax  # noqa: E402,F401  (registers the fusion model with the Auto classes)
from experiments.fusion import METHODS, TASKS  # noqa: E402
from experiments.fusion.compare import compare_fusion  # noqa: E402
from _cli import HelpFormatter  # noqa: E402  (scripts/ is first on sys.path when run)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS), help="benchmark tasks")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), help="fusion methods to compare")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="training seeds (mean and std over them)")
    parser.add_argument("--epochs", type=int, default=None, help="Override the recipe's 30 epochs.")
    parser.add_argument("--warmup_noise_epochs", type=int, default=None, help="Override the recipe's 5 warm-up epochs.")
    parser.add_argument("--num_train", type=int, default=None, help="Synthetic task: training samples.")
    parser.add_argument("--out_dir", default="outputs/compare_fusion",
                        help="where the JSON, markdown table and plots go (the shipped ones: --out_dir docs)")
    parser.add_argument("--no_plot", action="store_true", help="skip the plots")
    args = parser.parse_args(argv)
    overrides = {k: getattr(args, k) for k in ("epochs", "warmup_noise_epochs", "num_train") if getattr(args, k) is not None}
    content = compare_fusion(args.tasks, args.methods, args.seeds, args.out_dir, overrides, plot=not args.no_plot)
    print(content["markdown"])
    print(json.dumps({t: c["checks"] for t, c in content["tasks"].items()}, indent=1))


if __name__ == "__main__":
    main()
