"""Train the same tiny models on the same data with softmax (HF eager), MultiMax, 1.5-entmax and
sparsemax attention and compare accuracy, loss and attention metrics (`experiments/compare_attention.py`
says what is measured). Writes JSON and a PNG chart, prints a markdown table.

    .venv/bin/python scripts/compare_attention.py [--steps 300] [--output outputs/compare_attention.json]
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/ is a repository folder, not installed

from experiments.compare_attention import ATTENTIONS, compare_attention, markdown_table, plot  # noqa: E402
from experiments.harness import write_results  # noqa: E402
from _cli import HelpFormatter  # noqa: E402  (scripts/ is first on sys.path when run)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="training steps per attention implementation")
    parser.add_argument("--attentions", nargs="+", default=list(ATTENTIONS), choices=list(ATTENTIONS), help="attention implementations to compare")
    parser.add_argument("--output", default="outputs/compare_attention.json", help="JSON path (the PNG goes beside it)")
    parser.add_argument("--workdir", default="outputs/compare_attention_runs", help="where the training runs write")
    args = parser.parse_args(argv)
    results = compare_attention(args.attentions, args.steps, args.workdir)
    write_results(results, args.output, plot)
    print(markdown_table(results))
    return results


if __name__ == "__main__":
    main()
