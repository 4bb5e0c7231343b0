"""Walk every model type of the installed transformers whose attention goes through its
`AttentionInterface`, and check MultiMax at identity against SDPA on a tiny random model of each.

    .venv/bin/python scripts/walk_model_types.py --json benchmarks/results/model_types.json

A model type is walked when its base model class (`AutoModel`'s mapping) is defined in a module that
calls `ALL_ATTENTION_FUNCTIONS`, or declares `_supports_attention_backend` / `_supports_sdpa` (composite
models whose attention lives in their sub-models: LLaVA and the like). For each: a tiny config
(`tiny_config`: 2 layers, hidden 32, 4 heads, small vocab and intermediate sizes, in every
sub-config), the base model built twice from it, seeded, with `attn_implementation="sdpa"` and
`"multimax"` (same weights), one forward on small generated inputs (`make_inputs`), outputs compared
in fp32, then one backward of a fixed random projection of the outputs, every parameter's gradient
compared. Each type ends in one of:

- covered: outputs and gradients match within the tolerances below;
- refused: the plugin raised its own error (`ValueError` / `NotImplementedError` from hf_multimax)
  saying what it does not compute and what to use instead;
- not applicable: the model has no SDPA path (transformers refuses `"sdpa"` for it), or its class
  needs a package that is not installed;
- untested: the walk could not run the SDPA reference on any tiny config and inputs it knows (its
  own limit, not the plugin's; each with the error);
- failing: MultiMax raised anything else, or its outputs or gradients differ.

Tolerances (fp32): outputs within `OUT_TOL` of their scale (max |ref|, at least 1), each gradient
within `GRAD_TOL` of the largest gradient's scale. At identity MultiMax computes softmax of the same
scores; the kernels differ from SDPA's only in summation order, which in fp32 over 2 layers of tiny
width moves results by ~1e-7..1e-6 relative (the measured maximum is in the JSON). A wrong mask,
scale or causality moves them by 1e-2 or more. 1e-4 sits two orders above rounding and two below
the smallest real bug.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import inspect
import json
import os
import platform
import signal
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field

import torch

OUT_TOL = 1e-4
GRAD_TOL = 1e-4
PER_TYPE_TIMEOUT_S = 60
MAX_PARAMS = 30_000_000
MEMORY_LIMIT = 8 << 30  # address space of each type's child process

HIDDEN, HEADS, LAYERS, INTERMEDIATE, VOCAB = 32, 4, 2, 64, 99  # sizes in 4s: grouped_mm needs 16-byte strides
BATCH, SEQ = 2, 8


@dataclass
class Result:
    model_type: str
    model_class: str
    status: str  # covered | refused | not_applicable | untested | failing
    reason: str = ""
    shrink: str = ""  # which shrink level of the config ran
    inputs: list[str] = field(default_factory=list)
    out_err: float | None = None  # max |multimax - sdpa| / scale over the outputs
    grad_err: float | None = None  # max |grad diff| / largest |grad|
    n_params: int | None = None
    attention_modules: int | None = None  # modules given MultiMax scalars
    attention_calls: int | None = None  # of those, how many ran MultiMax in the forward
    seconds: float = 0.0


# --------------------------------------------------------------------------------------------- which types


def model_types() -> list[tuple[str, str]]:
    """(model_type, base model class name) of every type in `AutoModel`'s mapping, sorted."""
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    out = []
    for model_type, cls in MODEL_MAPPING_NAMES.items():
        out.append((model_type, cls[0] if isinstance(cls, (list, tuple)) else cls))
    return sorted(out)


def attention_kind(cls) -> str | None:
    """Why `cls` counts as going through `ALL_ATTENTION_FUNCTIONS`, or None."""
    try:
        path = inspect.getsourcefile(cls)
    except TypeError:
        return None
    with open(path) as f:
        if "ALL_ATTENTION_FUNCTIONS" in f.read():
            return "calls ALL_ATTENTION_FUNCTIONS"
    if getattr(cls, "_supports_attention_backend", False):
        return "_supports_attention_backend"
    if getattr(cls, "_supports_sdpa", False):
        return "_supports_sdpa"
    return None


def model_class(name: str):
    """The class, or None where it is a placeholder for a missing package."""
    import transformers

    cls = getattr(transformers, name)
    try:
        inspect.getsourcefile(cls)
    except TypeError:
        return None
    return cls if isinstance(cls, type) and hasattr(cls, "config_class") else None


# --------------------------------------------------------------------------------------------- tiny configs

_HIDDEN_KEYS = ("hidden_size", "d_model", "n_embd", "embed_dim", "dim", "hidden_dim", "d_embed", "embedding_size",
                "word_embed_proj_dim", "projection_dim", "text_embed_dim", "vision_embed_dim", "encoder_hidden_size",
                "decoder_hidden_size", "n_embed", "model_dim", "emb_dim", "d_kv_model")
_HEAD_KEYS = ("num_attention_heads", "n_head", "num_heads", "n_heads", "encoder_attention_heads",
              "decoder_attention_heads", "num_encoder_attention_heads", "num_decoder_attention_heads", "attention_heads")
_KV_KEYS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "multi_query_group_num")
_LAYER_KEYS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers", "encoder_layers", "decoder_layers",
               "num_encoder_layers", "num_decoder_layers", "depth", "text_layers", "vision_layers")
_INTER_KEYS = ("intermediate_size", "ffn_dim", "encoder_ffn_dim", "decoder_ffn_dim", "n_inner", "d_ff",
               "hidden_dim_ffn", "ffn_hidden_size", "mlp_dim", "feed_forward_size", "dim_feedforward", "d_inner")
_MOE_INTER_KEYS = ("moe_intermediate_size", "shared_expert_intermediate_size", "expert_intermediate_size")
_EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "num_routed_experts")
_TOPK_KEYS = ("num_experts_per_tok", "moe_topk", "num_experts_per_token", "top_k_experts", "moe_k")


def config_tree(config):
    """The config and every config nested in it (sub_configs, and config-valued attributes)."""
    from transformers import PreTrainedConfig

    seen, stack = set(), [config]
    while stack:
        c = stack.pop()
        if id(c) in seen:
            continue
        seen.add(id(c))
        yield c
        for value in list(vars(c).values()):
            if isinstance(value, PreTrainedConfig):
                stack.append(value)


def _set(c, key, value):
    try:
        current = getattr(c, key, None)
    except Exception:  # a per-layer attribute read globally (Gemma 4's head_dim)
        return
    if isinstance(current, int) and not isinstance(current, bool) and key in vars(c):
        with contextlib.suppress(Exception):
            setattr(c, key, value)


def _special_ids(c) -> list[int]:
    ids = []
    for key, value in vars(c).items():
        if ("token_id" in key or "token_index" in key) and isinstance(value, int) and not isinstance(value, bool):
            ids.append(value)
        elif ("token_id" in key) and isinstance(value, (list, tuple)):
            ids.extend(v for v in value if isinstance(v, int))
    return ids


def shrink(config, level: int):
    """Shrink `config` in place. Level 0: width 32, 4 heads (2 KV), 2 layers, small vocab and MLPs,
    at most 4 experts. Level 1: the same but the attention geometry (width, heads, head_dim) kept, for
    models whose shapes are tied to it (rotary sections, patch grids, windows). Level 2: only layers,
    vocab, experts and MLPs shrunk."""
    for c in config_tree(config):
        if level == 0:
            heads = None
            for key in _HEAD_KEYS:
                if isinstance(getattr(c, key, None), int) and key in vars(c):
                    heads = HEADS
                    _set(c, key, HEADS)
            for key in _HIDDEN_KEYS:
                _set(c, key, HIDDEN)
            for key in _KV_KEYS:
                if isinstance(getattr(c, key, None), int) and key in vars(c):
                    _set(c, key, 2 if heads else getattr(c, key))
            for key in ("head_dim", "kv_channels", "attention_head_dim", "d_kv", "qk_nope_head_dim", "v_head_dim",
                        "qk_rope_head_dim", "global_head_dim", "swa_head_dim"):
                _set(c, key, HIDDEN // HEADS)
            if "qk_head_dim" in vars(c) and "qk_nope_head_dim" in vars(c):  # derived in __init__, not on edit
                _set(c, "qk_head_dim", c.qk_nope_head_dim + c.qk_rope_head_dim)
            for key in ("q_lora_rank", "kv_lora_rank"):
                _set(c, key, 16)
            if "kv_lora_rank" in vars(c):  # multi-head latent attention: as many KV heads as heads
                for key in _KV_KEYS:
                    _set(c, key, HEADS)
            for key in ("rotary_dim", "rotary_emb_dim"):  # GPT-J, CodeGen: a rotary part of each head
                _set(c, key, HIDDEN // HEADS // 2)
        # Hybrids (Jamba and others): an attention layer among the first LAYERS.
        for key, value in (("attn_layer_period", 2), ("attn_layer_offset", 1), ("expert_layer_period", 2),
                           ("expert_layer_offset", 1)):
            _set(c, key, value)
        if isinstance(vars(c).get("attn_layer_indices"), (list, tuple)) and vars(c)["attn_layer_indices"]:
            c.attn_layer_indices = [1]
        if level <= 1:
            for key in ("image_size",):
                if isinstance(getattr(c, key, None), int) and key in vars(c) and level == 0:
                    patch = getattr(c, "patch_size", 16)
                    patch = patch if isinstance(patch, int) else 16
                    c.image_size = max(2 * patch, 32) if patch <= 16 else 2 * patch
        for key in _LAYER_KEYS:
            value = getattr(c, key, None)
            if isinstance(value, int) and not isinstance(value, bool) and key in vars(c) and value > LAYERS:
                setattr(c, key, LAYERS)
        if vars(c).get("use_repmixer_blocks"):  # SAM3-lite's text encoder: first and last layers are not attention
            c.num_hidden_layers = LAYERS + 1
        layer_types = vars(c).get("layer_types")
        if isinstance(layer_types, (list, tuple)) and len(layer_types) > LAYERS:
            kinds = list(dict.fromkeys(layer_types))[:LAYERS]
            kinds += [layer_types[-1]] * (LAYERS - len(kinds))
            c.layer_types = type(layer_types)(kinds)
        for key in _INTER_KEYS:
            value = getattr(c, key, None)
            if isinstance(value, int) and not isinstance(value, bool) and key in vars(c) and value > INTERMEDIATE:
                setattr(c, key, INTERMEDIATE if level == 0 else min(value, 64))
        # Defaults some configs leave as None though their models read them (DeepSeek-V2's top-k, dots1's
        # expert width, HunYuan's rope alpha).
        for keys, value in ((_TOPK_KEYS, 2), (_MOE_INTER_KEYS, 16), (_EXPERT_KEYS, 4)):
            for key in keys:
                if key in vars(c) and vars(c)[key] is None:
                    with contextlib.suppress(Exception):
                        setattr(c, key, value)
        rope = vars(c).get("rope_parameters")
        if isinstance(rope, dict) and "alpha" in rope and rope["alpha"] is None:
            rope["alpha"] = 1.0
        for key in _MOE_INTER_KEYS:
            value = getattr(c, key, None)
            if isinstance(value, int) and not isinstance(value, bool) and key in vars(c) and value > 16:
                setattr(c, key, 16)
        for key in _EXPERT_KEYS:
            value = getattr(c, key, None)
            if isinstance(value, int) and not isinstance(value, bool) and key in vars(c) and value > 4:
                setattr(c, key, 4)
        for key in _TOPK_KEYS:
            value = getattr(c, key, None)
            if isinstance(value, int) and not isinstance(value, bool) and key in vars(c) and value > 2:
                setattr(c, key, 2)
        for key in ("n_group", "topk_group"):
            if isinstance(getattr(c, key, None), int) and key in vars(c):
                setattr(c, key, 1)
        if isinstance(getattr(c, "vocab_size", None), int) and "vocab_size" in vars(c) and c.vocab_size > VOCAB:
            c.vocab_size = VOCAB
        if level == 0:
            _scale_rope_sections(c)
    _remap_special_ids(config)
    return config


def _remap_special_ids(config) -> None:
    """Special token ids (image, video, audio tokens, bos/eos/pad) past the small vocabulary are moved to
    its top, distinct ids to distinct ids, as transformers' own tests configure them."""
    vocab = min([c.vocab_size for c in config_tree(config) if isinstance(getattr(c, "vocab_size", None), int)
                 and "vocab_size" in vars(c)] or [VOCAB])
    mapping: dict[int, int] = {}
    for c in config_tree(config):
        for key, value in list(vars(c).items()):
            if not ("token_id" in key or "token_index" in key):
                continue
            if isinstance(value, int) and not isinstance(value, bool) and value >= vocab:
                setattr(c, key, mapping.setdefault(value, vocab - 1 - len(mapping)))
            elif isinstance(value, (list, tuple)) and any(isinstance(v, int) and v >= vocab for v in value):
                setattr(c, key, type(value)(mapping.setdefault(v, vocab - 1 - len(mapping)) if isinstance(v, int)
                                            and v >= vocab else v for v in value))


def _scale_rope_sections(c) -> None:
    """Multimodal rotary sections (Qwen2-VL's `mrope_section`, default [16, 24, 24] for head_dim 128) scaled
    to the tiny head_dim, as the sections must add up to the rotary half-dimension."""
    rope = vars(c).get("rope_parameters")
    if not isinstance(rope, dict) or "head_dim" not in vars(c) and "num_attention_heads" not in vars(c):
        return
    source = _modeling_source(c)
    if "mrope_section" not in source:
        return
    head_dim = vars(c).get("head_dim") or (c.hidden_size // c.num_attention_heads)
    half = int(head_dim * rope.get("partial_rotary_factor", getattr(c, "partial_rotary_factor", 1.0) or 1.0)) // 2
    sections = rope.get("mrope_section") or [16, 24, 24]
    total = sum(sections)
    scaled = [max(1, round(s * half / total)) for s in sections]
    scaled[-1] += half - sum(scaled)
    rope["mrope_section"] = scaled


def _modeling_source(c) -> str:
    path = inspect.getsourcefile(type(c)).replace("configuration_", "modeling_")
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def tiny_config(model_type: str, level: int):
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type)
    shrink(config, level)
    # A config re-validated after edits (sliding windows, rope sections) is checked by building it.
    return config


# --------------------------------------------------------------------------------------------- inputs


def _first(config, *keys, default=None):
    for c in config_tree(config):
        for key in keys:
            value = getattr(c, key, None)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
    return default


def _image_geometry(config):
    size = _first(config, "image_size", "crop_size", default=32)
    if isinstance(size, (list, tuple)):
        size = size[0]
    channels = _first(config, "num_channels", "in_channels", "num_channels_in", default=3)
    return size, channels


def make_inputs(model, config, recipe: str) -> dict:
    """Small inputs for the forward of `model`. Recipes: "text" (ids of length SEQ, right padding of
    2 in the second row), "text_nopad", "image", "text+image", "audio_values", "audio_features"."""
    g = torch.Generator().manual_seed(0)
    params = inspect.signature(model.forward).parameters
    inputs = {}
    vocab = _first(config, "vocab_size", default=VOCAB)
    specials = {i for c in config_tree(config) for i in _special_ids(c)}
    if "text" in recipe:
        ids = torch.randint(3, max(4, min(vocab, VOCAB)), (BATCH, SEQ), generator=g)
        for s in specials:
            ids[ids == s] = 3 if s != 3 else 4
        inputs["input_ids"] = ids
        mask = torch.ones(BATCH, SEQ, dtype=torch.long)
        if recipe != "text_nopad" and "nopad" not in recipe:
            mask[1, -2:] = 0
        if "attention_mask" in params:
            inputs["attention_mask"] = mask
        if "decoder_input_ids" in params:
            inputs["decoder_input_ids"] = ids.clone()
            if "decoder_attention_mask" in params:
                inputs["decoder_attention_mask"] = mask.clone()
    if "image" in recipe:
        size, channels = _image_geometry(config)
        inputs["pixel_values"] = torch.randn(BATCH, channels, size, size, generator=g)
        if "text" not in recipe and "decoder_input_ids" in params:
            inputs["decoder_input_ids"] = torch.randint(3, max(4, min(vocab, VOCAB)), (BATCH, SEQ), generator=g)
    if recipe == "patches":  # Qwen-VL-style vision encoders: flattened patches of one image and its grid
        grid_key = next(k for k in params if k.endswith("grid_thw"))
        data_key = next(k for k in ("hidden_states", "pixel_values") if k in params)
        channels = _first(config, "in_channels", "num_channels", default=3)
        patch = _first(config, "patch_size", default=14)
        temporal = _first(config, "temporal_patch_size", default=1)
        merge = _first(config, "spatial_merge_size", default=2)
        side = 2 * merge
        inputs[data_key] = torch.randn(side * side, channels * temporal * patch * patch, generator=g)
        inputs[grid_key] = torch.tensor([[1, side, side]])
    if recipe == "audio_values":
        inputs["input_values"] = torch.randn(BATCH, 1600, generator=g)
        if "decoder_input_ids" in params:
            inputs["decoder_input_ids"] = torch.randint(3, max(4, min(vocab, VOCAB)), (BATCH, SEQ), generator=g)
    if recipe == "audio_features":
        bins = _first(config, "num_mel_bins", "feature_size", "n_mels", "input_feat_per_channel", default=80)
        frames = _first(config, "max_source_positions", default=SEQ * 4)
        frames = 2 * frames if "whisper" in config.model_type or "max_source_positions" in str(vars(config)) else frames
        inputs["input_features"] = torch.randn(BATCH, bins, min(frames, 3000), generator=g)
        if "decoder_input_ids" in params:
            inputs["decoder_input_ids"] = torch.randint(3, max(4, min(vocab, VOCAB)), (BATCH, SEQ), generator=g)
    return {k: v for k, v in inputs.items() if k in params or any(p.kind == p.VAR_KEYWORD for p in params.values())}


def recipes_for(model) -> list[str]:
    params = inspect.signature(model.forward).parameters
    main = getattr(model, "main_input_name", "input_ids")
    out = []
    if main == "input_ids" or "input_ids" in params:
        out += ["text", "text_nopad"]
        if "pixel_values" in params:
            out += ["text+image"]
    if main == "pixel_values" or ("pixel_values" in params and "input_ids" not in params):
        out += ["image"]
    if any(k.endswith("grid_thw") for k in params) and ("hidden_states" in params or "pixel_values" in params):
        out.insert(0, "patches")
    if main == "input_values" or "input_values" in params:
        out += ["audio_values"]
    if main == "input_features" or "input_features" in params:
        out += ["audio_features"]
    return out or ["text"]


# --------------------------------------------------------------------------------------------- one type


class _Timeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: int):
    def handler(signum, frame):
        raise _Timeout(f"over {seconds} s")

    old = signal.signal(signal.SIGALRM, handler)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _tensors(output, prefix="out"):
    """The floating tensors of a model output, by path."""
    if torch.is_tensor(output):
        if output.is_floating_point():
            yield prefix, output
        return
    if hasattr(output, "to_tuple") and hasattr(output, "keys"):
        items = [(k, output[k]) for k in output.keys()]
    elif isinstance(output, dict):
        items = list(output.items())
    elif isinstance(output, (list, tuple)):
        items = list(enumerate(output))
    else:
        return
    for key, value in items:
        if key in ("past_key_values",) or "cache" in str(key):
            continue
        yield from _tensors(value, f"{prefix}.{key}")


def _plugin_error(exc: BaseException) -> bool:
    """Raised by hf_multimax itself, as one of its documented refusals."""
    if not isinstance(exc, (ValueError, NotImplementedError)):
        return False
    tb = exc.__traceback__
    last = None
    while tb is not None:
        last = tb.tb_frame.f_code.co_filename
        tb = tb.tb_next
    return last is not None and f"{os.sep}hf_multimax{os.sep}" in last


def _own_table_lookup(exc: BaseException) -> str | None:
    """The source line, where `exc` is the KeyError of a model's own `{"eager": ..., "sdpa": ...}[config.
    _attn_implementation]` class table asked for a name it does not hold (SAM, BEiT's copies)."""
    frames = traceback.extract_tb(exc.__traceback__)
    line = frames[-1].line if frames else ""
    if isinstance(exc, KeyError) and exc.args and str(exc.args[0]).startswith("multimax") and line \
            and "[config._attn_implementation]" in line.replace(" ", ""):
        return line.strip()
    return None


def _missing_package(exc: BaseException) -> bool:
    return isinstance(exc, ImportError) and "requires the" in str(exc) and "library" in str(exc)


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return text[:400]


def _where(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    return f"{os.path.basename(frames[-1].filename)}:{frames[-1].lineno}" if frames else ""


def _build(cls, config, attn: str):
    import transformers  # noqa: F401

    config = copy.deepcopy(config)
    torch.manual_seed(0)
    model = cls._from_config(config, attn_implementation=attn, dtype=torch.float32)
    return model.eval()


def _loss_weights(outputs) -> dict:
    g = torch.Generator().manual_seed(1)
    return {path: torch.randn(t.shape, generator=g) for path, t in outputs}


def _run(model, inputs, weights=None):
    model.zero_grad(set_to_none=True)
    out = model(**copy.deepcopy(inputs))
    tensors = [(p, t) for p, t in _tensors(out) if t.requires_grad or t.is_floating_point()]
    if weights is None:
        weights = _loss_weights([(p, t.detach()) for p, t in tensors])
    loss = sum((t * weights[p]).sum() for p, t in tensors if t.requires_grad and p in weights)
    if torch.is_tensor(loss):
        loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None and p.numel()}
    return {p: t.detach() for p, t in tensors}, grads, weights


def _sdpa_unsupported(exc: BaseException) -> bool:
    text = str(exc)
    return isinstance(exc, ValueError) and ("does not support an attention implementation through torch.nn.functional"
                                            ".scaled_dot_product_attention" in text or "sdpa" in text.lower()
                                            and "not support" in text.lower())


def check_type_isolated(model_type: str, class_name: str, timeout: int = PER_TYPE_TIMEOUT_S) -> Result:
    """`check_type` in a forked child (transformers imported once, in the parent), killed after `timeout` s
    with its memory capped: a type that hangs in one long kernel or grows too large cannot stop the walk."""
    read_fd, write_fd = os.pipe()
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # the child
        os.close(read_fd)
        code = 0
        try:
            import resource

            resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
            payload = json.dumps(asdict(check_type(model_type, class_name, timeout))).encode()
        except BaseException as exc:  # noqa: BLE001  (reported, never raised in the child)
            payload = json.dumps(asdict(Result(model_type, class_name, "untested", f"walk error: {_short(exc)}"))).encode()
            code = 1
        with os.fdopen(write_fd, "wb") as f:
            f.write(payload)
        os._exit(code)
    os.close(write_fd)
    chunks, deadline = [], start + timeout + 15
    import selectors

    with os.fdopen(read_fd, "rb") as f, selectors.DefaultSelector() as sel:
        sel.register(f, selectors.EVENT_READ)
        while True:
            if not sel.select(timeout=max(0.0, deadline - time.perf_counter())):
                os.kill(pid, signal.SIGKILL)
                break
            chunk = os.read(f.fileno(), 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
    _, status = os.waitpid(pid, 0)
    if chunks:
        return Result(**json.loads(b"".join(chunks)))
    why = f"killed after {timeout + 15} s" if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL \
        else f"child exited with status {status} (memory over {MEMORY_LIMIT >> 30} GiB?)"
    return Result(model_type, class_name, "untested", f"the walk's check did not finish: {why}",
                  seconds=round(time.perf_counter() - start, 2))


def check_type(model_type: str, class_name: str, timeout: int = PER_TYPE_TIMEOUT_S) -> Result:
    start = time.perf_counter()
    result = Result(model_type, class_name, "untested")
    try:
        with time_limit(timeout):
            _check(result)
    except _Timeout as exc:
        if result.status == "untested":
            result.reason = f"{result.reason} (timed out: {exc})".strip()
        else:
            result.status, result.reason = "failing", f"multimax timed out: {exc}"
    result.seconds = round(time.perf_counter() - start, 2)
    return result


def _check(result: Result) -> None:
    import hf_multimax  # noqa: F401  (registers "multimax")

    try:
        cls = model_class(result.model_class)
    except Exception as exc:  # a class whose import fails here
        result.status, result.reason = "not_applicable", f"class does not import: {_short(exc)}"
        return
    if cls is None:
        result.status, result.reason = "not_applicable", "the class needs a package that is not installed"
        return
    if not getattr(cls, "_supports_sdpa", False):
        result.status, result.reason = "not_applicable", f"{cls.__name__}._supports_sdpa is False: no SDPA path"
        return
    errors = []
    for level in (0, 1, 2):
        try:
            config = tiny_config(result.model_type, level)
            if level:  # the wider levels keep a model's own width: skip those too large to build quickly
                with torch.device("meta"):
                    size = sum(p.numel() for p in _build(cls, config, "sdpa").parameters())
                if size > MAX_PARAMS:
                    errors.append(f"level {level}: {size / 1e6:.0f}M parameters, over the walk's {MAX_PARAMS / 1e6:.0f}M")
                    continue
            ref = _build(cls, config, "sdpa")
        except _Timeout:
            raise
        except Exception as exc:
            if _sdpa_unsupported(exc):
                result.status, result.reason = "not_applicable", _short(exc)
                return
            if _missing_package(exc):
                result.status, result.reason = "not_applicable", f"needs a package that is not installed: {_short(exc)}"
                return
            errors.append(f"level {level} build: {_short(exc)} [{_where(exc)}]")
            continue
        for recipe in recipes_for(ref):
            try:
                inputs = make_inputs(ref, config, recipe)
                ref_out, ref_grads, weights = _run(ref, inputs)
                if not ref_out:
                    raise RuntimeError("no floating output")
                bad = [p for p, t in ref_out.items() if not torch.isfinite(t).all()]
                if bad:
                    raise RuntimeError(f"non-finite SDPA outputs {bad[:3]}")
            except _Timeout:
                raise
            except Exception as exc:
                errors.append(f"level {level} {recipe}: {_short(exc)} [{_where(exc)}]")
                continue
            result.shrink, result.inputs = ["tiny", "tiny, attention geometry kept", "layers/vocab/MLP only"][level], \
                sorted(inputs)
            result.n_params = sum(p.numel() for p in ref.parameters())
            _compare(result, cls, config, ref, inputs, ref_out, ref_grads, weights)
            return
    result.status = "untested"
    result.reason = "the SDPA reference did not run: " + " | ".join(errors[:1] + errors[-2:] if len(errors) > 3 else errors)


def _compare(result, cls, config, ref, inputs, ref_out, ref_grads, weights) -> None:
    try:
        model = _build(cls, config, "multimax")
        missing, unexpected = model.load_state_dict(ref.state_dict(), strict=False)
        if unexpected or any(".multimax." not in k and not k.endswith("multimax") for k in missing):
            raise RuntimeError(f"state dicts differ: missing {missing[:3]}, unexpected {unexpected[:3]}")
        if not any(type(m).__name__ == "MultiMaxModulator" for m in model.modules()):
            raise RuntimeError("no MultiMax layer was attached")
        layers = [m for m in model.modules() if type(m).__name__ == "MultiMaxModulator"]
        calls = []
        hooks = [m.register_forward_hook(lambda m, a, o: calls.append(id(m))) for m in layers]
        out, grads, _ = _run(model, inputs, weights)
        for h in hooks:
            h.remove()
        result.attention_modules, result.attention_calls = len(layers), len(set(calls))
        if not calls:
            raise RuntimeError(f"MultiMax scalars attached to {len(layers)} modules but the forward never ran MultiMax")
    except _Timeout:
        raise
    except Exception as exc:
        if _plugin_error(exc):
            result.status, result.reason = "refused", _short(exc)
        elif _own_table_lookup(exc):
            result.status = "not_applicable"
            result.reason = ("picks its attention class from its own table keyed by attn_implementation (eager/sdpa), "
                             f"not from ALL_ATTENTION_FUNCTIONS: `{_own_table_lookup(exc)}` raised KeyError "
                             f"{exc.args[0]!r} [{_where(exc)}]")
        else:
            result.status, result.reason = "failing", f"{_short(exc)} [{_where(exc)}]"
        return
    out_err, worst = 0.0, ""
    for path, t in ref_out.items():
        if path not in out or out[path].shape != t.shape:
            result.status, result.reason = "failing", f"output {path} missing or of another shape"
            return
        scale = max(1.0, float(t.abs().max()))
        err = float((out[path] - t).abs().max()) / scale
        if not err <= out_err:
            out_err, worst = err, path
    grad_scale = max([float(g.abs().max()) for g in ref_grads.values()] + [1e-30])
    grad_err, gworst = 0.0, ""
    for name, g in ref_grads.items():
        if name not in grads:
            result.status, result.reason = "failing", f"no gradient for {name} with multimax"
            return
        err = float((grads[name] - g).abs().max()) / grad_scale
        if not err <= grad_err:
            grad_err, gworst = err, name
    result.out_err, result.grad_err = out_err, grad_err
    if not ref_grads:
        result.status, result.reason = "failing", "no parameter received a gradient"
    elif out_err > OUT_TOL or grad_err > GRAD_TOL:
        result.status = "failing"
        result.reason = f"output {worst} off by {out_err:.2e} of its scale, gradient {gworst} by {grad_err:.2e}"
    else:
        result.status = "covered"
        result.reason = f"{len(ref_out)} outputs, {len(ref_grads)} gradients"


# --------------------------------------------------------------------------------------------- the walk


def walk(only: list[str] | None = None, log=print, isolated: bool = True) -> dict:
    import transformers

    import hf_multimax  # noqa: F401  (before forking: registered once)

    torch.set_num_threads(1)
    start = time.perf_counter()
    results, skipped = [], []
    for model_type, class_name in model_types():
        if only and model_type not in only:
            continue
        try:
            cls = model_class(class_name)
        except Exception:
            cls = None
        if cls is not None and attention_kind(cls) is None:
            skipped.append(model_type)
            continue
        r = check_type_isolated(model_type, class_name) if isolated else check_type(model_type, class_name)
        results.append(r)
        log(f"{r.model_type:32s} {r.status:14s} {r.seconds:6.1f}s  {r.reason[:150]}")
    counts = {s: sum(r.status == s for r in results)
              for s in ("covered", "refused", "not_applicable", "untested", "failing")}
    errs = [r for r in results if r.out_err is not None]
    return {
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} cores, torch threads 1",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": ".venv/bin/python scripts/walk_model_types.py" + (f" --only {' '.join(only)}" if only else ""),
        "seconds": round(time.perf_counter() - start, 1),
        "tolerances": {"outputs": OUT_TOL, "gradients": GRAD_TOL},
        "walked": len(results),
        "not_walked": {"count": len(skipped), "why": "base class's module does not call ALL_ATTENTION_FUNCTIONS and "
                       "declares neither _supports_attention_backend nor _supports_sdpa", "types": skipped},
        "counts": counts,
        "max_out_err": max((r.out_err for r in errs), default=None),
        "max_grad_err": max((r.grad_err for r in errs), default=None),
        "results": [asdict(r) for r in results],
    }


def print_table(report: dict, file=sys.stdout) -> None:
    for status in ("failing", "untested", "refused", "not_applicable", "covered"):
        rows = [r for r in report["results"] if r["status"] == status]
        if not rows:
            continue
        print(f"\n## {status} ({len(rows)})", file=file)
        for r in rows:
            err = "" if r["out_err"] is None else f" out {r['out_err']:.1e} grad {r['grad_err']:.1e}"
            print(f"{r['model_type']:32s}{err:28s} {r['reason'][:200]}", file=file)
    print(f"\n{report['counts']}; {report['walked']} walked, {report['not_walked']['count']} not walked; "
          f"{report['seconds']} s; max out err {report['max_out_err']}, max grad err {report['max_grad_err']}", file=file)


def write_markdown(report: dict, path: str, json_path: str | None = None) -> None:
    """docs/model-coverage.md from a report."""
    c = report["counts"]
    rows = report["results"]

    def names(status):
        return ", ".join(f"`{r['model_type']}`" if "`" not in r["model_type"] else r["model_type"]
                         for r in rows if r["status"] == status) or "none"

    def short(text, n=220):
        text = text.replace("|", "/").replace("`", "'")
        return text if len(text) <= n else text[:n] + "..."

    command = ".venv/bin/python scripts/walk_model_types.py" + (f" --json {json_path}" if json_path else "") + \
        f" --markdown {path}"
    lines = [
        "# Every model type, checked by machine",
        "",
        "`scripts/walk_model_types.py` walks every model type of the installed transformers whose base model "
        "(`AutoModel`'s mapping) is defined in a module that calls `ALL_ATTENTION_FUNCTIONS`, or declares "
        "`_supports_attention_backend` or `_supports_sdpa` (composite models whose attention lives in their "
        "sub-models). For each it builds a tiny random model (2 layers, width 32, 4 heads, 2 KV heads, vocabulary "
        "99, in every sub-config; wider only where a model's shapes are tied to its width), seeded, twice: "
        "`attn_implementation=\"sdpa\"` and `\"multimax\"` with the same weights, runs one forward on small "
        "generated inputs (token ids with a padded row, images, audio, or a vision encoder's patches and grid) "
        "and one backward, and compares every floating output and every parameter's gradient in fp32. It also "
        "checks that MultiMax actually ran (its layers' forward hooks fired). Each type runs in a forked child "
        f"with a {PER_TYPE_TIMEOUT_S} s limit and an {MEMORY_LIMIT >> 30} GiB address-space limit. The slow test "
        "[`tests/integrations/test_every_model_type.py`](../tests/integrations/test_every_model_type.py) runs "
        "the walk and asserts that no type fails.",
        "",
        f"Tolerances: outputs within {OUT_TOL:g} of their scale (max |SDPA output|, at least 1), gradients within "
        f"{GRAD_TOL:g} of the largest gradient. At identity MultiMax is softmax of the same scores; its kernels "
        "differ from SDPA's in summation order only, which in fp32 moves these tiny models' results by about "
        f"1e-7..1e-6 (measured maximum here: outputs {report['max_out_err']:.1e}, gradients "
        f"{report['max_grad_err']:.1e}); a wrong mask, scale or causality moves them by 1e-2 or more.",
        "",
        "## Latest run",
        "",
        f"{report['date']}; transformers {report['transformers']}, torch {report['torch']}; {report['machine']} "
        f"(shared with other jobs); the walk took {report['seconds'] / 60:.0f} min.",
        "",
        "```bash",
        command,
        "```",
        "",
        "| status | model types | meaning |",
        "|---|---|---|",
        f"| covered | {c['covered']} | outputs and gradients match SDPA |",
        f"| refused | {c['refused']} | the plugin raises its own error naming what it does not compute and what to use |",
        f"| not applicable | {c['not_applicable']} | no SDPA path in transformers, an attention class table of the "
        "model's own (not `ALL_ATTENTION_FUNCTIONS`), or a package not installed |",
        f"| untested | {c['untested']} | the walk's generic tiny config or inputs did not run the SDPA reference: "
        "the walk's limit, not a verdict on the plugin |",
        f"| failing | {c['failing']} | MultiMax raises or differs where SDPA runs |",
        f"| walked | {report['walked']} | |",
        "",
        f"Not walked: {report['not_walked']['count']} types whose base class's module does not call "
        "`ALL_ATTENTION_FUNCTIONS` and declares neither flag (convolutional models, state-space models, models "
        "with hand-written attention).",
        "",
        "### Failing",
        "",
        names("failing") if not c["failing"] else "\n".join(f"- `{r['model_type']}`: {short(r['reason'])}"
                                                           for r in rows if r["status"] == "failing"),
        "",
        "### Refused",
        "",
        *[f"- `{r['model_type']}`: {short(r['reason'])}" for r in rows if r["status"] == "refused"],
        *(["none"] if not c["refused"] else []),
        "",
        "### Not applicable",
        "",
        *[f"- `{r['model_type']}`: {short(r['reason'], 160)}" for r in rows if r["status"] == "not_applicable"],
        "",
        "### Untested",
        "",
        "The first error the SDPA reference gave with the walk's tiny config and inputs:",
        "",
        *[f"- `{r['model_type']}`: {short(r['reason'].replace('the SDPA reference did not run: ', ''), 200)}"
          for r in rows if r["status"] == "untested"],
        "",
        "### Covered",
        "",
        names("covered"),
        "",
    ]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the report here")
    parser.add_argument("--only", nargs="*", help="these model types only")
    parser.add_argument("--markdown", help="write the coverage page here (docs/model-coverage.md)")
    parser.add_argument("--from-json", help="no walk: read the report from this JSON (with --markdown)")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if args.from_json:
        with open(args.from_json) as f:
            report = json.load(f)
    else:
        report = walk(args.only, log=lambda line: print(line, flush=True))
    print_table(report)
    if args.json and not args.from_json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    if args.markdown:
        write_markdown(report, args.markdown, args.json or args.from_json)
    return 1 if report["counts"]["failing"] else 0


if __name__ == "__main__":
    sys.exit(main())
