#!/usr/bin/env bash
# Creates .venv with the CPU build of torch first (so nothing pulls a CUDA build), then the project.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip "setuptools>=68" wheel
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[dev,entmax]"
# DeepSpeed (for its ZeRO-3 tests) builds against the torch above: no build isolation, which would fetch
# another torch, and none of its compiled ops (the tests use its CPU accelerator).
DS_BUILD_OPS=0 .venv/bin/python -m pip install -q --no-build-isolation "deepspeed>=0.16"
