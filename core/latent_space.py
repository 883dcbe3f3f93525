"""The latent space an autoencoder defines: what it hands the prior, and the one place latents are scaled.

The prior does not learn the autoencoder's raw latents z ~ q(z|x) but z * scale, with scale =
1 / std(z) measured on training images after the autoencoder is trained, so the prior's data has
unit variance (Rombach et al. 2022, §4.3.2 and Appendix G). Everything a later stage must agree on
about those latents is one frozen object:

    space = LatentSpace(scale=1 / std, absmax=max|z| / std, channels=4, downsampling=4,
                        resolution=32, encoder_hash="3f2a...")
    z_prior = space.to_prior(ae.encode(x).sample())   # (B, c, H/f, W/f), unit variance
    x_hat = ae.decode(space.to_decoder(z_prior))

The autoencoder stage writes it into its run (meta.json "latent_space"); the autoencoder loader
returns it; a prior records the one it trained on, and resuming the prior or loading it for
generation refuses an autoencoder whose latent space differs in any field (a retrained encoder,
or a scale re-measured on other data, would otherwise be used silently).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from .checkpoint import CheckpointError


@dataclass(frozen=True)
class LatentSpace:
    scale: float  # 1 / std of z ~ q(z|x) over training images: prior latents are z * scale
    absmax: float  # max |z| * scale over the measured images, in prior (scaled) units: the clip bound of z_0
    channels: int  # c, channels of z
    downsampling: int  # f, image side / latent side
    resolution: int  # image side the encoder was trained on (and the prior's images have)
    encoder_hash: str  # content hash of the encoder weights that produce z (core.checkpoint.tensors_hash)

    def __post_init__(self) -> None:
        if not (self.scale > 0 and self.absmax > 0):
            raise ValueError(f"a latent space needs scale > 0 and absmax > 0, got {self.scale} and {self.absmax}")
        if self.resolution % self.downsampling:
            raise ValueError(f"resolution {self.resolution} is not a multiple of the downsampling {self.downsampling}")

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(c, H/f, W/f) of one image's latent."""
        side = self.resolution // self.downsampling
        return (self.channels, side, side)

    def to_prior(self, z: torch.Tensor) -> torch.Tensor:
        """Autoencoder latents (B, c, h, w) -> the prior's unit-variance latents."""
        return z * self.scale

    def to_decoder(self, z: torch.Tensor) -> torch.Tensor:
        """The prior's latents (B, c, h, w) -> what the autoencoder's decoder reads."""
        return z / self.scale

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> LatentSpace:
        names = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(data, dict) or set(data) != names:
            raise CheckpointError(f"{where}: a latent space needs exactly the keys {', '.join(sorted(names))}")
        return cls(**data)

    def check_same(self, recorded: LatentSpace, autoencoder: str, user: str) -> None:
        """Raise CheckpointError (one line) when `recorded` (what `user` was trained on) differs from this one."""
        diffs = [
            f"{f.name} {getattr(recorded, f.name)} -> {getattr(self, f.name)}"
            for f in dataclasses.fields(self)
            if getattr(recorded, f.name) != getattr(self, f.name)
        ]
        if diffs:
            raise CheckpointError(
                f"{user} was trained on another latent space than autoencoder {autoencoder} has now "
                f"({'; '.join(diffs)}): another autoencoder run, or this one retrained or its scale re-measured. "
                "Use the autoencoder run it was trained with, or train a new prior on this one"
            )
