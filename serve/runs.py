"""The Runs tab's data, without any web framework: what a run directory shows about its training.

For the served prior and the stages it was trained on (the autoencoder and text runs its
meta.json records, and a decoder run when one is served): the curves of metrics.jsonl, the sample
grids it wrote over time, summary.json, and the reports `latentdiff evaluate` wrote inside it
(RUN/eval/ by default) with their trade-off plots. Everything is read again on each call, so a
run that is still training shows its newest state.

The page is handed copies of the image files (`Copies`), never a path inside a run folder: the
folder holds the weights, and Gradio refuses to serve files outside the working directory and
the temp folder, so a run elsewhere (`cd / && latentdiff serve --run ~/x/runs/prior`) would fail.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from latentdiff.core import checkpoint as ckpt
from latentdiff.core.errors import UserError
from latentdiff.core.runs import find_recorded

NOT_CURVES = {"step", "time", "skipped_samples", "nonfinite_steps", "sample_errors"}  # bookkeeping, not curves
MAX_CURVES = 9  # subplots per run; a run logs 3-5 scalars per step today
MAX_GRIDS = 24  # the newest sample grids per run


@dataclass(frozen=True)
class Stage:
    name: str  # "prior", "autoencoder", "text", "decoder"
    path: Path


@dataclass
class StageView:
    """What the page shows for one run."""

    stage: Stage
    curves: Figure | None  # None when metrics.jsonl has no per-step scalars yet
    grids: list[tuple[str, str]]  # (path of a copy of the PNG, caption), oldest first
    summary: dict
    reports: list[tuple[str, str | None]] = field(default_factory=list)  # (report.md text, copy of the plot)


class Copies:
    """Copies of the files the Runs tab shows, in a folder the server owns and removes when it stops.

    A file is copied again only when its size or modification time changed (a run still training
    rewrites its grids); `prune()` removes every copy not handed out since the previous prune.
    Not thread-safe: the page runs its Runs handlers one at a time (one concurrency id).
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self._used: set[Path] = set()

    def __call__(self, path: str | Path) -> str | None:
        """The path of a copy of `path`, or None when the file is gone (deleted by its run meanwhile)."""
        source = Path(path)
        try:
            st = source.stat()
            key = hashlib.sha256(f"{source.resolve()}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:16]
            copy = self.folder / key / source.name
            if not copy.is_file():
                copy.parent.mkdir(parents=True, exist_ok=True)
                partial = copy.with_name(f".{source.name}.partial")
                shutil.copyfile(source, partial)
                os.replace(partial, copy)  # never a half-written copy under the served name
        except FileNotFoundError:
            return None
        self._used.add(copy.parent)
        return str(copy)

    def prune(self) -> None:
        """Remove the copies not handed out since the previous prune (Gradio has its own copy of those by now)."""
        if self.folder.is_dir():
            for folder in self.folder.iterdir():
                if folder not in self._used:
                    shutil.rmtree(folder, ignore_errors=True)
        self._used = set()


def _recorded(run: Path, record: dict | None) -> Path | None:
    """A run directory another run recorded (core.runs.record_path), found as core.runs finds it; None if absent."""
    if not record:
        return None
    try:
        path = Path(find_recorded(record, run, "a stage", "--run"))
    except UserError:
        return None
    return path if (path / ckpt.META).is_file() else None


def trained_stages(prior_run: str | Path, decoder: str | Path | None = None) -> list[Stage]:
    """The served prior, then the autoencoder and text runs it records, then the served decoder."""
    prior_run = Path(prior_run)
    meta = ckpt.read_meta(prior_run, "prior")
    stages = [Stage("prior", prior_run)]
    text = meta.get("text", {})
    for name, recorded in (
        ("autoencoder", meta.get("autoencoder")),
        ("text", {"path": text["source"], **text} if "source" in text else None),
    ):
        path = _recorded(prior_run, recorded)  # a text encoder from an open_clip file has no run to show
        if path is not None:
            stages.append(Stage(name, path))
    if decoder is not None:
        stages.append(Stage("decoder", Path(decoder)))
    return stages


def read_metrics(run: str | Path) -> dict[str, tuple[list[int], list[float]]]:
    """metrics.jsonl as {key: (steps, values)} for every finite per-step scalar, in order of appearance.

    A line being written by a running stage (no newline yet, or cut) is skipped.
    """
    curves: dict[str, tuple[list[int], list[float]]] = {}
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        return curves
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            continue
        for key, value in row.items():
            if key in NOT_CURVES or key.startswith("final/") or isinstance(value, bool):
                continue
            if isinstance(value, (int, float)) and math.isfinite(value):
                steps, values = curves.setdefault(key, ([], []))
                steps.append(row["step"])
                values.append(float(value))
    return curves


def curves_figure(curves: dict[str, tuple[list[int], list[float]]], title: str) -> Figure | None:
    """One small plot per metric against the training step (losses first, then lr, then the rest)."""
    if not curves:
        return None
    keys = sorted(curves, key=lambda k: 0 if "loss" in k else 1 if k == "lr" else 2)[:MAX_CURVES]
    columns = min(3, len(keys))
    rows = math.ceil(len(keys) / columns)
    fig = Figure(figsize=(3.6 * columns, 2.6 * rows + 0.4), layout="constrained")
    FigureCanvasAgg(fig)
    for i, key in enumerate(keys):
        ax = fig.add_subplot(rows, columns, i + 1)
        steps, values = curves[key]
        ax.plot(steps, values, "o-" if len(steps) < 20 else "-", color="tab:blue", markersize=3, linewidth=1.2)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        if key == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=11)
    return fig


def sample_grids(run: str | Path) -> list[tuple[str, str]]:
    """The newest MAX_GRIDS sample grids a run wrote (samples/*.png by step, then its top-level PNGs)."""
    run = Path(run)
    over_time = sorted((run / "samples").glob("*.png")) if (run / "samples").is_dir() else []
    final = sorted(run.glob("*.png"))
    return [(str(p), p.stem.replace("_", " ")) for p in (over_time + final)[-MAX_GRIDS:]]


def read_summary(run: str | Path) -> dict:
    path = Path(run) / "summary.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return {}  # still training (summary.json is written at the end) or being written now


def evaluation_reports(run: str | Path) -> list[tuple[str, str | None]]:
    """(report.md, tradeoff.png or None) of each `latentdiff evaluate` output folder inside the run."""
    reports = []
    for report in sorted(Path(run).glob("*/report.json")):
        table = report.with_name("report.md")
        plot = report.with_name("tradeoff.png")
        text = table.read_text(encoding="utf-8") if table.is_file() else f"`{report}` (no report.md beside it)"
        reports.append((f"**{report.parent.name}/**\n\n{text}", str(plot) if plot.is_file() else None))
    return reports


def view(stage: Stage, copies: Copies) -> StageView:
    """What the page shows for one run, its image files as `copies` of them."""
    grids = [(copy, caption) for path, caption in sample_grids(stage.path) if (copy := copies(path)) is not None]
    reports = [(text, copies(plot) if plot else None) for text, plot in evaluation_reports(stage.path)]
    return StageView(
        stage,
        curves_figure(read_metrics(stage.path), f"{stage.name}: {stage.path}"),
        grids,
        read_summary(stage.path),
        reports,
    )
