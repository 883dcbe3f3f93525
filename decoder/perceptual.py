"""LPIPS (Zhang et al. 2018) through the `lpips` package, built from tensors we read ourselves.

LPIPS-VGG is torchvision's VGG16 ImageNet features (the file `vgg16-397923af.pth` in the torch
hub cache) plus five linear heads that ship inside the `lpips` package. Left to themselves,
torchvision unpickles the cache file with weights_only=False and checks its hash only when it
downloads it, and lpips reads its heads with torch's default (unsafe before torch 2.6). So the
network is built without weights and both files are read here as plain tensors
(core.safe_load); the VGG16 file's sha256 must begin with the prefix its published name carries.
Nothing is downloaded: when the file is missing we say which file to put where.
"""

from __future__ import annotations

import inspect
import re
import warnings
from pathlib import Path

import torch

from latentdiff.core.checkpoint import CheckpointError
from latentdiff.core.errors import UserError
from latentdiff.core.safe_load import check_published_hash, read_tensor_file


def vgg16_url() -> str:
    """Where torchvision publishes VGG16's ImageNet weights (its name carries the sha256 prefix)."""
    from torchvision.models import VGG16_Weights

    return VGG16_Weights.IMAGENET1K_V1.url


def vgg16_weights_path() -> Path:
    """Where torchvision looks for VGG16's ImageNet weights (the torch hub cache)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / vgg16_url().rsplit("/", 1)[-1]


def lpips_heads_path() -> Path:
    """The LPIPS v0.1 linear heads for VGG that the `lpips` package ships (weights/v0.1/vgg.pth)."""
    import lpips

    return Path(inspect.getfile(lpips.LPIPS)).parent / "weights" / "v0.1" / "vgg.pth"


def lpips_available() -> bool:
    return vgg16_weights_path().exists()


def _copy_in(
    module: torch.nn.Module, names: dict[str, str], state: dict[str, torch.Tensor], path: Path, what: str
) -> None:
    """Copy state[theirs] into `module`'s tensor `ours` for each ours -> theirs in `names`.

    Raises CheckpointError (one line) naming the tensors that are missing or of another shape.
    """
    own = module.state_dict()  # shares storage with the parameters, so copy_ fills them
    missing = [theirs for theirs in names.values() if theirs not in state]
    misshapen = [
        f"{theirs} is {tuple(state[theirs].shape)}, needs {tuple(own[ours].shape)}"
        for ours, theirs in names.items()
        if theirs in state and state[theirs].shape != own[ours].shape
    ]
    if missing or misshapen:
        problems = [f"{len(missing)} tensor(s) missing ({', '.join(missing[:3])})"] if missing else []
        raise CheckpointError(f"{path} is not {what}: {'; '.join(problems + misshapen[:2])}")
    with torch.no_grad():
        for ours, theirs in names.items():
            own[ours].copy_(state[theirs])


def load_lpips(without: str = 'train without it: --set loss.perceptual="none"') -> torch.nn.Module:
    """A frozen LPIPS-VGG module taking images in [-1, 1]; a clear error when VGG16's weights are absent.

    without: how the caller's command goes on without LPIPS, ending the error (the training stage's flag by
    default; `evaluate-autoencoder` names its own). Raises UserError for a missing file and CheckpointError
    (both ValueError, one line) for a file that fails its published hash, holds code or is another network.
    """
    path = vgg16_weights_path()
    if not path.exists():
        raise UserError(
            f"LPIPS needs torchvision's VGG16 weights at {path} (the torch hub cache; set TORCH_HOME to move it). "
            f"Copy {path.name} there from a machine with internet, or {without}"
        )
    check_published_hash(path, "torchvision's VGG16 weights", vgg16_url())
    vgg = read_tensor_file(path, "torchvision's VGG16 weights")
    heads_path = lpips_heads_path()
    heads = read_tensor_file(heads_path, "lpips' linear heads for VGG")
    import lpips

    with warnings.catch_warnings():
        # lpips asks torchvision for vgg16(pretrained=False), a spelling torchvision warns about.
        warnings.simplefilter("ignore", UserWarning)
        # pnet_rand / pretrained=False: build the network only; neither library reads a file.
        model = lpips.LPIPS(net="vgg", pnet_rand=True, pretrained=False, verbose=False)
    # lpips cuts VGG16's `features` into slices that keep torchvision's layer numbers:
    # net.slice2.5.weight is features.5.weight.
    layers = {k: "features." + k.split(".", 1)[1] for k in model.net.state_dict()}
    _copy_in(model.net, layers, vgg, path, "torchvision's VGG16 weights")
    # lins.i is lin{i} (one module under two names), so filling lin0..lin4 fills both.
    heads_names = {k: k for k in model.state_dict() if re.match(r"lin\d\.", k)}
    _copy_in(model, heads_names, heads, heads_path, "lpips' linear heads for VGG")
    model.eval().requires_grad_(False)
    return model


def lpips_distance(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """LPIPS between two batches in [-1, 1], one value per sample: (B,)."""
    return model(x, y, normalize=False).flatten(1).mean(1)
