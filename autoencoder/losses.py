"""The autoencoder's loss: reconstruction + LPIPS + KL + an optional PatchGAN (Esser et al. 2021; Rombach et al. 2022)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from latentdiff.core.blocks import group_norm

from .encoder import DiagonalGaussian
from .model import AutoencoderLossConfig
from .perceptual import load_lpips, lpips_distance


class PatchDiscriminator(nn.Module):
    """PatchGAN (Isola et al. 2017): a grid of real/fake logits, one per receptive-field patch."""

    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3):
        super().__init__()
        mods: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        ch = channels
        for i in range(1, layers + 1):
            out = channels * min(2 ** i, 8)
            stride = 2 if i < layers else 1
            mods += [nn.Conv2d(ch, out, 4, stride, 1, bias=False), group_norm(out), nn.LeakyReLU(0.2)]
            ch = out
        mods.append(nn.Conv2d(ch, 1, 4, 1, 1))
        self.net = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def reconstruction_loss(x: torch.Tensor, x_hat: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-pixel L1 or L2, averaged over pixels: one value per sample, (B,)."""
    if kind == "l1":
        return (x - x_hat).abs().flatten(1).mean(1)
    if kind == "l2":
        return (x - x_hat).pow(2).flatten(1).mean(1)
    raise ValueError(f"loss.reconstruction {kind!r}: choose l1 or l2")


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Hinge loss for the discriminator, per sample: (B,)."""
    return 0.5 * (F.relu(1.0 - logits_real).flatten(1).mean(1) + F.relu(1.0 + logits_fake).flatten(1).mean(1))


def adaptive_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """Balance the GAN term against reconstruction by their gradient norms at the last layer (Esser et al. 2021, eq. 7)."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (rec_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach()


class AutoencoderLoss(nn.Module):
    """Everything the encoder/decoder are trained on, and the PatchGAN when it is switched on."""

    def __init__(self, cfg: AutoencoderLossConfig, in_channels: int = 3):
        super().__init__()
        self.cfg = cfg
        self.lpips = load_lpips() if cfg.perceptual == "lpips" else None
        self.discriminator = (PatchDiscriminator(in_channels, cfg.disc_channels, cfg.disc_layers)
                              if cfg.disc_weight > 0 else None)

    def gan_active(self, step: int) -> bool:
        return self.discriminator is not None and step >= self.cfg.disc_start

    def generator_loss(self, x: torch.Tensor, x_hat: torch.Tensor, posterior: DiagonalGaussian,
                       step: int, last_layer: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Per-sample terms (B,) and their weighted sum `loss` (B,); the loop takes the mean."""
        rec = reconstruction_loss(x, x_hat, self.cfg.reconstruction)
        terms = {"rec": rec}
        total = rec
        if self.lpips is not None:
            terms["lpips"] = lpips_distance(self.lpips, x_hat, x)
            total = total + self.cfg.perceptual_weight * terms["lpips"]
        # KL summed over the latent, divided by the number of image values: LDM's kl_weight scale.
        terms["kl"] = posterior.kl()
        total = total + self.cfg.kl_weight * terms["kl"] / x[0].numel()
        if self.gan_active(step):
            g = -self.discriminator(x_hat).flatten(1).mean(1)
            weight = (adaptive_weight(total.mean(), g.mean(), last_layer) if last_layer is not None
                      and torch.is_grad_enabled() else torch.tensor(1.0, device=x.device))
            terms["gan"] = g
            terms["gan_weight"] = weight.expand_as(g)
            total = total + self.cfg.disc_weight * weight * g
        terms["loss"] = total
        return terms

    def discriminator_loss(self, x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
        return hinge_d_loss(self.discriminator(x), self.discriminator(x_hat.detach()))

    def discriminator_optimizer(self) -> torch.optim.Optimizer | None:
        """AdamW for the PatchGAN with LDM's betas (0.5, 0.9), or None when there is no discriminator."""
        if self.discriminator is None:
            return None
        return torch.optim.AdamW(self.discriminator.parameters(), lr=self.cfg.disc_lr, betas=(0.5, 0.9))

    def optimise(self, terms: dict[str, torch.Tensor], x: torch.Tensor, x_hat: torch.Tensor, step: int,
                 opt: torch.optim.Optimizer, params, grad_clip: float, opt_d: torch.optim.Optimizer | None,
                 autocast) -> None:
        """Backward and step on the generator loss, then a discriminator step once the GAN is on.

        Adds the discriminator's loss to `terms` as "disc" when it trains. `params` are the
        generator's (autoencoder or decoder) parameters, clipped to grad_clip when it is > 0.
        """
        opt.zero_grad(set_to_none=True)
        terms["loss"].mean().backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        if self.gan_active(step):
            with autocast():
                d_loss = self.discriminator_loss(x, x_hat).mean()
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()
            terms["disc"] = d_loss.detach().expand(x.shape[0])
