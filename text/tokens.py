"""Prompts to token ids with open_clip's SimpleTokenizer, warning about what truncation drops.

SimpleTokenizer ships its BPE merges inside the open_clip package (bpe_simple_vocab_16e6.txt.gz),
so tokenising never touches the network. The ids match `SimpleTokenizer.__call__` exactly:
[SOT] + BPE(prompt) + [EOT], cut to the context with EOT kept as the last token, zero-padded.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from open_clip import SimpleTokenizer

# BPE is quadratic in a word's length (a 10,000-letter "word" takes ~6 s), so only the first
# context_length * _MAX_CHARS_PER_TOKEN characters of the cleaned prompt are tokenised. No BPE
# token is longer than ~20 characters, so this never changes the tokens that fit the context.
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


def _encode(tokenizer: SimpleTokenizer, prompt: str, max_chars: int) -> tuple[list[int], bool]:
    """BPE ids of `prompt` (no SOT/EOT), and whether the cleaned text was cut at `max_chars`.

    Same steps as SimpleTokenizer.encode, with the cut between cleaning and BPE: cleaning first
    collapses whitespace and drops control characters, so they cannot push real words past the cut.
    """
    text = tokenizer.clean_fn(prompt)
    clipped = len(text) > max_chars
    text = text[:max_chars]
    ids: list[int] = []
    for word in tokenizer.pat.findall(text):
        word = "".join(tokenizer.byte_encoder[b] for b in word.encode("utf-8"))
        ids.extend(tokenizer.encoder[piece] for piece in tokenizer.bpe(word).split(" "))
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


def tokenize(tokenizer: SimpleTokenizer, prompts: Sequence[str], context_length: int) -> torch.Tensor:
    """Token ids (B, context_length), int64 on the CPU; warns (PromptTruncatedWarning) about truncated prompts."""
    prompts = check_prompts(prompts)
    sot, eot = tokenizer.sot_token_id, tokenizer.eot_token_id
    budget = context_length - 2  # room for BPE tokens between SOT and EOT
    tokens = torch.zeros(len(prompts), context_length, dtype=torch.long)
    truncated: list[str] = []
    for i, prompt in enumerate(prompts):
        ids, clipped = _encode(tokenizer, prompt, context_length * _MAX_CHARS_PER_TOKEN)
        if len(ids) > budget:
            more = "+" if clipped else ""  # counted only up to the character cut
            dropped = len(ids) - budget
            truncated.append(f"prompt {i} ({_shorten(prompt)!r}: {len(ids)}{more} tokens, dropped {dropped}{more})")
            ids = ids[:budget]
        row = [sot, *ids, eot]
        tokens[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    if truncated:
        shown = "; ".join(truncated[:3]) + (f"; and {len(truncated) - 3} more" if len(truncated) > 3 else "")
        warnings.warn(
            f"{len(truncated)} of {len(prompts)} prompts exceed the text encoder's context of {context_length} "
            f"tokens ({budget} plus start/end) and were truncated: {shown}",
            PromptTruncatedWarning,
            stacklevel=2,
        )
    return tokens
