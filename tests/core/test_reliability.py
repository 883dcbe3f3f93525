"""Faults a long run meets, on a tiny classifier run: SIGKILL anywhere, a full disk, a corrupt or old checkpoint.

The classifier is the cheapest stage (about 0.1 s a step here). Killed runs are forked from the
test process, which has imported everything already: a fresh interpreter would spend seconds
importing torch for each of the dozen kills.
"""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import shutil
import signal
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from latentdiff.core import checkpoint as ckpt
from latentdiff.core import train as core_train
from latentdiff.core.ema import EMA
from latentdiff.data import reader
from latentdiff.data.shards import Sample, write_info, write_split
from latentdiff.evaluation import classifier_stage
from latentdiff.evaluation.classifier import load_classifier
from tests.helpers import SUBPROCESS_TIMEOUT, run_killed_child  # noqa: E402

STEPS = 10
CLF = [
    "--batch-size",
    "4",
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
    "train.ema_decay=0.9",
    "--set",
    "train.ckpt_every=1",
    "--set",
    "train.log_every=1",
    "--set",
    "train.keep_checkpoints=2",
    "--set",
    'train.lr_decay="constant"',
]
WEIGHTS = (ckpt.MODEL, ckpt.EMA)


@pytest.fixture(scope="module")
def noisy_data(tmp_path_factory) -> Path:
    """3 labelled classes of noise images in 3 shards, with one undecodable image in the middle shard."""
    rng = np.random.default_rng(0)

    def good(n: int, prefix: str) -> list[Sample]:
        return [
            Sample(
                key=f"{prefix}{i:03d}",
                caption=f"noise {i}",
                meta={"label": i % 3},
                image=Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)),
            )
            for i in range(n)
        ]

    data = tmp_path_factory.mktemp("noisy")
    broken = Sample(key="broken", image=b"\x89PNG\r\n\x1a\n not an image", caption="a broken file", meta={"label": 0})
    write_split(data, "train", good(14, "a") + [broken] + good(18, "b"), maxcount=11)
    write_split(data, "val", good(4, "v"))
    write_info(data, source="test", resolution=16, splits={"train": 33, "val": 4}, classes=["a", "b", "c"])
    return data


def _fresh(data: Path, run: Path, *extra: str) -> list[str]:
    return ["--data", str(data), "--out", str(run), "--steps", str(STEPS), *CLF, *extra]


def _weights(run: Path, name: str) -> dict[str, torch.Tensor]:
    return ckpt.load_weights(ckpt.committed_file(run, name))


def _assert_same_weights(a: Path, b: Path) -> None:
    for name in WEIGHTS:
        wa, wb = _weights(a, name), _weights(b, name)
        differ = [k for k in wa if not torch.equal(wa[k], wb[k])]
        assert wa.keys() == wb.keys() and not differ, f"{name}: {differ[:3]} differ"


def _step_folders(run: Path) -> list[str]:
    return sorted(p.name for p in (run / ckpt.CHECKPOINTS).iterdir())


@pytest.fixture(scope="module")
def straight(noisy_data, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("straight") / "run"
    assert classifier_stage.main(_fresh(noisy_data, run))["steps"] == STEPS
    return run


# ---------------------------------------------------------------- the layout


def test_a_checkpoint_is_one_verified_folder_and_only_the_last_k_are_kept(straight):
    # The final save re-saves the last step (with the same weights): it goes to a new folder, the older is dropped.
    assert _step_folders(straight) == [f"step-{STEPS - 1:09d}", f"step-{STEPS:09d}.1"]
    newest = ckpt.latest(straight)
    manifest = json.loads((newest.path / ckpt.MANIFEST).read_text())
    assert manifest["step"] == STEPS and newest.step == STEPS
    assert set(manifest["files"]) == {ckpt.MODEL, ckpt.EMA, ckpt.STATE, ckpt.META, ckpt.CONFIG}
    for name, entry in manifest["files"].items():
        assert entry["bytes"] == (newest.path / name).stat().st_size
        assert entry["sha256"] == ckpt.sha256(newest.path / name)
    # People read the root copies; loaders and resume read the checkpoint.
    assert json.loads((straight / ckpt.META).read_text())["step"] == STEPS
    assert not (straight / ckpt.MODEL).exists() and not (straight / ckpt.STATE).exists()
    assert ckpt.load_state(ckpt.committed_file(straight, ckpt.STATE))["step"] == STEPS


def test_ema_over_integer_buffers_averages_floats_and_copies_counts():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    ema = EMA(model, 0.99, warmup=False)
    for _ in range(3):  # the second update used to raise NotImplementedError (lerp on Long)
        model(torch.randn(2, 3, 8, 8))
        ema.update(model)
    weights = ema.weights()
    assert weights["1.num_batches_tracked"].dtype == torch.int64 and int(weights["1.num_batches_tracked"]) == 3
    # The floats are averaged: not the model's running mean, nor the first one.
    assert not torch.equal(weights["1.running_mean"], model[1].running_mean)


# ---------------------------------------------------------------- kills


def _run_child(argv: list[str], kill_at: int | None, count_file: Path) -> int:
    return run_killed_child(classifier_stage.main, argv, kill_at, count_file)


def test_sigkill_anywhere_then_resume_equals_the_straight_run(noisy_data, straight, tmp_path):
    counted = tmp_path / "count"
    reference = tmp_path / "reference"
    assert _run_child(_fresh(noisy_data, reference), None, counted) == 0
    _assert_same_weights(reference, straight)  # the hooks change nothing by themselves
    total = int(counted.read_text())

    rng = np.random.default_rng(12)
    run, kills, attempts = tmp_path / "killed", [], 0
    while True:
        argv = ["--resume", str(run)] if ckpt.has_checkpoint(run) else _fresh(noisy_data, run)
        kill_at = int(rng.integers(1, total // 8)) if len(kills) < 14 else None
        code = _run_child(argv, kill_at, counted)
        attempts += 1
        if code == 0:
            break
        assert code == -signal.SIGKILL, f"attempt {attempts} ({argv[:2]}, kill at event {kill_at}) exited {code}"
        kills.append(kill_at)
        assert attempts < 40
    assert len(kills) >= 10, f"only {len(kills)} kills (at events {kills} of {total}) before the run finished"
    _assert_same_weights(run, straight)
    # Nothing half-written is left, and only the last K checkpoints.
    assert not [p for p in run.rglob("*") if p.name.startswith(".")], list(run.rglob(".*"))
    assert len(ckpt.checkpoint_dirs(run)) == 2


# ---------------------------------------------------------------- a full disk


def test_disk_full_on_the_second_file_keeps_the_previous_checkpoint(
    noisy_data, straight, tmp_path, monkeypatch, capsys
):
    run = tmp_path / "full"
    real_atomic = ckpt.atomic_write
    written = []

    def atomic_write(path, write):
        if Path(path).parent.name == f".staging-{4:09d}":  # the save of step 4
            written.append(path)
            if len(written) == 2:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real_atomic(path, write)

    monkeypatch.setattr(ckpt, "atomic_write", atomic_write)
    monkeypatch.delenv("LATENTDIFF_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exc:
        classifier_stage.main(_fresh(noisy_data, run))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "step 4" in err and "No space left on device" in err and f"--resume {run}" in err
    monkeypatch.setattr(ckpt, "atomic_write", real_atomic)
    # Steps 1-3 are committed, the failed save left nothing, and step 3 loads.
    assert ckpt.latest(run).step == 3 and not list((run / ckpt.CHECKPOINTS).glob(".*"))
    assert json.loads((run / ckpt.META).read_text())["step"] == 3
    assert load_classifier(run).meta["step"] == 3
    assert classifier_stage.main(["--resume", str(run)])["steps"] == STEPS
    _assert_same_weights(run, straight)


# ---------------------------------------------------------------- corrupt and old checkpoints


def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(noisy_data, straight, tmp_path, capsys):
    run = tmp_path / "corrupt"
    classifier_stage.main(_fresh(noisy_data, run, "--steps", "6"))
    newest = ckpt.latest(run)
    assert newest.step == 6
    weights = newest.file(ckpt.MODEL)
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the last tensor: the size is right, the hash is not
    weights.write_bytes(bytes(data))
    capsys.readouterr()
    assert load_classifier(run).meta["step"] == 5  # the loader falls back too...
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "step 5" in err[0] and newest.path.name in err[0] and "sha256" in err[0]
    # ...and a resume continues from step 5, sets the bad folder aside, and ends where a straight run ends.
    (run / ckpt.CHECKPOINTS / ".staging-000000007").mkdir()  # what a killed save leaves
    (run / ckpt.CHECKPOINTS / ".staging-000000007" / "state.pt").write_bytes(b"half")
    (run / f".{ckpt.META}.x1y2{'.tmp'}").write_text("{")
    assert classifier_stage.main(["--resume", str(run), "--steps", str(STEPS)])["steps"] == STEPS
    err = capsys.readouterr().err
    assert f"rejected-{newest.path.name}" in err and "using step 5" in err
    assert (run / ckpt.CHECKPOINTS / f"rejected-{newest.path.name}").is_dir()
    assert not [p for p in run.rglob("*") if p.name.startswith(".")]
    _assert_same_weights(run, straight)


def test_every_checkpoint_corrupt_is_a_clear_error(noisy_data, tmp_path, capsys, monkeypatch):
    run = tmp_path / "bad"
    classifier_stage.main(_fresh(noisy_data, run, "--steps", "1"))
    for folder in ckpt.checkpoint_dirs(run):
        (folder / ckpt.STATE).unlink()
    monkeypatch.delenv("LATENTDIFF_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exc:
        classifier_stage.main(["--resume", str(run), "--steps", "2"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "no complete checkpoint" in err and "state.pt is missing" in err


def test_a_run_killed_before_its_first_save_says_to_start_again(noisy_data, tmp_path, capsys, monkeypatch):
    run = tmp_path / "early"
    # Events 1-3 write config.toml; event 4 is in step 1.
    assert _run_child(_fresh(noisy_data, run), 4, tmp_path / "count") == -signal.SIGKILL
    assert (run / ckpt.CONFIG).is_file() and not ckpt.has_checkpoint(run)
    monkeypatch.delenv("LATENTDIFF_DEBUG", raising=False)
    with pytest.raises(SystemExit):
        classifier_stage.main(["--resume", str(run)])
    assert "no checkpoint yet" in capsys.readouterr().err
    assert classifier_stage.main(_fresh(noisy_data, run, "--steps", "1"))["steps"] == 1


def test_keeping_no_checkpoint_is_refused_before_training(noisy_data, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("LATENTDIFF_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exc:
        classifier_stage.main(_fresh(noisy_data, tmp_path / "none", "--set", "train.keep_checkpoints=0"))
    assert exc.value.code == 2 and "keep_checkpoints" in capsys.readouterr().err
    assert not ckpt.has_checkpoint(tmp_path / "none")


def test_a_format_1_run_loads_and_resumes(noisy_data, straight, tmp_path):
    """Runs written before checkpoints/ kept flat files in the run directory; they still load and resume."""
    run = tmp_path / "v1"
    classifier_stage.main(_fresh(noisy_data, run, "--steps", "4"))
    newest = ckpt.latest(run)
    for name in newest.files:
        shutil.copy2(newest.file(name), run / name)
    shutil.rmtree(run / ckpt.CHECKPOINTS)
    meta = json.loads((run / ckpt.META).read_text())
    (run / ckpt.META).write_text(json.dumps({**meta, "format_version": 1}))
    assert ckpt.committed_file(run, ckpt.MODEL) == run / ckpt.MODEL
    assert load_classifier(run).meta["step"] == 4
    assert classifier_stage.main(["--resume", str(run), "--steps", str(STEPS)])["steps"] == STEPS
    _assert_same_weights(run, straight)
    # Resuming converted it: the newest checkpoint is a folder, the stale flat weights are gone.
    assert ckpt.latest(run).step == STEPS and not (run / ckpt.MODEL).exists() and not (run / ckpt.STATE).exists()
    assert json.loads((run / ckpt.META).read_text())["format_version"] == ckpt.FORMAT_VERSION


# ---------------------------------------------------------------- resume without decoding


def test_a_resume_with_no_step_left_keeps_the_data_positions(noisy_data, tmp_path):
    run = tmp_path / "done"
    classifier_stage.main(_fresh(noisy_data, run, "--steps", "3"))
    before = ckpt.load_state(ckpt.committed_file(run, ckpt.STATE))["data_position"]
    classifier_stage.main(["--resume", str(run), "--steps", "3"])  # nothing to train, saved again
    assert ckpt.latest(run).path.name == f"step-{3:09d}.2"
    assert before["at"] and ckpt.load_state(ckpt.committed_file(run, ckpt.STATE))["data_position"] == before


def _batches_of(run_obj, loader, start: int, n: int) -> list[dict]:
    it = run_obj.batches(loader, start)
    return [next(it) for _ in range(n)]


def _fake_run(tmp_path: Path) -> core_train.Run:
    class Train:
        max_minutes = 0

    class Config:
        train = Train()

    from latentdiff.core.runtime import Runtime

    return core_train.Run(tmp_path, "test", Config(), Runtime(torch.device("cpu")), resuming=True)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_restarts_each_worker_where_it_stopped(noisy_data, tmp_path, workers, monkeypatch):
    """Batches after a resume at step 5 are the straight run's, across an epoch and the broken sample."""
    loader = reader.make_loader(
        str(noisy_data), "train", 4, seed=3, num_workers=workers, shuffle_buffer=8, rank=0, world_size=1
    )
    first = _fake_run(tmp_path)
    straight = _batches_of(first, loader, 0, 12)  # 1.5 epochs of 8 batches
    first = _fake_run(tmp_path)
    _batches_of(first, loader, 0, 5)
    saved = first._data_state()
    assert saved["workers"] == max(1, workers) and saved["at"]

    decoded = []
    real_decode = reader._decode
    monkeypatch.setattr(reader, "_decode", lambda raw, *a: decoded.append(raw["__key__"]) or real_decode(raw, *a))
    resumed = _fake_run(tmp_path)
    resumed._data_position = saved
    again = _batches_of(resumed, loader, 5, 7)
    for a, b in zip(straight[5:], again):
        assert a["key"] == b["key"] and torch.equal(a["image"], b["image"])
    if workers == 0:  # decoding happens in this process: only the 7 batches asked for were decoded
        assert len(decoded) == sum(len(b["key"]) for b in again) + sum(b["skipped"] for b in again)


def _rank(argv: list[str], rank: int, port: int) -> None:
    os.environ.update(
        {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    )
    classifier_stage.main(argv)


def _two_processes(argv: list[str]) -> None:
    """What `torchrun --nproc_per_node=2` runs, as two forks of this process (torchrun would import torch thrice)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ranks = [multiprocessing.get_context("fork").Process(target=_rank, args=(argv, r, port)) for r in range(2)]
    for p in ranks:
        p.start()
    for p in ranks:
        p.join(timeout=SUBPROCESS_TIMEOUT)
    assert [p.exitcode for p in ranks] == [0, 0], f"{argv}: exit codes {[p.exitcode for p in ranks]}"


def test_two_processes_resume_from_the_same_fallback_checkpoint(noisy_data, tmp_path, capfd):
    """The main rank verifies and picks the checkpoint; rank 1 reads its RNG and data position from the same one."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    _two_processes(_fresh(noisy_data, straight, "--steps", "5"))
    _two_processes(_fresh(noisy_data, split, "--steps", "3"))
    newest = ckpt.latest(split)
    assert (newest.path / "rng_rank1.pt").is_file() and "rng_rank1.pt" in newest.files
    newest.file(ckpt.STATE).write_bytes(b"torn")
    capfd.readouterr()
    _two_processes(["--resume", str(split), "--steps", "5"])
    assert "using step 2" in capfd.readouterr().err
    _assert_same_weights(split, straight)
