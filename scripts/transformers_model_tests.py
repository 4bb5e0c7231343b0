"""Run transformers' own model tests with hf_multimax swapped in, and list the tests that fail only then.

Each model's test file (`<tests-root>/models/<model>/test_modeling_<model>.py`) runs twice with pytest,
each in its own process: a baseline with transformers as it is, then with `_transformers_swap.py`
(this folder) loaded as a pytest plugin, which imports hf_multimax and builds every model the
tests make with SDPA (by default or by request) with `--attn` instead (that file says how). A test
that passes in the baseline and fails with the swap is a swap-only failure: a plugin bug, or a
test that checks for transformers' own names. Tests failing in the baseline (GPU-only, tests tree
older or newer than the installed transformers) are left out.

    .venv/bin/python scripts/transformers_model_tests.py --tests-root /path/to/transformers/tests \\
        --models llama t5 --json /tmp/transformers_model_tests.json

`--tests-root` is the `tests` folder of a transformers checkout, best at the tag of the installed
version (`v$(.venv/bin/python -c 'import transformers; print(transformers.__version__)')`).
transformers' tests need a few packages of its `testing` extra that the project does not install:
`.venv/bin/pip install parameterized pytest-timeout pytest-xdist timeout-decorator` (xdist is not
used for running: the checkout's conftest.py registers hooks that only exist with it installed).
Not part of the default suite; a model's file takes minutes per run on a small CPU machine.
docs/transformers-model-tests.md has the latest results.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from _cli import HelpFormatter  # noqa: E402  (scripts/ is first on sys.path when run)

HERE = Path(__file__).resolve().parent
MODELS = ("llama", "t5", "bart", "gemma3", "whisper")
PASSING = {"passed", "skipped", "xfailed"}


def run_pytest(test_file: Path, outcomes: Path, log: Path, args, swap: bool) -> dict:
    """One pytest process over `test_file`; returns how it ended. Outcomes go to `outcomes` (JSON lines)."""
    outcomes.unlink(missing_ok=True)
    root = test_file.parents[3]  # <checkout>/tests/models/<model>/test_modeling_<model>.py
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"), "HF_MULTIMAX_OUTCOMES": str(outcomes),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))}
    env.pop("HF_MULTIMAX_SWAP", None)
    if swap:
        env["HF_MULTIMAX_SWAP"] = args.attn
        env["HF_MULTIMAX_SWAP_FROM"] = ",".join(args.swap_from)
    cmd = [sys.executable, "-m", "pytest", str(test_file.relative_to(root)), "-p", "_transformers_swap",
           "-p", "no:cacheprovider", "-q", "-o", "log_cli=false", "-o", "addopts=", "--timeout", str(args.timeout)]
    if args.k:
        cmd += ["-k", args.k]
    start = time.monotonic()
    with open(log, "w") as out:
        # Its own process group, so a run past --run-timeout is ended with every process it started.
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=args.run_timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc = proc.wait()
    return {"returncode": rc, "timed_out": rc == -signal.SIGKILL, "seconds": round(time.monotonic() - start, 1)}


def read_outcomes(path: Path) -> dict[str, dict]:
    """test id -> {"outcome": passed|failed|skipped|xfailed, "error": first line, "swaps": n}, from the phases."""
    tests: dict[str, dict] = {}
    if not path.exists():
        return tests
    for line in path.read_text().splitlines():
        r = json.loads(line)
        t = tests.setdefault(r["test"], {"outcome": "passed", "error": "", "swaps": 0, "seconds": 0.0})
        t["seconds"] = round(t["seconds"] + r["duration"], 3)
        t["swaps"] = max(t["swaps"], r["swaps"])
        if r["outcome"] == "failed" and t["outcome"] != "failed":
            t["outcome"], t["error"] = "failed", r.get("error", "")
            if r["when"] != "call":
                t["error"] = f"[{r['when']}] {t['error']}"
        elif r["outcome"] in ("skipped", "xfailed") and t["outcome"] == "passed":
            t["outcome"] = r["outcome"]
    return tests


def compare(baseline: dict[str, dict], swapped: dict[str, dict]) -> dict:
    failed = lambda tests: sorted(t for t, r in tests.items() if r["outcome"] == "failed")  # noqa: E731
    swap_only = [{"test": t, "error": swapped[t]["error"], "models_swapped": swapped[t]["swaps"]}
                 for t in failed(swapped) if baseline.get(t, {}).get("outcome") in PASSING]
    count = lambda tests, outcome: sum(r["outcome"] == outcome for r in tests.values())  # noqa: E731
    return {
        "baseline_run": len(baseline),
        "baseline_passed": count(baseline, "passed"),
        "baseline_skipped": count(baseline, "skipped") + count(baseline, "xfailed"),
        "swap_run": len(swapped),
        "baseline_failed": failed(baseline),
        "swap_failed": len(failed(swapped)),
        "swap_only_failed": swap_only,
        # Failing with the swap but not run in the baseline (it stopped early): unknown.
        "swap_failed_not_in_baseline": [t for t in failed(swapped) if t not in baseline],
        "fixed_by_swap": [t for t in failed(baseline) if swapped.get(t, {}).get("outcome") in PASSING],
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--tests-root", required=True, type=Path, help="a transformers checkout's tests folder")
    parser.add_argument("--models", nargs="+", default=list(MODELS), help="model folders under tests/models")
    parser.add_argument("--attn", default="multimax", help="the plugin implementation swapped in (multimax, multimax:eager, sparsemix, ...)")
    parser.add_argument("--swap-from", nargs="+", default=["sdpa"],
                        help="implementations replaced once transformers resolved them; add eager to swap the tests' explicit eager too")
    parser.add_argument("-k", default=None, help="pytest -k expression, for both runs")
    parser.add_argument("--timeout", type=int, default=300, help="seconds one test may take (pytest-timeout)")
    parser.add_argument("--run-timeout", type=int, default=3600, help="seconds one pytest run may take; what it did is kept")
    parser.add_argument("--out-dir", type=Path, default=Path("/tmp/hf_multimax_transformers_tests"), help="pytest logs and outcome files")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--reuse-baseline", action="store_true",
                        help="take a model's baseline from --out-dir when an earlier run left it (transformers unchanged)")
    args = parser.parse_args(argv)

    tests_root = args.tests_root.resolve()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    import transformers

    # The swapped runs import hf_multimax as this process would (PYTHONPATH can point at another copy): say
    # which one, and for this checkout's, its commit and any uncommitted changes.
    spec = importlib.util.find_spec("hf_multimax")
    package = Path(spec.origin).parent if spec and spec.origin else None
    git = lambda *a: subprocess.run(["git", *a], cwd=HERE, capture_output=True, text=True).stdout.strip()  # noqa: E731
    in_checkout = package is not None and package.parent == HERE.parent
    results = {"transformers": transformers.__version__, "hf_multimax": str(package),
               "hf_multimax_commit": git("rev-parse", "--short", "HEAD") if in_checkout else None,
               "hf_multimax_uncommitted": git("status", "--porcelain", "--", "hf_multimax").splitlines() if in_checkout else None,
               "tests_root": str(tests_root), "attn": args.attn,
               "swap_from": args.swap_from, "k": args.k, "models": {}}
    for model in args.models:
        test_file = tests_root / "models" / model / f"test_modeling_{model}.py"
        if not test_file.exists():
            parser.error(f"no {test_file}")
        runs, outcomes = {}, {}
        for name, swap in (("baseline", False), ("swap", True)):
            out = args.out_dir / f"{model}_{name}"
            if not swap and args.reuse_baseline and out.with_suffix(".json").exists():
                runs[name] = json.loads(out.with_suffix(".json").read_text())
                print(f"{model}: baseline from {out.with_suffix('.jsonl')}", flush=True)
            else:
                print(f"{model}: {name} run ...", flush=True)
                runs[name] = run_pytest(test_file, out.with_suffix(".jsonl"), out.with_suffix(".log"), args, swap)
                out.with_suffix(".json").write_text(json.dumps(runs[name]) + "\n")
            outcomes[name] = read_outcomes(out.with_suffix(".jsonl"))
            # pytest's exit codes 0 and 1 say the tests ran (1: some failed); 2-5 that the run itself broke
            # (interrupted, internal error, usage error, nothing collected), e.g. hf_multimax failed to import.
            if runs[name]["returncode"] not in (0, 1) and not runs[name]["timed_out"]:
                tail = out.with_suffix(".log").read_text().strip().splitlines()[-5:]
                print(f"  the {name} run broke (pytest exit {runs[name]['returncode']}):\n    " + "\n    ".join(tail), flush=True)
        result = {"runs": runs, **compare(outcomes["baseline"], outcomes["swap"])}
        results["models"][model] = result
        print(f"  {result['baseline_run']} tests, {len(result['baseline_failed'])} fail in the baseline, "
              f"{len(result['swap_only_failed'])} only with the swap", flush=True)
        if args.json:  # after each model, so an interrupted sweep keeps the finished ones
            args.json.write_text(json.dumps(results, indent=1) + "\n")

    print("\n| model | tests run | baseline failures | swap-only failures |\n|---|---|---|---|")
    for model, r in results["models"].items():
        cut = " (cut short)" if any(run["timed_out"] for run in r["runs"].values()) else ""
        print(f"| {model} | {r['baseline_run']}{cut} | {len(r['baseline_failed'])} | {len(r['swap_only_failed'])} |")
    for model, r in results["models"].items():
        for f in r["swap_only_failed"]:
            print(f"{f['test']}\n    {f['error']}")
    return results


if __name__ == "__main__":
    main()
