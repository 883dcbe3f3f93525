"""data/: shard writing and reading, the three sources, skipping bad input, determinism and sharding."""

from __future__ import annotations

import gzip
import io
import json
import logging
import struct
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from latentdiff.core.pixels import from_uint8, to_uint8
from latentdiff.data import fashion_mnist, shapes
from latentdiff.data.captions import class_prompt
from latentdiff.data.reader import SkipCounter, make_loader, read_info, resolve_shards
from latentdiff.data.shards import Sample, write_info, write_split
from latentdiff.scripts.data import main as data_main


def _random_samples(n: int, size: int = 8, seed: int = 0, prefix: str = "s") -> list[Sample]:
    rng = np.random.default_rng(seed)
    return [
        Sample(
            key=f"{prefix}_{i:04d}",
            image=Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)),
            caption=f"caption {i} \u00fcber",
            meta={"label": i % 3, "tags": ["x", i]},
        )
        for i in range(n)
    ]


def _keys(batches) -> list[str]:
    return [k for b in batches for k in b["key"]]


def _to_uint8(image: torch.Tensor) -> np.ndarray:
    """A reader batch's (3, H, W) uint8 image -> (H, W, 3), as PIL lays it out."""
    assert image.dtype == torch.uint8
    return image.permute(1, 2, 0).numpy()


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    """24 training samples in 3 shards of 8."""
    out = tmp_path / "ds"
    assert write_split(out, "train", _random_samples(24), maxcount=8) == 24
    write_info(out, source="test", resolution=8, splits={"train": 24})
    return out


# ---------------------------------------------------------------- shards


def test_shard_round_trip(tmp_path: Path):
    samples = _random_samples(20)
    out = tmp_path / "ds"
    assert write_split(out, "train", samples, maxcount=6) == 20
    assert len(resolve_shards(str(out), "train")) == 4  # 6 + 6 + 6 + 2
    loader = make_loader(str(out), "train", 7, shuffle=False, repeat=False, drop_last=False)
    batches = list(loader)
    assert [len(b["key"]) for b in batches] == [7, 7, 6]
    assert batches[0]["image"].dtype == torch.uint8 and batches[0]["image"].shape == (7, 3, 8, 8)
    got = {k: (img, c, m) for b in batches for k, img, c, m in zip(b["key"], b["image"], b["caption"], b["meta"])}
    assert sorted(got) == [s.key for s in samples]
    for s in samples:
        image, caption, meta = got[s.key]
        np.testing.assert_array_equal(_to_uint8(image), np.asarray(s.image))
        assert caption == s.caption and meta == s.meta
    assert sum(b["skipped"] for b in batches) == 0
    # Rewriting with a bigger maxcount removes the stale shards instead of reading them twice.
    write_split(out, "train", samples, maxcount=100)
    assert len(resolve_shards(str(out), "train")) == 1


def test_resolve_shards_patterns_and_errors(dataset: Path, tmp_path: Path):
    shards = resolve_shards(str(dataset), "train")
    assert [Path(s).name for s in shards] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert resolve_shards(f"{dataset}/train-{{000000..000002}}.tar", "val") == shards
    assert resolve_shards(f"{dataset}/{{split}}-{{000000..000001}}.tar", "train") == shards[:2]
    assert resolve_shards(f"pipe:cat {dataset}/train-{{000000..000001}}.tar", "train")[1].endswith("000001.tar")
    with pytest.raises(FileNotFoundError, match=r"'val'.*latentdiff data") as e:
        resolve_shards(str(dataset), "val")
    assert str(dataset) in str(e.value)
    with pytest.raises(FileNotFoundError, match="do not exist"):
        resolve_shards(f"{dataset}/train-{{000000..000005}}.tar", "train")
    assert read_info(str(dataset))["splits"] == {"train": 24}
    assert read_info(f"{dataset}/train-{{000000..000002}}.tar")["source"] == "test"
    assert read_info(str(tmp_path)) == {}


def test_pipe_url_and_resize(dataset: Path):
    loader = make_loader(f"pipe:cat {dataset}/train-000001.tar", "train", 8, shuffle=False, repeat=False, resolution=4)
    (batch,) = list(loader)
    assert batch["image"].shape == (8, 3, 4, 4)
    assert batch["key"] == [f"s_{i:04d}" for i in range(8, 16)]


# ---------------------------------------------------------------- bad input


def _write_raw(path: Path, samples: list[dict]) -> None:
    with wds.TarWriter(str(path), encoder=False) as w:
        for s in samples:
            w.write(s)


def test_bad_samples_are_skipped_and_counted(tmp_path: Path):
    good = [_random_samples(1, seed=i, prefix=f"good{i}")[0] for i in range(5)]
    png = lambda s: {"__key__": s.key, "png": _png(s.image), "txt": s.caption.encode(), "json": b"{}"}  # noqa: E731
    raw = [png(s) for s in good]
    raw.insert(1, {"__key__": "garbage", "png": b"\x89PNG not really an image", "txt": b"a cat"})
    raw.insert(3, {"__key__": "empty", "png": _png(good[0].image), "txt": b"  \n "})
    raw.insert(5, {"__key__": "nocaption", "png": _png(good[0].image)})
    (tmp_path / "ds").mkdir()
    _write_raw(tmp_path / "ds" / "train-000000.tar", raw)
    batches = list(make_loader(str(tmp_path / "ds"), "train", 2, shuffle=False, repeat=False, drop_last=False))
    assert _keys(batches) == [s.key for s in good]
    counter = SkipCounter()
    for b in batches:
        counter.update(b)
    assert counter.total == 3
    assert counter.by_reason == Counter({"undecodable image": 1, "empty caption": 1, "missing image or caption": 1})
    assert "3 samples skipped" in counter.summary()


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("where", ["mid-member", "member-boundary"])
def test_truncated_shard_does_not_crash(dataset: Path, where: str):
    last = dataset / "train-000002.tar"
    data = last.read_bytes()
    with tarfile.open(last) as tar:  # cut inside s_0020's image, or exactly before s_0020's first header
        members = {m.name: m for m in tar.getmembers()}
        cut = members["s_0020.png"].offset_data + 100 if where == "mid-member" else members["s_0020.json"].offset
    last.write_bytes(data[:cut])
    for drop_last in (False, True):
        batches = list(make_loader(str(dataset), "train", 3, shuffle=False, repeat=False, drop_last=drop_last))
        keys = _keys(batches)
        assert keys[:18] == [f"s_{i:04d}" for i in range(18)]  # the intact shards are read in full
        assert len(keys) == (18 if drop_last else 20)  # s_0016..s_0019 survive; 20 = 6 * 3 + 2
        reasons = Counter()
        for b in batches:
            reasons.update(b["skip_reasons"])
        # Counted once, even though the cut comes after the last complete batch.
        assert reasons["unreadable or truncated shard"] == 1
        assert reasons["missing image or caption"] == (1 if where == "mid-member" else 0)  # s_0020's json alone
        assert sum(b["skipped"] for b in batches) == sum(reasons.values())
    stream = iter(make_loader(str(dataset), "train", 5, seed=1, shuffle_buffer=4))  # endless: keeps going
    assert all(len(next(stream)["key"]) == 5 for _ in range(8))


# ---------------------------------------------------------------- fashion-mnist


def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def test_read_idx_raw_gz_and_errors(tmp_path: Path):
    a = np.random.default_rng(0).integers(0, 256, (5, 3, 4), dtype=np.uint8)
    (tmp_path / "a-idx3-ubyte").write_bytes(_idx_bytes(a))
    (tmp_path / "a-idx3-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(a)))
    np.testing.assert_array_equal(fashion_mnist.read_idx(tmp_path / "a-idx3-ubyte"), a)
    np.testing.assert_array_equal(fashion_mnist.read_idx(tmp_path / "a-idx3-ubyte.gz"), a)
    (tmp_path / "bad").write_bytes(b"\x12\x34\x08\x03" + bytes(20))
    with pytest.raises(ValueError, match="not an IDX file"):
        fashion_mnist.read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(_idx_bytes(a)[:-7])
    with pytest.raises(ValueError, match="truncated"):
        fashion_mnist.read_idx(tmp_path / "short")


def test_class_prompts_and_captions():
    assert class_prompt("ankle boot") == "a photo of an ankle boot"
    assert class_prompt("sneaker") == "a photo of a sneaker"
    assert fashion_mnist.caption_for(9, fashion_mnist.CAPTION_TEMPLATES.index("{}")) == "an ankle boot"


def test_fashion_mnist_conversion(tmp_path: Path, capsys):
    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    src.mkdir()
    train_x, train_y = rng.integers(0, 256, (30, 28, 28), dtype=np.uint8), np.arange(30) % 10
    test_x, test_y = rng.integers(0, 256, (10, 28, 28), dtype=np.uint8), np.arange(10)[::-1]
    (src / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(train_x)))
    (src / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(train_y))  # gzipped or not: both accepted
    (src / "t10k-images-idx3-ubyte").write_bytes(_idx_bytes(test_x))
    (src / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(test_y)))
    out = tmp_path / "fm"
    assert data_main(["fashion-mnist", "--out", str(out), "--source", str(src), "--maxcount", "10", "--quiet"]) == 0
    assert "train=28 val=2 test=10" in capsys.readouterr().out
    info = json.loads((out / "info.json").read_text())
    assert info["source"] == "fashion-mnist" and info["resolution"] == 32
    assert info["splits"] == {"train": 28, "val": 2, "test": 10}
    assert info["classes"][9] == "ankle boot" and len(info["classes"]) == 10
    assert len(resolve_shards(str(out), "train")) == 3
    (batch,) = list(make_loader(str(out), "val", 8, shuffle=False, repeat=False, drop_last=False))
    for i, (image, caption, meta) in enumerate(zip(batch["image"], batch["caption"], batch["meta"])):
        label = int(train_y[28 + i])
        assert meta == {"label": label, "class": fashion_mnist.CLASSES[label], "source": "fashion-mnist"}
        assert caption.endswith(fashion_mnist.CLASSES[label])
        pixels = _to_uint8(image)
        assert (pixels[:, :, 0] == pixels[:, :, 1]).all() and (pixels[:, :, 1] == pixels[:, :, 2]).all()
        np.testing.assert_array_equal(pixels[2:30, 2:30, 0], train_x[28 + i])  # padded, not resampled
        assert pixels[:2].max() == 0 and pixels[:, 30:].max() == 0
    (test,) = list(make_loader(str(out), "test", 10, shuffle=False, repeat=False))
    assert [m["label"] for m in test["meta"]] == test_y.tolist()
    # A missing source is one line on stderr and exit code 2, naming the package to install.
    assert (
        data_main(["fashion-mnist", "--out", str(tmp_path / "fm2"), "--source", str(tmp_path / "nope"), "--quiet"]) == 2
    )
    err = capsys.readouterr().err
    assert "apt-get install -y dataset-fashion-mnist" in err and "Traceback" not in err


# ---------------------------------------------------------------- shapes


def test_shapes_deterministic_and_captions_match():
    a = list(shapes.generate_shapes(40, seed=3))
    b = list(shapes.generate_shapes(40, seed=3))
    c = list(shapes.generate_shapes(40, seed=4))
    png = lambda samples: [np.asarray(s.image).tobytes() for s in samples]  # noqa: E731
    assert png(a) == png(b) and [s.caption for s in a] == [s.caption for s in b]
    assert png(a) != png(c)
    assert {len(s.meta["shapes"]) for s in a} == {1, 2}
    for s in a:
        specs = [shapes.Shape(**d) for d in s.meta["shapes"]]
        assert s.caption == shapes.caption_for(specs)
        assert s.meta["label"] == shapes.SHAPES.index(specs[0].shape)
        for spec in specs:
            assert f"{spec.size} {spec.color} {spec.shape} {shapes.POSITION_PHRASES[spec.position]}" in s.caption
        if len(specs) == 2:
            assert [x.position for x in specs] == ["left", "right"] and " and " in s.caption
        else:  # the drawn colour and position agree with the caption
            pixels = np.asarray(s.image).astype(int)
            bright = np.abs(pixels - np.array(shapes.BACKGROUND)).max(-1) > 150
            color = np.median(pixels[bright], axis=0)
            assert np.abs(color - np.array(shapes.COLORS[specs[0].color])).max() < 40
            ys, xs = np.nonzero(bright)
            side = {"left": xs.mean() < 14, "right": xs.mean() > 17, "top": ys.mean() < 14}
            assert side.get(specs[0].position, True)


def test_shapes_holdout(tmp_path: Path):
    holdout = ["blue triangle", "circle"]
    train = list(shapes.generate_shapes(200, seed=0, holdout=holdout, split="train"))
    val = list(shapes.generate_shapes(200, seed=0, holdout=holdout, split="val"))
    combos = lambda samples: {(d["color"], d["shape"]) for s in samples for d in s.meta["shapes"]}  # noqa: E731
    assert ("blue", "triangle") not in combos(train) and not any(sh == "circle" for _, sh in combos(train))
    assert ("blue", "triangle") in combos(val) and any(sh == "circle" for _, sh in combos(val))
    assert ("blue", "square") in combos(train) and ("red", "triangle") in combos(train)
    with pytest.raises(ValueError, match="unknown word 'hexagon'"):
        list(shapes.generate_shapes(1, holdout=["hexagon"]))
    out = tmp_path / "sh"
    assert data_main(["shapes", "--out", str(out), "--n", "12", "--holdout", "blue triangle", "--quiet"]) == 0
    info = read_info(str(out))
    assert info["splits"] == {"train": 12, "val": 1, "test": 1} and info["holdout"] == ["blue triangle"]
    assert info["attributes"]["shape"] == list(shapes.SHAPES)


# ---------------------------------------------------------------- folder


def test_folder_source(tmp_path: Path, capsys):
    src = tmp_path / "photos"
    (src / "nested").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(6):  # good ones, one non-square, in two folders and three formats
        ext = ["png", "jpg", "webp"][i % 3]
        size = (40, 20) if i == 0 else (24, 24)
        folder = src / "nested" if i % 2 else src
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"img{i}.{ext}")
        (folder / f"img{i}.txt").write_text(f"picture number {i}\n")
    Image.new("RGB", (8, 8)).save(src / "nocaption.png")
    (src / "corrupt.jpg").write_bytes(b"not a jpeg")
    (src / "corrupt.txt").write_text("a broken file")
    Image.new("RGB", (8, 8)).save(src / "blank.png")
    (src / "blank.txt").write_text("   ")
    out = tmp_path / "out"
    assert data_main(["folder", str(src), "--out", str(out), "--resolution", "16", "--quiet"]) == 0
    assert "skipped=3" in capsys.readouterr().out
    info = read_info(str(out))
    assert info["skipped_by_reason"] == {"no caption": 1, "unreadable image": 1, "empty caption": 1}
    assert sum(info["splits"].values()) == 6 and info["splits"]["val"] >= 1
    captions = []
    for split, n in info["splits"].items():
        if n:
            for b in make_loader(str(out), split, 8, shuffle=False, repeat=False, drop_last=False):
                assert b["image"].shape[1:] == (3, 16, 16)
                captions += b["caption"]
                assert all(m["source"] == "folder" for m in b["meta"])
    assert sorted(captions) == [f"picture number {i}" for i in range(6)]
    assert data_main(["folder", str(tmp_path / "missing"), "--out", str(out), "--resolution", "16"]) == 2


# ---------------------------------------------------------------- determinism and sharding


def test_same_seed_same_stream_across_epochs(dataset: Path):
    def take(n: int, **kw) -> list[dict]:
        stream = iter(make_loader(str(dataset), "train", 4, shuffle_buffer=10, **kw))
        return [next(stream) for _ in range(n)]

    a, b = take(12, seed=5), take(12, seed=5)  # 24 samples = 6 batches per epoch: two epochs
    assert _keys(a) == _keys(b)
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(a, b))
    epoch0, epoch1 = _keys(a)[:24], _keys(a)[24:]
    assert sorted(epoch0) == sorted(epoch1) == [f"s_{i:04d}" for i in range(24)]
    assert epoch0 != epoch1  # reshuffled every epoch
    assert _keys(take(12, seed=6)) != _keys(a)
    # Resume = same loader again, first `step` batches discarded.
    resumed = iter(make_loader(str(dataset), "train", 4, shuffle_buffer=10, seed=5))
    for _ in range(7):
        next(resumed)
    assert _keys([next(resumed) for _ in range(5)]) == _keys(a[7:12])


@pytest.mark.parametrize("maxcount", [8, 24])  # 3 shards: split by shard; 1 shard: split by sample
def test_ranks_get_disjoint_data(tmp_path: Path, maxcount: int):
    out = tmp_path / "ds"
    write_split(out, "train", _random_samples(24), maxcount=maxcount)
    per_rank = [
        _keys(make_loader(str(out), "train", 3, seed=1, repeat=False, drop_last=False, rank=r, world_size=2))
        for r in (0, 1)
    ]
    assert per_rank[0] and per_rank[1] and not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == [f"s_{i:04d}" for i in range(24)]
    with pytest.raises(ValueError, match="rank"):
        make_loader(str(out), "train", 3, rank=2, world_size=2)


def test_two_workers(dataset: Path):
    batches = list(make_loader(str(dataset), "train", 4, num_workers=2, seed=2, repeat=False, drop_last=False))
    assert sorted(_keys(batches)) == [f"s_{i:04d}" for i in range(24)]
    again = list(make_loader(str(dataset), "train", 4, num_workers=2, seed=2, repeat=False, drop_last=False))
    assert _keys(again) == _keys(batches)


def _tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    """A shard written member by member (webdataset's writer cannot put one file twice in a sample)."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_a_bad_sample_mid_shard_skips_that_sample_and_keeps_the_shard(tmp_path: Path, caplog):
    from tests.image_files import bad_exif_jpeg

    good = _random_samples(9, prefix="ok")
    members = []
    for i, s in enumerate(good):
        image = _png(s.image)
        if i == 3:
            image = bad_exif_jpeg()  # Pillow's exif_transpose raises AttributeError
        if i == 4:
            image = image[: len(image) // 2]  # a truncated image
        members += [(f"{s.key}.{'jpg' if i == 3 else 'png'}", image), (f"{s.key}.txt", s.caption.encode())]
        if i == 5:
            members.append((f"{s.key}.txt", b"the same file twice in one sample"))
    members.append(("ok_0009.png", _png(good[0].image)))
    members.append(("ok_0009.txt", "caf\u00e9 cr\u00e8me".encode("cp1252")))  # not UTF-8: decoded as cp1252
    (tmp_path / "ds").mkdir()
    _tar(tmp_path / "ds" / "train-000000.tar", members)
    with caplog.at_level(logging.WARNING, logger="latentdiff.data.reader"):
        batches = list(make_loader(str(tmp_path / "ds"), "train", 2, shuffle=False, repeat=False, drop_last=False))
    assert _keys(batches) == ["ok_0000", "ok_0001", "ok_0002", "ok_0006", "ok_0007", "ok_0008", "ok_0009"]
    messages = [r.getMessage() for r in caplog.records]
    assert sum("a caption is not UTF-8 and was decoded as cp1252" in m for m in messages) == 1
    assert any("ok_0003" in m and "AttributeError" in m for m in messages)  # the log names the sample and why
    assert batches[-1]["caption"][-1] == "caf\u00e9 cr\u00e8me"
    counter = SkipCounter()
    for b in batches:
        counter.update(b)
    assert counter.by_reason == Counter({"undecodable image": 2, "duplicate file in a sample": 1})


def test_from_uint8_inverts_to_uint8_exactly():
    pixels = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    x = from_uint8(pixels)
    assert x.dtype == torch.float32 and x.min() == -1 and x.max() == 1
    assert torch.equal(to_uint8(x), pixels) and pixels.max() == 255  # the input is left as it was
    with pytest.raises(TypeError, match="expects uint8"):
        from_uint8(x)
