"""MultiMax settings and the module that holds one attention layer's (or output head's) scalars."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import nn

from ..ops.multimax import BACKENDS, THETA_NAMES, naive_multimax_modulate
from .base import MethodLayer, num_heads_of
from .settings import ConfigSettings

__all__ = ["MultiMaxSettings", "MultiMaxModulator"]

ORDERS = (1, 2)
# Names of the scalars each order learns; order 1 has the linear pieces only.
_ORDER_PARAMS = {1: ("t1", "t2", "b1", "d1"), 2: ("t1", "t2", "t3", "t4", "b1", "d1", "b2", "d2")}


@dataclasses.dataclass(frozen=True)
class MultiMaxSettings(ConfigSettings):
    """How MultiMax is applied to a model. Stored as the `multimax` dict of the model config.

    Args:
        order (`int`): 1 = linear pieces only (4 scalars), 2 = linear + quadratic pieces (8 scalars).
            Default: `2`.
        per_head (`bool`): one set of scalars per attention head instead of one per layer.
            Default: `False` (shared per layer, the paper's choice).
        affine (`bool`): learn a temperature `(1 + a) * x + c` before the modulator. Default: `False`.
        output_head (`bool`): also modulate the LM head / classifier logits, with their own scalars.
            Default: `False`.
        backend (`str`): kernel that computes attention: one of `BACKENDS` or `"auto"`. Default: `"auto"`.

    Examples:
        >>> MultiMaxSettings.from_dict({"order": 1}).order
        1
    """

    config_key: ClassVar[str] = "multimax"

    order: int = 2
    per_head: bool = False
    affine: bool = False
    output_head: bool = False
    backend: str = "auto"

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.order, bool) or self.order not in ORDERS:
            raise ValueError(f"multimax.order={self.order!r} is not supported; allowed values: {ORDERS}")
        for name in ("per_head", "affine", "output_head"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ValueError(f"multimax.{name}={value!r} must be a bool (True or False)")
        allowed = ("auto", *BACKENDS)
        if self.backend not in allowed:
            raise ValueError(f"multimax.backend={self.backend!r} is not supported; allowed values: {allowed}")


class MultiMaxModulator(MethodLayer):
    """The learnable MultiMax scalars of one attention layer or output head.

    Every parameter is zero at identity (sigma(x) = x, so attention is exactly softmax); the
    optional affine is stored as a delta from (scale 1, shift 0) for the same reason. Every parameter is
    1-D, `[1]` shared or `[num_heads]` per head: FSDP2 and DeepSpeed ZeRO-3 refuse 0-dim parameters.

    Args:
        order (`int`): 1 or 2, see `MultiMaxSettings`.
        num_heads (`int`, *optional*): per-head scalars of shape `[num_heads]`; `None` shares one
            scalar per parameter. Default: `None`.
        affine (`bool`): add `affine_scale` and `affine_shift`. Default: `False`.
    """

    attr = "multimax"
    title = "MultiMax scalars"
    settings_cls = MultiMaxSettings

    def __init__(self, order: int = 2, num_heads: int | None = None, affine: bool = False):
        super().__init__()
        if order not in ORDERS:
            raise ValueError(f"order={order!r} is not supported; allowed values: {ORDERS}")
        if num_heads is not None and (not isinstance(num_heads, int) or num_heads < 1):
            raise ValueError(f"num_heads={num_heads!r} must be a positive int or None (shared scalars)")
        self.order = order
        self.num_heads = num_heads
        shape = (1,) if num_heads is None else (num_heads,)
        # Created in fp32 (from_pretrained(dtype=...) keeps them so): a handful of numbers that steer every
        # score. model.to(dtype) casts them like any parameter; the kernels modulate in fp32 either way.
        for name in _ORDER_PARAMS[order]:
            self.register_parameter(name, nn.Parameter(torch.zeros(shape, dtype=torch.float32)))
        self.affine = affine
        if affine:
            self.affine_scale = nn.Parameter(torch.zeros(shape, dtype=torch.float32))
            self.affine_shift = nn.Parameter(torch.zeros(shape, dtype=torch.float32))

    @property
    def structure(self) -> tuple:
        return self.order, self.num_heads, self.affine

    @classmethod
    def structure_for(cls, settings: MultiMaxSettings, host: nn.Module | None) -> tuple:
        heads = None
        if settings.per_head:
            heads = num_heads_of(host)
            if heads is None:
                raise ValueError(
                    f"multimax.per_head=True but the number of heads of {type(host).__name__} is unknown; "
                    "set per_head=False"
                )
        return settings.order, heads, settings.affine

    def reset_parameters(self, init=nn.init) -> None:
        """Identity init: every parameter to zero."""
        for p in self.parameters(recurse=False):
            init.zeros_(p)

    def theta(self) -> torch.Tensor:
        """`[8]` or `[8, num_heads]`: the scalars in `THETA_NAMES` order, zeros for pieces this order lacks."""
        params = self._parameters  # looked up per call: loading and .to() replace the tensors
        if self.order == 2:
            theta = torch.stack([params[n] for n in THETA_NAMES])
        else:
            zero = params["t1"].new_zeros(params["t1"].shape)
            theta = torch.stack([params.get(n, zero) for n in THETA_NAMES])
        return theta if self.num_heads is not None else theta.reshape(len(THETA_NAMES))

    def affine_params(self) -> torch.Tensor | None:
        """`[2]` or `[2, num_heads]` as (scale delta, shift), or None without affine."""
        if not self.affine:
            return None
        affine = torch.stack([self.affine_scale, self.affine_shift])
        return affine if self.num_heads is not None else affine.reshape(2)

    def is_identity(self) -> bool:
        return all(bool((p == 0).all()) for p in self.parameters(recurse=False))

    def forward(self, x: torch.Tensor | None = None):
        """Without `x`: `(theta, affine)` for the attention kernels. Attention functions call the
        module rather than read its parameters, so wrappers (PEFT `modules_to_save`, FSDP, ZeRO-3)
        hand them the live ones.

        With `x`: sigma(x) with shared scalars (used on output-head logits), computed in fp32,
        returned in x.dtype.
        """
        if x is None:
            return self.theta(), self.affine_params()
        if self.num_heads is not None:
            raise ValueError("per-head scalars need the head axis: use them through the attention function")
        return naive_multimax_modulate(x.float(), self.theta(), self.affine_params()).to(x.dtype)

    def extra_repr(self) -> str:
        heads = "shared" if self.num_heads is None else f"per_head={self.num_heads}"
        return f"order={self.order}, {heads}, affine={self.affine}"
