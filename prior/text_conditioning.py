"""What the prior's cross-attention reads: the text encoder's per-token states of prompts, cut to their length."""

from __future__ import annotations

import torch

from latentdiff.text.encoder import TextEncoder, TextOutput

Conditioning = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (states (B,T,D), mask (B,T), pooled (B,E))


def text_conditioning(encoder: TextEncoder, prompts: list[str], length: int | None = None) -> Conditioning:
    """(states, mask, pooled) of the prompts, cut after the longest prompt's last token (or at `length`).

    Positions after every prompt's EOT are masked out of cross-attention, so cutting them gives the
    same attention output for less work: the text encoder pads to its context length (77), while
    a caption is ~10 tokens. The key and value projections and the attention scale with it.
    """
    out = encoder.encode(prompts)
    if length is None:
        length = _longest(out) if len(prompts) else out.mask.shape[1]
    return _cut(out, length)


def guided_conditioning(
    encoder: TextEncoder, prompts: list[str], negative: list[str]
) -> tuple[Conditioning, Conditioning]:
    """Conditioning for the prompts and for their negative (or empty) prompts, cut to one length.

    Classifier-free guidance runs both halves as one batch, so they must have the same length. Each
    distinct prompt is encoded alone (`TextEncoder.encode_each`), so an image's conditioning does not
    depend on the other prompts of its batch.
    """
    cond, uncond = encoder.encode_each(prompts), encoder.encode_each(negative)
    length = max(_longest(cond), _longest(uncond))
    return _cut(cond, length), _cut(uncond, length)


def _longest(out: TextOutput) -> int:
    """The longest prompt's real tokens: counted on the host by the encoder (no device read in a training step)."""
    if out.lengths is not None:
        return max(out.lengths, default=0)
    return int(out.mask.sum(dim=1).max())


def _cut(out, length: int) -> Conditioning:
    return out.states[:, :length], out.mask[:, :length], out.pooled
