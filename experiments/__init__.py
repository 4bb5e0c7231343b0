"""Reproducible studies: the benchmarks, comparisons and experiments behind the documented numbers.

A repository folder, not installed with `hf_multimax` (users import the library; these only run from
a checkout). Each study is a module with its own entry point, run from the repository root:
`.venv/bin/python -m experiments.<name> --help`. Shipped results go to `benchmarks/results/`
(`harness.output_path`). The library never imports from here.
"""
