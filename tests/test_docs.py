"""The README and docs/ hold up as written: every relative link (and its #anchor) and every file path a
page names exists; every command of this project's programs they show parses as written (the
README's also run, in a quick mode: test_readme_commands.py); every Python example runs
(test_readme.py)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from tests.test_readme_commands import commands_in, program_of

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# A path a page names in backticks, from a folder of the repository (not a generated outputs/ path, not
# a pattern with <placeholders>, {alternatives} or *globs); `file.py::name` names a file.
NAMED_PATH = re.compile(r"`((?:hf_multimax|experiments|scripts|docs|benchmarks|tests|modeling|model_cards|\.ci)/[^`<>{}*\s]*)`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#+ (.+)$", text, flags=re.M)}


def test_every_link_and_named_path_exists():
    broken = []
    for page in PAGES:
        text = page.read_text()
        for target in LINK.findall(text):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.name}: link {target}")
            elif anchor and file.suffix == ".md" and anchor not in anchors(file):
                broken.append(f"{page.name}: link {target} (no such heading)")
        for named in NAMED_PATH.findall(text):
            if not (ROOT / named.split("::")[0]).exists():
                broken.append(f"{page.name}: path {named}")
    assert not broken, "\n".join(broken)


def test_the_checks_see_what_they_should():
    # The patterns find what the pages hold, so the test above checks something.
    readme = (ROOT / "README.md").read_text()
    assert "docs/sparsemix.md" in LINK.findall(readme) and len(LINK.findall(readme)) >= 10
    assert "hf_multimax/ops/backends.py" in NAMED_PATH.findall((ROOT / "docs" / "backends.md").read_text())
    assert not NAMED_PATH.findall("`outputs/x.json` `tests/models/<model>/test.py` `benchmarks/results/*.json`")
    assert "how-the-selectors-compare" in anchors(ROOT / "docs" / "sparsemix-retrieval.md")


# Runs in a fresh process: each program runs as its command would run it, up to the point where it has
# parsed its arguments (argparse, or transformers' HfArgumentParser built on it), and stops there. A
# flag that does not exist, a bad value or a missing argument fails as it would for the user.
PARSE_ONLY = r"""
import argparse, json, os, runpy, sys
sys.path.insert(0, os.getcwd())  # python -m runs from the repository root, which puts it on sys.path
class Parsed(Exception):
    pass
original = argparse.ArgumentParser.parse_known_args
def parse_known_args(self, args=None, namespace=None):
    namespace, extra = original(self, args, namespace)
    raise Parsed(extra)
argparse.ArgumentParser.parse_known_args = parse_known_args
results = []
for program, args in json.loads(sys.argv[1]):
    sys.argv = [program, *args]
    try:
        if program.endswith(".py"):
            sys.path.insert(0, os.path.dirname(os.path.abspath(program)))  # as python does for a script
            runpy.run_path(program, run_name="__main__")
        else:
            runpy.run_module(program, run_name="__main__", alter_sys=True)
        results.append("ran to the end without parsing arguments")
    except Parsed as done:
        results.append(f"unrecognized arguments: {done.args[0]}" if done.args[0] else "ok")
    except SystemExit as exit:
        results.append(f"exit {exit.code}")
    except Exception as err:
        results.append(f"{type(err).__name__}: {err}")
print(json.dumps(results))
"""

# scripts/demo.py only starts `python -m experiments.demo` with its arguments, in a new process.
FORWARDS = {"scripts/demo.py": "experiments.demo"}


def project_commands() -> list[tuple[str, str, list[str]]]:
    """`(page, program, args)` of every command that runs one of this project's programs (a script or a
    `python -m` module of this repository) with the venv's python or torchrun; other tools' commands
    (pip, git, installed console scripts) are not this project's to check."""
    found = []
    for page in PAGES:
        for command in commands_in(page.read_text()):
            launcher = next(word for word in command.split() if "=" not in word)
            if launcher not in (".venv/bin/python", ".venv/bin/torchrun"):
                continue
            _, _, program, args = program_of(command)
            if program.startswith("scripts/") or (ROOT / program.split(".")[0]).is_dir():
                found.append((page.name, FORWARDS.get(program, program), args))
    return found


def test_every_command_parses_as_written():
    commands = project_commands()
    assert {"scripts/finetune_text_classification.py", "scripts/publish.py", "experiments.demo",
            "experiments.bench_attention", "experiments.sparsemix_retrieval"} <= {program for _, program, _ in commands}
    run = subprocess.run([sys.executable, "-c", PARSE_ONLY, json.dumps([[p, a] for _, p, a in commands])], cwd=ROOT,
                         capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    outcomes = json.loads(run.stdout.strip().splitlines()[-1])
    failed = [f"{page}: {program} {' '.join(args)} -> {outcome}"
              for (page, program, args), outcome in zip(commands, outcomes) if outcome != "ok"]
    assert not failed, "\n".join(failed)
