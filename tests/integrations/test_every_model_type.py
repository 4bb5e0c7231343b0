"""Every model type of the installed transformers whose attention goes through `ALL_ATTENTION_FUNCTIONS`:
MultiMax at identity against SDPA on a tiny random model of each (scripts/walk_model_types.py, which
prints the table; docs/model-coverage.md has the latest counts). Plus the regressions the walk found."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _walker():
    spec = importlib.util.spec_from_file_location("walk_model_types", ROOT / "scripts" / "walk_model_types.py")
    module = sys.modules.get(spec.name) or importlib.util.module_from_spec(spec)
    if spec.name not in sys.modules:
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # the whole walk: 521 types, each in a forked child; 20-26 min on 2 shared cores
def test_every_model_type_matches_sdpa_or_is_refused(capsys):
    walk = _walker()
    report = walk.walk(log=lambda line: None)
    with capsys.disabled():
        walk.print_table(report)
    failing = [(r["model_type"], r["reason"]) for r in report["results"] if r["status"] == "failing"]
    assert not failing, f"{len(failing)} model types fail with MultiMax where SDPA runs: {failing}"
    # The walk must actually cover the mainstream: a walker that silently stopped building models
    # would pass the assertion above with everything "untested".
    covered = {r["model_type"] for r in report["results"] if r["status"] == "covered"}
    assert {"llama", "bert", "gpt2", "t5", "vit", "whisper", "clip", "llava", "qwen2_vl", "gemma3"} <= covered
    assert report["counts"]["covered"] >= 300, report["counts"]
    # Every refusal is the plugin's own, naming what it does not do.
    for r in report["results"]:
        if r["status"] == "refused":
            assert "attn_implementation" in r["reason"] or "multimax" in r["reason"], r


# --------------------------------------------------------------------------------------------- regressions


@pytest.mark.parametrize("model_type", ["glm_image", "janus", "llama4"])
def test_composite_model_with_an_attention_free_sub_model(model_type):
    """A composite model builds its VQ-VAE / vision tower as a sub-model first, whose own post_init found
    no attention module and refused the whole model (ValueError), though its language model's attention
    goes through the interface. Found by the walk (also cosmos3_edge, granite_speech(_plus),
    inkling_mm_model, mllama, muse_spark)."""
    walk = _walker()
    torch.set_num_threads(1)
    result = walk.check_type(model_type, dict(walk.model_types())[model_type])
    assert result.status == "covered", result
    assert result.out_err <= walk.OUT_TOL and result.grad_err <= walk.GRAD_TOL
    assert result.attention_calls >= 2, result  # the language model's (text inputs: the towers do not run)


def test_a_sub_model_that_holds_none_of_its_declared_attention_classes():
    """Cosmos3-Edge's vision model inherits `_can_record_outputs` (its text attention) from the shared
    pretrained class and holds none of it: its own attention, which calls the interface, was not found
    (alone: refused; in the composite: no scalars, so an image input would raise). Found by the walk."""
    walk = _walker()
    torch.set_num_threads(1)
    result = walk.check_type("cosmos3_edge_vision", "Cosmos3EdgeVisionModel")
    assert result.status == "covered", result
    assert result.attention_calls == result.attention_modules == 2, result


def test_a_model_without_attention_is_still_refused_on_its_own():
    """The composite fix must not let a model with no attention at all pass as MultiMax."""
    walk = _walker()
    from transformers import GlmImageVQVAE

    config = walk.tiny_config("glm_image", 0).vq_config
    with pytest.raises(ValueError, match="found no attention module"):
        GlmImageVQVAE._from_config(config, attn_implementation="multimax")


def test_walk_classifies_a_model_with_its_own_attention_table():
    """Data2Vec-vision picks its attention class from its own {eager, sdpa} table (never
    ALL_ATTENTION_FUNCTIONS): not applicable, with the line that looked it up. BERT: covered, every
    attention module ran MultiMax."""
    walk = _walker()
    d2v = walk.check_type("data2vec-vision", "Data2VecVisionModel")
    assert d2v.status == "not_applicable" and "DATA2VEC_VISION_SELF_ATTENTION_CLASSES" in d2v.reason, d2v
    bert = walk.check_type("bert", "BertModel")
    assert bert.status == "covered" and bert.attention_calls == bert.attention_modules == 2, bert


def test_swin_stage_declared_and_its_zero_initialised_position_bias_trains():
    """Swin declares its stage (which holds a config but no `is_causal`) as the attention class: the
    scalars went on the stage, so its attention modules raised at the first forward. And its relative
    position table starts at zero, so the float mask it hands over was all zeros where kept and the
    bias was dropped: the table got no gradient and would never train. Found by the walk."""
    walk = _walker()
    torch.set_num_threads(1)
    result = walk.check_type("swin", "SwinModel")
    assert result.status == "covered", result
    assert result.attention_calls == result.attention_modules > 0, result


def test_a_zero_bias_that_trains_gets_its_gradient():
    """At the function level: an all-zero additive float mask that requires grad gets SDPA's gradient."""
    from transformers import AutoModel, LlamaConfig

    from hf_multimax.integrations.multimax_attention import multimax_attention_forward

    config = LlamaConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=1, vocab_size=10, intermediate_size=8)
    module = AutoModel.from_config(config, attn_implementation="multimax").layers[0].self_attn
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 5, 8, generator=g) for _ in range(3))
    weights = torch.randn(2, 5, 4, 8, generator=g)
    grads = []
    for run in ("multimax", "sdpa"):
        bias = torch.zeros(1, 4, 5, 5, requires_grad=True)
        if run == "multimax":
            out, _ = multimax_attention_forward(module, q, k, v, bias * 1.0, scaling=0.35, is_causal=False)
        else:
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias * 1.0, scale=0.35)
            out = out.transpose(1, 2)
        (out * weights).sum().backward()
        grads.append(bias.grad)
    assert grads[0] is not None and float(grads[1].abs().max()) > 0
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)
