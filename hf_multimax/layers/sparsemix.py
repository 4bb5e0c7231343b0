"""SparseMix settings and the learned block scorer attached to each attention module."""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch
from torch import nn

from ..ops.sparsemix import BACKENDS, SELECTORS
from .base import MethodLayer, num_heads_of
from .settings import ConfigSettings

__all__ = ["NORMALIZERS", "SparseMixScorer", "SparseMixSettings", "freeze_all_but_scorers", "kv_heads_and_dim",
           "resolve_selector"]

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
        block_size (`int`): tokens per query/key block. Default: `32` (a query block chooses its key
            blocks once for all its queries: at 64, two queries sharing a block found their needles
            less often, 32-needle recall 0.923 of dense against 0.968 at 32 with the same 640 keys).
        top_k (`int`): key blocks chosen by the scorer for each query block, besides the sink and
            local blocks. Default: `18` (with the sink and local blocks, 640 keys).
        sink (`bool`): always keep the first key block (while the model's sliding window, if any,
            reaches it; not to be confused with attention sinks, `s_aux`, which are always kept).
            Default: `True`.
        local (`bool`): always keep the query block's own key block. Default: `True`.
        selector (`str`): what ranks the key blocks:
            - `"block"`: the block scorer (pooled queries and keys, cheap, any architecture);
            - `"block_norms"`: the block scorer whose learned term pools the norms of the feature
              pairs rotary embeddings rotate (position-free: its ranking does not change with a
              block's distance, for contexts longer than it was trained on; rotate_half RoPE layout,
              as in Llama, Mistral, Qwen);
            - `"block_rotary"`: those norms and, whole, the rotary pairs that turn less than an eighth
              of a turn over the model's `max_position_embeddings` (the direction that norms blur,
              without drift with distance; RoPE over the whole head);
            - `"token"`: the token-level indexer (DeepSeek V3.2's lightning indexer on every query/key
              token, its distribution summed per key block and max-pooled over the query block's
              rows; finds single needle tokens that pooling averages away; slow until fused);
            - `"auto"`: `"block_rotary"` on models with RoPE over the whole head, `"block"` on others
              (the best measured selector where it applies, see the README).
            Default: `"auto"`.
        scorer_rank (`int`): rank of the block scorer's learned query/key projections. Default: `16`.
        indexer_heads (`int`): heads of the token indexer. Default: `4`.
        indexer_dim (`int`): size of each token-indexer head. Default: `32`.
        kl_weight (`float`): weight of the scorer's KL term added to the training loss. Default: `1.0`.
        kl_query_blocks (`int`): query blocks per layer and forward whose dense attention is the KL
            target. Default: `4` (128 query rows).
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
    would be kept anyway. So do models whose own indexer selects the keys (DeepSeek-V3.2, MiniMax-M3:
    `integrations.sparsemix_attention`).
    """

    config_key: ClassVar[str] = "sparsemix"

    block_size: int = 32
    top_k: int = 18
    sink: bool = True
    local: bool = True
    selector: str = "auto"
    scorer_rank: int = 16
    indexer_heads: int = 4
    indexer_dim: int = 32
    kl_weight: float = 1.0
    kl_query_blocks: int = 4
    kl_target_power: float = 256.0
    normalizer: str = "softmax"
    backend: str = "auto"
    dense_warmup: bool = False

    def __post_init__(self):
        super().__post_init__()
        _positive_int("block_size", self.block_size)
        _positive_int("top_k", self.top_k, 0)
        _positive_int("scorer_rank", self.scorer_rank)
        _positive_int("indexer_heads", self.indexer_heads)
        _positive_int("indexer_dim", self.indexer_dim)
        if self.selector not in ("auto", *SELECTORS):
            raise ValueError(f"sparsemix.selector={self.selector!r} is not supported; allowed values: "
                             f"{('auto', *SELECTORS)}")
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


def block_scorer_inputs(selector: str, head_dim: int, slow_pairs: int = 0) -> int:
    """Input size of a block scorer's projections: mean+max pooled heads (`"block"`), mean+max pooled
    norms of the head's rotary pairs (`"block_norms"`: half as many features), or those norms and
    the `slow_pairs` slowest pairs whole (`"block_rotary"`)."""
    if selector == "block":
        return 2 * head_dim
    if head_dim % 2:
        raise ValueError(f"sparsemix.selector={selector!r} pairs the head's features as rotary embeddings rotate "
                         f"them and needs an even head size, got {head_dim}; use selector='block'")
    return head_dim + 4 * slow_pairs


# A rotary pair is "slow" if it turns less than an eighth of a turn over the model's whole context:
# its direction then still compares contents the same way at any distance the model handles.
SLOW_PAIR_TURN = math.pi / 4


def slow_rotary_pairs(config, head_dim: int) -> int:
    """How many of a head's rotary pairs turn less than `SLOW_PAIR_TURN` radians over the model's
    `max_position_embeddings` positions, from the inverse frequencies of its RoPE (any transformers
    `rope_type`). They are the last pairs of the `rotate_half` layout, whose frequencies fall from
    the first pair to the last."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = getattr(config, "rope_parameters", None)
    if not isinstance(rope, dict) or "rope_theta" not in rope:
        raise ValueError(f"sparsemix.selector='block_rotary' reads the rotary frequencies of the model's RoPE, but "
                         f"{type(config).__name__} has no single rope_parameters with a rope_theta (got {rope!r}); "
                         "use selector='block_norms' or 'block'")
    factor = rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
    rotary_dim = getattr(config, "rotary_dim", None)  # GPT-J style configs
    if rotary_dim not in (None, head_dim):
        factor = rotary_dim / head_dim
    if factor != 1.0:
        raise ValueError(f"sparsemix.selector='block_rotary' needs rotary embeddings on the whole head, got "
                         f"partial_rotary_factor={factor}; use selector='block'")
    rope_type = rope.get("rope_type", "default")
    # On CPU explicitly: models are built under a meta-device context in from_pretrained.
    if rope_type == "default":
        inv_freq = 1.0 / rope["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device="cpu") / head_dim)
    elif rope_type in ROPE_INIT_FUNCTIONS:
        inv_freq = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")[0].double()
    else:
        raise ValueError(f"sparsemix.selector='block_rotary' does not know rope_type={rope_type!r}; known: "
                         f"{('default', *ROPE_INIT_FUNCTIONS)}; use selector='block_norms' or 'block'")
    if inv_freq.numel() != head_dim // 2 or bool((inv_freq.diff() > 0).any()):
        raise ValueError(f"sparsemix.selector='block_rotary' expects {head_dim // 2} rotary frequencies falling from "
                         f"the first pair to the last, got {inv_freq.tolist()}; use selector='block'")
    positions = getattr(config, "max_position_embeddings", None)
    if not isinstance(positions, int) or positions < 1:
        raise ValueError(f"sparsemix.selector='block_rotary' counts the pairs that turn little over the model's "
                         f"context, but {type(config).__name__}.max_position_embeddings is {positions!r}; set it, or "
                         "use selector='block_norms' or 'block'")
    return int((inv_freq * positions < SLOW_PAIR_TURN).sum())


def resolve_selector(selector: str, config, head_dim: int) -> tuple[str, int]:
    """`(selector, slow_pairs)` of a layer: `sparsemix.selector` as it is, with `"block_rotary"`'s slow
    pair count; `"auto"` is `"block_rotary"` where the model has RoPE over the whole (even-sized)
    head, `"block"` elsewhere (absolute or learned positions, partial or unknown rotary embeddings)."""
    if selector not in ("auto", "block_rotary"):
        return selector, 0
    try:
        block_scorer_inputs("block_rotary", head_dim)  # an even head size first, as for "block_norms"
        return "block_rotary", slow_rotary_pairs(config, head_dim)
    except ValueError:
        if selector == "auto":
            return "block", 0
        raise


class SparseMixScorer(MethodLayer):
    """The learned selector of one attention layer, of the kind `sparsemix.selector` names.

    - `"block"`: rank-r projections of mean+max pooled query and key blocks, one per key/value head
      (see `ops.sparsemix.scorer_block_scores`): `w_query`, `w_key`, each `[Hkv, 2 * D, rank]`.
      `w_key` starts at zero, so an untrained scorer is the parameter-free mean-pooled gate; `w_query`
      starts random so that the KL term's gradient reaches `w_key` from the first step.
    - `"block_norms"`: the same on mean+max pooled norms of the rotary pairs, `[Hkv, D, rank]` each.
    - `"block_rotary"`: the same on those norms and the `slow_pairs` slowest rotary pairs whole
      (`slow_rotary_pairs` of the model's config), `[Hkv, D + 4 * slow_pairs, rank]` each.
    - `"token"`: the token-level indexer (`ops.sparsemix.indexer_block_scores`), one per key/value
      head: `w_query [Hkv, G * D, n * d]`, `w_key [Hkv, D, d]`, `w_weight [Hkv, G * D, n]` (G query
      heads per key/value head). `w_weight` starts at
      zero (no preference: an untrained indexer must be warmed up), the projections random, so the
      KL term's gradient reaches every weight after the first step (LoRA's zero-B idea).

    Args:
        selector (`str`): `"block"`, `"block_norms"`, `"block_rotary"` or `"token"`.
        num_heads, num_kv_heads (`int`): query and key/value heads of the attention module.
        head_dim (`int`): query/key head dimension.
        rank (`int`): block scorer projection rank.
        indexer_heads, indexer_dim (`int`): token indexer heads and their size.
        slow_pairs (`int`): rotary pairs `"block_rotary"` reads whole. Default: `0`.
    """

    attr = "sparsemix"
    title = "SparseMix scorer"
    settings_cls = SparseMixSettings

    def __init__(self, selector: str, num_heads: int, num_kv_heads: int, head_dim: int, rank: int,
                 indexer_heads: int, indexer_dim: int, slow_pairs: int = 0):
        super().__init__()
        self.selector, self.num_heads, self.num_kv_heads, self.head_dim = selector, num_heads, num_kv_heads, head_dim
        self.rank, self.indexer_heads, self.indexer_dim = rank, indexer_heads, indexer_dim
        self.slow_pairs = slow_pairs
        # Created in fp32 (from_pretrained(dtype=...) keeps them so): scores are ranked, small errors
        # reorder blocks. model.to(dtype) casts them like any parameter.
        f32 = torch.float32
        if selector != "token":
            inputs = block_scorer_inputs(selector, head_dim, slow_pairs)
            self.w_query = nn.Parameter(torch.empty(num_kv_heads, inputs, rank, dtype=f32))
            self.w_key = nn.Parameter(torch.empty(num_kv_heads, inputs, rank, dtype=f32))
        else:
            group = num_heads // num_kv_heads * head_dim  # the query heads of a key/value head, side by side
            self.w_query = nn.Parameter(torch.empty(num_kv_heads, group, indexer_heads * indexer_dim, dtype=f32))
            self.w_key = nn.Parameter(torch.empty(num_kv_heads, head_dim, indexer_dim, dtype=f32))
            self.w_weight = nn.Parameter(torch.empty(num_kv_heads, group, indexer_heads, dtype=f32))
        self.reset_parameters()

    @property
    def is_block_scorer(self) -> bool:
        """A block scorer (`"block"`, `"block_norms"`, `"block_rotary"`: two projections) rather than the
        token indexer."""
        return self.selector != "token"

    @property
    def structure(self) -> tuple:
        return (self.selector, self.num_heads, self.num_kv_heads, self.head_dim, self.rank, self.indexer_heads,
                self.indexer_dim, self.slow_pairs)

    @classmethod
    def structure_for(cls, settings: SparseMixSettings, host: nn.Module) -> tuple:
        kv_heads, head_dim = kv_heads_and_dim(host)
        heads = num_heads_of(host) or kv_heads
        selector, slow = resolve_selector(settings.selector, getattr(host, "config", None), head_dim)
        if selector != "token":  # a block scorer has no indexer
            block_scorer_inputs(selector, head_dim)  # raises for an odd head size with the rotary ones
            return (selector, heads, kv_heads, head_dim, settings.scorer_rank, 0, 0, slow)
        return ("token", heads, kv_heads, head_dim, 0, settings.indexer_heads, settings.indexer_dim, 0)

    @property
    def init_std(self) -> float:
        """Std of the random query projection: 1 / sqrt(its input size). From the structure, not the
        tensor (DeepSpeed ZeRO-3 leaves partitioned parameters empty here)."""
        if self.is_block_scorer:
            fan_in = block_scorer_inputs(self.selector, self.head_dim, self.slow_pairs)
        else:
            fan_in = self.num_heads // self.num_kv_heads * self.head_dim
        return fan_in**-0.5

    def reset_parameters(self, init=nn.init) -> None:
        if self.w_query.is_meta:
            return
        if self.is_block_scorer:
            init.normal_(self.w_query, std=self.init_std)
            init.zeros_(self.w_key)
        else:
            init.normal_(self.w_query, std=self.init_std)
            init.normal_(self.w_key, std=self.head_dim**-0.5)
            init.zeros_(self.w_weight)

    def is_identity(self) -> bool:
        # block: w_key = 0 is the parameter-free mean-pooled gate; token: w_weight = 0 ranks nothing.
        zero_when_untrained = self.w_key if self.is_block_scorer else self.w_weight
        return not bool(zero_when_untrained.detach().any())

    def forward(self) -> tuple[torch.Tensor, ...]:
        """The weights the selector's ops take: `(w_query, w_key)` or `(w_query, w_key, w_weight)`.
        Attention functions call the module rather than read its parameters, so wrappers (PEFT
        `modules_to_save`, FSDP, ZeRO-3) hand them the live ones."""
        if self.is_block_scorer:
            return self.w_query, self.w_key
        return self.w_query, self.w_key, self.w_weight

    def extra_repr(self) -> str:
        if self.is_block_scorer:
            slow = f", slow_pairs={self.slow_pairs}" if self.selector == "block_rotary" else ""
            return f"{self.selector} scorer: kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, rank={self.rank}{slow}"
        return (f"token indexer: heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"indexer_heads={self.indexer_heads}, indexer_dim={self.indexer_dim}")


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
