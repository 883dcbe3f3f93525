"""FID feature spaces, registered with torch-fidelity as feature extractors.

    space = load_feature_space("classifier:runs/classifier")   # or "clip:runs/text", "inception"

- `classifier:RUN`: the penultimate, pre-ReLU features of `latentdiff train classifier` (for
  domains without Inception weights, e.g. 32x32 Fashion-MNIST). torch-fidelity name
  "latentdiff-classifier"; its `feature_extractor_weights_path` is the run directory.
- `clip:RUN`: the image embedding of a CLIP from `latentdiff train text` (or an
  openclip:MODEL:PRETRAINED spec). torch-fidelity name "latentdiff-clip".
- `inception`: torch-fidelity's own "inception-v3-compat", 2048-d pool features, the standard
  of published FID. Nothing is downloaded: the weights come from --inception-weights or
  torch-fidelity's cache, else a FileNotFoundError names the file and where to put it. The file
  is read as plain tensors (core.safe_load); torch-fidelity never sees it.

Every extractor takes torch-fidelity's input, uint8 (B, 3, H, W). Ours resize to the size their
network was trained at (antialiased bilinear), as torch-fidelity's Inception resizes to 299.
A FeatureSpace carries the content hash of the weights, so cached statistics of one set of
weights are never used with another.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

from latentdiff.core import checkpoint as ckpt
from latentdiff.core.checkpoint import CheckpointError
from latentdiff.core.pixels import from_uint8
from latentdiff.core.safe_load import read_tensor_file

from .classifier import Classifier, load_classifier, weak_classifier_note
from .images import as_uint8_rgb

CLASSIFIER_EXTRACTOR = "latentdiff-classifier"
CLIP_EXTRACTOR = "latentdiff-clip"
INCEPTION_EXTRACTOR = "inception-v3-compat"
INCEPTION_FILE = URL_INCEPTION_V3.rsplit("/", 1)[-1]  # weights-inception-2015-12-05-6726825d.pth


def uint8_to_input(x: torch.Tensor, size: tuple[int, int], device: torch.device) -> torch.Tensor:
    """uint8 (B, 1|3, H, W) -> float (B, 3, *size) in [-1, 1] on `device`, resized when H, W differ."""
    x = from_uint8(as_uint8_rgb(x, "feature extractor input").to(device))
    if tuple(x.shape[-2:]) != tuple(size):
        # antialias: a 256px sample shrunk for a 32px network must not alias.
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True).clamp(-1, 1)
    return x


class OneFeatureExtractor(FeatureExtractorBase):
    """What torch-fidelity asks of an extractor of ours: one named feature, used for every metric."""

    FEATURE = ""  # the name of the one feature forward() returns

    @classmethod
    def get_provided_features_list(cls):
        return (cls.FEATURE,)

    @classmethod
    def get_default_feature_layer_for_metric(cls, metric):
        return cls.FEATURE

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 32, 32, dtype=torch.uint8)


class ClassifierFeatures(OneFeatureExtractor):
    """torch-fidelity view of our classifier: one feature, "features" (B, feature_dim), pre-ReLU."""

    FEATURE = "features"

    def __init__(
        self,
        name: str,
        features_list,
        feature_extractor_weights_path=None,
        classifier: Classifier | None = None,
        **kwargs,
    ):
        super().__init__(name, features_list)
        if classifier is None:
            if feature_extractor_weights_path is None:
                raise ValueError(
                    f"{name}: pass feature_extractor_weights_path=RUN, a `latentdiff train classifier` run"
                )
            classifier = load_classifier(feature_extractor_weights_path)
        self.classifier = classifier.eval().requires_grad_(False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        size = (self.classifier.resolution, self.classifier.resolution)
        device = self.classifier.embed.weight.device
        return (self.classifier.features(uint8_to_input(x, size, device)).float(),)


class ClipFeatures(OneFeatureExtractor):
    """torch-fidelity view of a CLIP image tower: "image_embedding" (B, E), projected, not normalised."""

    FEATURE = "image_embedding"

    def __init__(self, name: str, features_list, feature_extractor_weights_path=None, encoder=None, **kwargs):
        super().__init__(name, features_list)
        if encoder is None:
            if feature_extractor_weights_path is None:
                raise ValueError(f"{name}: pass feature_extractor_weights_path=RUN, a `latentdiff train text` run")
            from latentdiff.text.sources import load_text_encoder

            encoder = load_text_encoder(str(feature_extractor_weights_path))
        self.encoder = encoder.frozen()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # The encoder resizes to its tower's size and normalises (text.model.preprocess_images).
        x = uint8_to_input(x, tuple(x.shape[-2:]), self.encoder.device)
        return (self.encoder.encode_image(x).float(),)


def register_extractors() -> None:
    """Make ours available to torch_fidelity.calculate_metrics(feature_extractor=...); idempotent."""
    for name, cls in ((CLASSIFIER_EXTRACTOR, ClassifierFeatures), (CLIP_EXTRACTOR, ClipFeatures)):
        if name not in FEATURE_EXTRACTORS_REGISTRY:
            register_feature_extractor(name, cls)


register_extractors()


@dataclass
class FeatureSpace:
    """One FID feature space: the extractor, which of its features to use, and what names it."""

    extractor: FeatureExtractorBase
    layer: str  # the feature name inside torch-fidelity's output tuple
    label: str  # printed beside every FID: "classifier:runs/clf"
    weights_hash: str  # content hash of the extractor's weights; part of every statistics cache key

    @property
    def device(self) -> torch.device:
        return next(self.extractor.parameters()).device

    @property
    def key(self) -> str:
        return f"{self.extractor.get_name()}-{self.layer}-{self.weights_hash}"


def inception_weights_file(path: str | Path | None = None) -> Path:
    """The Inception-v3 weights file to use: `path`, else torch-fidelity's cache file; never a download."""
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"--inception-weights {path} does not exist; pass the path of {INCEPTION_FILE}")
        return path
    cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    if cached.is_file():
        return cached
    raise FileNotFoundError(
        f"FID with `inception` needs torch-fidelity's Inception-v3 weights {INCEPTION_FILE}, which are not here and "
        f"are not downloaded at run time. Pass --inception-weights FILE, or copy the file to {cached} "
        f"(torch-fidelity's cache; TORCH_HOME moves it). It is published at {URL_INCEPTION_V3}. "
        f"Without it, use --features classifier:RUN (train one with `latentdiff train classifier`)."
    )


def _inception(weights: str | Path | None) -> FeatureSpace:
    """torch-fidelity's Inception-v3 built from the tensors of `weights` (or its cache file), read safely.

    Raises FileNotFoundError for a missing file and CheckpointError (one line) for a file that holds
    code or another network's tensors.
    """
    path = inception_weights_file(weights)
    weights_hash = ckpt.file_hash(path)
    state = read_tensor_file(path, f"torch-fidelity's Inception-v3 weights ({INCEPTION_FILE})")
    # torch-fidelity's constructor reads its weights with torch.load(weights_only=False). It is handed
    # a buffer of the tensors just read instead of the path: the file is read once, by us, so no file
    # (nor one swapped in after our read) reaches its unpickler.
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    try:
        extractor = FeatureExtractorInceptionV3(INCEPTION_EXTRACTOR, ["2048"], feature_extractor_weights_path=buffer)
    except RuntimeError as e:  # load_state_dict: missing, unexpected or misshapen tensors, over several lines
        detail = "; ".join(ln.strip() for ln in str(e).splitlines()[1:3])
        raise CheckpointError(
            f"{path} is not torch-fidelity's Inception-v3 weights ({detail[:240]}); use {INCEPTION_FILE} "
            f"from {URL_INCEPTION_V3}"
        ) from None
    return FeatureSpace(extractor, "2048", "inception", weights_hash)


def load_feature_space(
    spec: str, *, inception_weights: str | Path | None = None, device: torch.device | str = "cpu"
) -> FeatureSpace:
    """ "classifier:RUN", "clip:RUN" or "inception" -> a FeatureSpace on `device`, frozen."""
    kind, _, arg = spec.partition(":")
    if kind == "classifier" and arg:
        classifier = load_classifier(arg, device)
        if note := weak_classifier_note(classifier):
            print(note)
        extractor = ClassifierFeatures(CLASSIFIER_EXTRACTOR, ["features"], classifier=classifier)
        # The input size is part of the key: the same weights see resized images differently.
        space = FeatureSpace(extractor, "features", spec, f"{classifier.weights_hash}-r{classifier.resolution}")
    elif kind == "clip" and arg:
        from latentdiff.text.sources import load_text_encoder

        encoder = load_text_encoder(arg).to(device)
        extractor = ClipFeatures(CLIP_EXTRACTOR, ["image_embedding"], encoder=encoder)
        space = FeatureSpace(extractor, "image_embedding", spec, ckpt.tensors_hash(encoder.model.visual.state_dict()))
    elif kind == "inception" and not arg:
        space = _inception(inception_weights)
    else:
        raise ValueError(
            f"--features {spec!r}: use classifier:RUN (a `latentdiff train classifier` run), "
            "clip:RUN (a `latentdiff train text` run) or inception"
        )
    space.extractor.to(device).eval().requires_grad_(False)
    return space
