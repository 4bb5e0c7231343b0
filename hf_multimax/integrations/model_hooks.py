"""Attach MultiMax scalars to HF models whose config asks for MultiMax, and keep them in step.

transformers has no hook for "a model was built with attention X", so we wrap three methods of
`PreTrainedModel`, once, each a thin call-through:

- `post_init` (the last step of every HF model's `__init__`): attach the scalars, so they exist
  before `from_pretrained` loads weights and before any optimizer is built.
- `_initialize_weights`: `from_pretrained` materialises missing keys with `torch.empty_like` and
  initialises them through the nearest `PreTrainedModel`'s `_init_weights`, which does not know our
  module; without this, a checkpoint that lacks the scalars would load garbage into them.
- `set_attn_implementation`: switching to or from MultiMax attaches or removes the scalars.

`PreTrainedConfig.multimax = None` (and `.sparsemix`) makes `multimax=` a known config attribute, so
`from_pretrained(path, attn_implementation="multimax", multimax={...})` reaches the config.
"""

from __future__ import annotations

import functools
import inspect
import logging

import torch
from transformers import PreTrainedConfig, PreTrainedModel
from transformers import initialization as hf_init

from ..layers.multimax import MultiMaxModulator, MultiMaxSettings
from ..layers.sparsemix import SparseMixScorer
from .sparsemix_hooks import is_sparsemix_name, sparsemix_settings, sync_sparsemix

logger = logging.getLogger(__name__)

__all__ = [
    "ATTENTION_NAME",
    "install_model_hooks",
    "is_multimax_name",
    "multimax_settings",
    "output_head_of",
    "sync_multimax",
    "wants_multimax",
]

ATTENTION_NAME = "multimax"
_ORIGINALS: dict[str, object] = {}


def is_multimax_name(name) -> bool:
    return MultiMaxSettings.is_own_name(name)


def wants_multimax(config, fallback=None) -> bool:
    """MultiMax attention, or SparseMix with MultiMax as its normalizer."""
    name = config._attn_implementation
    if is_multimax_name(name):
        return True
    return is_sparsemix_name(name) and sparsemix_settings(config, fallback).normalizer == "multimax"


@functools.cache
def _calls_attention_interface(cls: type) -> bool:
    # The same source-text test transformers uses to decide whether a model can switch attention.
    try:
        return "ALL_ATTENTION_FUNCTIONS" in inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False


def _num_heads(module: torch.nn.Module) -> int | None:
    for attr in ("num_heads", "num_attention_heads", "n_heads"):
        value = getattr(module, attr, None)
        if isinstance(value, int):
            return value
    return getattr(getattr(module, "config", None), "num_attention_heads", None)


def multimax_settings(config, fallback=None) -> MultiMaxSettings:
    """`config.multimax` validated (see `ConfigSettings.from_config`)."""
    return MultiMaxSettings.from_config(config, fallback)


def output_head_of(model: PreTrainedModel) -> torch.nn.Module | None:
    """The module whose output is the model's logits: LM head, or classifier/score head."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        head = next((getattr(model, a) for a in ("classifier", "score") if isinstance(getattr(model, a, None), torch.nn.Module)), None)
    return head


def _modulate_logits(head: torch.nn.Module, args, output):
    return head.multimax(output)


def _attach(parent: torch.nn.Module, settings: MultiMaxSettings, num_heads: int | None) -> MultiMaxModulator:
    ref = next(parent.parameters(), None)
    modulator = MultiMaxModulator(settings.order, num_heads, settings.affine, settings.backend)
    if ref is not None and ref.device.type == "meta":  # from_pretrained builds on meta, then loads
        modulator = modulator.to("meta")
    elif ref is not None:
        modulator = modulator.to(ref.device)
    parent.multimax = modulator
    return modulator


def _fits(modulator: MultiMaxModulator, settings: MultiMaxSettings, num_heads: int | None) -> bool:
    return (modulator.order, modulator.num_heads, modulator.affine) == (settings.order, num_heads, settings.affine)


def _is_untrained(modulator: MultiMaxModulator) -> bool:
    # Still on meta (being built by from_pretrained) or at identity.
    return modulator.t1.is_meta or modulator.is_identity()


def _detach(parent: torch.nn.Module, what: str) -> None:
    modulator = parent.multimax
    if not _is_untrained(modulator):
        logger.warning("Removing trained MultiMax scalars from %s: the new attention implementation does not use them.", what)
    del parent.multimax


def _has_modulator(module: torch.nn.Module | None) -> bool:
    return module is not None and isinstance(getattr(module, "multimax", None), MultiMaxModulator)


def _attention_modules(model: PreTrainedModel):
    """`(name, module, config)` of every module that calls transformers' AttentionInterface."""
    return [
        (name, module, getattr(module, "config", None) or model.config)
        for name, module in model.named_modules()
        if _calls_attention_interface(type(module))
    ]


def sync_methods(model: PreTrainedModel) -> None:
    """Attach or remove every method's learnable state to match the config (SparseMix, MultiMax)."""
    modules = _attention_modules(model)
    sync_sparsemix(model, modules)
    sync_multimax(model, modules)


def sync_multimax(model: PreTrainedModel, attention_modules=None) -> None:
    """Give every attention module whose config asks for MultiMax its scalars (identity init) and
    remove them where the config no longer asks; the same for the output head. Idempotent."""
    found_attention = False
    for name, module, config in attention_modules or _attention_modules(model):
        if not wants_multimax(config, model.config):
            if _has_modulator(module):
                _detach(module, name)
            continue
        found_attention = True
        settings = multimax_settings(config, fallback=model.config)
        heads = None
        if settings.per_head:
            heads = _num_heads(module)
            if heads is None:
                raise ValueError(
                    f"multimax.per_head=True but the number of heads of {name} ({type(module).__name__}) is unknown"
                )
        if _has_modulator(module):
            if _fits(module.multimax, settings, heads):
                module.multimax.backend = settings.backend
                continue
            if not _is_untrained(module.multimax):
                raise ValueError(
                    f"{name} holds trained MultiMax scalars ({module.multimax.extra_repr()}) that do not fit the "
                    f"settings {settings.to_dict()}; switch with set_attn_implementation('sdpa') first to drop them"
                )
        _attach(module, settings, heads)

    config = model.config
    head = output_head_of(model)
    if not (found_attention or wants_multimax(config)):
        if is_multimax_name(config.__dict__.get("attn_implementation")):
            delattr(config, "attn_implementation")
        if _has_modulator(head):
            _remove_head(head)
        return
    if not found_attention and any("Attention" in type(m).__name__ for m in model.modules()):
        raise ValueError(
            f"{type(model).__name__} asks for attn_implementation={config._attn_implementation!r} but none of its "
            "attention modules calls transformers' AttentionInterface, so MultiMax cannot be applied to it"
        )
    settings = multimax_settings(config)
    # Settings and the implementation name persist in config.json, so a reload needs no flags and a
    # load without the plugin fails loudly instead of running softmax.
    config.multimax = settings.to_dict()
    if is_multimax_name(config._attn_implementation):
        config.attn_implementation = ATTENTION_NAME
    # The scalars of a converted checkpoint are missing by design (identity init): no MISSING report.
    if isinstance(getattr(model, "_keys_to_ignore_on_load_missing", None), set):
        model._keys_to_ignore_on_load_missing.add(r"\.multimax\.")
    if head is not None and settings.output_head and not _has_modulator(head):
        _attach(head, settings, None)
        head._multimax_hook = head.register_forward_hook(_modulate_logits)
    elif _has_modulator(head) and not settings.output_head:
        _remove_head(head)


def _remove_head(head: torch.nn.Module) -> None:
    head._multimax_hook.remove()
    del head._multimax_hook
    _detach(head, "the output head")


def _post_init(self, *args, **kwargs):
    _ORIGINALS["post_init"](self, *args, **kwargs)
    sync_methods(self)


def _initialize_weights(self, module, is_custom_code: bool = False):
    if isinstance(module, MultiMaxModulator):
        if not getattr(module, "_is_hf_initialized", False):
            # Every MultiMax parameter is zero at identity. hf_init.zeros_ skips loaded tensors.
            for param in module.parameters(recurse=False):
                hf_init.zeros_(param)
            module._is_hf_initialized = True
        return
    if isinstance(module, SparseMixScorer):
        if not getattr(module, "_is_hf_initialized", False):
            # hf_init skips tensors that were loaded from the checkpoint.
            hf_init.normal_(module.w_query, std=module.init_std)
            hf_init.zeros_(module.w_key)
            module._is_hf_initialized = True
        return
    _ORIGINALS["_initialize_weights"](self, module, is_custom_code)


def _set_attn_implementation(self, attn_implementation, *args, **kwargs):
    result = _ORIGINALS["set_attn_implementation"](self, attn_implementation, *args, **kwargs)
    sync_methods(self)
    return result


def install_model_hooks() -> None:
    """Wrap the three `PreTrainedModel` methods (see module docstring). Idempotent."""
    if _ORIGINALS:
        return
    for name, wrapper in (
        ("post_init", _post_init),
        ("_initialize_weights", _initialize_weights),
        ("set_attn_implementation", _set_attn_implementation),
    ):
        original = getattr(PreTrainedModel, name)
        _ORIGINALS[name] = original
        setattr(PreTrainedModel, name, functools.wraps(original)(wrapper))
    for attr in ("multimax", "sparsemix"):
        if not hasattr(PreTrainedConfig, attr):
            setattr(PreTrainedConfig, attr, None)
