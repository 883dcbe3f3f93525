"""`make demo`: data -> autoencoder -> text encoder -> prior -> images, on 2 CPU cores in under 15 minutes.

Every step is one of the ordinary commands a user would type (printed before it runs), with
a time budget. A step whose run already finished is skipped and an interrupted one resumes,
so running `make demo` again continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from latentdiff.scripts import cli

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
START = time.monotonic()
# How the grid is drawn: DPM-Solver++(2M), 20 steps, on Karras et al. 2022's levels (sigma 80 down to the
# schedule's sigma(0)), guided only below sigma 5 (the last 11 of the 20 steps; the guidance interval of
# Kynkäänniemi et al. 2024). How this was chosen, and what it measured: docs/demo.md.
SAMPLING = ["--sampler", "dpmpp-2m", "--steps", "20", "--spacing", "karras", "--guidance-interval", "0,5"]
# The grid's guidance scale (the guidance sweep behind it: docs/demo.md).
GUIDANCE = "2"


def clock() -> str:
    """Minutes:seconds since the demo started, as every step's header shows it."""
    seconds = int(time.monotonic() - START)
    return f"{seconds // 60}:{seconds % 60:02d}"


def say(text: str) -> None:
    print(f"\n==> [{clock()}] {text}", flush=True)


class Timings:
    """Wall-clock seconds of each step of this invocation, printed at the end and kept in OUT/timings.json."""

    def __init__(self, out: Path):
        self.path = out / "timings.json"
        self.steps: dict[str, float] = {}
        self.last = time.monotonic()

    def done(self, step: str) -> None:
        now = time.monotonic()
        self.steps[step] = round(now - self.last, 1)
        self.last = now

    def write(self) -> None:
        total = round(time.monotonic() - START, 1)
        self.path.write_text(json.dumps({"steps": self.steps, "total": total}, indent=2) + "\n")
        parts = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in self.steps.items())
        print(f"time: {parts}; {total / 60:.1f} min in all (set-up not included; {self.path})")


def run(words: list[str]) -> None:
    print("$ latentdiff " + " ".join(shlex.quote(w) for w in words), flush=True)
    code = cli.main(words)
    if code:
        raise SystemExit(code)


def fashion_mnist_available() -> bool:
    """The IDX files are there, or can be installed now with apt-get (as root)."""
    if any(FASHION_MNIST.glob("train-images-idx3-ubyte*")):
        return True
    if shutil.which("apt-get") and os.geteuid() == 0:
        say("installing Fashion-MNIST: apt-get install -y dataset-fashion-mnist")
        ok = subprocess.run(["apt-get", "install", "-y", "-q", "dataset-fashion-mnist"]).returncode == 0
        if not ok:
            ok = (
                subprocess.run(["apt-get", "update", "-q"]).returncode == 0
                and subprocess.run(["apt-get", "install", "-y", "-q", "dataset-fashion-mnist"]).returncode == 0
            )
        return ok and any(FASHION_MNIST.glob("train-images-idx3-ubyte*"))
    return False


def prepare_data(out: Path) -> Path:
    data = out / "data"
    if (data / "info.json").exists():
        say(f"data: reusing {data}")
        return data
    if fashion_mnist_available():
        say("data: Fashion-MNIST (real photos of 10 kinds of clothing) -> webdataset shards")
        run(["data", "fashion-mnist", "--out", str(data)])
    else:
        say(
            "data: Fashion-MNIST is not installed and could not be (apt-get install -y dataset-fashion-mnist); "
            "using procedural shapes instead"
        )
        run(["data", "shapes", "--out", str(data), "--n", "20000", "--seed", "0"])
    return data


def train(stage: str, run_dir: Path, minutes: float, extra: list[str]) -> None:
    if (run_dir / "summary.json").exists():
        say(f"{stage}: already trained in {run_dir}")
        return
    if (run_dir / "meta.json").exists():
        say(f"{stage}: resuming the interrupted run in {run_dir}")
        run(["train", stage, "--resume", str(run_dir), "--max-minutes", str(minutes)])
        return
    say(f"{stage}: training for at most {minutes:g} minutes")
    run(["train", stage, "--out", str(run_dir), "--preset", "tiny", "--max-minutes", str(minutes), *extra])


def class_prompts(data: Path) -> list[str]:
    from latentdiff.data.captions import class_prompt

    info = json.loads((data / "info.json").read_text())
    if info.get("classes") and info.get("source") == "fashion-mnist":
        return [class_prompt(c) for c in info["classes"]]
    return [
        "a large red circle on the left",
        "a small blue square on the right",
        "a large green triangle in the center",
        "a small yellow cross on the left",
        "a large white circle on the right",
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m latentdiff.scripts.demo", description=__doc__)
    p.add_argument("--out", default="runs/demo", help="where the demo writes everything (default: %(default)s)")
    p.add_argument(
        "--minutes",
        type=float,
        nargs=3,
        default=[3.0, 1.5, 7.0],
        metavar=("AE", "TEXT", "PRIOR"),
        help="time budget per stage; how the split was chosen: docs/demo.md (default: %(default)s)",
    )
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    timings = Timings(out)
    data = prepare_data(out)
    timings.done("data")
    ae_min, text_min, prior_min = args.minutes
    train("autoencoder", out / "autoencoder", ae_min, ["--data", str(data)])
    timings.done("autoencoder")
    train("text", out / "text", text_min, ["--data", str(data)])
    timings.done("text")
    train(
        "prior",
        out / "prior",
        prior_min,
        [
            "--data",
            str(data),
            "--autoencoder",
            str(out / "autoencoder"),
            "--text",
            str(out / "text"),
        ],
    )
    timings.done("prior")
    say(f"generating 8 images for every prompt (DPM-Solver++(2M), 20 Karras steps, guidance {GUIDANCE} below sigma 5)")
    prompts = class_prompts(data)
    run(
        [
            "generate",
            *prompts,
            "--run",
            str(out / "prior"),
            "--n",
            "8",
            *SAMPLING,
            "--guidance",
            GUIDANCE,
            "--seed",
            "0",
            "--out",
            str(out / "samples"),
        ]
    )
    timings.done("generate")
    say(f"done. One row per prompt: {out / 'samples' / 'grid.png'}")
    timings.write()
    print(
        "Make more with, for example:\n"
        f'  .venv/bin/latentdiff generate "{prompts[0]}" --run {out / "prior"} --n 16 '
        f"{' '.join(SAMPLING)} --guidance {GUIDANCE} --seed 1 --out outputs/more"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
