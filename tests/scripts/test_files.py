"""Every file a command reads either loads or ends with one line naming the file, and exit code 2."""

from __future__ import annotations

import shutil

import pytest
import torch

from latentdiff.core import checkpoint as ckpt
from latentdiff.scripts import cli


def _exit_2(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("latentdiff") and "Traceback" not in err and "\n" not in err, err
    return err


def _copy(run, tmp_path):
    return shutil.copytree(run, tmp_path / run.name)


def test_damaged_run_files_are_named(ae_run, data, tmp_path, capsys):
    run = _copy(ae_run[0], tmp_path)
    (run / "meta.json").write_text("{not json")
    err = _exit_2(capsys, ["evaluate-autoencoder", "--run", str(run), "--data", str(data)])
    assert f"{run / 'meta.json'} is not valid JSON" in err

    run = _copy(ae_run[0], tmp_path / "b")
    weights = ckpt.committed_file(run, ckpt.MODEL)
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    err = _exit_2(capsys, ["evaluate-autoencoder", "--run", str(run), "--data", str(data)])
    assert "model.safetensors has 100 bytes, the manifest says" in err


def test_truncated_weights_and_state_name_the_file(tmp_path):
    # Files outside a manifest (format-1 runs, caches) are read through the same two functions.
    path = tmp_path / "model.safetensors"
    ckpt.save_weights(path, {"w": torch.ones(64, 64)})
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ckpt.CheckpointError, match=r"model.safetensors is not a readable safetensors file"):
        ckpt.load_weights(path)
    state = tmp_path / "state.pt"
    ckpt.save_state(state, {"step": 3, "w": torch.ones(100)})
    state.write_bytes(state.read_bytes()[:50])
    with pytest.raises(ckpt.CheckpointError, match=r"state.pt is not a readable training state"):
        ckpt.load_state(state)
    bad = tmp_path / "x.json"
    bad.write_bytes(b"\xff\xfe{")
    with pytest.raises(ckpt.CheckpointError, match=r"x.json is not valid JSON"):
        ckpt.read_json(bad)


def test_prompts_file_that_is_missing_or_not_text(prior_run, tmp_path, capsys):
    bad = tmp_path / "prompts.txt"
    bad.write_bytes(b"\xff\xfe a cat")
    args = ["generate", "--run", str(prior_run[0]), "--out", str(tmp_path / "o")]
    assert "is not UTF-8 text" in _exit_2(capsys, [*args, "--prompts", str(bad)])
    assert "no such file" in _exit_2(capsys, [*args, "--prompts", str(tmp_path / "nope.txt")])
