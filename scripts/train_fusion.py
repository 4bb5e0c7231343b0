"""Train the multimodal fusion model with one method on one task and print its imbalance report.

    python scripts/train_fusion.py --task synthetic --method rollingq --seed 0 --output_dir runs/rollingq
"""

import json

from transformers import HfArgumentParser

import hf_multimax  # noqa: F401  (registers the fusion model with the Auto classes)
from hf_multimax.training.fusion import FusionArguments, run_fusion


def main(argv=None):
    (args,) = HfArgumentParser(FusionArguments).parse_args_into_dataclasses(args=argv)
    result = run_fusion(args)
    print(json.dumps({k: v for k, v in result["report"].items() if k != "air_trace"}, indent=1))
    return result


if __name__ == "__main__":
    main()
