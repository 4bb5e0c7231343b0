"""Tiny random configs of the architectures we check, built offline."""

import transformers as tf

SMALL = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)

# name -> (config factory, Auto class, reference attn_implementation, kind of input)
ARCHITECTURES = {
    "llama": (lambda: tf.LlamaConfig(**SMALL, num_key_value_heads=2), tf.AutoModelForCausalLM, "sdpa", "text"),
    "qwen2": (lambda: tf.Qwen2Config(**SMALL, num_key_value_heads=2), tf.AutoModelForCausalLM, "sdpa", "text"),
    "mistral": (
        lambda: tf.MistralConfig(**SMALL, num_key_value_heads=2, sliding_window=4),
        tf.AutoModelForCausalLM,
        "sdpa",
        "text",
    ),
    "gemma": (lambda: tf.GemmaConfig(**SMALL, num_key_value_heads=1, head_dim=8), tf.AutoModelForCausalLM, "sdpa", "text"),
    # Gemma 2 has no SDPA path (soft-capping): its reference is eager.
    "gemma2": (
        lambda: tf.Gemma2Config(
            **SMALL, num_key_value_heads=2, head_dim=8, sliding_window=4, attn_logit_softcapping=0.5,
            final_logit_softcapping=30.0,
        ),
        tf.AutoModelForCausalLM,
        "eager",
        "text",
    ),
    "gpt2": (
        lambda: tf.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64),
        tf.AutoModelForCausalLM,
        "sdpa",
        "text",
    ),
    "bert": (lambda: tf.BertConfig(**SMALL), tf.AutoModelForSequenceClassification, "sdpa", "text"),
    "roberta": (lambda: tf.RobertaConfig(**SMALL, pad_token_id=1), tf.AutoModelForSequenceClassification, "sdpa", "text"),
    "distilbert": (
        lambda: tf.DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=4, hidden_dim=64),
        tf.AutoModelForSequenceClassification,
        "sdpa",
        "text",
    ),
    "vit": (
        lambda: tf.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=64, num_labels=3),
        tf.AutoModelForImageClassification,
        "sdpa",
        "image",
    ),
    # Decoder with cross-attention over encoder states (BERT as a seq2seq decoder).
    "bert_cross": (
        lambda: tf.BertConfig(**SMALL, is_decoder=True, add_cross_attention=True),
        tf.AutoModelForCausalLM,
        "sdpa",
        "cross",
    ),
}
CAUSAL_LMS = ["llama", "qwen2", "mistral", "gemma", "gemma2", "gpt2"]
