"""A small CNN over images, trained on the shards' labels: FID features and prompt-faithfulness judge.

Datasets without Inception weights (Fashion-MNIST at 32x32, procedural shapes) still need a
feature space for FID (Heusel et al. 2017) and a judge of whether an image shows what its
prompt asked for. This classifier gives both:

- heads: one per labelled attribute. Fashion-MNIST (info.json "classes", meta "label"): one head
  "class". Shapes (info.json "attributes", meta "shapes"): one head per attribute ("shape",
  "color", "size", "position") of the FIRST shape in meta["shapes"], the one the caption names
  first (the left one when there are two), and one per attribute of the SECOND shape
  ("second_shape", ...), whose classes add "none" for an image with one shape; so prompt accuracy
  scores both objects of a two-shape prompt.
- features: the penultimate layer taken BEFORE its ReLU. After the ReLU some units are dead on
  real data, which makes the feature covariance singular (CALIBRATION.md); pre-ReLU they are not.

    model = load_classifier("runs/classifier")          # frozen, eval mode
    f = model.features(images)                          # (B, feature_dim), images in [-1, 1]
    logits = model(images)                              # {"class": (B, 10)}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from latentdiff.core.config import PositiveInt, Probability
from latentdiff.core.runs import load_run
from latentdiff.core.train import TrainConfig

STAGE = "classifier"


@dataclass(frozen=True)
class ClassifierModelConfig:
    in_channels: PositiveInt = 3  # image channels the network reads (grayscale data arrives as RGB from the reader)
    channels: tuple[PositiveInt, ...] = (32, 64, 128, 256)  # conv width per level; levels after the first halve H, W
    # 3x3 conv + BatchNorm + ReLU blocks per level. One at full resolution: a second 32-wide conv at
    # 32x32 costs as much as the whole 8x8 level (measured), for little accuracy.
    convs_per_level: tuple[PositiveInt, ...] = (1, 2, 2, 1)
    feature_dim: PositiveInt = 128  # width of the penultimate (FID feature) layer
    dropout: Probability = 0.1  # dropout before the heads, training only


@dataclass(frozen=True)
class ClassifierStageConfig:
    model: ClassifierModelConfig = field(default_factory=ClassifierModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    resolution: PositiveInt = 32  # image side read from the shards; other sizes are resized to it before scoring
    eval_images: PositiveInt = 10000  # images per split (val, and test when present) for the final accuracies


# Heads: attribute name -> the names of its classes, in label order. Decided by the data, stored in meta.json.
Heads = dict[str, list[str]]


SECOND = "second_"  # prefix of the heads that read an image's second shape
NONE = "none"  # the second-shape heads' class for an image with one shape


def heads_from_info(info: dict[str, Any], where: str = "the dataset") -> Heads:
    """The heads a dataset's info.json calls for: per attribute of the first and second shape, or one "class" head."""
    attributes = info.get("attributes")
    if attributes:
        first = {name: list(values) for name, values in attributes.items()}
        return {**first, **{SECOND + name: [*values, NONE] for name, values in first.items()}}
    classes = info.get("classes")
    if classes:
        return {"class": list(classes)}
    raise ValueError(
        f"{where} has no 'classes' or 'attributes' in its info.json, so there is nothing to classify; "
        "the classifier needs labelled shards such as `latentdiff data fashion-mnist` or "
        "`latentdiff data shapes` write"
    )


def targets_from_meta(heads: Heads, metas: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Per-head class indices (B,) from the samples' json: meta["label"], or meta["shapes"][0 or 1][attribute]
    ("none" for a second-shape head of an image with one shape)."""
    out: dict[str, list[int]] = {name: [] for name in heads}
    for meta in metas:
        for name, values in heads.items():
            if name == "class":
                if "label" not in meta:
                    raise ValueError(f"a sample's json has no 'label' for the class head: {meta}")
                index = int(meta["label"])
                if not 0 <= index < len(values):
                    raise ValueError(f"label {index} is outside the {len(values)} classes {values}")
            else:
                shapes = meta.get("shapes")
                slot, attr = (1, name[len(SECOND) :]) if name.startswith(SECOND) else (0, name)
                if not shapes or attr not in shapes[0]:
                    raise ValueError(f"a sample's json has no shapes[0][{attr!r}] for the {name!r} head: {meta}")
                value = shapes[slot][attr] if slot < len(shapes) else NONE
                if value not in values:
                    raise ValueError(f"{name} {value!r} is not one of the classifier's values {values}")
                index = values.index(value)
            out[name].append(index)
    return {name: torch.tensor(v, dtype=torch.long) for name, v in out.items()}


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    # BatchNorm: the fastest-converging normaliser for a few hundred CPU steps of a plain CNN.
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class Classifier(nn.Module):
    """conv levels -> global average pool -> linear (features, pre-ReLU) -> ReLU -> one linear head per attribute."""

    def __init__(self, cfg: ClassifierModelConfig, heads: Heads, resolution: int):
        super().__init__()
        if not heads:
            raise ValueError("a classifier needs at least one head")
        self.cfg, self.heads, self.resolution = cfg, {k: list(v) for k, v in heads.items()}, resolution
        if len(cfg.convs_per_level) != len(cfg.channels) or min(cfg.convs_per_level) < 1:
            raise ValueError(
                f"model.convs_per_level {cfg.convs_per_level} needs one count >= 1 per level of "
                f"model.channels {cfg.channels}"
            )
        if resolution % 2 ** (len(cfg.channels) - 1):
            raise ValueError(
                f"resolution {resolution} must be divisible by 2^{len(cfg.channels) - 1} for {len(cfg.channels)} levels"
            )
        layers: list[nn.Module] = []
        c_prev = cfg.in_channels
        for level, (c, convs) in enumerate(zip(cfg.channels, cfg.convs_per_level)):
            if level > 0:
                layers.append(nn.MaxPool2d(2))
            for _ in range(convs):
                layers.append(_conv_block(c_prev, c))
                c_prev = c
        self.body = nn.Sequential(*layers)
        self.embed = nn.Linear(c_prev, cfg.feature_dim)
        self.dropout = nn.Dropout(cfg.dropout)
        self.head = nn.ModuleDict({name: nn.Linear(cfg.feature_dim, len(values)) for name, values in heads.items()})

    def check_images(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.cfg.in_channels:
            raise ValueError(
                f"the classifier takes images (B, {self.cfg.in_channels}, H, W) in [-1, 1], got shape {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise ValueError(
                f"the classifier takes float images in [-1, 1], got {x.dtype}; convert uint8 with x / 127.5 - 1"
            )

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [-1, 1] -> (B, feature_dim) penultimate features, before the ReLU."""
        self.check_images(x)
        h = self.body(x.to(self.embed.weight.dtype))  # (B, C', H/2^L, W/2^L)
        return self.embed(h.mean(dim=(2, 3)))  # (B, feature_dim)

    def logits_from_features(self, f: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.dropout(F.relu(f))
        return {name: head(h) for name, head in self.head.items()}  # name -> (B, classes)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.logits_from_features(self.features(x))

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-head predicted class indices (B,)."""
        return {name: logits.argmax(-1) for name, logits in self(x).items()}


def classification_loss(logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy summed over heads, one value per sample: (B,)."""
    return sum(F.cross_entropy(logits[k], targets[k].to(logits[k].device), reduction="none") for k in logits)


def correct(predictions: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-head (B,) bool hits, and "all": every head right."""
    if set(predictions) != set(targets):
        raise ValueError(f"predictions for heads {sorted(predictions)} but targets for {sorted(targets)}")
    hits = {k: predictions[k].cpu() == targets[k].cpu() for k in predictions}
    hits["all"] = torch.stack(list(hits.values())).all(0)
    return hits


def load_classifier(run_dir: str | Path, device: torch.device | str = "cpu", ema: bool = True) -> Classifier:
    """Rebuild a trained classifier from its run directory alone, frozen and in eval mode.

    `model.weights_hash` is the content hash of the loaded weights (keys FID statistics caches);
    `model.meta` is the run's meta.json.
    """
    run = load_run(
        run_dir,
        STAGE,
        ClassifierStageConfig,
        lambda cfg, meta: Classifier(cfg.model, meta["heads"], cfg.resolution),
        device=device,
        ema=ema,
        needs=("heads",),
    )
    model = run.model
    model.weights_hash, model.meta, model.run_dir = run.weights_hash, run.meta, str(run_dir)
    return model


WEAK_ACCURACY = 0.5  # below this share of val images right (every head), a classifier's verdicts mean little


def weak_classifier_note(model: Classifier) -> str | None:
    """A one-line note when `model` (from load_classifier) gets fewer than WEAK_ACCURACY of its val images right.

    Its features then hardly tell images apart, so FID and KID in them are small whatever is compared,
    and its prompt accuracy says little about the images; None for a classifier that did better.
    """
    accuracy = model.meta.get("val_accuracy")
    if accuracy is None or accuracy >= WEAK_ACCURACY:
        return None
    return (
        f"note: the classifier {model.run_dir} gets {100 * accuracy:.1f}% of its val images right (every head): "
        "FID, KID and prompt accuracy through it say little; train it longer "
        f"(latentdiff train classifier --resume {model.run_dir} --steps N)"
    )
