"""evaluation/: FID against a float64 scipy reference, torch-fidelity registration, the statistics cache,
Inception weights handling, image conversion, the classifier stage, prompt accuracy, SSIM, the plot."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import torch_fidelity
from PIL import Image
from safetensors.torch import load_file

from latentdiff.core import checkpoint as ckpt
from latentdiff.core.image_metrics import ssim
from latentdiff.data import shapes
from latentdiff.evaluation import classifier_stage, fid_command
from latentdiff.evaluation.classifier import (
    Classifier,
    ClassifierModelConfig,
    heads_from_info,
    load_classifier,
    targets_from_meta,
)
from latentdiff.evaluation.evaluate import markdown_table
from latentdiff.evaluation.features import (
    CLASSIFIER_EXTRACTOR,
    INCEPTION_FILE,
    ClassifierFeatures,
    FeatureSpace,
    load_feature_space,
)
from latentdiff.evaluation.fid import (
    FewImagesWarning,
    StatisticsCache,
    describe,
    extract_features,
    format_kid,
    frechet_distance,
    real_reference,
    split_real,
    statistics,
)
from latentdiff.evaluation.images import UInt8Images, as_uint8_rgb, load_image_set
from latentdiff.evaluation.plot import TITLE_CHARACTERS, title_text, tradeoff_plot
from latentdiff.evaluation.plot import main as plot_main
from latentdiff.evaluation.prompts import evaluation_prompts, prompt_accuracy

TINY = [
    "--set",
    "model.channels=[8, 16]",
    "--set",
    "model.convs_per_level=[1, 1]",
    "--set",
    "model.feature_dim=16",
    "--set",
    "eval_images=40",
    "--set",
    "train.log_every=1",
    "--set",
    "train.warmup_steps=0",
]


def _reference_fid(f1: np.ndarray, f2: np.ndarray) -> float:
    """FID written out in float64 with scipy's matrix square root: the reference our path must match."""
    f1, f2 = f1.astype(np.float64), f2.astype(np.float64)
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def _tiny_space(seed: int = 0, resolution: int = 16) -> FeatureSpace:
    torch.manual_seed(seed)
    model = Classifier(
        ClassifierModelConfig(channels=(8, 16), convs_per_level=(1, 1), feature_dim=12),
        {"class": list("abc")},
        resolution,
    ).eval()
    return FeatureSpace(
        ClassifierFeatures(CLASSIFIER_EXTRACTOR, ["features"], classifier=model),
        "features",
        f"tiny{seed}",
        ckpt.tensors_hash(model.state_dict()),
    )


def _images(n: int, seed: int, size: int = 16, bright: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256 - bright, (n, 3, size, size), generator=g, dtype=torch.uint8) + bright


@pytest.fixture(scope="module")
def shapes_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    shapes.build(out, n=96, val_n=40, test_n=60, seed=1, resolution=16)
    return out


@pytest.fixture(scope="module")
def classifier_run(shapes_data: Path, tmp_path_factory) -> tuple[Path, dict]:
    run = tmp_path_factory.mktemp("runs") / "clf"
    summary = classifier_stage.main(
        [
            "--data",
            str(shapes_data),
            "--out",
            str(run),
            "--steps",
            "4",
            "--batch-size",
            "16",
            "--set",
            "resolution=16",
            *TINY,
        ]
    )
    return run, summary


# ---------------------------------------------------------------- FID math


def test_fid_matches_float64_scipy_and_is_zero_on_itself():
    space = _tiny_space()
    a = extract_features(space, _images(300, 0))  # (300, 12) float64 through torch-fidelity's loop
    b = extract_features(space, _images(200, 1, bright=60))
    assert a.dtype == torch.float64 and a.shape == (300, 12)
    ours = frechet_distance(statistics(a), statistics(b))
    ref = _reference_fid(a.numpy(), b.numpy())
    assert ref > 1e-3
    assert abs(ours - ref) <= 1e-6 * abs(ref)
    assert abs(frechet_distance(statistics(a), statistics(a))) < 1e-8 * np.trace(statistics(a).sigma)
    # Not only on classifier features: raw gaussian features with a rank-deficient-ish covariance too.
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(500, 8)), rng.normal(size=(400, 8)) @ rng.normal(size=(8, 8)) + 0.5
    ours = frechet_distance(statistics(torch.from_numpy(x)), statistics(torch.from_numpy(y)))
    assert abs(ours - _reference_fid(x, y)) <= 1e-6 * _reference_fid(x, y)


def test_registered_extractor_computes_fid_through_torch_fidelity(classifier_run):
    run, _ = classifier_run
    a, b = _images(40, 2), _images(40, 3, bright=100)
    metrics = torch_fidelity.calculate_metrics(
        input1=UInt8Images(a),
        input2=UInt8Images(b),
        fid=True,
        feature_extractor=CLASSIFIER_EXTRACTOR,
        feature_extractor_weights_path=str(run),
        cuda=False,
        cache=False,
        verbose=False,
        save_cpu_ram=True,
    )
    theirs = metrics["frechet_inception_distance"]
    space = load_feature_space(f"classifier:{run}")
    ours = frechet_distance(statistics(extract_features(space, a)), statistics(extract_features(space, b)))
    assert theirs > 0
    # torch-fidelity fits the means in float32; ours in float64.
    assert ours == pytest.approx(theirs, rel=1e-3)


def test_floor_is_measured_on_a_disjoint_holdout(tmp_path: Path):
    space = _tiny_space()
    real = _images(100, 4)
    ref = real_reference(real, 30, space, StatisticsCache(tmp_path))
    assert ref.floor_n == 30 and ref.reference.n == 70
    held = ref.holdout.tolist()
    assert len(held) == 30 and held != list(range(30))  # a seeded permutation, not file order
    kept = sorted(set(range(100)) - set(held))
    expected = frechet_distance(
        statistics(extract_features(space, real[held])), statistics(extract_features(space, real[kept]))
    )
    assert ref.floor_fid == pytest.approx(expected, rel=1e-9)
    assert torch.equal(real_reference(real, 30, space, StatisticsCache(None)).holdout, ref.holdout)  # seeded
    assert real_reference(real, 80, space, StatisticsCache(None)).floor_n == 50  # at most half the real set


def test_fid_from_fewer_images_than_feature_dimensions_warns():
    rng = np.random.default_rng(0)
    few = statistics(torch.from_numpy(rng.normal(size=(10, 12))))  # 10 images, 12 dimensions
    many = statistics(torch.from_numpy(rng.normal(size=(40, 12))))
    with pytest.warns(FewImagesWarning, match="FID from 10 images in a 12-dimensional feature space") as record:
        frechet_distance(few, many)
    assert "use at least 12 images" in str(record[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FewImagesWarning)
        frechet_distance(many, statistics(torch.from_numpy(rng.normal(size=(12, 12)))))  # N = D: no warning


def test_kid_is_printed_with_its_scale():
    assert format_kid(0.0030149, 0.00012) == "KID x1e3 3.01 +- 0.12"
    result = {
        "fid": 26.73,
        "fid_floor": 0.39,
        "n_floor": 2000,
        "n_reference": 8000,
        "features": "classifier:r",
        "n_fake": 2000,
        "kid": 0.0030149,
        "kid_std": 0.00012,
    }
    assert describe(result).endswith("; KID x1e3 3.01 +- 0.12")
    table = markdown_table({"results": [{"guidance": 1.0, **result}], "sampler": "ddim", "steps": 2, "data": "d"})
    assert "| guidance | FID | KID x1e3 |" in table and "| 1 | 26.73 | 3.01 +- 0.12 |" in table


# ---------------------------------------------------------------- cache


def test_changed_extractor_weights_invalidate_cached_statistics(classifier_run, tmp_path: Path):
    run, _ = classifier_run
    images = _images(30, 5)
    cache = StatisticsCache(tmp_path / "cache")
    space = load_feature_space(f"classifier:{run}")
    first = cache.statistics(images, space)
    again = cache.statistics(images, load_feature_space(f"classifier:{run}"))
    assert (cache.misses, cache.hits) == (1, 1)
    np.testing.assert_array_equal(first.mu, again.mu)

    retrained = tmp_path / "retrained"
    shutil.copytree(run, retrained)
    weights = load_file(ckpt.committed_file(retrained, ckpt.MODEL))
    weights["embed.bias"] = weights["embed.bias"] + 1.0
    ckpt.amend(retrained, {ckpt.MODEL: weights})
    other = cache.statistics(images, load_feature_space(f"classifier:{retrained}"))
    assert (cache.misses, cache.hits) == (2, 1)
    np.testing.assert_allclose(other.mu, first.mu + 1.0, rtol=0, atol=1e-5)
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 2

    cache.statistics(images[:-1], space)  # other pixels: a miss too
    assert cache.misses == 3


# ---------------------------------------------------------------- Inception weights


def test_missing_inception_weights_name_the_expected_file(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    expected = tmp_path / "hub" / "checkpoints" / INCEPTION_FILE
    with pytest.raises(FileNotFoundError) as e:
        load_feature_space("inception")
    assert str(expected) in str(e.value) and "--inception-weights" in str(e.value)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_feature_space("inception", inception_weights=tmp_path / "nope.pth")
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "a.png")
    with pytest.raises(SystemExit) as exit_:
        fid_command.main(["--real", str(folder), "--fake", str(folder), "--features", "inception"])
    assert exit_.value.code == 2
    assert INCEPTION_FILE in capsys.readouterr().err


def test_unknown_feature_spec_is_refused():
    with pytest.raises(ValueError, match="classifier:RUN"):
        load_feature_space("resnet")


# ---------------------------------------------------------------- image conversion


def test_images_are_converted_or_refused_clearly(tmp_path: Path):
    gray = torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8)
    rgb = as_uint8_rgb(gray)
    assert rgb.shape == (2, 3, 8, 8) and torch.equal(rgb[:, 0], rgb[:, 2]) and torch.equal(rgb[:, 1], gray[:, 0])
    floats = torch.tensor([-1.0, 0.0, 1.0]).view(1, 1, 1, 3).expand(1, 3, 1, 3)
    assert as_uint8_rgb(floats)[0, 0, 0].tolist() == [0, 128, 255]
    with pytest.raises(ValueError, match="channels"):
        as_uint8_rgb(torch.zeros(2, 4, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8"):
        as_uint8_rgb(torch.zeros(2, 3, 8, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        as_uint8_rgb(torch.zeros(3, 8, 8, dtype=torch.uint8))

    # An extractor given another size resizes to its own; the result equals resizing first.
    space = _tiny_space(resolution=16)
    big = _images(4, 6, size=32)
    small = torch.nn.functional.interpolate(
        big.float().div(127.5).sub(1), size=(16, 16), mode="bilinear", antialias=True
    ).clamp(-1, 1)
    with torch.no_grad():
        direct = space.extractor.classifier.features(small)
    torch.testing.assert_close(extract_features(space, big).float(), direct, rtol=1e-4, atol=1e-5)

    folder = tmp_path / "mixed"
    folder.mkdir()
    Image.new("L", (8, 8), 200).save(folder / "a.png")  # grayscale file -> RGB
    Image.new("RGBA", (12, 12), (255, 0, 0, 255)).save(folder / "b.png")
    with pytest.raises(ValueError, match="--resolution"):
        load_image_set(folder)
    images = load_image_set(folder, resolution=8).images
    assert images.shape == (2, 3, 8, 8) and images[0].eq(200).all() and images[1, 0].eq(255).all()


# ---------------------------------------------------------------- classifier stage


def test_classifier_trains_saves_and_reloads(classifier_run, shapes_data: Path):
    run, summary = classifier_run
    assert {"val_accuracy", "test_accuracy", "val_accuracy_color"} <= set(summary)
    assert (run / "summary.json").is_file() and ckpt.committed_file(run, ckpt.MODEL).is_file()
    info_heads = heads_from_info({"attributes": shapes.vocabularies()})
    model = load_classifier(run)
    assert model.heads == info_heads and model.meta["val_accuracy"] == summary["val_accuracy"]
    # Rebuilt from the run alone: the same val accuracy as the run reported, and the same outputs twice.
    acc = classifier_stage.evaluate_accuracy(model, str(shapes_data), "val", model.heads, 16, 40)
    assert acc["val_accuracy"] == pytest.approx(summary["val_accuracy"])
    x = load_image_set(shapes_data, split="val", limit=8).images.float().div(127.5).sub(1)
    out1, out2 = model(x), load_classifier(run)(x)
    assert set(out1) == set(info_heads)
    for k in out1:
        assert out1[k].shape == (8, len(info_heads[k]))
        torch.testing.assert_close(out1[k], out2[k], rtol=0, atol=0)
    assert model.features(x).shape == (8, 16)


def test_classifier_resume_continues_exactly(shapes_data: Path, tmp_path: Path):
    # Constant lr: a cosine schedule depends on train.steps, which differs between the two runs.
    args = [
        "--data",
        str(shapes_data),
        "--batch-size",
        "8",
        "--set",
        "resolution=16",
        *TINY,
        "--set",
        'train.lr_decay="constant"',
    ]
    classifier_stage.main([*args, "--out", str(tmp_path / "straight"), "--steps", "4"])
    classifier_stage.main([*args, "--out", str(tmp_path / "split"), "--steps", "2"])
    classifier_stage.main(["--resume", str(tmp_path / "split"), "--steps", "4"])
    a, b = (load_file(ckpt.committed_file(tmp_path / name, ckpt.MODEL)) for name in ("straight", "split"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_targets_and_prompts():
    heads = heads_from_info({"classes": ["a", "b", "c"]})
    assert heads == {"class": ["a", "b", "c"]}
    assert targets_from_meta(heads, [{"label": 2}, {"label": 0}])["class"].tolist() == [2, 0]
    with pytest.raises(ValueError, match="nothing to classify"):
        heads_from_info({})
    attrs = heads_from_info({"classes": ["circle"], "attributes": shapes.vocabularies()})
    meta = {
        "shapes": [
            {"shape": "square", "color": "blue", "size": "large", "position": "left"},
            {"shape": "circle", "color": "red", "size": "small", "position": "right"},
        ]
    }
    t = targets_from_meta(attrs, [meta])  # the first shape's attributes
    assert [t[k].item() for k in ("shape", "color", "size", "position")] == [
        shapes.SHAPES.index("square"),
        list(shapes.COLORS).index("blue"),
        1,
        0,
    ]
    p = evaluation_prompts({"class": ["t-shirt", "bag"]}, {"classes": ["t-shirt", "bag"]}, None, 5)
    assert p.mode == "classes" and p.prompts == ["a photo of a t-shirt"] * 2 + ["a photo of a bag"] * 2
    assert p.targets["class"].tolist() == [0, 0, 1, 1]


def test_prompt_accuracy_counts_hits():
    torch.manual_seed(0)
    model = Classifier(
        ClassifierModelConfig(channels=(8,), convs_per_level=(1,), feature_dim=8), {"class": list("abcd")}, 8
    ).eval()
    images = _images(64, 7, size=8)
    predicted = model.predict(images.float().div(127.5).sub(1))["class"]
    assert prompt_accuracy(model, images, predicted) == 1.0
    assert prompt_accuracy(model, images, (predicted + 1) % 4) == 0.0
    half = predicted.clone()
    half[:16] = (half[:16] + 1) % 4
    assert prompt_accuracy(model, images, half) == pytest.approx(0.75)


# ---------------------------------------------------------------- commands, SSIM, plot


def test_fid_command_on_shards_and_folder_with_cache(classifier_run, shapes_data: Path, tmp_path: Path):
    run, _ = classifier_run
    fake = tmp_path / "fake"
    fake.mkdir()
    for i, image in enumerate(load_image_set(shapes_data, split="val", limit=20).images):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(fake / f"{i:03d}.png")
    args = [
        "--real",
        str(shapes_data),
        "--fake",
        str(fake),
        "--features",
        f"classifier:{run}",
        "--cache-dir",
        str(tmp_path / "cache"),
    ]
    first = fid_command.main(args)
    assert first["n_fake"] == 20 and first["n_floor"] == 20 and first["n_reference"] == 40
    assert first["fid"] > 0 and first["features"] == f"classifier:{run}"
    second = fid_command.main(args)
    assert second["cached_real_statistics"] == 2 and second["fid"] == pytest.approx(first["fid"], rel=1e-12)


def test_ssim():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 24, 24, generator=g) * 2 - 1
    assert torch.allclose(ssim(x, x), torch.ones(3))
    noisy = [ssim(x, (x + s * torch.randn(x.shape, generator=g)).clamp(-1, 1)).mean().item() for s in (0.05, 0.2, 0.8)]
    assert 1 > noisy[0] > noisy[1] > noisy[2]
    y = (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    torch.testing.assert_close(ssim(x, y), ssim(y, x))


def test_tradeoff_plot(tmp_path: Path):
    rows = [
        {
            "guidance": w,
            "fid": f,
            "fid_floor": 8.0,
            "n_floor": 1000,
            "n_fake": 1000,
            "n_reference": 9000,
            "features": "classifier:x",
            "prompt_accuracy": a,
        }
        for w, f, a in ((1, 93, 0.61), (3, 48, 0.9), (5, 67, 0.95))
    ]
    path = tradeoff_plot(rows, tmp_path / "plot.png", "demo")
    with Image.open(path) as image:
        assert image.size[0] > 300 and image.size[1] > 200
    with pytest.raises(ValueError, match="nothing to plot"):
        tradeoff_plot([{"guidance": 1, "fid": 1.0}], tmp_path / "x.png")
    # several sweeps on one plot, from report files through the command line
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"results": rows}))
    shifted = tmp_path / "shifted.json"
    shifted.write_text(json.dumps({"results": [{**r, "fid": r["fid"] - 5} for r in rows]}))
    two = plot_main([f"every step={report}", f"interval={shifted}", "--out", str(tmp_path / "two.png")])
    with Image.open(two) as image, Image.open(path) as one:
        assert image.size == one.size and not np.array_equal(np.asarray(image), np.asarray(one))
    with pytest.raises(SystemExit):
        plot_main([str(report), "--out", str(tmp_path / "bad.png")])  # no LABEL=
    # A long title wraps between words (never inside "DPM-Solver++(2M)") instead of running off the figure.
    title = "make demo's prior, 2026-11-30 (v, zero terminal SNR): DPM-Solver++(2M), 20 steps"
    lines = title_text(title, "classifier:x").split("\n")
    assert lines[-1] == "features: classifier:x" and " ".join(lines[:-1]) == title
    assert len(lines) == 3 and all(len(line) <= TITLE_CHARACTERS for line in lines)
    assert any(line.startswith("DPM-Solver++(2M)") for line in lines)
    assert title_text("demo", "classifier:x", panels=2) == "demo\nfeatures: classifier:x"


def test_inception_from_a_weights_file_or_the_cache(tmp_path: Path, monkeypatch):
    """Random-init weights stand in for the real file (no download): the path, the cache lookup, the safe load."""
    from torch_fidelity import feature_extractor_inceptionv3 as tf_inception

    # Build the network once without any weights to get a state dict of the right shapes.
    with monkeypatch.context() as m:
        m.setattr(tf_inception, "load_state_dict_from_url", lambda *a, **k: {})
        m.setattr(tf_inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
        state = tf_inception.FeatureExtractorInceptionV3("x", ["2048"]).state_dict()
    hub = tmp_path / "hub"
    (hub / "checkpoints").mkdir(parents=True)
    torch.save(state, hub / "checkpoints" / INCEPTION_FILE)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    space = load_feature_space("inception")  # found in the cache
    assert space.weights_hash == ckpt.file_hash(hub / "checkpoints" / INCEPTION_FILE)
    assert extract_features(space, _images(2, 8, size=16)).shape == (2, 2048)

    unsafe = tmp_path / "unsafe.pth"
    torch.save({"conv": Path("not a tensor")}, unsafe)
    with pytest.raises(ValueError, match="plain tensor state dict"):
        load_feature_space("inception", inception_weights=unsafe)


def test_clip_image_tower_as_feature_space_and_clip_score(tmp_path: Path):
    from latentdiff.evaluation.prompts import clip_score
    from latentdiff.text.model import build_clip, load_model_config
    from tests.helpers import write_text_run

    config = load_model_config("clip-tiny")
    write_text_run(tmp_path / "text", build_clip(config))
    space = load_feature_space(f"clip:{tmp_path / 'text'}")
    a, b = _images(12, 9), _images(12, 10, bright=120)
    fa = extract_features(space, a)
    assert fa.shape == (12, config["embed_dim"]) and space.weights_hash
    assert frechet_distance(statistics(fa), statistics(extract_features(space, b))) > 0
    score = clip_score(space.extractor.encoder, a, ["a red circle"] * 12)
    assert 0 <= score <= 100


def test_evaluate_sweep_with_a_stand_in_pipeline(classifier_run, shapes_data: Path, tmp_path: Path, monkeypatch):
    """The sweep's bookkeeping, with real test images standing in for samples (w=1) and noise added for w=5."""
    from types import SimpleNamespace

    from latentdiff.evaluation import evaluate
    from latentdiff.prior import pipeline

    run, _ = classifier_run
    test = load_image_set(shapes_data, split="test")

    class StandIn:
        def settings(self, prompts, **kw):
            return SimpleNamespace(
                steps=kw["steps"] or 7,
                sampler=kw["sampler"] or "ddim",
                precision="fp32",
                sampler_options={},
                guidance_rescale=0.0,
                guidance_interval=None,
                binding=0.0,
                binding_until=0.5,
            )

        def __call__(self, prompts, *, guidance, **kw):
            assert list(prompts) == test.captions[: len(prompts)]  # captions mode: the first n, in order
            x = test.images[: len(prompts)].float().div(127.5).sub(1)
            noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
            return (x + 0.5 * (guidance > 1) * noise).clamp(-1, 1)

    monkeypatch.setattr(pipeline.TextToImage, "from_run", staticmethod(lambda *a, **k: StandIn()))
    report = evaluate.main(
        [
            "--run",
            str(tmp_path / "prior"),
            "--data",
            str(shapes_data),
            "--n",
            "20",
            "--features",
            f"classifier:{run}",
            "--guidance",
            "1,5",
            "--out",
            str(tmp_path / "eval"),
            "--cache-dir",
            str(tmp_path / "cache"),
        ]
    )
    assert report["prompts"] == "captions" and report["n_generated"] == 20
    w1, w5 = report["results"]
    classifier = load_classifier(run)
    expected = classifier_stage.evaluate_accuracy(classifier, str(shapes_data), "test", classifier.heads, 16, 20)
    assert w1["prompt_accuracy"] == pytest.approx(expected["test_accuracy"])
    assert (w1["n_fake"], w1["n_floor"], w1["n_reference"]) == (20, 20, 40)
    # The reference and the floor's holdout are a seeded permutation of the real set, cut after 20.
    space = load_feature_space(f"classifier:{run}")
    held, kept = split_real(len(test), 20)
    reference = statistics(extract_features(space, test.images[kept]))
    fid = lambda x: frechet_distance(statistics(extract_features(space, x)), reference)  # noqa: E731
    assert w1["fid_floor"] == pytest.approx(fid(test.images[held]), rel=1e-9)
    assert w1["fid"] == pytest.approx(fid(test.images[:20]), rel=1e-9) and w5["fid"] > w1["fid"]
    assert (tmp_path / "eval" / "report.json").is_file() and Path(report["plot"]).is_file()
    assert "| 5 |" in (tmp_path / "eval" / "report.md").read_text()


def test_evaluate_autoencoder_matches_the_stage_psnr(ae_run, data: Path, classifier_run, tmp_path: Path):
    from latentdiff.evaluation import reconstruction

    run, summary = ae_run
    report = reconstruction.main(
        [
            "--run",
            str(run),
            "--data",
            str(data),
            "--split",
            "val",
            "--n",
            "8",
            "--lpips",
            "off",
            "--features",
            f"classifier:{classifier_run[0]}",
            "--out",
            str(tmp_path / "eval"),
            "--no-cache",
        ]
    )
    # The same val images, the same posterior-mode reconstructions as the stage's own evaluation.
    assert report["images"] == summary["val_images"] == 8
    assert report["psnr"] == pytest.approx(summary["val_psnr"], rel=1e-5)
    assert 0 < report["ssim"] < 1 and report["lpips"] is None
    assert report["rfid_n"] == 4 and report["rfid_reference_n"] == 4 and np.isfinite(report["rfid"])
    lo, hi = report["rfid_interval"]  # rFID carries its noise and the size it was compared at, as FID does
    assert lo < report["rfid"] < hi and report["compared_size"] == [32, 32] and report["resized"] is None
    assert (tmp_path / "eval" / "reconstruction.json").is_file()


def test_evaluate_autoencoder_says_what_it_skips(ae_run, data: Path, tmp_path: Path, monkeypatch, capsys):
    from latentdiff.evaluation import reconstruction

    args = ["--run", str(ae_run[0]), "--data", str(data), "--split", "val", "--n", "4", "--out", str(tmp_path / "e")]
    report = reconstruction.main([*args, "--lpips", "off"])
    out = capsys.readouterr().out
    assert report["rfid"] is None and "rFID: not computed" in out and "--features classifier:RUN" in out
    # --lpips on without VGG16's weights: one line naming this command's flag, not a training one.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no-weights"))
    with pytest.raises(SystemExit) as e:
        reconstruction.main([*args, "--lpips", "on"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--lpips off" in err and "loss.perceptual" not in err and "Traceback" not in err
    # --lpips auto without them: evaluated without LPIPS, and the output says so and where the weights go.
    report = reconstruction.main(args)
    out = capsys.readouterr().out
    assert report["lpips"] is None and f"LPIPS: not computed, its VGG16 ImageNet weights are not at {tmp_path}" in out


def test_a_weak_classifier_is_named_and_small_figures_are_not_printed_as_zero(classifier_run, tmp_path: Path, capsys):
    import json
    import shutil

    from latentdiff.evaluation.noise import fig

    # A barely trained classifier's features hardly vary: its FIDs are ~1e-3, which two decimals print as 0.00.
    assert [fig(x) for x in (0.0, 0.0023, 7.1e-5, 0.05, 0.1, 3.904)] == [
        "0.00",
        "0.0023",
        "0.000071",
        "0.050",
        "0.10",
        "3.90",
    ]
    for accuracy, named in ((0.2, True), (0.9, False)):
        run = tmp_path / f"clf{accuracy}"
        shutil.copytree(classifier_run[0], run)
        meta = json.loads((run / ckpt.META).read_text())
        (run / ckpt.META).write_text(json.dumps({**meta, "val_accuracy": accuracy}))
        load_feature_space(f"classifier:{run}")
        out = capsys.readouterr().out
        assert (f"the classifier {run} gets 20.0% of its val images right" in out) is named, out
        assert ("train classifier --resume" in out) is named
