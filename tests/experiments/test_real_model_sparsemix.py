"""SparseMix on the real model (`experiments/real_model_sparsemix.py`): the shortcuts the experiment
takes are exact (the captured queries and keys give the training forward's KL term; the cached
targets give the library's KL), the passkey prompts are what they claim, and the quick run writes
every field end to end."""

import copy
import json

import pytest
import torch

from experiments.real_model_sparsemix import (
    _layer_kl,
    capture_queries_keys,
    cached_kl,
    dropped_mass,
    kl_targets,
    passkey_prompts,
    run,
    warmup_kl,
    zero_attention_forward,
)

SPARSEMIX = {"block_size": 8, "top_k": 2, "kl_query_blocks": 3}


def tiny_models():
    """A 2-layer Llama with GQA (4 query, 2 key/value heads): dense SDPA, and SparseMix in dense
    warm-up with the same weights and a scorer away from its zero start."""
    import hf_multimax  # noqa: F401
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    torch.manual_seed(0)
    dense = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="sdpa").eval()
    sparse_config = copy.deepcopy(config)
    sparse_config.sparsemix = {**SPARSEMIX, "dense_warmup": True}
    sparse = AutoModelForCausalLM.from_config(sparse_config, attn_implementation="sparsemix")
    sparse.load_state_dict(dense.state_dict(), strict=False)
    with torch.no_grad():
        for layer in sparse.model.layers:
            layer.self_attn.sparsemix.w_key.normal_(std=0.3)
    return dense, sparse


def test_captured_queries_and_keys_give_the_training_forwards_kl_term():
    import hf_multimax

    dense, sparse = tiny_models()
    hf_multimax.freeze_all_but_scorers(sparse)
    ids = torch.randint(0, 100, (1, 96), generator=torch.Generator().manual_seed(1))
    sparse.train()
    torch.manual_seed(5)
    with hf_multimax.collect_aux_losses() as aux:
        sparse(input_ids=ids)
    forward_loss = aux.loss()
    forward_loss.backward()
    forward_grads = [p.grad.clone() for p in sparse.parameters() if p.requires_grad]
    sparse.zero_grad()

    store = {}
    with torch.no_grad(), capture_queries_keys(dense, store):
        dense(input_ids=ids)
    assert dense.config._attn_implementation == "sdpa", "the capture is undone"
    torch.manual_seed(5)  # the same query blocks, drawn layer by layer
    loss = warmup_kl(sparse, store, SPARSEMIX["kl_query_blocks"])
    loss.backward()
    torch.testing.assert_close(loss, forward_loss, rtol=1e-6, atol=1e-7)
    for g, ref in zip((p.grad for p in sparse.parameters() if p.requires_grad), forward_grads):
        torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-7)


def test_cached_targets_give_the_librarys_kl():
    from hf_multimax import SparseMixSettings

    dense, sparse = tiny_models()
    settings = SparseMixSettings.from_dict(sparse.config.sparsemix)
    ids = torch.randint(0, 100, (1, 96), generator=torch.Generator().manual_seed(2))
    store = {}
    with torch.no_grad(), capture_queries_keys(dense, store):
        dense(input_ids=ids)
    for i, layer in enumerate(sparse.model.layers):
        q, k = store[i]
        targets = kl_targets(q, k, settings, layer.self_attn.scaling)
        n = len(targets["blocks"])
        assert n == 96 // 8 - 2  # every block past the sink and the first chooser
        torch.manual_seed(7)
        library = _layer_kl(layer, q, k, settings, n)  # every eligible block, in a random order
        torch.testing.assert_close(cached_kl(layer, q, k, targets, settings), library, rtol=1e-6, atol=1e-7)
        from hf_multimax.ops.sparsemix import SELECTORS, block_geometry

        some = torch.tensor([n - 1, 0, n // 2])  # a subset, as the library samples them
        library = SELECTORS[layer.self_attn.sparsemix.selector].kl(
            q, k, layer.self_attn.sparsemix(), block_geometry(96, 96, 8, True), targets["blocks"][some],
            scale=layer.self_attn.scaling, sink=True, local=True, mask=None, score_mod=None,
            target_power=settings.kl_target_power)
        cached = cached_kl(layer, q, k, targets, settings, blocks=some)
        torch.testing.assert_close(cached, library, rtol=1e-6, atol=1e-7)


def _captured_tiny_run(length: int, seed: int):
    """The tiny SparseMix model, its settings, the dense twin's captured queries/keys on random ids,
    the scorers' weights and the attention scale."""
    from hf_multimax import SparseMixSettings

    dense, sparse = tiny_models()
    settings = SparseMixSettings.from_dict(sparse.config.sparsemix)
    ids = torch.randint(0, 100, (1, length), generator=torch.Generator().manual_seed(seed))
    store = {}
    with torch.no_grad(), capture_queries_keys(dense, store):
        dense(input_ids=ids)
    weights = [tuple(w.detach() for w in layer.self_attn.sparsemix()) for layer in sparse.model.layers]
    return sparse, settings, store, weights, sparse.model.layers[0].self_attn.scaling


def test_dropped_mass_matches_a_loop_over_the_librarys_dense_rows():
    from hf_multimax.ops.sparsemix import block_geometry, select_sparsemix_blocks
    from hf_multimax.ops.sparsemix.distill import dense_rows

    sparse, settings, store, weights, scale = _captured_tiny_run(length=128, seed=3)
    got = dropped_mass(store, {"trained": weights}, selector="block_rotary", settings=settings, scale=scale,
                       lengths=[64, 128], stride=3)
    assert got["first_sampled_query_block"] == 4 and got["query_blocks_sampled_every"] == 3
    g = block_geometry(128, 128, 8, True)
    expected = []
    for li, (q, k) in sorted(store.items()):
        _, idx, valid = select_sparsemix_blocks(q, k, weights[li], block_size=8, top_k=2, causal=True, scale=scale,
                                                selector="block_rotary")
        for a in range(4, 16, 3):
            probs = dense_rows(q, k, g, a, scale=scale)[0]  # [H, rows, K]
            kept = torch.zeros(4, 8)
            for h in range(4):
                blocks = idx[0, h // 2, a][valid[0, h // 2, a]]
                kept[h] = probs[h].view(8, 16, 8)[:, blocks].sum((-1, -2))
            expected.append((li, a, (1 - kept).mean().item()))
    for li in range(2):
        ref = sum(v for layer, _, v in expected if layer == li) / 4
        assert abs(got["trained"]["per_layer_mean"][li] - ref) < 1e-5
    # the oracle keeps the blocks of most mass: it drops the least
    assert all(got["oracle"]["by_length"][L] <= got["trained"]["by_length"][L] + 1e-6 for L in ("64", "128"))
    for name in ("trained", "oracle"):  # the split by key distance adds up to the whole
        parts = got[name]["by_key_distance_in_blocks"]
        assert abs(sum(parts.values()) - sum(got[name]["per_layer_mean"]) / 2) < 1e-4


def test_zero_attention_returns_zeros_of_the_output_shape():
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 6)
    out, probs = zero_attention_forward(None, q, k, v, None)
    assert out.shape == (2, 5, 4, 6) and not out.any() and probs is None


@pytest.mark.slow  # the real tokenizer (converts the GGUF on a fresh machine)
def test_passkey_prompts_have_the_length_the_key_and_aligned_prefixes():
    from experiments.real_text import token_windows
    from experiments.smollm2 import load_tokenizer

    tokenizer = load_tokenizer()
    haystack = token_windows(tokenizer, "heldout", length=3000, count=1)[0].tolist()
    depths = [0.0, 0.25, 0.5, 0.75, 1.0]
    prefix, prompts = passkey_prompts(tokenizer, haystack, 2048, depths, "70513", 32)
    assert [d for d, _, _ in prompts] == depths
    positions = [p for _, p, _ in prompts]
    assert positions == sorted(positions) and positions[0] < 32 and positions[-1] > 2048 - 200
    for _, p, ids in prompts:
        assert len(ids) == 2048 and (len(prefix) + p) % 32 == 0 and ids[: len(prefix)] == prefix
        text = tokenizer.decode(ids)
        assert text.count("70513") == 2 and text.startswith("<|im_start|>system")
        assert text.endswith("What is the pass key? Answer with the number only.<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.slow  # ~2 min on a busy 2-core VM: SmolLM2 forwards at 512 tokens, the speed stage included
def test_quick_run_writes_every_field(tmp_path):
    out = tmp_path / "quick.json"
    run(quick=True, output=str(out))
    result = json.loads(out.read_text())
    assert result["quick"] is True and (tmp_path / "quick.png").exists()
    assert result["sparsemix_settings"]["block_size"] == 16 and result["sparsemix_settings"]["top_k"] == 2
    rows = result["perplexity"]["rows"]
    assert [r["length"] for r in rows] == [128, 256, 512]
    for r in rows:
        for scorer in ("untrained", "warm"):
            lo, hi = r[scorer]["ratio_ci95"]
            assert r[scorer]["ppl"] > 1 and lo <= r[scorer]["ratio"] <= hi and 0 <= r[scorer]["argmax_agreement"] <= 1
    # one forward serves every length: a position's output does not depend on later tokens
    assert result["nested_window_max_abs_nll_diff"] < 1e-4
    assert result["warmup"]["steps"] == 2 and result["warmup"]["trainable_parameters"] > 0
    mass = result["dropped_mass"]
    for name in ("untrained", "warm", "oracle"):
        assert len(mass[name]["per_layer_mean"]) == 30
        assert all(0 <= v <= 1 for v in mass[name]["by_length"].values())
    # the oracle keeps the blocks of most mass: it drops the least
    oracle, untrained = mass["oracle"]["by_length"], mass["untrained"]["by_length"]
    assert all(oracle[L] <= untrained[L] + 1e-6 for L in oracle)
    passkey = result["passkey"]
    assert len(passkey["rows"]) == 2 * 3 and {r["model"] for r in passkey["rows"]} == {"sdpa", "sparsemix"}
    assert all(len(r["key"]) == 5 and isinstance(r["correct"], bool) for r in passkey["rows"])
    checked = [r for r in passkey["rows"] if "one_shot_first_logits_max_abs_diff" in r]
    assert len(checked) == 2 and all(r["one_shot_first_logits_max_abs_diff"] < 1e-3 for r in checked)
    speed = result["speed"]
    assert {"loads", "load_at_start", "load_at_end", "quiet", "waited_s", "machine", "profiles"} <= set(speed)
    (prefill,) = speed["prefill"]
    assert prefill["sparsemix_speedup"] > 0 and prefill["amdahl_limit"] > 0 and prefill["threads"] == 1
    assert speed["decode"][0]["amdahl_limit"] > 0 and "prefill_sparsemix" in speed["profiles"]
    assert {"ppl_ratio_after_warmup_at_longest", "passkey_gap_points", "prefill_speedup_1_threads",
            "decode_speedup_1_threads"} <= set(result["targets"])
    # a quick run's dense model may retrieve no key at all: then the gap is unmeasured, never "met"
    gap = result["targets"]["passkey_gap_points"]
    dense_hits = any(r["correct"] for r in passkey["rows"] if r["model"] == "sdpa")
    assert (gap["measured"] is None and gap["met"] is None) != dense_hits


def test_oracle_block_scores_rank_blocks_by_dense_mass_in_prefill_chunks_and_decoding_steps():
    from hf_multimax.ops.sparsemix import SELECTORS, block_geometry

    from experiments.real_model_sparsemix import block_mass_rows, oracle_block_scores, oracle_selection

    torch.manual_seed(0)
    q, k = torch.randn(1, 4, 96, 16), torch.randn(1, 2, 96, 16)
    scale = 16**-0.5
    whole = oracle_block_scores(q, k, block_geometry(96, 96, 8, True), scale, chunk=40)  # [1, 2, 12, 12]
    rows = block_mass_rows(q, k, list(range(12)), 8, scale)  # [H, 12, 8, 12]
    torch.testing.assert_close(whole[0], rows.view(2, 2, 12, 8, 12).mean(1).sum(2), rtol=1e-5, atol=1e-6)
    # a chunk starting mid-block (a prefill continuing a cache) and a decoding step: the same masses
    part = oracle_block_scores(q[:, :, 50:], k, block_geometry(46, 96, 8, True), scale)
    torch.testing.assert_close(part[0, :, 1:], whole[0, :, 7:], rtol=1e-5, atol=1e-6)
    step = oracle_block_scores(q[:, :, 60:61], k[:, :, :61], block_geometry(1, 61, 8, True), scale)
    dense = torch.softmax(torch.einsum("hd,hkd->hk", q[0, :, 60], k[0].repeat_interleave(2, 0)[:, :61]) * scale, -1)
    expected = torch.nn.functional.pad(dense, (0, 3)).view(4, 8, 8).sum(-1).view(2, 2, 8).mean(1)
    torch.testing.assert_close(step[0, :, 0], expected, rtol=1e-5, atol=1e-6)
    original = SELECTORS["block_rotary"]
    with oracle_selection("block_rotary"):
        assert SELECTORS["block_rotary"] is not original
    assert SELECTORS["block_rotary"] is original


def test_warmup_diagnosis_takes_the_librarys_kl_and_counts_kept_blocks():
    from experiments.real_model_sparsemix import warmup_diagnosis

    sparse, settings, store, weights, scale = _captured_tiny_run(length=96, seed=4)
    got = warmup_diagnosis(store, {"trained": weights}, selector="block_rotary", settings=settings, scale=scale)
    library = [cached_kl(layer, *store[i], kl_targets(*store[i], settings, scale), settings).item()
               for i, layer in enumerate(sparse.model.layers)]
    assert got["trained"]["kl_per_layer"] == pytest.approx(library, abs=1e-4)
    for key in ("top1_kept", "recall_max_pooled", "recall_mean", "mean_mass_kept"):
        assert 0 <= got["trained"][key] <= 1
