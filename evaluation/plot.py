"""The guidance trade-off plot: FID against prompt accuracy (and/or CLIP score), one point per guidance scale.

Drawn with matplotlib's object API on an Agg canvas, so no global backend is switched and it
works without a display.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

X_AXES = (("prompt_accuracy", "prompt accuracy (classifier)"), ("clip_score", "CLIP score"))


def tradeoff_plot(results: list[dict], path: str | Path, title: str = "") -> Path:
    """Save FID vs each available faithfulness measure; results are report rows (guidance, fid, fid_floor, ...)."""
    axes_spec = [(k, label) for k, label in X_AXES if all(r.get(k) is not None for r in results)]
    if not results or not axes_spec:
        raise ValueError("nothing to plot: the results have no prompt_accuracy or clip_score")
    fig = Figure(figsize=(5.5 * len(axes_spec), 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    first = results[0]
    for i, (key, label) in enumerate(axes_spec):
        ax = fig.add_subplot(1, len(axes_spec), i + 1)
        xs = [r[key] * (100 if key == "prompt_accuracy" else 1) for r in results]
        ys = [r["fid"] for r in results]
        ax.plot(xs, ys, "o-", color="tab:blue")
        for x, y, r in zip(xs, ys, results):
            ax.annotate(f"w={r['guidance']:g}", (x, y), textcoords="offset points", xytext=(6, 4), fontsize=9)
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
    fig.suptitle("\n".join(filter(None, [title, f"features: {first['features']}"])), fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
