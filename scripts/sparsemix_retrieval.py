"""Long-range key-value retrieval at L=4096: dense model vs the same model with SparseMix attention
(untrained scorer, after the scorers' dense warm-up, after sparse fine-tuning).

    python scripts/sparsemix_retrieval.py                 # the full run (< 20 min on 2 CPU cores)
    python scripts/sparsemix_retrieval.py --quick --output /tmp/r.json   # smoke run (< 30 s)

Writes the JSON (`--output`, default docs/sparsemix_retrieval.json) and prints a markdown table.
Every other flag is a field of `RetrievalExperimentArguments`.
"""

import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser

import hf_multimax  # noqa: F401  (registers attn_implementation="sparsemix")
from hf_multimax.training.retrieval import RetrievalExperimentArguments, run_retrieval_experiment

# Small enough for a test: the lengths keep > top_k + 2 blocks so the sparse path really runs.
QUICK = {"eval_length": 1024, "eval_sequences": 8, "curriculum": "128:4,1024:2", "warmup_steps": 2, "finetune_steps": 2,
         "dense_batch_tokens": 2048, "sparse_batch_size": 2, "block_size": 32, "top_k": 4, "hidden_size": 32,
         "disable_tqdm": True}


@dataclass
class ScriptArguments:
    output: str = field(default="docs/sparsemix_retrieval.json", metadata={"help": "Where to write the results."})
    quick: bool = field(default=False, metadata={"help": "Tiny sizes for a smoke test (overrides the sizes)."})


def markdown_table(result: dict) -> str:
    acc, recall = result["accuracy"], result["needle_block_recall"]
    s = result["settings"]
    rows = [
        ("dense (SDPA)", acc["dense"], None),
        ("sparsemix, untrained scorer", acc["sparse_untrained_scorer"], recall["untrained_scorer"]),
        ("sparsemix, after scorer warm-up", acc["sparse_after_warmup"], recall["after_warmup"]),
        ("sparsemix, after sparse fine-tuning", acc["sparse_after_finetune"], recall["after_finetune"]),
    ]
    lines = [
        (f"L={s['eval_length']}, block {s['block_size']}, top_k {s['top_k']} "
         f"({result['task']['kept_blocks_per_query_block']} key blocks kept), "
         f"{s['eval_sequences']} held-out sequences x {result['task']['eval_queries_per_sequence']} queries, "
         f"chance {result['task']['chance_accuracy']:.3f}"),
        "",
        "| model | accuracy | / dense | needle-block recall (mean over heads / any head) |",
        "|---|---|---|---|",
    ]
    for name, value, rec in rows:
        ratio = value / acc["dense"] if acc["dense"] else float("nan")
        if rec is None:
            rec_text = "all blocks"
        else:
            layers = sorted({k.split("_")[0] for k in rec})
            rec_text = "; ".join(f"{l}: {rec[l + '_mean_over_heads']:.3f} / {rec[l + '_any_head']:.3f}" for l in layers)
        lines.append(f"| {name} | {value:.4f} | {ratio:.3f} | {rec_text} |")
    oracle = result["kl_target_needle_recall"]
    lines.append("")
    lines.append("Needle-block recall of a scorer that matched its KL target exactly (dense model; mean over heads / "
                 "any head): " + "; ".join(
                     f"{name} {oracle[f'layer0_{key}_mean_over_heads']:.3f} / {oracle[f'layer0_{key}_any_head']:.3f}"
                     for key, name in (("mean", "mean over the block's rows"),
                                       ("max", "max over the rows (SparseMix's target since 025b385)"),
                                       ("query_row", "the query token's row alone"))))
    lines.append("")
    lines.append(f"sparse/dense ratio {result['sparse_dense_ratio']:.3f} (target >= {result['target_ratio']}): "
                 f"{'met' if result['meets_target'] else 'NOT met'}; total wall time {result['times_s']['total']:.0f} s")
    return "\n".join(lines)


def main(argv=None):
    parser = HfArgumentParser((ScriptArguments, RetrievalExperimentArguments))
    script, args = parser.parse_args_into_dataclasses(args=argv)
    if script.quick:
        for name, value in QUICK.items():
            setattr(args, name, value)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    result = run_retrieval_experiment(args)
    result["command"] = "python scripts/sparsemix_retrieval.py " + " ".join(sys.argv[1:] if argv is None else argv)
    out = Path(script.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(markdown_table(result))
    return result


if __name__ == "__main__":
    main()
