"""SparseMix decoding: the selector's summary of a KV cache's keys (pooled key blocks for the block
scorer, indexer keys for the token indexer) grows by the new tokens at each step instead of being
recomputed over every cached key, which would cost as much as dense attention reading the cache.

A summary is kept as an attribute of the key tensor it was computed from (a dynamic cache's keys
after its update, or a static cache's buffer), so it goes away with that tensor. The method's
forward pre-hook (`note_cache_keys`, registered on each SparseMix attention module) notes the
summary of the key tensor the module's cache layer holds before this call's update. The attention
call extends it only when all of these hold:

- the tensor has not changed since the summary was made (same version counter: a static cache's
  `reset()` and in-place edits modify it; a crop, beam reordering and a new cache replace it, and
  the new tensor has no summary);
- this call's keys are the summarised tokens plus this call's queries (what the cache appended);
- the summary was made by the same selector, block size and weights (same tensors, same versions).

The summary is stored with room to grow (the static cache's length, or a quarter more), so a step
writes its new entries in place instead of copying the summary; only the newest summary of a storage
writes into it, so two caches holding the same key tensor copy before they part.

With causal attention that keeps the local block, the last key block is never ranked: it is the
local block of the last query block and in the future of every other. Its entry is then left a
placeholder (zeros, whose score the selection hides) until a later block follows it, so a decoding
step summarises one block every `block_size` steps instead of its partial last block at every step
(at 16k context, 1 thread: ~0.16 ms of a ~0.85 ms attention call).

Anything else (no cache, a model whose attention modules have no `layer_idx`, gradients on)
recomputes the summary from all keys, which is what a call without a cache does.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from ..ops.sparsemix import SELECTORS

__all__ = ["cached_key_summary", "note_cache_keys"]

_NOTED = "_hf_multimax_cache_keys"  # module.__dict__ entry, set by the pre-hook for one call
_SUMMARY = "_hf_multimax_key_summary"  # attribute of a cached key tensor


@dataclasses.dataclass
class _Buffer:
    """Storage of a summary with room to grow, shared by the summaries extended from one another."""

    data: torch.Tensor  # [B, Hkv, room, F]
    newest: object  # stamp of the newest summary, the only one that may write into it in place


@dataclasses.dataclass(frozen=True)
class _Summary:
    version: int  # the key tensor's version counter after the call that made it
    tokens: int  # real keys it stands for
    made_by: tuple  # selector, block size, (id, version) of the weights it read
    buffer: _Buffer
    units: int  # entries: blocks or tokens
    summarised: int  # leading entries that hold values (the rest: the placeholder of a last block)
    stamp: object = dataclasses.field(default_factory=object)

    @property
    def data(self) -> torch.Tensor:
        return self.buffer.data[:, :, : self.units]


def note_cache_keys(module: torch.nn.Module, args, kwargs) -> None:
    """Forward pre-hook: which key tensor the module's cache layer holds before this call's update."""
    module.__dict__.pop(_NOTED, None)
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    layers, idx = getattr(cache, "layers", None), getattr(module, "layer_idx", None)
    if not isinstance(layers, (list, tuple)) or not isinstance(idx, int) or not 0 <= idx < len(layers):
        return
    keys = getattr(layers[idx], "keys", None)
    summary = getattr(keys, _SUMMARY, None) if isinstance(keys, torch.Tensor) else None
    # The summary, not the tensor: a dynamic cache drops its old keys in the update. Checked now,
    # before the update: the tensor has not changed since the summary was made.
    if summary is not None and summary.version == keys._version:
        module.__dict__[_NOTED] = summary


def _made_by(selector: str, block_size: int, weights: tuple[torch.Tensor, ...]) -> tuple:
    return (selector, block_size, *((id(w), w._version) for w in weights))


def cached_key_summary(
    module: torch.nn.Module,
    cache_keys: torch.Tensor,
    key: torch.Tensor,
    q_len: int,
    *,
    selector: str,
    block_size: int,
    weights: tuple[torch.Tensor, ...],
    summarize: Callable[[torch.Tensor], torch.Tensor],
    last_block_ranked: bool = True,
) -> torch.Tensor:
    """The selector's summary of `key` (the real keys of this call, `[B, Hkv, K, D]`), extended from
    the noted cache tensor's summary when that is valid (module docstring), else computed whole; kept
    on `cache_keys` (the tensor the attention function was handed) for the next step.

    `summarize(keys)` summarises a run of keys: per token, or per block (the selector's
    `summary_per_block`; runs then start on a block boundary). Without `last_block_ranked` (causal
    attention keeping the local block) the last block's entry is a zero placeholder unless the block
    is complete.
    """
    made_by = _made_by(selector, block_size, weights)
    old = module.__dict__.pop(_NOTED, None)
    if old is not None and not (old.made_by == made_by and old.tokens + q_len == key.shape[-2]):
        old = None
    unit = block_size if SELECTORS[selector].summary_per_block else 1
    units = -(-key.shape[-2] // unit)
    # The old entries that stay: whole blocks (a partial one is summarised again), or tokens.
    kept = 0 if old is None else min(old.summarised, old.tokens // unit)
    done = units if last_block_ranked or kept == 0 == key.shape[-2] // unit else key.shape[-2] // unit
    new = summarize(key[..., kept * unit : done * unit, :]) if done > kept else None
    if old is None and done == units:
        buffer = _Buffer(new, None)
    else:
        buffer = None if old is None else old.buffer
        # Written in place only by the newest summary of the buffer (another cache holding the same
        # key tensor may have extended it already) and while there is room; else a copy with room
        # for the cache's length (a static cache) or a quarter more.
        if buffer is None or buffer.newest is not old.stamp or buffer.data.shape[2] < units:
            room = max(units + units // 4, -(-cache_keys.shape[-2] // unit))
            like = new if new is not None else old.data
            data = like.new_empty(*like.shape[:2], room, like.shape[-1])
            if kept:
                data[:, :, :kept] = old.data[:, :, :kept]
            buffer = _Buffer(data, None)
        if new is not None:
            buffer.data[:, :, kept:done] = new
        if done < units:
            buffer.data[:, :, done:units].zero_()
    summary = _Summary(cache_keys._version, key.shape[-2], made_by, buffer, units, done)
    buffer.newest = summary.stamp
    setattr(cache_keys, _SUMMARY, summary)
    return buffer.data[:, :, :units]
