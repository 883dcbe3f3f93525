"""Hard negatives in the text stage: the loss term by hand, the probe, training on scenes, the refusal."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from latentdiff.text.evaluate import hard_negative_accuracy
from latentdiff.text.loss import hard_negative_loss
from tests.helpers import cli_exit_2, train_text_on_scenes


def _unit(*shape: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, dtype=torch.float64), dim=-1)


def test_hard_negative_loss_is_each_images_cross_entropy_over_its_caption_and_its_negatives():
    torch.manual_seed(0)
    images, captions, negatives = _unit(3, 8), _unit(3, 8), _unit(3, 8)
    scale = torch.tensor(7.0, dtype=torch.float64, requires_grad=True)
    counts = [2, 0, 1]  # image 0 has negatives 0 and 1, image 1 none, image 2 negative 2
    loss = hard_negative_loss(images, captions, negatives, counts, scale)
    by_hand = []
    for i, own in ((0, [0, 1]), (2, [2])):
        logits = scale * torch.stack([images[i] @ captions[i], *(images[i] @ negatives[k] for k in own)])
        by_hand.append(-torch.log_softmax(logits, 0)[0])
    torch.testing.assert_close(loss, torch.stack(by_hand).mean())
    loss.backward()
    assert torch.isfinite(scale.grad)  # the padding is masked after scaling: no -inf * 0 in the scale's gradient
    # Features that cannot tell a caption from its negatives: log(1 + K) for every image.
    same = _unit(1, 8).expand(2, 8)
    flat = hard_negative_loss(same, same, same.repeat(2, 1)[:3], [2, 1], torch.tensor(5.0, dtype=torch.float64))
    assert flat.item() == pytest.approx((math.log(3) + math.log(2)) / 2)
    # No image with negatives: 0, still part of the graph.
    images.requires_grad_(True)
    zero = hard_negative_loss(images, captions, negatives[:0], [0, 0, 0], scale)
    assert zero.item() == 0 and zero.requires_grad
    with pytest.raises(ValueError, match="do not match"):
        hard_negative_loss(images, captions, negatives, [1, 1], scale)


class _ByWord:
    """A stand-in encoder that reads one colour: an image by its brightest channel (red or green), a caption by
    its second word (a bag of words could do no better on swapped colours)."""

    device = torch.device("cpu")

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return F.normalize((images[:, :2, 0, 0] > 0).float(), dim=-1)  # (B, 2): [1, 0] red, [0, 1] the other

    def encode(self, texts: list[str]):
        pooled = torch.tensor([[1.0, 0.0] if t.split()[1] == "red" else [0.0, 1.0] for t in texts])
        return type("Out", (), {"normalized_pooled": lambda self: pooled})()


def test_hard_negative_accuracy_counts_an_image_only_when_its_caption_beats_every_negative():
    image = torch.zeros(3, 3, 2, 2, dtype=torch.uint8)
    image[0, 0] = image[1, 0] = 255  # red
    image[2, 1] = 255  # not red: "blue" in this encoder's reading
    batch = {
        "image": image,
        "caption": ["a red star and a blue ring", "a red star", "a blue ring and a red star"],
        "meta": [
            {"task": "color_attr", "negatives": ["a blue star and a red ring"]},  # told apart: a hit
            {"task": "colors", "negatives": ["a blue star", "a red ring"]},  # ties with "a red ring": a miss
            {"task": "color_attr", "negatives": ["a red ring and a blue star"]},  # a hit
        ],
    }
    out = hard_negative_accuracy(_ByWord(), [batch, {**batch, "meta": [{}, None, {"negatives": []}]}])
    assert out["hard_negative_images"] == 3  # the second batch lists none: not counted
    assert out["hard_negative_accuracy"] == pytest.approx(2 / 3)
    assert out["hard_negative_accuracy_color_attr"] == 1.0 and out["hard_negative_accuracy_colors"] == 0.0
    assert hard_negative_accuracy(_ByWord(), [{**batch, "meta": [{}, {}, {}]}]) == {}


def test_text_stage_trains_with_hard_negatives_on_scenes_and_refuses_data_without_them(tmp_path, data, capsys):
    from latentdiff.data import scenes

    summary, logged, flags = train_text_on_scenes(tmp_path, "hard_negatives=true", holdout=("blue star",))
    steps = [m for m in logged if "hard_negative_loss" in m]
    assert len(steps) == 3
    for m in steps:  # the logged loss is the batch's contrast plus the hard-negative term
        assert m["loss"] == pytest.approx(m["clip_loss"] + m["hard_negative_loss"], rel=1e-5)
        assert m["hard_negative_loss"] > 0
    assert summary["val_hard_negative_images"] == 12
    assert {k for k in summary if k.startswith("val_hard_negative_accuracy_")} == {
        f"val_hard_negative_accuracy_{t}" for t in scenes.TASKS
    }
    # Shapes samples list no negatives: one line, before anything is written.
    refused = tmp_path / "refused"
    err = cli_exit_2(
        capsys, ["train", "text", "--data", str(data), "--out", str(refused), *flags, "--set", "hard_negatives=true"]
    )
    assert err.count("\n") == 1 and 'no "negatives"' in err and "latentdiff data scenes" in err, err
    assert not refused.exists()  # refused before the run's folder was made
