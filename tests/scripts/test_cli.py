"""The `latentdiff` dispatcher and the benchmark driver: help that is true, one-line errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from latentdiff.core.errors import UserError
from latentdiff.core.runtime import parse_device, pick_device
from latentdiff.scripts import cli


def test_version(capsys):
    assert cli.main(["--version"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("latentdiff ") and out.split()[1][0].isdigit()


def test_train_without_stage_lists_the_stages(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "train needs one of" in err
    for stage in ("autoencoder", "text", "prior", "decoder", "classifier"):
        assert f"train {stage}" in err


def test_train_help_and_unknown_stage(capsys):
    assert cli.main(["train", "--help"]) == 0
    assert "train prior" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "priors"])
    assert e.value.code == 2
    assert "unknown train 'priors'" in capsys.readouterr().err


def test_unknown_command(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["frobnicate"])
    assert e.value.code == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_device_that_is_missing_is_one_line():
    with pytest.raises(UserError, match=r"--device cuda: this machine has no cuda device"):
        parse_device("cuda")
    with pytest.raises(UserError, match=r"--device 'gpu' is not a device name"):
        parse_device("gpu")
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device(None) == torch.device("cpu")


def test_bench_help_and_samplers_skipped_without_the_demo(tmp_path, monkeypatch, capsys):
    import bench.__main__ as suite

    suite.main(["--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m bench") and "generation" in out

    monkeypatch.setattr(suite, "DEMO", tmp_path / "no-demo")
    monkeypatch.setattr(suite, "OUT", tmp_path / "bench")
    suite.main(["samplers"])  # returns (exit 0) instead of failing on the missing demo prior
    out = capsys.readouterr().out
    assert "bench.samplers: skipped" in out and "make demo" in out

    with pytest.raises(SystemExit, match="unknown benchmark"):
        suite.main(["nope"])


def test_output_folders_never_mix_two_results(tmp_path, capsys):
    from latentdiff.core.outputs import OutputFolder

    out = tmp_path / "gen"
    out.mkdir()
    (out / "000_a_00.png").write_bytes(b"x")
    (out / "settings.json").write_text('{"files": ["000_a_00.png"]}')
    (out / "notes.txt").write_text("mine")
    # --overwrite would not free the folder while a user's own file is there: the message says what would.
    with pytest.raises(
        UserError, match=r"--out .*gen is not empty: it holds notes.txt, which no settings.json there"
    ) as e:
        OutputFolder(out, overwrite=False, record="settings.json")
    assert "--overwrite" not in str(e.value) and "move it away" in str(e.value)
    # --overwrite replaces only what the record lists; a user's own file is refused before anything is deleted.
    with pytest.raises(UserError, match=r"holds notes.txt, which its settings.json does not list"):
        OutputFolder(out, overwrite=True, record="settings.json")
    assert (out / "000_a_00.png").exists() and (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()
    # Only this command's own files left: --overwrite is the way, and the message says so.
    with pytest.raises(UserError, match=r"gen is not empty \(000_a_00.png, settings.json\); pass --overwrite"):
        OutputFolder(out, overwrite=False, record="settings.json")
    assert OutputFolder(out, overwrite=True, record="settings.json").previous == {"000_a_00.png", "settings.json"}


def test_generate_refuses_a_used_folder_and_overwrite_replaces_it(prior_run, tmp_path, capsys):
    out = tmp_path / "gen"
    args = ["generate", "a red circle", "--run", str(prior_run[0]), "--n", "2", "--steps", "2", "--out", str(out)]
    assert cli.main(args) == 0
    with pytest.raises(SystemExit) as e:
        cli.main(args)
    assert e.value.code == 2 and "pass --overwrite" in capsys.readouterr().err
    again = ["generate", "🙂 猫", "--run", str(prior_run[0]), "--n", "1", "--steps", "2", "--out", str(out)]
    assert cli.main([*again, "--overwrite"]) == 0
    written = sorted(p.name for p in out.iterdir())
    assert written == ["000_prompt_00.png", "grid.png", "settings.json"]


def test_data_refuses_an_existing_dataset(tmp_path, capsys):
    from latentdiff.scripts.data import main as data_main

    out = tmp_path / "shapes"
    args = ["shapes", "--out", str(out), "--n", "20", "--val-n", "4", "--test-n", "4", "--quiet"]
    assert data_main(args) == 0
    before = sorted(p.name for p in out.iterdir())
    assert data_main(args) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == before
    assert data_main([*args, "--overwrite"]) == 0


def test_fid_reads_only_what_generate_generated(tmp_path):
    import json

    from latentdiff.core.logger import save_grid, save_png
    from latentdiff.evaluation.images import load_image_set

    out = tmp_path / "gen"
    out.mkdir()
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    names = [f"000_a-cat_{k:02d}.png" for k in range(3)]
    for name, image in zip(names, x):
        save_png(image, out / name)
    save_grid(x, out / "grid.png", nrow=3)  # a different size: would break (or bias) the set
    (out / "settings.json").write_text(json.dumps({"files": names}))
    assert len(load_image_set(out)) == 3
    (out / names[1]).unlink()
    with pytest.raises(FileNotFoundError, match="settings.json lists 000_a-cat_01.png but it is missing"):
        load_image_set(out)


@pytest.mark.parametrize("stage", ["autoencoder", "text", "prior", "decoder", "classifier"])
def test_train_help_is_true_for_every_stage(stage, capsys):
    import importlib
    import re

    from latentdiff.core.config import load_preset

    module = importlib.import_module(cli.COMMANDS[("train", stage)][0])
    text = module.build_parser().format_help()
    assert "(--out RUN | --resume RUN)" in text  # shown as required, one or the other
    presets = sorted(p.stem for p in (module.PRESETS / "presets").glob("*.toml"))
    assert f"{', '.join(presets)}, or a .toml file" in " ".join(text.split())
    example = re.search(r"e\.g\. --set\s+(\S+=[^\s)]+)", " ".join(text.split())).group(1)
    config_cls = type(load_preset(_config_class(module), module.PRESETS, "tiny"))
    load_preset(config_cls, module.PRESETS, "tiny", [example])  # the example in the help works here
    with pytest.raises(SystemExit):
        module.build_parser().parse_args(["--data", "d"])  # neither --out nor --resume
    assert "one of the arguments --out --resume is required" in capsys.readouterr().err


def _config_class(module):
    import dataclasses

    classes = [
        v
        for v in vars(module).values()
        if isinstance(v, type) and dataclasses.is_dataclass(v) and {"train"} <= {f.name for f in dataclasses.fields(v)}
    ]
    assert len(classes) == 1, classes
    return classes[0]


@pytest.mark.parametrize(
    "name",
    [
        p.stem
        for p in (Path(__file__).resolve().parents[2] / "bench").glob("*.py")
        if p.stem not in ("__init__", "__main__", "common")
    ],
)
def test_bench_help_speaks_to_a_user(name, capsys):
    """--help of each benchmark: no reference to the project's issues or "see the Makefile"."""
    import importlib

    with pytest.raises(SystemExit) as e:
        importlib.import_module(f"bench.{name}").main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and out.startswith(f"usage: python -m bench.{name}")
    assert not re.search(r"\bissue\b|issue's|issue \d|see the Makefile", out), out
