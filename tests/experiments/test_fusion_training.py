"""The fusion recipe end to end with the real Trainer: a quick version of the synthetic benchmark
(directions only), its entry point (`python -m experiments.fusion`), and checkpoints that load in a fresh process (saved, and
pushed through push_to_hub to a local stand-in for the Hub)."""

import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import transformers.utils.hub as hf_hub

from experiments.fusion import FusionArguments, FusionCollator, build_fusion_model, load_fusion_task, run_fusion

ROOT = Path(__file__).resolve().parents[2]
# Half the benchmark's epochs (15 of 30, 3 warm-up instead of 5) and half its test set; the same recipe
# otherwise, seed 0. Shorter runs leave RollingQ too few epochs after its rotations to settle.
QUICK = dict(task="synthetic", num_train=4000, num_test=1000, epochs=15, warmup_noise_epochs=3, disable_tqdm=True)


@pytest.fixture(scope="module")
def quick_runs():
    torch.set_num_threads(1)
    data = load_fusion_task("synthetic", seed=0, num_train=QUICK["num_train"], num_test=QUICK["num_test"])
    return {method: run_fusion(FusionArguments(method=method, seed=0, **QUICK), data)
            for method in ("joint", "rollingq", "attribution")}


@pytest.mark.slow  # tens of seconds (fresh processes, several processes, a compile or a smoke run): CI runs -m slow
def test_methods_reduce_the_imbalance(quick_runs):
    joint = quick_runs["joint"]["report"]
    assert joint["attention_mass/a"] > 0.7 and joint["attribution_share/a"] > 0.7  # a dominates
    for method in ("rollingq", "attribution"):
        report = quick_runs[method]["report"]
        assert report["probe_accuracy/b"] > joint["probe_accuracy/b"], method
        assert report["accuracy_noise/a"] > joint["accuracy_noise/a"], method
    shares = quick_runs["attribution"]["report"]["attribution_share/a"]
    assert abs(shares - 0.5) < abs(joint["attribution_share/a"] - 0.5)
    assert quick_runs["rollingq"]["report"]["num_rotations"] >= 1
    assert joint["num_rotations"] == 0


@pytest.mark.slow  # tens of seconds (fresh processes, several processes, a compile or a smoke run): CI runs -m slow
def test_traces_are_logged(quick_runs):
    history = quick_runs["rollingq"]["history"]
    assert len(history["rollingq"]) == QUICK["epochs"] and len(history["monitor"]) == QUICK["epochs"] + 1
    # No rotation during the noise warm-up, whatever AIR says.
    assert not any(h["rollingq/rotated"] for h in history["rollingq"][: QUICK["warmup_noise_epochs"]])
    report = quick_runs["attribution"]["report"]
    assert len(report["air_trace"]) == QUICK["epochs"]
    # FusionTrainer logs the training batches' attribution shares (the regularizer computes them).
    train_log = quick_runs["attribution"]["history"]["train_log"]
    assert len(train_log) == QUICK["epochs"] and all(0 <= h["attribution_share/b"] <= 1 for h in train_log)
    assert set(report) >= {"accuracy", "probe_accuracy/a", "accuracy_zeroed/b", "accuracy_noise/b", "attention_mass/b", "air"}


def _fresh(code: str, env_extra=None) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip().splitlines()[-1]


LOAD = """
import json, sys, torch
{imports}
from transformers import AutoModelForSequenceClassification
results = []
for path in {paths!r}:
    model = AutoModelForSequenceClassification.from_pretrained(path{kwargs})
    attention = model.fusion.layers[0].attention
    results.append({{"cls": type(model).__module__, "logits": model(modality_inputs=torch.load({inputs!r})).logits.tolist(),
                    "rotations": int(attention.rollingq_num_rotations), "rollingq": model.config.rollingq}})
print(json.dumps(results))
"""


class FakeHub:
    """The two calls `push_to_hub` makes (create_repo, create_commit), writing into a local folder."""

    def __init__(self, root):
        self.root = Path(root)

    def create_repo(self, repo_id, **kwargs):
        return types.SimpleNamespace(repo_id=repo_id)

    def create_commit(self, repo_id, operations, **kwargs):
        for op in operations:
            target = self.root / repo_id / op.path_in_repo
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(op.path_or_fileobj, target)
        return f"file://{self.root / repo_id}"


@pytest.mark.slow  # tens of seconds (fresh processes, several processes, a compile or a smoke run): CI runs -m slow
def test_script_checkpoint_and_pushed_folder_load_in_fresh_processes(tmp_path, monkeypatch):
    out = tmp_path / "run"
    from experiments.fusion.__main__ import main

    main(["--method", "rollingq", "--num_train", "300", "--num_test", "100", "--epochs", "3",
                    "--warmup_noise_epochs", "0", "--rollingq_beta", "0", "--disable_tqdm", "True",
                    "--output_dir", str(out)])
    assert {"config.json", "model.safetensors", "results.json", "modeling_multimodal_fusion.py",
            "configuration_multimodal_fusion.py"} <= {p.name for p in out.iterdir()}
    saved = json.loads((out / "results.json").read_text())["report"]
    assert saved["num_rotations"] >= 1

    from transformers import AutoModelForSequenceClassification

    import hf_multimax  # noqa: F401

    model = AutoModelForSequenceClassification.from_pretrained(out)
    data = load_fusion_task("synthetic", seed=0, num_train=300, num_test=100)[0]["test"]
    x = FusionCollator(["a", "b"], [16, 16])([data[i] for i in range(5)])["modality_inputs"]
    torch.save(x, tmp_path / "x.pt")
    expected = model(modality_inputs=x).logits

    hub = tmp_path / "hub"
    monkeypatch.setattr(hf_hub, "_hf_api", FakeHub(hub))
    model.push_to_hub("someone/fusion-rollingq")
    pushed = hub / "someone" / "fusion-rollingq"
    assert (pushed / "README.md").exists() and (pushed / "model.safetensors").exists()

    cases = [
        ([out, pushed], "import hf_multimax", ""),
        # Without the plugin: the remote code carried in the folder (auto_map + modeling files).
        ([pushed], "", ", trust_remote_code=True"),
    ]
    for paths, imports, kwargs in cases:
        code = LOAD.format(imports=imports, paths=[str(p) for p in paths], kwargs=kwargs, inputs=str(tmp_path / "x.pt"))
        for path, loaded in zip(paths, json.loads(_fresh(code))):
            what = (str(path), imports or "remote code")
            assert torch.allclose(torch.tensor(loaded["logits"]), expected, atol=1e-5), what
            assert loaded["rotations"] == saved["num_rotations"] and loaded["rollingq"]["enabled"], what
            assert loaded["cls"].startswith("hf_multimax.modeling.multimodal_fusion") == bool(imports), (what, loaded["cls"])


def test_encoders_and_projections_get_their_own_optimizer_group(tmp_path):
    from hf_multimax.training.fusion import FusionTrainer, FusionTrainingArguments

    model = build_fusion_model(FusionArguments(method="attribution"), ["a", "b"], [16, 16], 6)
    args = FusionTrainingArguments(output_dir=str(tmp_path), learning_rate=0.01, encoder_lr_multiplier=0.1,
                                   report_to="none", use_cpu=True)
    optimizer = FusionTrainer(model=model, args=args).create_optimizer()
    groups = {g.get("name", "fusion"): g for g in optimizer.param_groups}
    encoder_ids = {id(p) for n, p in model.named_parameters() if n.startswith("fusion.projections.")}
    assert {id(p) for p in groups["encoders"]["params"]} == encoder_ids
    assert groups["encoders"]["lr"] == pytest.approx(0.001)
    assert all(g["lr"] == pytest.approx(0.01) for g in optimizer.param_groups if g.get("name") != "encoders")
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))
