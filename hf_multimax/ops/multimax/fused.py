"""MultiMax attention through one fused C++ kernel on CPU, forward and backward (`csrc/fused_cpu.cpp`).

FlashAttention-2's structure on the CPU: each block of queries walks the keys in blocks, the forward's
two tile products go to oneDNN's brgemm micro-kernel over K copied once, transposed (BLAS for calls
of a few queries, in the backward, and where oneDNN has no fp32 micro-kernel), and softcap, bias,
affine, the modulator, masks and an online softmax run in one vectorised pass over the tile while it
is in cache. The backward recomputes tiles from the row log-sum-exp and returns the gradients of q,
k, v and of the scalars. Memory beyond the inputs and outputs: the forward's transposed copy of K,
and O(tile).

The kernel is compiled on first use with `torch.utils.cpp_extension` (g++ and the torch headers;
about a minute, cached in `TORCH_EXTENSIONS_DIR`). Where it cannot be built, `is_available()` says
why, `auto` takes the `chunked` backend and one warning is logged.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import torch

from ..naive_attention import check_qkv, post_mask, score_shaped
from ..sink import check_sink, fold_sink
from .naive import check_theta

__all__ = ["fused_is_available", "fused_multimax_attention", "load_fused_extension", "prepare_fused_inference"]

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "fused_cpu.cpp"
# The ATen vector width the kernel is built for, from what torch itself dispatches to on this CPU.
_CAPABILITY_FLAGS = {
    "AVX512": ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512", "-mavx512f", "-mavx512bw", "-mavx512vl",
               "-mavx512dq", "-mfma"],
    "AVX2": ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"],
}


@functools.cache
def load_fused_extension():
    """Build (first time) and import the C++ extension. Raises with the compiler's reason."""
    import shutil

    from torch.utils.cpp_extension import load

    if shutil.which("ninja") is None:  # the `ninja` wheel (a dependency) puts it beside the venv's python
        try:
            import ninja

            os.environ["PATH"] = f"{ninja.BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}"
        except ImportError:
            pass  # load() then says that ninja is missing
    capability = torch.backends.cpu.get_cpu_capability()
    flags = ["-O3", "-fopenmp", *_CAPABILITY_FLAGS.get(capability, [])]
    name = f"hf_multimax_fused_cpu_{capability.lower()}"
    return load(name=name, sources=[str(SOURCE)], extra_cflags=flags, extra_ldflags=["-fopenmp"], verbose=False)


@functools.cache
def _build() -> tuple[bool, str]:
    if os.environ.get("HF_MULTIMAX_NO_BUILD") == "1":
        return False, "building C++ kernels is switched off (HF_MULTIMAX_NO_BUILD=1)"
    try:
        load_fused_extension()
    except Exception as error:  # no compiler, no headers, a linker error: say so once, use another backend
        reason = f"its C++ kernel could not be built ({type(error).__name__}: {str(error).strip()[-400:]})"
        logger.warning("MultiMax 'fused' backend unavailable, using 'chunked' instead: %s", reason)
        return False, reason
    return True, ""


@torch.compiler.assume_constant_result
def _build_in_graph() -> tuple[bool, str]:
    return _build()  # runs at trace time; the graph keeps the answer as a constant


def fused_is_available() -> tuple[bool, str]:
    """`(True, "")` once the extension is built and loaded (built on the first call); else
    `(False, reason)`, logged once."""
    return _build_in_graph() if torch.compiler.is_compiling() else _build()


# The kernel as torch operators, so autograd, torch.compile (fake tensors give the shapes) and
# tracing see one op each way. `fused_multimax_attention` calls the extension directly when no
# gradient is needed (decoding): the same C++ without the operator machinery.
@torch.library.custom_op("hf_multimax::fused_forward", mutates_args=())
def _forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, theta: torch.Tensor, affine: torch.Tensor,
                mask: torch.Tensor | None, bias: torch.Tensor | None, causal: bool, scale: float, softcap: float,
                has_affine: bool) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = load_fused_extension().forward(q, k, v, theta, affine, mask, bias, causal, scale, softcap, has_affine)
    return out, lse


@_forward_op.register_fake
def _(q, k, v, theta, affine, mask, bias, causal, scale, softcap, has_affine):
    return q.new_empty(*q.shape[:3], v.shape[-1]), q.new_empty(q.shape[:3])


@torch.library.custom_op("hf_multimax::fused_backward", mutates_args=())
def _backward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, theta: torch.Tensor, affine: torch.Tensor,
                 mask: torch.Tensor | None, bias: torch.Tensor | None, causal: bool, scale: float, softcap: float,
                 has_affine: bool, dout: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                 dlse: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    delta = (dout * out).sum(-1)
    if dlse is not None:  # d lse / d y = p: the same as lowering delta (an attention sink reads lse)
        delta = delta - dlse
    dq, dk, dv, dscalars = load_fused_extension().backward(
        q, k, v, theta, affine, mask, bias, causal, scale, softcap, has_affine, dout.contiguous(), lse, delta)
    B, H, K = dk.shape[:3]
    group = H // k.shape[1]
    if group > 1:  # grouped-query attention: the kernel returns one gradient per query head
        dk = dk.view(B, H // group, group, K, -1).sum(2)
        dv = dv.view(B, H // group, group, K, -1).sum(2)
    per_head = dscalars.sum(0).t()  # [10, H]
    dtheta, daffine = per_head[:8], per_head[8:]
    if theta.shape[1] == 1:  # shared scalars: one sum over the heads
        dtheta = dtheta.sum(1, keepdim=True)
    if affine.shape[1] == 1:
        daffine = daffine.sum(1, keepdim=True)
    return dq, dk, dv, dtheta.contiguous(), daffine.contiguous()


@_backward_op.register_fake
def _(q, k, v, theta, affine, mask, bias, causal, scale, softcap, has_affine, dout, out, lse, dlse):
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), theta.new_empty(theta.shape),
            affine.new_empty(affine.shape))


def _setup_context(ctx, inputs, output):
    q, k, v, theta, affine, mask, bias, causal, scale, softcap, has_affine = inputs
    ctx.save_for_backward(q, k, v, theta, affine, mask, bias, *output)
    ctx.config = (causal, scale, softcap, has_affine)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, theta, affine, mask, bias, out, lse = ctx.saved_tensors
    causal, scale, softcap, has_affine = ctx.config
    dq, dk, dv, dtheta, daffine = _backward_op(q, k, v, theta, affine, mask, bias, causal, scale, softcap, has_affine,
                                               grad_out, out, lse, grad_lse)
    return dq, dk, dv, dtheta, daffine if has_affine else None, None, None, None, None, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


_NO_AFFINE = torch.zeros(2, 1)  # read, never written: the kernel's affine when there is none


def _columns(theta, affine):
    """theta `[8]`, `[8, H]` or `[8, H, 1, 1]` -> `[8, 1]` or `[8, H]` fp32 (affine likewise; a zero
    constant when absent). Views where possible: decoding calls this for every layer and token."""
    theta = theta.reshape(8, -1).float().contiguous()
    if affine is None:
        return theta, _NO_AFFINE
    return theta, affine.reshape(2, -1).float().contiguous()


def fused_multimax_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    theta: torch.Tensor,
    *,
    scale: float | None = None,
    mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    is_causal: bool = False,
    softcap: float | None = None,
    affine: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    sink_logits: torch.Tensor | None = None,
) -> tuple[torch.Tensor, None]:
    """Same contract as `naive_multimax_attention` on CPU tensors, with no dropout and no
    probabilities. Computes in fp32; returns `(out [B, H, Q, Dv] in value's dtype, None)`.

    Examples:
        >>> q = k = v = torch.randn(1, 2, 300, 16)
        >>> out, _ = fused_multimax_attention(q, k, v, torch.zeros(8), is_causal=True)
        >>> out.shape
        torch.Size([1, 2, 300, 16])
    """
    if dropout_p != 0.0:
        raise ValueError(f"the fused backend does not support attention dropout (got dropout_p={dropout_p}); use eager")
    if query.device.type != "cpu":
        raise ValueError(f"the fused backend runs on CPU tensors, got {query.device}; use 'flex' or 'triton' on GPU")
    check_qkv(query, key, value)
    check_theta(theta)
    B, H, Q, _ = query.shape
    K = key.shape[-2]
    if scale is None:
        scale = query.shape[-1] ** -0.5
    if mask is not None:
        mask = post_mask(mask, B, H, Q, K)
    if bias is not None:
        bias = score_shaped(bias.float(), B, H, Q, K)
    if softcap is not None and softcap <= 0:
        raise ValueError(f"softcap={softcap!r} must be positive or None")
    theta_h, affine_h = _columns(theta, affine)
    q, k, v = (t.float().contiguous() for t in (query, key, value))
    args = (q, k, v, theta_h, affine_h, mask, bias, bool(is_causal), float(scale), float(softcap or 0.0),
            affine is not None)
    if (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, theta_h, affine_h, sink_logits))
            or torch.compiler.is_compiling()):
        out, lse = _forward_op(*args)
    else:
        out, lse = load_fused_extension().forward(*args)
    if sink_logits is not None:
        check_sink(sink_logits, H)
        out = fold_sink(out, lse, sink_logits)
    return out.to(value.dtype), None


def prepare_fused_inference(theta: torch.Tensor, affine: torch.Tensor | None, softcap: float | None):
    """A no-gradient call with these scalars fixed, for decoding: `run(query, key, value, scale,
    is_causal) -> out [B, H, Q, Dv]` for unmasked inputs, the scalars converted once. Checks what
    changes per call (shapes, dtype of the output) and nothing else; the caller keeps it only while
    the scalars, settings and backend choice stay the same."""
    theta_h, affine_h = _columns(theta.detach(), None if affine is None else affine.detach())
    ext, has_affine, cap = load_fused_extension(), affine is not None, float(softcap or 0.0)
    if cap < 0:
        raise ValueError(f"softcap={softcap!r} must be positive or None")

    def run(query, key, value, scale, is_causal):
        if query.shape[1] % key.shape[1] or theta_h.shape[1] not in (1, query.shape[1]):
            check_qkv(query, key, value)  # raises with the reason
            raise ValueError(f"{theta_h.shape[1]} per-head scalars for {query.shape[1]} query heads")
        out, _ = ext.forward(query.float().contiguous(), key.float().contiguous(), value.float().contiguous(),
                             theta_h, affine_h, None, None, is_causal, scale, cap, has_affine)
        return out.to(value.dtype)

    return run
