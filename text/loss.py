"""The CLIP contrastive loss (Radford et al. 2021, Fig. 3) through open_clip.ClipLoss.

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

from latentdiff.text.model import preprocess_images

# CLIP clips the learned temperature so logits are scaled by at most 100 (Radford et al. 2021, Sec. 2.5).
MAX_LOGIT_SCALE = math.log(100)


def contrastive_loss(
    model: open_clip.CLIP,
    images: torch.Tensor,
    tokens: torch.Tensor,
    loss_fn: open_clip.ClipLoss | None = None,
) -> torch.Tensor:
    """Scalar symmetric InfoNCE loss of matching pairs (images[i], tokens[i]).

    images: (B, 3, H, W) in [-1, 1], as the data reader gives them (normalised here);
    tokens: (B, T) from TextEncoder.tokenize. Pass a ClipLoss built with rank/world_size for DDP.
    """
    loss_fn = loss_fn if loss_fn is not None else open_clip.ClipLoss()
    image_features = model.encode_image(preprocess_images(images, model), normalize=True)  # (B, E)
    text_features = model.encode_text(tokens, normalize=True)  # (B, E)
    return loss_fn(image_features, text_features, model.logit_scale.exp())


@torch.no_grad()
def clamp_logit_scale(model: open_clip.CLIP) -> None:
    """Keep the learned temperature in [0, ln 100]; call after each optimizer step, as open_clip's trainer does."""
    model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
