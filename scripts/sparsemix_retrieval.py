"""Long-range key-value retrieval at L=4096: dense model vs the same model with SparseMix attention
(untrained selector, after the selectors' dense warm-up, after sparse fine-tuning), then the
long-context suite (lookup at 4k and 16k, multi-query recall, needle depth sweep); the experiment is
`experiments/sparsemix_retrieval/`.

    .venv/bin/python scripts/sparsemix_retrieval.py                 # the full run
    .venv/bin/python scripts/sparsemix_retrieval.py --quick      # smoke run: tiny sizes, claims nothing
    .venv/bin/python scripts/sparsemix_retrieval.py --direction --selector token   # ~1 min: recall moves up

Writes the JSON (`--output`, default outputs/sparsemix_retrieval.json) and the long-context chart
beside it (`.png`), and prints markdown tables.
Every other flag is a field of `RetrievalExperimentArguments`.
"""

import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/ is a repository folder, not installed

from transformers import HfArgumentParser  # noqa: E402

import hf_multimax  # noqa: E402,F401  (registers attn_implementation="sparsemix")
from experiments.sparsemix_retrieval import (  # noqa: E402
    DIRECTION,
    QUICK,
    RetrievalExperimentArguments,
    markdown_table,
    plot_long_context,
    run_retrieval_experiment,
)


@dataclass
class ScriptArguments:
    output: str = field(default="outputs/sparsemix_retrieval.json", metadata={"help": "Where to write the results."})
    quick: bool = field(default=False, metadata={"help": "Smoke run: tiny sizes (overrides them); claims no target."})
    direction: bool = field(default=False, metadata={
        "help": "CI check (~1 min): a small model that learns the lookup, then the scorer warm-up; reports whether the "
                "trained selector's needle recall beats the untrained one's. Claims no target."})


def main(argv=None):
    parser = HfArgumentParser((ScriptArguments, RetrievalExperimentArguments))
    script, args = parser.parse_args_into_dataclasses(args=argv)
    if script.quick and script.direction:
        raise ValueError("--quick and --direction are two different presets: pass one of them")
    for preset, values in ((script.quick, QUICK), (script.direction, DIRECTION)):
        if preset:
            for name, value in values.items():
                setattr(args, name, value)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    result = run_retrieval_experiment(args)
    result["quick"] = script.quick or script.direction
    result["preset"] = "quick" if script.quick else "direction" if script.direction else None
    result["command"] = "python scripts/sparsemix_retrieval.py " + " ".join(sys.argv[1:] if argv is None else argv)
    out = Path(script.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    if result.get("long_context"):
        plot_long_context(result, str(out.with_suffix(".png")))
    print(markdown_table(result))
    return result


if __name__ == "__main__":
    main()
