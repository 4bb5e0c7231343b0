"""Configuration of the multimodal fusion model (self-contained: a published checkpoint carries this file
as remote code, so it imports nothing from hf_multimax)."""

from __future__ import annotations

from transformers import PreTrainedConfig

__all__ = ["MODEL_TYPE", "ROLLINGQ_DEFAULTS", "MultimodalFusionConfig"]

MODEL_TYPE = "multimodal_fusion"

# The RollingQ values that work on the synthetic benchmark (docs/methods.md); the authors' defaults
# (beta=0, sigma=0, max_rotations=1) fire before any bias exists.
ROLLINGQ_DEFAULTS = {"enabled": False, "beta": 0.3, "sigma": 5.0, "max_rotations": 10}


def _fail(key, value, allowed):
    raise ValueError(f"MultimodalFusionConfig: {key}={value!r} is invalid; allowed: {allowed}")


class MultimodalFusionConfig(PreTrainedConfig):
    r"""Architecture and method settings of [`MultimodalFusionModel`].

    Each of the M >= 2 modalities is a sequence of token features: precomputed (`modality_input_sizes[m]`
    features per token) or produced by an encoder sub-model (`encoders[m]`, a transformers config dict,
    e.g. MiniLM's). Tokens are projected per modality to `hidden_size`, tagged with a modality embedding
    and read by a learned CLS query in `num_fusion_layers` fusion layers; a linear classifier reads the
    CLS state.

    Args:
        modality_names (`list[str]`): one name per modality; inputs are passed as a dict keyed by them.
            Default: `["a", "b"]`.
        modality_input_sizes (`list[int]`): features per token of each precomputed modality; for encoder
            modalities the encoder's hidden size is used (any value given there must match). Default:
            `[16, 16]`.
        encoders (`list[dict | None]`, *optional*): per modality, a transformers config dict
            (`AutoConfig...to_dict()`, with `model_type`) of the encoder that turns that modality's inputs
            into token features, or `None` for precomputed features. Default: `None` (all precomputed).
        freeze_encoders (`bool`): keep the encoder sub-models fixed (no gradients). Default: `True`.
        projection_hidden_size (`int`, *optional*): width of the per-token projection MLP
            (Linear-GELU-Linear); `None` makes it a single Linear. Default: `None`.
        hidden_size (`int`): width of the fusion layers. Default: `32`.
        num_attention_heads (`int`): heads of the CLS attention. Default: `1`.
        num_fusion_layers (`int`): CLS-query layers stacked on the (fixed) modality tokens. Default: `1`.
        intermediate_size (`int`): MLP width after each CLS attention; `0` means no MLP. Default: `0`.
        attention_logit_scale (`float`): multiplies the usual 1/sqrt(head_dim) score scaling (the
            benchmark uses 4, which sharpens the CLS attention so that imbalance shows). Default: `1.0`.
        hidden_dropout_prob, attention_dropout (`float`): dropout. Default: `0.0`.
        rollingq (`dict`, *optional*): `enabled` (bool), `beta` (AIR threshold, >= 0), `sigma` (>= 0,
            how strongly the target leans to the under-attended modalities), `max_rotations` (int >= 0).
            Missing keys take `ROLLINGQ_DEFAULTS`. Default: disabled.
        attribution_target (`list[float]`, *optional*): target share of each modality's attribution
            (length M, non-negative, sums to 1). Default: equal shares.
        attribution_weight (`float`): lambda of the attribution regularizer; `0` disables it. Default: `0.0`.
        initializer_range (`float`, *optional*): std of a normal init of weights and embeddings; `None`
            gives PyTorch's fan-in uniform init (embeddings and CLS N(0, 1)), which small fusion heads
            need to train with SGD. Default: `None`.

    Examples:
        ```python
        >>> config = MultimodalFusionConfig(modality_names=["audio", "video"], modality_input_sizes=[16, 16],
        ...                                 num_labels=6, rollingq={"enabled": True})
        ```
    """

    model_type = MODEL_TYPE
    # Trainer leaves these out of eval predictions (compute_metrics sees the logits only).
    keys_to_ignore_at_inference = ["attribution_shares", "modality_attention_mass", "attentions", "fusion_inputs", "rollingq_statistics"]

    modality_names: list[str] | None = None
    modality_input_sizes: list[int] | None = None
    encoders: list[dict | None] | None = None
    freeze_encoders: bool = True
    projection_hidden_size: int | None = None
    hidden_size: int = 32
    num_attention_heads: int = 1
    num_fusion_layers: int = 1
    intermediate_size: int = 0
    attention_logit_scale: float | int = 1.0
    hidden_dropout_prob: float | int = 0.0
    attention_dropout: float | int = 0.0
    layer_norm_eps: float | int = 1e-6
    rollingq: dict | None = None
    attribution_target: list[float | int] | None = None
    attribution_weight: float | int = 0.0
    initializer_range: float | None = None

    def __post_init__(self, **kwargs):
        if self.modality_names is None:
            self.modality_names = ["a", "b"]
        num = len(self.modality_names)
        if self.encoders is None:
            self.encoders = [None] * num
        if self.modality_input_sizes is None:
            self.modality_input_sizes = [16] * num
        super().__post_init__(**kwargs)
        self._validate()

    @property
    def num_modalities(self) -> int:
        return len(self.modality_names)

    @property
    def rollingq_settings(self) -> dict:
        return {**ROLLINGQ_DEFAULTS, **(self.rollingq or {})}

    @property
    def attribution_ratios(self) -> list[float]:
        return list(self.attribution_target) if self.attribution_target is not None else [1.0 / self.num_modalities] * self.num_modalities

    def _validate(self) -> None:
        names = list(self.modality_names)
        num = len(names)
        if num < 2 or len(set(names)) != num or not all(isinstance(n, str) and n for n in names):
            _fail("modality_names", names, "at least 2 distinct non-empty strings")
        self.modality_names = names
        for key in ("modality_input_sizes", "encoders"):
            if len(getattr(self, key)) != num:
                _fail(key, getattr(self, key), f"a list of length {num} (one entry per modality {names})")
        encoders = []
        for i, enc in enumerate(self.encoders):
            if enc is not None and not hasattr(enc, "to_dict") and not (isinstance(enc, dict) and "model_type" in enc):
                _fail(f"encoders[{i}]", enc, "None or a transformers config (or its dict with 'model_type')")
            enc = enc.to_dict() if hasattr(enc, "to_dict") else enc
            if enc is not None:
                hidden = enc.get("hidden_size")
                if not isinstance(hidden, int):
                    _fail(f"encoders[{i}]", enc.get("model_type"), "an encoder config with an integer hidden_size")
                # The fusion layer sees the encoder's last hidden states.
                self.modality_input_sizes[i] = hidden
            encoders.append(enc)
        self.encoders = encoders
        for i, size in enumerate(self.modality_input_sizes):
            if not isinstance(size, int) or size < 1:
                _fail(f"modality_input_sizes[{i}]", size, "a positive int")
        for key in ("hidden_size", "num_attention_heads", "num_fusion_layers"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                _fail(key, value, "a positive int")
        if self.hidden_size % self.num_attention_heads:
            _fail("num_attention_heads", self.num_attention_heads, f"a divisor of hidden_size={self.hidden_size}")
        if not isinstance(self.intermediate_size, int) or self.intermediate_size < 0:
            _fail("intermediate_size", self.intermediate_size, "an int >= 0 (0: no MLP)")
        if self.projection_hidden_size is not None and (not isinstance(self.projection_hidden_size, int) or self.projection_hidden_size < 1):
            _fail("projection_hidden_size", self.projection_hidden_size, "None or a positive int")
        if not self.attention_logit_scale > 0:
            _fail("attention_logit_scale", self.attention_logit_scale, "a float > 0")
        for key in ("hidden_dropout_prob", "attention_dropout"):
            if not 0.0 <= getattr(self, key) < 1.0:
                _fail(key, getattr(self, key), "a float in [0, 1)")
        self._validate_rollingq()
        self._validate_attribution()

    def _validate_rollingq(self) -> None:
        settings = self.rollingq or {}
        if not isinstance(settings, dict):
            _fail("rollingq", settings, f"None or a dict with keys {sorted(ROLLINGQ_DEFAULTS)}")
        unknown = sorted(set(settings) - set(ROLLINGQ_DEFAULTS))
        if unknown:
            _fail(f"rollingq[{unknown[0]!r}]", settings[unknown[0]], f"only the keys {sorted(ROLLINGQ_DEFAULTS)}")
        merged = {**ROLLINGQ_DEFAULTS, **settings}
        if not isinstance(merged["enabled"], bool):
            _fail("rollingq['enabled']", merged["enabled"], "True or False")
        for key in ("beta", "sigma"):
            value = merged[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                _fail(f"rollingq[{key!r}]", value, "a number >= 0")
        value = merged["max_rotations"]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            _fail("rollingq['max_rotations']", value, "an int >= 0")
        self.rollingq = merged

    def _validate_attribution(self) -> None:
        weight = self.attribution_weight
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
            _fail("attribution_weight", weight, "a number >= 0 (0 disables the regularizer)")
        target = self.attribution_target
        if target is None:
            return
        num = self.num_modalities
        if not isinstance(target, (list, tuple)) or len(target) != num:
            _fail("attribution_target", target, f"a list of {num} ratios (one per modality {self.modality_names})")
        if any(isinstance(r, bool) or not isinstance(r, (int, float)) or r < 0 for r in target):
            _fail("attribution_target", target, "non-negative numbers")
        if abs(sum(target) - 1.0) > 1e-6:
            _fail("attribution_target", target, f"ratios that sum to 1 (these sum to {sum(target)})")
        self.attribution_target = [float(r) for r in target]
