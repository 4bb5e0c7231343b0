"""The fused C++ kernels under every x86 vector width this CPU runs, not only its widest.

The kernels are built for the width torch dispatches to (`torch.backends.cpu.get_cpu_capability()`),
and their sums run in that width's order, so a result that passes at one width can fail at another.
torch honours `ATEN_CPU_CAPABILITY`, and the build follows torch: the kernels' tests run again in a
fresh process at each narrower width (CI runs this file; the default suite ran the machine's own).
"""

import os
import subprocess
import sys

import pytest
import torch

# ATen's x86 widths, narrowest first.
WIDTHS = ["avx2", "avx512"]
KERNEL_TESTS = ["tests/ops/test_multimax_backends.py", "tests/ops/test_sparsemix_ops.py",
                "tests/integrations/test_one_token.py"]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
@pytest.mark.parametrize("width", WIDTHS)
def test_fused_kernels_at_each_vector_width(width):
    native = torch.backends.cpu.get_cpu_capability().lower()
    if native not in WIDTHS or WIDTHS.index(width) > WIDTHS.index(native):
        pytest.skip(f"this CPU's widest ATen width is {native}: it cannot run {width}")
    if width == native:
        pytest.skip(f"{width} is this CPU's own width, which the default suite ran")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": width}
    probe = subprocess.run(
        [sys.executable, "-c", "import torch; from hf_multimax.ops.multimax.fused import load_fused_extension as l; "
         "print(torch.backends.cpu.get_cpu_capability(), l().__name__)"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.split() == [width.upper(), f"hf_multimax_fused_cpu_{width}"], probe.stdout
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "fused or one_token",
                          *KERNEL_TESTS], capture_output=True, text=True, env=env, cwd=ROOT, timeout=1800)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
