"""bench.gpu section 1: every stage for a few steps on the device, a resume, a generate, a serve start-up.

The commands are the user's: `latentdiff ...` argv run through the CLI's `main` in this process
(one import for all of them), in the order a user runs them, on the tiny presets with
`--device DEVICE` and bf16 (`train.precision`, `--precision`). `latentdiff serve` runs as its own
process, as a user starts it, and is polled over HTTP until the page answers, then stopped.
A failing command records its last error line and the next one still runs.
"""

from __future__ import annotations

import contextlib
import io
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from .plan import Sizes

PROMPT = "a large red circle on the left"


class _Tee(io.TextIOBase):
    """Writes to the real stream and keeps a copy, so a failed command's last line can be recorded."""

    def __init__(self, stream):
        self.stream, self.copy = stream, io.StringIO()

    def write(self, text: str) -> int:
        self.copy.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()


def last_line(text: str) -> str:
    """The last non-empty line of a command's stderr (progress bars end lines with \\r)."""
    lines = [line.strip() for line in text.replace("\r", "\n").splitlines() if line.strip()]
    return lines[-1] if lines else ""


def run_command(argv: list[str]) -> tuple[float, str | None]:
    """(seconds, None) when `latentdiff ARGV` exits 0, else (seconds, its error in one line)."""
    from latentdiff.scripts.cli import main as cli_main

    tee = _Tee(sys.stderr)
    t0 = time.perf_counter()
    error = None
    try:
        with contextlib.redirect_stderr(tee):
            code = cli_main(argv)
        if code not in (0, None):
            error = f"exit code {code}: {last_line(tee.copy.getvalue())}"
    except SystemExit as e:
        if e.code not in (0, None):
            error = e.code if isinstance(e.code, str) else f"exit code {e.code}: {last_line(tee.copy.getvalue())}"
    except Exception as e:  # a crash is what this check looks for: record it, run the next command
        error = f"{type(e).__name__}: {e}".splitlines()[0]
    return time.perf_counter() - t0, error


def commands(sizes: Sizes, work: Path) -> list[tuple[str, list[str]]]:
    """(name, latentdiff argv) in the order a user runs them."""
    dev, steps = ["--device", sizes.device], str(sizes.stage_steps)
    train = ["--steps", steps, *dev, "--set", f'train.precision="{sizes.precision}"']
    data = ["--data", str(work / "shapes")]
    extra = sizes.stage_flags
    eighth = str(max(4, sizes.shapes_n // 8))
    return [
        ("data shapes", ["data", "shapes", "--out", str(work / "shapes"), "--n", str(sizes.shapes_n)]
         + ["--val-n", eighth, "--test-n", eighth, "--quiet"]),
        ("train autoencoder", ["train", "autoencoder", *data, "--out", str(work / "ae"), *train,
                               *extra.get("autoencoder", ())]),
        ("train text", ["train", "text", *data, "--out", str(work / "text"), *train, *extra.get("text", ())]),
        ("train prior", ["train", "prior", *data, "--out", str(work / "prior"), "--autoencoder", str(work / "ae")]
         + ["--text", str(work / "text"), *train, *extra.get("prior", ())]),
        # A resume past the end: the run's own records (data, config, the runs it read) and 2 more steps.
        ("train prior --resume", ["train", "prior", "--resume", str(work / "prior"),
                                  "--steps", str(sizes.stage_steps + 2), *dev]),
        ("train decoder", ["train", "decoder", *data, "--out", str(work / "decoder"), "--autoencoder",
                           str(work / "ae"), *train, *extra.get("decoder", ())]),
        ("train classifier", ["train", "classifier", *data, "--out", str(work / "classifier"), *train,
                              *extra.get("classifier", ())]),
        ("generate", ["generate", PROMPT, "--run", str(work / "prior"), "--out", str(work / "generated"), *dev,
                      "--precision", sizes.precision, *extra.get("generate", ())]),
    ]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_startup(sizes: Sizes, run: Path, limit_s: float) -> tuple[float, str | None]:
    """Seconds from `latentdiff serve` to its page answering HTTP 200, then stop it; (seconds, error or None)."""
    port = free_port()
    argv = ["serve", "--run", str(run), "--port", str(port), "--device", sizes.device, "--precision", sizes.precision]
    # Its own process, in this process's group: stopping this section stops it too.
    child = subprocess.Popen(
        [sys.executable, "-m", "latentdiff.scripts.cli", *argv], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    t0 = time.perf_counter()
    error = None
    try:
        while True:
            if child.poll() is not None:
                error = f"exit code {child.returncode}: {last_line(child.stderr.read().decode(errors='replace'))}"
                break
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass  # not listening yet
            if time.perf_counter() - t0 > limit_s:
                error = f"no answer on port {port} after {limit_s:.0f} s"
                break
            time.sleep(0.25)
        seconds = time.perf_counter() - t0
    finally:
        if child.poll() is None:
            child.terminate()  # SIGTERM stops it as Ctrl-C does (scripts/serve.py)
            try:
                child.wait(timeout=20)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
    return seconds, error


def run(sizes: Sizes, work: Path, record: Callable[[dict], None], earlier: dict) -> dict:
    """Section 1; `record` saves the rows so far (a section stopped at its limit keeps them)."""
    t0 = time.perf_counter()
    rows: list[list] = []
    failed: list[str] = []
    for name, argv in commands(sizes, work):
        seconds, error = run_command(argv)
        rows.append([f"`latentdiff {name}`", f"{seconds:.1f}", "ok" if error is None else f"FAILED: {error}"])
        if error:
            failed.append(name)
        print(f"bench.gpu: {name}: {rows[-1][2]} ({seconds:.1f} s)", flush=True)
        record({"rows": rows})
    seconds, error = serve_startup(sizes, work / "prior", sizes.limits_s["stages"] - (time.perf_counter() - t0) - 2)
    rows.append(
        ["`latentdiff serve` until its page answers", f"{seconds:.1f}", "ok" if error is None else f"FAILED: {error}"]
    )
    if error:
        failed.append("serve")
    return {
        "columns": ["command", "s", "result"],
        "rows": rows,
        "notes": [
            f"Tiny presets, `--device {sizes.device}`, {sizes.precision} (`train.precision`, `--precision`), "
            f"{sizes.stage_steps} steps per stage on `latentdiff data shapes --n {sizes.shapes_n}`; "
            "each time includes the stage's final evaluation and checkpoint."
        ],
        "figures": {"failed": failed},
        "goals": [("every command runs on the device", "; ".join(failed) or "all ran", not failed)],
    }
