"""Prompt faithfulness: does a generated image show what its prompt asked for?

- prompt accuracy: the fraction of generated images the classifier assigns to the prompted class
  (Fashion-MNIST), or, for shapes, whose shapes the classifier reads with every prompted attribute
  right (shape, colour, size, position of the first and, in a two-shape prompt, the second; "none"
  for the second of a one-shape prompt); per-head accuracies are reported too.
- CLIP score (Hessel et al. 2021): 100 * max(cos(E_image, E_text), 0), averaged, in the space
  of a CLIP given on the command line, with its 95% interval. A CLIP score means little alone
  (a tiny CLIP on 32x32 images scores far below a web-scale one on photos), so it comes with its
  real-image reference (`real_clip_reference`): the CLIP score of the real test images with
  their own captions, computed the same way, at the same size, and cached like the real FID
  statistics.

Which prompts an evaluation uses (`evaluation_prompts`): with a single class head and a dataset
that lists classes, each class's canonical prompt ("a photo of a sneaker") n // classes times
(the remainder of n is dropped); otherwise the first n test captions, each once, with the
targets read from their json.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from latentdiff.core.checkpoint import atomic_write, tensors_hash
from latentdiff.core.pixels import from_uint8
from latentdiff.data.captions import class_prompt

from .classifier import Classifier, Heads, correct, targets_from_meta
from .images import ImageSet, as_uint8_rgb, pixel_hash
from .noise import mean_interval


@dataclass(frozen=True)
class PromptSet:
    """Prompts to generate from, one image each, and what the classifier should see in each image."""

    prompts: list[str]  # (N,) prompt per image, grouped by distinct prompt
    targets: dict[str, torch.Tensor]  # head -> (N,) class index
    mode: str  # "classes" or "captions": how they were chosen

    def distinct(self) -> list[tuple[str, int]]:
        """[(prompt, count)] in order: the pipeline generates `count` images of each prompt."""
        out: list[tuple[str, int]] = []
        for p in self.prompts:
            if out and out[-1][0] == p:
                out[-1] = (p, out[-1][1] + 1)
            else:
                out.append((p, 1))
        return out


def evaluation_prompts(
    heads: Heads, info: dict[str, Any], test: ImageSet | None, n: int, mode: str = "auto"
) -> PromptSet:
    """Class prompts (n // classes each) or the first n test captions; see the module docstring."""
    classes = info.get("classes")
    if mode == "auto":
        mode = "classes" if list(heads) == ["class"] and classes else "captions"
    if mode == "classes":
        if list(heads) != ["class"] or not classes:
            raise ValueError(
                "class prompts need a single-head classifier and a dataset whose info.json lists classes; "
                "use --prompts captions"
            )
        if list(classes) != heads["class"]:
            raise ValueError(f"the classifier's classes {heads['class']} differ from the dataset's {classes}")
        per = n // len(classes)
        if per < 1:
            raise ValueError(f"--n {n} is fewer than the {len(classes)} classes; give at least {len(classes)}")
        prompts = [class_prompt(c) for c in classes for _ in range(per)]
        labels = torch.arange(len(classes)).repeat_interleave(per)
        return PromptSet(prompts, {"class": labels}, mode)
    if mode != "captions":
        raise ValueError(f"prompt mode {mode!r}: choose auto, classes or captions")
    if test is None or len(test) < n:
        have = 0 if test is None else len(test)
        raise ValueError(f"--n {n} captions asked for but the test split has {have}; lower --n")
    return PromptSet(list(test.captions[:n]), targets_from_meta(heads, test.metas[:n]), mode)


@torch.no_grad()
def prompt_hits(
    classifier: Classifier, images: torch.Tensor, labels: dict[str, torch.Tensor] | torch.Tensor, batch_size: int = 250
) -> dict[str, torch.Tensor]:
    """Per-head (N,) bool hits and "all" for images (N, C, H, W) (uint8, or float in [-1, 1])."""
    if isinstance(labels, torch.Tensor):
        if list(classifier.heads) != ["class"]:
            raise ValueError(f"the classifier has heads {list(classifier.heads)}; pass labels as a dict per head")
        labels = {"class": labels}
    if any(len(v) != images.shape[0] for v in labels.values()):
        raise ValueError(f"{images.shape[0]} images but labels of lengths {[len(v) for v in labels.values()]}")
    device = next(classifier.parameters()).device
    size = (classifier.resolution, classifier.resolution)
    hits: dict[str, list[torch.Tensor]] = {}
    for i in range(0, images.shape[0], batch_size):
        x = from_uint8(as_uint8_rgb(images[i : i + batch_size]).to(device))
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True).clamp(-1, 1)
        chunk = {k: v[i : i + batch_size] for k, v in labels.items()}
        for k, v in correct(classifier.predict(x), chunk).items():
            hits.setdefault(k, []).append(v)
    return {k: torch.cat(v) for k, v in hits.items()}


def prompt_accuracy(
    classifier: Classifier, images: torch.Tensor, labels: dict[str, torch.Tensor] | torch.Tensor
) -> float:
    """Fraction of images whose every head the classifier reads as the prompt's label(s)."""
    return prompt_hits(classifier, images, labels)["all"].float().mean().item()


@torch.no_grad()
def clip_scores(encoder, images: torch.Tensor, prompts: list[str], batch_size: int = 250) -> torch.Tensor:
    """(N,) 100 * max(cos(image, text), 0) (Hessel et al. 2021, without their 2.5 weight) per image (N, C, H, W)."""
    if len(prompts) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")
    scores = []
    for i in range(0, len(prompts), batch_size):
        x = from_uint8(as_uint8_rgb(images[i : i + batch_size]).to(encoder.device))
        e_image = encoder.encode_image(x, normalize=True).float()  # (B, E)
        e_text = encoder.encode(prompts[i : i + batch_size]).normalized_pooled().float()  # (B, E)
        scores.append(100 * (e_image * e_text).sum(-1).clamp_min(0))
    return torch.cat(scores).cpu()


def clip_score(encoder, images: torch.Tensor, prompts: list[str], batch_size: int = 250) -> float:
    """The mean of clip_scores: the CLIP score of a set."""
    return clip_scores(encoder, images, prompts, batch_size).mean().item()


def clip_summary(scores: torch.Tensor) -> dict[str, Any]:
    """{"score": mean, "interval": its 95% interval (noise.mean_interval), "n"} of per-image CLIP scores."""
    mean, span = mean_interval(scores.double().numpy())
    return {"score": mean, "interval": span, "n": int(scores.numel())}


def real_clip_reference(
    encoder, real: ImageSet, cache_dir: str | Path | None, batch_size: int = 250
) -> tuple[dict[str, Any], bool]:
    """(clip_summary of the real images with their own captions, whether it came from the cache).

    Cached as cache_dir/clip-KEY.json, KEY a hash of the pixels, the captions and the CLIP's
    weights: new data, new captions or another CLIP miss the cache.
    """
    if len(real.captions) != len(real):
        raise ValueError(f"{real.source}: a real CLIP score needs a caption per image, and the images have none")
    path = None
    if cache_dir is not None:
        captions = hashlib.sha256(json.dumps(real.captions).encode()).hexdigest()[:16]
        weights = tensors_hash(encoder.model.state_dict())
        key = hashlib.sha256(f"{pixel_hash(real.images)}|{captions}|{weights}".encode()).hexdigest()[:24]
        path = Path(cache_dir) / f"clip-{key}.json"
        if path.is_file():
            return json.loads(path.read_text()), True
    summary = clip_summary(clip_scores(encoder, real.images, real.captions, batch_size))
    if path is not None:
        atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(summary)))
    return summary, False
