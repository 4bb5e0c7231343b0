"""The SparseMix KL term is collected per forward, not kept on modules: it works with tuple outputs,
gradient checkpointing (both modes), two threads on one model, and through MultiMaxTrainer with a
weight per optimizer step that gradient accumulation does not change."""

import threading

import pytest
import torch
import transformers as tf
from datasets import Dataset

import hf_multimax
from hf_multimax.training import MultiMaxTrainer
from tests.conftest import assert_close

# block 8, top 2: 64-token inputs take the sparse path; every eligible query block is sampled for
# the KL, so the term does not depend on the random draw.
SETTINGS = {"block_size": 8, "top_k": 2, "kl_weight": 0.5, "kl_query_blocks": 64}


def build():
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    config.sparsemix = dict(SETTINGS)
    return tf.AutoModelForCausalLM.from_config(config, attn_implementation="sparsemix").train()


def tokens(batch, seed=0):
    return torch.randint(0, 64, (batch, 64), generator=torch.Generator().manual_seed(seed))


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def step(model, ids, **kwargs):
    with hf_multimax.collect_aux_losses() as aux:
        out = model(ids, labels=ids, **kwargs)
    loss = out[0] if isinstance(out, tuple) else out.loss
    (loss + aux.loss()).backward()
    return aux


def test_tuple_outputs_keep_the_term():
    model, ids = build(), tokens(2)
    aux = step(model, ids, return_dict=False)
    assert len(aux.terms["sparsemix_kl"]) == 2 and aux.loss() > 0
    assert model.model.layers[0].self_attn.sparsemix.w_key.grad.abs().sum() > 0


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_gradient_checkpointing_gives_the_same_gradients(reentrant):
    ids = tokens(2)
    plain = build()
    step(plain, ids)
    checkpointed = build()
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    step(checkpointed, ids)
    reference, got = grads(plain), grads(checkpointed)
    assert reference.keys() == got.keys() and any(".sparsemix." in n for n in got)
    for name, g in got.items():
        scale = reference[name].abs().max().clamp_min(1e-3)
        assert_close(g / scale, reference[name] / scale, what=f"grad {name}")


def test_uncollected_term_warns_only_where_gradients_flow(caplog):
    from hf_multimax.integrations.aux_losses import _warn_uncollected

    model, ids = build(), tokens(1)  # from_config: train mode
    _warn_uncollected.cache_clear()  # said once per process: start from not yet said
    with caplog.at_level("WARNING", logger="hf_multimax"), torch.no_grad():
        model(ids)  # an inference forward on a train-mode model: nothing to learn, nothing lost
    assert not [r for r in caplog.records if "outside `hf_multimax.collect_aux_losses()`" in r.getMessage()]
    with caplog.at_level("WARNING", logger="hf_multimax"):
        model(ids)  # a training forward: the KL term would be dropped
    assert [r for r in caplog.records if "outside `hf_multimax.collect_aux_losses()`" in r.getMessage()]


def test_two_threads_on_one_model_keep_their_own_terms():
    model = build()
    inputs = {0: tokens(1, seed=1), 1: tokens(1, seed=2)}
    alone = {}
    for i, ids in inputs.items():
        with torch.no_grad(), hf_multimax.collect_aux_losses() as aux:
            model(ids)
        alone[i] = aux.values()["sparsemix_kl"]
    together, barrier = {}, threading.Barrier(2)

    def work(i):
        with torch.no_grad(), hf_multimax.collect_aux_losses() as aux:
            barrier.wait()
            for _ in range(3):
                model(inputs[i])
        together[i] = aux

    threads = [threading.Thread(target=work, args=(i,)) for i in inputs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in inputs:
        assert len(together[i].terms["sparsemix_kl"]) == 3 * 2  # 3 forwards x 2 layers, none of the other's
        assert together[i].values()["sparsemix_kl"] == pytest.approx(alone[i], rel=1e-5)
    assert alone[0] != pytest.approx(alone[1], rel=1e-3)


def trainer_grads(tmp_path, batch, accumulation):
    model = build()
    seen = {}

    class Capture(tf.TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            seen.update(grads(model))

    ids = tokens(8)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    args = tf.TrainingArguments(output_dir=str(tmp_path / f"{batch}x{accumulation}"), max_steps=1,
                                per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
                                learning_rate=1e-3, logging_steps=1, report_to=[], save_strategy="no", disable_tqdm=True,
                                use_cpu=True, seed=0, dataloader_drop_last=True)
    trainer = MultiMaxTrainer(model=model, args=args, train_dataset=data, callbacks=[Capture()])
    trainer.train()
    return seen, next(h for h in trainer.state.log_history if "loss" in h)


def test_trainer_term_weight_does_not_depend_on_gradient_accumulation(tmp_path):
    one, log_one = trainer_grads(tmp_path, 8, 1)
    four, log_four = trainer_grads(tmp_path, 2, 4)
    # The whole batch by hand: kl_weight * mean KL over its 8 sequences, the LM loss per token.
    model = build()
    step(model, tokens(8))
    by_hand = grads(model)
    for name in by_hand:
        scale = by_hand[name].abs().max().clamp_min(1e-3)
        assert_close(one[name] / scale, by_hand[name] / scale, what=f"1x8 grad {name}")
        assert_close(four[name] / scale, by_hand[name] / scale, what=f"4x2 grad {name}")
    assert log_one["sparsemix_kl"] > 0 and log_four["sparsemix_kl"] > 0
