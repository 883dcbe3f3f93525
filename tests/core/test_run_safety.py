"""Runs that others depend on, resume and extension (issue #28): each case a user met, through a stage's `main`.

- a run that others were trained on: resuming it on other data needs --new-data; a checkpoint another
  run reads is pinned and never pruned, and the dependent keeps reading it;
- `--resume` of a run that is still training names the lock holder;
- a batch larger than the dataset is refused, in every stage;
- a failed start of a new run removes what it created, and only that;
- extending a finished run follows a stated learning-rate policy (--extend-lr), printed and recorded;
- a dataset rebuilt in place is noticed by resumes and by the latent cache.

The classifier is the cheapest stage (about 0.1 s a step); the pins are tried on the real pair (prior on
an autoencoder).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from latentdiff.autoencoder import stage as ae_stage
from latentdiff.autoencoder.load import load_autoencoder
from latentdiff.core import checkpoint as ckpt
from latentdiff.core.config import dumps_toml, to_dict
from latentdiff.core.faults import RunLock
from latentdiff.core.runtime import Runtime
from latentdiff.data import shapes
from latentdiff.data.shards import Sample, write_info, write_split
from latentdiff.decoder import stage as decoder_stage
from latentdiff.evaluation import classifier_stage
from latentdiff.evaluation.classifier import ClassifierStageConfig
from latentdiff.prior import stage as prior_stage
from latentdiff.prior.latent_cache import LatentCache
from latentdiff.prior.pipeline import TextToImage
from latentdiff.text import stage as text_stage
from tests.helpers import AE_ARGS, PRIOR_ARGS

CLF = [
    "--batch-size",
    "4",
    "--lr",
    "0.01",
    "--set",
    "resolution=16",
    "--set",
    "model.channels=[8, 16]",
    "--set",
    "model.convs_per_level=[1, 1]",
    "--set",
    "model.feature_dim=16",
    "--set",
    "eval_images=4",
    "--set",
    "train.warmup_steps=0",
    "--set",
    "train.log_every=1",
    "--set",
    "train.ckpt_every=1",
    "--set",
    'train.lr_decay="cosine"',
]


def _noise(folder: Path, seed: int, n: int = 12) -> Path:
    """3 labelled classes of noise images: n in train (2 shards), 4 in val."""
    rng = np.random.default_rng(seed)

    def samples(k: int, prefix: str) -> list[Sample]:
        return [
            Sample(
                key=f"{prefix}{i:03d}",
                caption=f"noise {seed} {i}",
                meta={"label": i % 3},
                image=Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)),
            )
            for i in range(k)
        ]

    write_split(folder, "train", samples(n, "t"), maxcount=(n + 1) // 2)
    write_split(folder, "val", samples(4, "v"))
    write_info(folder, source="test", resolution=16, splits={"train": n, "val": 4}, classes=["a", "b", "c"])
    return folder


@pytest.fixture()
def noisy(tmp_path) -> Path:
    return _noise(tmp_path / "noisy", 0)


def _clf(data: Path, run: Path, steps: int, *extra: str) -> dict:
    return classifier_stage.main(["--data", str(data), "--out", str(run), "--steps", str(steps), *CLF, *extra])


def _refused(main, argv: list[str], capsys, monkeypatch) -> str:
    """Run a stage's main, expect exit code 2 and one line on stderr; return it."""
    monkeypatch.delenv("LATENTDIFF_DEBUG", raising=False)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2, err
    assert len(err.splitlines()) == 1, err
    return err


def _files(run: Path) -> dict[str, bytes]:
    """Every file of a run but its lock (what a refused command must leave as it was)."""
    return {
        str(p.relative_to(run)): p.read_bytes()
        for p in sorted(run.rglob("*"))
        if p.is_file() and not p.name.startswith("run.lock") and p.parent.name != "pins"
    }


def _logged_lrs(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [row["lr"] for row in rows if "lr" in row]


# ---------------------------------------------------------------- other data on resume (case 1 and 6)


def test_resuming_on_other_data_needs_new_data_and_then_records_the_change(noisy, tmp_path, capsys, monkeypatch):
    other = _noise(tmp_path / "other", 1, n=16)
    run = tmp_path / "run"
    _clf(noisy, run, 2)
    before = _files(run)
    err = _refused(
        classifier_stage.main, ["--resume", str(run), "--data", str(other), "--steps", "3"], capsys, monkeypatch
    )
    assert "--new-data" in err and str(other) in err and "step 2" in err
    assert _files(run) == before  # refused before anything was written

    summary = classifier_stage.main(["--resume", str(run), "--data", str(other), "--steps", "3", "--new-data"])
    assert summary["steps"] == 3
    assert "new data" in capsys.readouterr().out
    meta = ckpt.read_meta(run)
    assert meta["data"]["path"] == str(other.resolve())
    (change,) = meta["data_changes"]
    assert change["until_step"] == 2 and change["data"]["path"] == str(noisy.resolve())
    # The same data at another place (moved, same files) is the same data.
    moved = tmp_path / "moved"
    shutil.move(str(other), moved)
    assert classifier_stage.main(["--resume", str(run), "--data", str(moved), "--steps", "4"])["steps"] == 4


def test_the_autoencoder_says_its_latent_scale_would_be_re_measured(ae_run, data, tmp_path, capsys, monkeypatch):
    run = tmp_path / "ae"
    shutil.copytree(ae_run[0], run)
    other = tmp_path / "other"
    shapes.build(other, 16, val_n=4, test_n=2, seed=5, resolution=32, maxcount=8)
    before = _files(run)
    err = _refused(ae_stage.main, ["--resume", str(run), "--data", str(other), "--steps", "4"], capsys, monkeypatch)
    assert "--new-data" in err and "latent scale" in err
    assert _files(run) == before


def test_a_dataset_rebuilt_in_place_is_noticed_on_resume(noisy, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    _clf(noisy, run, 2)
    _noise(tmp_path / "rebuilt", 7)  # the same command with another seed, written over the first
    for p in (tmp_path / "rebuilt").iterdir():
        shutil.copy(p, noisy / p.name)
    err = _refused(classifier_stage.main, ["--resume", str(run), "--steps", "3"], capsys, monkeypatch)
    assert "changed" in err and "--new-data" in err
    assert classifier_stage.main(["--resume", str(run), "--steps", "3", "--new-data"])["steps"] == 3


def test_the_latent_cache_is_rebuilt_when_the_data_changed(ae_run, tmp_path, capsys):
    data = tmp_path / "shapes"
    shapes.build(data, 8, val_n=2, test_n=2, seed=0, resolution=32, maxcount=8)
    ae, space = load_autoencoder(ae_run[0])
    rt = Runtime(torch.device("cpu"))
    first = LatentCache.build(ae, str(data), tmp_path / "cache", space.resolution, rt)
    assert LatentCache.build(ae, str(data), tmp_path / "cache", space.resolution, rt).captions == first.captions
    capsys.readouterr()
    shapes.build(tmp_path / "rebuilt", 8, val_n=2, test_n=2, seed=3, resolution=32, maxcount=8)
    for p in (tmp_path / "rebuilt").iterdir():
        shutil.copy(p, data / p.name)
    again = LatentCache.build(ae, str(data), tmp_path / "cache", space.resolution, rt)
    assert "changed" in capsys.readouterr().out
    expected = LatentCache.build(ae, str(tmp_path / "rebuilt"), tmp_path / "cache2", space.resolution, rt)
    assert again.captions == expected.captions != first.captions
    assert torch.equal(again.mean, expected.mean)


# ---------------------------------------------------------------- pinned checkpoints (case 1)


def test_a_checkpoint_a_prior_was_trained_on_is_never_pruned(ae_run, text_run, data, tmp_path, capsys):
    ae = tmp_path / "ae"
    shutil.copytree(ae_run[0], ae)
    trained_on = ckpt.latest(ae).path
    prior = tmp_path / "prior"
    common = ["--data", str(data), "--autoencoder", str(ae), "--text", str(text_run[0])]
    prior_stage.main([*common, "--out", str(prior), "--steps", "1", *PRIOR_ARGS])
    pins = ckpt.pins(ae)
    assert [(p.dependent, p.checkpoint) for p in pins] == [(prior.resolve(), trained_on.name)]

    # The autoencoder trains on past the prior's checkpoint, keeping one checkpoint and saving each step.
    capsys.readouterr()
    ae_stage.main(
        ["--resume", str(ae), "--steps", "6", "--set", "train.ckpt_every=1", "--set", "train.keep_checkpoints=1"]
    )
    assert str(prior.resolve()) in capsys.readouterr().out  # the resume names who reads it
    assert trained_on.is_dir() and ckpt.verify(trained_on).step == 3
    assert ckpt.latest(ae).step == 6

    # The prior resumes and generates with the checkpoint it was trained on, not the autoencoder's newest.
    assert prior_stage.main(["--resume", str(prior), "--steps", "2"])["steps"] == 2
    pipe = TextToImage.from_run(prior, device="cpu")
    assert pipe.latent_space.encoder_hash == ckpt.read_meta(trained_on)["latent_space"]["encoder_hash"]

    # Once the prior is gone, nothing reads that checkpoint: the autoencoder's next save prunes it.
    shutil.rmtree(prior)
    ae_stage.main(["--resume", str(ae), "--steps", "7"])
    assert not trained_on.exists() and ckpt.pins(ae) == []


def _commit(run: Path, step: int) -> Path:
    staging = ckpt.staging_dir(run, step)
    ckpt.write_json(staging / ckpt.META, {"stage": "autoencoder", "step": step})
    return ckpt.commit(run, staging, step, keep=1)


def test_a_pin_moves_with_its_runs_but_a_copy_of_the_source_does_not_inherit_it(tmp_path):
    source, dependent = tmp_path / "a" / "ae", tmp_path / "a" / "prior"
    dependent.mkdir(parents=True)
    read = _commit(source, 1)
    ckpt.pin(ckpt.verify(read), dependent, "prior")
    shutil.copytree(source, tmp_path / "copy")
    assert ckpt.pins(tmp_path / "copy") == []  # the prior never read the copy
    shutil.move(tmp_path / "a", tmp_path / "b")  # the whole tree moved: the pin still holds
    source, dependent = tmp_path / "b" / "ae", tmp_path / "b" / "prior"
    assert [p.dependent for p in ckpt.pins(source)] == [dependent.resolve()]
    _commit(source, 2)
    assert (source / ckpt.CHECKPOINTS / read.name).is_dir()  # keep=1, yet kept
    shutil.rmtree(dependent)
    _commit(source, 3)
    assert not (source / ckpt.CHECKPOINTS / read.name).exists() and ckpt.pins(source) == []


def test_a_checkpoint_folder_loads_as_its_run_at_that_step(ae_run, tmp_path):
    folder = ckpt.latest(ae_run[0]).path
    ae, space = load_autoencoder(folder)
    assert space.encoder_hash == ckpt.read_meta(ae_run[0])["latent_space"]["encoder_hash"]


# ---------------------------------------------------------------- a run still training (case 2)


def test_resume_of_a_run_before_its_first_save_names_the_process_training_it(noisy, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    (run / ckpt.CONFIG).write_text(dumps_toml(to_dict(ClassifierStageConfig())))
    holder = RunLock(run)
    holder.acquire()  # another process started it and has not saved yet
    try:
        err = _refused(classifier_stage.main, ["--resume", str(run)], capsys, monkeypatch)
        assert f"in use by pid {os.getpid()}" in err and "start it again" not in err
        with pytest.raises(ckpt.CheckpointError, match=f"pid {os.getpid()}"):
            ckpt.read_meta(run)  # what a later stage pointed at it says
    finally:
        holder.release()
    with pytest.raises(ckpt.CheckpointError, match="start it again with --out"):
        ckpt.read_meta(run)  # nobody holds it: it stopped before its first save


# ---------------------------------------------------------------- batch larger than the data (case 3)


@pytest.mark.parametrize("stage", ["classifier", "autoencoder", "text", "prior", "decoder"])
def test_a_batch_larger_than_the_dataset_is_refused(stage, data, ae_run, text_run, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    argv = {
        "classifier": (classifier_stage.main, ["--data", str(data), *CLF]),
        "autoencoder": (ae_stage.main, ["--data", str(data), *AE_ARGS]),
        "text": (text_stage.main, ["--data", str(data)]),
        "prior": (prior_stage.main, ["--data", str(data), "--autoencoder", str(ae_run[0]), "--text", str(text_run[0])]),
        "decoder": (decoder_stage.main, ["--data", str(data), "--autoencoder", str(ae_run[0])]),
    }
    main, args = argv[stage]
    train = json.loads((data / "info.json").read_text())["splits"]["train"]
    err = _refused(
        main, [*args, "--out", str(out), "--steps", "1", "--batch-size", str(train + 1)], capsys, monkeypatch
    )
    assert f"--batch-size {train + 1}" in err and f"{train} training" in err
    assert not out.exists()


# ---------------------------------------------------------------- a failed start (case 4)


def test_a_failed_start_removes_what_it_created_and_only_that(data, ae_run, text_run, tmp_path, capsys, monkeypatch):
    # The UNet's text width does not fit the text encoder: found after the run directory was set up.
    bad = [
        "--data",
        str(data),
        "--autoencoder",
        str(ae_run[0]),
        "--text",
        str(text_run[0]),
        "--steps",
        "1",
        *PRIOR_ARGS,
        "--set",
        "model.context_dim=7",
    ]
    new = tmp_path / "new"
    assert "context_dim" in _refused(prior_stage.main, [*bad, "--out", str(new)], capsys, monkeypatch)
    assert not new.exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("kept")
    _refused(prior_stage.main, [*bad, "--out", str(mine)], capsys, monkeypatch)
    assert sorted(os.listdir(mine)) == ["notes.txt"]
    # Nor does the autoencoder or text run keep a pin for a run that never saved.
    for source in (ae_run[0], text_run[0]):
        assert not [p for p in ckpt.pins(source) if p.dependent in (new.resolve(), mine.resolve())]


# ---------------------------------------------------------------- extending a finished run (case 5)


def test_extending_a_finished_cosine_run_follows_the_stated_policy(noisy, tmp_path, capsys):
    run = tmp_path / "run"
    _clf(noisy, run, 4)
    first = _logged_lrs(run)
    assert first[0] == pytest.approx(0.01) and first == sorted(first, reverse=True)
    floor = 0.1 * 0.01  # where a cosine run ends

    runs = {policy: tmp_path / policy for policy in ("continue", "rewarm", "hold")}
    for policy, copy in runs.items():
        shutil.copytree(run, copy)
        capsys.readouterr()
        flags = [] if policy == "continue" else ["--extend-lr", policy]  # continue is the default
        classifier_stage.main(["--resume", str(copy), "--steps", "8", *flags])
        out = capsys.readouterr().out
        lrs = _logged_lrs(copy)[4:]
        assert len(lrs) == 4
        (extension,) = ckpt.read_meta(copy)["lr_extensions"]
        assert extension["policy"] == policy and extension["from_step"] == 4 and extension["steps"] == 8
        assert extension["lr"] == pytest.approx(lrs[0]) and f"{lrs[0]:.3g}" in out and policy in out
    # continue: a new cosine from where the run stopped (the floor) down to the floor: no jump back up.
    assert _logged_lrs(runs["continue"])[4:] == pytest.approx([floor] * 4)
    # rewarm: the peak again, then a new cosine over the extension.
    assert _logged_lrs(runs["rewarm"])[4:] == pytest.approx(first)
    assert _logged_lrs(runs["hold"])[4:] == pytest.approx([floor] * 4)


def test_changing_the_steps_mid_run_decays_from_where_the_run_is(noisy, tmp_path):
    run = tmp_path / "run"
    _clf(noisy, run, 8, "--set", "train.keep_checkpoints=10")
    for folder in ckpt.checkpoint_dirs(run):  # roll the run back to step 4, as if it had been stopped there
        if ckpt.folder_order(folder)[0] > 4:
            shutil.rmtree(folder)
    straight = _logged_lrs(run)[:4]
    classifier_stage.main(["--resume", str(run), "--steps", "12"])
    lrs = _logged_lrs(run)[8:]
    assert len(lrs) == 8 and lrs[0] == pytest.approx(0.01 * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * 4 / 8))))
    assert lrs[0] <= straight[-1] and lrs == sorted(lrs, reverse=True)


def test_a_resume_inside_an_extension_continues_it_exactly(noisy, tmp_path):
    run = tmp_path / "run"
    _clf(noisy, run, 4)
    classifier_stage.main(["--resume", str(run), "--steps", "8", "--extend-lr", "rewarm"])
    straight = {name: ckpt.load_weights(ckpt.committed_file(run, name)) for name in (ckpt.MODEL,)}
    for folder in ckpt.checkpoint_dirs(run):  # killed after step 7's checkpoint
        if ckpt.folder_order(folder)[0] > 7:
            shutil.rmtree(folder)
    assert ckpt.latest(run).step == 7
    classifier_stage.main(["--resume", str(run)])
    resumed = ckpt.load_weights(ckpt.committed_file(run, ckpt.MODEL))
    assert all(torch.equal(resumed[k], v) for k, v in straight[ckpt.MODEL].items())


def test_another_time_budget_on_a_run_that_spent_its_own_is_an_extension(noisy, tmp_path, capsys):
    run = tmp_path / "run"
    _clf(noisy, run, 1000, "--max-minutes", "0.003")
    assert ckpt.load_state(ckpt.committed_file(run, ckpt.STATE))["stopped_by"] == "budget"
    done = ckpt.read_meta(run)["step"]
    capsys.readouterr()
    classifier_stage.main(["--resume", str(run), "--extend-lr", "rewarm"])
    assert "rewarm" in capsys.readouterr().out
    (extension,) = ckpt.read_meta(run)["lr_extensions"]
    assert extension["from_step"] == done and extension["lr"] == pytest.approx(0.01)
    assert _logged_lrs(run)[done] == pytest.approx(0.01, rel=0.02)


def test_a_pause_stops_early_and_a_resume_continues_the_budget_s_schedule(noisy, tmp_path, capsys):
    run = tmp_path / "run"
    # A 10-minute cosine paused after 0.12 s: the lr there is still near the peak (0.01), not the floor (0.001).
    _clf(noisy, run, 100000, "--max-minutes", "10", "--set", "train.pause_minutes=0.002")
    assert ckpt.load_state(ckpt.committed_file(run, ckpt.STATE))["stopped_by"] == "pause"
    assert "paused after 0.002 min" in capsys.readouterr().out
    done = ckpt.read_meta(run)["step"]
    assert 0 < done < 100000 and (run / "summary.json").exists()  # a pause ends the invocation as a success
    # Resumed with the rest of a budget: a new cosine from where the pause left the lr (continue), near the peak,
    # where a run that spent its budget would go on from the floor.
    classifier_stage.main(["--resume", str(run), "--max-minutes", "0.003", "--set", "train.pause_minutes=0"])
    (extension,) = ckpt.read_meta(run)["lr_extensions"]
    assert extension["from_step"] == done and extension["policy"] == "continue"
    assert extension["lr"] > 0.009 and _logged_lrs(run)[done] == pytest.approx(extension["lr"], rel=0.02)
