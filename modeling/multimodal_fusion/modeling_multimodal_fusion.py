"""Multimodal fusion model: per-modality token features -> projection + modality embedding -> a learned
CLS query that reads all tokens -> classifier. With RollingQ (query rotation buffers) and the attribution
regularizer (maths: docs/methods.md of hf-multimax). Self-contained (transformers + torch only): a
published checkpoint carries this file as remote code.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AutoConfig, AutoModel, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import ModelOutput

from .configuration_multimodal_fusion import MultimodalFusionConfig

__all__ = [
    "MultimodalFusionClassifierOutput",
    "MultimodalFusionForSequenceClassification",
    "MultimodalFusionModel",
    "MultimodalFusionModelOutput",
    "MultimodalFusionPreTrainedModel",
    "rotation_towards",
]


@dataclass
class MultimodalFusionModelOutput(ModelOutput):
    """
    Args:
        pooler_output (`torch.FloatTensor` [B, H]): the CLS state after the last fusion layer.
        fusion_inputs (`tuple[torch.FloatTensor]`, one [B, T_m, H] per modality): the tokens the CLS query
            reads (projection + modality embedding); what attributions and probes are measured on.
        modality_attention_mass (`torch.FloatTensor` [B, M], *optional*): attention mass of the last
            layer's CLS query on each modality (mean over heads); with `output_attentions=True`.
        attentions (`tuple[torch.FloatTensor]`, *optional*): per layer [B, heads, 1, N] CLS attention.
        rollingq_statistics (`tuple[dict]`, *optional*): per layer, batch sums that RollingQ's AIR and
            rotation need (see `MultimodalFusionAttention.rollingq_statistics`).
    """

    pooler_output: torch.FloatTensor | None = None
    fusion_inputs: tuple[torch.FloatTensor, ...] | None = None
    modality_attention_mass: torch.FloatTensor | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    rollingq_statistics: tuple[dict, ...] | None = None


@dataclass
class MultimodalFusionClassifierOutput(ModelOutput):
    """
    Args:
        loss (`torch.FloatTensor` []): cross-entropy, plus `attribution_weight * mean_b sum_m
            (share_bm - target_m)^2` when the regularizer is on; with `labels`.
        logits (`torch.FloatTensor` [B, num_labels]).
        attribution_shares (`torch.FloatTensor` [B, M], *optional*): gradient x input of the true (else
            predicted) class logit on each modality's fusion input, normalised to sum 1 per sample.
        modality_attention_mask, attentions, fusion_inputs, rollingq_statistics: as in
            [`MultimodalFusionModelOutput`] (when asked for).
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    attribution_shares: torch.FloatTensor | None = None
    modality_attention_mass: torch.FloatTensor | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    fusion_inputs: tuple[torch.FloatTensor, ...] | None = None
    rollingq_statistics: tuple[dict, ...] | None = None


def fusion_eager_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Plain softmax attention with transformers' AttentionInterface contract: q/k/v [B, H, L, D],
    additive mask [B, 1, Q, K]; returns (out [B, Q, H, D], probs [B, H, Q, K])."""
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = scores.softmax(dim=-1)
    out = torch.matmul(F.dropout(probs, p=dropout, training=module.training), value)
    return out.transpose(1, 2).contiguous(), probs


def rotation_towards(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Proper rotation R [H, H] with R @ unit(source) = unit(target): U V^T from the SVD of
    outer(target, source), U's last column flipped if that gives a reflection (RollingQ)."""
    u, _, vh = torch.linalg.svd(torch.outer(target, source))
    if torch.linalg.det(u @ vh) < 0:
        u = torch.cat([u[:, :-1], -u[:, -1:]], dim=1)
    return u @ vh


class MultimodalFusionProjection(nn.Module):
    """Per-token map of one modality's features to the fusion width: Linear, or Linear-GELU-Linear."""

    def __init__(self, in_features: int, hidden_size: int, projection_hidden_size: int | None):
        super().__init__()
        if projection_hidden_size is None:
            self.net = nn.Linear(in_features, hidden_size)
        else:
            self.net = nn.Sequential(
                nn.Linear(in_features, projection_hidden_size), nn.GELU(), nn.Linear(projection_hidden_size, hidden_size)
            )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)


class MultimodalFusionAttention(nn.Module):
    """The CLS query attends over all modality tokens. RollingQ rotates only the CLS query:
    q <- R q, with R a (non-learned) buffer; gradients flow through R into q_proj and the CLS state."""

    def __init__(self, config: MultimodalFusionConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5 * config.attention_logit_scale
        self.attention_dropout = config.attention_dropout
        self.is_causal = False
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, hidden)
        self.k_proj = nn.Linear(hidden, hidden)
        self.v_proj = nn.Linear(hidden, hidden)
        self.o_proj = nn.Linear(hidden, hidden)
        # Buffers, not attributes: saved with the checkpoint, so a reloaded model keeps its rotation and
        # its count (the authors' plain-int counter silently restarted RollingQ after a reload).
        self.register_buffer("rollingq_rotation", torch.eye(hidden))
        self.register_buffer("rollingq_num_rotations", torch.zeros((), dtype=torch.long))

    def _split(self, x: torch.Tensor) -> torch.Tensor:  # [B, L, hidden] -> [B, heads, L, head_dim]
        return x.view(x.shape[0], x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, cls_states, tokens, attention_mask=None, output_attentions=False, **kwargs):
        """cls_states [B, 1, hidden], tokens [B, N, hidden], attention_mask additive [B, 1, 1, N] or None.
        Returns (out [B, 1, hidden], probs [B, heads, 1, N] or None, rotated query [B, hidden], keys [B, N, hidden])."""
        query = self.q_proj(cls_states) @ self.rollingq_rotation.to(cls_states.dtype).T
        key = self.k_proj(tokens)
        value = self.v_proj(tokens)
        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, fusion_eager_attention)
        q, k, v = self._split(query), self._split(key), self._split(value)
        if output_attentions and self.config._attn_implementation != "sdpa":
            kwargs["output_attentions"] = True  # eager and multimax then return their probabilities
        out, probs = attention_interface(
            self, q, k, v, attention_mask,
            scaling=self.scaling,
            dropout=self.attention_dropout if self.training else 0.0,
            **kwargs,
        )
        if output_attentions and probs is None:
            if self.config._attn_implementation != "sdpa":
                raise ValueError(
                    f"attn_implementation={self.config._attn_implementation!r} returned no attention weights; "
                    "use 'eager', 'sdpa' or 'multimax' for output_attentions=True"
                )
            # SDPA is softmax attention: recompute its probabilities (one query row, cheap).
            _, probs = fusion_eager_attention(self, q, k, v, attention_mask, self.scaling, 0.0)
        out = self.o_proj(out.reshape(out.shape[0], 1, -1))
        return out, probs, query[:, 0], key

    @staticmethod
    def rollingq_statistics(query, key, segments, token_mask) -> dict:
        """Batch sums for AIR and the rotation. query [B, H] (rotated), key [B, N, H], segments: token
        count per modality (in order), token_mask [B, N] (1 = real token).

        Returns sums over the batch: `cos` [M] of cos(q_b, mean key of modality m in sample b),
        `query` [H], `key` [M, H] over real tokens, `key_count` [M], `count` (samples)."""
        cos, key_sums, key_counts = [], [], []
        for k_m, w_m in zip(key.split(segments, dim=1), token_mask.split(segments, dim=1)):
            w_m = w_m.to(key.dtype)[..., None]
            k_sum = (k_m * w_m).sum(1)  # [B, H]
            mean_k = k_sum / w_m.sum(1).clamp_min(1.0)
            cos.append(F.cosine_similarity(query, mean_k, dim=-1).sum())
            key_sums.append(k_sum.sum(0))
            key_counts.append(w_m.sum())
        return {
            "cos": torch.stack(cos).double(),
            "query": query.sum(0).double(),
            "key": torch.stack(key_sums).double(),
            "key_count": torch.stack(key_counts).double(),
            "count": float(query.shape[0]),
        }


class MultimodalFusionLayer(nn.Module):
    """CLS attention over the modality tokens (residual), then an optional pre-norm MLP on the CLS state.
    Tokens are not updated, so each modality's features stay that modality's (probes, attributions)."""

    def __init__(self, config: MultimodalFusionConfig, layer_idx: int):
        super().__init__()
        self.attention = MultimodalFusionAttention(config, layer_idx)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.mlp = None
        if config.intermediate_size > 0:
            self.mlp = nn.Sequential(
                nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps),
                nn.Linear(config.hidden_size, config.intermediate_size),
                nn.GELU(),
                nn.Linear(config.intermediate_size, config.hidden_size),
                nn.Dropout(config.hidden_dropout_prob),
            )

    def forward(self, cls_states, tokens, attention_mask=None, output_attentions=False, **kwargs):
        out, probs, query, key = self.attention(cls_states, tokens, attention_mask, output_attentions, **kwargs)
        cls_states = cls_states + self.dropout(out)
        if self.mlp is not None:
            cls_states = cls_states + self.mlp(cls_states)
        return cls_states, probs, query, key


class MultimodalFusionPreTrainedModel(PreTrainedModel):
    config_class = MultimodalFusionConfig
    base_model_prefix = "fusion"
    # The modules whose output carries the attention weights; plugins that attach per-attention-layer
    # state (hf_multimax) find the attention modules here.
    _can_record_outputs = {"attentions": MultimodalFusionAttention}
    main_input_name = "modality_inputs"
    _supports_sdpa = True
    _supports_attention_backend = True
    _no_split_modules = ["MultimodalFusionLayer"]

    def _init_weights(self, module):
        # initializer_range=None: PyTorch's own fan-in init. A std of 0.02 in every one of the few narrow
        # layers of a small fusion head starts it so close to zero that SGD does not move it.
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            if std is None:
                bound = 1.0 / math.sqrt(module.in_features)
                init.uniform_(module.weight, -bound, bound)
                if module.bias is not None:
                    init.uniform_(module.bias, -bound, bound)
            else:
                init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=1.0 if std is None else std)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, MultimodalFusionAttention):
            # The guarded helpers skip tensors loaded from a checkpoint.
            init.eye_(module.rollingq_rotation)
            init.zeros_(module.rollingq_num_rotations)
        elif isinstance(module, MultimodalFusionModel):
            init.normal_(module.cls_token, mean=0.0, std=1.0 if std is None else std)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        loaded = super().from_pretrained(*args, **kwargs)
        # Loading re-creates the parameters with requires_grad=True: freeze the encoders again.
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        for module in model.modules():
            if isinstance(module, MultimodalFusionModel):
                module._apply_freeze()
        return loaded

    def fusion_attentions(self) -> list[MultimodalFusionAttention]:
        return [m for m in self.modules() if isinstance(m, MultimodalFusionAttention)]

    @torch.no_grad()
    def rollingq_update(self, statistics: list[dict], apply: bool = True) -> list[dict]:
        """RollingQ's epoch-end step, per fusion layer, from `rollingq_statistics` summed over the
        training data: the attention imbalance and, if it exceeds `beta` and fewer than
        `max_rotations` were done, a rotation of the CLS query toward the under-attended modalities.
        `apply=False` only measures (no rotation, whatever the config says).

        With c_m = mean over samples of cos(q, mean key of modality m): the imbalance is
        max_m c_m - min_m c_m; `air` is c_0 - c_1 for two modalities (the paper's signed AIR) and the
        imbalance otherwise. Target = sum_m w_m unit(mean key_m) at the query's norm, w = softmax(-2 sigma c)
        (for M = 2 exactly the paper's alpha = (1 + tanh(-sigma AIR)) / 2 on A).

        Returns per layer `{"air", "imbalance", "cos": [M], "rotated": bool, "num_rotations": int}`.
        """
        settings = self.config.rollingq_settings
        results = []
        for attention, stats in zip(self.fusion_attentions(), statistics, strict=True):
            cos = stats["cos"] / stats["count"]
            imbalance = (cos.max() - cos.min()).item()
            air = (cos[0] - cos[1]).item() if cos.numel() == 2 else imbalance
            done = int(attention.rollingq_num_rotations.item())
            rotate = apply and settings["enabled"] and imbalance > settings["beta"] and done < settings["max_rotations"]
            if rotate:
                query = stats["query"] / stats["count"]
                mean_keys = stats["key"] / stats["key_count"].clamp_min(1.0)[:, None]
                weights = torch.softmax(-2.0 * settings["sigma"] * cos, dim=0)
                target = (weights[:, None] * F.normalize(mean_keys, dim=-1)).sum(0)
                target = F.normalize(target, dim=0) * query.norm()
                rotation = rotation_towards(query, target).to(attention.rollingq_rotation)
                attention.rollingq_rotation.copy_(rotation @ attention.rollingq_rotation)
                attention.rollingq_num_rotations += 1
            results.append({
                "air": air,
                "imbalance": imbalance,
                "cos": cos.tolist(),
                "rotated": bool(rotate),
                "num_rotations": int(attention.rollingq_num_rotations.item()),
            })
        return results


class MultimodalFusionModel(MultimodalFusionPreTrainedModel):
    """Per-modality encoders (optional) and projections, modality embeddings, CLS fusion layers.

    Inputs: `modality_inputs`, a dict keyed by `config.modality_names`: a [B, T_m, d_m] tensor of
    precomputed token features, or, for a modality with an encoder, the encoder's keyword inputs
    (e.g. `{"input_ids": ..., "attention_mask": ...}`). `modality_attention_mask` (optional dict of
    [B, T_m], 1 = real token) marks padding of precomputed modalities.
    """

    def __init__(self, config: MultimodalFusionConfig):
        super().__init__(config)
        self.encoders = nn.ModuleDict()
        for name, encoder_config in zip(config.modality_names, config.encoders):
            if encoder_config is not None:
                kwargs = dict(encoder_config)
                sub_config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
                impl = config._attn_implementation
                self.encoders[name] = AutoModel.from_config(sub_config, **({"attn_implementation": impl} if impl else {}))
        self.projections = nn.ModuleDict({
            name: MultimodalFusionProjection(size, config.hidden_size, config.projection_hidden_size)
            for name, size in zip(config.modality_names, config.modality_input_sizes)
        })
        self.modality_embeddings = nn.Embedding(config.num_modalities, config.hidden_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.layers = nn.ModuleList(MultimodalFusionLayer(config, i) for i in range(config.num_fusion_layers))
        self.post_init()
        self._apply_freeze()

    def _apply_freeze(self) -> None:
        if self.config.freeze_encoders:
            self.encoders.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.config.freeze_encoders:
            self.encoders.eval()  # frozen encoders also keep their dropout off
        return self

    def embed_modalities(self, modality_inputs: dict, modality_attention_mask: dict | None = None):
        """-> (fusion inputs: one [B, T_m, hidden] per modality, token masks: one [B, T_m] per modality)."""
        names = self.config.modality_names
        if not isinstance(modality_inputs, dict) or set(modality_inputs) != set(names):
            got = sorted(modality_inputs) if isinstance(modality_inputs, dict) else type(modality_inputs).__name__
            raise ValueError(f"modality_inputs must be a dict with exactly the keys {names}; got {got}")
        modality_attention_mask = modality_attention_mask or {}
        unknown = set(modality_attention_mask) - set(names)
        if unknown:
            raise ValueError(f"modality_attention_mask has unknown modalities {sorted(unknown)}; allowed: {names}")
        fusion_inputs, masks = [], []
        for index, name in enumerate(names):
            value = modality_inputs[name]
            if name in self.encoders:
                if not isinstance(value, dict):
                    raise ValueError(f"modality {name!r} has an encoder: pass its keyword inputs as a dict, got {type(value).__name__}")
                with torch.set_grad_enabled(torch.is_grad_enabled() and not self.config.freeze_encoders):
                    features = self.encoders[name](**value).last_hidden_state
                mask = value.get("attention_mask")
            else:
                size = self.config.modality_input_sizes[index]
                if not torch.is_tensor(value) or value.dim() != 3 or value.shape[-1] != size:
                    shape = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
                    raise ValueError(f"modality {name!r} expects token features [batch, tokens, {size}], got {shape}")
                features = value.to(self.dtype)
                mask = modality_attention_mask.get(name)
            if mask is None:
                mask = torch.ones(features.shape[:2], dtype=torch.long, device=features.device)
            hidden = self.projections[name](features) + self.modality_embeddings.weight[index]
            fusion_inputs.append(hidden)
            masks.append(mask)
        return fusion_inputs, masks

    def fuse(self, fusion_inputs, masks, output_attentions=False, output_rollingq_statistics=False, **kwargs):
        """CLS fusion over the given fusion inputs (see `embed_modalities`) -> `MultimodalFusionModelOutput`."""
        tokens = torch.cat(list(fusion_inputs), dim=1)
        token_mask = torch.cat(list(masks), dim=1)
        attention_mask = None
        if not bool(token_mask.all()):
            # Additive mask (0 / dtype min) [B, 1, 1, N]: eager, sdpa and multimax all accept it.
            attention_mask = torch.zeros(token_mask.shape, dtype=tokens.dtype, device=tokens.device)
            attention_mask = attention_mask.masked_fill(token_mask == 0, torch.finfo(tokens.dtype).min)[:, None, None, :]
        cls_states = self.cls_token.to(tokens.dtype).expand(tokens.shape[0], 1, -1)
        segments = [x.shape[1] for x in fusion_inputs]
        all_probs, statistics = [], []
        for layer in self.layers:
            cls_states, probs, query, key = layer(cls_states, tokens, attention_mask, output_attentions, **kwargs)
            all_probs.append(probs)
            if output_rollingq_statistics:
                statistics.append(MultimodalFusionAttention.rollingq_statistics(query.detach(), key.detach(), segments, token_mask))
        mass = None
        if output_attentions:
            per_token = all_probs[-1].mean(dim=1)[:, 0]  # [B, N], mean over heads
            mass = torch.stack([p.sum(-1) for p in per_token.split(segments, dim=-1)], dim=-1)
        return MultimodalFusionModelOutput(
            pooler_output=cls_states[:, 0],
            fusion_inputs=tuple(fusion_inputs),
            modality_attention_mass=mass,
            attentions=tuple(all_probs) if output_attentions else None,
            rollingq_statistics=tuple(statistics) if output_rollingq_statistics else None,
        )

    def forward(self, modality_inputs=None, modality_attention_mask=None, output_attentions=None,
                output_rollingq_statistics=False, return_dict=None, **kwargs):
        fusion_inputs, masks = self.embed_modalities(modality_inputs, modality_attention_mask)
        output = self.fuse(fusion_inputs, masks, bool(output_attentions), output_rollingq_statistics, **kwargs)
        return output if return_dict is not False else output.to_tuple()


class MultimodalFusionForSequenceClassification(MultimodalFusionPreTrainedModel):
    """[`MultimodalFusionModel`] + a linear classifier on the CLS state; the loss adds the attribution
    regularizer when `config.attribution_weight > 0`."""

    def __init__(self, config: MultimodalFusionConfig):
        super().__init__(config)
        self.fusion = MultimodalFusionModel(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()
        self.fusion._apply_freeze()

    @classmethod
    def from_pretrained_encoders(cls, encoders: dict[str, str], **config_kwargs):
        """A new fusion model whose encoder modalities start from pretrained checkpoints, e.g.
        `from_pretrained_encoders({"text": get_model_path()}, modality_names=["text", "audio"],
        modality_input_sizes=[384, 16], num_labels=3)`. The fusion part is freshly initialised."""
        names = config_kwargs.get("modality_names") or list(MultimodalFusionConfig().modality_names)
        unknown = set(encoders) - set(names)
        if unknown:
            raise ValueError(f"encoders for unknown modalities {sorted(unknown)}; modality_names={names}")
        loaded = {name: AutoModel.from_pretrained(path) for name, path in encoders.items()}
        config_kwargs["encoders"] = [loaded[n].config.to_dict() if n in loaded else None for n in names]
        model = cls(MultimodalFusionConfig(**config_kwargs))
        for name, encoder in loaded.items():
            model.fusion.encoders[name].load_state_dict(encoder.state_dict())
        return model

    def _classify(self, fusion_output: MultimodalFusionModelOutput) -> torch.Tensor:
        return self.classifier(self.dropout(fusion_output.pooler_output))

    def attribution_shares(self, fusion_inputs, masks, logits, targets, create_graph: bool) -> torch.Tensor:
        """[B, M] shares of gradient x input of each sample's `targets` logit on the fusion inputs.

        Uses the forward graph when there is one; otherwise (no grad, or inputs that do not need grad)
        re-runs fusion + classifier from detached fusion inputs, which is exact: attributions depend only
        on them and on the fusion layers and classifier."""
        if not (torch.is_grad_enabled() and all(x.requires_grad for x in fusion_inputs)):
            with torch.enable_grad():
                leaves = [x.detach().requires_grad_(True) for x in fusion_inputs]
                logits = self._classify(self.fusion.fuse(leaves, masks))
                return self._shares(leaves, logits, targets, create_graph=False).detach()
        return self._shares(fusion_inputs, logits, targets, create_graph)

    @staticmethod
    def _shares(fusion_inputs, logits, targets, create_graph):
        picked = logits.gather(1, targets[:, None]).sum()
        grads = torch.autograd.grad(picked, fusion_inputs, create_graph=create_graph)
        attributions = torch.stack([(g * x).abs().flatten(1).sum(1) for g, x in zip(grads, fusion_inputs)], dim=1)
        return attributions / attributions.sum(1, keepdim=True).clamp_min(torch.finfo(attributions.dtype).tiny)

    def forward(self, modality_inputs=None, modality_attention_mask=None, labels=None, output_attentions=None,
                output_attributions=None, output_fusion_inputs=None, output_rollingq_statistics=False,
                return_dict=None, **kwargs):
        r"""
        labels (`torch.LongTensor` [B], *optional*): class indices; gives `loss`.
        output_attributions (`bool`, *optional*): return `attribution_shares` even when the regularizer
            is off (for logging and evaluation).
        output_fusion_inputs (`bool`, *optional*): return the per-modality fusion inputs (for probes).
        """
        regularize = labels is not None and self.config.attribution_weight > 0
        fusion_inputs, masks = self.fusion.embed_modalities(modality_inputs, modality_attention_mask)
        # The regularizer differentiates a gradient (create_graph): SDPA's fused CPU/GPU kernels have no
        # double backward, its math kernel (same maths) does.
        double_backward = regularize and torch.is_grad_enabled()
        with sdpa_kernel([SDPBackend.MATH]) if double_backward else contextlib.nullcontext():
            output = self.fusion.fuse(fusion_inputs, masks, bool(output_attentions), output_rollingq_statistics, **kwargs)
        logits = self._classify(output)
        shares = loss = None
        if regularize or output_attributions:
            targets = labels if labels is not None else logits.argmax(-1)
            shares = self.attribution_shares(fusion_inputs, masks, logits, targets, create_graph=double_backward)
        if labels is not None:
            loss = F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), labels)
            if regularize:
                target = torch.tensor(self.config.attribution_ratios, dtype=shares.dtype, device=shares.device)
                loss = loss + self.config.attribution_weight * (shares - target).square().sum(-1).mean()
        result = MultimodalFusionClassifierOutput(
            loss=loss,
            logits=logits,
            attribution_shares=shares,
            modality_attention_mass=output.modality_attention_mass,
            attentions=output.attentions,
            fusion_inputs=output.fusion_inputs if output_fusion_inputs else None,
            rollingq_statistics=output.rollingq_statistics,
        )
        return result if return_dict is not False else result.to_tuple()
