"""`latentdiff data folder`: caption files as other tools write them (byte-order marks, NUL, several lines), the
layouts of other trainers (kohya's .caption, diffusers' metadata.jsonl / .csv), and the split sizes."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from PIL import Image

from latentdiff.data import folder
from latentdiff.data.captions import decode_caption
from latentdiff.data.reader import make_loader
from latentdiff.scripts.data import main as data_main


def _captions(out: Path) -> dict[str, str]:
    """image path (relative to the source) -> caption, over every split of a dataset."""
    got = {}
    for split in ("train", "val", "test"):
        for batch in make_loader(str(out), split, 64, shuffle=False, repeat=False, drop_last=False):
            got.update({m["path"]: c for m, c in zip(batch["meta"], batch["caption"])})
    return got


def _image(path: Path, shade: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (shade, 0, 0)).save(path)


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("latentdiff data folder: error: ") and "\n" not in err, err
    return err


@pytest.mark.parametrize(
    "data",
    [
        b"\xff\xfe" + "a red circle\r\n".encode("utf-16-le"),  # Windows PowerShell's `>`
        b"\xfe\xff" + "a red circle".encode("utf-16-be"),
        b"\xff\xfe\x00\x00" + "a red circle".encode("utf-32-le"),
        b"\x00\x00\xfe\xff" + "a red circle".encode("utf-32-be"),
        b"\xef\xbb\xbf" + b"a red circle\n",
    ],
)
def test_a_caption_is_decoded_by_its_byte_order_mark(data: bytes):
    text, encoding = decode_caption(data)
    assert text == "a red circle", (text, encoding)


def test_captions_with_nul_are_skipped_and_several_lines_keep_the_first(tmp_path: Path, caplog):
    src = tmp_path / "src"
    captions = {
        "utf16": b"\xff\xfe" + "a red circle\r\n".encode("utf-16-le"),
        "nobom": "a blue square".encode("utf-16-le"),  # UTF-16 without its mark: a NUL after every letter
        "nul": b"a green\x00 star",
        "lines": b"a cat on a mat\r\n\r\nsecond caption\n",
        "plain": b"a dog",
        "plain2": b"a bird",
    }
    for i, (name, data) in enumerate(captions.items()):
        _image(src / f"{name}.png", 40 * i)
        (src / f"{name}.txt").write_bytes(data)
    with caplog.at_level(logging.WARNING, logger="latentdiff.data.folder"):
        info = folder.convert(src, tmp_path / "out", resolution=4)
    assert _captions(tmp_path / "out") == {
        "utf16.png": "a red circle",
        "lines.png": "a cat on a mat",
        "plain.png": "a dog",
        "plain2.png": "a bird",
    }
    assert info["skipped_by_reason"] == {"caption holds NUL characters": 2}
    assert {f["file"] for f in info["skipped_files"]} == {"nobom.png", "nul.png"}
    assert info["captions_not_utf8"] == {}  # a byte-order mark says the encoding: nothing was guessed
    assert info["captions_first_line_only"] == ["lines.txt"]
    assert any("1 captions have more than one line; the first line of each was kept (kohya's rule): lines.txt"
               in r.getMessage() for r in caplog.records)  # fmt: skip


def test_kohya_caption_files_are_named_then_imported_with_caption_ext(tmp_path: Path, capsys):
    src = tmp_path / "kohya" / "10_cat"  # kohya's "REPEATS_NAME" folders
    for i in range(4):
        _image(src / f"{i}.png", i)
        (src / f"{i}.caption").write_text(f"a cat, picture {i}")
    out = tmp_path / "out"
    argv = ["folder", str(tmp_path / "kohya"), "--out", str(out), "--resolution", "4", "--quiet"]
    assert data_main(argv) == 2
    err = _err(capsys)
    assert "4 images and no .txt captions" in err and "4 have a same-named .caption file" in err
    assert "--caption-ext .caption" in err
    assert not out.exists()
    assert data_main([*argv, "--caption-ext", ".caption"]) == 0
    assert _captions(out) == {f"10_cat/{i}.png": f"a cat, picture {i}" for i in range(4)}
    assert json.loads((out / "info.json").read_text())["caption_ext"] == ".caption"
    assert data_main([*argv, "--caption-ext", ".png", "--out", str(tmp_path / "o2")]) == 2
    assert "--caption-ext .png is an image extension" in _err(capsys)


def test_diffusers_metadata_jsonl_and_csv_are_read_and_win_over_caption_files(tmp_path: Path, capsys):
    src = tmp_path / "hf"
    lines = []
    for i in range(5):
        _image(src / "train" / f"{i:04d}.png", i)
        lines.append(json.dumps({"file_name": f"train/{i:04d}.png", "text": f"a photo number {i}", "score": i}))
    (src / "train" / "0000.txt").write_text("the caption file loses")
    lines.append(json.dumps({"file_name": "train/missing.png", "text": "no such image"}))
    lines.append("{not json")
    (src / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    assert data_main(["folder", str(src), "--out", str(out), "--resolution", "4", "--quiet"]) == 0
    assert _captions(out) == {f"train/{i:04d}.png": f"a photo number {i}" for i in range(5)}
    info = json.loads((out / "info.json").read_text())
    assert info["captions_from"] == {"metadata.jsonl": 5}
    assert {(f["file"], f["reason"]) for f in info["skipped_files"]} == {
        ("metadata.jsonl", "listed image is missing"),
        ("metadata.jsonl", "unreadable metadata line"),
        ("train/0000.txt", "caption file not read: metadata.jsonl gives this image's caption"),
    }
    # metadata.csv, as Excel writes it (a UTF-8 byte-order mark), with a quoted caption holding a comma.
    csv_src = tmp_path / "csv"
    rows = ["file_name,text"]
    for i in range(3):
        _image(csv_src / f"{i}.jpg", i)
        rows.append(f'{i}.jpg,"a cat, sitting, number {i}"')
    (csv_src / "metadata.csv").write_bytes(b"\xef\xbb\xbf" + "\r\n".join(rows).encode())
    assert data_main(["folder", str(csv_src), "--out", str(tmp_path / "o2"), "--resolution", "4", "--quiet"]) == 0
    assert _captions(tmp_path / "o2") == {f"{i}.jpg": f"a cat, sitting, number {i}" for i in range(3)}
    # Another caption column: named in the error, and --caption-column reads it.
    (src / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"train/{i:04d}.png", "caption": "c"}) + "\n"
                                                for i in range(5)))  # fmt: skip
    argv = ["folder", str(src), "--out", str(tmp_path / "o3"), "--resolution", "4", "--quiet"]
    assert data_main(argv) == 2
    err = _err(capsys)
    assert 'metadata.jsonl has no "text" column (it has: caption, file_name); pass --caption-column' in err
    assert data_main([*argv, "--caption-column", "caption"]) == 0


def test_split_sizes_are_chosen_validated_and_recorded(tmp_path: Path, capsys):
    src = tmp_path / "src"
    for i in range(200):
        _image(src / f"{i:03d}.png", i)
        (src / f"{i:03d}.txt").write_text(f"picture {i}")
    out = tmp_path / "out"
    argv = ["folder", str(src), "--resolution", "4", "--quiet"]
    assert data_main([*argv, "--out", str(out), "--val-fraction", "0.1", "--test-fraction", "0.4"]) == 0
    info = json.loads((out / "info.json").read_text())
    assert info["fractions"] == [0.5, 0.1, 0.4] and sum(info["splits"].values()) == 200
    assert 60 <= info["splits"]["test"] <= 100 and 8 <= info["splits"]["val"] <= 35, info["splits"]
    # The default stays 5% / 5%, so a dataset rebuilt with the same command gets the same split.
    assert data_main([*argv, "--out", str(tmp_path / "d")]) == 0
    assert json.loads((tmp_path / "d" / "info.json").read_text())["fractions"] == [0.9, 0.05, 0.05]
    for flags, message in [
        (["--test-fraction", "1.2"], "--test-fraction must be in [0, 1), got 1.2"),
        (["--val-fraction", "0"], "--val-fraction must be in (0, 1), got 0.0"),
        (["--val-fraction", "0.5", "--test-fraction", "0.5"], "leave train nothing"),
        (["--test-fraction", "nan"], "--test-fraction must be in [0, 1), got nan"),
    ]:
        bad = tmp_path / "bad"
        assert data_main([*argv, "--out", str(bad), *flags]) == 2
        assert message in _err(capsys), flags
        assert not bad.exists()
