import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from hf_multimax import MultiMaxModulator
from hf_multimax.analysis.plots import plot_attention_maps, plot_metric_curves, plot_modulator_curves


def test_pictures_are_written(tmp_path):
    config = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, multimax={"per_head": True})
    model = AutoModelForCausalLM.from_config(config, attn_implementation="multimax")
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, MultiMaxModulator):
                m.t4.fill_(0.5)
    out = model(torch.randint(0, 100, (1, 6)), output_attentions=True)
    plot_attention_maps(out.attentions, tmp_path / "maps.png", tokens=list("abcdef"))
    plot_modulator_curves(model, tmp_path / "sigma.png")
    plot_metric_curves([{"step": 1, "m": 0.5}, {"step": 2, "m": 0.4}], ["m"], tmp_path / "curves.png")
    for name in ("maps.png", "sigma.png", "curves.png"):
        assert (tmp_path / name).stat().st_size > 5000
