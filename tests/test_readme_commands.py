"""Every command the README shows runs as written, after the two set-up commands, in a quick mode:
the test extracts them (bash blocks and indented command lines), appends each script's quick flags
and runs them in order from an empty folder (so their `outputs/` land there). An upload gets
`--dry-run` (no network here). A command the table below does not know fails the test: a new README
command must say how it runs quickly."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

FINETUNE = ["--max_steps", "2", "--num_generated_train", "32", "--num_generated_eval", "16",
            "--per_device_train_batch_size", "8", "--report_to", "none"]
QUICK = {
    "scripts/demo.py": ["--steps", "2"],
    "scripts/finetune_text_classification.py": FINETUNE,
    "scripts/finetune_causal_lm.py": FINETUNE,
    "scripts/finetune_image_classification.py": FINETUNE,
    "scripts/publish.py": ["--dry-run"],
    "scripts/bench_sparsemix.py": ["--quick", "--lengths", "512", "--memory_lengths", "512"],
    "scripts/bench_attention.py": ["--quick"],
    "scripts/bench_sparsemix_decode.py": ["--quick"],
    "scripts/sparsemix_retrieval.py": ["--quick"],
    "scripts/train_fusion.py": ["--epochs", "2", "--warmup_noise_epochs", "1", "--num_train", "64", "--num_test", "32"],
    "scripts/compare_fusion.py": ["--epochs", "2", "--warmup_noise_epochs", "1", "--seeds", "0", "--num_train", "64",
                                   "--no_plot"],
}


def readme_commands() -> list[str]:
    text = README.read_text()
    lines = [line for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S) for line in block.splitlines()]
    lines += [line for line in text.splitlines() if re.match(r"^    (\.venv/bin/|[A-Z_]+=\S* \.venv/bin/)", line)]
    commands = []
    for line in lines:
        line = line.split("#", 1)[0].strip()
        for part in line.split("&&"):  # the set-up lines: "bash scripts/setup.sh && <command>"
            part = part.strip()
            if part and part != "bash scripts/setup.sh" and not part.endswith("-m pytest"):
                commands.append(part)
    return commands


def as_quick_run(command: str, port: int) -> tuple[list[str], dict]:
    words = shlex.split(command)
    env = {}
    while "=" in words[0] and not words[0].startswith("."):
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    program = words.pop(0)
    if program == ".venv/bin/python":
        argv = [sys.executable]
    elif program == ".venv/bin/torchrun":
        argv = [sys.executable, "-m", "torch.distributed.run", "--master_addr", "127.0.0.1", "--master_port", str(port)]
    else:
        raise AssertionError(f"README command {command!r} does not start with the venv's python or torchrun")
    script = next(w for w in words if w.startswith("scripts/"))
    assert script in QUICK, f"README command {command!r}: add its quick flags to QUICK in {Path(__file__).name}"
    words = [str(ROOT / w) if w == script else w for w in words]
    return argv + words + QUICK[script], env


@pytest.mark.slow  # ~2 min: every script once; CI runs it (`pytest -m slow`)
def test_every_readme_command_runs(tmp_path):
    from tests.training.test_ddp import free_port

    commands = readme_commands()
    assert len(commands) >= 10
    base_env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    for command in commands:
        argv, env = as_quick_run(command, free_port())
        run = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, env={**base_env, **env}, timeout=600)
        assert run.returncode == 0, f"{command}\n{run.stderr[-3000:]}"
    assert (tmp_path / "outputs" / "text" / "README.md").exists(), "the fine-tuned model's card"
    assert (tmp_path / "outputs" / "upload" / "README.md").exists(), "the staged upload"
