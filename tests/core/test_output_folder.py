"""core/outputs.py: an output folder is checked before the work, written beside, and swapped in when complete."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from latentdiff.core import outputs
from latentdiff.core.errors import UserError
from latentdiff.core.outputs import STAGING_PREFIX, OutputFolder


def _write(folder: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (folder / name).write_text(text)
    (folder / "record.json").write_text(json.dumps({"files": sorted(files)}))


def _dead_pid() -> int:
    pid = os.fork()
    if pid == 0:  # a child that ends at once: its pid names a staging folder nobody owns
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


def test_a_file_that_appears_during_the_work_is_kept_and_so_is_the_new_output(tmp_path: Path):
    out = tmp_path / "out"
    with OutputFolder(out, overwrite=False, record="record.json") as folder:
        _write(folder.staging, {"a.txt": "first"})
    assert sorted(p.name for p in out.iterdir()) == ["a.txt", "record.json"]
    with pytest.raises(UserError, match=r"changed while this command ran \(b.txt appeared\); the new output is kept"):
        with OutputFolder(out, overwrite=True, record="record.json") as folder:
            _write(folder.staging, {"a.txt": "second"})
            (out / "b.txt").write_text("another command's")
    assert (out / "a.txt").read_text() == "first" and (out / "b.txt").read_text() == "another command's"
    assert (folder.staging / "a.txt").read_text() == "second"


def test_staging_folders_of_killed_commands_are_not_in_the_way_and_are_cleared(tmp_path: Path):
    out = tmp_path / "out"
    out.mkdir()
    killed = out / f"{STAGING_PREFIX}{_dead_pid()}-x"
    killed.mkdir()
    (killed / "half.png").write_text("half")
    running = out / f"{STAGING_PREFIX}{os.getppid()}-y"  # a live process's: left alone
    running.mkdir()
    with OutputFolder(out, overwrite=False, record="record.json") as folder:  # the folder counts as empty
        _write(folder.staging, {"a.txt": "new"})
    assert sorted(p.name for p in out.iterdir()) == sorted(["a.txt", "record.json", running.name])


def test_the_command_must_list_what_it_wrote(tmp_path: Path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="record.json does not list extra.txt"):
        with OutputFolder(out, overwrite=False, record="record.json") as folder:
            _write(folder.staging, {"a.txt": "x"})
            (folder.staging / "extra.txt").write_text("unlisted")
    assert not out.exists()  # nothing half-made is left behind


def test_a_file_in_place_of_the_folder_and_a_symlink_inside_it_are_refused(tmp_path: Path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(UserError, match="is a file, not a folder"):
        OutputFolder(target, overwrite=True, record="record.json")
    out = tmp_path / "out"
    out.mkdir()
    _write(out, {"a.txt": "x"})
    elsewhere = tmp_path / "elsewhere.txt"
    elsewhere.write_text("keep")
    (out / "a.txt").unlink()
    (out / "a.txt").symlink_to(elsewhere)  # named as ours, but a link we never write
    with pytest.raises(UserError, match="holds a.txt, which its record.json does not list"):
        OutputFolder(out, overwrite=True, record="record.json")
    assert elsewhere.read_text() == "keep"


def test_a_command_stopped_while_moving_its_files_in_can_be_overwritten(tmp_path: Path, monkeypatch):
    out = tmp_path / "out"
    with OutputFolder(out, overwrite=False, record="record.json") as folder:
        _write(folder.staging, {"a.txt": "old"})
    moves = []

    def stopped_after_one(src, dst):
        if moves:
            raise KeyboardInterrupt
        moves.append(dst)
        os.rename(src, dst)

    with monkeypatch.context() as m:
        m.setattr(outputs.os, "replace", stopped_after_one)
        with pytest.raises(KeyboardInterrupt):
            with OutputFolder(out, overwrite=True, record="record.json") as folder:
                _write(folder.staging, {"b.txt": "new", "c.txt": "new"})
    # b.txt is in, the old record is still in place, and the staging folder kept c.txt and the new record.
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["a.txt", "b.txt", "record.json"]
    folder.staging.rename(out / f"{STAGING_PREFIX}{_dead_pid()}-stopped")  # the process has ended since
    with OutputFolder(out, overwrite=True, record="record.json") as folder:  # b.txt counts as the command's
        _write(folder.staging, {"d.txt": "newest"})
    assert sorted(p.name for p in out.iterdir()) == ["d.txt", "record.json"]
