"""Demo presets raced: train the demo's prior under each set of overrides and score it the way the demo is judged.

Each trial is `latentdiff train prior` on the demo's data, autoencoder and text runs with the tiny
preset plus the trial's own flags (its steps included), then `latentdiff evaluate`: n images per
guidance value from the class prompts, DPM-Solver++(2M) with 20 steps, FID in the classifier's
features and prompt accuracy by that classifier. One row per trial and guidance value; the
figure of merit is the lowest FID among the guidance values with prompt accuracy >= 90%.

A race compares presets at one wall-clock budget on the machine the demo runs on. Steps are what
a trial is given, so fit them to that budget from each preset's seconds per step measured there
(`python -m bench.model_step` or a short `--steps` run): a trial may then be trained anywhere,
a GPU included, with `--set train.precision=fp32` to keep the CPU's arithmetic.

    python -m bench.demo_races --trial "base: --steps 480" \\
        --trial "cosine: --steps 480 --set train.lr_decay=cosine" --common "--set train.precision=fp32"

Results are written after every trial (JSON under --out); --resume skips trials already scored, and a
trial whose run finished training (RUN/summary.json) is scored without training it again.
"""

from __future__ import annotations

import json
import shlex
import time
from pathlib import Path

from latentdiff.scripts import cli

from .common import DEMO, OUT, parser, report, table

GOAL_ACCURACY = 0.90  # the demo's goal: >= 90% prompt accuracy at FID <= 4.0 (docs/demo.md)


def parse_trial(text: str) -> tuple[str, list[str]]:
    """'NAME: FLAGS...' -> (NAME, [flags]); a one-line error for anything else."""
    name, sep, flags = text.partition(":")
    name = name.strip()
    if not sep or not name or not name.replace("-", "").replace("_", "").isalnum():
        raise SystemExit(f"--trial {text!r}: expected 'NAME: FLAGS' with NAME in letters, digits, - and _")
    return name, shlex.split(flags)


def run(words: list[str]) -> None:
    print("$ latentdiff " + shlex.join(words), flush=True)
    code = cli.main(words)
    if code:
        raise SystemExit(f"demo_races: `latentdiff {shlex.join(words)}` exited {code}")


def best(rows: list[dict]) -> dict | None:
    """The lowest-FID row among those at the goal's prompt accuracy, if any."""
    ok = [r for r in rows if r["prompt_accuracy"] >= GOAL_ACCURACY]
    return min(ok, key=lambda r: r["fid"]) if ok else None


def main(argv: list[str] | None = None) -> None:
    p = parser("demo_races", __doc__)
    p.add_argument("--trial", action="append", required=True, metavar="'NAME: FLAGS'", help="one trial (repeatable)")
    p.add_argument("--common", default="", help="flags every trial's `train prior` gets (before its own)")
    p.add_argument(
        "--eval",
        default="",
        help="flags every trial's `evaluate` gets, e.g. '--guidance-interval 0.56,10.8' (default: none)",
    )
    p.add_argument("--data", default=str(DEMO / "data"))
    p.add_argument("--autoencoder", default=str(DEMO / "autoencoder"))
    p.add_argument("--text", default=str(DEMO / "text"))
    p.add_argument("--classifier", default="runs/classifier", help="classifier run for FID features and accuracy")
    p.add_argument("--runs", default=str(OUT / "races"), help="where the trials' runs go (default: %(default)s)")
    p.add_argument("--n", type=int, default=2000, help="images per guidance value (default: %(default)s)")
    p.add_argument("--guidance", default="2,3,4,5", help="guidance values (default: %(default)s)")
    p.add_argument("--eval-precision", default="fp32", choices=["auto", "fp32", "bf16"])
    p.add_argument("--resume", action="store_true", help="keep trials already scored in --out")
    args = p.parse_args(argv)

    trials = [parse_trial(t) for t in args.trial]
    out = Path(args.out) if args.out else OUT / "demo_races.json"
    done: dict[str, dict] = {}
    if args.resume and out.exists():
        done = {t["name"]: t for t in json.loads(out.read_text())["figures"]["trials"]}
    results = []
    for name, flags in trials:
        if name in done:
            results.append(done[name])
            continue
        run_dir = Path(args.runs) / name
        common = shlex.split(args.common)
        t0, trained = time.monotonic(), False
        if not (run_dir / "summary.json").exists():  # a run that finished training but was not scored is kept
            run(
                ["train", "prior", "--out", str(run_dir), "--preset", "tiny", "--data", args.data]
                + ["--autoencoder", args.autoencoder, "--text", args.text, *common, *flags]
            )
            trained = True
        train_s = time.monotonic() - t0 if trained else None
        summary = json.loads((run_dir / "summary.json").read_text())
        run(
            ["evaluate", "--run", str(run_dir), "--data", args.data, "--n", str(args.n)]
            + ["--features", f"classifier:{args.classifier}", "--sampler", "dpmpp-2m", "--steps", "20"]
            + ["--guidance", args.guidance, "--precision", args.eval_precision, "--out", str(run_dir / "eval")]
            + shlex.split(args.eval)
        )
        rows = json.loads((run_dir / "eval" / "report.json").read_text())["results"]
        rows = [{k: r[k] for k in ("guidance", "prompt_accuracy", "fid", "fid_floor")} for r in rows]
        results.append(
            {
                "name": name,
                "flags": shlex.join([*common, *flags]),
                "steps": summary.get("steps"),
                "train_seconds": round(train_s, 1) if train_s is not None else None,  # None: trained earlier
                "rows": rows,
            }
        )
        write(out, args, results)
    write(out, args, results)


def write(out: Path, args, results: list[dict]) -> None:
    guidance = [float(g) for g in args.guidance.split(",")]
    columns = ["trial", "steps", *[f"w={g:g}: acc / FID" for g in guidance], "best FID at >= 90%"]
    lines = []
    for t in results:
        by_w = {r["guidance"]: r for r in t["rows"]}
        cells = [f"{by_w[g]['prompt_accuracy']:.1%} / {by_w[g]['fid']:.2f}" if g in by_w else "" for g in guidance]
        b = best(t["rows"])
        lines.append([t["name"], t["steps"], *cells, f"{b['fid']:.2f} (w={b['guidance']:g})" if b else "none"])
    floors = [r.get("fid_floor") for t in results for r in t["rows"] if r.get("fid_floor") is not None]
    floor = f"{floors[0]:.2f}" if floors else "n/a"
    flags = "\n".join(f"- {t['name']}: `{t['flags']}`" for t in results)
    text = table(columns, lines) + (
        f"\n\n{args.n} images per guidance value, DPM-Solver++(2M) 20 steps{' ' + args.eval if args.eval else ''}, "
        f"FID in classifier:{args.classifier}"
        f" features (floor {floor}: {args.n} held-out real images)."
        f"\nFlags of each trial's `latentdiff train prior` (tiny preset):\n{flags}"
    )
    report("demo_races", "Demo presets raced", text, {"trials": results}, out)


if __name__ == "__main__":
    main()
