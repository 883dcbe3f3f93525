"""`latentdiff data --out DIR --overwrite`: checks before any work, replaces only what its info.json lists, and
swaps the new dataset in only when it is complete (a failure keeps the earlier one)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from latentdiff.data import shapes
from latentdiff.data.reader import make_loader
from latentdiff.scripts.data import main as data_main


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under `folder`, hidden ones included, by relative path: what a command must not lose."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("latentdiff data") and "\n" not in err and "Traceback" not in err, err
    return err


def _shapes(out: Path, *more: str) -> list[str]:
    return ["shapes", "--out", str(out), "--n", "20", "--resolution", "8", "--quiet", *more]


def test_overwrite_refuses_a_users_files_before_deleting_anything(tmp_path: Path, capsys):
    # Measured before the fix: backup.tar was deleted (it matched "*.tar"), then notes.txt stopped the command.
    out = tmp_path / "ow"
    out.mkdir()
    (out / "backup.tar").write_bytes(b"a user's backup")
    (out / "notes.txt").write_text("mine")
    before = tree(out)
    assert data_main(_shapes(out, "--overwrite")) == 2
    err = _one_line(capsys)
    assert f"--out {out} holds backup.tar, notes.txt and no info.json, so nothing there was written" in err
    assert tree(out) == before
    # A dataset's folder with a user's file added: the dataset's info.json does not list it, so it is named.
    ds = tmp_path / "ds"
    assert data_main(_shapes(ds)) == 0
    (ds / "backup.tar").write_bytes(b"a user's backup")
    before = tree(ds)
    assert data_main(_shapes(ds, "--overwrite", "--seed", "1")) == 2
    err = _one_line(capsys)
    assert f"--out {ds} holds backup.tar, which its info.json does not list" in err and "move it away" in err
    assert tree(ds) == before


def test_bad_input_or_a_failure_midway_keeps_the_earlier_dataset(tmp_path: Path, capsys, monkeypatch):
    ds = tmp_path / "ds"
    assert data_main(_shapes(ds, "--maxcount", "4")) == 0
    capsys.readouterr()
    before = tree(ds)
    # Measured before the fix: the dataset was deleted, then the missing source was reported.
    missing = tmp_path / "nonexistent"
    assert data_main(["folder", str(missing), "--out", str(ds), "--overwrite", "--resolution", "32"]) == 2
    assert f"image folder {missing} does not exist" in _one_line(capsys)
    assert tree(ds) == before
    # A failure after some shards of the new dataset were written (the 15th image of train).
    render, calls = shapes.render, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 15:
            raise RuntimeError("disk full")
        return render(*args, **kwargs)

    monkeypatch.setattr(shapes, "render", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        data_main(_shapes(ds, "--overwrite", "--seed", "1", "--maxcount", "2"))
    assert tree(ds) == before  # no new shard mixed in, no staging folder left
    calls.clear()
    monkeypatch.setattr(shapes, "render", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        data_main(_shapes(ds, "--overwrite", "--seed", "1"))
    assert tree(ds) == before
    # A new folder that a failed command made is not left behind.
    assert data_main(["folder", str(missing), "--out", str(tmp_path / "new"), "--resolution", "8"]) == 2
    assert not (tmp_path / "new").exists()


def test_overwrite_replaces_exactly_what_info_json_lists(tmp_path: Path, capsys):
    ds = tmp_path / "ds"
    assert data_main(_shapes(ds, "--maxcount", "4")) == 0
    info = json.loads((ds / "info.json").read_text())
    assert info["files"] == sorted(p.name for p in ds.iterdir() if p.name != "info.json")
    assert len([f for f in info["files"] if f.startswith("train-")]) == 5  # 20 images, 4 per shard
    # Fewer, larger shards: the five old train shards must not stay behind to be read with the new one.
    assert data_main(["shapes", "--out", str(ds), "--n", "6", "--resolution", "8", "--quiet", "--overwrite"]) == 0
    info = json.loads((ds / "info.json").read_text())
    assert info["files"] == ["test-000000.tar", "train-000000.tar", "val-000000.tar"]
    assert sorted(p.name for p in ds.iterdir()) == sorted([*info["files"], "info.json"])  # no staging folder left
    batches = list(make_loader(str(ds), "train", 64, shuffle=False, repeat=False, drop_last=False))
    assert sum(len(b["caption"]) for b in batches) == 6
    # A folder whose info.json lists no files (an older latentdiff wrote it) is refused, not guessed at.
    del info["files"]
    (ds / "info.json").write_text(json.dumps(info))
    before = tree(ds)
    assert data_main(_shapes(ds, "--overwrite")) == 2
    assert f"{ds / 'info.json'} does not list the files written with it" in _one_line(capsys)
    assert tree(ds) == before


def test_a_record_cannot_make_overwrite_delete_outside_the_folder(tmp_path: Path, capsys):
    ds = tmp_path / "ds"
    assert data_main(_shapes(ds)) == 0
    outside = tmp_path / "precious.txt"
    outside.write_text("keep")
    info = json.loads((ds / "info.json").read_text())
    info["files"] += ["../precious.txt", str(outside), "sub"]
    (ds / "info.json").write_text(json.dumps(info))
    (ds / "sub").mkdir()  # a folder, even one the record names, is never ours to delete
    assert data_main(_shapes(ds, "--overwrite")) == 2
    assert "holds sub, which its info.json does not list" in _one_line(capsys)
    (ds / "sub").rmdir()
    assert data_main(_shapes(ds, "--overwrite")) == 0
    assert outside.read_text() == "keep"
