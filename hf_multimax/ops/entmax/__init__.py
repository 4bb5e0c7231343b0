"""Sparse normalisers as attention baselines (sparsemax, 1.5-entmax) through the `entmax` package."""

from .naive import ENTMAX_NORMALIZERS, naive_entmax_attention

__all__ = ["ENTMAX_NORMALIZERS", "naive_entmax_attention"]
