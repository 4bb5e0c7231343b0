"""Models with a sparse-attention indexer: transformers folds its selection into the mask for eager and
SDPA and hands it to every other implementation as a kwarg (`indices`, `block_indices`). Every plugin
attention folds it the same way, so at identity MultiMax computes what SDPA (or eager) computes, and
SparseMix runs densely over the indexer's selection; what the plugin does not know is refused.

transformers 5.25 passes `indices=` from deepseek_v32, glm_moe_dsa, axk2, dots3_note, hy_v4, hy_v4_vl
and mistral_large4, and `block_indices=` from minimax_m3_vl: all are built here. deepseek_v4 and
glm5_next fold their indexers' selections into the mask for every implementation; they are built too
(deepseek_v4 edits the mask as an additive float mask, which the plugin's mask function builds for it).
"""

import pytest
import torch
import transformers as tf
from transformers.models.dots3_note.configuration_dots3_note import Dots3NoteTextConfig
from transformers.models.dots3_note.modeling_dots3_note import Dots3NoteForCausalLM
from transformers.models.glm5_next.configuration_glm5_next import Glm5NextTextConfig
from transformers.models.glm5_next.modeling_glm5_next import Glm5NextTextModel
from transformers.models.hy_v4_vl.configuration_hy_v4_vl import HYV4VLTextConfig
from transformers.models.hy_v4_vl.modeling_hy_v4_vl import HYV4VLTextModel
from transformers.models.minimax_m3_vl.configuration_minimax_m3_vl import MiniMaxM3VLTextConfig
from transformers.models.minimax_m3_vl.modeling_minimax_m3_vl import MiniMaxM3VLForCausalLM
from transformers.models.mistral_large4.configuration_mistral_large4 import MistralLarge4TextConfig
from transformers.models.mistral_large4.modeling_mistral_large4 import MistralLarge4TextModel

from hf_multimax import collect_aux_losses
from hf_multimax.integrations.attention_utils import plugin_mask, refuse_unsupported
from hf_multimax.integrations.entmax_attention import entmax_attention_forward

L = 24  # tokens: index_topk=4 keys (DSA) or 2 blocks of 4 (MiniMax-M3) out of 24, so the selection matters
MLA = dict(vocab_size=100, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=4, kv_lora_rank=16,
           q_lora_rank=16, qk_rope_head_dim=8, v_head_dim=8, qk_nope_head_dim=8, n_group=1, topk_group=1,
           num_experts_per_tok=2, index_topk=4, index_head_dim=16, index_n_heads=2, head_dim=16)
IDS = dict(pad_token_id=0, bos_token_id=0, eos_token_id=1)
CAUSAL_LM = tf.AutoModelForCausalLM

# name -> (config factory, model class, reference attn_implementation, padding side). hy_v4(_vl) and
# deepseek_v4 have no SDPA path: eager is the reference. MiniMax-M3's block selection is anchored to
# absolute slots, so a left-padded row's first real queries may keep only padding blocks (its own TODO):
# rows that see no key are zeros in the plugin (DESIGN contract 5) and uniform in SDPA, so it is padded
# on the right, which transformers says is equivalent.
FAMILIES = {
    "deepseek_v32": (lambda: tf.DeepseekV32Config(**MLA, first_k_dense_replace=1), CAUSAL_LM, "sdpa", "left"),
    "glm_moe_dsa": (lambda: tf.GlmMoeDsaConfig(**MLA, first_k_dense_replace=1), CAUSAL_LM, "sdpa", "left"),
    "axk2": (lambda: tf.AXK2Config(**MLA, **IDS), CAUSAL_LM, "sdpa", "left"),
    "dots3_note": (lambda: Dots3NoteTextConfig(**MLA, **IDS), Dots3NoteForCausalLM, "sdpa", "left"),
    "hy_v4": (lambda: tf.HYV4Config(**MLA, **IDS), CAUSAL_LM, "eager", "left"),
    "hy_v4_vl": (
        lambda: HYV4VLTextConfig(**MLA, **IDS, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                               "mrope_section": [2, 1, 1]}),
        HYV4VLTextModel, "eager", "left"),
    "mistral_large4": (lambda: MistralLarge4TextConfig(**{k: v for k, v in MLA.items() if k != "q_lora_rank"}),
                       MistralLarge4TextModel, "sdpa", "left"),
    "minimax_m3_vl": (
        lambda: MiniMaxM3VLTextConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, index_n_heads=2,
                                      index_head_dim=8, index_block_size=4, index_topk_blocks=2, index_local_blocks=1,
                                      layer_types=["minimax_m3_sparse"] * 2),
        MiniMaxM3VLForCausalLM, "sdpa", "right"),
    # The selection is in the mask for every implementation (no kwarg).
    "deepseek_v4": (
        lambda: tf.DeepseekV4Config(vocab_size=100, hidden_size=32, moe_intermediate_size=16, num_hidden_layers=2,
                                    num_attention_heads=4, head_dim=16, q_lora_rank=16, qk_rope_head_dim=8,
                                    num_experts_per_tok=2, n_routed_experts=4, o_groups=2, o_lora_rank=8,
                                    index_n_heads=2, index_head_dim=8, index_topk=2, sliding_window=4,
                                    layer_types=["compressed_sparse_attention", "heavily_compressed_attention"],
                                    compress_rates={"compressed_sparse_attention": 2,
                                                    "heavily_compressed_attention": 4},
                                    mlp_layer_types=["moe", "moe"]),
        CAUSAL_LM, "eager", "left"),
    "glm5_next": (
        lambda: Glm5NextTextConfig(vocab_size=100, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                   n_routed_experts=4, kv_lora_rank=16, q_lora_rank=16, v_head_dim=8,
                                   qk_nope_head_dim=8, num_experts_per_tok=2, index_topk=4, index_head_dim=8,
                                   index_n_heads=2, index_kpool=2, pad_token_id=0, linear_head_dim=8,
                                   linear_num_heads=4, layer_types=["full_attention"] * 2),
        Glm5NextTextModel, "sdpa", "left"),
}
KWARG_FAMILIES = [name for name in FAMILIES if name not in ("deepseek_v4", "glm5_next")]


def _save(name, path):
    make_config, cls, _, _ = FAMILIES[name]
    torch.manual_seed(42)
    model = cls.from_config(make_config()) if cls is CAUSAL_LM else cls(make_config())
    model.save_pretrained(path)
    return cls


def _inputs(name):
    ids = torch.randint(2, 100, (2, L), generator=torch.Generator().manual_seed(42))
    mask = torch.ones(2, L, dtype=torch.long)
    if FAMILIES[name][3] == "left":
        mask[1, :5] = 0
    else:
        mask[1, -5:] = 0
    return dict(input_ids=ids, attention_mask=mask)


def _real(output, inputs):
    """The logits (or hidden states) at real positions: a padding query sees no key, which the plugin
    answers with zeros and SDPA/eager with a uniform average (DESIGN contract 5)."""
    x = output.logits if hasattr(output, "logits") else output.last_hidden_state
    return x[inputs["attention_mask"].bool()]


def _max_abs(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("name", list(FAMILIES))
def test_multimax_at_identity_equals_the_reference(name, tmp_path):
    cls = _save(name, tmp_path)
    ref_impl = FAMILIES[name][2]
    ref = cls.from_pretrained(tmp_path, attn_implementation=ref_impl).eval()
    mm = cls.from_pretrained(tmp_path, attn_implementation="multimax").eval()
    inputs = _inputs(name)
    with torch.no_grad():
        expected, actual = _real(ref(**inputs), inputs), _real(mm(**inputs), inputs)
    assert _max_abs(actual, expected) <= 1e-5, f"{name}: max abs diff {_max_abs(actual, expected):.3e} vs {ref_impl}"


@pytest.mark.parametrize("name", ["deepseek_v32", "hy_v4", "minimax_m3_vl"])
@pytest.mark.parametrize("normalizer", ["softmax", "multimax"])
def test_sparsemix_runs_densely_over_the_indexer_selection(name, normalizer, tmp_path):
    """Blocks of 4 and top-1 keep 12 of the 24 keys: without the model's selection SparseMix would run its
    own sparse path. It runs the dense path over the indexer's selection instead, which at identity is
    what SDPA (eager for hy_v4, whose sinks join the normaliser) computes."""
    cls = _save(name, tmp_path)
    ref = cls.from_pretrained(tmp_path, attn_implementation=FAMILIES[name][2]).eval()
    sm = cls.from_pretrained(tmp_path, attn_implementation="sparsemix",
                             sparsemix={"block_size": 4, "top_k": 1, "normalizer": normalizer}).eval()
    inputs = _inputs(name)
    with torch.no_grad():
        expected, actual = _real(ref(**inputs), inputs), _real(sm(**inputs), inputs)
    assert _max_abs(actual, expected) <= 1e-5, f"{name}: max abs diff {_max_abs(actual, expected):.3e}"


def test_deepseek_v32_training_gradients_equal_sdpa(tmp_path):
    """The folded selection in training: every gradient equals SDPA's at identity, and SparseMix adds no
    KL term (its scorer is not used over an indexer's selection)."""
    cls = _save("deepseek_v32", tmp_path)
    inputs = _inputs("deepseek_v32")
    grads, losses = {}, {}
    for impl, settings in (("sdpa", {}), ("multimax", {}), ("sparsemix", {"sparsemix": {"block_size": 4, "top_k": 1}})):
        model = cls.from_pretrained(tmp_path, attn_implementation=impl, **settings).train()
        with collect_aux_losses() as aux:
            out = model(**inputs, labels=inputs["input_ids"])
        assert not aux.terms, f"{impl}: unexpected auxiliary losses {list(aux.terms)}"
        out.loss.backward()
        losses[impl] = out.loss.detach()
        grads[impl] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    for impl in ("multimax", "sparsemix"):
        assert _max_abs(losses[impl], losses["sdpa"]) <= 1e-5
        for n, g in grads["sdpa"].items():
            scale = g.abs().max().clamp_min(1.0)
            assert _max_abs(grads[impl][n] / scale, g / scale) <= 1e-5, f"{impl} grad {n}"


@pytest.mark.parametrize("name, impls", [
    ("deepseek_v32", ("multimax", "sparsemix")),
    ("minimax_m3_vl", ("multimax", "sparsemix")),
    ("deepseek_v4", ("multimax", "sparsemix:dense_warmup")),  # its sparse path refuses (below)
])
def test_generation_equals_the_reference(name, impls, tmp_path):
    """Decoding with a cache: each step's selection covers the new query against every cached key."""
    cls = _save(name, tmp_path)
    inputs = _inputs(name)
    inputs = {k: v[:1, :12] for k, v in inputs.items()}  # one unpadded row: the mask may be left out
    kwargs = dict(max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True)
    ref_impl = FAMILIES[name][2]
    out = {}
    for impl in (ref_impl, *impls):
        model = cls.from_pretrained(tmp_path, attn_implementation=impl.split(":")[0], **_sparsemix_settings(impl))
        out[impl] = model.eval().generate(**inputs, **kwargs)
    for impl in impls:
        assert torch.equal(out[impl].sequences, out[ref_impl].sequences), impl
        assert _max_abs(torch.stack(out[impl].scores), torch.stack(out[ref_impl].scores)) <= 1e-5, impl


def _sparsemix_settings(impl):
    if not impl.startswith("sparsemix"):
        return {}
    return {"sparsemix": {"block_size": 4, "top_k": 1, "dense_warmup": impl.endswith("dense_warmup")}}


def test_sparsemix_refuses_keys_out_of_positional_order(tmp_path):
    """deepseek_v4 appends its compressed entries after its window's keys, and its mask lets early
    queries see them: the causal block geometry would hide them, so the sparse path refuses."""
    cls = _save("deepseek_v4", tmp_path)
    model = cls.from_pretrained(tmp_path, attn_implementation="sparsemix", **_sparsemix_settings("sparsemix"))
    with torch.no_grad(), pytest.raises(ValueError, match="keys after their own position"):
        model.eval()(**_inputs("deepseek_v4"))


def test_plugin_mask_is_eager_for_models_that_edit_it_as_floats():
    config = FAMILIES["deepseek_v4"][0]()
    mask = plugin_mask(batch_size=1, q_length=3, kv_length=3, config=config, dtype=torch.float32,
                       allow_is_causal_skip=True)
    assert mask.dtype == torch.float32 and mask[0, 0, 0, 1] == torch.finfo(torch.float32).min
    other = plugin_mask(batch_size=1, q_length=3, kv_length=3, config=tf.LlamaConfig(), dtype=torch.float32,
                        allow_is_causal_skip=False)
    assert other.dtype == torch.bool


class _Module(torch.nn.Module):
    is_causal = True


def _qkv():
    g = torch.Generator().manual_seed(42)
    return (torch.randn(2, 4, 6, 8, generator=g) for _ in range(3))


def test_entmax_baselines_fold_the_selection_like_the_eager_branch():
    """The entmax baselines, which no model above runs: `indices` gives what the mask with the selection
    folded in (as deepseek_v32's eager branch folds it) gives."""
    q, k, v = _qkv()
    indices = torch.tensor([[0, 1], [0, 2], [1, 2], [0, 3], [2, 4], [1, 5]]).expand(2, 6, 2)
    causal = torch.ones(6, 6, dtype=torch.bool).tril().expand(2, 1, 6, 6)
    folded = causal & torch.zeros(2, 1, 6, 6, dtype=torch.bool).scatter(-1, indices.unsqueeze(1), True)
    for normalizer in ("sparsemax", "entmax15"):
        got = entmax_attention_forward(_Module(), q, k, v, causal, normalizer=normalizer, indices=indices)[0]
        want = entmax_attention_forward(_Module(), q, k, v, folded, normalizer=normalizer)[0]
        dense = entmax_attention_forward(_Module(), q, k, v, causal, normalizer=normalizer)[0]
        torch.testing.assert_close(got, want)
        assert (got - dense).abs().max() > 1e-2, "the selection must change the output"
        # Without a mask: the module's causality, then the selection.
        got = entmax_attention_forward(_Module(), q, k, v, None, normalizer=normalizer, indices=indices)[0]
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("kwargs, match", [
    (dict(topk_indices=torch.zeros(2, 6, 2, dtype=torch.long)), "`topk_indices`, which looks like a selection"),
    (dict(indices=torch.zeros(2, 6, 2)), r"indices of shape \(2, 6, 2\), torch.float32 is not a selection"),
    (dict(indices=torch.full((2, 6, 2), 6)), r"positions outside the 6 keys"),
    (dict(block_indices=torch.zeros(2, 2, 6, 1, dtype=torch.long)), "has no `indexer.build_block_mask`"),
])
def test_unknown_or_malformed_selections_raise(kwargs, match):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=match):
        entmax_attention_forward(_Module(), q, k, v, None, normalizer="sparsemax", **kwargs)


def test_transformers_own_index_kwargs_are_not_selections():
    """Continuous batching passes its paged cache's addresses and the rows whose logits are kept through
    every attention call (`read_index`, `write_index`, `logits_indices`): not selections of keys."""
    kwargs = dict(read_index=[torch.arange(6)], write_index=[torch.arange(6)], logits_indices=torch.tensor([5]))
    for method in ("multimax", "sparsemix", "sparsemax"):
        refuse_unsupported(kwargs, method)
    with pytest.raises(ValueError, match="`kv_index`, which looks like a selection"):
        refuse_unsupported(dict(kv_index=torch.arange(6)), "multimax")
