"""The guidance trade-off plot: FID against prompt accuracy (and/or CLIP score), one point per guidance scale.

Each point carries its 95% FID interval as an error bar and the real-vs-real floor its interval
as a grey band, when the report has them (noise.py), so that a difference within the noise
does not read as one.

Drawn with matplotlib's object API on an Agg canvas, so no global backend is switched and it
works without a display.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

X_AXES = (("prompt_accuracy", "prompt accuracy (classifier)"), ("clip_score", "CLIP score"))


COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple")


TITLE_CHARACTERS = 60  # per panel: what fits across a 5.5-inch panel at the title's 10 points, with a margin


def title_text(title: str, features: str, panels: int = 1) -> str:
    """The title's lines: `title` wrapped between words so that it stays inside the figure, then the features."""
    lines = textwrap.wrap(title, TITLE_CHARACTERS * panels, break_on_hyphens=False)
    return "\n".join([*lines, f"features: {features}"])


def tradeoff_plot(results: list[dict] | dict[str, list[dict]], path: str | Path, title: str = "") -> Path:
    """Save FID vs each available faithfulness measure, one point per guidance scale.

    results: report rows (guidance, fid, fid_floor, ...) of one sweep, or {label: rows} for several
    sweeps drawn as labelled curves on the same axes (their floor is the first sweep's).
    Raises ValueError when no sweep has rows with prompt_accuracy or clip_score.
    """
    series = results if isinstance(results, dict) else {"": results}
    rows_all = [r for rows in series.values() for r in rows]
    axes_spec = [(k, label) for k, label in X_AXES if all(r.get(k) is not None for r in rows_all)]
    if not rows_all or not axes_spec:
        raise ValueError("nothing to plot: the results have no prompt_accuracy or clip_score")
    if len(series) > len(COLOURS):
        raise ValueError(f"at most {len(COLOURS)} sweeps fit on one plot, got {len(series)}")
    fig = Figure(figsize=(5.5 * len(axes_spec), 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    first = rows_all[0]
    for i, (key, label) in enumerate(axes_spec):
        ax = fig.add_subplot(1, len(axes_spec), i + 1)
        for colour, (name, rows) in zip(COLOURS, series.items()):
            xs = [r[key] * (100 if key == "prompt_accuracy" else 1) for r in rows]
            ys = [r["fid"] for r in rows]
            ax.plot(xs, ys, "o-", color=colour, label=name or None)
            if all(r.get("fid_interval") for r in rows):
                below = [y - r["fid_interval"][0] for y, r in zip(ys, rows)]
                above = [r["fid_interval"][1] - y for y, r in zip(ys, rows)]
                ax.errorbar(xs, ys, yerr=[below, above], fmt="none", ecolor=colour, capsize=3, alpha=0.7)
            for j, (x, y, r) in enumerate(zip(xs, ys, rows)):  # labels alternate above and below: close points
                offset = (6, 4) if j % 2 == 0 else (6, -13)
                ax.annotate(f"w={r['guidance']:g}", (x, y), textcoords="offset points", xytext=offset, fontsize=9)
        if first.get("fid_floor_interval"):
            ax.axhspan(*first["fid_floor_interval"], color="gray", alpha=0.15, linewidth=0)
        ax.axhline(
            first["fid_floor"],
            color="gray",
            linestyle="--",
            label=f"real vs real floor ({first['fid_floor']:.1f}, n={first['n_floor']})",
        )
        ax.set_xlabel(label + (" [%]" if key == "prompt_accuracy" else ""))
        ax.set_ylabel(f"FID ({first['n_fake']} samples vs {first['n_reference']} real)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    fig.suptitle(title_text(title, first["features"], len(axes_spec)), fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def main(argv: list[str] | None = None) -> Path:
    """`python -m latentdiff.evaluation.plot LABEL=REPORT.json ... --out PNG`: several evaluate sweeps on one plot."""
    import argparse
    import json

    p = argparse.ArgumentParser(prog="python -m latentdiff.evaluation.plot", description=main.__doc__)
    p.add_argument("reports", nargs="+", metavar="LABEL=REPORT", help="a label and an `evaluate` report.json")
    p.add_argument("--out", required=True, help="the PNG to write")
    p.add_argument("--title", default="")
    args = p.parse_args(argv)
    series = {}
    for item in args.reports:
        label, sep, report = item.rpartition("=")  # the last "=": a label may hold one ("sigma <= 10.8")
        if not sep or not label:
            p.error(f"{item!r}: expected LABEL=REPORT.json")
        try:
            series[label] = json.loads(Path(report).read_text())["results"]
        except (OSError, ValueError, KeyError) as e:
            p.error(f"{report}: not an evaluate report.json ({e})")
    path = tradeoff_plot(series, args.out, args.title)
    print(path)
    return path


if __name__ == "__main__":
    main()
