"""Losses on the decoder's output: reconstruction, LPIPS and a PatchGAN (Esser et al. 2021; Rombach et al. 2022).

The autoencoder stage trains on these plus its KL term (autoencoder/losses.py); the decoder
stage, whose encoder is frozen, trains on these alone. The loss objects compute losses; the
stage loops run backward, clipping and the optimizer steps where a reader sees them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from latentdiff.core.blocks import group_norm
from latentdiff.core.config import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt
from latentdiff.core.image_metrics import psnr
from latentdiff.core.logger import save_grid
from latentdiff.core.train import adamw

from .perceptual import load_lpips, lpips_distance


@dataclass(frozen=True)
class DecoderLossConfig:
    reconstruction: Literal["l1", "l2"] = "l1"  # per-pixel distance
    perceptual: Literal["lpips", "none"] = "none"  # lpips: VGG weights from the torch hub cache
    perceptual_weight: NonNegativeFloat = 1.0  # weight of LPIPS
    disc_weight: NonNegativeFloat = 0.0  # PatchGAN generator loss weight (0: no discriminator)
    disc_start: NonNegativeInt = 5000  # step at which the discriminator switches on
    disc_channels: PositiveInt = 64  # PatchGAN base width
    disc_layers: PositiveInt = 3  # PatchGAN strided conv layers
    disc_lr: PositiveFloat = 1e-4  # discriminator learning rate (AdamW, betas 0.5/0.9)


class PatchDiscriminator(nn.Module):
    """PatchGAN (Isola et al. 2017): a grid of real/fake logits, one per receptive-field patch."""

    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3):
        super().__init__()
        mods: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        ch = channels
        for i in range(1, layers + 1):
            out = channels * min(2**i, 8)
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
    """Balance the GAN term against reconstruction by their gradient norms at the last layer.

    Esser et al. 2021, eq. 7: lambda = |grad rec| / (|grad g| + 1e-4), clamped to [0, 1e4].
    """
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (rec_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach()


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


class DecoderLoss(nn.Module):
    """What a decoder's output is trained on, and the PatchGAN when it is switched on.

    average: averages a tensor over ranks (`Runtime.all_reduce_mean`), so that under torchrun
    every rank weighs the GAN term alike; the default leaves it as it is.
    """

    def __init__(
        self, cfg: DecoderLossConfig, in_channels: int = 3, average: Callable[[torch.Tensor], torch.Tensor] = _same
    ):
        super().__init__()
        self.cfg = cfg
        self.lpips = load_lpips() if cfg.perceptual == "lpips" else None
        self.discriminator = (
            PatchDiscriminator(in_channels, cfg.disc_channels, cfg.disc_layers) if cfg.disc_weight > 0 else None
        )
        self.average = average

    def gan_active(self, step: int) -> bool:
        return self.discriminator is not None and step >= self.cfg.disc_start

    def image_terms(self, x: torch.Tensor, x_hat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Reconstruction (and LPIPS) per sample (B,), and their weighted sum as `loss`."""
        terms = {"rec": reconstruction_loss(x, x_hat, self.cfg.reconstruction)}
        total = terms["rec"]
        if self.lpips is not None:
            terms["lpips"] = lpips_distance(self.lpips, x_hat, x)
            total = total + self.cfg.perceptual_weight * terms["lpips"]
        terms["loss"] = total
        return terms

    def add_gan(
        self, terms: dict[str, torch.Tensor], x_hat: torch.Tensor, step: int, last_layer: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        """Add the adaptively weighted generator term -D(x_hat) to `loss` once the GAN is on."""
        if self.gan_active(step):
            g = -self.discriminator(x_hat).flatten(1).mean(1)
            weight = (
                adaptive_weight(terms["loss"].mean(), g.mean(), last_layer)
                if last_layer is not None and torch.is_grad_enabled()
                else torch.tensor(1.0, device=x_hat.device)
            )
            weight = self.average(weight)
            terms["gan"] = g
            terms["gan_weight"] = weight.expand_as(g)
            terms["loss"] = terms["loss"] + self.cfg.disc_weight * weight * g
        return terms

    def forward(
        self, x: torch.Tensor, x_hat: torch.Tensor, step: int, last_layer: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Per-sample terms (B,) and their weighted sum `loss` (B,); the loop takes the mean."""
        return self.add_gan(self.image_terms(x, x_hat), x_hat, step, last_layer)

    def discriminator_loss(self, x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
        """Hinge loss of the PatchGAN on real x and reconstructed x_hat (detached), per sample (B,)."""
        return hinge_d_loss(self.discriminator(x), self.discriminator(x_hat.detach()))

    def discriminator_optimizer(self) -> torch.optim.Optimizer | None:
        """AdamW for the PatchGAN with LDM's betas (0.5, 0.9), or None when there is no discriminator."""
        if self.discriminator is None:
            return None
        return adamw(self.discriminator.parameters(), lr=self.cfg.disc_lr, betas=(0.5, 0.9))


def begin_with_gan(
    run, loss_fn: DecoderLoss, model: nn.Module, opt: torch.optim.Optimizer, ema, meta: dict
) -> tuple[torch.optim.lr_scheduler.LambdaLR, torch.optim.Optimizer | None]:
    """`run.begin` (core.train.Run) for a loop that trains a decoder, with the PatchGAN when it is on.

    The discriminator and its optimizer are checkpointed (and restored) beside the model, and
    every rank then starts from rank 0's discriminator: each rank drew its initial weights
    from its own seed, and DDP does not wrap it. Returns (the model's lr schedule, the
    discriminator's optimizer or None).
    """
    modules, optimizers = {"model": model}, {"model": opt}
    opt_d = loss_fn.discriminator_optimizer()
    if opt_d is not None:
        modules["discriminator"], optimizers["discriminator"] = loss_fn.discriminator, opt_d
    scheduler = run.begin(modules, optimizers, ema, meta=meta)
    if opt_d is not None:
        run.runtime.broadcast_module(loss_fn.discriminator)
    return scheduler, opt_d


def discriminator_backward(
    loss_fn: DecoderLoss, opt_d: torch.optim.Optimizer, x: torch.Tensor, x_hat: torch.Tensor, run
) -> tuple[torch.Tensor, torch.Tensor]:
    """The PatchGAN's loss and gradients for this step: loss, backward, average over ranks; the loop steps it.

    Taken before the generator's optimizer step, which does not change what the discriminator sees
    (real x, the detached x_hat) nor its weights, so its finiteness joins the generator's in the
    step's one vote (`run.finite_parts`, core.train.Run). Every rank starts from rank 0's
    discriminator (`Runtime.broadcast_module`) and applies the same averaged gradients, so the
    copies stay identical. Returns (the hinge loss, detached scalar; the gradient norm), the pair
    `finite_parts` takes.
    """
    with run.runtime.autocast():
        d_loss = loss_fn.discriminator_loss(x, x_hat).mean()
    opt_d.zero_grad(set_to_none=True)  # also drops what the generator's GAN term left in its gradients
    d_loss.backward()
    run.runtime.average_gradients(loss_fn.discriminator)
    d_norm = torch.nn.utils.clip_grad_norm_(loss_fn.discriminator.parameters(), math.inf)  # measured, not clipped
    return d_loss.detach(), d_norm


# ---- what both loops that train a decoder (autoencoder and decoder stages) log and show --------


def reconstruction_metrics(
    terms: dict[str, torch.Tensor], x: torch.Tensor, x_hat: torch.Tensor, lr: float, grad_norm: torch.Tensor
) -> dict[str, float]:
    """The scalars a reconstruction step logs: lr, gradient norm, batch PSNR (dB) and each loss term's mean."""
    return {
        "lr": lr,
        "grad_norm": grad_norm.item(),
        "psnr": psnr(x_hat.detach(), x).mean().item(),
        **{f"loss_{k}" if k != "loss" else k: v.detach().mean().item() for k, v in terms.items()},
    }


def save_reconstructions(x: torch.Tensor, x_hat: torch.Tensor, path):
    """A grid of up to 16 inputs (first row) above their reconstructions (second row); returns its path."""
    return save_grid(torch.cat([x[:16], x_hat[:16].detach()]), path, 16)


def log_reconstruction_step(run, step: int, log_every: int, sample_every: int, terms, x, x_hat, lr, grad_norm) -> None:
    """What the autoencoder and decoder loops log after a step: the metrics line and, at its interval, the grid.

    run: the stage's core.train.Run; x, x_hat: (B, 3, H, W) in [-1, 1]; terms: the loss terms, (B,) each.
    """
    if run.every(log_every, step):
        run.log(step, reconstruction_metrics(terms, x, x_hat, lr, grad_norm))
    if run.every(sample_every, step):
        grid = run.path / "samples" / f"recon_{step + 1:07d}.png"
        run.sample(step, lambda: save_reconstructions(x, x_hat, grid), tag="reconstructions")
