#!/usr/bin/env bash
# Creates .venv with the CPU build of torch first (so nothing pulls a CUDA build), then the project.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[dev,entmax]"
