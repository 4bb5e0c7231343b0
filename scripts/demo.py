"""The demo of the README's first command: a real pretrained LM, SmolLM2-135M-Instruct, converted to
MultiMax, trained a few steps on real text, saved and reloaded (experiments/demo.py says how).

    .venv/bin/python scripts/demo.py [--steps 4] [--output_dir outputs/demo]

The demo is a study built on the real-model loader in experiments/, so it runs the way every study
runs, `python -m experiments.demo` from the repository root (its relative paths are taken from there);
this file only starts it, to keep the first command short.
"""

import os
import sys
from pathlib import Path

if __name__ == "__main__":
    os.chdir(Path(__file__).resolve().parents[1])
    os.execv(sys.executable, [sys.executable, "-m", "experiments.demo", *sys.argv[1:]])
