"""`latentdiff generate --out DIR --overwrite`: replaces only the images its settings.json lists, and only once
the new ones are complete."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from latentdiff.scripts import cli, generate
from tests.data.test_overwrite import tree


def _exit_2(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


def test_generate_overwrite_keeps_a_users_images_and_the_earlier_ones_on_failure(
    prior_run, tmp_path: Path, capsys, monkeypatch
):
    out = tmp_path / "gen"
    args = ["generate", "a red circle", "--run", str(prior_run[0]), "--steps", "2", "--out", str(out)]
    assert generate.main([*args[1:], "--n", "2"]) == out / "grid.png"  # the grid in --out, not in its staging folder
    first = json.loads((out / "settings.json").read_text())["files"]
    assert sorted(p.name for p in out.iterdir()) == sorted([*first, "grid.png", "settings.json"])
    # A user's own image named the way generate names its files (measured before the fix: deleted by the glob).
    (out / "001_beach.png").write_bytes(b"a user's photo")
    before = tree(out)
    capsys.readouterr()  # the first run's progress bars
    err = _exit_2(capsys, [*args, "--n", "1", "--overwrite"])
    assert f"--out {out} holds 001_beach.png, which its settings.json does not list" in err
    assert tree(out) == before
    (out / "001_beach.png").unlink()
    before = tree(out)
    # A failure after the new images, grid and settings.json were all written (into the staging folder).
    written, calls = generate.write_images, []

    def failing(staging: Path, *a, **k):
        written(staging, *a, **k)
        calls.append(sorted(p.name for p in staging.iterdir()))
        raise RuntimeError("disk full")

    with monkeypatch.context() as m:
        m.setattr(generate, "write_images", failing)
        with pytest.raises(RuntimeError, match="disk full"):
            cli.main([*args, "--n", "1", "--overwrite"])
    assert calls == [["000_a-red-circle_00.png", "grid.png", "settings.json"]] and tree(out) == before
    # Success: one image replaces two; the second old image does not stay behind as if it were new.
    assert generate.main([*args[1:], "--n", "1", "--overwrite"]) == out / "grid.png"
    files = json.loads((out / "settings.json").read_text())["files"]
    assert files == ["000_a-red-circle_00.png"] and sorted(p.name for p in out.iterdir()) == sorted(
        [*files, "grid.png", "settings.json"]
    )
    assert "1 image in" in capsys.readouterr().out
