"""SparseMix inside real transformers models: dense identity on short inputs, backends agreeing on long
ones, the KL term, dense warm-up, caching, padding, persistence."""

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file

import hf_multimax
from hf_multimax.layers.sparsemix import SparseMixScorer
from tests.conftest import assert_close

SMALL = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
# block 8, top 2: inputs up to 32 tokens run dense, longer ones sparse.
SETTINGS = {"block_size": 8, "top_k": 2}


def _llama():
    return tf.LlamaConfig(**SMALL, num_key_value_heads=2, max_position_embeddings=512)


ARCHS = {
    "llama": (_llama, tf.AutoModelForCausalLM),
    "qwen2": (lambda: tf.Qwen2Config(**SMALL, num_key_value_heads=2), tf.AutoModelForCausalLM),
    "mistral_window": (lambda: tf.MistralConfig(**SMALL, num_key_value_heads=2, sliding_window=4), tf.AutoModelForCausalLM),
    "gpt2": (lambda: tf.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=512), tf.AutoModelForCausalLM),
    "bert": (lambda: tf.BertConfig(**SMALL, max_position_embeddings=512, attention_probs_dropout_prob=0.0),
             tf.AutoModelForSequenceClassification),
}


def build(arch="llama", attn="sparsemix", settings=SETTINGS, **extra):
    make, auto = ARCHS[arch]
    torch.manual_seed(0)
    config = make()
    if settings is not None:
        config.sparsemix = dict(settings)
    for key, value in extra.items():
        setattr(config, key, value)
    return auto.from_config(config, attn_implementation=attn)


def pair(arch="llama", settings=SETTINGS, attn="sparsemix", **extra):
    """The same weights as sdpa and as `attn`."""
    model = build(arch, attn, settings, **extra).eval()
    dense = build(arch, "sdpa", None).eval()
    dense.load_state_dict(model.state_dict(), strict=False)
    return model, dense


def tokens(batch, length, seed=0):
    return torch.randint(0, 100, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", list(ARCHS))
def test_short_inputs_are_exactly_dense(arch):
    model, dense = pair(arch)
    ids = tokens(2, 30)
    mask = torch.ones_like(ids)
    mask[1, 25:] = 0
    with torch.no_grad():
        assert_close(model(ids, attention_mask=mask).logits, dense(ids, attention_mask=mask).logits, what=arch)


def test_long_inputs_take_the_sparse_path_and_backends_agree():
    model, dense = pair()
    ids = tokens(2, 150)
    with torch.no_grad():
        blocked = model(ids).logits
        assert (blocked - dense(ids).logits).abs().max() > 1e-3, "the sparse path must differ from dense"
    # Same weights, the reference backend: outputs and every gradient.
    outs, grads = {}, {}
    for backend in ("blocked", "fused", "eager"):
        model.set_attn_implementation(f"sparsemix:{backend}")
        model.zero_grad()
        logits = model(ids).logits
        logits.square().mean().backward()
        outs[backend] = logits.detach()
        grads[backend] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    for backend in ("blocked", "fused"):
        assert_close(outs[backend], outs["eager"], what=f"{backend} logits")
        assert grads[backend].keys() == grads["eager"].keys()
        for name in grads["eager"]:
            assert_close(grads[backend][name], grads["eager"][name], what=f"{backend} {name}")


def test_multimax_normalizer_composes():
    settings = {**SETTINGS, "normalizer": "multimax"}
    model, dense = pair(settings=settings)
    attn = model.model.layers[0].self_attn
    assert isinstance(attn.sparsemix, SparseMixScorer) and isinstance(attn.multimax, hf_multimax.MultiMaxModulator)
    with torch.no_grad():
        assert_close(model(tokens(1, 30)).logits, dense(tokens(1, 30)).logits, what="identity on short inputs")
        for layer in model.model.layers:
            layer.self_attn.multimax.t3.fill_(0.2)
            layer.self_attn.multimax.b2.fill_(1.0)
    ids = tokens(1, 100)
    thetas = {}
    for backend in ("blocked", "fused", "eager"):
        model.set_attn_implementation(f"sparsemix:{backend}")
        model.zero_grad()
        model(ids).logits.square().mean().backward()
        thetas[backend] = attn.multimax.t3.grad.clone()
    assert thetas["eager"].abs() > 0
    for backend in ("blocked", "fused"):
        assert_close(thetas[backend], thetas["eager"], what=f"MultiMax scalar gradient through {backend}")


def test_kl_term_is_added_to_the_loss_and_trains_only_the_scorer():
    model = build(settings={**SETTINGS, "kl_weight": 0.5}).train()
    ids = tokens(2, 100)
    torch.manual_seed(1)
    with hf_multimax.collect_aux_losses() as aux:
        out = model(ids, labels=ids)
    kl = aux.loss()
    assert kl > 0 and len(aux.terms["sparsemix_kl"]) == 2, "one weighted term per layer"
    ce = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 100), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, ce, atol=1e-5, rtol=1e-5)  # the model's loss is left as it is
    (out.loss + kl).backward()
    scorer = model.model.layers[0].self_attn.sparsemix
    assert scorer.w_key.grad.abs().sum() > 0
    # Without the KL term the scorer gets no gradient: the top-k selection is not differentiable.
    model.zero_grad()
    model.config.sparsemix = {**SETTINGS, "kl_weight": 0.0}  # the config is the truth: effective at once
    with hf_multimax.collect_aux_losses() as aux:
        out = model(ids, labels=ids)
    assert not aux.terms and aux.loss() == 0.0
    out.loss.backward()
    assert scorer.w_key.grad is None or scorer.w_key.grad.abs().sum() == 0


def test_dense_warmup_keeps_the_model_dense_and_the_scorer_learns():
    # A wide init gives attention far from uniform, so the scorer has something to learn.
    model, dense = pair(settings={**SETTINGS, "dense_warmup": True, "kl_query_blocks": 8}, initializer_range=0.3)
    ids = tokens(2, 120)
    with torch.no_grad():
        assert_close(model(ids).logits, dense(ids).logits, what="dense warm-up runs dense attention")
    n = hf_multimax.freeze_all_but_scorers(model)
    # 2 layers x 2 KV heads x (w_query + w_key, each [12, rank 16]): the default selector on Llama is
    # "block_rotary", 4 pair norms and 1 slow pair (2 features), mean+max pooled
    assert n == sum(p.numel() for p in model.parameters() if p.requires_grad) == 2 * 2 * (2 * 12 * 16)
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    kls = []
    for step in range(25):
        torch.manual_seed(0)  # the same sampled query blocks every step
        with hf_multimax.collect_aux_losses() as aux:
            out = model(ids, labels=ids)
        kls.append(float(aux.loss().detach()))
        if step == 0:
            with torch.no_grad():
                assert torch.isclose(out.loss, dense(ids, labels=ids).loss, atol=1e-5)
        opt.zero_grad()
        (out.loss + aux.loss()).backward()
        opt.step()
    assert kls[-1] < 0.5 * kls[0], kls


def test_padded_batch_matches_each_sequence_alone():
    model, _ = pair()
    long, short = tokens(1, 120, seed=1), tokens(1, 88, seed=2)
    batch = torch.cat([long, torch.nn.functional.pad(short, (0, 32))])
    mask = torch.ones_like(batch)
    mask[1, 88:] = 0
    with torch.no_grad():
        together = model(batch, attention_mask=mask).logits
        assert torch.isfinite(together).all()
        assert_close(together[0], model(long).logits[0], what="unpadded row")
        # Complete blocks of the padded row (the last real block pools padding queries too).
        assert_close(together[1, :80], model(short).logits[0, :80], what="padded row")


def test_kv_cache_decoding_runs_sparse_and_matches_the_reference_backend():
    model, dense = pair()
    prompt = tokens(1, 100)
    outs = {}
    for backend in ("blocked", "eager"):
        model.set_attn_implementation(f"sparsemix:{backend}")
        outs[backend] = model.generate(prompt, max_new_tokens=6, do_sample=False, output_logits=True,
                                       return_dict_in_generate=True)
    assert torch.equal(outs["blocked"].sequences, outs["eager"].sequences)
    for a, b in zip(outs["blocked"].logits, outs["eager"].logits):
        assert_close(a, b, what="decode logits")
    # Below the sparse threshold the cached decode is exactly the dense model's.
    short = tokens(1, 20)
    torch.testing.assert_close(model.generate(short, max_new_tokens=8, do_sample=False),
                               dense.generate(short, max_new_tokens=8, do_sample=False))


def test_sparse_decode_step_equals_uncached_attention_over_its_selection():
    """One cached decode step against the same step computed without a cache: a single query has
    the same selection either way (its block is pooled from itself alone)."""
    model, _ = pair(settings={**SETTINGS, "block_size": 1, "top_k": 4})
    ids = tokens(1, 40)
    with torch.no_grad():
        cache = model(ids[:, :-1], use_cache=True).past_key_values
        step = model(ids[:, -1:], cache=cache).logits[0, -1]
    # block_size 1: every query is its own block, so the uncached forward selects per token too.
    with torch.no_grad():
        full = model(ids).logits[0, -1]
    assert_close(step, full, what="decode step")


@pytest.mark.slow  # tens of seconds (fresh processes, several processes, a compile or a smoke run): CI runs -m slow
def test_settings_persist_and_reload_in_a_fresh_process(tmp_path):
    model = build(settings={**SETTINGS, "normalizer": "multimax"})
    with torch.no_grad():
        model.model.layers[1].self_attn.sparsemix.w_key.normal_()
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["attn_implementation"] == "sparsemix"
    assert saved["sparsemix"]["normalizer"] == "multimax" and saved["sparsemix"]["top_k"] == 2
    weights = load_file(tmp_path / "model.safetensors")
    assert torch.equal(weights["model.layers.1.self_attn.sparsemix.w_key"], model.model.layers[1].self_attn.sparsemix.w_key)
    ids = tokens(1, 100)
    with torch.no_grad():
        expected = model.eval()(ids).logits
    torch.save(ids, tmp_path / "ids.pt")
    torch.save(expected, tmp_path / "expected.pt")
    code = f"""
        import torch, hf_multimax
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}).eval()
        assert model.config._attn_implementation == "sparsemix", model.config._attn_implementation
        with torch.no_grad():
            logits = model(torch.load({str(tmp_path / 'ids.pt')!r})).logits
        diff = (logits - torch.load({str(tmp_path / 'expected.pt')!r})).abs().max().item()
        assert diff < 1e-5, diff
        print("OK")
    """
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0 and "OK" in run.stdout, run.stderr[-2000:]
    without = "from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained(%r)" % str(tmp_path)
    run = subprocess.run([sys.executable, "-c", without], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode != 0 and "sparsemix" in run.stderr and "not supported" in run.stderr


def test_switching_attention_attaches_and_removes_scorers():
    model = build(attn="sdpa", settings=None)
    assert not hasattr(model.model.layers[0].self_attn, "sparsemix")
    model.config.sparsemix = {"top_k": 3}
    model.set_attn_implementation("sparsemix")
    assert isinstance(model.model.layers[0].self_attn.sparsemix, SparseMixScorer)
    assert model.config.sparsemix["top_k"] == 3
    assert model.config.attn_implementation == "sparsemix"
    model.set_attn_implementation("sdpa")
    assert not hasattr(model.model.layers[0].self_attn, "sparsemix")
    assert "attn_implementation" not in model.config.__dict__


@pytest.mark.parametrize(
    "settings, key",
    [
        ({"block_size": 0}, "block_size"),
        ({"top_k": -1}, "top_k"),
        ({"normalizer": "sparsemax"}, "normalizer"),
        ({"backend": "cuda"}, "backend"),
        ({"kl_weight": -1}, "kl_weight"),
        ({"kl_target_power": 0}, "kl_target_power"),
        ({"kl_weight": float("nan")}, "kl_weight=nan must be a finite number"),
        ({"kl_target_power": float("inf")}, "kl_target_power=inf must be a finite number"),
        ({"sink": 1}, "sink"),
        ({"topk": 3}, "unknown sparsemix setting"),
    ],
)
def test_bad_settings_raise_value_error(settings, key):
    with pytest.raises(ValueError, match=key):
        build(settings=settings)


def test_sparse_path_refuses_what_it_cannot_do():
    model = build("bert", settings=SETTINGS, attention_probs_dropout_prob=0.1).train()
    with pytest.raises(ValueError, match="dropout"):
        model(tokens(1, 100))
    model.eval()
    with pytest.raises(ValueError, match="output_attentions"):
        model(tokens(1, 100), output_attentions=True)


def test_token_selector_trains_saves_reloads_and_is_not_switched_silently(tmp_path):
    """selector="token": the KL term reaches every indexer weight, the indexer round-trips through
    save_pretrained/from_pretrained with its settings, and switching a trained indexer to the block
    scorer through set_attn_implementation is refused (it would drop trained parameters)."""
    settings = {**SETTINGS, "selector": "token", "indexer_heads": 2, "indexer_dim": 4}
    model = build(settings=settings).train()
    indexer = model.model.layers[0].self_attn.sparsemix
    # [Hkv, G * head_dim, n * d], [Hkv, head_dim, d], [Hkv, G * head_dim, n]: 2 KV heads of 2 query heads of 8
    assert [tuple(p.shape) for p in indexer()] == [(2, 16, 8), (2, 8, 4), (2, 16, 2)]
    assert indexer.is_identity(), "w_weight starts at zero"
    _trains_round_trips_and_is_not_switched(model, settings, tmp_path, switch_to="block")
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["sparsemix"]["selector"] == "token" and saved["sparsemix"]["indexer_dim"] == 4


def _trains_round_trips_and_is_not_switched(model, settings, tmp_path, *, switch_to):
    """Two steps of the KL term alone reach every selector weight (after one, the zero-started one is
    no longer zero); save_pretrained/from_pretrained gives the same logits; switching the trained
    selector to `switch_to` through set_attn_implementation is refused (it would drop trained
    parameters)."""
    selector = model.model.layers[0].self_attn.sparsemix
    ids = tokens(2, 100)
    opt = torch.optim.Adam(selector.parameters(), lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        with hf_multimax.collect_aux_losses() as aux:
            model(ids, labels=ids)
        aux.loss().backward()
        opt.step()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in selector.parameters())
    assert not selector.is_identity()
    model.eval().save_pretrained(tmp_path)
    reloaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert_close(reloaded(ids).logits, model(ids).logits, what=f"reloaded {settings['selector']} selector")
    reloaded.config.sparsemix = {**settings, "selector": switch_to}
    with pytest.raises(ValueError, match="trained"):
        reloaded.set_attn_implementation("sparsemix")


def test_block_norms_selector_trains_saves_reloads_and_needs_an_even_head_size(tmp_path):
    """selector="block_norms": `[Hkv, D, rank]` projections of the pooled rotary pair norms, trained by
    the KL term, round-tripped through save_pretrained, not switched silently to the plain scorer; a
    head size the rotary pairs cannot split is refused."""
    settings = {**SETTINGS, "selector": "block_norms", "scorer_rank": 4}
    model = build(settings=settings).train()
    scorer = model.model.layers[0].self_attn.sparsemix
    assert [tuple(p.shape) for p in scorer()] == [(2, 8, 4), (2, 8, 4)]  # head size 8: 4 pairs, mean+max
    _trains_round_trips_and_is_not_switched(model, settings, tmp_path, switch_to="block")
    config = tf.GPT2Config(vocab_size=100, n_embd=36, n_layer=1, n_head=4, n_positions=512)  # heads of 9
    config.sparsemix = settings
    with pytest.raises(ValueError, match="even head size, got 9"):
        tf.AutoModelForCausalLM.from_config(config, attn_implementation="sparsemix")


def test_block_rotary_selector_reads_the_models_slow_rotary_pairs(tmp_path):
    """selector="block_rotary": the pair norms and, whole, the rotary pairs that turn less than an
    eighth of a turn over max_position_embeddings (counted from the model's own rotary frequencies,
    for any rope_type); trained by the KL term, round-tripped, not switched silently; models without
    RoPE on the whole head are refused."""
    settings = {**SETTINGS, "selector": "block_rotary", "scorer_rank": 4}
    model = build(settings=settings).train()
    scorer = model.model.layers[0].self_attn.sparsemix
    # Head size 8, rope_theta 1e4, 512 positions: the pairs turn 512, 51, 5.1 and 0.51 radians.
    assert scorer.slow_pairs == 1
    assert [tuple(p.shape) for p in scorer()] == [(2, 12, 4), (2, 12, 4)]  # (4 norms + 2 features) x mean+max
    _trains_round_trips_and_is_not_switched(model, settings, tmp_path, switch_to="block_norms")
    # The count follows the frequencies the model's rotary embedding uses (here Llama 3.1's scaling).
    llama3 = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    for rope, positions in (({"rope_type": "default", "rope_theta": 1e9}, 4096), (llama3, 512)):
        model = build(settings=settings, rope_parameters=rope, max_position_embeddings=positions, head_dim=16)
        inv_freq = model.model.rotary_emb.inv_freq
        want = int((inv_freq * positions < math.pi / 4).sum())
        assert 0 < want < 8 and model.model.layers[0].self_attn.sparsemix.slow_pairs == want, rope
    for arch, error in (("gpt2", "no single rope_parameters"), ("phi", "partial_rotary_factor=0.5")):
        config = ARCHS[arch][0]() if arch in ARCHS else tf.PhiConfig(**SMALL)
        config.sparsemix = settings
        with pytest.raises(ValueError, match=error):
            tf.AutoModelForCausalLM.from_config(config, attn_implementation="sparsemix")


def test_default_selector_is_block_rotary_where_the_model_has_rope_over_the_whole_head(tmp_path):
    """selector="auto" (the default) resolves per model: "block_rotary" on RoPE models, "block" on
    GPT-2 (learned positions), Phi (rotary on half the head) and GPT-2 with odd head sizes; the config
    keeps "auto" and the reloaded model resolves the same."""
    cases = {"llama": _llama, "qwen2": ARCHS["qwen2"][0], "gpt2": ARCHS["gpt2"][0], "phi": lambda: tf.PhiConfig(**SMALL),
             "gpt2_odd": lambda: tf.GPT2Config(vocab_size=100, n_embd=36, n_layer=1, n_head=4, n_positions=512)}
    want = {"llama": "block_rotary", "qwen2": "block_rotary", "gpt2": "block", "phi": "block", "gpt2_odd": "block"}
    for name, make in cases.items():
        config = make()
        config.sparsemix = dict(SETTINGS)
        model = tf.AutoModelForCausalLM.from_config(config, attn_implementation="sparsemix")
        scorers = [m for m in model.modules() if isinstance(m, hf_multimax.SparseMixScorer)]
        assert scorers and {s.selector for s in scorers} == {want[name]}, name
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["sparsemix"]["selector"] == "auto"
    model = build(settings=SETTINGS).eval()
    model.save_pretrained(tmp_path)
    reloaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.model.layers[0].self_attn.sparsemix.structure == model.model.layers[0].self_attn.sparsemix.structure
    ids = tokens(1, 100)
    with torch.no_grad():
        assert_close(reloaded(ids).logits, model(ids).logits, what="reloaded auto selector")
