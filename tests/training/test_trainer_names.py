"""The trainer is named for what it does (trains models with any plugin method); the first names,
from when MultiMax was the only method, still work."""

import transformers as tf

import hf_multimax.training as training
from hf_multimax.training import AttentionPluginTrainer, AttentionPluginTrainingArguments


def test_multimax_names_are_aliases_of_the_plugin_trainer():
    from hf_multimax.training import MultiMaxTrainer, MultiMaxTrainingArguments

    assert MultiMaxTrainer is AttentionPluginTrainer and MultiMaxTrainingArguments is AttentionPluginTrainingArguments
    assert issubclass(AttentionPluginTrainer, tf.Trainer)
    assert {"AttentionPluginTrainer", "AttentionPluginTrainingArguments", "MultiMaxTrainer",
            "MultiMaxTrainingArguments"} <= set(training.__all__)


def test_old_name_still_builds_the_scalars_group(tmp_path):
    from hf_multimax.training import MultiMaxTrainer, MultiMaxTrainingArguments

    config = tf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                            num_attention_heads=4, num_key_value_heads=2)
    config.sparsemix = {"normalizer": "multimax"}
    model = tf.AutoModelForCausalLM.from_config(config, attn_implementation="sparsemix")
    args = MultiMaxTrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, learning_rate=1e-3,
                                     multimax_lr_multiplier=5.0)
    optimizer = MultiMaxTrainer(model=model, args=args).create_optimizer()
    group = next(g for g in optimizer.param_groups if g.get("name") == "multimax")
    assert group["lr"] == 5e-3 and group["weight_decay"] == 0.0
