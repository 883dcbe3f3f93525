"""data/folder.py: splits by hash that hold every category, every dropped file named, caption encodings, formats."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from latentdiff.data import folder
from latentdiff.data.reader import make_loader, read_info
from latentdiff.scripts.data import main as data_main
from tests.image_files import bad_exif_jpeg, png_header_only  # noqa: E402

CATEGORIES = ["animals", "buildings", "plants", "stars"]


def _split_of_paths(out: Path) -> dict[str, str]:
    """image path (relative to the source folder) -> split it was written to."""
    info = read_info(str(out))
    where = {}
    for split, n in info["splits"].items():
        if n:
            for batch in make_loader(str(out), split, 64, shuffle=False, repeat=False, drop_last=False):
                where.update({m["path"]: split for m in batch["meta"]})
    return where


def _category_folder(src: Path, per_category: int, start: int = 0) -> None:
    """A folder organised by category, the way a collection is sorted on disk: src/CATEGORY/NNN.png."""
    for c, category in enumerate(CATEGORIES):
        (src / category).mkdir(parents=True, exist_ok=True)
        for i in range(start, start + per_category):
            Image.new("RGB", (4, 4), (60 * c, i % 256, 0)).save(src / category / f"{i:03d}.png")
            (src / category / f"{i:03d}.txt").write_text(f"{category} number {i}")


def test_every_split_holds_every_category_and_keeps_files_when_more_are_added(tmp_path: Path):
    src = tmp_path / "collection"
    _category_folder(src, 30)
    fractions = (0.6, 0.2, 0.2)
    first = folder.convert(src, tmp_path / "a", resolution=4, fractions=fractions)
    assert sum(first["splits"].values()) == 120 and first["split_by"] == "sha256 of seed and path"
    before = _split_of_paths(tmp_path / "a")
    for split in ("train", "val", "test"):
        held = Counter(path.split("/")[0] for path, s in before.items() if s == split)
        assert set(held) == set(CATEGORIES), (split, held)  # sorted order would give val and test one category each
    # Adding files moves none of the old ones to another split.
    _category_folder(src, 10, start=30)
    folder.convert(src, tmp_path / "b", resolution=4, fractions=fractions)
    after = _split_of_paths(tmp_path / "b")
    assert len(after) == 160 and {p: after[p] for p in before} == before
    # Another seed, another split; the same seed, the same one.
    folder.convert(src, tmp_path / "c", resolution=4, fractions=fractions, seed=1)
    assert _split_of_paths(tmp_path / "c") != after
    assert folder.split_of("animals/000.png", 0, fractions) == folder.split_of("animals/000.png", 0, fractions)


def test_a_folder_too_small_for_a_val_split_is_refused(tmp_path: Path, capsys):
    src = tmp_path / "tiny"
    src.mkdir()
    for i in range(3):
        Image.new("RGB", (4, 4), (i, 0, 0)).save(src / f"{i}.png")
        (src / f"{i}.txt").write_text(f"picture {i}")
        if i == 0:
            assert data_main(["folder", str(src), "--out", str(tmp_path / "out"), "--resolution", "4"]) == 2
            err = capsys.readouterr().err.strip()
            assert err == (
                f"latentdiff data folder: error: {src} has 1 captioned images; a dataset needs at least 3 "
                "(one each for train, val, test), so that training can be evaluated: add images"
            )
    # Three images: one each, whatever the hash says.
    assert data_main(["folder", str(src), "--out", str(tmp_path / "out"), "--resolution", "4", "--quiet"]) == 0
    assert read_info(str(tmp_path / "out"))["splits"] == {"train": 1, "val": 1, "test": 1}
    # Three captioned files, but two do not decode: refused, naming the split left empty.
    (src / "1.png").write_bytes(b"broken")
    (src / "2.png").write_bytes(b"broken")
    assert data_main(["folder", str(src), "--out", str(tmp_path / "out2"), "--resolution", "4", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "no usable image is left for the" in err and "{'unreadable image': 2}); fix or add images" in err
    assert not list((tmp_path / "out2").glob("*"))  # refused before anything was written


def test_every_dropped_file_is_named_with_its_reason(tmp_path: Path, caplog):
    src = tmp_path / "photos"
    (src / "sub").mkdir(parents=True)
    (src / ".hidden").mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(src / f"good{i}.png")
        (src / f"good{i}.txt").write_text(f"good picture {i}")
    Image.new("RGB", (8, 8)).save(src / "sub" / "nocaption.png")
    (src / "orphan.txt").write_text("a caption without its image")
    (src / "notes.pdf").write_bytes(b"%PDF")
    (src / "README").write_text("about these photos")
    (src / "corrupt.jpg").write_bytes(b"not a jpeg")
    (src / "corrupt.txt").write_text("a broken file")
    (src / "exif.jpg").write_bytes(bad_exif_jpeg())
    (src / "exif.txt").write_text("malformed exif")
    (src / "huge.png").write_bytes(png_header_only(20_000, 10_000))
    (src / "huge.txt").write_text("a very large image")
    Image.new("RGB", (8, 8)).save(src / "blank.png")
    (src / "blank.txt").write_text("   ")
    Image.new("RGB", (8, 8)).save(src / ".hidden" / "x.png")  # hidden: ignored, not a skip
    (src / ".DS_Store").write_bytes(b"\0")
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="latentdiff.data.folder"):
        code = data_main(["folder", str(src), "--out", str(out), "--resolution", "8", "--quiet",
                          "--max-pixels", "100000000"])  # fmt: skip
    assert code == 0
    info = json.loads((out / "info.json").read_text())
    expected = {
        "README": "not an accepted image type (no extension)",
        "blank.png": "empty caption",
        "corrupt.jpg": "unreadable image",
        "exif.jpg": "unreadable image",
        "huge.png": "larger than 100,000,000 pixels",
        "notes.pdf": "not an accepted image type (.pdf)",
        "orphan.txt": "caption without an image",
        "sub/nocaption.png": "no caption",
    }
    assert {f["file"]: f["reason"] for f in info["skipped_files"]} == expected
    assert info["skipped"] == 8 and sum(info["skipped_by_reason"].values()) == 8
    assert sum(info["splits"].values()) == 4
    logged = {r.getMessage() for r in caplog.records}
    for name, reason in expected.items():
        assert any(m.startswith(f"skipped {name}: {reason}") for m in logged), name
    assert any("skipped exif.jpg: unreadable image (AttributeError" in m for m in logged)
    assert any("skipped huge.png: larger than 100,000,000 pixels (20000 x 10000; allow it with --max-pixels N)" in m
               for m in logged)  # fmt: skip


def test_captions_in_other_encodings_are_read_with_a_warning(tmp_path: Path, caplog):
    src = tmp_path / "src"
    src.mkdir()
    captions = {
        "utf8": "café crème".encode(),
        "bom": "\ufeffnaïve".encode(),
        "cp1252": "“quoted” café".encode("cp1252"),
        "latin1": b"caf\xe9 \x81",  # 0x81 is undefined in cp1252: latin-1 takes it
    }
    for name, data in captions.items():
        Image.new("RGB", (4, 4)).save(src / f"{name}.png")
        (src / f"{name}.txt").write_bytes(data)
    with caplog.at_level(logging.WARNING, logger="latentdiff.data.folder"):
        info = folder.convert(src, tmp_path / "out", resolution=4)
    assert info["skipped"] == 0
    assert info["captions_not_utf8"] == {"cp1252.txt": "cp1252", "latin1.txt": "latin-1"}
    assert any("2 captions are not UTF-8" in r.getMessage() and "cp1252.txt" in r.getMessage()
               for r in caplog.records)  # fmt: skip
    got = set()
    for split in ("train", "val", "test"):
        for batch in make_loader(str(tmp_path / "out"), split, 8, shuffle=False, repeat=False, drop_last=False):
            got.update(batch["caption"])
    assert got == {"café crème", "naïve", "“quoted” café", "café \x81"}


def test_common_image_formats_are_read(tmp_path: Path):
    src = tmp_path / "src"
    src.mkdir()
    colour = (200, 40, 10)
    formats = {"gif": "GIF", "bmp": "BMP", "tif": "TIFF", "tiff": "TIFF", "webp": "WEBP", "jpeg": "JPEG",
               "PNG": "PNG", "ppm": "PPM", "tga": "TGA"}  # fmt: skip
    for ext, fmt in formats.items():
        kwargs = {"lossless": True} if fmt == "WEBP" else {"quality": 100} if fmt == "JPEG" else {}
        Image.new("RGB", (6, 6), colour).save(src / f"img_{ext}.{ext}", fmt, **kwargs)
        (src / f"img_{ext}.txt").write_text(f"a {ext} file")
    ramp = (np.arange(8, dtype=np.uint32) * 9362).astype(np.uint16)[None, :].repeat(8, 0)  # 16-bit, 0..65534
    Image.fromarray(ramp).save(src / "ramp16.png")
    (src / "ramp16.txt").write_text("a 16-bit greyscale ramp")
    out = tmp_path / "out"
    info = folder.convert(src, out, resolution=8)
    assert info["skipped"] == 0 and sum(info["splits"].values()) == len(formats) + 1
    for split in ("train", "val", "test"):
        for batch in make_loader(str(out), split, 16, shuffle=False, repeat=False, drop_last=False):
            for image, meta in zip(batch["image"], batch["meta"]):
                pixels = image.permute(1, 2, 0).numpy().astype(int)  # (8, 8, 3) in 0..255
                if meta["path"] == "ramp16.png":
                    # scaled, not clipped to white: the ramp survives (the GIF palette or JPEG may move a colour by 1-2)
                    assert pixels[0, :, 0].tolist() == [round(v / 257) for v in ramp[0]]
                else:
                    assert np.abs(pixels - np.array(colour)).max() <= 3, meta["path"]
    assert {".gif", ".bmp", ".tif", ".tiff", ".webp"} <= set(folder.IMAGE_EXTENSIONS)
