"""Teach a shapes prior a colour it never saw, with LoRA and with full fine-tuning at the same budget (#26).

    python -m bench.lora_concept                      # the measure docs/finetuning.md reports (~35 min, 2 CPU cores)
    python -m bench.lora_concept --scale toy          # every step at toy budgets (what tests/bench runs)

1. Data: shapes at 32 px with --holdout purple (no purple shape in train; val and test keep them), and a second
   shapes set with every colour for the classifier that scores prompts and for the autoencoder.
2. Stages: autoencoder (all colours: the latent space is not what is taught), text encoder and prior on the
   held-out set, so "purple" is a word neither the text encoder nor the prior learned; the classifier.
3. A user's folder: a few hundred images whose shapes are all purple (made with the shapes source, from its val
   split), each beside a same-named .txt caption, made into a dataset with `latentdiff data folder`.
4. Fine-tune the prior on that folder: LoRA (`--init PRIOR --set lora.rank=R`) and full (`--init PRIOR`), each for
   the same wall-clock budget (LoRA: rank 8, alpha 8, lora.lr 1e-3; full: lr 3e-4, a tenth of the tiny preset's).
5. `latentdiff evaluate --classifier CLS --prompts captions` on two prompt sets from the shapes test split: prompts
   whose first shape is purple, and the others; before (the prior), after LoRA, after full fine-tuning.
Prints Markdown tables (on each set: the prompt accuracy, every attribute of the first shape right, and the colour
head's accuracy alone; the files' sizes) and writes them as JSON under --out.
"""

from __future__ import annotations

import json
import shlex
import time
from pathlib import Path

from latentdiff.data import shapes
from latentdiff.data.shards import write_info, write_split
from latentdiff.scripts import cli

from .common import OUT, parser

COLOUR = "purple"
# Budgets (minutes of training per stage, images, evaluation prompts): "full" is the measure, "toy" a smoke run.
SCALES = {
    "full": dict(n=4000, n_cls=4000, folder=300, eval_n=200, ae=4.0, text=3.0, prior=10.0, cls=2.0, tune=4.0, steps=20),
    "toy": dict(n=64, n_cls=64, folder=24, eval_n=8, ae=0.05, text=0.05, prior=0.1, cls=0.05, tune=0.1, steps=2),
}


def run(words: list[str]) -> dict | int:
    print("$ latentdiff " + shlex.join(words), flush=True)
    return cli.main(words)


def train(stage: str, out: Path, data: Path, minutes: float, *extra: str) -> None:
    if (out / "summary.json").exists():
        return  # trained by an earlier invocation: reuse
    run(["train", stage, "--data", str(data), "--out", str(out), "--max-minutes", f"{minutes:g}", *extra])


def first_shape_colour(sample) -> str:
    return sample.meta["shapes"][0]["color"]


def prompt_sets(out: Path, n: int, seed: int) -> dict[str, Path]:
    """Two shapes datasets whose test splits are prompts with the first shape purple, and the others."""
    sets = {"purple": out / "eval_purple", "other": out / "eval_other"}
    if all((d / "info.json").exists() for d in sets.values()):
        return sets
    wanted = {"purple": [], "other": []}
    for sample in shapes.generate_shapes(60 * n, seed=seed + 7, split="test"):
        key = "purple" if first_shape_colour(sample) == COLOUR else "other"
        if len(wanted[key]) < n:
            wanted[key].append(sample)
        if all(len(v) == n for v in wanted.values()):
            break
    for key, folder in sets.items():
        count = write_split(folder, "test", wanted[key])
        write_info(folder, source="shapes", resolution=32, splits={"train": 0, "val": 0, "test": count},
                   classes=list(shapes.SHAPES), attributes=shapes.vocabularies(), holdout=[], seed=seed)  # fmt: skip
    return sets


def user_folder(out: Path, n: int, seed: int, replay: int = 0) -> Path:
    """n images whose every shape is purple, as a user's folder (PNG + .txt), then `latentdiff data folder`.

    replay: as many images again of what the prior already draws (shapes without purple, with their captions)
    in the same folder: fine-tuning on the new concept alone teaches the prior to draw it everywhere; mixing in
    the old data is the usual remedy (DreamBooth's prior preservation, Ruiz et al. 2023, uses the model's own
    samples; here they are real images of the old colours).
    """
    suffix = f"_replay{replay}" if replay else ""
    folder, dataset = out / f"purple_folder{suffix}", out / f"purple_data{suffix}"
    if (dataset / "info.json").exists():
        return dataset
    folder.mkdir(parents=True, exist_ok=True)
    kept = old = 0
    for sample in shapes.generate_shapes(200 * (n + replay), seed=seed + 3, split="val"):
        colours = [s["color"] for s in sample.meta["shapes"]]
        if all(c == COLOUR for c in colours) and kept < n:
            name, kept = f"{kept:05d}", kept + 1
        elif COLOUR not in colours and old < replay:
            name, old = f"old{old:05d}", old + 1
        else:
            continue
        sample.image.save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(sample.caption)
        if kept == n and old == replay:
            break
    run(["data", "folder", str(folder), "--out", str(dataset), "--resolution", "32", "--quiet",
         "--val-fraction", "0.05", "--test-fraction", "0.05"])  # fmt: skip
    return dataset


def accuracy(out: Path, run_dir: Path, data: Path, classifier: Path, n: int, steps: int, *extra: str) -> dict:
    """{"all": prompt accuracy (every attribute right), "color": the colour head's alone}, from `evaluate`."""
    report = out / "report.json"
    if not report.exists():
        run(["evaluate", "--run", str(run_dir), "--data", str(data), "--classifier", str(classifier),
             "--prompts", "captions", "--n", str(n), "--steps", str(steps), "--guidance", "3", "--seed", "0",
             "--out", str(out), *extra])  # fmt: skip
    row = json.loads(report.read_text())["results"][0]
    return {"all": row["prompt_accuracy"], "color": row.get("prompt_accuracy_color", row["prompt_accuracy"])}


def main(argv: list[str] | None = None) -> dict:
    p = parser("lora_concept", __doc__)
    p.add_argument("--scale", choices=list(SCALES), default="full")
    p.add_argument("--work", type=Path, help="folder for datasets and runs (default: runs/bench/lora_concept_SCALE)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (lora.rank)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--replay",
        type=int,
        default=0,
        help="also put this many images of the old colours in the user's folder (see user_folder; default 0)",
    )
    args = p.parse_args(argv)
    s = SCALES[args.scale]
    work = args.work or OUT / f"lora_concept_{args.scale}"
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()

    held, every = work / "shapes_holdout", work / "shapes_all"
    if not (held / "info.json").exists():
        run(["data", "shapes", "--out", str(held), "--n", str(s["n"]), "--holdout", COLOUR, "--seed", str(args.seed),
             "--quiet"])  # fmt: skip
    if not (every / "info.json").exists():
        run(["data", "shapes", "--out", str(every), "--n", str(s["n_cls"]), "--seed", str(args.seed + 1), "--quiet"])
    batch = ["--batch-size", "8"] if args.scale == "toy" else []
    train("autoencoder", work / "ae", every, s["ae"], *batch)
    train("text", work / "text", held, s["text"], *batch)
    train("classifier", work / "classifier", every, s["cls"], *batch)
    prior = work / "prior"
    train("prior", prior, held, s["prior"], "--autoencoder", str(work / "ae"), "--text", str(work / "text"), *batch)

    sets = prompt_sets(work, s["eval_n"], args.seed)
    replay = round(args.replay * s["folder"] / SCALES["full"]["folder"]) if args.scale == "toy" else args.replay
    purple_data = user_folder(work, s["folder"], args.seed, replay)
    tune = ["--set", "sampling.per_prompt=1", *batch]
    suffix = f"_replay{replay}" if replay else ""
    lora, full = work / f"lora{suffix}", work / f"full{suffix}"
    train("prior", lora, purple_data, s["tune"], "--init", str(prior), "--set", f"lora.rank={args.rank}",
          "--set", f"lora.alpha={args.rank}", "--set", "lora.lr=1e-3", *tune)  # fmt: skip
    train("prior", full, purple_data, s["tune"], "--init", str(prior), "--lr", "3e-4", *tune)

    rows = []
    for name, run_dir in (("before (the prior)", prior), ("LoRA", lora), ("full fine-tune", full)):
        tag = run_dir.name
        row = {"model": name}
        for key, data in sets.items():
            row[key] = accuracy(work / f"eval_{tag}_{key}", run_dir, data, work / "classifier", s["eval_n"], s["steps"])
        rows.append(row)
    sizes = {
        "LoRA file": (lora / "lora.safetensors").stat().st_size,
        "full fine-tune UNet (EMA or model)": max(
            f.stat().st_size for f in full.rglob("*.safetensors") if f.name in ("ema.safetensors", "model.safetensors")
        ),
    }
    minutes = (time.monotonic() - t0) / 60
    print(
        f"\n| model | {COLOUR} prompts: colour right | {COLOUR} prompts: all right | other prompts: colour right "
        "| other prompts: all right |\n|---|---|---|---|---|"
    )
    for row in rows:
        p, o = row["purple"], row["other"]
        print(f"| {row['model']} | {p['color']:.1%} | {p['all']:.1%} | {o['color']:.1%} | {o['all']:.1%} |")
    print("\n| file | bytes |\n|---|---|")
    for name, size in sizes.items():
        print(f"| {name} | {size:,} |")
    result = {"scale": args.scale, "budgets": s, "rank": args.rank, "replay": replay, "rows": rows, "sizes": sizes}
    result["minutes"] = minutes
    out = Path(args.out) if args.out else OUT / f"lora_concept_{args.scale}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"\n{minutes:.1f} min in all; written to {out}")
    return result


if __name__ == "__main__":
    main()
