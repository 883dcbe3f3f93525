"""The autoencoder's loss: the decoder-output losses (decoder/losses.py) plus KL (Rombach et al. 2022, §3.1)."""

from __future__ import annotations

import torch

from latentdiff.decoder.losses import DecoderLoss

from .encoder import DiagonalGaussian


class AutoencoderLoss(DecoderLoss):
    """Reconstruction, LPIPS and the PatchGAN of `DecoderLoss`, plus the KL of q(z|x) to N(0, I)."""

    def forward(
        self,
        x: torch.Tensor,
        x_hat: torch.Tensor,
        posterior: DiagonalGaussian,
        step: int,
        last_layer: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per-sample terms (B,) and their weighted sum `loss` (B,); the loop takes the mean."""
        terms = self.image_terms(x, x_hat)
        # KL summed over the latent, divided by the number of image values: LDM's kl_weight scale.
        terms["kl"] = posterior.kl()
        terms["loss"] = terms["loss"] + self.cfg.kl_weight * terms["kl"] / x[0].numel()
        return self.add_gan(terms, x_hat, step, last_layer)
