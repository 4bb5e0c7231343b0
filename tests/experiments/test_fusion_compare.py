"""The fusion study (experiments/fusion/compare.py): its statistics, the constructed complementary task
and its Bayes accuracy, the unimodal model by masking, early stopping; and (slow) the --quick smoke run
writing its own output with "quick": true."""

import json

import numpy as np
import pytest
import torch
from scipy import stats

from experiments.fusion import FusionArguments, FusionCollator, build_fusion_model, load_fusion_task
from experiments.fusion.compare import COLLAPSE, METHODS, collapsed, interval, main, paired, summarize
from experiments.fusion.data import complementary_bayes_accuracy


def test_interval_and_paired_test():
    values = [0.5, 0.6, 0.7, 0.65, 0.55]
    stat = interval(values)
    half = stats.t.ppf(0.975, 4) * np.std(values, ddof=1) / np.sqrt(5)
    assert stat["mean"] == pytest.approx(0.6) and stat["high"] - stat["mean"] == pytest.approx(half)
    baseline = [0.4, 0.6, 0.5, 0.5, 0.5]
    result = paired(values, baseline)
    assert result["mean"] == pytest.approx(0.1) and result["better"] == 4 and result["worse"] == 0
    assert result["p"] == pytest.approx(stats.ttest_rel(values, baseline).pvalue)
    assert interval([0.3])["low"] is None


def test_collapse_rate_counts_both_directions():
    rows = {"joint": [{"attention_dominant": a, "accuracy": 0.5, "weak_probe": 0.3, "accuracy_dominant_noise": 0.1,
                       "share_dominant": a} for a in (0.95, 0.5, 0.05, 0.91, 0.2)]}
    assert [collapsed(r) for r in rows["joint"]] == ["dominant", None, "weak", "dominant", None]
    rate = summarize(rows)["joint"]["collapse"]
    assert (rate["any"]["count"], rate["dominant"]["count"], rate["weak"]["count"]) == (3, 2, 1)
    assert rate["any"]["low"] < 0.6 < rate["any"]["high"] and COLLAPSE == 0.9


def test_complementary_task_needs_both_modalities():
    datasets, names, sizes, classes = load_fusion_task("complementary", seed=0, num_train=50, num_validation=10,
                                                       num_test=3000)
    assert set(datasets) == {"train", "validation", "test"} and names == ["a", "b"] and classes == 8
    bayes = complementary_bayes_accuracy(datasets["test"])
    # a tells only the pair (at most 1/2 of the label), b alone is weak, both together are far better.
    assert bayes["a"] <= 0.5 + 0.02 and bayes["both"] > bayes["b"] + 0.05 and bayes["both"] > bayes["a"] + 0.4
    # Same seed, same data.
    again = load_fusion_task("complementary", seed=0, num_train=50, num_validation=10, num_test=3000)[0]
    assert np.array_equal(np.asarray(again["test"]["b"]), np.asarray(datasets["test"]["b"]))


def test_masked_modality_makes_a_unimodal_model():
    datasets, names, sizes, classes = load_fusion_task("complementary", seed=0, num_train=8, num_validation=4, num_test=4)
    model = build_fusion_model(FusionArguments(task="complementary", method="unimodal", only="a"), names, sizes, classes).eval()
    rows = [datasets["train"][i] for i in range(8)]
    batch = FusionCollator(names, sizes, mask=["b"])(rows)
    other = FusionCollator(names, sizes, mask=["b"], noise=["b"])(rows)  # b changed: nothing changes
    with torch.no_grad():
        out = model(**batch, output_attentions=True)
        torch.testing.assert_close(model(**other).logits, out.logits)
    assert out.modality_attention_mass[:, 1].abs().max() == 0


@pytest.mark.slow
def test_quick_smoke_run_writes_its_own_output(tmp_path):
    content = main(["--quick", "--out_dir", str(tmp_path), "--no_plot"])
    saved = json.loads((tmp_path / "fusion_compare.json").read_text())
    assert saved["quick"] is True and content["quick"] is True
    for task in ("complementary", "digits"):
        summary = saved["tasks"][task]["summary"]
        assert list(summary) == list(METHODS)
        assert summary["ensemble"]["attention_dominant"] is None and summary["joint"]["collapse"]["any"]["n"] == 1
        assert set(summary["ogm_ge"]["vs_joint"]) >= {"accuracy", "weak_probe", "accuracy_dominant_noise"}
    assert "bayes_accuracy" in saved["tasks"]["complementary"]
    assert (tmp_path / "fusion_compare.md").exists()
