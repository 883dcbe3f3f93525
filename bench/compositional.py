"""Text faithfulness on GenEval's six tasks: scenes data -> autoencoder, text encoder, prior -> the six-task table.

    python -m bench.compositional                      # 40 minutes of training in all (2 CPU cores)
    python -m bench.compositional --minutes 10         # a shorter budget
    python -m bench.compositional --smoke              # toy sizes, a few steps: checks the plumbing only
    python -m bench.compositional --recipe uniform     # the uniform train mix, no curriculum, no grounding

1. `latentdiff data scenes` with held-out combinations of all three kinds (DEFAULT_HOLDOUT: two
   colour-shape pairs, two count-shape pairs, two relations; >= 30 distinct held-out test prompts).
2. `latentdiff train autoencoder`, `train text`, `train prior` (tiny presets, --set flags below),
   each stopped by --max-minutes: --minutes split by BUDGET_SPLIT (or --split). The scorer needs no training:
   it is evaluation/scenes.py's geometric reader, exact on real images (its ceiling is reported).
3. `latentdiff evaluate` over --guidance: the six tasks and overall, seen and held-out apart; and
   the same scorer on the autoencoder's reconstructions of the test images (posterior means): what a
   prior can reach through this autoencoder.
   With --binding (the binding recipe's default) every image is sampled with attention binding (prior/binding.py).
4. The guidance with the best seen overall (the lower one on a tie), the sampler and the binding become the
   prior's sampling defaults (a new checkpoint with that config.toml; `latentdiff generate`
   without flags then uses them).
--recipe names the train mix, the curriculum and the stage flags beyond STAGE_FLAGS (RECIPES; flags given refine
it). With --prior-first WEIGHTS the prior is trained as a curriculum: --prior-first-share of its minutes on a second
scenes dataset of that train mix (RUNS/data_first: the same seed, sizes and held-out combinations), under the
lr schedule of all its minutes, paused there (train.pause_minutes); then the rest resumed on the main data
(`train prior --resume --new-data`: a new cosine from where the pause left the lr over the minutes left).
Writes runs under --runs (default runs/compositional/), the table (stdout, --out JSON,
RUNS/table.md) and RUNS/tasks_vs_guidance.png. A run already trained (RUN/summary.json) is reused.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shlex
import time
from pathlib import Path

import torch

from latentdiff.data.reader import read_info
from latentdiff.data.scenes import TASKS, names_holdout, parse_caption, parse_holdout, parse_task_weights
from latentdiff.prior.samplers import resolve
from latentdiff.scripts import cli

from .common import ROOT, parser, report, table

DEFAULT_HOLDOUT = (
    "blue star",
    "green ring",
    "four rings",
    "three crosses",
    "circle above square",
    "triangle left of star",
)
BUDGET_SPLIT = {"autoencoder": 0.2, "text": 0.1, "prior": 0.7}  # the demo's split, rounded (scripts/demo.py)
# Stage flags beyond the tiny presets. At 64 px a fourth autoencoder level (f = 8) keeps the prior on the
# tiny preset's 8x8 latents, so a prior step costs what the demo's does (CALIBRATION.md). Eight latent channels
# instead of four: at the same autoencoder budget its reconstructions score higher (colors and color_attr most),
# +2 dB PSNR, and the prior's step costs the same (one wider input conv); docs/scenes.md, "What was raced".
# The prior at lr 2e-3 decayed by a cosine over its budget: at the tiny preset's constant 3e-3 (raced for the demo's
# 7 minutes) the 28-minute prior diverged after 2,250 steps, seen overall 0.18 against 0.64 (docs/scenes.md).
# The prior on latents encoded once (--cache-latents): 47% more steps in its 28 minutes, seen overall 0.71 against
# 0.67 (colour attribution 0.24 against 0.10 at w = 3), the rest unchanged; docs/scenes.md, "Cached latents".
STAGE_FLAGS = {
    "autoencoder": ["--set", "model.channels=[16, 16, 32, 32]", "--set", "model.latent_channels=8"],
    "text": [],
    "prior": ["--set", "model.in_channels=8", "--set", "train.lr=2e-3", "--set", 'train.lr_decay="cosine"',
              "--cache-latents"],
}  # fmt: skip
# Recipes: the data's train mix, the prior's curriculum and stage flags beyond STAGE_FLAGS (--recipe). A
# --task-weights or --prior-first given replaces the recipe's; --STAGE-flags given come after its flags (the
# later --set wins). Measured in docs/scenes.md, "Figures":
# - uniform: the uniform mix, no grounding: seen overall 0.71 and 0.68 at two seeds, position at chance.
# - binding (the default): word identity in the text states; a third of the prior's minutes on position scenes,
#   then a mix weighted 5 of 10 to colour attribution (position 1); token positions, two text layers, a pooled text
#   embedding and both grounding losses (TokenCompose's token and pixel terms) in the prior; attention binding
#   (prior/binding.py) while sampling, step 0.3 at t >= 0.5 T, with SDE-DPM-Solver++(2M) 30 steps: seen overall
#   0.86 and 0.82 at two seeds against 0.79 and 0.79 with DPM-Solver++(2M) 20 steps (colours and counts); then
#   color_attr 5 of 10 in the mix (was position 3, color_attr 3): 0.95 and 0.94, colour attribution 0.92 and 0.93.
RECIPES = {
    "uniform": {},
    "binding": {
        "text": "--set token_identity=1.0",
        "task_weights": "position=1,color_attr=5",
        "prior_first": "single_object=0,two_object=0,counting=0,colors=0,position=1,color_attr=0",
        "prior": "--set model.context_positions=32 --set model.context_layers=2 --set model.pooled_dim=128 "
        "--set grounding=0.1 --set grounding_pixel=0.05",
        "binding": 0.3,
        "sampler": "dpmpp-2m-sde",
        "steps": 30,
    },
}
DEFAULT_RECIPE = "binding"  # seen overall 0.95 and 0.94 at two seeds, held-out 0.79 and 0.72 (docs/scenes.md)
# --smoke: toy sizes and a few steps per stage (tests/bench), the plumbing only.
SMOKE_FLAGS = {
    "autoencoder": ["--steps", "2", "--batch-size", "4", "--set", "eval_images=8", "--set", "scale_batches=2",
                    "--set", "model.channels=[8, 8, 16, 16]"],
    "text": ["--steps", "2", "--batch-size", "8", "--set", "eval_images=8"],
    "prior": ["--steps", "2", "--batch-size", "4", "--set", "model.channels=[16, 32]", "--set",
              "model.num_res_blocks=1", "--set", "sampling.steps=2", "--set", "sampling.per_prompt=1",
              "--cache-latents"],
}  # fmt: skip


def run(words: list[str]) -> None:
    print("$ latentdiff " + shlex.join(words), flush=True)
    code = cli.main(words)
    if code:
        raise SystemExit(f"compositional: `latentdiff {shlex.join(words)}` exited {code}")


def budget_split(text: str) -> dict[str, float]:
    """--split "0.3,0.1,0.6" -> {"autoencoder": 0.3, "text": 0.1, "prior": 0.6}; raises ArgumentTypeError."""
    import argparse

    try:
        shares = [float(x) for x in text.split(",")]
    except ValueError:
        shares = []
    if len(shares) != len(BUDGET_SPLIT) or min(shares) <= 0 or abs(sum(shares) - 1) > 1e-6:
        raise argparse.ArgumentTypeError(f"three positive shares that sum to 1, e.g. 0.2,0.1,0.7; got {text!r}")
    return dict(zip(BUDGET_SPLIT, shares, strict=True))


def held_out_prompts(data: Path, holdout: list[str]) -> int:
    """Distinct test captions that name a held-out combination."""
    from latentdiff.evaluation.images import load_image_set

    rules = parse_holdout(holdout)
    test = load_image_set(data, split="test")
    return len({c for c in test.captions if names_holdout(parse_caption(c), rules)})


def train_stage(stage: str, run_dir: Path, flags: list[str]) -> float | None:
    """Train one stage unless RUN/summary.json says it finished; seconds taken (None: reused)."""
    if (run_dir / "summary.json").exists():
        print(f"{stage}: reusing {run_dir}", flush=True)
        return None
    t0 = time.monotonic()
    run(["train", stage, "--out", str(run_dir), "--preset", "tiny", *flags])
    return round(time.monotonic() - t0, 1)


def build_scenes(out: Path, args, task_weights: str) -> None:
    """`latentdiff data scenes` at `out` (args' sizes, seed and held-out combinations, this train mix) unless it
    holds data already; SystemExit when the data there was built with another mix."""
    if not (out / "info.json").exists():
        run(["data", "scenes", "--out", str(out), "--n", str(args.n), "--val-n", str(max(6, args.n // 50)),
             "--test-n", str(args.test_n), "--resolution", str(args.resolution), "--seed", str(args.seed), "--quiet",
             "--holdout", *args.holdout, "--task-weights", task_weights])  # fmt: skip
    mix = read_info(out).get("task_weights", dict.fromkeys(TASKS, 1))  # data written before the mix: uniform
    wanted = parse_task_weights(task_weights)
    if mix != wanted:
        raise SystemExit(f"compositional: {out} was built with the train mix {mix}, not {wanted}; use a new --runs")


def trained_on(run_dir: Path) -> Path | None:
    """The data a finished run trained on last (its meta.json's), None when it has not finished."""
    if not (run_dir / "summary.json").exists():
        return None
    return Path(json.loads((run_dir / "meta.json").read_text())["data"]["path"]).resolve()


def train_prior_curriculum(
    run_dir: Path, first: Path, data: Path, flags: list[str], minutes: float | None, share: float
) -> float | None:
    """The prior trained `share` of `minutes` on `first`, then the rest resumed on `data`; seconds (None: reused).

    flags: `train prior`'s flags but --data and the budget. minutes None (--smoke): 2 steps, then 2 more.
    A run that finished its first part resumes; one that finished both is reused.
    """
    last = trained_on(run_dir)
    if last == data.resolve():
        print(f"prior: reusing {run_dir}", flush=True)
        return None
    t0 = time.monotonic()
    if last != first.resolve():
        # the whole budget's schedule, paused at its share (train.pause_minutes): the lr is where the cosine over
        # all the minutes has it, not at a floor of its own
        budget = [] if minutes is None else ["--max-minutes", f"{minutes:g}", "--set",
                                             f"train.pause_minutes={minutes * share:g}"]  # fmt: skip
        run(["train", "prior", "--out", str(run_dir), "--preset", "tiny", "--data", str(first), *flags, *budget])
    # the rest: a new cosine from the lr the pause left, over the minutes left (--extend-lr continue)
    rest = ["--steps", "4"] if minutes is None else ["--max-minutes", f"{minutes * (1 - share):g}"]
    cache = ["--cache-latents"] if "--cache-latents" in flags else []
    run(["train", "prior", "--resume", str(run_dir), "--data", str(data), "--new-data", *rest, *cache,
         "--set", "train.pause_minutes=0"])  # fmt: skip
    return round(time.monotonic() - t0, 1)


def set_sampling_defaults(run_dir: Path, sampler: str, steps: int, guidance: float, **more) -> None:
    """Commit the prior's checkpoint again with [sampling] sampler, steps and guidance (and `more` [sampling]
    values, e.g. binding) as its defaults."""
    from latentdiff.core import checkpoint as ckpt
    from latentdiff.core.config import dumps_toml, to_dict
    from latentdiff.core.runs import read_config
    from latentdiff.prior.config import PriorConfig

    cfg = read_config(run_dir, PriorConfig)
    sampling = dataclasses.replace(cfg.sampling, sampler=sampler, steps=steps, guidance=guidance, **more)
    ckpt.amend(run_dir, config_toml=dumps_toml(to_dict(dataclasses.replace(cfg, sampling=sampling))))


@torch.no_grad()
def reconstruction_ceiling(ae_run: Path, data: Path) -> dict:
    """The scorer on the autoencoder's reconstructions (posterior mean) of the test images: summarize()'s dict."""
    from latentdiff.autoencoder.load import load_autoencoder
    from latentdiff.core.pixels import from_uint8
    from latentdiff.evaluation.images import load_image_set
    from latentdiff.evaluation.scenes import holdout_flags, score, summarize

    ae, _ = load_autoencoder(ae_run)
    test = load_image_set(data, split="test")
    x = from_uint8(test.images)  # (N, 3, H, W) in [-1, 1]
    recon = torch.cat([ae.decode(ae.encode(x[i : i + 100]).mean).clamp(-1, 1) for i in range(0, len(x), 100)])
    hits = score(recon, test.captions, read_info(data)["palette"])
    return summarize(hits, test.captions, holdout_flags(test.metas))


def recommend(rows: list[dict]) -> dict:
    """The row with the best seen overall; the lower guidance on a tie."""
    return max(rows, key=lambda r: (r["scenes"]["seen"]["overall"] or 0.0, -r["guidance"]))


def plot(rows: list[dict], path: Path, title: str) -> Path:
    """Each task's seen score (and the held-out overall, dashed) against the guidance scale."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ws = [r["guidance"] for r in rows]
    for task in TASKS:
        ax.plot(ws, [r["scenes"]["seen"]["tasks"].get(task, float("nan")) for r in rows], marker="o", label=task)
    ax.plot(ws, [r["scenes"]["seen"]["overall"] for r in rows], "k-", lw=2, label="overall (seen)")
    held = [r["scenes"]["held_out"]["overall"] for r in rows]
    if any(h is not None for h in held):
        ax.plot(ws, [float("nan") if h is None else h for h in held], "k--", lw=2, label="overall (held-out)")
    ax.set(xlabel="guidance scale w", ylabel="share of images showing the prompt", ylim=(-0.02, 1.02), title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def main(argv: list[str] | None = None) -> dict:
    p = parser("compositional", __doc__)
    p.add_argument("--minutes", type=float, default=40.0, help="training budget of all stages (default: %(default)s)")
    p.add_argument("--runs", default=str(ROOT / "runs" / "compositional"), help="where data and runs go")
    p.add_argument("--n", type=int, default=20000, help="training images (default: %(default)s)")
    p.add_argument("--test-n", type=int, default=600, help="test images = prompts scored (default: %(default)s)")
    p.add_argument("--resolution", type=int, default=64, help="image side (default: %(default)s)")
    p.add_argument("--holdout", nargs="+", default=list(DEFAULT_HOLDOUT), metavar="COMBO", help="held-out combinations")
    p.add_argument(
        "--recipe",
        choices=sorted(RECIPES),
        default=DEFAULT_RECIPE,
        help="train mix, curriculum and stage flags (RECIPES; default: %(default)s); the flags below refine it",
    )
    p.add_argument(
        "--task-weights",
        metavar="TASK=N,...",
        help="the data's train mix (`data scenes --task-weights`; default: the recipe's); a new --runs builds it",
    )
    p.add_argument(
        "--prior-first",
        metavar="TASK=N,...",
        help="train the prior first on scenes of this train mix (a curriculum; module docstring; default: the "
        "recipe's; '' for none)",
    )
    p.add_argument(
        "--prior-first-share",
        type=float,
        default=1 / 3,
        metavar="F",
        help="with --prior-first: the share of the prior's minutes spent on that mix (default: 1/3)",
    )
    p.add_argument("--guidance", default="1,2,3,4,6", help="guidance scales swept (default: %(default)s)")
    p.add_argument("--sampler", help="sampler (default: the recipe's, else dpmpp-2m)")
    p.add_argument("--steps", type=int, help="sampler steps (default: the recipe's, else 20)")
    p.add_argument(
        "--binding",
        type=float,
        metavar="STEP",
        help="attention binding's step while sampling (prior/binding.py; default: the recipe's, 0 for none)",
    )
    p.add_argument(
        "--binding-until",
        type=float,
        default=0.5,
        metavar="FRACTION",
        help="attention binding at t >= FRACTION * T (default: %(default)s)",
    )
    p.add_argument("--seed", type=int, default=0, help="data and training seed (default: %(default)s)")
    p.add_argument(
        "--split",
        type=budget_split,
        default=BUDGET_SPLIT,
        metavar="AE,TEXT,PRIOR",
        help="shares of --minutes for the autoencoder, text encoder and prior (default: 0.2,0.1,0.7)",
    )
    for stage in BUDGET_SPLIT:
        p.add_argument(
            f"--{stage}-flags",
            default="",
            metavar="FLAGS",
            help=f"more `train {stage}` flags (one flag alone needs '=': --{stage}-flags=--cache-latents)",
        )
    p.add_argument("--smoke", action="store_true", help="toy sizes, 2 steps per stage: checks the plumbing only")
    args = p.parse_args(argv)
    recipe = RECIPES[args.recipe]
    for key in ("task_weights", "prior_first"):
        if getattr(args, key) is None:
            setattr(args, key, recipe.get(key, ""))
    try:
        weights = parse_task_weights(args.task_weights)
        first_weights = parse_task_weights(args.prior_first) if args.prior_first else None
    except ValueError as e:
        p.error(str(e))
    if args.binding is None:
        args.binding = recipe.get("binding", 0.0)
    args.sampler = args.sampler or recipe.get("sampler", "dpmpp-2m")
    args.steps = recipe.get("steps", 20) if args.steps is None else args.steps
    try:
        resolve(args.sampler)
    except ValueError as e:
        p.error(str(e))
    if args.steps < 1:
        p.error(f"--steps needs at least 1 sampler step, got {args.steps}")
    if not (math.isfinite(args.binding) and args.binding >= 0 and 0 <= args.binding_until <= 1):
        p.error(f"--binding needs a step >= 0 and --binding-until a fraction in [0, 1]; got {args.binding:g} and "
                f"{args.binding_until:g}")  # fmt: skip
    if not 0 < args.prior_first_share < 1:
        p.error(f"--prior-first-share is a share of the prior's minutes, between 0 and 1; got {args.prior_first_share}")
    if args.smoke:
        args.n, args.test_n, args.guidance, args.steps = 48, 24, "1,3", 2
    runs = Path(args.runs)
    data = runs / "data"
    t_start = time.monotonic()
    build_scenes(data, args, args.task_weights)
    if first_weights:
        build_scenes(runs / "data_first", args, args.prior_first)
    held_prompts = held_out_prompts(data, args.holdout)
    print(f"{held_prompts} distinct held-out test prompts", flush=True)

    seconds = {}
    inputs = {"autoencoder": [], "text": [], "prior": ["--autoencoder", str(runs / "ae"), "--text", str(runs / "text")]}
    names = {"autoencoder": "ae", "text": "text", "prior": "prior"}
    for stage, share in args.split.items():
        budget = [] if args.smoke else ["--max-minutes", f"{args.minutes * share:g}"]
        flags = (SMOKE_FLAGS if args.smoke else STAGE_FLAGS)[stage] + shlex.split(recipe.get(stage, ""))
        flags += shlex.split(getattr(args, f"{stage}_flags"))
        if stage == "prior" and first_weights:
            seconds[stage] = train_prior_curriculum(
                runs / names[stage], runs / "data_first", data, ["--seed", str(args.seed), *inputs[stage], *flags],
                None if args.smoke else args.minutes * share, args.prior_first_share,
            )  # fmt: skip
            continue
        seconds[stage] = train_stage(
            stage, runs / names[stage], ["--data", str(data), "--seed", str(args.seed), *inputs[stage], *budget, *flags]
        )

    prior = runs / "prior"
    run(["evaluate", "--run", str(prior), "--data", str(data), "--n", str(args.test_n), "--sampler", args.sampler,
         "--steps", str(args.steps), "--guidance", args.guidance, "--precision", "fp32", "--seed", str(args.seed),
         "--binding", f"{args.binding:g}", "--binding-until", f"{args.binding_until:g}",
         "--out", str(prior / "eval")])  # fmt: skip
    ev = json.loads((prior / "eval" / "report.json").read_text())
    rows, ceiling = ev["results"], ev["scenes_ceiling"]
    recon = reconstruction_ceiling(runs / "ae", data)
    best = recommend(rows)
    binding = {"binding": args.binding, "binding_until": args.binding_until}
    set_sampling_defaults(prior, args.sampler, args.steps, best["guidance"], **binding)
    bound = f", attention binding {args.binding:g} at t >= {args.binding_until:g} T" if args.binding else ""

    lines = []
    uniform = set(weights.values()) == {1}

    def listed(mix: dict[str, int]) -> str:
        return ", ".join(f"{k} {v}" for k, v in mix.items())

    mix_words = f"recipe {args.recipe}; " + ("" if uniform else f"train mix {listed(weights)}; ")
    if first_weights:
        mix_words += f"the prior first {args.prior_first_share:.0%} of its minutes on the mix {listed(first_weights)}; "
    extra = [
        {"guidance": "autoencoder reconstructions", "scenes": recon},
        {"guidance": "real (ceiling)", "scenes": ceiling},
    ]
    for r in rows + extra:
        for group in ("seen", "held_out"):
            s = r["scenes"][group]
            if s["overall"] is None:
                continue
            cells = [f"{s['tasks'][t]:.2f}" if t in s["tasks"] else "-" for t in TASKS]
            w = r["guidance"] if isinstance(r["guidance"], str) else f"{r['guidance']:g}"
            lines.append([w, f"{group.replace('_', '-')} ({sum(s['n'].values())})", *cells, f"{s['overall']:.2f}"])
    png = plot(rows, runs / "tasks_vs_guidance.png", f"scenes, {args.sampler} {args.steps} steps")
    trained = {k: v for k, v in seconds.items() if v is not None}
    done = {stage: json.loads((runs / names[stage] / "summary.json").read_text()) for stage in names}
    jumps = done["prior"].get("loss_jumps")  # None: a prior trained before the loss was watched
    steps = ", ".join(f"{stage} {summary['steps']:,}" for stage, summary in done.items())
    text = table(["guidance", "prompts", *TASKS, "overall"], lines) + (
        f"\n\n{args.test_n} test prompts ({held_prompts} distinct held-out: {', '.join(args.holdout)}), one image "
        f"each, {args.sampler} {args.steps} steps{bound}; {mix_words}"
        "scorer: evaluation/scenes.py's geometric reader (no training), "
        "its ceiling on the real test images in the last rows; above them the same scorer on the autoencoder's "
        f"reconstructions of those images. Training: {args.minutes:g} min budget "
        f"({', '.join(f'{k} {v / 60:.1f} min' for k, v in trained.items()) or 'runs reused'}"
        f"{', smoke sizes' if args.smoke else ''}; steps: {steps}"
        f"{'' if jumps is None else f'; the prior loss jumped {jumps} times (train.loss_jump)'}). "
        "Recommended and recorded as the prior's defaults: "
        f"{args.sampler}, {args.steps} steps, guidance {best['guidance']:g}{bound}. Plot: {png}."
    )
    (runs / "table.md").write_text(text + "\n")
    figures = {
        "rows": [{"guidance": r["guidance"], "scenes": r["scenes"]} for r in rows],
        "ceiling": ceiling,
        "autoencoder_reconstructions": recon,
        "recommended": {"sampler": args.sampler, "steps": args.steps, "guidance": best["guidance"], **binding},
        "held_out_prompts": held_prompts,
        "holdout": list(args.holdout),
        "recipe": args.recipe,
        "task_weights": weights,
        "prior_first": {"task_weights": first_weights, "share": args.prior_first_share} if first_weights else None,
        "train_seconds": seconds,
        "steps": {k: v["steps"] for k, v in done.items()},
        "prior_loss_jumps": jumps,
        "minutes": args.minutes,
        "split": args.split,
        "smoke": args.smoke,
        "total_seconds": round(time.monotonic() - t_start, 1),
        "plot": str(png),
    }
    report("compositional", "Text faithfulness on GenEval's six tasks (scenes)", text, figures, args.out)
    return figures


if __name__ == "__main__":
    main()
