"""pytest plugin for `transformers_model_tests.py`, loaded into transformers' own test runs with
`-p _transformers_swap` (this folder on PYTHONPATH). Nothing else imports it.

Always: appends one JSON line per test phase (setup, call, teardown) to the file named by
`HF_MULTIMAX_OUTCOMES`, so a run cut short by its time limit still leaves what it did.

With `HF_MULTIMAX_SWAP=<name>` (e.g. `multimax`, `multimax:eager`, `sparsemix`) it also imports hf_multimax
and swaps the plugin in: every model whose attention transformers resolves to one of
`HF_MULTIMAX_SWAP_FROM` (comma-separated, default `sdpa`) is built with `<name>` instead.

Where the swap sits: `PreTrainedModel._check_and_adjust_attn_implementation`, the one method through
which every model's `__init__` (so `from_pretrained`, `from_config`, `model_class(config)`, each
sub-model of a composite one) and `set_attn_implementation` resolve the requested implementation.
It is wrapped on its result, not on the request: a default (None) becomes "sdpa" there and is
swapped, a model without SDPA support keeps its eager fallback, and a test's explicit "eager"
(what transformers requires for `output_attentions`, and the reference its SDPA tests compare
against) stays eager unless `eager` is listed. Configs are left alone until a model is built
with them, so configuration tests see transformers as it is. The wrapper exists only inside the
test process that loaded this plugin.
"""

from __future__ import annotations

import inspect
import json
import os

import pytest

_OUTCOMES = os.environ.get("HF_MULTIMAX_OUTCOMES")
_TARGET = os.environ.get("HF_MULTIMAX_SWAP")
_FROM = tuple(n for n in os.environ.get("HF_MULTIMAX_SWAP_FROM", "sdpa").split(",") if n)
_swaps = 0  # models built with the swapped implementation since the current test began


def _install_swap(target: str) -> None:
    import hf_multimax  # noqa: F401  (registers the methods and the model hooks)
    from transformers import PreTrainedModel

    original = PreTrainedModel.__dict__.get("_check_and_adjust_attn_implementation")
    params = list(inspect.signature(original).parameters)[:2] if callable(original) else None
    if params != ["self", "attn_implementation"]:
        raise pytest.UsageError(
            "_transformers_swap: this transformers has no PreTrainedModel._check_and_adjust_attn_implementation"
            f"(self, attn_implementation, ...) (found {params}); the swap needs another hook for it"
        )

    def swapped(self, attn_implementation, *args, **kwargs):
        global _swaps
        chosen = original(self, attn_implementation, *args, **kwargs)
        if chosen in _FROM:
            chosen = original(self, target, *args, **kwargs)
            _swaps += 1
        return chosen

    PreTrainedModel._check_and_adjust_attn_implementation = swapped


def pytest_configure(config):
    if _TARGET:
        _install_swap(_TARGET)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    global _swaps
    _swaps = 0


def _first_error_line(report) -> str:
    """The error's first line, and the last source line pytest marked with ">" (which assert failed)."""
    crash = getattr(report.longrepr, "reprcrash", None)
    text = crash.message if crash is not None else str(report.longrepr)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    marked = [line[1:].strip() for line in report.longreprtext.splitlines() if line.startswith(">")]
    return ((lines[0][:300] if lines else "") + (f"  [at: {marked[-1][:200]}]" if marked else ""))


def pytest_runtest_logreport(report):
    if not _OUTCOMES:
        return
    record = {"test": report.nodeid, "when": report.when, "outcome": report.outcome,
              "duration": round(report.duration, 3), "swaps": _swaps}
    if report.failed:
        record["error"] = _first_error_line(report)
    elif report.skipped and hasattr(report, "wasxfail"):
        record["outcome"] = "xfailed"
    with open(_OUTCOMES, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
