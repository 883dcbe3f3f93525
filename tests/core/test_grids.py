"""Grids and PNGs a person looks at: enlarged without smoothing, labelled rows, exact pixels."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from latentdiff.core.logger import MetricLogger, save_grid, save_png
from latentdiff.core.pixels import to_uint8
from tests.helpers import tensorboard_images  # noqa: E402


def test_grid_enlarges_small_images_by_nearest_neighbour(tmp_path):
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    path = save_grid(x, tmp_path / "g.png", nrow=2, min_cell=96)
    grid = np.asarray(Image.open(path).convert("RGB"))
    assert grid.shape == (2 + 2 * (96 + 2), 2 + 2 * (96 + 2), 3)  # 3x cells, 2-px white padding
    first = grid[2:98, 2:98]  # the first cell, 96x96
    want = to_uint8(x[0]).permute(1, 2, 0).numpy().repeat(3, axis=0).repeat(3, axis=1)
    assert np.abs(first.astype(int) - want).max() <= 1  # blocks of one source pixel, no blending


def test_grid_labels_and_title_widen_it(tmp_path):
    x = torch.zeros(4, 3, 32, 32)
    plain = Image.open(save_grid(x, tmp_path / "a.png", nrow=2))
    labelled = Image.open(
        save_grid(x, tmp_path / "b.png", nrow=2, labels=["a sneaker", "an ankle boot"], title="guidance 3, seed 0")
    )
    assert labelled.width > plain.width and labelled.height > plain.height
    left = np.asarray(labelled.convert("L"))[:, : labelled.width - plain.width]
    assert (left < 128).any()  # text was drawn beside the rows
    with pytest.raises(ValueError, match="3 labels for 2 rows"):
        save_grid(x, tmp_path / "c.png", nrow=2, labels=["a", "b", "c"])


@pytest.mark.parametrize("channels", [1, 3])
def test_save_png_keeps_resolution_and_pixels(tmp_path, channels):
    x = torch.rand(channels, 20, 28) * 2 - 1
    with Image.open(save_png(x, tmp_path / "x.png")) as png:
        got = np.asarray(png)
    want = to_uint8(x).permute(1, 2, 0).numpy()
    assert got.shape[:2] == (20, 28)
    assert np.array_equal(got.reshape(want.shape), want)


def test_metric_logger_shows_grids_in_tensorboard(tmp_path):
    images = torch.linspace(-1, 1, 4 * 3 * 8 * 8).reshape(4, 3, 8, 8)
    png = save_grid(images, tmp_path / "grid.png", 4, labels=["a prompt"], title="guidance 3")
    logger = MetricLogger(tmp_path)
    logger.image("samples", 5, png)
    logger.image("raw", 7, images)
    logger.close()
    shown = tensorboard_images(tmp_path)
    ((step, width, height, encoded),) = shown["samples"]
    with Image.open(png) as saved:
        assert (step, width, height) == (5, saved.width, saved.height)  # the labelled, enlarged grid as saved
        expected = np.asarray(saved.convert("RGB"))
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(encoded)).convert("RGB")), expected)
    assert [s for s, *_ in shown["raw"]] == [7]


def test_grid_labels_and_title_with_line_breaks_are_drawn_on_one_line(tmp_path):
    """A prompt may hold line breaks (an A1111 PNG's often does); the grid shows them as " / "."""
    x = torch.zeros(2, 3, 32, 32)
    two = Image.open(save_grid(x, tmp_path / "a.png", nrow=1, labels=["a cat\non a mat", "a dog"], title="a\nb"))
    one = Image.open(save_grid(x, tmp_path / "b.png", nrow=1, labels=["a cat / on a mat", "a dog"], title="a / b"))
    assert np.array_equal(np.asarray(two), np.asarray(one))
