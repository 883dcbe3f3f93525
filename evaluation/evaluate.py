"""`latentdiff evaluate`: sweep guidance scales of a prior run; FID, KID, prompt accuracy, CLIP score; report + plot.

    latentdiff evaluate --run runs/prior --data datasets/fmnist --n 1000 --features classifier:runs/classifier \\
        --sampler ddim --steps 50 --guidance 1,3,5

Per guidance value w, the same prompts and the same seed (so the same starting noise) give n
images; each set is scored against the real test images:
- FID and KID in the --features space vs the reference part of the test split, beside the floor
  (FID of a disjoint real holdout of the same size to the same reference; fid.real_reference),
  each with its noise: 95% bootstrap intervals, the equal-size excess of generated over real,
  KID's spread, and notes when a figure is within real noise (noise.py); a test split too small
  for the comparison gets the command that makes it larger;
- prompt accuracy by the classifier (--classifier, or the one named in --features);
- CLIP score when --clip RUN is given, with its interval, beside the CLIP score of the real test
  images with their own captions (prompts.real_clip_reference, cached);
- on `latentdiff data scenes` data: GenEval's six tasks and overall, seen and held-out prompts apart,
  by the geometric reader of evaluation/scenes.py, beside its ceiling (the same reader on the real
  test images with their own captions); neither --features nor --classifier is needed.
Generated images of another size than the real ones are compared at the real size (resized,
antialiased bilinear; images.match_size), and the report says so.
Prompts: class prompts when the classifier has one class head and info.json lists classes
(n // classes per class, remainder dropped), else the first n test captions (prompts.py).
Writes OUT/report.json, OUT/tradeoff.png and a sample grid per guidance value.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from latentdiff.core.checkpoint import write_json
from latentdiff.core.errors import cli_errors
from latentdiff.core.logger import save_grid
from latentdiff.core.runtime import Runtime, announce, sampling_precision
from latentdiff.data.reader import read_info
from latentdiff.prior.pipeline import (
    add_binding_arguments,
    add_guidance_interval_argument,
    add_guidance_rescale_argument,
    add_precision_argument,
    add_stage_arguments,
    pipeline_from_arguments,
)
from latentdiff.prior.samplers import add_sampler_arguments, check_number, sampler_arguments

from .classifier import load_classifier, weak_classifier_note
from .features import load_feature_space
from .fid import KID_SCALE, StatisticsCache, format_kid, real_reference, score_images
from .fid_command import MIN_REAL, add_feature_args, check_bootstrap, more_real_images, wanted_real
from .images import load_image_set, match_size
from .noise import fig
from .plot import tradeoff_plot
from .prompts import PromptSet, clip_scores, clip_summary, evaluation_prompts, prompt_hits, real_clip_reference
from .scenes import CEILING_GOAL, ceiling, holdout_flags, scenes_table, score, summarize


def parse_guidance(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--guidance {text!r}: give comma-separated numbers, e.g. 1,3,5") from None
    if not values:
        raise ValueError("--guidance needs at least one value, e.g. 1,3,5")
    return [check_number("--guidance", v, float, 0.0) for v in values]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="latentdiff evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--run", required=True, help="prior run directory (`latentdiff train prior --out RUN`)")
    p.add_argument("--decoder", metavar="RUN", help="decode with this `latentdiff train decoder` run (same encoder)")
    add_stage_arguments(p)
    p.add_argument("--data", required=True, help="dataset with the real test images (and captions, labels)")
    p.add_argument("--split", default="test", help="split of --data to compare with (default: %(default)s)")
    p.add_argument("--n", type=int, default=1000, help="images generated per guidance value (default: %(default)s)")
    p.add_argument("--n-real", type=int, help="real images to read (default: all of the split)")
    add_feature_args(p, required=False)
    p.add_argument(
        "--classifier",
        metavar="RUN",
        help="classifier run for prompt accuracy (default: the one in --features classifier:RUN)",
    )
    p.add_argument("--clip", metavar="RUN", help="CLIP (text run or openclip:MODEL:PRETRAINED) for CLIP score")
    p.add_argument(
        "--prompts",
        choices=["auto", "classes", "captions"],
        default="auto",
        help="class prompts or test captions (default: classes when the data has a single class label)",
    )
    add_sampler_arguments(p)
    p.add_argument("--guidance", default="1,3,5", help="comma-separated guidance scales (default: %(default)s)")
    add_guidance_rescale_argument(p)
    add_guidance_interval_argument(p)
    add_binding_arguments(p)
    p.add_argument("--seed", type=int, default=0, help="generation seed, the same for every guidance value")
    add_precision_argument(p)
    p.add_argument("--gen-batch-size", type=int, default=100, help="images per sampling batch")
    p.add_argument("--out", help="report directory (default: RUN/eval)")
    return p


def _grid_indices(prompts: PromptSet, per_prompt: int = 8, max_rows: int = 10) -> list[int]:
    """A few images of each of the first prompts (classes mode) or the first images (captions mode)."""
    if prompts.mode != "classes":
        return list(range(min(len(prompts.prompts), per_prompt * max_rows)))
    starts: dict[str, int] = {}
    for i, p in enumerate(prompts.prompts):
        starts.setdefault(p, i)
    return [
        s + j
        for s in list(starts.values())[:max_rows]
        for j in range(per_prompt)
        if s + j < len(prompts.prompts) and prompts.prompts[s + j] == prompts.prompts[s]
    ]


def evaluate(args: argparse.Namespace) -> dict:
    guidances = parse_guidance(args.guidance)
    check_bootstrap(args.bootstrap)
    if args.n < 2:
        raise ValueError(f"--n must be at least 2 (FID needs a covariance), got {args.n}")
    classifier_run = args.classifier or (
        args.features.partition(":")[2] if args.features and args.features.startswith("classifier:") else None
    )
    scenes_data = read_info(args.data).get("source") == "scenes"
    if not args.features and not classifier_run and not scenes_data:
        raise ValueError("give --features (classifier:RUN, clip:RUN or inception) and/or --classifier RUN")
    device = Runtime.setup(args.seed, "fp32", args.device).device
    out = Path(args.out or Path(args.run) / "eval")

    # Everything that can fail fast (sampler options, missing weights, wrong runs) before minutes of sampling.
    pipe = pipeline_from_arguments(args, device)
    announce(device, sampling_precision(device, args.precision), asked=args.device)
    sampling = dict(
        steps=args.steps,
        sampler=args.sampler,
        guidance=None,
        negative_prompt="",
        seed=args.seed,
        batch_size=args.gen_batch_size,
        guidance_rescale=args.guidance_rescale,
        guidance_interval=args.guidance_interval,
        binding=args.binding,
        binding_until=args.binding_until,
        sampler_options=sampler_arguments(args),
    )
    pipe.settings([""], n=1, **sampling)
    space = None
    if args.features:
        space = load_feature_space(args.features, inception_weights=args.inception_weights, device=device)
    classifier = load_classifier(classifier_run, device) if classifier_run else None
    if (
        classifier is not None
        and (note := weak_classifier_note(classifier))
        and not (args.features or "").endswith(f"classifier:{classifier_run}")
    ):
        print(note)  # the same classifier as --features said it already
    clip = None
    if args.clip:
        from latentdiff.text.sources import load_text_encoder

        clip = load_text_encoder(args.clip).to(device).frozen(cache_size=4096)
    info = read_info(args.data)
    real = load_image_set(args.data, split=args.split, limit=args.n_real)
    if classifier is not None:
        prompts = evaluation_prompts(classifier.heads, info, real, args.n, args.prompts)
    elif args.prompts == "classes" or (args.prompts == "auto" and info.get("classes") and not info.get("attributes")):
        prompts = evaluation_prompts({"class": list(info.get("classes") or [])}, info, real, args.n, "classes")
    else:
        prompts = PromptSet(list(real.captions[: args.n]), {}, "captions")
    n = len(prompts.prompts)
    scenes_ceiling = None
    if scenes_data:  # the reader on the real test images with their own captions: the ceiling of every score
        palette = info["palette"]
        scenes_ceiling = ceiling(real.images, real.captions, palette, holdout_flags(real.metas))
        overall = scenes_ceiling["all"]["overall"]
        print(f"scenes reader on {len(real)} real test images (the ceiling): overall {overall:.3f}")
        if scenes_ceiling["all"]["overall"] < CEILING_GOAL:
            print(
                f"note: the reader's ceiling is below {CEILING_GOAL:.0%} (at 32 px small shapes are ambiguous; use 64)"
            )

    cache = ref = None
    advice = None
    cache_dir = None if args.no_cache else args.cache_dir
    if space is not None:
        if len(real) < MIN_REAL:
            raise ValueError(
                f"{len(real)} real images are too few to split into a reference and a floor holdout; "
                + more_real_images(args.data, args.split, len(real), wanted_real(n, 0))
            )
        cache = StatisticsCache(cache_dir)
        ref = real_reference(real.images, n, space, cache, args.batch_size)
        print(
            f"real reference: {ref.reference.n} images of {real.source}; floor FID {fig(ref.floor_fid)} "
            f"({ref.floor_n} held-out real images) in {space.label}"
        )
        wanted = wanted_real(n, ref.reference.mu.shape[0])
        if len(real) < wanted and args.n_real is None:
            advice = more_real_images(args.data, args.split, len(real), wanted)
            print(f"note: {advice}")
    clip_real, cached_clip = None, False
    if clip is not None:
        clip_real, cached_clip = real_clip_reference(clip, real, cache_dir)
        print(f"CLIP score of the {clip_real['n']} real images with their own captions: {_clip_words(clip_real)}")

    settings = pipe.settings(prompts.prompts, n=1, **sampling)
    rows = []
    for w in guidances:
        t0 = time.monotonic()
        # The settings checked above with this value's guidance (a new setting reaches the sweep through
        # `sampling`): (n, 3, H, W) in [-1, 1].
        images = pipe(prompts.prompts, n=1, **{**sampling, "guidance": w}, show_progress=True)
        row: dict = {"guidance": w, "generation_seconds": round(time.monotonic() - t0, 1)}
        if classifier is not None:
            hits = prompt_hits(classifier, images, prompts.targets)
            row["prompt_accuracy"] = hits["all"].float().mean().item()
            if len(hits) > 2:
                row.update({f"prompt_accuracy_{k}": v.float().mean().item() for k, v in hits.items() if k != "all"})
        if scenes_data:
            hits = score(images, prompts.prompts, palette)
            row["scenes"] = summarize(hits, prompts.prompts, holdout_flags(real.metas[:n]))
        if space is not None:
            row.update(score_images(space, images, ref, args.batch_size, bootstraps=args.bootstrap))
        if clip is not None:
            # At the real images' size, as the real reference was scored (the same resize as FID's).
            summary = clip_summary(clip_scores(clip, match_size(images, real.images.shape[-2:])[0], prompts.prompts))
            row["clip_score"], row["clip_score_interval"] = summary["score"], summary["interval"]
        row["grid"] = str(save_grid(images[_grid_indices(prompts)], out / f"samples_w{w:g}.png", 8))
        row["seconds"] = round(time.monotonic() - t0, 1)
        rows.append(row)
        print(_row_line(row, clip_real))
        for note in row.get("notes", []):
            print(f"  note: {note}")

    report = {
        "prior_run": str(args.run),
        "decoder": args.decoder,
        "data": real.source,
        "n_generated": n,
        "prompts": prompts.mode,
        "distinct_prompts": len(set(prompts.prompts)),
        "sampler": settings.sampler,
        "steps": settings.steps,
        "sampler_options": settings.sampler_options,
        "guidance_rescale": settings.guidance_rescale,
        "guidance_interval": settings.guidance_interval,
        "binding": settings.binding,
        "binding_until": settings.binding_until,
        "precision": settings.precision,
        "seed": args.seed,
        "features": space.label if space else None,
        "feature_weights_hash": space.weights_hash if space else None,
        "classifier": classifier_run,
        "clip": args.clip,
        "classifier_val_accuracy": classifier.meta.get("val_accuracy") if classifier is not None else None,
        "generated_size": list(images.shape[-2:]),
        "real_size": list(real.images.shape[-2:]),
        "cached_real_statistics": cache.hits if cache else 0,
        "clip_real": clip_real,
        "cached_real_clip": cached_clip,
        "real_images_advice": advice,
        "results": rows,
    }
    if scenes_ceiling is not None:
        report["scenes_ceiling"] = scenes_ceiling
    if space is not None and (classifier is not None or clip is not None):
        report["plot"] = str(
            tradeoff_plot(
                rows, out / "tradeoff.png", f"{Path(args.run).name}: {settings.sampler} {settings.steps} steps"
            )
        )
    write_json(out / "report.json", report)
    table = markdown_table(report)
    if scenes_ceiling is not None:
        table += "\n\nGenEval's six tasks (share of images showing their prompt; overall: mean over the tasks):\n\n"
        table += scenes_table(rows, scenes_ceiling)
    (out / "report.md").write_text(table + "\n")
    print(table)
    plot = f"; plot: {report['plot']}" if "plot" in report else ""
    print(f"report: {out / 'report.json'} (table: report.md){plot}")
    return report


def markdown_table(report: dict) -> str:
    """The sweep as a Markdown table (what docs/demo.md shows): figures with their 95% intervals, then the
    sample count, extractor, floor, the CLIP score's real reference and the notes."""
    rows = report["results"]
    cols = [("guidance", lambda r: f"{r['guidance']:g}")]
    if rows and "prompt_accuracy" in rows[0]:
        cols.append(("prompt accuracy", lambda r: f"{r['prompt_accuracy']:.1%}"))
    if rows and "fid" in rows[0]:
        cols += [
            ("FID [95%]" if rows[0].get("fid_interval") else "FID", lambda r: f"{fig(r['fid'])}{_span(r, 'fid')}"),
            ("KID x1e3", lambda r: f"{fig(r['kid'] * KID_SCALE)}" + _kid_spread(r)),
        ]
    if rows and "clip_score" in rows[0]:
        cols.append(("CLIP score [95%]", lambda r: f"{r['clip_score']:.2f}{_span(r, 'clip_score')}"))
    lines = ["| " + " | ".join(c[0] for c in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r) for _, cell in cols) + " |" for r in rows]
    if rows and "fid" in rows[0]:
        r = rows[0]
        lines.append(
            f"\nFID and KID in {r['features']} feature space, {r['n_fake']} generated images "
            f"({report['sampler']}, {report['steps']} steps{_sampling_words(report)}) vs {r['n_reference']} real "
            f"{report['data']} "
            f"images; floor (FID of {r['n_floor']} held-out real images): {fig(r['fid_floor'])}"
            f"{_span(r, 'fid_floor')}."
        )
        if r.get("fid_interval"):
            lines.append(
                f"Intervals: 95%, from {r['bootstraps']} bootstrap replicates (FID) and KID's spread over its "
                f"subsets of {r['kid_subset_size']}."
            )
    if report.get("clip_real"):
        lines.append(
            f"CLIP score of the {report['clip_real']['n']} real images with their own captions (the reference for "
            f"the CLIP score column): {_clip_words(report['clip_real'])}."
        )
    notes = [f"- guidance {r['guidance']:g}: {note}" for r in rows for note in r.get("notes", [])]
    if report.get("real_images_advice"):
        notes.append(f"- {report['real_images_advice']}")
    if notes:
        lines += ["", "Notes:", *notes]
    return "\n".join(lines)


def _span(row: dict, key: str) -> str:
    """ " [lo, hi]" from row[key + "_interval"], or "" without one."""
    span = row.get(f"{key}_interval")
    return f" [{fig(span[0])}, {fig(span[1])}]" if span else ""


def _kid_spread(row: dict) -> str:
    return f" +- {fig(row['kid_std'] * KID_SCALE)}" if row.get("kid_std") is not None else ""


def _clip_words(summary: dict) -> str:
    """ "29.31 [28.90, 29.72]": a CLIP score summary (prompts.clip_summary)."""
    return f"{summary['score']:.2f}" + (
        f" [{summary['interval'][0]:.2f}, {summary['interval'][1]:.2f}]" if summary["interval"] else ""
    )


def _sampling_words(report: dict) -> str:
    """ ", guidance in sigma (0.56, 10.8]" when the sweep used a guidance interval, ", attention binding 0.3 at
    t >= 0.5 T" when it bound, else ""."""
    interval, binding = report.get("guidance_interval"), report.get("binding")
    words = f", guidance in sigma ({interval[0]:g}, {interval[1]:g}]" if interval else ""
    return words + (f", attention binding {binding:g} at t >= {report['binding_until']:g} T" if binding else "")


def _row_line(row: dict, clip_real: dict | None = None) -> str:
    parts = [f"guidance {row['guidance']:g}:"]
    if "prompt_accuracy" in row:
        parts.append(f"prompt accuracy {100 * row['prompt_accuracy']:.1f}%")
    if "fid" in row:
        parts.append(
            f"FID {fig(row['fid'])}{_span(row, 'fid')} (floor {fig(row['fid_floor'])}{_span(row, 'fid_floor')}; "
            f"{row['n_fake']} generated vs {row['n_reference']} real, {row['features']}) "
            f"{format_kid(row['kid'], row.get('kid_std'))}"
        )
    if "scenes" in row:
        seen, held = row["scenes"]["seen"]["overall"], row["scenes"]["held_out"]["overall"]
        words = [f"{v:.3f} {name}" for v, name in ((seen, "seen"), (held, "held-out")) if v is not None]
        parts.append("scenes overall " + ", ".join(words))
    if "clip_score" in row:
        real = f" (real images with their captions {_clip_words(clip_real)})" if clip_real else ""
        parts.append(f"CLIP score {row['clip_score']:.2f}{_span(row, 'clip_score')}{real}")
    parts.append(f"[{row['seconds']:.0f} s]")
    return " ".join(parts)


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    with cli_errors(), torch.no_grad():
        return evaluate(args)


if __name__ == "__main__":
    main()
