"""Every command the README shows runs as written, after the two set-up commands, in a quick mode:
the test extracts them (bash blocks and indented command lines), appends each program's quick flags
and runs them in order from an empty folder (so their `outputs/` land there). An upload gets
`--dry-run` (no network here). A command the table below does not know fails the test: a new README
command must say how it runs quickly. (The docs' commands: tests/test_docs.py.)"""

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
# Each program's quick flags: a script by its path, a study (`-m experiments.<name>`) by its module.
QUICK = {
    # The demo runs from the repository root (scripts/demo.py says why): its output goes to the test's folder by name.
    "scripts/demo.py": ["--steps", "2", "--output_dir", "{tmp}/outputs/demo"],
    "scripts/finetune_text_classification.py": FINETUNE,
    "scripts/finetune_causal_lm.py": FINETUNE,
    "scripts/finetune_image_classification.py": FINETUNE,
    "scripts/publish.py": ["--dry-run"],
    "experiments.demo": ["--steps", "2"],
    "experiments.bench_attention": ["--quick"],
    "experiments.bench_build_time": ["--quick"],
    "experiments.bench_sparsemix": ["--quick", "--lengths", "512", "--memory_lengths", "512"],
    "experiments.bench_sparsemix_decode": ["--quick"],
    "experiments.compare_attention": ["--quick"],
    "experiments.max_margin": ["--quick"],
    "experiments.sparsemix_retrieval": ["--quick"],
    "experiments.fusion": ["--epochs", "2", "--warmup_noise_epochs", "1", "--num_train", "64", "--num_test", "32"],
    "experiments.fusion.compare": ["--quick", "--no_plot"],
}


def commands_in(text: str) -> list[str]:
    """The commands of a markdown text: lines of bash blocks and indented command lines, comments cut,
    the set-up lines' `bash scripts/setup.sh && ...` split and the test command left out."""
    blocks = [block.replace("\\\n", " ") for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]  # continued lines
    lines = [line for block in blocks for line in block.splitlines()]
    lines += [line for line in text.splitlines() if re.match(r"^    (\.venv/bin/|[A-Z_]+=\S* \.venv/bin/)", line)]
    commands = []
    for line in lines:
        line = line.split("#", 1)[0].strip()
        for part in line.split("&&"):
            part = part.strip()
            if part and part != "bash scripts/setup.sh" and not part.endswith("-m pytest"):
                commands.append(part)
    return commands


def readme_commands() -> list[str]:
    return commands_in(README.read_text())


def program_of(command: str) -> tuple[dict, list[str], str, list[str]]:
    """`(env, launcher, program, args)` of a command: the environment it sets, the venv's python or
    torchrun, the script path or `-m` module, and the words after it."""
    words = shlex.split(command)
    env = {}
    while "=" in words[0] and not words[0].startswith("."):
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    launcher = words.pop(0)
    assert launcher in (".venv/bin/python", ".venv/bin/torchrun"), \
        f"command {command!r} does not start with the venv's python or torchrun"
    if words[0] == "-m":
        return env, [launcher], words[1], words[2:]
    flags = []
    while words[0].startswith("--"):  # torchrun's own flags
        flags += words[:2]
        words = words[2:]
    return env, [launcher, *flags], words[0], words[1:]


def as_quick_run(command: str, port: int, tmp: Path) -> tuple[list[str], dict]:
    env, launcher, program, args = program_of(command)
    assert program in QUICK, f"command {command!r}: add its quick flags to QUICK in {Path(__file__).name}"
    if launcher[0] == ".venv/bin/python":
        argv = [sys.executable]
    else:
        argv = [sys.executable, "-m", "torch.distributed.run", "--master_addr", "127.0.0.1", "--master_port", str(port),
                *launcher[1:]]
    target = ["-m", program] if not program.startswith("scripts/") else [str(ROOT / program)]
    return argv + target + args + [flag.format(tmp=tmp) for flag in QUICK[program]], env


@pytest.mark.slow  # ~2 min: every script once; CI runs it (`pytest -m slow`)
def test_every_readme_command_runs(tmp_path):
    from tests.training.test_ddp import free_port

    commands = readme_commands()
    assert len(commands) >= 3  # demo, fine-tune, publish
    # Run from an empty folder, so that their outputs land there: the studies find the repository on PYTHONPATH.
    base_env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for command in commands:
        argv, env = as_quick_run(command, free_port(), tmp_path)
        run = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, env={**base_env, **env}, timeout=600)
        assert run.returncode == 0, f"{command}\n{run.stderr[-3000:]}"
    assert (tmp_path / "outputs" / "demo" / "config.json").exists(), "the demo's trained model"
    assert (tmp_path / "outputs" / "text" / "README.md").exists(), "the fine-tuned model's card"
    assert (tmp_path / "outputs" / "upload" / "README.md").exists(), "the staged upload"
