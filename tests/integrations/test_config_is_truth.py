"""The config is the truth at run time: edits take effect on the next forward or are refused, and
save_pretrained writes what ran. Modules are found without reading source; `target_modules`
overrides; `auto` falls back inside the method's own backends."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import hf_multimax

from hf_multimax.ops.backends import AttentionCall
from hf_multimax.ops.multimax import BACKENDS
from tests.conftest import assert_close

LLAMA = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)


def build(attn="multimax", **settings):
    torch.manual_seed(0)
    config = LlamaConfig(**LLAMA)
    if settings:
        config.multimax = settings
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()


def ids(n=9):
    return torch.randint(0, 100, (1, n), generator=torch.Generator().manual_seed(3))


def test_backend_edit_takes_effect_on_the_next_forward_and_is_saved(tmp_path):
    model = build("multimax:chunked")
    assert model.config._attn_implementation == "multimax" and model.config.multimax["backend"] == "chunked"
    with pytest.raises(ValueError, match="output_attentions"):
        model(ids(), output_attentions=True)  # chunked keeps no probabilities
    model.config.multimax["backend"] = "eager"
    assert len(model(ids(), output_attentions=True).attentions) == 2
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["multimax"]["backend"] == "eager" and saved["attn_implementation"] == "multimax"


def test_value_edit_changes_the_computation():
    model = build()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.multimax.t3.fill_(0.5)
            layer.self_attn.multimax.b2.fill_(1.0)
    before = model(ids(600)).logits  # long enough for auto to pick chunked
    model.config.multimax = {**model.config.multimax, "backend": "eager"}
    assert_close(model(ids(600)).logits, before, what="eager after the edit vs auto (chunked) before")


def test_structural_edit_is_refused_until_applied():
    model = build()
    model.config.multimax = {"order": 1}
    with pytest.raises(ValueError, match=r"set_attn_implementation\('multimax'\)"):
        model(ids())
    model.set_attn_implementation("multimax")  # untrained scalars: rebuilt to the new settings
    assert model.model.layers[0].self_attn.multimax.order == 1
    model(ids())


def test_output_head_edit_is_refused_until_applied():
    model = build(output_head=True)
    model(ids())
    model.config.multimax = {**model.config.multimax, "output_head": False}
    with pytest.raises(ValueError, match="output_head"):
        model(ids())
    model.set_attn_implementation("multimax")
    assert not hasattr(model.lm_head, "multimax")
    model(ids())


@pytest.mark.parametrize("targets", [["self_attn"], r"model\.layers\.\d+\.self_attn"], ids=["names", "regex"])
def test_target_modules_find_the_same_modules(targets):
    default = {n for n, m in build().named_modules() if n.endswith(".multimax")}
    named = {n for n, m in build(target_modules=targets).named_modules() if n.endswith(".multimax")}
    assert named == default == {f"model.layers.{i}.self_attn.multimax" for i in range(2)}


def test_target_modules_that_match_nothing_fail_loudly():
    model = build(target_modules=["q_norm"])
    with pytest.raises(RuntimeError, match="runs multimax attention but has no MultiMax scalars"):
        model(ids())


def test_auto_falls_back_within_the_method(monkeypatch):
    call = AttentionCall("cpu", 1024, 1024)
    assert BACKENDS.resolve("auto", call).name == "fused"
    monkeypatch.setenv("HF_MULTIMAX_DISABLE_BACKENDS", "multimax:fused")
    assert BACKENDS.resolve("auto", call).name == "chunked"
    monkeypatch.setenv("HF_MULTIMAX_DISABLE_BACKENDS", "multimax:fused,chunked")
    assert BACKENDS.resolve("auto", call).name == "eager"
    with pytest.raises(ValueError, match="chunked.*disabled by HF_MULTIMAX_DISABLE_BACKENDS"):
        BACKENDS.resolve("chunked", call)
    # On a GPU flex is taken only where it can run; training on CPU never reaches it.
    assert BACKENDS.resolve("auto", AttentionCall("cpu", 8, 8, needs_grad=True)).name == "eager"
    with pytest.raises(ValueError, match="backward for GPU only"):
        BACKENDS.resolve("flex", AttentionCall("cpu", 8, 8, needs_grad=True))
    monkeypatch.setenv("HF_MULTIMAX_DISABLE_BACKENDS", "flex")
    assert BACKENDS.resolve("auto", AttentionCall("cuda", 1024, 1024)).name == "chunked"


def test_fallback_inside_a_model_matches(monkeypatch):
    model = build()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.multimax.t1.fill_(0.3)
    reference = model(ids(600)).logits
    monkeypatch.setenv("HF_MULTIMAX_DISABLE_BACKENDS", "fused,chunked")
    assert_close(model(ids(600)).logits, reference, what="eager fallback vs fused")


def test_settings_for_an_unused_method_are_reported(caplog):
    config = LlamaConfig(**LLAMA)
    config.multimax = {"order": 1, "affine": True}
    with caplog.at_level("WARNING", logger="hf_multimax"):
        AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    assert "config.multimax is set but attn_implementation='sdpa' does not use it" in caplog.text


def test_a_second_model_built_from_the_same_config_object_is_reported(caplog):
    config = LlamaConfig(**LLAMA)
    first = AutoModelForCausalLM.from_config(config, attn_implementation="multimax")
    AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")  # transformers shares the object
    with caplog.at_level("WARNING", logger="hf_multimax"):
        first(ids())
        first(ids())
    assert caplog.text.count("holds plugin parameters but its config now says attn_implementation='sdpa'") == 1


def test_switching_away_from_trained_scalars_is_refused_and_changes_nothing():
    model = build(output_head=True)
    with torch.no_grad():
        model.model.layers[1].self_attn.multimax.t2.fill_(0.4)
    before = model(ids()).logits
    with pytest.raises(ValueError, match=r"model.layers.1.self_attn holds trained MultiMax scalars.*reset_to_identity"):
        model.set_attn_implementation("sdpa")
    assert model.config._attn_implementation == "multimax" and model.config.attn_implementation == "multimax"
    assert model.model.layers[1].self_attn.multimax.t2.item() == pytest.approx(0.4)
    assert torch.equal(model(ids()).logits, before)
    assert hf_multimax.reset_to_identity(model) == 3  # two layers + the output head
    model.set_attn_implementation("sdpa")
    assert not hasattr(model.model.layers[1].self_attn, "multimax") and not hasattr(model.lm_head, "multimax")


def test_composite_model_sub_configs_follow_the_top_level_settings():
    from transformers import AutoModelForImageTextToText, CLIPVisionConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8)
    config = LlavaConfig(text_config=LlamaConfig(**LLAMA), vision_config=vision, image_token_index=99)
    config.multimax = {"order": 1}  # set on the top level: every sub-config gets it
    model = AutoModelForImageTextToText.from_config(config, attn_implementation="multimax")
    layers = [m for m in model.modules() if isinstance(m, hf_multimax.MultiMaxModulator)]
    assert len(layers) == 4 and all(m.order == 1 for m in layers)  # 2 text + 2 vision attention modules
    model.config.multimax["backend"] = "eager"  # one dict: an in-place edit reaches every sub-model
    assert model.config.text_config.multimax["backend"] == model.config.vision_config.multimax["backend"] == "eager"
    model.config.multimax = {"order": 2}  # a shape edit on the top level reaches them too, and is refused
    with pytest.raises(ValueError, match="holds"):
        model(input_ids=torch.randint(0, 90, (1, 5)))


def test_auto_suffix_sets_the_backend_back_to_auto():
    model = build("multimax:chunked")
    model.set_attn_implementation("multimax:auto")
    assert model.config.multimax["backend"] == "auto"


def test_output_head_without_its_scalars_is_refused_at_forward():
    model = build()
    model.config.multimax = {**model.config.multimax, "output_head": True}  # an edit the layers did not follow
    with pytest.raises(ValueError, match=r"output_head'\] is True .*set_attn_implementation\('multimax'\)"):
        model(ids())
    config = LlamaConfig(**LLAMA)
    config.multimax = {"output_head": True}
    from transformers import AutoModel

    base = AutoModel.from_config(config, attn_implementation="multimax")  # no LM head to modulate
    with pytest.raises(ValueError, match="as it has none"):
        base(ids())


def test_check_transformers_passes_once_installed():
    hf_multimax.integrations.check_transformers()
