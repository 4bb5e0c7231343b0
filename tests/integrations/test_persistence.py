"""Scalars are real parameters: created at build time, identity after conversion, trained by an
optimizer, saved to safetensors, reloaded with their settings, never silently dropped."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BertConfig,
    LlamaConfig,
    LlamaForCausalLM,
)

from hf_multimax import MultiMaxModulator, MultiMaxSettings
from tests.conftest import assert_close

LLAMA = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)


def modulators(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, MultiMaxModulator)}


@pytest.fixture(scope="module")
def vanilla_llama(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vanilla")
    AutoModelForCausalLM.from_config(LlamaConfig(**LLAMA)).save_pretrained(path)
    return path


def train_steps(model, steps=3):
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    ids = torch.randint(0, 100, (4, 12), generator=torch.Generator().manual_seed(0))
    model.train()
    for _ in range(steps):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def test_vanilla_checkpoint_converts_at_identity(vanilla_llama):
    # The meta-device trap: missing keys are materialised with empty_like; they must come out zero.
    for dtype in (torch.float32, torch.bfloat16):
        model = AutoModelForCausalLM.from_pretrained(vanilla_llama, attn_implementation="multimax", dtype=dtype)
        mods = modulators(model)
        assert sorted(mods) == ["model.layers.0.self_attn.multimax", "model.layers.1.self_attn.multimax"]
        assert all(m.is_identity() for m in mods.values()), {n: list(m.parameters()) for n, m in mods.items()}


def test_train_save_reload_round_trip(vanilla_llama, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(vanilla_llama, attn_implementation="multimax")
    train_steps(model)
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if ".multimax." in n}
    assert any(p.abs().sum() > 0 for p in trained.values()), "the optimizer did not move the MultiMax scalars"
    model.save_pretrained(tmp_path)

    config = json.loads((tmp_path / "config.json").read_text())
    assert config["attn_implementation"] == "multimax"
    assert config["multimax"] == MultiMaxSettings().to_dict()
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        saved = {k: f.get_tensor(k) for k in f.keys() if ".multimax." in k}
    assert sorted(saved) == sorted(trained)
    assert all(torch.equal(saved[k], trained[k]) for k in saved)

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)  # no flags
    assert reloaded.config._attn_implementation == "multimax"
    for n, p in reloaded.named_parameters():
        if n in trained:
            assert torch.equal(p, trained[n]), n
    ids = torch.randint(0, 100, (2, 7))
    assert_close(reloaded(ids).logits, model(ids).logits, what="reloaded logits")


def test_attn_implementation_none_keeps_the_saved_method(vanilla_llama, tmp_path):
    # `transformers serve` and other loaders pass attn_implementation=None when the user named none:
    # "not chosen", so a plugin checkpoint loads with its method and trained scalars, through a model
    # class and through the Auto classes; an explicit name still wins.
    model = AutoModelForCausalLM.from_pretrained(vanilla_llama, attn_implementation="multimax")
    train_steps(model)
    model.save_pretrained(tmp_path)
    ids = torch.randint(0, 100, (2, 7))
    for cls in (AutoModelForCausalLM, LlamaForCausalLM):
        reloaded = cls.from_pretrained(tmp_path, attn_implementation=None)
        assert reloaded.config._attn_implementation == "multimax", cls.__name__
        assert_close(reloaded(ids).logits, model(ids).logits, what=f"{cls.__name__} logits")
    config = AutoConfig.from_pretrained(tmp_path, attn_implementation=None)
    assert config._attn_implementation == "multimax"
    assert AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="multimax:eager").config.multimax[
        "backend"] == "eager"
    plain = AutoModelForCausalLM.from_pretrained(vanilla_llama, attn_implementation=None)  # not a plugin checkpoint
    assert plain.config._attn_implementation == "sdpa"


def test_settings_persist_and_select_backend_at_load(vanilla_llama, tmp_path):
    settings = {"order": 1, "per_head": True, "affine": True, "output_head": True}
    model = AutoModelForCausalLM.from_pretrained(vanilla_llama, attn_implementation="multimax:eager", multimax=settings)
    attn = model.model.layers[0].self_attn.multimax
    assert (attn.order, attn.num_heads, attn.affine, model.config.multimax["backend"]) == (1, 4, True, "eager")
    assert sorted(n for n, _ in attn.named_parameters()) == ["affine_scale", "affine_shift", "b1", "d1", "t1", "t2"]
    assert attn.t1.shape == (4,)
    assert isinstance(model.lm_head.multimax, MultiMaxModulator)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reloaded.config.multimax == {**settings, "backend": "eager"}
    assert reloaded.model.layers[1].self_attn.multimax.num_heads == 4
    assert isinstance(reloaded.lm_head.multimax, MultiMaxModulator)


def test_from_config_and_set_attn_implementation():
    model = AutoModelForCausalLM.from_config(LlamaConfig(**LLAMA), attn_implementation="multimax")
    assert len(modulators(model)) == 2 and all(m.is_identity() for m in modulators(model).values())

    plain = AutoModelForCausalLM.from_config(LlamaConfig(**LLAMA), attn_implementation="sdpa")
    ids = torch.randint(0, 100, (2, 7))
    before = plain(ids).logits
    plain.set_attn_implementation("multimax")
    assert len(modulators(plain)) == 2
    assert "multimax" in {n.split(".")[-2] for n, _ in plain.named_parameters() if ".multimax." in n}
    assert_close(plain(ids).logits, before, what="after switching to multimax")
    plain.set_attn_implementation("sdpa")
    assert not modulators(plain) and "attn_implementation" not in plain.config.to_dict()


def test_output_head_modulates_logits(vanilla_llama):
    model = AutoModelForCausalLM.from_pretrained(vanilla_llama, attn_implementation="multimax",
                                                 multimax={"output_head": True})
    ids = torch.randint(0, 100, (2, 7))
    raw = model.model(ids).last_hidden_state @ model.lm_head.weight.T
    assert_close(model(ids).logits, raw, what="identity output head")
    with torch.no_grad():
        model.lm_head.multimax.t2.fill_(1.0)  # slope 2 above d1 = 0
    expected = torch.where(raw > 0, 2 * raw, raw)
    assert_close(model(ids).logits, expected, what="modulated output head")


def test_classifier_output_head():
    # from_config takes settings the HF way: as a config attribute.
    config = BertConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        multimax={"output_head": True})
    model = AutoModelForSequenceClassification.from_config(config, attn_implementation="multimax")
    assert isinstance(model.classifier.multimax, MultiMaxModulator)
    assert len(modulators(model)) == 3  # two layers + the classifier


@pytest.mark.parametrize(
    "settings, field",
    [
        ({"order": 3}, "order"),
        ({"order": True}, "order"),
        ({"backend": "cuda_magic"}, "backend"),
        ({"per_head": "yes"}, "per_head"),
        ({"temperature": 2}, "temperature"),
    ],
)
def test_bad_settings_raise_value_error(vanilla_llama, settings, field):
    with pytest.raises(ValueError, match=field):
        AutoModelForCausalLM.from_pretrained(vanilla_llama, attn_implementation="multimax", multimax=settings)


def test_unknown_backend_name_raises(vanilla_llama):
    with pytest.raises(ValueError, match="multimax:nope"):
        AutoModelForCausalLM.from_pretrained(vanilla_llama, attn_implementation="multimax:nope")


def test_per_head_shape_mismatch_is_reported(vanilla_llama, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(vanilla_llama, attn_implementation="multimax",
                                                 multimax={"per_head": True})
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["multimax"]["per_head"] = False
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def run_python(code, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)


@pytest.mark.slow  # tens of seconds (fresh processes, several processes, a compile or a smoke run): CI runs -m slow
def test_fresh_process_without_plugin_fails_loudly(vanilla_llama, tmp_path):
    AutoModelForCausalLM.from_pretrained(vanilla_llama, attn_implementation="multimax").save_pretrained(tmp_path)
    result = run_python(
        f"""
        import sys
        from transformers import AutoModelForCausalLM
        AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})
        assert "hf_multimax" not in sys.modules
        """,
        cwd=tmp_path,
    )
    assert result.returncode != 0
    assert 'attn_implementation="multimax"' in result.stderr and "not supported" in result.stderr


@pytest.mark.slow  # tens of seconds (fresh processes, several processes, a compile or a smoke run): CI runs -m slow
def test_fresh_process_with_plugin_reloads_trained_scalars(vanilla_llama, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(vanilla_llama, attn_implementation="multimax")
    train_steps(model)
    model.save_pretrained(tmp_path)
    t1 = model.model.layers[1].self_attn.multimax.t1.item()
    result = run_python(
        f"""
        import hf_multimax
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})
        print(m.config._attn_implementation, repr(m.model.layers[1].self_attn.multimax.t1.item()))
        """,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    impl, value = result.stdout.split()[-2:]
    assert impl == "multimax" and float(value) == t1 and t1 != 0


def test_changed_settings_rebuild_untrained_scalars_and_protect_trained_ones():
    model = AutoModelForCausalLM.from_config(LlamaConfig(**LLAMA), attn_implementation="multimax")
    model.config.multimax = {"per_head": True}
    model.set_attn_implementation("multimax")
    assert all(m.num_heads == 4 for m in modulators(model).values())
    with torch.no_grad():
        model.model.layers[0].self_attn.multimax.t1.fill_(0.2)
    model.config.multimax = {"order": 1}
    with pytest.raises(ValueError, match="trained MultiMax scalars"):
        model.set_attn_implementation("multimax")


class _OldStyleAttention(torch.nn.Module):
    """Computes attention itself instead of calling transformers' AttentionInterface."""

    def forward(self, x):
        return torch.softmax(x @ x.transpose(-1, -2), -1) @ x


def test_model_without_attention_interface_is_refused():
    from transformers import PreTrainedModel

    class OldStyleModel(PreTrainedModel):
        config_class = LlamaConfig

        def __init__(self, config):
            super().__init__(config)
            self.attn = _OldStyleAttention()
            self.post_init()

        def forward(self, x):
            return self.attn(x)

    with pytest.raises(ValueError, match="AttentionInterface"):
        OldStyleModel(LlamaConfig(**LLAMA, attn_implementation="multimax"))
