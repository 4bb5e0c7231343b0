"""Train the multimodal fusion model with one method on one task and print its imbalance report
(from the repository root; every flag is a field of `FusionArguments`):

    .venv/bin/python -m experiments.fusion --task synthetic --method rollingq --seed 0 --output_dir outputs/rollingq
"""

import json

from transformers import HfArgumentParser

import hf_multimax  # noqa: F401  (registers the fusion model with the Auto classes)

from .recipe import FusionArguments, run_fusion


def main(argv=None) -> dict:
    parser = HfArgumentParser(FusionArguments, prog="python -m experiments.fusion", description=__doc__)
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    result = run_fusion(args)
    print(json.dumps({k: v for k, v in result["report"].items() if k != "air_trace"}, indent=1))
    return result


if __name__ == "__main__":
    main()
