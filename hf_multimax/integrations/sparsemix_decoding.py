"""SparseMix decoding: the selector's summary of a KV cache's keys (pooled key blocks for the block
scorer, indexer keys for the token indexer) grows by the new tokens at each step instead of being
recomputed over every cached key, which would cost as much as dense attention reading the cache.

A summary is per-sequence state, so it lives where transformers keeps a sequence's keys: on the KV
cache's layer object (`cache.layers[layer_idx]`), beside the key tensor it was computed from, and it
goes away with the cache. The attention function is not handed the cache, so the method's forward
pre-hook (`note_cache_keys`, registered on each SparseMix attention module) hands it over explicitly:
it adds a `CacheSlot` (the cache's layers, this module's index and the summary valid before this
call's update) to the module's forward kwargs, which the attention module passes on to the attention
function (`DECODING_KWARG`). Nothing is stored on a module or a tensor. The call extends the summary
only when all of these hold:

- the cache layer still holds the key tensor the summary was made from, unchanged since (same object,
  same version counter: a static cache's `reset()` and in-place edits modify it; a crop, beam
  reordering and a new cache replace it);
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

Anything else (no cache, a model whose attention modules have no `layer_idx` or whose forward takes
no `**kwargs` to pass on, gradients on) recomputes the summary from all keys, which is what a call
without a cache does.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import weakref
from typing import Callable

import torch

from ..ops.sparsemix import SELECTORS

__all__ = ["DECODING_KWARG", "CacheSlot", "cached_key_summary", "key_summary", "note_cache_keys"]

DECODING_KWARG = "sparsemix_cache_slot"  # the pre-hook's kwarg for the attention function
_SUMMARY = "sparsemix_key_summary"  # attribute of a cache layer: `_Kept` (weak reference to its keys, summary)


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


@dataclasses.dataclass(frozen=True)
class CacheSlot:
    """What one attention call needs of the KV cache: where its layer's summary is kept (`layers[index]`,
    which a lazily built dynamic cache creates in this call's update) and the summary valid before it."""

    layers: list
    index: int
    noted: _Summary | None


class _Kept:
    """What a cache layer holds: a weak reference to the key tensor the summary was made from, and the
    summary. A deep copy of the cache (transformers' way to reuse a prefilled prompt cache,
    `copy.deepcopy(prompt_cache)`) takes the summary along for the copied keys, if it was valid for the
    keys at the copy; otherwise the copy's first step recomputed it from every key (at 16k context,
    1 thread: ~150 ms, the time of ~15 decoding steps)."""

    __slots__ = ("keys", "summary")

    def __init__(self, keys: torch.Tensor, summary: _Summary):
        self.keys, self.summary = weakref.ref(keys), summary

    def __deepcopy__(self, memo):
        keys = self.keys()
        if keys is None or self.summary.version != keys._version:
            return None  # stale: the copy recomputes
        # The same memo as the layer's: the copied key tensor is the one the copied layer holds.
        copied_keys = copy.deepcopy(keys, memo)
        copied = copy.deepcopy(self.summary, memo)  # its buffer and stamp, together
        return _Kept(copied_keys, dataclasses.replace(copied, version=copied_keys._version, stamp=copied.stamp))


def key_summary(layer) -> _Summary | None:
    """The summary a cache layer holds for the key tensor it holds now, unchanged since; else None."""
    kept = getattr(layer, _SUMMARY, None)
    keys = getattr(layer, "keys", None)
    if not isinstance(kept, _Kept) or not isinstance(keys, torch.Tensor) or kept.keys() is not keys:
        return None
    return kept.summary if kept.summary.version == keys._version else None


@functools.cache
def _passes_kwargs(cls: type) -> bool:
    """Whether the module's forward takes `**kwargs` (which transformers' attention modules hand on to the
    attention function); a forward without them would refuse the slot."""
    params = inspect.signature(cls.forward).parameters.values()
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def note_cache_keys(module: torch.nn.Module, args, kwargs):
    """Forward pre-hook (with kwargs): hand the attention function its `CacheSlot`, with the summary
    of the keys the module's cache layer holds before this call's update (checked now: a dynamic
    cache drops its old keys in the update)."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    layers, idx = getattr(cache, "layers", None), getattr(module, "layer_idx", None)
    if not isinstance(layers, list) or not isinstance(idx, int) or idx < 0 or not _passes_kwargs(type(module)):
        return None
    noted = key_summary(layers[idx]) if idx < len(layers) else None
    return args, {**kwargs, DECODING_KWARG: CacheSlot(layers, idx, noted)}


def _made_by(selector: str, block_size: int, weights: tuple[torch.Tensor, ...]) -> tuple:
    return (selector, block_size, *((id(w), w._version) for w in weights))


def cached_key_summary(
    slot: CacheSlot | None,
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
    the slot's noted summary when that is valid (module docstring), else computed whole; kept on the
    slot's cache layer for the next step, as the summary of `cache_keys` (the tensor the attention
    function was handed).

    `summarize(keys)` summarises a run of keys: per token, or per block (the selector's
    `summary_per_block`; runs then start on a block boundary). Without `last_block_ranked` (causal
    attention keeping the local block) the last block's entry is a zero placeholder unless the block
    is complete.
    """
    made_by = _made_by(selector, block_size, weights)
    old = None if slot is None else slot.noted
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
    if slot is not None and slot.index < len(slot.layers):
        setattr(slot.layers[slot.index], _SUMMARY, _Kept(cache_keys, summary))
    return buffer.data[:, :, :units]
