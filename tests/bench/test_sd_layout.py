"""bench.sd_layout runs end to end (on its toy layout: SD 1.5's takes minutes and 9 GB) and writes its figures."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from bench import sd_layout  # noqa: E402


def test_sd_layout_benchmark_times_import_generate_and_export(tmp_path, monkeypatch):
    monkeypatch.setenv("USE_HUB_KERNELS", "0")
    figures = sd_layout.main(["--layout", "toy", "--steps", "2", "--out", str(tmp_path / "sd_layout.json"),
                              "--keep", str(tmp_path / "work")])  # fmt: skip
    written = json.loads((tmp_path / "sd_layout.json").read_text())
    assert written["figures"]["layout"] == "toy" and written["figures"]["steps"] == 2
    assert all(figures[k] > 0 for k in ("import_s", "load_s", "generate_s", "export_s"))
    assert (tmp_path / "work" / "exported" / "model_index.json").is_file()  # --keep kept what it made
    assert "| GPU | not measured" in written["table"] or figures["device"].startswith("cuda")
    assert figures["parameters_m"]["unet"] < 5  # the toy layout, not SD 1.5's 860M
