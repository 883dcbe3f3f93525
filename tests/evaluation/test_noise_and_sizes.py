"""Issue #28, evaluation figures on a small folder: every figure says when it is within its noise (bootstrap
FID interval and the equal-size excess over real-vs-real, KID's spread, a CLIP score's real-image reference),
offers a larger real split, and two image sets of different sizes are brought to one size out loud or refused."""

# ruff: noqa: F811 (the fixtures shared with test_evaluation.py are imported, then named as arguments)
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from latentdiff.data import folder as folder_source
from latentdiff.evaluation import fid_command, noise
from latentdiff.evaluation.fid import (
    StatisticsCache,
    describe,
    extract_features,
    frechet_distance,
    kernel_distance,
    real_reference,
    score,
    score_images,
    statistics,
)
from latentdiff.evaluation.images import load_image_set, match_size
from latentdiff.evaluation.noise import fig
from tests.evaluation.test_evaluation import _images, _tiny_space, classifier_run, shapes_data  # noqa: F401

SAME = "indistinguishable from real at this sample size"


def _save(images: torch.Tensor, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i:03d}.png")
    return folder


# ---------------------------------------------------------------- FID: intervals and the floor


@pytest.mark.filterwarnings("ignore::latentdiff.evaluation.fid.FewImagesWarning")
@pytest.mark.parametrize(("n1", "n2", "d"), [(30, 40, 64), (300, 200, 12), (12, 500, 16)])
def test_bootstrap_fid_equals_torch_fidelitys_figure_on_the_unresampled_sets(n1, n2, d):
    """Both routes of the replicates' FID (n < D through an n x n matrix, n >= D through D x D) are the same FID."""
    rng = np.random.default_rng(n1)
    x, y = rng.normal(size=(n1, d)), rng.normal(size=(n2, d)) @ rng.normal(size=(d, d)) * 0.3 + 0.2
    expected = frechet_distance(statistics(torch.from_numpy(x)), statistics(torch.from_numpy(y)))
    assert noise.frechet_from_features(x, y) == pytest.approx(expected, rel=1e-7)


def test_fid_of_real_like_images_is_said_to_be_within_real_noise():
    space = _tiny_space()
    real = _images(120, 4)
    ref = real_reference(real, 60, space, StatisticsCache(None))
    like = score(statistics(extract_features(space, _images(60, 11))), ref)  # another draw of the real distribution
    lo, hi = like["fid_interval"]
    assert lo < like["fid"] < hi and like["fid_sd"] > 0 and like["bootstraps"] == noise.FID_BOOTSTRAPS
    flo, fhi = like["fid_floor_interval"]
    assert flo < like["fid_floor"] < fhi
    assert like["fid_excess_interval"][0] <= 0 <= like["fid_excess_interval"][1]
    assert any(SAME in note for note in like["notes"]) and SAME in describe(like)
    assert score(statistics(extract_features(space, _images(60, 11))), ref)["fid_interval"] == [lo, hi]  # seeded

    far = score(statistics(extract_features(space, _images(60, 12, bright=120))), ref)
    assert far["fid_excess_interval"][0] > 0 and not any(SAME in note for note in far["notes"])

    # More generated images than half the real set: the floor comes from fewer images than the FID, so it
    # sits higher; a real-like set then scores below it, and the note says why and compares at equal size.
    many = score(
        statistics(extract_features(space, _images(200, 13))),
        ref_small := real_reference(real[:60], 200, space, StatisticsCache(None)),
    )
    assert ref_small.floor_n == 30 and many["n_excess"] == 30
    assert many["fid"] < many["fid_floor"]
    text = " ".join(many["notes"])
    assert "below the real-vs-real floor" in text and SAME in text and "30 held-out real images" in text


def test_bootstrap_can_be_switched_off():
    space = _tiny_space()
    ref = real_reference(_images(40, 4), 20, space, StatisticsCache(None))
    result = score(statistics(extract_features(space, _images(20, 5))), ref, bootstraps=0)
    assert result["fid_interval"] is None and result["bootstraps"] == 0 and result["fid_excess"] is None
    assert describe(result).startswith(f"FID {fig(result['fid'])} (floor {fig(result['fid_floor'])} from")


# ---------------------------------------------------------------- KID


@pytest.mark.parametrize("shift", [0.0, 0.5])
def test_kid_spread_is_the_figures_noise_even_when_both_sets_are_the_same_size(shift):
    """With subsets as large as the sets every subset is the whole set and the spread is 0. Half-size subsets give
    the delete-d jackknife's standard error: about how KID really varies between independent draws when the sets
    differ, about twice it when they are alike (MMD^2 is then a degenerate U-statistic), never 0."""
    rng = np.random.default_rng(0)
    draws, spreads = [], []
    for _ in range(30):
        a = statistics(torch.from_numpy(rng.normal(size=(60, 8))))
        b = statistics(torch.from_numpy(rng.normal(size=(60, 8)) + shift))
        kid, std, size = kernel_distance(a, b)
        assert size == 30
        draws.append(kid)
        spreads.append(std)
    ratio = float(np.mean(spreads)) / float(np.std(draws))
    assert (0.8 < ratio < 1.4) if shift else (1.4 < ratio < 2.5)


def test_negative_or_small_kid_is_explained():
    negative = noise.kid_note(-0.0003, 0.0004)
    assert negative is not None and "below 0" in negative and SAME in negative and "x1e3 -0.30" in negative
    assert SAME in noise.kid_note(0.0005, 0.0004)  # above 0, but within 2 std of it
    assert noise.kid_note(0.01, 0.001) is None


# ---------------------------------------------------------------- small real sets: offer the split sizes


def test_a_small_real_reference_offers_a_larger_test_split(classifier_run, tmp_path: Path, capsys):
    run, _ = classifier_run
    src = tmp_path / "photos"
    src.mkdir()
    for i, image in enumerate(_images(200, 20)):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(src / f"p{i:03d}.png")
        (src / f"p{i:03d}.txt").write_text(f"photo {i}")
    data = tmp_path / "ds"
    info = folder_source.convert(src, data, 16)
    n_test = info["splits"]["test"]
    assert n_test < 20  # the default 5% test split
    args = ["--real", str(data), "--features", f"classifier:{run}", "--no-cache", "--bootstrap", "0"]
    result = fid_command.main([*args, "--fake", str(_save(_images(30, 21), tmp_path / "fake"))])
    advice = [note for note in result["notes"] if "latentdiff data folder" in note]
    assert len(advice) == 1, result["notes"]
    assert f"only {n_test} real" in advice[0] and f"{src} --out {data} --resolution 16" in advice[0]
    # 60 = twice the generated count (the floor then has the generated set's size) = 30% of the 200 images
    assert "--test-fraction 0.3 --overwrite (about 60 images" in advice[0]
    assert "latentdiff data folder" in capsys.readouterr().out
    # Asking for more than half the folder: the advice is to compare fewer generated images instead.
    result = fid_command.main([*args, "--fake", str(_save(_images(80, 22), tmp_path / "many"))])
    assert any(f"compare fewer generated images (--n-fake {n_test // 2})" in note for note in result["notes"])


# ---------------------------------------------------------------- sizes


def test_fid_says_which_size_both_sets_were_compared_at(classifier_run, shapes_data: Path, tmp_path: Path, capsys):
    run, _ = classifier_run
    val = load_image_set(shapes_data, split="val", limit=20).images  # (20, 3, 16, 16)
    big = _save(val.repeat_interleave(4, -1).repeat_interleave(4, -2), tmp_path / "big")  # 64x64
    args = ["--real", str(shapes_data), "--fake", str(big), "--features", f"classifier:{run}", "--no-cache"]
    result = fid_command.main(args)
    out = capsys.readouterr().out
    assert result["compared_size"] == [16, 16] and result["fake_size"] == [64, 64]
    assert "64x64" in result["resized"] and "16x16" in result["resized"] and "antialiased bilinear" in result["resized"]
    assert result["resized"] in out
    # The figure is that of the generated images resized so (the filter the message names), not of anything else.
    upscaled = val.float().repeat_interleave(4, -1).repeat_interleave(4, -2)
    shrunk = F.interpolate(upscaled, size=(16, 16), mode="bilinear", antialias=True, align_corners=False)
    shrunk = shrunk.round().clamp(0, 255).to(torch.uint8)
    space = fid_command.load_feature_space(f"classifier:{run}")
    ref = real_reference(load_image_set(shapes_data, split="test").images, 20, space, StatisticsCache(None))
    assert result["fid"] == pytest.approx(score(statistics(extract_features(space, shrunk)), ref)["fid"], rel=1e-9)

    same = fid_command.main([*args[:3], str(_save(val, tmp_path / "same")), *args[4:]])
    assert same["resized"] is None and same["compared_size"] == [16, 16]

    wide = _save(torch.zeros(4, 3, 16, 32, dtype=torch.uint8), tmp_path / "wide")
    with pytest.raises(SystemExit) as e:
        fid_command.main([*args[:3], str(wide), *args[4:]])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "generated 32x16" in err and "--resolution" in err and "Traceback" not in err


def test_match_size_resizes_to_the_reference_or_refuses():
    x = _images(3, 1, size=32)
    same, note = match_size(x, (32, 32))
    assert same is x and note is None
    small, note = match_size(x, (8, 8), "generated")
    assert small.shape == (3, 3, 8, 8) and small.dtype == torch.uint8 and "generated 32x32 resized to 8x8" in note
    with pytest.raises(ValueError, match="aspect"):
        match_size(torch.zeros(1, 3, 8, 16, dtype=torch.uint8), (8, 8))


def test_score_images_is_the_one_path_and_records_the_size():
    space = _tiny_space()
    ref = real_reference(_images(40, 4), 20, space, StatisticsCache(None))
    result = score_images(space, _images(20, 5, size=32), ref)
    assert result["compared_size"] == [16, 16] and "32x32 resized to 16x16" in result["resized"]
    assert result["resized"] in result["notes"]


# ---------------------------------------------------------------- evaluate: CLIP score reference, sizes, report


def test_evaluate_gives_the_clip_score_its_real_reference_and_says_the_size(
    classifier_run,
    shapes_data: Path,
    tmp_path: Path,
    monkeypatch,
    capsys,
):
    from types import SimpleNamespace

    from latentdiff.evaluation import evaluate
    from latentdiff.evaluation.prompts import clip_score
    from latentdiff.prior import pipeline
    from latentdiff.text.model import build_clip, load_model_config
    from latentdiff.text.sources import load_text_encoder
    from tests.helpers import write_text_run

    run, _ = classifier_run
    text = write_text_run(tmp_path / "text", build_clip(load_model_config("clip-tiny")))
    test = load_image_set(shapes_data, split="test")

    class StandIn:  # real test images at twice their size stand in for samples
        def settings(self, prompts, **kw):
            return SimpleNamespace(steps=7, sampler="ddim", precision="fp32", sampler_options={},
                                   guidance_rescale=0.0, guidance_interval=None, binding=0.0,
                                   binding_until=0.5)  # fmt: skip

        def __call__(self, prompts, *, guidance, **kw):
            x = test.images[: len(prompts)].float().div(127.5).sub(1)
            return F.interpolate(x, scale_factor=2, mode="nearest")

    monkeypatch.setattr(pipeline.TextToImage, "from_run", staticmethod(lambda *a, **k: StandIn()))
    args = ["--run", str(tmp_path / "prior"), "--data", str(shapes_data), "--n", "20", "--features",
            f"classifier:{run}", "--clip", str(text), "--guidance", "1", "--out", str(tmp_path / "eval"),
            "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    report = evaluate.main(args)
    out = capsys.readouterr().out
    encoder = load_text_encoder(str(text))
    real = report["clip_real"]
    # The real reference: every real test image with its own caption, scored the same way as the samples.
    assert real["n"] == len(test) and real["score"] == pytest.approx(clip_score(encoder, test.images, test.captions))
    lo, hi = real["interval"]
    assert lo < real["score"] < hi
    (row,) = report["results"]
    assert row["clip_score_interval"][0] < row["clip_score"] < row["clip_score_interval"][1]
    assert f"real images with their captions {real['score']:.2f}" in out
    # Sizes: the 32x32 samples were compared with the 16x16 real images at 16x16, and it is said.
    assert row["compared_size"] == [16, 16] and "32x32 resized to 16x16" in row["resized"] and row["resized"] in out
    md = (tmp_path / "eval" / "report.md").read_text()
    assert "real images with their own captions" in md and "[" in md and row["resized"] in md
    assert row["fid_interval"] is not None and all(note in md for note in row["notes"])
    # The real CLIP score is cached like the real FID statistics.
    again = evaluate.main(args)
    assert again["clip_real"] == real and again["cached_real_clip"] is True and report["cached_real_clip"] is False


def test_the_tradeoff_plot_draws_the_intervals(tmp_path: Path):
    from latentdiff.evaluation.plot import tradeoff_plot

    rows = [
        {
            "guidance": w,
            "fid": f,
            "fid_floor": 8.0,
            "n_floor": 100,
            "n_fake": 100,
            "n_reference": 100,
            "features": "classifier:x",
            "prompt_accuracy": a,
        }  # fmt: skip
        for w, f, a in ((1, 30, 0.6), (3, 20, 0.9))
    ]
    noisy = [{**r, "fid_interval": [r["fid"] - 6, r["fid"] + 6], "fid_floor_interval": [5.0, 11.0]} for r in rows]
    plain, with_bars = tradeoff_plot(rows, tmp_path / "a.png"), tradeoff_plot(noisy, tmp_path / "b.png")
    with Image.open(plain) as a, Image.open(with_bars) as b:
        assert a.size == b.size and not np.array_equal(np.asarray(a), np.asarray(b))


def test_the_equal_size_excess_holds_0_for_real_vs_real_and_not_for_a_clear_difference():
    """Calibration on Gaussian features (16 dimensions, 200 generated and held-out vs 400 reference): the interval
    holds 0 in every real-vs-real draw, and in none where the generated mean is shifted by 0.3 per dimension."""
    rng = np.random.default_rng(0)
    for shift, expected in ((0.0, True), (0.3, False)):
        for trial in range(5):
            fake, holdout, reference = (rng.normal(size=(n, 16)) for n in (200, 200, 400))
            b = noise.fid_bootstrap(fake + shift, holdout, reference, seed=trial)
            lo, hi = noise.interval(b["excess"], b["excess_sd"])
            assert (lo <= 0) == expected, (shift, trial, lo, hi)
    assert noise.interval(0.1, 1.0, lowest=0.0)[0] == 0.0  # FID's interval never goes below 0


def test_a_large_wide_reference_is_held_fixed_and_the_notes_say_so(monkeypatch):
    """The fixed-reference route (Z = X Sigma_r^(1/2)) gives the same FID, and the result says what it left out."""
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(40, 24)), rng.normal(size=(300, 24)) * 1.2 + 0.1
    seen = noise._Seen(x, noise._Reference(y))
    assert seen.fid(np.arange(40)) == pytest.approx(noise.frechet_from_features(x, y), rel=1e-7)
    monkeypatch.setattr(noise, "RESAMPLE_REFERENCE_FLOPS", 0)
    monkeypatch.setattr(noise, "BOOTSTRAP_FLOPS", 0)
    b = noise.fid_bootstrap(x, rng.normal(size=(40, 24)), y, replicates=50)
    assert b["resampled_reference"] is False and b["replicates"] == noise.MIN_BOOTSTRAPS and b["fid_sd"] > 0
    space = _tiny_space()
    ref = real_reference(_images(40, 4), 20, space, StatisticsCache(None))
    result = score(statistics(extract_features(space, _images(20, 5))), ref)
    assert result["bootstraps"] == noise.MIN_BOOTSTRAPS and result["bootstrap_reference"] is False
    assert any("held fixed in the bootstrap" in note for note in result["notes"])
