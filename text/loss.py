"""The CLIP contrastive loss (Radford et al. 2021, Fig. 3): the text stage calls open_clip.ClipLoss on
the model's normalised features and keeps the learned temperature in range with `clamp_logit_scale`.
With hard negatives it adds `hard_negative_loss`, each image against its own caption and its negatives;
with `token_identity` > 0, `token_identity_loss` keeps each word's own identity in the per-token states.

Unlike the other stages' losses this returns one value for the batch, not one per sample:
every term's softmax runs over the whole batch (and, under DDP, over all ranks' features
when ClipLoss is built with rank/world_size), so a "per-sample" loss would not be independent
of the batch it was computed in. ClipLoss returns
    (CE(logits_per_image, arange(B)) + CE(logits_per_text, arange(B))) / 2,
each cross-entropy averaged over the batch.
"""

from __future__ import annotations

import math

import open_clip
import torch
import torch.nn.functional as F

# CLIP clips the learned temperature so logits are scaled by at most 100 (Radford et al. 2021, Sec. 2.5).
MAX_LOGIT_SCALE = math.log(100)
TOKEN_IDENTITY_TEMPERATURE = 0.07  # CLIP's initial temperature (Radford et al. 2021, Sec. 2.5), fixed here


@torch.no_grad()
def clamp_logit_scale(model: open_clip.CLIP) -> None:
    """Keep the learned temperature in [0, ln 100]; call after each optimizer step, as open_clip's trainer does."""
    model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)


def hard_negative_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    negative_features: torch.Tensor,
    counts: list[int],
    logit_scale: torch.Tensor,
) -> torch.Tensor:
    """Cross-entropy of each image over its own caption and its hard-negative captions.

    image_features, text_features: (B, E) normalised, row i a pair; negative_features: (N, E) normalised,
    image i's counts[i] negatives in turn (N = sum(counts)); logit_scale: the scale itself (exp of the
    learned log). Returns the mean over the images with at least one negative (0 when none has).

    The batch's own contrast (ClipLoss) rarely holds a caption that differs from the right one by a swapped
    colour or relation; this term always does (hard negatives, NegCLIP: Yuksekgonul et al. 2023, Sec. 4,
    which appends them to the batch's captions; here they compete with their own image's caption only, so a
    negative that is another image's true caption is never counted against that image).
    """
    if len(counts) != image_features.shape[0] or sum(counts) != negative_features.shape[0]:
        raise ValueError(
            f"counts {counts} do not match {image_features.shape[0]} images and {negative_features.shape[0]} negatives"
        )
    has = [i for i, n in enumerate(counts) if n > 0]
    if not has:
        return image_features.sum() * 0  # keeps the graph: a batch without negatives adds nothing
    # Negative j of image i goes to row i, column j of a (B, K) grid; the rest is padding.
    n = torch.tensor(counts, device=negative_features.device)
    rows = torch.repeat_interleave(torch.arange(len(counts), device=n.device), n)  # (N,)
    cols = torch.arange(len(rows), device=n.device) - torch.repeat_interleave(torch.cumsum(n, 0) - n, n)
    padded = negative_features.new_zeros(len(counts), max(counts), negative_features.shape[1])
    padded[rows, cols] = negative_features
    valid = torch.zeros(len(counts), max(counts), dtype=torch.bool, device=n.device)
    valid[rows, cols] = True
    positive = (image_features * text_features).sum(-1, keepdim=True)  # (B, 1)
    negative = torch.einsum("be,bke->bk", image_features, padded)  # (B, K)
    scores = torch.cat([positive, negative], dim=1)  # (B, 1 + K): the own caption first
    present = torch.cat([torch.ones_like(valid[:, :1]), valid], dim=1)
    # Masked after scaling: -inf times the scale would give the scale a NaN gradient.
    logits = (logit_scale * scores).masked_fill(~present, -math.inf)[has]
    return F.cross_entropy(logits, torch.zeros(len(has), dtype=torch.long, device=logits.device))


def token_identity_loss(
    states: torch.Tensor,
    tokens: torch.Tensor,
    words: torch.Tensor,
    embedding: torch.Tensor,
    temperature: float = TOKEN_IDENTITY_TEMPERATURE,
) -> torch.Tensor:
    """Cross-entropy of each word's state over the batch's distinct words, its own token embedding the answer.

    states: (B, T, D) the per-token states the prior reads; tokens: (B, T) their ids; words: (B, T) bool, the
    positions to score (`encoder.word_mask`: SOT, EOT and padding left out); embedding: (V, D) the token
    embedding table, tied as the output layer (no new weights). Cosine logits over `temperature`.
    Returns one value, the mean over the words; 0 (keeping the graph) when no position is a word.

    Why: CLIP's contrastive loss reads only the pooled EOT state, and in a small CLIP trained from scratch the
    word's own embedding (norm ~0.25) is small against the residual stream (norm ~30 at the last block) and is
    swamped from the first block on, so
    "to the left of" and "to the right of" reach the prior as states of cosine 0.965 at the word and >= 0.998
    after it (docs/scenes.md). A word identity term on the states keeps the word apart, as a language-model
    encoder's token states do (T5 in Imagen, Saharia et al. 2022, Sec. 2.1).
    """
    cosines, target = word_cosines(states, tokens, words, embedding)  # checks the shapes first
    if not len(target):
        return states.sum() * 0
    return F.cross_entropy(cosines / temperature, target)


def word_cosines(
    states: torch.Tensor, tokens: torch.Tensor, words: torch.Tensor, embedding: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine of each word's state (N of them, where `words`) with each distinct word's token embedding (U):
    (N, U) float32, and (N,) the column of each state's own word. Shapes as in token_identity_loss."""
    if states.shape[:2] != tokens.shape or words.shape != tokens.shape:
        raise ValueError(f"states {tuple(states.shape)}, tokens {tuple(tokens.shape)} and words {tuple(words.shape)}")
    vocab, target = torch.unique(tokens[words], return_inverse=True)  # (U,), (N,) index into vocab
    queries = F.normalize(states[words].float(), dim=-1)  # (N, D)
    keys = F.normalize(embedding[vocab].float(), dim=-1)  # (U, D)
    return queries @ keys.T, target
