"""Bad input to `latentdiff train`: one line naming the problem, exit code 2."""

from __future__ import annotations

from latentdiff.core import checkpoint as ckpt
from tests.helpers import AE_ARGS, PRIOR_ARGS, cli_exit_2


def test_unknown_config_key_names_the_key(capsys, monkeypatch, data, tmp_path):
    monkeypatch.delenv("LATENTDIFF_DEBUG", raising=False)
    err = cli_exit_2(
        capsys, ["train", "autoencoder", "--data", str(data), "--out", str(tmp_path / "a"), "--set", "model.widht=3"]
    )
    assert "widht" in err and "channels" in err  # the misspelt key and the keys it could have been


def test_missing_data_directory(capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("LATENTDIFF_DEBUG", raising=False)
    missing = tmp_path / "no_such_data"
    err = cli_exit_2(
        capsys, ["train", "autoencoder", "--data", str(missing), "--out", str(tmp_path / "a"), "--steps", "1", *AE_ARGS]
    )
    assert str(missing) in err and "latentdiff data" in err
    assert not (tmp_path / "a" / ckpt.META).exists()  # no half-made run that looks finished
    err = cli_exit_2(capsys, ["train", "autoencoder", "--out", str(tmp_path / "b")])
    assert "--data" in err


def test_resuming_a_run_of_another_stage(capsys, monkeypatch, text_run, ae_run):
    monkeypatch.delenv("LATENTDIFF_DEBUG", raising=False)
    err = cli_exit_2(capsys, ["train", "autoencoder", "--resume", str(text_run[0]), "--steps", "5"])
    assert "'text' run" in err and "autoencoder" in err
    err = cli_exit_2(capsys, ["train", "prior", "--resume", str(ae_run[0]), "--steps", "5"])
    assert "'autoencoder' run" in err and "prior" in err


def test_out_pointing_at_an_existing_run(capsys, monkeypatch, ae_run, data):
    monkeypatch.delenv("LATENTDIFF_DEBUG", raising=False)
    run = ae_run[0]
    config, weights = (run / "config.toml").read_text(), ckpt.committed_file(run, ckpt.MODEL).read_bytes()
    err = cli_exit_2(capsys, ["train", "autoencoder", "--data", str(data), "--out", str(run), "--steps", "1"])
    assert f"--resume {run}" in err
    assert (run / "config.toml").read_text() == config and ckpt.committed_file(run, ckpt.MODEL).read_bytes() == weights


def test_prior_with_the_wrong_kind_of_run(capsys, monkeypatch, data, ae_run, text_run, tmp_path):
    monkeypatch.delenv("LATENTDIFF_DEBUG", raising=False)
    ae, text = str(ae_run[0]), str(text_run[0])
    err = cli_exit_2(
        capsys,
        [
            "train",
            "prior",
            "--data",
            str(data),
            "--autoencoder",
            text,
            "--text",
            text,
            "--out",
            str(tmp_path / "p1"),
            "--steps",
            "1",
            *PRIOR_ARGS,
        ],
    )
    assert text in err and "'text' run" in err and "train autoencoder" in err
    err = cli_exit_2(
        capsys,
        [
            "train",
            "prior",
            "--data",
            str(data),
            "--autoencoder",
            ae,
            "--text",
            ae,
            "--out",
            str(tmp_path / "p2"),
            "--steps",
            "1",
            *PRIOR_ARGS,
        ],
    )
    assert ae in err and "'autoencoder' run" in err and "train text" in err and "openclip:" in err
    err = cli_exit_2(capsys, ["train", "prior", "--data", str(data), "--text", text, "--out", str(tmp_path / "p3")])
    assert "--autoencoder" in err
