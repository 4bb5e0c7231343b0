import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# No GPU here: Triton kernels run in Triton's interpreter, which reads this before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import hf_multimax  # noqa: E402,F401  (registers the attention implementations)

# One tolerance table, keyed by dtype of the inputs: (atol, rtol) against an fp32 reference.
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float64: (1e-10, 1e-10),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (2e-3, 2e-3),
}


def assert_close(actual, expected, dtype=torch.float32, what=""):
    atol, rtol = TOLERANCES[dtype]
    actual, expected = actual.double(), expected.double()
    diff = (actual - expected).abs()
    rel_rms = (diff.square().mean().sqrt() / expected.square().mean().sqrt().clamp_min(1e-30)).item()
    assert torch.allclose(actual, expected, atol=atol, rtol=rtol), (
        f"{what}: max abs diff {diff.max().item():.3e}, relative RMS {rel_rms:.3e} (atol {atol}, rtol {rtol})"
    )


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(42)
