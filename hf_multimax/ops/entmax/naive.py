"""sparsemax / 1.5-entmax attention, reference implementation (materialises the scores)."""

from __future__ import annotations


from ..naive_attention import naive_attention

__all__ = ["ENTMAX_NORMALIZERS", "naive_entmax_attention"]

ENTMAX_NORMALIZERS = ("sparsemax", "entmax15")


def _normalizer(name: str):
    try:
        import entmax
    except ImportError as err:
        raise ImportError(f"attention normaliser {name!r} needs the entmax package: pip install 'hf-multimax[entmax]'") from err
    return {"sparsemax": entmax.sparsemax, "entmax15": entmax.entmax15}[name]


def naive_entmax_attention(query, key, value, *, normalizer: str = "entmax15", **kwargs):
    """`normalizer(scores) @ V` with `normalizer` in `ENTMAX_NORMALIZERS`; other arguments as
    `naive_attention`. Returns `(out, probs)`; probabilities are exactly zero outside the support."""
    if normalizer not in ENTMAX_NORMALIZERS:
        raise ValueError(f"normalizer={normalizer!r} is not supported; allowed values: {ENTMAX_NORMALIZERS}")
    return naive_attention(query, key, value, normalizer=_normalizer(normalizer), **kwargs)
