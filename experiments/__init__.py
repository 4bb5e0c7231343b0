"""Reproducible studies: the benchmarks, comparisons and experiments behind the README's numbers.

A repository folder, not installed with `hf_multimax` (users import the library; these only run
from a checkout): `scripts/` put the repository root on `sys.path`, tests import it from there.
The library never imports from here.
"""
