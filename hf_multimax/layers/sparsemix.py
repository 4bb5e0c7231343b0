"""SparseMix settings and the learned block scorer attached to each attention module."""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch
from torch import nn

from ..ops.sparsemix import BACKENDS
from .base import MethodLayer, num_heads_of
from .settings import ConfigSettings

__all__ = ["NORMALIZERS", "SparseMixScorer", "SparseMixSettings", "freeze_all_but_scorers", "kv_heads_and_dim"]

NORMALIZERS = ("softmax", "multimax")


def _positive_int(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"sparsemix.{name}={value!r} must be an int >= {minimum}")


def _finite_number(name: str, value, bound: str, ok) -> None:
    # NaN compares False with everything, so a NaN weight would silently switch the KL term off.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
        raise ValueError(f"sparsemix.{name}={value!r} must be a finite number {bound}")


@dataclasses.dataclass(frozen=True)
class SparseMixSettings(ConfigSettings):
    """How SparseMix is applied to a model. Stored as the `sparsemix` dict of the model config.

    Args:
        block_size (`int`): tokens per query/key block. Default: `64`.
        top_k (`int`): key blocks chosen by the scorer for each query block, besides the sink and
            local blocks. Default: `8`.
        sink (`bool`): always keep the first key block. Default: `True`.
        local (`bool`): always keep the query block's own key block. Default: `True`.
        scorer_rank (`int`): rank of the scorer's learned query/key projections. Default: `16`.
        kl_weight (`float`): weight of the scorer's KL term added to the training loss. Default: `1.0`.
        kl_query_blocks (`int`): query blocks per layer and forward whose dense attention is the KL
            target. Default: `2`.
        kl_target_power (`float`): the KL target is the dense attention mass per block (max-pooled
            over the block's queries) raised to this power and renormalised: the top-k choice only
            needs the ranking right at the top, and a sharp target teaches that (needle-block recall
            on the retrieval task after warm-up: 0.50 at 1, 0.80 at 64, 0.82 at 256). Default: `256.0`.
        normalizer (`str`): `"softmax"` or `"multimax"` (exact MultiMax over the kept keys, with the
            `multimax` settings of the config). Default: `"softmax"`.
        backend (`str`): `"auto"` or one of `BACKENDS`. Default: `"auto"`.
        dense_warmup (`bool`): run attention densely (exactly the dense model) while the scorer
            learns from the KL term; see `freeze_all_but_scorers`. Default: `False`.

    Inputs shorter than `(top_k + sink + local) * block_size` keys run the dense path: every block
    would be kept anyway.
    """

    config_key: ClassVar[str] = "sparsemix"

    block_size: int = 64
    top_k: int = 8
    sink: bool = True
    local: bool = True
    scorer_rank: int = 16
    kl_weight: float = 1.0
    kl_query_blocks: int = 2
    kl_target_power: float = 256.0
    normalizer: str = "softmax"
    backend: str = "auto"
    dense_warmup: bool = False

    def __post_init__(self):
        super().__post_init__()
        _positive_int("block_size", self.block_size)
        _positive_int("top_k", self.top_k, 0)
        _positive_int("scorer_rank", self.scorer_rank)
        _positive_int("kl_query_blocks", self.kl_query_blocks)
        for name in ("sink", "local", "dense_warmup"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"sparsemix.{name}={getattr(self, name)!r} must be a bool (True or False)")
        _finite_number("kl_weight", self.kl_weight, ">= 0", lambda v: v >= 0)
        object.__setattr__(self, "kl_weight", float(self.kl_weight))
        _finite_number("kl_target_power", self.kl_target_power, "> 0", lambda v: v > 0)
        object.__setattr__(self, "kl_target_power", float(self.kl_target_power))
        if self.normalizer not in NORMALIZERS:
            raise ValueError(f"sparsemix.normalizer={self.normalizer!r} is not supported; allowed values: {NORMALIZERS}")
        allowed = ("auto", *BACKENDS)
        if self.backend not in allowed:
            raise ValueError(f"sparsemix.backend={self.backend!r} is not supported; allowed values: {allowed}")
        if self.top_k + self.sink + self.local == 0:
            raise ValueError("sparsemix keeps no block: set top_k >= 1 or sink/local to True")

    @property
    def kept_blocks(self) -> int:
        return self.top_k + int(self.sink) + int(self.local)


def kv_heads_and_dim(module: nn.Module) -> tuple[int, int]:
    """Key/value heads and head dimension of an HF attention module (its attributes, else its config)."""
    config = getattr(module, "config", None)
    heads = num_heads_of(module)
    groups = getattr(module, "num_key_value_groups", 1)
    kv_heads = getattr(config, "num_key_value_heads", None) or (heads // groups if heads else None)
    head_dim = next((getattr(module, a) for a in ("head_dim", "attention_head_size")
                     if isinstance(getattr(module, a, None), int)), None)
    if head_dim is None and config is not None:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if not kv_heads or not head_dim:
        raise ValueError(f"cannot tell the key/value heads and head size of {type(module).__name__}; SparseMix needs both")
    return kv_heads, head_dim


class SparseMixScorer(MethodLayer):
    """The learned block scorer of one attention layer: rank-r projections of mean+max pooled query
    and key blocks, one per key/value head (see `ops.sparsemix.scorer_block_scores`).

    `w_key` starts at zero, so an untrained scorer is the parameter-free mean-pooled gate; `w_query`
    starts random so that the KL term's gradient reaches `w_key` from the first step.

    Args:
        num_kv_heads (`int`): key/value heads of the attention module.
        head_dim (`int`): query/key head dimension.
        rank (`int`): projection rank.
    """

    attr = "sparsemix"
    title = "SparseMix scorer"
    settings_cls = SparseMixSettings

    def __init__(self, num_kv_heads: int, head_dim: int, rank: int):
        super().__init__()
        self.num_kv_heads, self.head_dim, self.rank = num_kv_heads, head_dim, rank
        # Created in fp32 (from_pretrained(dtype=...) keeps them so): scores are ranked, small errors
        # reorder blocks. model.to(dtype) casts them like any parameter.
        self.w_query = nn.Parameter(torch.empty(num_kv_heads, 2 * head_dim, rank, dtype=torch.float32))
        self.w_key = nn.Parameter(torch.empty(num_kv_heads, 2 * head_dim, rank, dtype=torch.float32))
        self.reset_parameters()

    @property
    def structure(self) -> tuple:
        return self.num_kv_heads, self.head_dim, self.rank

    @classmethod
    def structure_for(cls, settings: SparseMixSettings, host: nn.Module) -> tuple:
        return (*kv_heads_and_dim(host), settings.scorer_rank)

    @property
    def init_std(self) -> float:
        return (2 * self.head_dim) ** -0.5

    def reset_parameters(self, init=nn.init) -> None:
        if self.w_query.is_meta:
            return
        init.normal_(self.w_query, std=self.init_std)
        init.zeros_(self.w_key)

    def is_identity(self) -> bool:
        # w_key = 0 is the parameter-free mean-pooled gate; w_query alone changes nothing.
        return not bool(self.w_key.detach().any())

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`(w_query, w_key)`. Attention functions call the module rather than read its parameters,
        so wrappers (PEFT `modules_to_save`, FSDP, ZeRO-3) hand them the live ones."""
        return self.w_query, self.w_key

    def extra_repr(self) -> str:
        return f"kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, rank={self.rank}"


def freeze_all_but_scorers(model: nn.Module) -> int:
    """Dense warm-up: train the SparseMix scorers only (with `sparsemix.dense_warmup=True` the model
    stays exactly dense while they learn). Returns the number of trainable parameters left."""
    count = 0
    for module in model.modules():
        for param in module.parameters(recurse=False):
            param.requires_grad_(isinstance(module, SparseMixScorer))
            count += param.numel() if isinstance(module, SparseMixScorer) else 0
    if count == 0:
        raise ValueError("the model has no SparseMix scorers: build it with attn_implementation='sparsemix'")
    return count
