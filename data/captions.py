"""Small English helpers shared by the caption templates and prompts of every source."""

from __future__ import annotations

_VOWELS = "aeiou"


def with_article(phrase: str) -> str:
    """Prefix "a" or "an" by the first letter of `phrase` ("an ankle boot", "a t-shirt")."""
    phrase = phrase.strip()
    if not phrase:
        raise ValueError("with_article needs a non-empty phrase")
    return ("an " if phrase[0].lower() in _VOWELS else "a ") + phrase


def class_prompt(name: str) -> str:
    """The canonical prompt for a class, "a photo of a sneaker", used for zero-shot and generation."""
    return f"a photo of {with_article(name)}"


# Tried in order; latin-1 maps every byte, so decoding never fails. cp1252 comes first because
# Windows tools write it and it differs from latin-1 only where latin-1 has control characters.
CAPTION_ENCODINGS = ("utf-8", "cp1252", "latin-1")


def decode_caption(data: bytes) -> tuple[str, str]:
    """(stripped text, encoding used): UTF-8 (a BOM is dropped), else cp1252, else latin-1."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    for encoding in CAPTION_ENCODINGS:
        try:
            return data.decode(encoding).strip(), encoding
        except UnicodeDecodeError:
            continue
    raise AssertionError("latin-1 decodes every byte string")  # pragma: no cover
