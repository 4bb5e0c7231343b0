"""The real-text helper (`experiments/real_text.py`): CPython's documentation topics, split by topic
into disjoint training and held-out text, the same way every time."""

import pytest
from pydoc_data.topics import topics

from experiments.real_text import HELD_OUT_EVERY, prose, topic_names


def test_split_is_disjoint_complete_and_by_every_eighth_topic():
    train, heldout = topic_names("train"), topic_names("heldout")
    assert not set(train) & set(heldout)
    assert sorted(train + heldout) == sorted(topics)
    assert heldout == sorted(topics)[HELD_OUT_EVERY - 1::HELD_OUT_EVERY]


def test_text_is_deterministic_and_sized_for_the_experiments():
    train, heldout = prose("train"), prose("heldout")
    assert prose("train") == train and prose("heldout") == heldout
    # Sizes on CPython 3.11 (423k / 36k characters); ranges leave room for other versions' docs. The
    # held-out side must hold a 2048-token window (~4 characters per SmolLM2 token) several times over.
    assert 300_000 < len(train) < 600_000 and 20_000 < len(heldout) < 80_000
    assert '"assert" statement' in train and "str.capitalize()" in heldout
    # No paragraph is on both sides, although `assignment` holds the held-out `augassign` (and two more).
    assert "augmented assignment" in topics["assignment"] and "augassign" in topic_names("heldout")
    paragraphs = set(train.split("\n\n"))
    assert not any(p in paragraphs for p in heldout.split("\n\n"))
    assert "augmented assignment statement" not in train


def test_unknown_split_names_the_allowed_ones():
    with pytest.raises(ValueError, match="'train', 'heldout'"):
        prose("test")
