"""The few transformers internals the zero-code path wraps (`import hf_multimax`, then
`from_pretrained(path, attn_implementation="multimax")`, a saved checkpoint reloaded from its config,
continuous batching and `transformers serve`), checked against the installed version and undone by
`uninstall()`. Each wrapper is a call-through that returns at once for a config naming no plugin
method; each says in one line why transformers offers no public hook for it. Nothing is wrapped only
to improve a message: an unknown name (`"multimax:nope"`) gets transformers' own refusal, and
`from_config` takes settings through the config (`config.multimax = {...}`), as the model's
`__init__` refuses unknown kwargs.

`PreTrainedModel`:

- `post_init` (the last step of every HF model's `__init__`): attach the methods' layers, so they
  exist before `from_pretrained` loads weights and before any optimizer is built;
- `_initialize_weights`: `from_pretrained` materialises missing keys with `torch.empty_like` and
  initialises them through the nearest `PreTrainedModel`'s `_init_weights`, which does not know our
  layers; without this a checkpoint that lacks them would load garbage;
- `set_attn_implementation`: switching to or from a plugin method attaches or removes the layers;
- `from_pretrained`, and `PreTrainedConfig.from_dict` (the Auto classes load the config through it):
  `attn_implementation=None` (what `transformers serve` and other loaders pass when the user named
  none) is read as "the saved one" for a checkpoint whose `config.json` names a plugin method, where
  transformers would write the None over it, load softmax and drop the trained layers as unexpected
  keys. For a config loaded from a checkpoint, None and no kwarg are the same except for a saved name.

Continuous batching (`generate_batch`, `transformers serve --continuous-batching`) lets only eager,
sdpa and flash through, and builds its block-diagonal mask of the packed requests for eager and sdpa
alone:

- `ContinuousBatchingManager.switch_to_cb_friendly_attn`: keeps the plugin's implementation (the
  original raises for it, or would switch to flash and drop trained scalars);
- `attn_mask_is_needed` (as `input_outputs` imported it): the packed batch's mask is built for the
  plugin too, so no request attends another's tokens.

`PreTrainedConfig.multimax` / `.sparsemix` become properties (None by default): known config
attributes, so `from_pretrained(path, attn_implementation="multimax", multimax={...})` reaches the
config, and setting one on a composite model's config sets it on every sub-config too (as
transformers does for `_attn_implementation`), since each attention module reads its own config.
"""

from __future__ import annotations

import inspect

import transformers
from transformers import PreTrainedConfig, PreTrainedModel
from transformers import initialization as hf_init
from transformers.generation.continuous_batching import continuous_api as cb_api
from transformers.generation.continuous_batching import input_outputs as cb_inputs

from ..layers.base import MethodLayer
from .attach import config_tree, sync_model, uses_plugin, warn_unused_settings
from .methods import METHODS, method_of

__all__ = ["check_transformers", "install_hooks", "uninstall_hooks"]

# The private signatures wrapped below, as the versions this plugin was built for have them.
EXPECTED_SIGNATURES = {
    "post_init": ["self"],
    "_initialize_weights": ["self", "module", "is_custom_code"],
    "set_attn_implementation": ["self", "attn_implementation", "allow_all_kernels"],
    # Only its first argument and its **kwargs are relied on ("..." stands for any in between).
    "from_pretrained": ["pretrained_model_name_or_path", "...", "kwargs"],
}
# Continuous batching's, by (owner, name): the manager's method and the module-level function.
CB_SIGNATURES = {
    (cb_api.ContinuousBatchingManager, "switch_to_cb_friendly_attn"): ["self", "model", "auto_switch_to_flash"],
    (cb_inputs, "attn_mask_is_needed"): ["config"],
}
CONFIG_SIGNATURES = {"from_dict": ["config_dict", "kwargs"]}
_ORIGINALS: dict[str, object] = {}
_CONFIG_ORIGINALS: dict[str, object] = {}
_CB_ORIGINALS: dict[tuple, object] = {}
_CONFIG_ATTRS: list[str] = []


def _matches(found: list[str] | None, expected: list[str]) -> bool:
    if found is None or "..." not in expected:
        return found == expected
    return found[:1] == expected[:1] and found[-1:] == expected[-1:]


def check_transformers() -> None:
    """Raise if the installed transformers lacks the internals the hooks wrap, naming the version."""
    problems = []
    for name, expected in EXPECTED_SIGNATURES.items():
        # The originals once installed; bound (no `cls`) for classmethods.
        method = _ORIGINALS[name].__get__(None, PreTrainedModel) if name in _ORIGINALS else getattr(PreTrainedModel, name, None)
        found = list(inspect.signature(method).parameters) if callable(method) else None
        if not _matches(found, expected):
            problems.append(f"PreTrainedModel.{name}{tuple(found) if found else ' is missing'} (expected {tuple(expected)})")
    for name, expected in CONFIG_SIGNATURES.items():
        method = (_CONFIG_ORIGINALS[name].__get__(None, PreTrainedConfig) if name in _CONFIG_ORIGINALS
                  else getattr(PreTrainedConfig, name, None))
        found = list(inspect.signature(method).parameters) if callable(method) else None
        if found != expected:
            problems.append(f"PreTrainedConfig.{name}{tuple(found) if found else ' is missing'} (expected {tuple(expected)})")
    for (owner, name), expected in CB_SIGNATURES.items():
        function = _CB_ORIGINALS.get((owner, name), getattr(owner, name, None))
        found = list(inspect.signature(function).parameters) if callable(function) else None
        if found != expected:
            problems.append(f"{owner.__name__}.{name}{tuple(found) if found else ' is missing'} (expected {tuple(expected)})")
    if not isinstance(getattr(PreTrainedConfig, "_attn_implementation", None), property):
        problems.append("PreTrainedConfig._attn_implementation is not a property")
    if problems:
        raise ImportError(
            f"hf_multimax cannot hook into transformers {transformers.__version__}: " + "; ".join(problems)
            + ". Install a supported version: pip install 'transformers>=5.24,<6'"
        )


# No public hook: transformers has no "model built with attention X" callback; post_init ends every __init__.
def _post_init(self, *args, **kwargs):
    _ORIGINALS["post_init"](self, *args, **kwargs)
    if uses_plugin(self.config):
        sync_model(self)
    else:
        warn_unused_settings(self.config)


# No public hook: missing keys are initialised through the model class's own _init_weights, which knows no plugin layer.
def _initialize_weights(self, module, is_custom_code: bool = False):
    if not isinstance(module, MethodLayer):
        return _ORIGINALS["_initialize_weights"](self, module, is_custom_code)
    module.restore_shapes()  # after from_pretrained loaded an older checkpoint's 0-dim tensors
    if not getattr(module, "_is_hf_initialized", False):
        module.reset_parameters(init=hf_init)  # transformers' initialisers skip tensors loaded from the checkpoint
        module._is_hf_initialized = True


# No public hook: a runtime switch of attention only rewrites the config; nothing is told to add or drop layers.
def _set_attn_implementation(self, attn_implementation, *args, **kwargs):
    # What the configs said before: restored if the layers refuse the switch (trained parameters).
    keys = ("_attn_implementation_internal", "attn_implementation", *METHODS)
    before = [(c, {k: c.__dict__[k] for k in keys if k in c.__dict__}) for c in config_tree(self.config)]
    result = _ORIGINALS["set_attn_implementation"](self, attn_implementation, *args, **kwargs)
    if uses_plugin(self.config) or any(isinstance(m, MethodLayer) for m in self.modules()):
        try:
            sync_model(self)
        except ValueError:
            for config, saved in before:
                for key in keys:
                    config.__dict__.pop(key, None)
                config.__dict__.update(saved)
            raise
    return result


# No public hook: from_pretrained writes attn_implementation=None over a checkpoint's saved implementation.
def _from_pretrained(cls, *args, **kwargs):
    if "attn_implementation" in kwargs and kwargs["attn_implementation"] is None:
        config = kwargs.get("config")
        if not isinstance(config, PreTrainedConfig) or uses_plugin(config):
            kwargs.pop("attn_implementation")  # the loaded (or given) config's own choice stands
    return _ORIGINALS["from_pretrained"].__func__(cls, *args, **kwargs)


# No public hook: the Auto classes build the config through from_dict, which takes None as a choice (as above).
def _config_from_dict(cls, config_dict, **kwargs):
    if ("attn_implementation" in kwargs and kwargs["attn_implementation"] is None
            and method_of(config_dict.get("attn_implementation")) is not None):
        kwargs.pop("attn_implementation")  # None means "not chosen": the checkpoint's own method stands
    return _CONFIG_ORIGINALS["from_dict"].__func__(cls, config_dict, **kwargs)


# No public hook: continuous batching accepts a fixed list of implementations, with no registration point.
def _switch_to_cb_friendly_attn(self, model, auto_switch_to_flash: bool = True):
    if uses_plugin(model.config):
        return None  # the plugin's functions take the packed batch as sdpa's does: nothing to switch
    return _CB_ORIGINALS[(cb_api.ContinuousBatchingManager, "switch_to_cb_friendly_attn")](self, model, auto_switch_to_flash)


# No public hook: the packed batch's mask is built only for implementations this function names (eager, sdpa).
def _attn_mask_is_needed(config) -> bool:
    return uses_plugin(config) or _CB_ORIGINALS[(cb_inputs, "attn_mask_is_needed")](config)


_CB_WRAPPERS = {
    (cb_api.ContinuousBatchingManager, "switch_to_cb_friendly_attn"): _switch_to_cb_friendly_attn,
    (cb_inputs, "attn_mask_is_needed"): _attn_mask_is_needed,
}


# No public hook: from_pretrained hands a kwarg to the config only if the config class knows the attribute.
def _settings_property(key: str) -> property:
    def get(config):
        return config.__dict__.get(key)

    def set_(config, value):
        for c in config_tree(config):
            c.__dict__[key] = value

    def delete(config):
        config.__dict__.pop(key, None)

    return property(get, set_, delete, doc=f"The {key} settings (a dict), set on every sub-config too.")


def install_hooks() -> None:
    """Wrap the methods (see the module docstring), once."""
    if _ORIGINALS:
        return
    check_transformers()
    for name, wrapper in (
        ("post_init", _post_init),
        ("_initialize_weights", _initialize_weights),
        ("set_attn_implementation", _set_attn_implementation),
        ("from_pretrained", classmethod(_from_pretrained)),
    ):
        original = PreTrainedModel.__dict__[name]
        _ORIGINALS[name] = original
        setattr(PreTrainedModel, name, wrapper)
    _CONFIG_ORIGINALS["from_dict"] = PreTrainedConfig.__dict__["from_dict"]
    PreTrainedConfig.from_dict = classmethod(_config_from_dict)
    for (owner, name), wrapper in _CB_WRAPPERS.items():
        _CB_ORIGINALS[(owner, name)] = getattr(owner, name)
        setattr(owner, name, wrapper)
    for method in METHODS.values():
        if method.settings is not None and not hasattr(PreTrainedConfig, method.name):
            setattr(PreTrainedConfig, method.name, _settings_property(method.name))
            _CONFIG_ATTRS.append(method.name)


def uninstall_hooks() -> None:
    """Put the original methods back. Models built meanwhile keep their layers."""
    for name, original in _ORIGINALS.items():
        setattr(PreTrainedModel, name, original)
    _ORIGINALS.clear()
    for name, original in _CONFIG_ORIGINALS.items():
        setattr(PreTrainedConfig, name, original)
    _CONFIG_ORIGINALS.clear()
    for (owner, name), original in _CB_ORIGINALS.items():
        setattr(owner, name, original)
    _CB_ORIGINALS.clear()
    for attr in _CONFIG_ATTRS:
        delattr(PreTrainedConfig, attr)
    _CONFIG_ATTRS.clear()
