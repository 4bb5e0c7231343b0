"""The hooks are contained: a plugin-free model is built exactly as without the plugin, the wrapped
internals are checked against the installed transformers, and `uninstall()` restores it. Each runs
in a fresh process: the registries and the wrapped methods are process-global."""

import os
import subprocess
import sys

import pytest
import textwrap

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}

BUILD = """
import torch, transformers as tf
def build():
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2)
    return tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
"""


def run(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


SPY = """
import hf_multimax
import hf_multimax.integrations.hooks as hooks
walks = []
sync = hooks.sync_model
hooks.sync_model = lambda model: walks.append(model) or sync(model)
"""


@pytest.mark.slow  # tens of seconds (fresh processes, several processes, a compile or a smoke run): CI runs -m slow
def test_plugin_free_model_is_built_as_without_the_plugin(tmp_path):
    for with_plugin in (False, True):
        run((SPY if with_plugin else "walks = []\n") + textwrap.dedent(BUILD) + textwrap.dedent(f"""
            model = build()
            ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(1))
            torch.save({{"state": model.state_dict(), "logits": model(ids).logits,
                        "config": model.config.to_dict(), "walks": len(walks)}}, {str(tmp_path / f"{with_plugin}.pt")!r})
        """))
    import torch

    plain, plugged = torch.load(tmp_path / "False.pt"), torch.load(tmp_path / "True.pt")
    assert plugged["walks"] == 0, "a config naming no plugin method never reaches the layer sync"
    assert plain["state"].keys() == plugged["state"].keys()
    assert all(torch.equal(plain["state"][k], plugged["state"][k]) for k in plain["state"])
    assert torch.equal(plain["logits"], plugged["logits"])
    assert plain["config"] == plugged["config"]


@pytest.mark.slow  # tens of seconds (fresh processes, several processes, a compile or a smoke run): CI runs -m slow
def test_uninstall_restores_transformers_and_register_puts_it_back():
    out = run(textwrap.dedent("""
        import transformers as tf
        from transformers import AttentionInterface, PreTrainedConfig, PreTrainedModel
        from transformers.masking_utils import AttentionMaskInterface
        originals = {n: PreTrainedModel.__dict__[n] for n in ("post_init", "_initialize_weights", "set_attn_implementation",
                                                              "from_pretrained")}
        untouched = {n: PreTrainedModel.__dict__[n] for n in ("get_correct_attn_implementation", "_from_config")}
        import hf_multimax
        assert all(PreTrainedModel.__dict__[n] is not f for n, f in originals.items())
        assert all(PreTrainedModel.__dict__[n] is f for n, f in untouched.items()), "nothing wrapped for messages"
        cfg = tf.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2)
        built = tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="multimax")
        hf_multimax.uninstall()
        assert all(PreTrainedModel.__dict__[n] is f for n, f in originals.items())
        assert not hasattr(PreTrainedConfig, "multimax") and not hasattr(PreTrainedConfig, "sparsemix")
        for name in hf_multimax.ATTENTION_NAMES:
            assert name not in AttentionInterface._global_mapping and name not in AttentionMaskInterface._global_mapping
        try:
            tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="multimax")
        except ValueError as err:
            assert "multimax" in str(err)
        else:
            raise AssertionError("multimax still loads after uninstall()")
        try:
            tf.AutoConfig.for_model("multimodal_fusion")
        except ValueError:
            pass
        else:
            raise AssertionError("the fusion model is still registered")
        hf_multimax.uninstall()  # idempotent
        hf_multimax.register()
        again = tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="multimax")
        assert again.model.layers[0].self_attn.multimax is not None
        print("OK")
    """))
    assert "OK" in out


@pytest.mark.slow  # tens of seconds (fresh processes, several processes, a compile or a smoke run): CI runs -m slow
def test_import_refuses_a_transformers_whose_internals_differ():
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        from transformers import PreTrainedModel
        def _initialize_weights(self, module):  # as a future transformers might have it
            pass
        PreTrainedModel._initialize_weights = _initialize_weights
        import hf_multimax
    """)], capture_output=True, text=True, env=ENV, timeout=300)
    import transformers

    assert proc.returncode != 0
    assert f"transformers {transformers.__version__}" in proc.stderr
    assert "PreTrainedModel._initialize_weights('self', 'module')" in proc.stderr


def test_unknown_names_and_settings_given_to_from_config_are_refused_by_transformers():
    """No wrapper only improves a message: transformers' own refusals reach the user, and they are clear."""
    import copy

    import pytest
    import transformers as tf

    import hf_multimax  # noqa: F401

    cfg = tf.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    for name in ("multimax:nope", "multimx"):
        with pytest.raises(ValueError, match=f'attn_implementation="{name}"` is not supported'):
            tf.AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation=name)
    with pytest.raises(TypeError, match="multimax"):  # the model's __init__ takes no settings
        tf.AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="multimax", multimax={"order": 1})
    config = copy.deepcopy(cfg)
    config.multimax = {"order": 1}  # settings live in the config
    model = tf.AutoModelForCausalLM.from_config(config, attn_implementation="multimax")
    assert model.config.multimax["order"] == 1 and model.model.layers[0].self_attn.multimax.order == 1
