"""Long-range key-value retrieval at L=4096: dense model vs the same model with SparseMix attention
(untrained selector, after the selectors' dense warm-up, after sparse fine-tuning), then the
long-context suite (lookup at 4k and 16k, multi-query recall, needle depth sweep). From the
repository root:

    .venv/bin/python -m experiments.sparsemix_retrieval --threads 1               # the full run (~40 min)
    .venv/bin/python -m experiments.sparsemix_retrieval --quick                   # smoke run: tiny sizes, claims nothing
    .venv/bin/python -m experiments.sparsemix_retrieval --direction --selector token   # ~1 min: recall moves up

Writes the JSON (`--output`; default benchmarks/results/sparsemix_retrieval.json, with --quick or
--direction outputs/sparsemix_retrieval_<preset>.json) and the long-context chart beside it (`.png`),
and prints markdown tables. Every other flag is a field of `RetrievalExperimentArguments`.
"""

import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser

import hf_multimax  # noqa: F401  (registers attn_implementation="sparsemix")

from ..harness import output_path
from . import DIRECTION, QUICK, RetrievalExperimentArguments, markdown_table, plot_long_context, run_retrieval_experiment


@dataclass
class ScriptArguments:
    output: str | None = field(default=None, metadata={"help": "Where to write the results (default: see above)."})
    quick: bool = field(default=False, metadata={"help": "Smoke run: tiny sizes (overrides them); claims no target."})
    direction: bool = field(default=False, metadata={
        "help": "CI check (~1 min): a small model that learns the lookup, then the scorer warm-up; reports whether the "
                "trained selector's needle recall beats the untrained one's. Claims no target."})


def main(argv=None) -> dict:
    parser = HfArgumentParser((ScriptArguments, RetrievalExperimentArguments),
                              prog="python -m experiments.sparsemix_retrieval", description=__doc__)
    script, args = parser.parse_args_into_dataclasses(args=argv)
    if script.quick and script.direction:
        raise ValueError("--quick and --direction are two different presets: pass one of them")
    preset = "quick" if script.quick else "direction" if script.direction else None
    for name, value in {"quick": QUICK, "direction": DIRECTION}.get(preset, {}).items():
        setattr(args, name, value)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    result = run_retrieval_experiment(args)
    result["quick"] = preset is not None
    result["preset"] = preset
    result["command"] = "python -m experiments.sparsemix_retrieval " + " ".join(sys.argv[1:] if argv is None else argv)
    out = Path(output_path("sparsemix_retrieval", preset, script.output))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    if result.get("long_context"):
        plot_long_context(result, str(out.with_suffix(".png")))
    print(markdown_table(result))
    return result


if __name__ == "__main__":
    main()
