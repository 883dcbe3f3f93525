"""Prompts to token ids with open_clip's SimpleTokenizer, warning about what truncation drops.

SimpleTokenizer ships its BPE merges inside the open_clip package (bpe_simple_vocab_16e6.txt.gz),
so tokenising never touches the network. Only its public API is used (`encode`, `decode`, the
special-token ids). The ids are `SimpleTokenizer.__call__`'s: [SOT] + BPE(prompt) + [EOT], cut
to the context with EOT kept as the last token, zero-padded, with one difference: text in a
prompt that spells a special token ("<end_of_text>", "<start_of_text>") is tokenised as the
ordinary characters it is made of, so a user's prompt can never end itself early or start a
second text.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from open_clip import SimpleTokenizer

# BPE is quadratic in a word's length (a 10,000-letter "word" takes ~6 s), so only the first
# context_length * _MAX_CHARS_PER_TOKEN characters of the prompt (whitespace collapsed) are
# tokenised. No BPE token is longer than ~20 characters, so this never changes the tokens that fit.
_MAX_CHARS_PER_TOKEN = 32


class PromptTruncatedWarning(UserWarning):
    """A prompt had more tokens than the text encoder's context; filter this category to silence it."""


def build_tokenizer(model_config: dict[str, Any]) -> SimpleTokenizer:
    """The tokenizer open_clip's get_tokenizer would pick for this config (SimpleTokenizer only)."""
    text_cfg = model_config["text_cfg"]
    kwargs = dict(text_cfg.get("tokenizer_kwargs") or {})
    if kwargs.get("reduction_mask"):
        raise ValueError("tokenizer_kwargs.reduction_mask is not supported: latentdiff truncates long prompts")
    return SimpleTokenizer(context_length=text_cfg.get("context_length", 77), **kwargs)


def _shorten(text: str, n: int = 40) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def _plain_ids(tokenizer: SimpleTokenizer) -> dict[int, list[int]]:
    """Special-token id -> the ids of its text read as ordinary characters ("<" + "end_of_text>")."""
    plain = {}
    for special in tokenizer.all_special_ids:
        text = tokenizer.decode([special]).strip()  # "<end_of_text>"
        # Split after the first character: neither part is a special token, and "<" before a
        # letter is its own word for CLIP's pattern either way, so the ids are those of plain text.
        plain[special] = tokenizer.encode(text[:1]) + tokenizer.encode(text[1:])
    return plain


def _encode(
    tokenizer: SimpleTokenizer, prompt: str, max_chars: int, plain: dict[int, list[int]]
) -> tuple[list[int], bool]:
    """BPE ids of `prompt` (no SOT/EOT), special-token text read as plain text; and whether it was cut.

    The cut at `max_chars` comes after collapsing whitespace, so runs of spaces cannot push real
    words past it.
    """
    text = " ".join(prompt.split())
    clipped = len(text) > max_chars
    ids: list[int] = []
    for i in tokenizer.encode(text[:max_chars]):
        ids.extend(plain.get(i, (i,)))
    return ids, clipped


def check_prompts(prompts: Sequence[str]) -> list[str]:
    """Reject anything that is not a list of str, naming the first bad entry."""
    if isinstance(prompts, (str, bytes)):
        raise TypeError("expected a list of prompts, got a single string; wrap it: [prompt]")
    prompts = list(prompts)
    for i, p in enumerate(prompts):
        if p is None:
            raise TypeError(f'prompt {i} is None; use "" for the unconditional (empty) prompt')
        if not isinstance(p, str):
            raise TypeError(f"prompt {i} is a {type(p).__name__}, not a str: {p!r:.60}")
    return prompts


def encode_prompts(
    tokenizer: SimpleTokenizer, prompts: Sequence[str], context_length: int
) -> tuple[torch.Tensor, list[str], tuple[int, ...]]:
    """Token ids (B, context_length), int64 on the CPU, a note per truncated prompt (no warning), and each
    prompt's real tokens (SOT..EOT inclusive) as Python ints."""
    prompts = check_prompts(prompts)
    sot, eot = tokenizer.sot_token_id, tokenizer.eot_token_id
    budget = context_length - 2  # room for BPE tokens between SOT and EOT
    tokens = torch.zeros(len(prompts), context_length, dtype=torch.long)
    truncated: list[str] = []
    lengths: list[int] = []
    plain = _plain_ids(tokenizer)
    for i, prompt in enumerate(prompts):
        ids, clipped = _encode(tokenizer, prompt, context_length * _MAX_CHARS_PER_TOKEN, plain)
        if len(ids) > budget:
            more = "+" if clipped else ""  # counted only up to the character cut
            dropped = len(ids) - budget
            truncated.append(f"prompt {i} ({_shorten(prompt)!r}: {len(ids)}{more} tokens, dropped {dropped}{more})")
            ids = ids[:budget]
        row = [sot, *ids, eot]
        tokens[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        lengths.append(len(row))
    return tokens, truncated, tuple(lengths)


def truncation_message(truncated: Sequence[str], n_prompts: int, context_length: int) -> str:
    """ "2 of 8 prompts exceed the text encoder's context of 77 tokens ... and were truncated: prompt 0 (...)"."""
    shown = "; ".join(truncated[:3]) + (f"; and {len(truncated) - 3} more" if len(truncated) > 3 else "")
    return (
        f"{len(truncated)} of {n_prompts} prompts exceed the text encoder's context of {context_length} "
        f"tokens ({context_length - 2} plus start/end) and were truncated: {shown}"
    )


def tokenize(tokenizer: SimpleTokenizer, prompts: Sequence[str], context_length: int) -> torch.Tensor:
    """Token ids (B, context_length), int64 on the CPU; warns (PromptTruncatedWarning) about truncated prompts."""
    prompts = check_prompts(prompts)
    tokens, truncated, _ = encode_prompts(tokenizer, prompts, context_length)
    if truncated:
        warnings.warn(truncation_message(truncated, len(prompts), context_length), PromptTruncatedWarning,
                      stacklevel=2)  # fmt: skip
    return tokens
