"""Limits of concept prompts and the vocabulary of a concept detector (label → phrases), checked without
torch: the settings validate a configured vocabulary when they load."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

# Limits every caller applies (the API, the Nuclio and agent functions, jobs): the text encoder reads at most
# 32 tokens, and a request's cost grows with its phrases and exemplars.
MAX_PHRASE_CHARS = 200
MAX_PHRASES = 32
MAX_EXEMPLARS = 16
Vocabulary = dict[str, list[str]]
MAX_VOCABULARY_PHRASES = 256  # every phrase of a vocabulary runs on every image


def check_vocabulary(raw: Mapping[str, Sequence[str] | str]) -> Vocabulary:
    """A vocabulary as {label: [phrases]} (a bare string is one phrase; an empty list: the label itself).
    ValueError, saying what to fix, for an empty label or phrase, a phrase too long, or too many."""
    vocabulary: Vocabulary = {}
    for label, phrases in raw.items():
        if not isinstance(label, str) or not label.strip():
            raise ValueError(f"vocabulary labels must be non-empty strings, got {label!r}")
        listed = [phrases] if isinstance(phrases, str) else list(phrases) or [label]
        cleaned = []
        for phrase in listed:
            if not isinstance(phrase, str) or not phrase.strip() or len(phrase.strip()) > MAX_PHRASE_CHARS:
                raise ValueError(
                    f"label {label!r}: phrases must be non-empty strings of at most {MAX_PHRASE_CHARS} "
                    f"characters, got {phrase!r}"
                )
            cleaned.append(phrase.strip())
        vocabulary[label.strip()] = list(dict.fromkeys(cleaned))
    total = len({p for phrases in vocabulary.values() for p in phrases})
    if total > MAX_VOCABULARY_PHRASES:
        raise ValueError(f"the vocabulary has {total} distinct phrases; at most {MAX_VOCABULARY_PHRASES}")
    return vocabulary
