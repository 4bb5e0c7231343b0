"""Train the multimodal fusion model with one method on one task and print its imbalance report.

    .venv/bin/python scripts/train_fusion.py --task synthetic --method rollingq --seed 0 --output_dir outputs/rollingq
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/ is a repository folder, not installed

from transformers import HfArgumentParser  # noqa: E402

import hf_multimax  # noqa: E402,F401  (registers the fusion model with the Auto classes)
from experiments.fusion import FusionArguments, run_fusion  # noqa: E402


def main(argv=None):
    (args,) = HfArgumentParser(FusionArguments).parse_args_into_dataclasses(args=argv)
    result = run_fusion(args)
    print(json.dumps({k: v for k, v in result["report"].items() if k != "air_trace"}, indent=1))
    return result


if __name__ == "__main__":
    main()
