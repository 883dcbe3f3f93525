"""What a non-editable install gets: the wheel must carry the files the code reads at run time."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_wheel_holds_every_preset_and_clip_config(tmp_path):
    # Presets (PART/presets/*.toml) and CLIP configs (text/configs/*.json) hold no Python; a wheel built without
    # naming them installs a latentdiff whose `--preset tiny` cannot be found. Named as packages, they also
    # keep setuptools from printing a screenful of "Package would be ignored" at every `make setup`.
    src = tmp_path / "src"
    shutil.copytree(
        ROOT,
        src,
        ignore=shutil.ignore_patterns(".*", "runs", "tests", "docs", "bench", "build", "*.egg-info", "__pycache__"),
    )
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(src),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    assert "would be ignored" not in built.stdout + built.stderr
    (wheel,) = tmp_path.glob("latentdiff-*.whl")
    inside = set(zipfile.ZipFile(wheel).namelist())
    needed = {
        f"latentdiff/{p.relative_to(ROOT)}" for p in [*ROOT.glob("*/presets/*.toml"), *ROOT.glob("*/configs/*.json")]
    }
    assert len(needed) >= 10  # the five stages' presets and the two CLIP configs, at least
    assert sorted(needed - inside) == []
