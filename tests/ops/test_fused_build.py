"""The fused C++ kernel where it cannot be built: `auto` says so once and takes `chunked` (fresh
processes: the build result is kept per process)."""

import os
import subprocess
import sys

import pytest

SCRIPT = """
import logging, torch
logging.basicConfig(level=logging.WARNING)
from hf_multimax.ops.backends import AttentionCall
from hf_multimax.ops.multimax import BACKENDS
call = AttentionCall("cpu", 1024, 1024)
print("PICKED", BACKENDS.resolve("auto", call).name, BACKENDS.resolve("auto", call).name)
try:
    BACKENDS.resolve("fused", call)
except ValueError as error:
    print("EXPLICIT", error)
"""


def run(tmp_path, **env):
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path), **env})
    assert out.returncode == 0, out.stderr
    return out.stdout, out.stderr


@pytest.mark.slow  # tens of seconds (fresh processes, several processes, a compile or a smoke run): CI runs -m slow
def test_no_compiler_falls_back_to_chunked_with_one_warning(tmp_path):
    stdout, stderr = run(tmp_path, CXX=str(tmp_path / "no-such-compiler"))
    assert "PICKED chunked chunked" in stdout
    assert stderr.count("'fused' backend unavailable, using 'chunked' instead") == 1, stderr
    assert "EXPLICIT multimax backend='fused' cannot run this call: its C++ kernel could not be built" in stdout


@pytest.mark.slow  # tens of seconds (fresh processes, several processes, a compile or a smoke run): CI runs -m slow
def test_build_switched_off(tmp_path):
    stdout, _ = run(tmp_path, HF_MULTIMAX_NO_BUILD="1")
    assert "PICKED chunked chunked" in stdout and "HF_MULTIMAX_NO_BUILD=1" in stdout
