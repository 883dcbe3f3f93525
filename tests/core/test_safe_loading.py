"""Every file a code path loads that latentdiff did not write is read without running code (issue #28).

For each such file (torchvision's VGG16 weights and lpips' linear heads for LPIPS, torch-fidelity's
Inception for FID, an open_clip checkpoint, a VAE to import, a run's training state, the FID
statistics cache) a test plants a pickle whose unpickling would write a marker file, and checks
that it is refused with one line and that the marker never appears. The libraries' own loaders
are replaced by the unsafe behaviour versions inside pyproject's ranges have (torch < 2.6 defaults
to weights_only=False, which older open_clip releases and lpips rely on), so the tests hold whatever
versions are installed.
"""

from __future__ import annotations

import builtins
import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from latentdiff.core import checkpoint as ckpt
from latentdiff.core import safe_load
from latentdiff.core.checkpoint import CheckpointError


class RunsCode:
    """Unpickling this writes `marker`: what a malicious checkpoint does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return builtins.exec, (f"open({str(self.marker)!r}, 'w').write('code ran')",)


def plant(path: Path, marker: Path, legacy: bool = False) -> Path:
    """A torch checkpoint with a tensor and a code-running object, at `path` (zip, or legacy pickle format)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {"features.0.weight": torch.zeros(1), "payload": RunsCode(marker)},
        path,
        _use_new_zipfile_serialization=not legacy,
    )
    return path


def refused(excinfo, marker: Path, *phrases: str) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, message
    assert not marker.exists(), "the planted pickle ran code"
    for phrase in phrases:
        assert phrase in message, message
    return message


@pytest.fixture
def marker(tmp_path) -> Path:
    return tmp_path / "CODE_RAN"


@pytest.fixture
def unsafe_libraries(monkeypatch):
    """Every library loader as a version in pyproject's ranges has it: unpickling anything it is given."""
    from open_clip import factory
    from torch_fidelity import feature_extractor_inceptionv3 as tf_inception

    # torch hub's loader (torchvision, lpips) and torch-fidelity pass weights_only=False themselves;
    # lpips' heads and older open_clip releases call torch.load without it, unsafe by default before torch 2.6.
    load_state_dict = factory.load_state_dict
    monkeypatch.setattr(
        factory, "load_state_dict", lambda path, device="cpu", weights_only=True: load_state_dict(path, device, False)
    )
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    return tf_inception


# ---------------------------------------------------------------- the shared reader


def test_reader_refuses_code_in_every_pickle_form_and_reads_plain_tensors(tmp_path, marker):
    for legacy in (False, True):
        path = plant(tmp_path / f"w{legacy}.pt", marker, legacy)
        with pytest.raises(CheckpointError) as e:
            safe_load.read_tensor_file(path, "test weights")
        refused(e, marker, "needs code to load", "weights_only=True")
    raw = tmp_path / "raw.pkl"
    import pickle

    raw.write_bytes(pickle.dumps({"w": RunsCode(marker)}))  # plain pickle, protocol 4
    with pytest.raises(CheckpointError) as e:
        safe_load.read_tensor_file(raw, "test weights")
    refused(e, marker, "needs code to load")
    scripted = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), scripted)
    with pytest.raises(CheckpointError) as e:
        safe_load.read_tensor_file(scripted, "test weights")
    refused(e, marker, "TorchScript archive")
    html = tmp_path / "download.pth"
    html.write_text("<html>429 Too Many Requests</html>")
    with pytest.raises(CheckpointError) as e:
        safe_load.read_tensor_file(html, "test weights")
    refused(e, marker, "neither a safetensors file nor a torch checkpoint", "test weights")

    good = {"a": torch.arange(3.0), "b": torch.ones(2, 2)}
    torch.save({"state_dict": good, "epoch": 3}, tmp_path / "good.pt")
    out = safe_load.read_tensor_file(tmp_path / "good.pt")
    assert out.keys() == good.keys() and all(torch.equal(out[k], good[k]) for k in good)


def test_a_torch_whose_weights_only_reader_is_escapable_reads_no_pickle(tmp_path, marker, monkeypatch):
    from safetensors.torch import save_file

    plant(tmp_path / "w.pt", marker)
    torch.save({"a": torch.zeros(2)}, tmp_path / "plain.pt")
    save_file({"a": torch.zeros(2)}, str(tmp_path / "w.safetensors"))
    monkeypatch.setattr(torch, "__version__", "2.5.1+cpu")
    for name in ("w.pt", "plain.pt"):
        with pytest.raises(CheckpointError) as e:
            safe_load.read_tensor_file(tmp_path / name, "test weights")
        refused(e, marker, "torch 2.5.1+cpu", "CVE-2025-32434", "2.6 or later")
    assert torch.equal(safe_load.read_tensor_file(tmp_path / "w.safetensors")["a"], torch.zeros(2))


def test_published_hash_prefix_is_checked(tmp_path):
    path = tmp_path / "vgg16-397923af.pth"
    path.write_bytes(b"not the published file")
    assert safe_load.published_hash_prefix(path) == "397923af"
    with pytest.raises(CheckpointError, match=r"sha256 begins [0-9a-f]{8}, the published file's 397923af"):
        safe_load.check_published_hash(path, "VGG16", "https://example")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    named = tmp_path / f"vgg16-{digest[:8]}.pth"
    shutil.copy(path, named)
    assert safe_load.check_published_hash(named, "VGG16", "https://example") == digest


# ---------------------------------------------------------------- LPIPS: VGG16 and its linear heads


def _vgg16_state() -> dict[str, torch.Tensor]:
    """Random VGG16 weights as torchvision names them; the 102M classifier weights stored as stride-0 views."""
    from torchvision.models import vgg16

    torch.manual_seed(0)
    with torch.device("meta"):
        names = {k: v.shape for k, v in vgg16().state_dict().items()}
    return {
        k: (torch.randn(shape) * 0.05 if k.startswith("features.") else torch.zeros(1).expand(shape))
        for k, shape in names.items()
    }


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory) -> Path:
    """A VGG16 file named as torch hub names a published one: vgg16-<its sha256 prefix>.pth."""
    folder = tmp_path_factory.mktemp("vgg")
    tmp = folder / "vgg16.pth"
    torch.save(_vgg16_state(), tmp)
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    return tmp.rename(folder / f"vgg16-{digest[:8]}.pth")


def test_vgg16_file_in_the_hub_cache_is_hash_checked_and_never_unpickled(
    tmp_path, marker, monkeypatch, unsafe_libraries
):
    from latentdiff.decoder import perceptual

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    path = plant(perceptual.vgg16_weights_path(), marker)  # where docs/autoencoder.md tells offline users to copy it
    assert path.name == "vgg16-397923af.pth"
    with pytest.raises(ValueError) as e:
        perceptual.load_lpips()
    refused(e, marker, str(path), "397923af", "download.pytorch.org")

    # A file whose name carries its own hash passes that check, and is still read only as tensors.
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    renamed = path.rename(path.with_name(f"vgg16-{digest[:8]}.pth"))
    monkeypatch.setattr(perceptual, "vgg16_weights_path", lambda: renamed)
    with pytest.raises(ValueError) as e:
        perceptual.load_lpips()
    refused(e, marker, "needs code to load", str(renamed))


def test_lpips_heads_shipped_in_the_package_are_read_only_as_tensors(
    vgg_file, tmp_path, marker, monkeypatch, unsafe_libraries
):
    from latentdiff.decoder import perceptual

    monkeypatch.setattr(perceptual, "vgg16_weights_path", lambda: vgg_file)
    heads = plant(tmp_path / "lpips" / "weights" / "v0.1" / "vgg.pth", marker)
    monkeypatch.setattr(perceptual, "lpips_heads_path", lambda: heads)
    with pytest.raises(ValueError) as e:
        perceptual.load_lpips()
    refused(e, marker, "needs code to load", str(heads))


def test_lpips_built_from_tensors_equals_the_library_loading_the_same_file(vgg_file, tmp_path, monkeypatch):
    """The reference is lpips + torchvision reading the file themselves from the torch hub cache."""
    import lpips

    from latentdiff.decoder import perceptual

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    expected_place = perceptual.vgg16_weights_path()
    expected_place.parent.mkdir(parents=True)
    shutil.copy(vgg_file, expected_place)  # torchvision checks no hash of a file already in its cache
    reference = lpips.LPIPS(net="vgg", verbose=False).eval()
    monkeypatch.setattr(perceptual, "vgg16_weights_path", lambda: vgg_file)
    ours = perceptual.load_lpips()
    assert not ours.training and not any(p.requires_grad for p in ours.parameters())
    theirs = reference.state_dict()
    assert ours.state_dict().keys() == theirs.keys()
    assert all(torch.equal(v, theirs[k]) for k, v in ours.state_dict().items())
    g = torch.Generator().manual_seed(0)
    x, y = (torch.rand(2, 3, 32, 32, generator=g) * 2 - 1 for _ in range(2))
    with torch.no_grad():
        assert torch.equal(perceptual.lpips_distance(ours, x, y), reference(x, y).flatten(1).mean(1))


def test_a_vgg16_file_of_another_network_is_refused_in_one_line(tmp_path, monkeypatch):
    from latentdiff.decoder import perceptual

    torch.save({"features.0.weight": torch.zeros(3, 3, 3, 3)}, tmp_path / "x.pth")
    digest = hashlib.sha256((tmp_path / "x.pth").read_bytes()).hexdigest()
    path = (tmp_path / "x.pth").rename(tmp_path / f"vgg16-{digest[:8]}.pth")
    monkeypatch.setattr(perceptual, "vgg16_weights_path", lambda: path)
    with pytest.raises(CheckpointError) as e:
        perceptual.load_lpips()
    assert "\n" not in str(e.value) and "VGG16" in str(e.value) and "features.0.weight" in str(e.value)


# ---------------------------------------------------------------- FID: torch-fidelity's Inception-v3


def _inception_state(tf_inception) -> dict[str, torch.Tensor]:
    with pytest.MonkeyPatch.context() as m:  # build the network once without weights
        m.setattr(tf_inception, "load_state_dict_from_url", lambda *a, **k: {})
        m.setattr(tf_inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
        torch.manual_seed(0)
        return tf_inception.FeatureExtractorInceptionV3("x", ["2048"]).state_dict()


def test_inception_file_is_read_once_and_only_as_tensors(tmp_path, marker, monkeypatch, unsafe_libraries):
    from latentdiff.evaluation.features import INCEPTION_FILE, load_feature_space

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    cached = plant(tmp_path / "hub" / "checkpoints" / INCEPTION_FILE, marker)
    for args in ({}, {"inception_weights": cached}):
        with pytest.raises(ValueError) as e:
            load_feature_space("inception", **args)
        refused(e, marker, str(cached), "needs code to load")

    # A plain file swapped for a planted one after it was checked (a second process, a shared cache):
    # the file must be read once, so the swap cannot reach an unpickler.
    state = _inception_state(unsafe_libraries)
    torch.save(state, cached)
    real_load = torch.load

    def load_then_swap(f, *args, **kwargs):
        out = real_load(f, *args, **kwargs)
        if isinstance(f, (str, os.PathLike)) and Path(f) == cached:
            plant(cached, marker)
        return out

    monkeypatch.setattr(torch, "load", load_then_swap)
    space = load_feature_space("inception")
    assert not marker.exists(), "the file swapped in after the check was unpickled"
    weights = space.extractor.state_dict()
    assert all(torch.equal(weights[k], state[k].to(weights[k].dtype)) for k in state)


def test_inception_from_tensors_gives_torch_fidelitys_features(tmp_path, monkeypatch):
    from torch_fidelity import feature_extractor_inceptionv3 as tf_inception

    from latentdiff.evaluation.features import load_feature_space

    path = tmp_path / "inception.pth"
    torch.save(_inception_state(tf_inception), path)
    reference = tf_inception.FeatureExtractorInceptionV3("ref", ["2048"], feature_extractor_weights_path=str(path))
    space = load_feature_space("inception", inception_weights=path)
    assert space.weights_hash == ckpt.file_hash(path)
    x = torch.randint(0, 256, (2, 3, 40, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(space.extractor(x)[0], reference(x)[0])
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError) as e:
        load_feature_space("inception", inception_weights=tmp_path / "other.pth")
    assert "\n" not in str(e.value) and "Inception" in str(e.value) and "other.pth" in str(e.value)


# ---------------------------------------------------------------- open_clip checkpoints


def test_open_clip_files_are_read_only_as_tensors_whatever_open_clip_does(tmp_path, marker, unsafe_libraries):
    from latentdiff.text.sources import load_pretrained

    for name in ("model.pt", "open_clip_pytorch_model.bin"):
        path = plant(tmp_path / name, marker)
        with pytest.raises(CheckpointError) as e:
            load_pretrained("clip-tiny", str(path))
        refused(e, marker, str(path), "needs code to load")


def test_a_cached_open_clip_tag_is_read_only_as_tensors(tmp_path, marker, monkeypatch, unsafe_libraries):
    import open_clip

    from latentdiff.text.sources import load_pretrained

    tag_cfg = dict(open_clip.get_pretrained_cfg("ViT-B-32", "laion2b_s34b_b79k"), hf_hub="someone/planted/")
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, "clip-tiny", {"planted": tag_cfg})
    repo = tmp_path / "hub" / "models--someone--planted"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    path = plant(repo / "snapshots" / "abc123" / "open_clip_pytorch_model.bin", marker)
    with pytest.raises(CheckpointError) as e:
        load_pretrained("clip-tiny", "planted", cache_dir=str(tmp_path / "hub"))
    refused(e, marker, "needs code to load", str(path))


def test_open_clip_training_checkpoints_load_from_tensors(tmp_path, unsafe_libraries):
    """open_clip's own training checkpoint (state_dict under "state_dict", "module." from DDP) loads exactly."""
    from latentdiff.text.model import build_clip, load_model_config
    from latentdiff.text.sources import load_pretrained

    torch.manual_seed(0)
    model = build_clip(load_model_config("clip-tiny"))
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save({"epoch": 2, "name": "run", "state_dict": state}, tmp_path / "epoch_2.pt")
    loaded = load_pretrained("clip-tiny", str(tmp_path / "epoch_2.pt"))
    theirs = loaded.model.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in model.state_dict().items())
    torch.save({"visual.proj": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError) as e:
        load_pretrained("clip-tiny", str(tmp_path / "other.pt"))
    assert "\n" not in str(e.value) and "clip-tiny" in str(e.value) and "missing" in str(e.value)


# ---------------------------------------------------------------- files latentdiff wrote, read back


def test_a_planted_training_state_is_refused_in_one_line(tmp_path, marker):
    path = plant(tmp_path / ckpt.STATE, marker)
    with pytest.raises(CheckpointError) as e:
        ckpt.load_state(path)
    refused(e, marker, str(path))


def test_a_planted_fid_statistics_cache_is_never_unpickled(tmp_path, marker):
    """The cache reads .npz with np.load(allow_pickle=False): an object array in it is refused, not run."""
    from types import SimpleNamespace

    from latentdiff.evaluation.fid import StatisticsCache

    cache = StatisticsCache(tmp_path / "cache")
    images = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    space = SimpleNamespace(key="planted")
    path = cache.path(images, space)
    path.parent.mkdir(parents=True)
    with open(path, "wb") as f:
        np.savez(f, mu=np.array([RunsCode(marker)], dtype=object), sigma=np.zeros(1), features=np.zeros(1))
    with pytest.raises(ValueError) as e:
        cache.statistics(images, space)
    refused(e, marker, "allow_pickle")


# ---------------------------------------------------------------- a VAE to import


def test_vae_files_to_import_are_read_only_as_tensors(data, tmp_path, marker, unsafe_libraries):
    from latentdiff.autoencoder.interchange import import_autoencoder

    config = {"_class_name": "AutoencoderKL", "block_out_channels": [32], "layers_per_block": 1, "latent_channels": 4}
    config |= {"down_block_types": ["DownEncoderBlock2D"], "up_block_types": ["UpDecoderBlock2D"]}
    for name in ("diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin"):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(__import__("json").dumps(config))
        plant(folder / name, marker)
        with pytest.raises(CheckpointError) as e:
            import_autoencoder(folder, tmp_path / "run", data, batch_size=1, batches=1)
        refused(e, marker, "needs code to load", name)
    for name in ("sd.ckpt", "vae.pt"):
        with pytest.raises(CheckpointError) as e:
            import_autoencoder(plant(tmp_path / name, marker), tmp_path / "run", data, scaling_factor=1.0)
        refused(e, marker, "needs code to load")
    assert not (tmp_path / "run").exists()
