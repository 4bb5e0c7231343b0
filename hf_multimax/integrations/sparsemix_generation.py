"""SparseMix's default KV cache for `generate()`: a dynamic cache whose full-attention layers grow in
place instead of copying the whole history at every step.

transformers' default `DynamicCache` appends each step's keys and values with `torch.cat`, so a
decoding step copies every cached key and value of every layer: at 16k tokens that copy costs more
than SparseMix's attention over the blocks it keeps (decoding 1.14x SDPA with the default cache,
~3x with a static one). `GrowingLayer` is a `DynamicLayer` that keeps its keys and values in a
buffer with room to spare and hands out views of the filled part: a step writes its new entries in
place; the buffer is reallocated (copied) only when it is full, by a quarter more at least, so the
copies cost O(1) per token amortised. Everything else is a `DynamicLayer`'s: its length is the real
number of cached tokens (masks and attention see no empty tail), `crop`, beam reordering and the
batch edits of assisted, beam and contrastive decoding work as for a `DynamicCache`.

The default: when `generate()` builds its own cache (no `cache` argument) for a model whose config
(or a sub-config) names SparseMix, and the generation config chooses no `cache_implementation`, the
full-attention layers of the `DynamicCache` it built become `GrowingLayer`s, sized for the call's
`max_length` (so a `generate()` call never reallocates). The cache is still a `DynamicCache`
(whatever transformers checks of it holds); sliding-window and other layer kinds are left as built.
Anything the user chooses wins: a `cache` argument, or `cache_implementation` ("dynamic" for
transformers' own layers, "static", ...) given to `generate()` or set in `model.generation_config`
(saved to `generation_config.json`). Nothing is written to the model or its generation config, so
nothing is saved and nothing reaches another model: dense and MultiMax models get transformers'
default. `SparseMixCache(config=...)` is the same cache for users who build theirs.

Why not `generation_config.cache_implementation = "static"` as the default: transformers refuses a
`cache` argument beside a `cache_implementation` ("Passing both ... is unsupported"), so every
caller that passes its own cache would fail; a static cache also holds (and masks) the whole
`max_length` from the start, cannot be cropped (assisted decoding), and transformers sizes later
static caches to the largest `max_length` seen so far.

The default is installed by wrapping `GenerationMixin._prepare_cache_for_generation` (a call-through;
`install()` / `uninstall()`, from `register()` / `uninstall()`); if the installed transformers lacks
it or its signature changed, the wrapper is not installed and `generate()` keeps transformers'
default (with one warning).
"""

from __future__ import annotations

import inspect
import logging

import torch
from transformers import DynamicCache, GenerationMixin
from transformers.cache_utils import DynamicLayer, EncoderDecoderCache

from .attach import config_tree
from .methods import method_of

logger = logging.getLogger(__name__)

__all__ = ["GrowingLayer", "SparseMixCache", "grow_cache_layers", "install", "uninstall", "uses_sparsemix"]

# Room added when a buffer is full: a quarter of what it must hold, at least this many tokens.
MIN_GROWTH = 256
_EXPECTED = ["self", "generation_config", "model_kwargs", "generation_mode", "batch_size", "max_cache_length"]
_ORIGINAL: dict[str, object] = {}


class GrowingLayer(DynamicLayer):
    """A `DynamicLayer` whose keys and values are views `[B, H, :length, D]` of buffers with room to
    grow (module docstring). `capacity`: tokens the first buffer holds (at least what the first update
    brings, plus `MIN_GROWTH` when not given)."""

    def __init__(self, capacity: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.capacity = capacity
        self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None
        self._views: tuple[torch.Tensor, torch.Tensor] | None = None  # what this layer last handed out

    def _owns_views(self) -> bool:
        return self._views is not None and self.keys is self._views[0] and self.values is self._views[1]

    def _allocate(self, like_k: torch.Tensor, like_v: torch.Tensor, room: int) -> None:
        """New buffers with `room` tokens, holding the current keys and values (if any) at their start."""
        k_buf = like_k.new_empty(*like_k.shape[:-2], room, like_k.shape[-1])
        v_buf = like_v.new_empty(*like_v.shape[:-2], room, like_v.shape[-1])
        length = self.get_seq_length()
        if length:
            k_buf[..., :length, :].copy_(self.keys)
            v_buf[..., :length, :].copy_(self.values)
        self._buffers = (k_buf, v_buf)
        self._set_length(length)

    def _set_length(self, length: int) -> None:
        k_buf, v_buf = self._buffers
        self.keys, self.values = k_buf[..., :length, :], v_buf[..., :length, :]
        self._views = (self.keys, self.values)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = self.get_seq_length()
        needed = length + key_states.shape[-2]
        if not self._owns_views():
            # First update, or the keys were replaced from outside (an offload, a user's assignment, an edit of
            # DynamicLayer's that this class does not override): adopt them into new buffers.
            self._buffers = None
        if self._buffers is None:
            room = max(needed, self.capacity or 0) if self.capacity else needed + max(MIN_GROWTH, needed // 4)
        elif needed > self._buffers[0].shape[-2] or self._buffers[0].shape[:-2] != key_states.shape[:-2]:
            room = needed + max(MIN_GROWTH, needed // 4)
        else:
            room = None
        if room is not None:
            self._allocate(key_states, value_states, room)
        k_buf, v_buf = self._buffers
        k_buf[..., length:needed, :].copy_(key_states)
        v_buf[..., length:needed, :].copy_(value_states)
        self._set_length(needed)
        return self.keys, self.values

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove < 0 and self.is_initialized and self._owns_views():
            self._set_length(max(self.get_seq_length() + tokens_to_remove, 0))  # a new view: no stale summary
            return
        super().crop(tokens_to_remove)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        length = self.get_seq_length()
        if length and self._owns_views():
            # Into new buffers of the same room (the old views, which a caller may hold, keep their values).
            idx = beam_idx.to(self.keys.device)
            self._buffers = tuple(self._reordered(buf, idx, length) for buf in self._buffers)
            self._set_length(length)
            return
        super().reorder_cache(beam_idx)

    @staticmethod
    def _reordered(buf: torch.Tensor, idx: torch.Tensor, length: int) -> torch.Tensor:
        new = buf.new_empty(idx.shape[0], *buf.shape[1:])
        new[..., :length, :] = buf[..., :length, :].index_select(0, idx)
        return new

    def reset(self) -> None:
        self._buffers = self._views = None
        super().reset()


class SparseMixCache(DynamicCache):
    """A `DynamicCache` whose full-attention layers are `GrowingLayer`s (`capacity`: the tokens each
    holds before its first reallocation). What `generate()` builds for SparseMix models by default."""

    def __init__(self, *args, capacity: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        grow_cache_layers(self, capacity)
        if self.layer_class_to_replicate is DynamicLayer:  # built without a config: layers appear at their first update
            self.layer_class_to_replicate = GrowingLayer


def grow_cache_layers(cache, capacity: int | None) -> int:
    """Turn the empty full-attention `DynamicLayer`s of `cache` (a `DynamicCache`, or the self-attention
    side of an `EncoderDecoderCache`) into `GrowingLayer`s; returns how many."""
    if isinstance(cache, EncoderDecoderCache):
        cache = cache.self_attention_cache
    layers = getattr(cache, "layers", None)
    if not isinstance(cache, DynamicCache) or not isinstance(layers, list):
        return 0
    count = 0
    for i, layer in enumerate(layers):
        if type(layer) is DynamicLayer and not layer.is_initialized:
            layers[i] = GrowingLayer(capacity=capacity)
            count += 1
    return count


def uses_sparsemix(config) -> bool:
    """Whether the config or one of its sub-configs names SparseMix (any backend)."""
    for c in config_tree(config):
        method = method_of(c.__dict__.get("_attn_implementation_internal"))
        if method is not None and method.name == "sparsemix":
            return True
    return False


def _prepare_cache_for_generation(self, generation_config, model_kwargs, generation_mode, batch_size, max_cache_length):
    users_cache = model_kwargs.get("cache") is not None
    result = _ORIGINAL["_prepare_cache_for_generation"](self, generation_config, model_kwargs, generation_mode,
                                                        batch_size, max_cache_length)
    if (not users_cache and generation_config.cache_implementation is None
            and not getattr(self.config, "is_encoder_decoder", False) and uses_sparsemix(self.config)):
        # max_cache_length is max_length - 1 (the last token is never cached); one more keeps it exact.
        grow_cache_layers(model_kwargs.get("cache"), max_cache_length + 1)
    return result


def install() -> bool:
    """Wrap `GenerationMixin._prepare_cache_for_generation` (once); False when this transformers lacks it."""
    if _ORIGINAL:
        return True
    original = GenerationMixin.__dict__.get("_prepare_cache_for_generation")
    found = list(inspect.signature(original).parameters) if callable(original) else None
    if found != _EXPECTED:
        logger.warning("hf_multimax: GenerationMixin._prepare_cache_for_generation%s is not the expected %s; "
                       "generate() keeps transformers' default cache for SparseMix models (pass "
                       "cache=hf_multimax.integrations.sparsemix_generation.SparseMixCache(config=model.config) or cache_implementation='static' "
                       "for fast decoding)", tuple(found) if found else " (missing)", tuple(_EXPECTED))
        return False
    _ORIGINAL["_prepare_cache_for_generation"] = original
    # No public hook: generate() builds its default cache here, and cache_implementation names a closed
    # tuple of transformers' own caches (ALL_CACHE_IMPLEMENTATIONS), so a plugin cache cannot be named.
    GenerationMixin._prepare_cache_for_generation = _prepare_cache_for_generation
    return True


def uninstall() -> None:
    """Put transformers' method back."""
    original = _ORIGINAL.pop("_prepare_cache_for_generation", None)
    if original is not None:
        GenerationMixin._prepare_cache_for_generation = original
