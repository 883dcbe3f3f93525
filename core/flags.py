"""The flags every `latentdiff train STAGE` takes, and how a resume fills in the ones left out."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import UserError

Reader = Callable[[dict, Path], Any]  # (a run's meta.json, its directory) -> a flag's value
EXTEND_LR = ("continue", "rewarm", "hold")  # --extend-lr: the lr policy of an extended run (core.train.LrSegment)


def add_train_args(
    parser: argparse.ArgumentParser, stage: str, default_preset: str = "tiny", presets: Path | None = None
) -> None:
    """The flags every `latentdiff train STAGE` takes; `presets` is the folder holding presets/*.toml."""
    where = parser.add_argument_group("run (one of --out and --resume is required)")
    target = where.add_mutually_exclusive_group(required=True)
    target.add_argument("--out", metavar="RUN", help="run directory to create (new or empty)")
    target.add_argument("--resume", metavar="RUN", help="continue the run in RUN from its last checkpoint")
    where.add_argument(
        "--data",
        help="dataset directory of shards (from `latentdiff data ...`) or a shard pattern; "
        "required for a new run, read from the run's records on --resume",
    )
    where.add_argument(
        "--new-data",
        action="store_true",
        help="with --resume: train on from the last checkpoint on data other than the run's own (another "
        "--data, or its dataset rebuilt since); without it such a resume is refused",
    )
    where.add_argument(
        "--extend-lr",
        choices=EXTEND_LR,
        help="with --resume past the run's end (more --steps, another --max-minutes) or with a changed "
        "horizon: continue (default) = a new cosine from the lr the run stopped at down to its floor over "
        "the extension; rewarm = warm up again to the peak lr, then a new cosine (a trained model can diverge at its "
        "peak lr again: docs/scenes.md); hold = keep the lr it stopped at",
    )
    names = sorted(p.stem for p in (Path(presets) / "presets").glob("*.toml")) if presets else []
    listed = f"{', '.join(names)}, " if names else ""
    parser.add_argument(
        "--preset",
        default=default_preset,
        help=f"{stage} preset: {listed or 'a name, '}or a .toml file (default: %(default)s)",
    )
    parser.add_argument("--steps", type=int, help="total optimizer steps (train.steps)")
    parser.add_argument("--max-minutes", type=float, help="stop cleanly, evaluate and save after this many minutes")
    parser.add_argument("--batch-size", type=int, help="batch size per process (train.batch_size)")
    parser.add_argument("--lr", type=float, help="peak learning rate (train.lr)")
    parser.add_argument("--seed", type=int, help="random seed (train.seed)")
    parser.add_argument("--num-workers", type=int, help="data-loader workers per process")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config field, e.g. --set train.weight_decay=0.01 (repeatable; "
        "an unknown key is an error that lists the known ones)",
    )
    parser.add_argument(
        "--device",
        help="cpu, cuda, cuda:N or mps (default: the GPU when there is one; cuda is cuda:LOCAL_RANK under torchrun)",
    )
    parser.add_argument(
        "--deterministic",
        action="store_true",
        default=None,
        help="deterministic kernels (train.deterministic): a GPU run repeats and resumes bit for bit, slower",
    )


def cli_overrides(args: argparse.Namespace) -> list[str]:
    flags = {
        "steps": "train.steps",
        "max_minutes": "train.max_minutes",
        "batch_size": "train.batch_size",
        "lr": "train.lr",
        "seed": "train.seed",
        "num_workers": "train.num_workers",
    }
    out = [f"{key}={getattr(args, name)!r}" for name, key in flags.items() if getattr(args, name, None) is not None]
    if getattr(args, "deterministic", None):
        out.append("train.deterministic=true")
    return out + list(args.set)


HINTS = {"data": "make one with `latentdiff data fashion-mnist --out DIR`"}


def fill_from_run(args: argparse.Namespace, meta: dict, run_dir: Path, readers: dict[str, Reader]) -> None:
    """Give each flag the user left out what the run recorded: `readers` maps a flag to (meta, run_dir) -> value.

    The one place a resume reads flags back; the readers (core.runs.recorded_data and the
    stages' own) take only local paths from a run's records.
    """
    for flag, read in readers.items():
        if not getattr(args, flag, None):
            setattr(args, flag, read(meta, run_dir))


def config_changes(old: dict, new: dict, where: str = "") -> list[str]:
    """'key: old -> new' for every config field that differs (nested dicts flattened to dotted keys)."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_changes(a, b, f"{where}{k}.")
        elif a != b:
            out.append(f"{where}{k}: {a} -> {b}")
    return out


def require(args: argparse.Namespace, flags: tuple[str, ...], stage: str) -> None:
    """A one-line error for the first of `flags` that is still missing."""
    for flag in flags:
        if not getattr(args, flag, None):
            hint = f" ({HINTS[flag]})" if flag in HINTS else ""
            raise UserError(f"--{flag.replace('_', '-')} is required for `latentdiff train {stage}`{hint}")
