"""SparseMix as a transformers attention implementation: the HF-signature function.

Per call: short inputs (every block would be kept) and `dense_warmup` run the dense path, which is
transformers' SDPA function (softmax) or our MultiMax function, so the converted model computes
exactly what the dense one does. Longer inputs: the scorer picks blocks, the chosen backend runs
exact attention over them (`ops.sparsemix.sparsemix_attention`). In training the scorer's KL term
goes to the caller's `collect_aux_losses()` block.

What the model hands over is kept on both paths: attention sinks (`s_aux`) join the normaliser; a
sliding window (`sliding_window`, causal) bounds the blocks the selection may keep, the sink block
included (the mask hides the window's keys inside the kept blocks).

Models with their own sparse-attention indexer (DeepSeek-V3.2's `indices`, MiniMax-M3's
`block_indices`; `SELECTION_KWARGS`) always run the dense path with the indexer's selection folded into
the mask, as their eager/SDPA branch does: the indexer already sparsifies, as the model was trained to,
and a second selection by the scorer on top would change which keys each query reads. The scorer is not
used on such models (no KL term either).
"""

from __future__ import annotations

import functools
import weakref
from typing import Callable

import numpy as np
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from ..layers.sparsemix import SparseMixScorer, SparseMixSettings
from ..ops.multimax import naive_multimax_modulate
from ..ops.naive_attention import naive_attention
from ..ops.sparsemix import (BACKENDS, SELECTORS, block_geometry, sample_query_blocks, sparsemix_attention,
                             statistics_for)
from ..ops.sparsemix.fused import DECODE_FEATURES, fused_sparsemix_attention, fused_sparsemix_decode
from .attention_utils import (SELECTION_KWARGS, attention_call, call_is_causal, fold_selection, layer_outputs,
                              prepare_inputs, refuse_unsupported, score_bias_kwargs, settings_of)
from .aux_losses import active_aux_losses
from .multimax_attention import multimax_attention_forward, multimax_params
from .sparsemix_decoding import DECODING_KWARG, cached_key_summary

__all__ = ["sparsemix_attention_forward"]

KL_TERM = "sparsemix_kl"


def _score_mod(theta, affine):
    """The MultiMax modulator as a detached function of the scores (the KL target's dense mass)."""
    th = theta.detach().reshape(*theta.shape, *((1, 1) if theta.dim() == 2 else ()))
    af = None if affine is None else affine.detach().reshape(*affine.shape, *((1, 1) if affine.dim() == 2 else ()))
    return lambda s: naive_multimax_modulate(s, th.to(s.dtype), None if af is None else af.to(s.dtype))


def _add_kl_term(aux, settings, selector, weights, query, key, geometry, scaling, mask, score_mod) -> torch.Tensor | None:
    # Query blocks are sampled whether or not a collector listens, so a checkpointed layer's
    # recomputation draws the same random numbers as its forward.
    blocks = sample_query_blocks(geometry, settings.kl_query_blocks, sink=settings.sink, local=settings.local,
                                 device=query.device)
    if aux is None:
        return None
    # The term's gradient reaches the scorer only (its inputs are detached), so it is built with
    # grad on even inside a reentrant checkpoint's no-grad forward, and its saved tensors stay out of
    # a non-reentrant checkpoint's recomputation (which runs after the collector is closed).
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        kl = SELECTORS[selector].kl(query, key, weights, geometry, blocks, scale=scaling, sink=settings.sink,
                                             local=settings.local, mask=mask, score_mod=score_mod,
                                             target_power=settings.kl_target_power)
        aux.add(KL_TERM, kl * settings.kl_weight)
    return kl


class _MaskFacts:
    """What SparseMix reads off the attention mask (below), found once per forward: every layer of a
    forward is handed the same mask tensor. One entry, the last mask asked about, valid while it is
    the same tensor (held weakly: it goes with the forward) with the same version counter."""

    def __init__(self):
        self._entry = (None, -1, {})

    def get(self, mask: torch.Tensor, what: tuple, compute: Callable[[], object]):
        ref, version, facts = self._entry
        if ref is None or ref() is not mask or version != mask._version:
            facts = {}
            self._entry = (weakref.ref(mask), mask._version, facts)
        if what not in facts:
            facts[what] = compute()
        return facts[what]


_MASK_FACTS = _MaskFacts()


def _keys_seen(mask: torch.Tensor) -> tuple[int, bool]:
    """Past the last key any query sees (all keys when the last one is seen, or none is), and whether
    the mask, cut there, hides nothing from a single query (once per forward: `_MaskFacts`)."""
    return _MASK_FACTS.get(mask, ("keys seen",), lambda: _find_keys_seen(mask))


def _find_keys_seen(mask: torch.Tensor) -> tuple[int, bool]:
    one_row = mask.shape[:3] == (1, 1, 1)
    seen = mask.reshape(-1) if one_row else mask.any(dim=(0, 1, 2))
    if seen.device.type == "cpu":
        # numpy's count and all over a decoding step's 16k-key row take ~17 us, torch's bool reductions
        # ~120 us on one thread (once per forward: ~1.5% of a 2-layer model's step).
        row = seen.numpy()
        count = int(np.count_nonzero(row))
        prefix = bool(count) and bool(row[:count].all())
    else:
        count = int(torch.count_nonzero(seen))  # no int64 copy of the row, as a sum of bools makes
        prefix = bool(count) and bool(seen[:count].all())  # the keys seen are a prefix (a cache's real keys)
    if prefix:
        last = count
    else:
        last = mask.shape[-1]
        if not bool(seen[-1]):
            last -= int(seen.flip(0).view(torch.uint8).argmax())  # 0 when no key is seen: all keys are kept
    # A single row seen as a prefix hides nothing once cut there; otherwise the cut mask is checked.
    hides_nothing = (one_row and prefix) or (mask.shape[-2] == 1 and bool(mask[..., :last].all()))
    return last, hides_nothing


def _sees_ahead(mask: torch.Tensor, q_offset: int) -> bool:
    """Whether the mask lets query i see a key after position q_offset + i: keys that are not in
    positional order (deepseek_v4 appends its compressed entries after its window's keys), where the
    causal block geometry, which places query i there, would hide keys the model attends (once per
    forward: `_MaskFacts`)."""
    def find() -> bool:
        q_len, k_len = mask.shape[-2:]
        ahead = torch.ones(q_len, k_len, dtype=torch.bool, device=mask.device).triu_(q_offset + 1)
        return bool((mask & ahead).any())

    return _MASK_FACTS.get(mask, ("sees ahead", q_offset), find)


def _drop_empty_cache_tail(key, value, mask):
    """A static cache hands over its whole buffer, the rest of it hidden from every query. SparseMix
    places the queries at the end of the keys (its block geometry), so the keys stop at the last one
    any query sees (views: no copy). A mask that then hides nothing (one unpadded sequence decoding)
    is dropped, which is what it says for queries at the end of the keys."""
    last, hides_nothing = _keys_seen(mask)
    if last < key.shape[-2]:
        key, value, mask = key[..., :last, :], value[..., :last, :], mask[..., :last]
    return key, value, None if hides_nothing else mask


def _window(kwargs: dict, causal: bool) -> int | None:
    """The causal sliding window the model hands over (`sliding_window`: Mistral, Gemma 2/3, Qwen2,
    gpt-oss, ...; transformers builds the mask with `sliding_window_overlay`, keys q - window + 1 .. q).
    Bidirectional windows are left to the mask: their kwarg's meaning differs between models
    (ModernBERT passes one more than its mask's half-width)."""
    window = kwargs.get("sliding_window")
    if window is None or not causal:
        return None
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"sliding_window={window!r} is not a window: a positive int (keys per query) is expected")
    return window


def _tie(out: torch.Tensor, kl: torch.Tensor | None) -> torch.Tensor:
    """`out` joined to the KL graph with weight zero: DDP (`find_unused_parameters`, Trainer's default)
    finds the parameters a step uses by walking back from the model's outputs; without the tie the
    scorer looks unused there, and its gradient from the loss then arrives a second time."""
    return out if kl is None else out + 0.0 * kl.to(out.dtype)


# What a packed batch (continuous batching's paged cache, or packed training inputs) hands the attention
# function about its layout and its cache; a call for one of its sequences alone takes none of it.
_PACKING_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "logits_indices",
                   "logits_processor_args", "read_index", "write_index", "block_table", "position_ids", "is_causal")


def _each_sequence(module, query, key, value, attention_mask, scaling, dropout, kwargs):
    """A packed batch (one row holding several sequences, `cu_seq_lens_q`/`_k` their boundaries), one
    sequence at a time: SparseMix ranks and keeps key blocks of the sequence's own keys, as that
    sequence's own forward does (over the packed row, blocks would straddle sequences, and another
    sequence's blocks would take top-k slots). Each sequence's queries are the last of its keys, and
    its slice of the block-diagonal mask is its own mask."""
    cu_q, cu_k = (kwargs[name].tolist() for name in ("cu_seq_lens_q", "cu_seq_lens_k"))
    if query.shape[0] != 1 or len(cu_q) != len(cu_k):
        raise ValueError(
            f"a packed batch is one row with one boundary list per side; got query batch {query.shape[0]}, "
            f"{len(cu_q)} query and {len(cu_k)} key boundaries"
        )
    own = {name: value for name, value in kwargs.items() if name not in _PACKING_KWARGS}
    out = query.new_zeros(1, query.shape[2], query.shape[1], value.shape[-1])  # [1, Q, H, Dv]; padding rows stay 0
    for q0, q1, k0, k1 in zip(cu_q, cu_q[1:], cu_k, cu_k[1:]):
        if q1 <= q0:
            continue  # a padding entry
        mask = None if attention_mask is None else attention_mask[..., q0:q1, k0:k1]
        out[:, q0:q1], _ = sparsemix_attention_forward(
            module, query[:, :, q0:q1], key[:, :, k0:k1], value[:, :, k0:k1], mask, scaling, dropout, **own)
    return out, None


def sparsemix_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """transformers `AttentionInterface` function: query `[B, H, Q, D]`, key/value `[B, Hkv, K, D]`.

    Returns `(out [B, Q, H, Dv], None)` (probabilities only from the dense MultiMax path).
    """
    cache_slot = kwargs.pop(DECODING_KWARG, None)  # from the module's pre-hook: where the key summary lives
    refuse_unsupported(kwargs, "sparsemix", computes=("s_aux",))
    if torch.is_tensor(kwargs.get("cu_seq_lens_q")) and torch.is_tensor(kwargs.get("cu_seq_lens_k")):
        return _each_sequence(module, query, key, value, attention_mask, scaling, dropout, kwargs)
    model_selects = any(kwargs.get(name) is not None for name in SELECTION_KWARGS)
    attention_mask, kwargs = fold_selection(module, query, key, attention_mask, kwargs)
    sink_logits = kwargs.get("s_aux")  # gpt-oss's attention sinks: one logit per head in the denominator
    settings = settings_of(module, SparseMixSettings)
    weights = layer_outputs(module, SparseMixScorer, settings)
    selector = getattr(module, SparseMixScorer.attr).structure[0]  # what "auto" resolved to for this layer
    causal = call_is_causal(module, kwargs)
    window = _window(kwargs, causal)
    cache_keys = key  # what the KV cache holds (the decoding summary is kept as its summary)
    key, value, mask, bias, _ = prepare_inputs(module, query, key, value, attention_mask, kwargs)
    # The dense path takes HF's inputs as they are; the sparse path drops a static cache's empty tail.
    dense_inputs = key, value, mask
    full_mask = mask
    if mask is not None and query.shape[-2] < key.shape[-2]:
        key, value, mask = _drop_empty_cache_tail(key, value, mask)
    geometry = block_geometry(query.shape[-2], key.shape[-2], settings.block_size, causal, window)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    # A model's own indexer has selected already (module docstring): dense path, no KL term.
    long_input = geometry.n_k_blocks > settings.kept_blocks and not model_selects
    multimax = settings.normalizer == "multimax"
    theta, affine = multimax_params(module, query.shape[1]) if multimax else (None, None)

    kl = None
    if module.training and settings.kl_weight > 0 and long_input:
        kl = _add_kl_term(active_aux_losses(KL_TERM), settings, selector, weights, query, key, geometry, scaling, mask,
                          _score_mod(theta, affine) if multimax else None)

    if not long_input or settings.dense_warmup:
        key, value, mask = dense_inputs
        if multimax:
            out, probs = multimax_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                                    dropout=dropout, **kwargs)
        elif kwargs.get("output_attentions") or sink_logits is not None:
            # SDPA keeps no probabilities and has no sinks: the reference computes them (materialising the
            # scores, as transformers' eager function does for these models).
            out, probs = naive_attention(query, key, value, scale=scaling, mask=mask, bias=bias,
                                         is_causal=causal and mask is None, dropout_p=dropout if module.training else 0.0,
                                         sink_logits=sink_logits)
            out = out.transpose(1, 2).contiguous()
        else:
            out, probs = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                                dropout=dropout, **kwargs)
        return _tie(out, kl), probs

    if bias is not None:
        # The block kernels (ops.sparsemix) gather keys per query block and take no bias; attending over the
        # kept keys without it would change every score the bias shifts.
        where = ", ".join(f"the {name} kwarg" for name in score_bias_kwargs(kwargs)) or "the attention mask"
        raise ValueError(
            f"sparsemix does not support an additive score bias ({where}) on its sparse path ({key.shape[-2]} keys, "
            f"above the {settings.kept_blocks * settings.block_size} it runs densely); use attn_implementation "
            "'multimax' or 'sdpa', or sparsemix with dense_warmup=True"
        )
    if kwargs.get("softcap") is not None:
        raise ValueError("sparsemix does not support attention soft-capping (Gemma 2); use 'multimax' or 'eager'")
    if causal and full_mask is not None and query.shape[-2] > 1 and _sees_ahead(full_mask, geometry.q_offset):
        raise ValueError(
            f"{type(module).__name__}'s attention mask lets queries see keys after their own position (keys not in "
            "positional order, as deepseek_v4's compressed entries): sparsemix's causal block geometry would hide "
            f"them on its sparse path ({key.shape[-2]} keys, above the {settings.kept_blocks * settings.block_size} it "
            "runs densely); use attn_implementation 'multimax', or sparsemix with dense_warmup=True"
        )
    if kwargs.get("output_attentions"):
        raise ValueError("output_attentions=True needs dense probabilities, which sparsemix never materialises on long inputs")
    if module.training and dropout > 0.0:
        raise ValueError(
            f"sparsemix does not apply attention dropout on the sparse path (got dropout={dropout}); set the model's "
            "attention dropout to 0 for training on long inputs"
        )
    backend = BACKENDS.resolve(settings.backend, attention_call(query, key, value, theta, affine,
                                                                sink_logits=sink_logits))
    summary = None
    if not torch.is_grad_enabled():  # inference: the cache's key summary grows step by step
        summary = cached_key_summary(cache_slot, cache_keys, key, query.shape[-2], selector=selector,
                                     block_size=settings.block_size, weights=weights,
                                     last_block_ranked=not (causal and settings.local),
                                     summarize=functools.partial(SELECTORS[selector].summarize,
                                                                 w=weights, block_size=settings.block_size,
                                                                 statistics=statistics_for(backend.kernel)))
    if (summary is not None and query.shape[-2] == 1 and backend.kernel is fused_sparsemix_attention
            and selector in DECODE_FEATURES and not multimax and sink_logits is None):
        # A decoding step: scores, top-k and kernel in one C++ call (the same blocks and output as below).
        out, _, _ = fused_sparsemix_decode(
            query, key, value, weights, summary, selector=selector, block_size=settings.block_size,
            top_k=settings.top_k, sink=settings.sink, local=settings.local, causal=causal, scale=scaling, mask=mask,
            window=window)
        return _tie(out.transpose(1, 2).contiguous(), kl), None
    out = sparsemix_attention(
        query, key, value, weights, kernel=backend.kernel, block_size=settings.block_size, top_k=settings.top_k,
        sink=settings.sink, local=settings.local, causal=causal, scale=scaling, mask=mask, theta=theta, affine=affine,
        selector=selector, key_summary=summary, window=window, sink_logits=sink_logits,
    )
    return _tie(out.transpose(1, 2).contiguous(), kl), None
