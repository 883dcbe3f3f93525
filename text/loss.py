"""The CLIP contrastive loss (Radford et al. 2021, Fig. 3): the text stage calls open_clip.ClipLoss on
the model's normalised features and keeps the learned temperature in range with `clamp_logit_scale`.

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

# CLIP clips the learned temperature so logits are scaled by at most 100 (Radford et al. 2021, Sec. 2.5).
MAX_LOGIT_SCALE = math.log(100)


@torch.no_grad()
def clamp_logit_scale(model: open_clip.CLIP) -> None:
    """Keep the learned temperature in [0, ln 100]; call after each optimizer step, as open_clip's trainer does."""
    model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
