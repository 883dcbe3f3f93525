"""Samplers: FID and prompt accuracy against the number of network evaluations, on the demo model.

For each sampler (names and aliases of the registry, prior/samplers.py) and each budget of network evaluations
(NFE; one guided evaluation is one pass over the conditional and unconditional halves), n
images are generated from the class prompts with the same seed, so the same starting noise,
and scored like `latentdiff evaluate` does: FID in the classifier's feature space against the
real test images (beside the floor of a real holdout of the same size) and prompt accuracy by
that classifier. Heun makes 2 evaluations per step but the last, so it gets (NFE + 1) // 2
steps and the table shows the NFE it really made; it refuses budgets below 11 (docs/prior.md). Writes
a plot of FID against NFE.

Its defaults (n = 2000, NFE up to 1000) cost ~13 CPU-hours on 2 cores; `make bench` (`python -m bench`) runs
n = 250 at NFE 5, 10, 20 and 50, and docs/benchmarks.md gives the command of each larger run it quotes.
Results are written after every point; --resume continues a stopped run or adds points to a finished one.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from latentdiff.data.reader import read_info
from latentdiff.evaluation.classifier import load_classifier
from latentdiff.evaluation.features import load_feature_space
from latentdiff.evaluation.fid import StatisticsCache, extract_features, real_reference, score, statistics
from latentdiff.evaluation.images import load_image_set
from latentdiff.evaluation.prompts import evaluation_prompts, prompt_hits
from latentdiff.prior.pipeline import TextToImage
from latentdiff.prior.samplers import KNOWN_AS, check_options, normalise, number_of_evaluations, resolve

from .common import DEMO, OUT, ROOT, device, parser, report, table

# Entries are sampler names or aliases, optionally with a step spacing after a colon (prior/spacing.py).
SAMPLERS = (
    "ddpm",
    "ddim",
    "dpmpp-2m",
    "dpmpp-2m-karras",
    "dpmpp-2m:logsnr",
    "heun",
    "unipc",
    "unipc:logsnr",
    "euler-a",
    "dpmpp-2m-sde",
)


def entry(sampler: str) -> tuple[str, dict]:
    """'dpmpp-2m:logsnr' -> ('dpmpp-2m', {'spacing': 'logsnr'}); a plain name has no options. Checked here."""
    name, _, spacing = sampler.partition(":")
    options = {"spacing": spacing} if spacing else {}
    try:
        check_options(name, options)
    except ValueError as e:
        raise SystemExit(f"--samplers {sampler}: {e}") from None
    return name, options


def title(sampler: str) -> str:
    """How tables name a sampler: the front-ends' name for an alias ("DPM++ 2M Karras"), else the registry's
    title; a spacing given after a colon follows in brackets."""
    name, options = entry(sampler)
    known = {normalise(v): k for k, v in KNOWN_AS.items()}
    spec, preset = resolve(name)
    label = known.get(normalise(name), spec.title) if preset else spec.title
    return f"{label} ({options['spacing']})" if options else label


def steps_for(sampler: str, nfe: int) -> int:
    """The most steps whose network evaluations fit in the budget nfe."""
    return resolve(entry(sampler)[0])[0].steps_for(nfe)


def refused(sampler: str, nfe: int) -> bool:
    """True where the sampler refuses that few steps (Heun below 11 evaluations)."""
    return steps_for(sampler, nfe) < resolve(entry(sampler)[0])[0].min_steps


def ensure_classifier(run: Path, data: str) -> Path:
    """The classifier run scoring the images; trained (~2 min on 2 cores) when missing."""
    if not (run / "meta.json").exists():
        print(
            f"no classifier at {run}: training one (latentdiff train classifier --data {data} --out {run})", flush=True
        )
        subprocess.run(
            [
                sys.executable,
                "-m",
                "latentdiff.scripts.cli",
                "train",
                "classifier",
                "--data",
                data,
                "--out",
                str(run),
                "--max-minutes",
                "3",
            ],
            check=True,
        )
    return run


def plot(points: list[dict], path: Path, heading: str) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    fig = Figure(figsize=(10, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, 2, i + 1) for i in range(2)]
    for sampler in dict.fromkeys(p["sampler"] for p in points):
        mine = sorted((p for p in points if p["sampler"] == sampler), key=lambda p: p["nfe"])
        xs = [p["nfe"] for p in mine]
        axes[0].plot(xs, [p["fid"] for p in mine], "o-", label=title(sampler))
        axes[1].plot(xs, [100 * p["prompt_accuracy"] for p in mine], "o-", label=title(sampler))
    first = points[0]
    axes[0].axhline(first["fid_floor"], color="gray", linestyle="--", label=f"real floor ({first['fid_floor']:.2f})")
    axes[0].set_ylabel(f"FID ({first['n_fake']} samples vs {first['n_reference']} real)")
    axes[0].set_yscale("log")
    axes[1].set_ylabel("prompt accuracy [%]")
    ticks = sorted({p["nfe_budget"] for p in points})  # Heun sits just left of its budget
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("network evaluations (NFE)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle(heading.replace(f"{ROOT}/", ""), fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def main(argv: list[str] | None = None) -> dict:
    p = parser("samplers", __doc__)
    p.add_argument("--run", default=str(DEMO / "prior"), help="prior run (default: the demo's)")
    p.add_argument("--data", default=str(DEMO / "data"), help="dataset with the real test images")
    p.add_argument(
        "--classifier",
        default=str(ROOT / "runs" / "classifier"),
        help="classifier run for FID features and prompt accuracy (trained here when missing)",
    )
    p.add_argument("--n", type=int, default=2000, help="images per point (default: %(default)s)")
    p.add_argument("--nfe", default="5,10,20,50,100,1000", help="network-evaluation budgets (default: %(default)s)")
    p.add_argument("--samplers", default=",".join(SAMPLERS), help="samplers (default: %(default)s)")
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=250, help="images per sampling batch")
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep the points already in --out (or its .partial.json) made with these settings, add the rest",
    )
    args = p.parse_args(argv)

    dev = device()
    if not (Path(args.run) / "meta.json").exists():
        raise SystemExit(f"no prior run at {args.run}: this benchmark scores the demo model, run `make demo` first")
    clf_run = ensure_classifier(Path(args.classifier), args.data)
    out = Path(args.out) if args.out else OUT / "samplers.json"
    classifier = load_classifier(clf_run, dev)
    space = load_feature_space(f"classifier:{clf_run}", device=dev)
    pipe = TextToImage.from_run(args.run, device=dev)
    real = load_image_set(args.data, split="test")
    prompts = evaluation_prompts(classifier.heads, read_info(args.data), real, args.n, "classes")
    n = len(prompts.prompts)
    ref = real_reference(real.images, n, space, StatisticsCache(None))

    settings = {
        "run": str(args.run),
        "n": n,
        "guidance": args.guidance,
        "seed": args.seed,
        "features": space.label,
        "classifier_val_accuracy": classifier.meta.get("val_accuracy"),
    }
    points: list[dict] = []
    partial = out.with_suffix(".partial.json")
    if args.resume:  # a stopped run's partial file, or a finished run's report, made with these settings
        for source in (partial, out):
            saved = json.loads(source.read_text()) if source.exists() else {}
            saved = saved.get("figures", saved)
            if saved.get("settings") == settings:
                points = saved["points"]
                print(f"resuming: {len(points)} points from {source}")
                break
    done = {(q["sampler"], q["nfe_budget"]) for q in points}
    for sampler in args.samplers.split(","):
        for budget in [int(v) for v in args.nfe.split(",")]:
            if (sampler, budget) in done or refused(sampler, budget):
                continue
            steps = steps_for(sampler, budget)
            t0 = time.monotonic()
            name, options = entry(sampler)
            images = pipe(
                prompts.prompts,
                n=1,
                steps=steps,
                sampler=name,
                sampler_options=options,
                guidance=args.guidance,
                seed=args.seed,
                batch_size=args.batch_size,
                show_progress=True,
            )
            seconds = time.monotonic() - t0
            point = {
                "sampler": sampler,
                "nfe_budget": budget,
                "steps": steps,
                "nfe": number_of_evaluations(name, steps),
                "generation_seconds": seconds,
                "prompt_accuracy": prompt_hits(classifier, images, prompts.targets)["all"].float().mean().item(),
                **score(statistics(extract_features(space, images)), ref),
            }
            points.append(point)
            partial.parent.mkdir(parents=True, exist_ok=True)
            partial.write_text(json.dumps({"settings": settings, "points": points}, indent=1))
            print(
                f"{title(sampler)} {point['nfe']} NFE: FID {point['fid']:.2f} (floor {point['fid_floor']:.2f}), "
                f"prompt accuracy {100 * point['prompt_accuracy']:.1f}% [{seconds:.0f} s]",
                flush=True,
            )

    budgets = sorted({q["nfe_budget"] for q in points})
    rows = []
    for sampler in dict.fromkeys(q["sampler"] for q in points):
        cells = {q["nfe_budget"]: q for q in points if q["sampler"] == sampler}
        rows.append(
            [title(sampler)]
            + [
                f"{cells[b]['fid']:.2f} / {100 * cells[b]['prompt_accuracy']:.1f}%"
                + (f" ({cells[b]['nfe']})" if cells[b]["nfe"] != b else "")
                if b in cells
                else ""
                for b in budgets
            ]
        )
    text = table(["sampler \\ NFE"] + [str(b) for b in budgets], rows)
    seconds = sum(q["generation_seconds"] for q in points)
    text += (
        f"\n\nFID / prompt accuracy; FID in {space.label} features, {n} generated (class prompts, guidance "
        f"{args.guidance:g}, seed {args.seed}) vs {ref.reference.n} real test images; floor "
        f"{ref.floor_fid:.2f} ({ref.floor_n} held-out real images). Heun's real NFE in brackets "
        "(refused below 11). "
        f"Generation took {seconds / 60:.1f} min in all."
    )
    by = {(q["sampler"], q["nfe_budget"]): q for q in points}
    if ("dpmpp-2m", 20) in by and ("ddpm", 1000) in by:
        a, b = by[("dpmpp-2m", 20)]["fid"], by[("ddpm", 1000)]["fid"]
        text += (
            f"\nDPM-Solver++(2M) at 20 NFE: FID {a:.2f} against DDPM at 1000: {b:.2f} "
            f"({100 * (a - b) / b:+.1f}%; target within 10%)."
        )
    figure = plot(
        points,
        out.with_suffix(".png"),
        f"{Path(args.run).name}: {n} images per point, guidance {args.guidance:g}, features {space.label}",
    )
    text += f"\nPlot: {figure}"
    figures = {"settings": settings, "floor": ref.floor_fid, "points": points, "plot": str(figure)}
    report("samplers", "2. Samplers: FID and prompt accuracy against network evaluations", text, figures, out)
    partial.unlink(missing_ok=True)
    return figures


if __name__ == "__main__":
    with torch.inference_mode():
        main()
