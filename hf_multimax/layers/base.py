"""What every method's learnable module shares, so the integration code attaches, checks and
initialises them without knowing which method it is looking at (PEFT's layer idea)."""

from __future__ import annotations

from typing import Any, ClassVar

from torch import nn

__all__ = ["MethodLayer", "num_heads_of"]


def num_heads_of(module: nn.Module) -> int | None:
    """Query heads of an HF attention module: its attribute (names differ by model), else its config."""
    for attr in ("num_heads", "num_attention_heads", "n_heads"):
        value = getattr(module, attr, None)
        if isinstance(value, int):
            return value
    return getattr(getattr(module, "config", None), "num_attention_heads", None)


class MethodLayer(nn.Module):
    """Learnable state a method attaches to a host module (an attention module or an output head).

    The host holds it as `host.<attr>`, so every parameter's key contains `.<attr>.` (one key prefix:
    easy to save, filter, put in `modules_to_save`). Subclasses define:

    - `attr`: the attribute name on the host;
    - `settings_cls`: the settings (config key) its structure follows; `title`: its name in messages;
    - `structure_for(settings, host)`: what the settings and host require (shapes, flags), compared
      with `structure` to decide whether an attached layer still fits; `cls(*structure)` builds one;
    - `reset_parameters(init)`: identity init (attaching is a numerical no-op) with the initialisers of
      `init` (`torch.nn.init`, or transformers' guarded ones that skip loaded tensors);
    - `is_identity()`: the layer still computes what the model computed without it.

    The attention functions get the parameters by calling the layer (`host.<attr>()`), never by
    reading them: wrappers (PEFT `modules_to_save`, FSDP, DeepSpeed ZeRO-3) hand out the live
    parameters in `forward`.
    """

    attr: ClassVar[str]
    settings_cls: ClassVar[type]
    title: ClassVar[str]  # what messages call it

    @property
    def structure(self) -> Any:
        raise NotImplementedError

    @classmethod
    def structure_for(cls, settings, host: nn.Module) -> Any:
        raise NotImplementedError

    def reset_parameters(self, init=nn.init) -> None:
        raise NotImplementedError

    def is_identity(self) -> bool:
        raise NotImplementedError

    def use_saved_shapes(self, saved: dict[str, tuple]) -> None:
        """Take the shapes a checkpoint stored for `[1]` parameters it saved as 0-dim (written before
        parameters became 1-D), so that loading it fits; `restore_shapes` turns them back after."""
        for name, param in list(self._parameters.items()):
            if param is not None and tuple(param.shape) == (1,) and saved.get(name) == ():
                self._parameters[name] = nn.Parameter(param.reshape(()), requires_grad=param.requires_grad)

    def restore_shapes(self) -> None:
        """0-dim parameters (from `use_saved_shapes`, now loaded) back to `[1]`, values kept."""
        for name, param in list(self._parameters.items()):
            if param is not None and param.dim() == 0:
                new = nn.Parameter(param.detach().reshape(1), requires_grad=param.requires_grad)
                if hasattr(param, "_is_hf_initialized"):  # transformers' "loaded" mark
                    new._is_hf_initialized = param._is_hf_initialized
                self._parameters[name] = new

    def is_untrained(self) -> bool:
        """Still being built by `from_pretrained` (on meta) or at identity: dropping it loses nothing.
        Parameters partitioned by DeepSpeed ZeRO-3 are empty here: their values are unknown, so they
        count as trained."""
        params = list(self.parameters())
        if any(hasattr(p, "ds_id") for p in params):
            return False
        return any(p.is_meta for p in params) or self.is_identity()
