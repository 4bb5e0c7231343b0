"""What every method's settings dataclass shares: a dict form stored in the model config under
`config_key`, which is also the method's attention implementation name."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping

__all__ = ["ConfigSettings"]


class ConfigSettings:
    """Mixin for a settings dataclass kept as `config.<config_key>` (a JSON-able dict)."""

    config_key: ClassVar[str]

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | "ConfigSettings" | None):
        if values is None:
            return cls()
        if isinstance(values, cls):
            return values
        if not isinstance(values, Mapping):
            raise ValueError(f"{cls.config_key} settings must be a dict or {cls.__name__}, got {type(values).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - fields)
        if unknown:
            raise ValueError(f"unknown {cls.config_key} setting(s) {unknown}; allowed keys: {sorted(fields)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_config(cls, config, fallback=None):
        """The validated settings in `config.<config_key>` (else in `fallback`'s: a sub-model's config
        inherits the top-level settings), with the backend named in the attention implementation
        string (`"<config_key>:<backend>"`) taking precedence."""
        values = getattr(config, cls.config_key, None)
        if values is None and fallback is not None:
            values = getattr(fallback, cls.config_key, None)
        settings = cls.from_dict(values)
        name = config._attn_implementation
        if cls.is_own_name(name) and ":" in name:
            settings = cls(**{**settings.to_dict(), "backend": name.split(":", 1)[1]})
        return settings

    @classmethod
    def is_own_name(cls, name) -> bool:
        """`name` is this method's attention implementation (`"<config_key>"` or `"<config_key>:<backend>"`)."""
        return isinstance(name, str) and (name == cls.config_key or name.startswith(cls.config_key + ":"))
