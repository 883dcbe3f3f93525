"""Batches cross to the device as uint8 (a quarter of float32's bytes), pinned when the device is an accelerator,
and become the model's [-1, 1] floats there through one helper (core.pixels.from_uint8_to): bit for bit the floats
the stages saw when the reader converted on the host, for every image mode the reader handles."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from latentdiff.core.pixels import from_uint8_to
from latentdiff.data import reader
from latentdiff.data.images import load_rgb
from latentdiff.data.reader import make_loader, read_once
from tests.image_files import encoded

SIZE = 6  # pixels a side; every sample of one mode has this size, so a batch needs no resize


def _modes(rng: np.random.Generator) -> dict[str, tuple[str, bytes]]:
    """One encoded image per Pillow mode the reader converts (data/images.py): {name: (extension, bytes)}."""
    rgb = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    gray = rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8)
    alpha = rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8)
    palette = Image.fromarray(rgb).quantize(7)
    keyed = palette.copy()
    keyed.info["transparency"] = 3
    wide = rng.integers(0, 65536, (SIZE, SIZE), dtype=np.uint16)
    floats = rng.random((SIZE, SIZE), dtype=np.float32)
    return {
        "1": ("png", encoded(Image.fromarray(gray > 127), "PNG")),
        "L": ("png", encoded(Image.fromarray(gray), "PNG")),
        "LA": ("png", encoded(Image.merge("LA", [Image.fromarray(gray), Image.fromarray(alpha)]), "PNG")),
        "P": ("png", encoded(palette, "PNG")),
        "P+transparency": ("png", encoded(keyed, "PNG", transparency=3)),
        "RGB": ("png", encoded(Image.fromarray(rgb), "PNG")),
        "RGB jpeg": ("jpg", encoded(Image.fromarray(rgb), "JPEG", quality=90)),
        "RGBA": ("png", encoded(Image.fromarray(np.dstack([rgb, alpha])), "PNG")),
        "CMYK": ("jpg", encoded(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=90)),
        "I;16": ("png", encoded(Image.fromarray(wide), "PNG")),
        "I (16-bit PGM)": ("pgm", f"P5\n{SIZE} {SIZE}\n65535\n".encode() + wide.astype(">u2").tobytes()),
        "F": ("tif", encoded(Image.fromarray(floats), "TIFF")),
    }


def _todays_floats(data: bytes, resolution: int | None) -> torch.Tensor:
    """(3, H, W) float32 in [-1, 1] as the reader made them before batches crossed as uint8: on the host,
    x.float() / 127.5 - 1 of load_rgb's pixels."""
    pixels = torch.from_numpy(np.array(load_rgb(data, resolution), dtype=np.uint8)).permute(2, 0, 1)
    return pixels.float().div_(127.5).sub_(1.0)


@pytest.fixture(scope="module")
def every_mode(tmp_path_factory) -> tuple[Path, dict[str, bytes]]:
    """A dataset whose shard holds 2 samples of each mode in turn: {key: image bytes} beside it."""
    root = tmp_path_factory.mktemp("modes")
    images: dict[str, bytes] = {}
    with wds.TarWriter(str(root / "train-000000.tar"), encoder=False) as tar:
        for seed in range(2):
            for i, (mode, (ext, data)) in enumerate(_modes(np.random.default_rng(seed)).items()):
                with Image.open(io.BytesIO(data)) as opened:  # the file really holds that mode
                    assert opened.mode == mode.split()[0].split("+")[0], mode
                key = f"m{i:02d}_{seed}"
                images[key] = data
                tar.write({"__key__": key, ext: data, "txt": f"a {mode} image".encode()})
    return root, images


@pytest.mark.parametrize("resolution", [None, 4], ids=["native", "resized"])
def test_stages_see_the_same_floats_bit_for_bit_for_every_image_mode(every_mode, resolution):
    root, images = every_mode
    batches = list(read_once(str(root), "train", 5, resolution))
    assert sum(len(b["key"]) for b in batches) == len(images)  # no mode was skipped
    for batch in batches:
        assert batch["image"].dtype == torch.uint8  # what crosses to the device: 1 byte a pixel, not 4
        seen = from_uint8_to(batch["image"], torch.device("cpu"))
        assert seen.dtype == torch.float32 and seen.shape[1] == 3
        for key, got in zip(batch["key"], seen):
            want = _todays_floats(images[key], resolution)
            assert torch.equal(got.view(torch.int32), want.view(torch.int32)), key  # the bits, -0.0 included


def test_from_uint8_to_moves_as_uint8_without_blocking_and_converts_on_the_device(monkeypatch):
    pixels = torch.tensor([[0, 1, 127, 128, 254, 255]], dtype=torch.uint8)
    moves = []
    real_to = torch.Tensor.to

    def spy(self, *args, **kwargs):
        moves.append((self.dtype, kwargs.get("non_blocking", False)))
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", spy)
    out = from_uint8_to(pixels, torch.device("cpu"))
    assert moves[0] == (torch.uint8, True)  # the copy carries bytes, asynchronously from pinned memory
    assert out.dtype == torch.float32
    assert torch.equal(out, pixels.float() / 127.5 - 1)
    assert out[0, 0] == -1 and out[0, -1] == 1
    with pytest.raises(TypeError, match="expects uint8 pixels"):
        from_uint8_to(out, torch.device("cpu"))  # floats already converted are refused, not converted twice


@pytest.mark.parametrize(("device", "pinned"), [("cpu", False), ("cuda:0", True), ("cuda", True)])
def test_loader_pins_host_memory_only_for_an_accelerator(every_mode, monkeypatch, device, pinned):
    """The DataLoader is asked for pinned memory when the batches go to an accelerator, never for the CPU."""
    root, _ = every_mode
    asked = []
    real = reader.DataLoader

    def recording(*args, **kwargs):
        asked.append(kwargs.get("pin_memory", False))
        return real(*args, **{**kwargs, "pin_memory": False})  # this machine may have no accelerator to pin for

    monkeypatch.setattr(reader, "DataLoader", recording)
    loader = make_loader(str(root), "train", 4, repeat=False, device=torch.device(device))
    assert next(iter(loader))["image"].dtype == torch.uint8
    assert asked == [pinned]
    asked.clear()
    next(iter(read_once(str(root), "train", 4, device=torch.device(device))))
    assert asked == [pinned]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory and device copies need CUDA")
def test_cuda_batches_arrive_pinned_and_convert_to_the_cpu_floats(every_mode):
    root, images = every_mode
    cuda = torch.device("cuda", torch.cuda.current_device())
    batch = next(iter(read_once(str(root), "train", 8, device=cuda)))
    assert batch["image"].is_pinned() and batch["image"].dtype == torch.uint8
    on_gpu = from_uint8_to(batch["image"], cuda)
    assert on_gpu.device == cuda
    want = torch.stack([_todays_floats(images[k], None) for k in batch["key"]])
    assert torch.equal(on_gpu.cpu().view(torch.int32), want.view(torch.int32))
