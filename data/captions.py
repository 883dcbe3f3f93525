"""Captions: the English helpers of every source's templates and prompts, and reading the caption files users bring."""

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


# Tried in order when a caption has no byte-order mark; latin-1 maps every byte, so decoding never
# fails. cp1252 comes first because Windows tools write it and it differs from latin-1 only where
# latin-1 has control characters.
CAPTION_ENCODINGS = ("utf-8", "cp1252", "latin-1")
GUESSED_ENCODINGS = CAPTION_ENCODINGS[1:]  # decoded without certainty: the importer lists these captions
# A byte-order mark names its encoding exactly. UTF-32 LE's mark starts with UTF-16 LE's, so it is tried first.
BYTE_ORDER_MARKS = (
    (b"\xff\xfe\x00\x00", "utf-32-le"),
    (b"\x00\x00\xfe\xff", "utf-32-be"),
    (b"\xef\xbb\xbf", "utf-8"),
    (b"\xff\xfe", "utf-16-le"),  # what Windows PowerShell's `>` and Notepad's "Unicode" write
    (b"\xfe\xff", "utf-16-be"),
)
NUL_REASON = "caption holds NUL characters"


class BadCaption(ValueError):
    """A caption that cannot be used; `reason` is the short form a dataset counts its skips by."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason} ({detail})")
        self.reason = reason
        self.detail = detail


def decode_caption(data: bytes) -> tuple[str, str]:
    """(stripped text, encoding used) of a caption file's bytes.

    The encoding is the one a byte-order mark names (UTF-8, UTF-16 LE/BE, UTF-32 LE/BE; the mark is
    dropped), else UTF-8, else cp1252, else latin-1. Raises BadCaption when the text holds a NUL
    character (UTF-16 without its mark looks so: "a\\0 \\0r\\0e\\0d"), or does not decode in
    the encoding its mark names.
    """
    for mark, encoding in BYTE_ORDER_MARKS:
        if data.startswith(mark):
            try:
                text = data[len(mark) :].decode(encoding)
            except UnicodeDecodeError as e:
                detail = f"not {encoding} although it starts with its mark: {e.reason}"
                raise BadCaption("unreadable caption", detail) from None
            break
    else:
        for encoding in CAPTION_ENCODINGS:
            try:
                text = data.decode(encoding)
                break
            except UnicodeDecodeError:
                continue
    return refuse_nul(text).strip(), encoding


def refuse_nul(text: str) -> str:
    """`text`, or BadCaption when it holds a NUL character (no tool means one in a caption)."""
    if "\0" in text:
        where = text.index("\0")
        hint = "; UTF-16 without a byte-order mark? save it as UTF-8" if where <= 1 else ""
        raise BadCaption(NUL_REASON, f"a NUL at character {where}{hint}")
    return text


def first_line(text: str) -> tuple[str, bool]:
    """(the first non-empty line, stripped; whether other non-empty lines were dropped): kohya's rule for a caption.

    kohya's sd-scripts read a caption file's first line; a file of several lines is most often one
    caption per line (OneTrainer samples among them), which joined would make one caption no
    tool meant.
    """
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (lines[0] if lines else ""), len(lines) > 1
