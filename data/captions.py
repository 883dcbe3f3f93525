"""Small English helpers shared by the caption templates of every source."""

from __future__ import annotations

_VOWELS = "aeiou"


def with_article(phrase: str) -> str:
    """Prefix "a" or "an" by the first letter of `phrase` ("an ankle boot", "a t-shirt")."""
    phrase = phrase.strip()
    if not phrase:
        raise ValueError("with_article needs a non-empty phrase")
    return ("an " if phrase[0].lower() in _VOWELS else "a ") + phrase
