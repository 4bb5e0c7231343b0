"""What every method's settings dataclass shares: a dict form stored in the model config under
`config_key`, which is also the method's attention implementation name, and which modules the
method applies to (`target_modules`)."""

from __future__ import annotations

import copy
import dataclasses
import functools
import re
from typing import Any, ClassVar, Mapping

import torch

__all__ = ["ConfigSettings"]


@dataclasses.dataclass(frozen=True)
class ConfigSettings:
    """Base of a frozen settings dataclass kept as `config.<config_key>` (a JSON-able dict).

    Args:
        target_modules (`list[str]` or `str`, *optional*): where the attention modules are, for a
            model that does not declare them: as in PEFT, a list of names (a module matches when its
            dotted path equals a name or ends with `.<name>`) or one regular expression (matched
            against the whole path). It must match every module that calls the attention function
            (the method applies to the whole model; one left out raises at its first forward).
            Default: `None`, the attention classes the model declares (`_can_record_outputs["attentions"]`).
    """

    config_key: ClassVar[str]

    target_modules: list[str] | str | None = None

    def __post_init__(self):
        value = self.target_modules
        if value is None:
            return
        if isinstance(value, str):
            try:
                re.compile(value)
            except re.error as err:
                raise ValueError(f"{self.config_key}.target_modules={value!r} is not a valid regular expression: {err}")
        elif not (isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value)):
            raise ValueError(
                f"{self.config_key}.target_modules={value!r} must be a non-empty list of module names or a regex string"
            )
        else:
            object.__setattr__(self, "target_modules", list(value))

    def targets(self, path: str) -> bool:
        """Whether the module at dotted `path` is one of `target_modules` (which must be set)."""
        if isinstance(self.target_modules, str):
            return re.fullmatch(self.target_modules, path) is not None
        return any(path == name or path.endswith("." + name) for name in self.target_modules)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | "ConfigSettings" | None):
        compiling = torch.compiler.is_compiling()
        if not compiling and type(values) is dict:
            # Fast path, asked by every layer for every token (first: it skips the type checks below):
            # the same dict object, still equal to what it held when parsed, with values of the same
            # types (True == 1, but only one is valid).
            seen = _LAST_SEEN.get((cls, id(values)))
            if (seen is not None and seen[0] is values and seen[2] == tuple(map(type, values.values()))
                    and seen[1] == values):
                return seen[3]
        if values is None:
            return cls()
        if isinstance(values, cls):
            return values
        if not isinstance(values, Mapping):
            raise ValueError(f"{cls.config_key} settings must be a dict or {cls.__name__}, got {type(values).__name__}")
        try:
            # The type is part of the key: True == 1 and hash alike, but only one of them is valid.
            key = tuple(sorted((k, type(v).__name__, tuple(v) if isinstance(v, list) else v) for k, v in values.items()))
            hash(key)
        except TypeError:  # an unhashable value: validate without the cache (it will be refused or fine)
            return cls._from_items(tuple((k, type(v).__name__, v) for k, v in values.items()))
        # Attention functions read the settings from the config on every call: parse each distinct
        # dict once (the settings are frozen, so sharing them is safe).
        if compiling:
            return _parse_in_graph(cls, key)
        settings = _parse(cls, key)
        if len(_LAST_SEEN) > 256:
            _LAST_SEEN.clear()
        _LAST_SEEN[(cls, id(values))] = (values, copy.deepcopy(dict(values)), tuple(map(type, values.values())), settings)
        return settings

    @classmethod
    def _from_items(cls, items):
        values = {k: list(v) if k == "target_modules" and isinstance(v, tuple) else v for k, _, v in items}
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - fields)
        if unknown:
            raise ValueError(f"unknown {cls.config_key} setting(s) {unknown}; allowed keys: {sorted(fields)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        if values["target_modules"] is None:  # the default: keep config.json as it was without it
            del values["target_modules"]
        return values

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_config(cls, config):
        """The validated settings in `config.<config_key>` (defaults where it is None or absent)."""
        return cls.from_dict(getattr(config, cls.config_key, None))


# (settings class, id of a config's dict) -> (the dict, a copy of it, its value types, settings). The
# dict is held, so its id cannot be reused while the entry lives.
_LAST_SEEN: dict[tuple, tuple] = {}


@functools.lru_cache(maxsize=256)
def _parse(cls, key):
    return cls._from_items(key)


@torch.compiler.assume_constant_result
def _parse_in_graph(cls, key):
    # Under torch.compile this runs at trace time and its result is a constant of the graph; the key
    # was built in traced code, so the graph is guarded on the config dict's values and a change of
    # them recompiles.
    return _parse(cls, key)
