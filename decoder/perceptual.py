"""LPIPS (Zhang et al. 2018) through the `lpips` package, with offline-friendly loading.

LPIPS' own linear heads ship inside the `lpips` package; its VGG16 backbone comes from
torchvision's pretrained weights, which torchvision reads from the torch hub cache. Nothing
is downloaded here: when the file is missing we say which file to put where.
"""

from __future__ import annotations

from pathlib import Path

import torch

from latentdiff.core.errors import UserError


def vgg16_weights_path() -> Path:
    """Where torchvision looks for VGG16's ImageNet weights (the torch hub cache)."""
    from torchvision.models import VGG16_Weights

    filename = VGG16_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[-1]
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def lpips_available() -> bool:
    return vgg16_weights_path().exists()


def load_lpips(without: str = 'train without it: --set loss.perceptual="none"') -> torch.nn.Module:
    """A frozen LPIPS-VGG module taking images in [-1, 1]; a clear error when VGG16's weights are absent.

    without: how the caller's command goes on without LPIPS, ending the error (the training stage's flag by
    default; `evaluate-autoencoder` names its own). Raises UserError.
    """
    path = vgg16_weights_path()
    if not path.exists():
        raise UserError(
            f"LPIPS needs torchvision's VGG16 weights at {path} (the torch hub cache; set TORCH_HOME to move it). "
            f"Copy {path.name} there from a machine with internet, or {without}"
        )
    import lpips

    model = lpips.LPIPS(net="vgg", verbose=False)
    model.eval().requires_grad_(False)
    return model


def lpips_distance(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """LPIPS between two batches in [-1, 1], one value per sample: (B,)."""
    return model(x, y, normalize=False).flatten(1).mean(1)
