"""Real English text that needs no download: the documentation topics CPython ships for `help()`.

Provenance: `pydoc_data.topics.topics` is generated from CPython's own documentation (the language
reference and parts of the library reference, reStructuredText in `Doc/` rendered as plain text by
Sphinx's `pydoc-topics` builder when CPython is released), PSF license. It is in every CPython
installation: 79 topics, ~465k characters on Python 3.11 (edited technical English with grammar rules
and short code examples). The text changes between Python versions, so exact contents are fixed per
version, and the split below is deterministic for a given version.

Split: topics sorted by name; every `HELD_OUT_EVERY`-th (indices 7, 15, ...) is held out, the rest is
training text. Topics are sections of the manual and some hold others (`assignment` holds
`augassign`, `execmodel` holds `exceptions`, `identifiers` holds `id-classes`), so the training side
also drops every paragraph (blank-line separated) that a held-out topic has: ~6k characters, after which
no paragraph is on both sides. Held out: 9 whole topics, ~36k characters (~9k SmolLM2 tokens), short
and long (`continue` to `string-methods`); training: ~423k characters (~103k tokens).
"""

from __future__ import annotations

__all__ = ["HELD_OUT_EVERY", "SPLITS", "prose", "token_windows", "topic_names"]

HELD_OUT_EVERY = 8
SPLITS = ("train", "heldout")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def topic_names(split: str) -> list[str]:
    """The topics of `split` (`"train"` or `"heldout"`), in sorted order."""
    from pydoc_data.topics import topics

    _check_split(split)
    return [name for i, name in enumerate(sorted(topics))
            if (i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1) == (split == "heldout")]


def _paragraphs(text: str) -> list[str]:
    # Not stripped: an indented block (grammar, code) keeps its first line's indentation.
    return [p.strip("\n") for p in text.split("\n\n") if p.strip()]


def prose(split: str = "train") -> str:
    """The text of `split`'s topics, in sorted order, one blank line between paragraphs; the training
    side without the paragraphs that held-out topics have."""
    from pydoc_data.topics import topics

    paragraphs = [p for name in topic_names(split) for p in _paragraphs(topics[name])]
    if split == "train":
        held_out = {p for name in topic_names("heldout") for p in _paragraphs(topics[name])}
        paragraphs = [p for p in paragraphs if p not in held_out]
    return "\n\n".join(paragraphs)


def token_windows(tokenizer, split: str, length: int, count: int):
    """`count` consecutive, non-overlapping windows of `length` tokens of `split`'s text, from its
    start: LongTensor [count, length]. Raises `ValueError` when the text holds fewer tokens."""
    import torch

    ids = tokenizer(prose(split), add_special_tokens=False)["input_ids"]
    if len(ids) < length * count:
        raise ValueError(f"the {split} text has {len(ids)} tokens, fewer than {count} windows of {length}")
    return torch.tensor(ids[: length * count]).view(count, length)
