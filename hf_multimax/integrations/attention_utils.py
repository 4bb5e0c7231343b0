"""What every method's HF-signature attention function shares: its settings read from the config,
its learnable layer fetched through whatever wraps it, the mask and the one causality rule."""

from __future__ import annotations

import functools
import re
import weakref
from typing import Callable

import torch
from transformers.masking_utils import eager_mask, sdpa_mask

from ..layers.base import MethodLayer
from ..layers.settings import ConfigSettings
from ..ops.backends import AttentionCall

__all__ = ["EAGER_MASK_MODEL_TYPES", "PLANS", "REFUSED_KWARGS", "SCORE_BIAS_KWARGS", "SELECTION_KWARGS", "attention_call",
           "call_is_causal", "fold_selection", "layer_outputs", "plugin_mask", "prepare_inputs", "refuse_unsupported",
           "score_bias_kwargs", "settings_of", "split_float_mask"]

# Attention-function kwargs that carry an additive score bias, added to the scaled scores before the
# normaliser (transformers 5.25: `position_bias` of T5 and its copies mt5, umt5, longt5,
# switch_transformers, udop, pix2struct, pop2piano, and of layoutlmv3, seamless_m4t(_v2),
# wav2vec2_bert, wav2vec2_conformer, inkling(2), pp_doclayout_v2; found by reading every model's
# attention call and eager function). They are part of the true scores, so the modulator sees them
# (DESIGN amendment 7); masks still apply after it.
SCORE_BIAS_KWARGS = ("position_bias",)

# Attention-function kwargs carrying what not every plugin method computes: refused, never dropped, by those
# that do not (`refuse_unsupported(..., computes=)`: MultiMax and SparseMix compute `s_aux`).
REFUSED_KWARGS = {
    "s_aux": "attention sinks (gpt-oss and others: an extra logit per head in the normaliser)",
    "sinks": "attention sinks (inkling2: an extra logit per head and query in the normaliser)",
}


def _implicit_keep(module, kwargs: dict, q_len: int, k_len: int, device) -> torch.Tensor:
    """The keep mask `[1, 1, Q, K]` that `prepare_inputs` applies when HF passes no mask: causal calls of
    several queries see keys `0..i` (top-left), a single query sees every key."""
    keep = torch.ones(q_len, k_len, dtype=torch.bool, device=device)
    if call_is_causal(module, kwargs) and q_len > 1:
        keep = keep.tril()
    return keep[None, None]


def _fold_token_indices(module, query, key, attention_mask, indices, kwargs):
    """DeepSeek Sparse Attention's `indices` `[B, Q, top_k]` (key positions, the same for every head):
    the keys not selected are masked, as deepseek_v32's eager/SDPA branch does (boolean and, or finfo.min)."""
    B, _, Q, _ = query.shape
    K = key.shape[-2]
    if not (torch.is_tensor(indices) and not indices.is_floating_point() and indices.dim() == 3
            and tuple(indices.shape[:2]) == (B, Q)):
        what = (f"of shape {tuple(indices.shape)}, {indices.dtype}" if torch.is_tensor(indices) else
                f"of type {type(indices).__name__}")
        raise ValueError(f"indices {what} is not a selection of keys per query: an integer tensor [{B}, {Q}, top_k] "
                         "is expected (DeepSeek Sparse Attention's indexer output)")
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= K):
        raise ValueError(f"indices hold positions outside the {K} keys (min {int(indices.min())}, max "
                         f"{int(indices.max())}): each must be a key position in [0, {K})")
    selected = torch.zeros(B, 1, Q, K, dtype=torch.bool, device=indices.device)
    selected.scatter_(-1, indices.long().unsqueeze(1), True)
    if attention_mask is None:
        return _implicit_keep(module, kwargs, Q, K, selected.device) & selected
    if attention_mask.dtype == torch.bool:
        return attention_mask & selected
    return attention_mask.masked_fill(~selected, torch.finfo(attention_mask.dtype).min)


def _fold_block_indices(module, query, key, attention_mask, block_indices, kwargs):
    """MiniMax-M3's `block_indices` `[B, Hkv, Q, top_k]`, folded by the module's own indexer
    (`indexer.build_block_mask`, what its eager/SDPA branch calls) with the position ids it computes."""
    build = getattr(getattr(module, "indexer", None), "build_block_mask", None)
    if build is None:
        raise ValueError(
            f"{type(module).__name__} passed block_indices but has no `indexer.build_block_mask` to fold them into the "
            "mask (the only known source is MiniMax-M3's indexer); use attn_implementation='eager' or 'sdpa'"
        )
    Q, K = query.shape[-2], key.shape[-2]
    # As MiniMaxM3VLAttention.forward computes them for its indexer (read only without a mask).
    position_ids = kwargs.get("position_ids")
    if position_ids is None:
        position_ids = torch.arange(K - Q, K, device=query.device)
    position_ids = (position_ids if position_ids.ndim > 1 else position_ids.unsqueeze(0)).expand(query.shape[0], -1)
    return build(block_indices, attention_mask, K, query.dtype, query.device, position_ids)


# Attention-function kwargs that carry the model's own selection of keys (a sparse-attention indexer's top-k),
# as name -> the function that folds it into the attention mask the way the model's eager/SDPA branch does
# (above). transformers 5.25 folds the selection into the mask for eager and SDPA and hands it to every
# other implementation as a kwarg, leaving the mask dense (found by reading every model's attention call):
# - `indices`, `[B, Q, top_k]` key positions shared by the heads (DeepSeek Sparse Attention's lightning
#   indexer): deepseek_v32, glm_moe_dsa, axk2, dots3_note, hy_v4, hy_v4_vl, mistral_large4;
# - `block_indices`, `[B, Hkv, Q, top_k]` key blocks per kv head, -1 for none: minimax_m3_vl (its indexer's
#   `build_block_mask` folds them).
# glm5_next and deepseek_v4 fold their indexers' selections into the mask for every implementation (see
# `EAGER_MASK_MODEL_TYPES`). A kwarg whose name says it selects keys but that is not listed here is refused.
SELECTION_KWARGS = {"indices": _fold_token_indices, "block_indices": _fold_block_indices}

# Models whose attention edits the mask assuming eager's additive float format, which they are only ever
# given (their classes support no SDPA): deepseek_v4 appends its compressed entries' columns (the
# indexer's selection, 0 / -inf) cast to the mask's dtype and pads decoding steps with 0.0 = attend; on a
# boolean mask both invert. The plugin's mask function builds eager's mask for them.
EAGER_MASK_MODEL_TYPES = ("deepseek_v4",)


def settings_of(module: torch.nn.Module, settings_cls: type[ConfigSettings]) -> ConfigSettings:
    """The method's settings as the module's config holds them now: the config is the truth, so an
    edit of `config.<method>` takes effect on the next forward (parsed once per distinct dict)."""
    config = getattr(module, "config", None)
    if config is None:
        raise RuntimeError(
            f"{type(module).__name__} has no `config`: {settings_cls.config_key} reads its settings from the attention "
            "module's config"
        )
    # What the `PreTrainedConfig.<method>` property returns, without transformers' attribute lookup
    # (this runs in every layer for every token).
    values = config.__dict__.get(settings_cls.config_key, _ABSENT)
    return settings_cls.from_config(config) if values is _ABSENT else settings_cls.from_dict(values)


_ABSENT = object()


class InferencePlans:
    """The attention functions' one cache: what a call derives from its attention module's state and
    would otherwise derive again in every layer for every token (that the method's layer fits the
    settings; the layer's outputs without gradient; MultiMax's prepared decoding kernel).

    Kept beside the modules, never on them: weakly keyed by the attention module, one entry per
    purpose. One invalidation rule: an entry holds while the state it was built from is unchanged,
    compared item by item, tensors and modules by identity, the rest by equality (`state_of` adds a
    layer's parameters with their versions and storage: an optimizer step or `fill_` bumps the
    version, loading or `.to()` replaces the tensor or its storage)."""

    def __init__(self):
        self._plans: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def get(self, module: torch.nn.Module, purpose: str, state: tuple, build: Callable[[], object] | None = None):
        """The entry for `purpose` if its state is `state`; else `build()` stored under `state` (None: none)."""
        entry = self._plans.get(module, {}).get(purpose)
        if entry is not None and _same(entry[0], state):
            return entry[1]
        if build is None:
            return None
        return self.put(module, purpose, state, build())

    def put(self, module: torch.nn.Module, purpose: str, state: tuple, value):
        self._plans.setdefault(module, {})[purpose] = (state, value)
        return value

    def held(self, module: torch.nn.Module) -> tuple[str, ...]:
        """The purposes an entry is kept for (valid or not)."""
        return tuple(self._plans.get(module, {}))

    @staticmethod
    def state_of(layer: torch.nn.Module, *more) -> tuple:
        params = tuple(layer._parameters.values())
        return (layer, *params, *(p._version for p in params), *(p.data_ptr() for p in params), *more)


def _same(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(
        x is y or not isinstance(x, (torch.Tensor, torch.nn.Module)) and type(x) is type(y) and x == y for x, y in zip(a, b)
    )


PLANS = InferencePlans()


def layer_outputs(module: torch.nn.Module, layer_cls: type[MethodLayer], settings: ConfigSettings):
    """Call the method layer attached to `module` (`module.<attr>()`), after checking that it still
    fits `settings`. Calling rather than reading its parameters lets wrappers (PEFT `modules_to_save`,
    FSDP, DeepSpeed ZeRO-3) supply the live parameters; their attribute lookup reaches `structure`.
    Without gradient an unwrapped layer's outputs are reused while its parameters are unchanged."""
    layer = getattr(module, layer_cls.attr, None)
    name = settings.config_key
    if layer is None:
        raise RuntimeError(
            f"{type(module).__name__} runs {name} attention but has no {layer_cls.title}. Build the model "
            f"with from_pretrained/from_config(attn_implementation='{name}') or call "
            f"model.set_attn_implementation('{name}') after `import hf_multimax`."
        )
    if torch.compiler.is_compiling():
        # dynamo cannot guard on the weakly keyed plan store; the check is traced once per graph instead
        _check_fits(module, layer_cls, layer, settings)
    else:
        PLANS.get(module, "fits", (settings, layer), lambda: _check_fits(module, layer_cls, layer, settings))
    wrapped = type(layer) is not layer_cls or layer._forward_hooks or layer._forward_pre_hooks
    if wrapped or torch.is_grad_enabled() or torch.compiler.is_compiling():
        return layer()
    return PLANS.get(module, "outputs", PLANS.state_of(layer), layer)


def _check_fits(module: torch.nn.Module, layer_cls: type[MethodLayer], layer, settings: ConfigSettings) -> bool:
    wanted = layer_cls.structure_for(settings, module)
    if layer.structure != wanted:
        running = module.config._attn_implementation
        raise ValueError(
            f"config.{settings.config_key} asks {type(module).__name__}.{layer_cls.attr} for {wanted} but it holds "
            f"{layer.structure}: a change of its parameters' shape is applied with model.set_attn_implementation("
            f"{running!r}) (which refuses to drop trained parameters), not by editing the config alone"
        )
    return True


def plugin_mask(*args, **kwargs):
    """The mask function registered beside every plugin attention: boolean 4-D (True = attend), or
    None where SDPA gets None too (unpadded causal input: the attention function applies the
    module's causality itself, which lets the fast kernels skip future key blocks). Models in
    `EAGER_MASK_MODEL_TYPES` get eager's additive float mask, always built."""
    if getattr(kwargs.get("config"), "model_type", None) in EAGER_MASK_MODEL_TYPES:
        return eager_mask(*args, **kwargs)
    return sdpa_mask(*args, **kwargs)


def split_float_mask(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """An additive float mask -> (boolean keep mask, finite bias or None).

    Masked entries (-inf or near finfo.min) become False; any finite non-zero values (a position
    bias some models fold into the mask) come back as a bias to add before the modulator.
    """
    keep = mask > torch.finfo(mask.dtype).min / 2
    bias = torch.where(keep, mask, torch.zeros((), dtype=mask.dtype, device=mask.device))
    # A bias that trains is kept even while it is zero (Swin's relative position table starts at zero): dropping
    # it would leave the table without a gradient, so it never trains.
    return keep, (bias if bias.requires_grad and torch.is_grad_enabled() or bool(bias.any()) else None)


def refuse_unsupported(kwargs: dict, method: str, computes: tuple[str, ...] = ()) -> None:
    """Raise for a kwarg in `REFUSED_KWARGS` that carries a value (transformers passes some as None),
    unless the method `computes` it, and for one whose name says it selects keys but that
    `SELECTION_KWARGS` does not know (a new model's indexer: dropping it would attend densely)."""
    for name, what in REFUSED_KWARGS.items():
        if kwargs.get(name) is not None and name not in computes:
            raise ValueError(
                f"attn_implementation={method!r} got `{name}`, {what}, which it does not compute; ignoring it would "
                "change the model's outputs. Use attn_implementation='eager' for this model"
            )
    for name, value in kwargs.items():
        if value is not None and _names_a_selection(name) and name not in SELECTION_KWARGS:
            raise ValueError(
                f"attn_implementation={method!r} got `{name}`, which looks like a selection of keys (a sparse-attention "
                f"indexer's) that it does not know how to fold into the mask; the known ones are "
                f"{tuple(SELECTION_KWARGS)}. Ignoring it would attend to every key. Use attn_implementation='eager' or "
                "'sdpa' for this model"
            )


@functools.lru_cache(maxsize=256)
def _names_a_selection(name: str) -> bool:
    return re.search(r"indices|index|topk|top_k|select", name) is not None and name not in _transformers_kwargs()


@functools.cache
def _transformers_kwargs() -> frozenset[str]:
    """What transformers' own kwarg types declare, which it passes through every attention call: packing,
    and continuous batching's paged cache, whose `read_index`/`write_index` address the cache and
    `logits_indices` the rows whose logits are kept; none selects keys. (Imported on the first
    selection-like name: the continuous-batching module is slow to import and rarely needed.)"""
    from transformers.generation.continuous_batching.input_outputs import PagedAttentionArgs
    from transformers.utils.generic import TransformersKwargs

    return frozenset(PagedAttentionArgs.__annotations__) | frozenset(TransformersKwargs.__annotations__)


def fold_selection(module, query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None,
                   kwargs: dict) -> tuple[torch.Tensor | None, dict]:
    """`(attention_mask, kwargs)` with the call's selection kwargs (`SELECTION_KWARGS`) folded into the mask
    as the model's eager/SDPA branch folds them, and taken out of the kwargs; both unchanged without one."""
    names = [name for name in SELECTION_KWARGS if kwargs.get(name) is not None]
    if not names:
        return attention_mask, kwargs
    for name in names:
        attention_mask = SELECTION_KWARGS[name](module, query, key, attention_mask, kwargs[name], kwargs)
    return attention_mask, {k: v for k, v in kwargs.items() if k not in SELECTION_KWARGS}




def score_bias_kwargs(kwargs: dict) -> list[str]:
    """The names of the additive-bias kwargs this call carries (`SCORE_BIAS_KWARGS`, not None)."""
    return [name for name in SCORE_BIAS_KWARGS if kwargs.get(name) is not None]


def _score_bias(kwargs: dict, query: torch.Tensor, k_len: int) -> torch.Tensor | None:
    """The sum of the call's additive-bias kwargs, checked to broadcast to the scores `[B, H, Q, K]`."""
    total = None
    B, H, Q = query.shape[:3]
    for name in score_bias_kwargs(kwargs):
        bias = kwargs[name]
        fits = (torch.is_tensor(bias) and bias.is_floating_point() and bias.dim() == 4 and bias.shape[0] in (1, B)
                and bias.shape[1] in (1, H) and bias.shape[2] in (1, Q) and bias.shape[3] == k_len)
        if not fits:
            what = (f"of shape {tuple(bias.shape)} and dtype {bias.dtype}" if torch.is_tensor(bias)
                    else f"of type {type(bias).__name__}")
            raise ValueError(
                f"{name} {what} does not fit the scores [{B}, {H}, {Q}, {k_len}]: a floating 4-D tensor "
                "that broadcasts to them is expected (as SDPA requires)"
            )
        total = bias if total is None else total + bias
    return total


def call_is_causal(module: torch.nn.Module, kwargs: dict) -> bool:
    """The one causality rule of every plugin attention, as transformers' SDPA function: an explicit
    `is_causal` kwarg (None counts as absent), else the module's `is_causal`, else causal."""
    is_causal = kwargs.get("is_causal")
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    return bool(is_causal)


def prepare_inputs(module, query, key, value, attention_mask, kwargs):
    """HF's inputs -> `(key, value, boolean keep mask or None, additive bias or None, is_causal)`, with
    SDPA's semantics, which is what transformers prepares the inputs for.

    HF hands over a mask that already encodes causality (and windows); only without one does the
    module's own causality apply, aligned as SDPA aligns it: a single query sees every key, several
    queries see keys `0..i` (top-left). transformers leaves the mask out only where that is right,
    e.g. a static cache's prefill, whose keys past the queries are the buffer's empty rest: those are
    dropped here (and the bias's columns for them, as SDPA drops them).

    The additive bias is the sum of the bias kwargs (`SCORE_BIAS_KWARGS`) and of the finite values of
    a float mask: SDPA adds both to the scaled scores, so at identity MultiMax computes what it does.
    A selection kwarg (`SELECTION_KWARGS`) is folded into the mask first, as eager/SDPA get it.
    """
    attention_mask, kwargs = fold_selection(module, query, key, attention_mask, kwargs)
    causal = call_is_causal(module, kwargs)
    q_len, k_len = query.shape[-2], key.shape[-2]
    score_bias = _score_bias(kwargs, query, k_len)
    if attention_mask is None:
        if causal and 1 < q_len < k_len:
            key, value = key[..., :q_len, :], value[..., :q_len, :]
            score_bias = None if score_bias is None else score_bias[..., :q_len]
        return key, value, None, score_bias, causal
    if attention_mask.shape[-1] != k_len or attention_mask.dim() != 4:
        raise ValueError(
            f"attention_mask of shape {tuple(attention_mask.shape)} does not fit {k_len} keys: a 4-D mask "
            f"[batch, 1 or heads, {q_len}, {k_len}] is expected (as SDPA requires)"
        )
    if attention_mask.dtype == torch.bool:
        return key, value, attention_mask, score_bias, False
    if not attention_mask.is_floating_point():
        raise ValueError(
            f"attention_mask of dtype {attention_mask.dtype} is not supported: pass a boolean mask (True = attend) "
            "or an additive float mask (0 = attend, -inf or finfo.min = masked)"
        )
    keep, bias = split_float_mask(attention_mask)
    if score_bias is not None:
        bias = score_bias if bias is None else score_bias + bias
    return key, value, keep, bias, False


def attention_call(query, key, *params, want_probs: bool = False, dropout: float = 0.0,
                   sink_logits: torch.Tensor | None = None) -> AttentionCall:
    """What the backend registry needs to know about this call (`params[0]` is the value, the rest the
    modulator's learnable inputs, `None` for softmax; `sink_logits` the attention sinks, if any)."""
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                                 for t in (query, key, *params, sink_logits))
    same = len(params) == 0 or params[0] is None or params[0].shape[-1] == query.shape[-1]
    modulated = any(t is not None for t in params[1:])
    return AttentionCall(query.device.type, query.shape[-2], key.shape[-2], needs_grad, want_probs, dropout, same,
                         modulated, sink_logits is not None)
