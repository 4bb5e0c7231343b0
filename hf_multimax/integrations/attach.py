"""Attach, keep or remove the methods' learnable layers so a model matches its config. Generic over
the method registry: nothing here knows MultiMax from SparseMix.

Attention modules are the modules that call transformers' attention function (it hands them over as
its `module` argument, where the attention functions look for their layers), or the modules named by
the method's `target_modules` setting. They are found from the classes a model declares as producing
its attentions (`_can_record_outputs["*attentions"]`, which transformers uses to record
`output_attentions`); see `attention_modules` for the rule. No source text is read.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import weakref

import torch
from huggingface_hub import try_to_load_from_cache
from safetensors import safe_open
from transformers import PreTrainedConfig, PreTrainedModel
from transformers.utils import CONFIG_NAME, SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

from ..layers.base import MethodLayer
from .methods import HEAD_LAYER_CLASSES, LAYER_CLASSES, METHODS, method_of

logger = logging.getLogger(__name__)

__all__ = ["attention_modules", "config_tree", "declared_attention_classes", "output_head_of", "reset_to_identity",
           "sync_model", "uses_plugin", "warn_unused_settings"]


def config_tree(config: PreTrainedConfig):
    """The config and its sub-configs, recursively."""
    yield config
    for key in getattr(config, "sub_configs", {}) or {}:
        sub = getattr(config, key, None)
        if isinstance(sub, PreTrainedConfig):
            yield from config_tree(sub)


def uses_plugin(config: PreTrainedConfig) -> bool:
    """Whether the config (or a sub-config) names a plugin method. Cheap: no module is visited."""
    return any(method_of(c.__dict__.get("_attn_implementation_internal")) is not None for c in config_tree(config))


def declared_attention_classes(model: torch.nn.Module) -> tuple[type, ...]:
    """The attention classes every `PreTrainedModel` in `model` declares in `_can_record_outputs`."""
    classes = [cls for module in model.modules() if isinstance(module, PreTrainedModel)
               for cls in declared_attention_classes_of(type(module))]
    return tuple(dict.fromkeys(classes))


@functools.cache
def declared_attention_classes_of(model_class: type) -> tuple[type, ...]:
    """The attention classes one model class declares in `_can_record_outputs`."""
    classes = []
    for name, spec in (getattr(model_class, "_can_record_outputs", None) or {}).items():
        if "attentions" not in name:
            continue
        for item in spec if isinstance(spec, (list, tuple)) else (spec,):
            cls = item if isinstance(item, type) else getattr(item, "target_class", None)
            if isinstance(cls, type):
                classes.append(cls)
    return tuple(dict.fromkeys(classes))


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules of `model` that call transformers' attention function, found from its declared
    attention classes (`declared_attention_classes`).

    A declared module is the caller when it holds a `config`: every caller in transformers picks the
    function with `ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, ...)`, so a
    module without one cannot call it. Some models declare a wrapper instead (T5's
    `T5LayerSelfAttention` holds a layer norm, a dropout and the `T5Attention` that calls the
    function; SAM's two-way block holds three attentions and an MLP): then the callers are the
    wrapper's outermost descendants that hold a `config` and an `is_causal` (what transformers' SDPA
    function reads from its `module`; set by 460 of the 470 callers in 5.25, and not by the MLPs that
    hold a config too). A model that declares no attention class at all (in 5.25 LongT5, Pix2Struct and
    Falcon, which record attentions by hand) is searched whole by that same rule.
    """
    declared = declared_attention_classes(model)
    if not declared:
        return list(_callers_below(model))
    found: dict[int, torch.nn.Module] = {}
    for module in model.modules():
        if isinstance(module, declared):
            # Swin declares its stage (which holds a config but no `is_causal`): the callers are below it.
            below = () if _holds_config(module) and hasattr(module, "is_causal") else tuple(_callers_below(module))
            for caller in below or ((module,) if _holds_config(module) else ()):
                found.setdefault(id(caller), caller)
    # A sub-model that holds none of the classes its own class declares (Cosmos3-Edge's vision model inherits
    # its text model's `_can_record_outputs`) is searched by the same rule as a model that declares none.
    for sub in model.modules():
        if isinstance(sub, PreTrainedModel):
            own = declared_attention_classes_of(type(sub))
            if own and not any(isinstance(m, own) for m in sub.modules()):
                for caller in _callers_below(sub):
                    found.setdefault(id(caller), caller)
    return list(found.values())


def _holds_config(module: torch.nn.Module) -> bool:
    return isinstance(getattr(module, "config", None), PreTrainedConfig)


def _callers_below(parent: torch.nn.Module):
    """The outermost descendants of `parent` that hold a config and an `is_causal` (not a model:
    `PreTrainedModel` holds both)."""
    for child in parent.children():
        if isinstance(child, MethodLayer):
            continue
        if _holds_config(child) and hasattr(child, "is_causal") and not isinstance(child, PreTrainedModel):
            yield child
        else:
            yield from _callers_below(child)


def output_head_of(model: PreTrainedModel) -> torch.nn.Module | None:
    """The module whose output is the model's logits: LM head, or classifier/score head."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        head = next((getattr(model, a) for a in ("classifier", "score") if isinstance(getattr(model, a, None), torch.nn.Module)), None)
    return head


def _layer_at(host: torch.nn.Module, attr: str):
    """The layer held at `host.<attr>`, possibly wrapped (PEFT's `ModulesToSaveWrapper` forwards
    attribute lookups to the active copy), or None."""
    value = host._modules.get(attr)
    return value if value is not None and hasattr(value, "structure") else None


class _Resolver:
    """Per distinct config: its method and every settings object its layers need, with the
    `"<method>:<backend>"` suffix folded into the settings and written back, so `config.<key>` is
    the one place the settings live from here on."""

    def __init__(self, root: PreTrainedConfig):
        self.root = root
        self._done: dict[int, tuple] = {}
        self(root)  # first: sub-configs that agree with it share its dicts

    def __call__(self, config: PreTrainedConfig):
        key = id(config)
        if key not in self._done:
            self._done[key] = self._resolve(config)
        return self._done[key]

    def _settings(self, cls, config, backend=None):
        key = cls.config_key
        own = values = config.__dict__.get(key)
        if values is None and config is not self.root:  # a sub-model inherits the top-level settings
            values = self.root.__dict__.get(key)
        settings = cls.from_dict(values)
        if backend is not None:
            settings = settings.replace(backend=backend)
        if values != settings.to_dict():  # defaults filled in, a backend folded in
            values = settings.to_dict()
        if config is not self.root and values == self.root.__dict__.get(key):
            values = self.root.__dict__[key]
        # Written to this config only (a sub-config may hold its own settings); settings equal to the
        # top-level ones share its dict, so an in-place edit of it reaches every sub-model.
        if own is not values:
            config.__dict__[key] = values
        return settings

    def _resolve(self, config):
        name = config.__dict__.get("_attn_implementation_internal")
        method = method_of(name)
        if method is None:
            if method_of(config.__dict__.get("attn_implementation")) is not None:
                del config.attn_implementation  # persisted by an earlier switch to a plugin method
            return None, None, {}
        backend = name.split(":", 1)[1] if ":" in name else None  # "multimax:auto" sets "auto" too
        own = self._settings(method.settings, config, backend) if method.settings is not None else None
        layers = {cls: own if cls.settings_cls is method.settings else self._settings(cls.settings_cls, config)
                  for cls in (method.layers(own) if own is not None else ())}
        # The backend now lives in the settings; the bare name keeps one source of truth.
        config._attn_implementation_internal = method.name
        # Persisted in config.json (transformers strips the internal name on save), so a reload needs no
        # flags and a load without the plugin fails loudly instead of running softmax.
        config.attn_implementation = method.name
        return method, own, layers


def sync_model(model: PreTrainedModel) -> None:
    """Give every attention module the layers its config's method needs (identity init), keep those
    that fit, remove those no longer asked for; the same for the method's output-head layer. Idempotent.
    Refuses, before changing anything, to drop or reshape trained parameters."""
    resolve = _Resolver(model.config)
    declared = declared_attention_classes(model)
    callers = {id(m) for m in attention_modules(model)}
    head = output_head_of(model)
    counts: dict[str, int] = {}
    attached: dict[str, type[MethodLayer]] = {}
    to_attach, to_detach, host_hooks = [], [], []
    for path, module in model.named_modules():
        if module is head or isinstance(module, MethodLayer) or hasattr(module, "original_module"):
            continue
        if module is not model and "_hf_multimax_guard" in module.__dict__:  # the outermost model guards
            module.__dict__.pop("_hf_multimax_guard").remove()
        config = getattr(module, "config", None)
        method, settings, layers = resolve(config if isinstance(config, PreTrainedConfig) else model.config)
        if settings is not None and settings.target_modules is not None:
            is_attention = settings.targets(path)
        else:
            is_attention = id(module) in callers
        if not is_attention:
            layers = {}
        elif method is not None:
            counts[method.name] = counts.get(method.name, 0) + 1
        for cls in LAYER_CLASSES:
            if cls in layers:
                to_attach.append((module, cls, layers[cls], path))
                attached[cls.attr] = cls
            elif _layer_at(module, cls.attr) is not None:
                to_detach.append((module, cls, path))
        host_hooks.append((module, method.host_hook if method is not None and is_attention else None))

    root_method, root_settings, root_layers = resolve(model.config)
    head_cls = root_method.output_head if root_method is not None else None  # declared on its Method entry
    head_settings = root_layers.get(head_cls)
    head_attached = next((c for c in HEAD_LAYER_CLASSES if head is not None and _layer_at(head, c.attr) is not None),
                         None)
    if head_attached and not (head_attached is head_cls and head_settings and head_settings.output_head):
        to_detach.append((head, head_attached, "the output head"))
    _refuse_to_lose_training(to_attach, to_detach)
    saved = _checkpoint_shapes(getattr(model.config, "_name_or_path", "") or "")
    for module, cls, settings, path in to_attach:
        _ensure(module, cls, settings, path, _saved_shapes(saved, path, cls.attr))
    for module, cls, path in to_detach:
        if module is head:
            head._multimax_hook.remove()
            del head._multimax_hook
        delattr(module, cls.attr)
    for module, hook in host_hooks:
        _set_host_hook(module, hook)

    # With target_modules a nested model (LlamaModel inside LlamaForCausalLM) may match nothing on its
    # own paths; an attention module left without its layer then raises at its first forward.
    # A composite model whose sub-configs all name another implementation (transformers accepts
    # `{"": "multimax", "text_config": "eager", ...}`) has no module the top-level name governs: nothing to attach.
    subs = [c for c in config_tree(model.config) if c is not model.config]
    governs_nothing = bool(subs) and all(method_of(c.__dict__.get("_attn_implementation_internal")) is None for c in subs)
    if (root_layers and not counts.get(root_method.name) and root_settings.target_modules is None and not governs_nothing
            and not _built_inside_another(model)):
        where = (f"none of its modules is one of {[c.__name__ for c in declared]}" if declared else f"{type(model).__name__} declares no attention classes (_can_record_outputs["
                 "'attentions']) and holds no module with a `config` and an `is_causal`")
        raise ValueError(
            f"attn_implementation={root_method.name!r} found no attention module to attach to: {where}. Name the "
            f"modules that call transformers' AttentionInterface with config.{root_method.name}"
            "['target_modules'] (a list of names or a regex on the full module path, as in PEFT)"
        )
    saved_settings = _saved_settings_keys(model.config._name_or_path or "") if saved else set()
    for attr, cls in attached.items():
        if any(f".{attr}." in key for key in saved):
            continue  # a checkpoint that holds some of them must hold all: transformers reports the rest
        if cls.settings_cls.config_key in saved_settings:
            _warn_lost_layers(model, cls, [path for _, c, _, path in to_attach if c is cls])
        else:
            # Converting a plain checkpoint: its layers are missing by design (identity init), not worth a
            # MISSING report.
            model._keys_to_ignore_on_load_missing.add(rf"\.{attr}\.")
    if head is not None and head_settings is not None and head_settings.output_head and not head_attached:
        head_path = next(path for path, module in model.named_modules() if module is head)
        _ensure(head, head_cls, head_settings.replace(per_head=False), head_path,
                _saved_shapes(saved, head_path, head_cls.attr))
        head._multimax_hook = head.register_forward_hook(functools.partial(_modulate_logits, cls=head_cls,
                                                                           config=model.config))
    _declare_fp32_layers(model)
    guard = model.__dict__.get("_hf_multimax_guard")
    if attached and guard is None:
        model._hf_multimax_guard = model.register_forward_pre_hook(_check_config_at_forward)
    elif not attached and guard is not None:
        guard.remove()
        del model._hf_multimax_guard


def _built_inside_another(model: PreTrainedModel) -> bool:
    """Whether `model` is a sub-model being built in another model's `__init__` (a composite model's vision
    tower, VQ-VAE or audio encoder, whose post_init runs first): the outer model's post_init checks the
    whole, whose attention may all be in its other sub-models."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "__init__":
            owner = frame.f_locals.get("self")
            if owner is not model and isinstance(owner, PreTrainedModel):
                return True
        frame = frame.f_back
    return False


def _declare_fp32_layers(model: PreTrainedModel) -> None:
    """Name the attached layers (by attribute: `multimax`, `sparsemix`) in each model's
    `_keep_in_fp32_modules_strict`, and only those.

    The layers are created in fp32 and stay so under `from_pretrained(dtype=float16 or bfloat16)`: a
    handful of numbers that steer every score. transformers keeps a parameter in fp32 at load, and
    expects it to be fp32 (its `test_keep_in_fp32_modules`), exactly where those lists name it; the
    strict list applies to both half dtypes. Set on the instances (post_init made them per-instance
    sets), never on the classes: another model of the same class may not use the plugin.
    """
    ours = {cls.attr for cls in LAYER_CLASSES}
    for module in model.modules():
        if not isinstance(module, PreTrainedModel):
            continue
        present = {type(m).attr for m in module.modules() if isinstance(m, MethodLayer)}
        keep = set(getattr(module, "_keep_in_fp32_modules_strict", None) or ())
        module._keep_in_fp32_modules_strict = (keep - ours) | present


def _set_host_hook(module: torch.nn.Module, hook) -> None:
    """Register the method's forward pre-hook (with kwargs) on an attention module, or remove it."""
    current = module.__dict__.get("_hf_multimax_host_hook")
    if current is not None and current[0] is hook:
        return
    if current is not None:
        current[1].remove()
        del module.__dict__["_hf_multimax_host_hook"]
    if hook is not None:
        module.__dict__["_hf_multimax_host_hook"] = (hook, module.register_forward_pre_hook(hook, with_kwargs=True))


def _check_config_at_forward(model, args):
    """What the attention functions cannot see from inside the model, checked by the outermost one."""
    for cls in HEAD_LAYER_CLASSES:
        values = model.config.__dict__.get(cls.settings_cls.config_key)  # what the property returns, read directly
        if not (values and cls.settings_cls.from_dict(values).output_head):
            continue
        head = output_head_of(model)
        if head is not None and _layer_at(head, cls.attr) is not None:
            continue
        key = cls.settings_cls.config_key
        raise ValueError(
            f"config.{key}['output_head'] is True but {type(model).__name__} has no {cls.title} on its "
            + (f"output head; apply the change with model.set_attn_implementation('{key}')" if head is not None else
               "output head, as it has none (an LM head, `classifier` or `score`); set output_head=False")
        )
    # transformers 5 builds models around the config object it is given: a second model built from
    # the same object with another attention switches this one too, leaving its layers unused.
    if not uses_plugin(model.config) and model not in _WARNED_UNUSED:
        _WARNED_UNUSED.add(model)
        logger.warning(
            "%s holds plugin parameters but its config now says attn_implementation=%r, so they are not used. Was "
            "another model built from the same config object? Build each model from its own config "
            "(copy.deepcopy(config)), or switch back with model.set_attn_implementation(...).",
            type(model).__name__, model.config._attn_implementation,
        )


# Models already warned that their layers are unused (once per model, kept beside it, not on it).
_WARNED_UNUSED: weakref.WeakSet = weakref.WeakSet()


def warn_unused_settings(config: PreTrainedConfig) -> None:
    """Settings given for a method the config does not use would otherwise be dropped without a word."""
    for method in METHODS.values():
        if method.settings is not None and getattr(config, method.name, None) is not None:
            _warn_once(
                f"config.{method.name} is set but attn_implementation={config._attn_implementation!r} does not use it, so "
                f"it is ignored; load with attn_implementation={method.name!r} to use it."
            )


@functools.cache
def _warn_once(message: str) -> None:  # nested models run post_init once each
    logger.warning(message)


def _checkpoint_file(name_or_path: str, name: str) -> str | None:
    """The local path of the file `name` of the checkpoint `from_pretrained` is loading: in its folder,
    or for a Hub id in the cache (from_pretrained fetches config and weights before building the model)."""
    if not name_or_path:
        return None
    if os.path.isdir(name_or_path):
        path = os.path.join(name_or_path, name)
    else:
        try:
            path = try_to_load_from_cache(name_or_path, name)
        except ValueError:  # not a valid repo id either
            return None
    return path if isinstance(path, str) and os.path.isfile(path) else None


def _checkpoint_shapes(name_or_path: str) -> dict[str, tuple]:
    """Name -> shape of the tensors of the safetensors checkpoint `from_pretrained` is loading (read
    from the headers: cheap, and never cached, as a folder can be saved again), or nothing when there
    is no local or cached checkpoint (a model built from a config)."""
    files = []
    for name in (SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME):
        path = _checkpoint_file(name_or_path, name)
        if path is None:
            continue
        if name == SAFE_WEIGHTS_INDEX_NAME:
            with open(path) as f:
                shards = set(json.load(f)["weight_map"].values())
            files = [os.path.join(os.path.dirname(path), shard) for shard in sorted(shards)]
            break
        files.append(path)
    shapes = {}
    for path in files:
        with safe_open(path, "pt") as f:
            shapes.update({key: tuple(f.get_slice(key).get_shape()) for key in f.keys()})
    return shapes


def _saved_settings_keys(name_or_path: str) -> set[str]:
    """The settings keys (`"multimax"`, `"sparsemix"`) that the checkpoint's config.json holds, at its top
    level or in a sub-config: written there by the plugin when it saved the model."""
    path = _checkpoint_file(name_or_path, CONFIG_NAME)
    if path is None:
        return set()
    with open(path) as f:
        stack, keys = [json.load(f)], set()
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            keys.update(key for key in node if isinstance(node[key], dict))
            stack.extend(node.values())
    return keys & {method.settings.config_key for method in METHODS.values() if method.settings is not None}


_LOST_REPORTED: set[tuple[str, str]] = set()


def _warn_lost_layers(model: PreTrainedModel, cls: type[MethodLayer], paths: list[str]) -> None:
    """A checkpoint saved with the plugin's settings whose weights hold none of the layers (they are left
    out of the ignore list, so transformers' load report lists them as MISSING): say what that means."""
    key = (model.config._name_or_path, cls.attr)
    if key in _LOST_REPORTED:  # a nested model's post_init (LlamaModel in LlamaForCausalLM) found them first
        return
    _LOST_REPORTED.add(key)
    shown = ", ".join(f"{p}.{cls.attr}" for p in paths[:2]) + (f" and {len(paths) - 2} more" if len(paths) > 2 else "")
    logger.warning(
        f"{model.config._name_or_path}: config.json holds the plugin's {cls.settings_cls.config_key!r} settings, "
        f"so it was saved with its {cls.title}, but its weights hold none of them ({len(paths)} layers: {shown}). "
        f"They start at identity: whatever training they had is lost, and the model computes what it computed "
        f"before any {cls.title} were trained. "
        "Were the weights saved or converted by something that drops the plugin's tensors (a filtered state dict, "
        "a conversion script)? Save with model.save_pretrained to keep them."
    )


def _refuse_to_lose_training(to_attach, to_detach) -> None:
    lost = [f"{path} holds trained {cls.title}, which the new attention does not use"
            for module, cls, path in to_detach if not _layer_at(module, cls.attr).is_untrained()]
    for module, cls, settings, path in to_attach:
        existing, wanted = _layer_at(module, cls.attr), cls.structure_for(settings, module)
        if existing is not None and existing.structure != wanted and not existing.is_untrained():
            lost.append(f"{path} holds trained {cls.title} {existing.structure} that do not fit the settings "
                        f"{settings.to_dict()} ({wanted})")
    if lost:
        raise ValueError(
            f"Refused: {'; '.join(lost[:2])}{f' (and {len(lost) - 2} more)' if len(lost) > 2 else ''}. "
            "Keep the model's attention implementation and settings (continuous batching switches to flash "
            "attention where it can: pass auto_switch_to_flash=False to keep them), or drop the training on purpose "
            "with hf_multimax.reset_to_identity(model) first"
        )


def _saved_shapes(saved: dict[str, tuple], path: str, attr: str) -> dict[str, tuple]:
    """The checkpoint's shapes of the layer at `path.attr`, by parameter name. Module names are
    matched by suffix either way: a nested model (LlamaModel in LlamaForCausalLM) names its modules
    without the outer prefix, and a base model's checkpoint lacks the head model's prefix."""
    layer = f".{path}.{attr}"
    shapes = {}
    for key, shape in saved.items():
        module, name = key.rsplit(".", 1) if "." in key else ("", key)
        if (f".{module}").endswith(layer) or layer.endswith(f".{module}"):
            shapes[name] = shape
    return shapes


def _ensure(host: torch.nn.Module, cls: type[MethodLayer], settings, path: str, saved: dict | None = None) -> None:
    existing = _layer_at(host, cls.attr)
    wanted = cls.structure_for(settings, host)
    if existing is not None and existing.structure == wanted:
        return
    ref = next(host.parameters(), None)
    layer = cls(*wanted)
    if saved:
        layer.use_saved_shapes(saved)
    if ref is not None:  # meta while from_pretrained builds: initialised there with the loaded weights
        layer = layer.to(ref.device)
    setattr(host, cls.attr, layer)


def reset_to_identity(model: torch.nn.Module) -> int:
    """Reset every plugin layer of `model` to identity (the model then computes what it computed
    without the plugin's training), so switching attention may drop them. Returns how many."""
    layers = [m for m in model.modules() if isinstance(m, MethodLayer)]
    with torch.no_grad():
        for layer in layers:
            layer.reset_parameters()
    return len(layers)


def _modulate_logits(head, args, output, *, cls, config):
    if not cls.settings_cls.from_config(config).output_head:
        key = cls.settings_cls.config_key
        raise ValueError(
            f"config.{key}['output_head'] is False but the output head holds {cls.title}; apply the change "
            f"with model.set_attn_implementation('{key}')"
        )
    return getattr(head, cls.attr)(output)
