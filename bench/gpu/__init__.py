"""`python -m bench.gpu`: the one prepared GPU check, at most 8 minutes on one GPU.

Four sections, each in a process with its own time limit (a section that fails or runs out of
time records why and the next one runs):
  1. every stage (autoencoder, text, prior, decoder, classifier) for a few steps with
     `--device cuda` and bf16 on the tiny presets, on `latentdiff data shapes`; a resume; a
     generate; `latentdiff serve` started and polled until its page answers;
  2. the base prior's training step at 256 px (32x32x4 latents, batch 32): images/s, model FLOP
     utilisation (torch.utils.flop_counter on the forward, a step = 3x the forward, over the
     GPU's bf16 dense peak from NVIDIA's datasheets), peak memory; gradient checkpointing on/off,
     channels_last, torch.compile, and diffusers' UNet2DConditionModel at the same config;
  3. guided generation with our UNet at SD-1.5's sizes, 64x64 latents, batch 1 and 8 (and batch 1
     compiled): steps/s, a step being one UNet call over the conditional and unconditional halves;
  4. data loading at 256 px from JPEG shards made on the fly, with the preset's workers, against
     the images/s the step of section 2 consumes.
Goals (H100, bf16): >= 40% MFU and >= 275 images/s (2.), >= 66 steps/s at batch 1 (3.), data >= 2x (4.).

It writes runs/bench/gpu.json and a Markdown table, runs/bench/gpu.md, naming the device, torch
and CUDA. On a machine without a CUDA GPU it refuses in one line (exit code 2).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from .plan import FULL, SECTIONS, SMOKE, TITLES, Sizes

# bench.common.ROOT, without importing bench.common (it imports torch; --help and the refusal must not).
ROOT = Path(__file__).resolve().parent.parent
REFUSED = 2  # the exit code of a machine without a GPU, as for any command the machine cannot run


def build_parser() -> argparse.ArgumentParser:
    limits = ", ".join(f"{name} {FULL.limits_s[name]} s" for name in SECTIONS)
    p = argparse.ArgumentParser(
        prog="python -m bench.gpu",
        description=__doc__,
        epilog=f"Per-section limits: {limits} ({sum(FULL.limits_s.values())} s in all).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", help="JSON file (default: runs/bench/gpu.json); the Markdown table goes beside it (.md)")
    p.add_argument(
        "--sections", default=",".join(SECTIONS), help="comma-separated subset to run (default: %(default)s)"
    )
    # For the tests: every section at toy sizes on the CPU, which proves the code paths and measures nothing.
    p.add_argument("--cpu-smoke", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--child", help=argparse.SUPPRESS)  # the sections a watched child process runs
    p.add_argument("--work", help=argparse.SUPPRESS)  # the folder parent and child share
    return p


# ---- is there a GPU? (before anything heavy is imported) ----------------------------------------------------


def cuda_driver_devices() -> int:
    """NVIDIA GPUs the CUDA driver reports (it honours CUDA_VISIBLE_DEVICES); 0 without a driver.

    Asks libcuda through ctypes, so a machine without a GPU is refused before torch is imported.
    """
    import ctypes

    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            lib = ctypes.CDLL(name)
            break
        except OSError:
            continue
    else:
        return 0
    count = ctypes.c_int(0)
    if lib.cuInit(0) != 0 or lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0  # e.g. CUDA_ERROR_NO_DEVICE
    return count.value


def refusal() -> str | None:
    """The one line a machine without a usable CUDA GPU is refused with, or None when torch sees one."""
    if cuda_driver_devices() == 0:
        return (
            "bench.gpu: no CUDA GPU here (the NVIDIA driver reports none); it measures a GPU, so run it on a "
            "machine with one (`python -m bench.gpu --help` says what it runs)"
        )
    import torch

    if not torch.cuda.is_available():  # a driver too old for this torch build, most often
        return (
            f"bench.gpu: the driver reports a GPU but torch {torch.__version__} (built for CUDA "
            f"{torch.version.cuda}) cannot use it; install the torch build for this driver (nvidia-smi shows it)"
        )
    return None


# ---- the watched child: runs sections, writes each one's result as it goes ----------------------------------


def _write(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)  # the parent never reads half a file


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def run_child(names: list[str], work: Path, sizes: Sizes) -> None:
    from ..common import machine
    from . import data, speed, stages

    run = {"stages": stages.run, "train_step": speed.train_step, "generation": speed.generation}
    run["data"] = data.run
    if not (work / "machine.json").exists():
        import torch

        info = machine()
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            info.update(cuda=torch.version.cuda, gpu_memory_gib=round(props.total_memory / 2**30, 1))
        _write(work / "machine.json", info)
    earlier = {n: r for n in SECTIONS if (r := _read(work / f"{n}.json"))}
    for name in names:
        _write(work / f"{name}.started", {"time": time.time()})
        partial: dict = {}

        def record(rows: dict, name=name, partial=partial) -> None:
            partial.update(rows)
            _write(work / f"{name}.partial.json", partial)

        print(f"\n=== bench.gpu: {TITLES[name]} (limit {sizes.limits_s[name]} s)", flush=True)
        (work / name).mkdir(exist_ok=True)
        try:
            result = {**run[name](sizes, work / name, record, earlier), "status": "ok"}
        except Exception as e:  # the next section still runs; the error is in the table
            traceback.print_exc()
            result = {**partial, "status": "failed", "error": f"{type(e).__name__}: {e}".splitlines()[0]}
        earlier[name] = result
        _write(work / f"{name}.json", result)


# ---- the parent: starts the child, stops a section at its limit, writes the report -------------------------


def _stop(child: subprocess.Popen) -> None:
    """End the child and everything it started (serve), which share its process group."""
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    child.wait()


CHILD = [sys.executable, "-m", "bench.gpu"]


def run_sections(
    names: list[str], work: Path, sizes: Sizes, smoke: bool, child_command: list[str] = CHILD
) -> dict[str, dict]:
    """Each section's result; a child process runs them in turn and is restarted past one that fails hard.

    A section whose result has not come within its limit (sizes.limits_s) is stopped with its
    child (and what that started); one whose child died is recorded with the exit code. Either
    keeps the rows the section had recorded, and a fresh child runs the sections after it.
    child_command: the program run as `CHILD --child NAMES --work DIR [--cpu-smoke]`.
    """
    results: dict[str, dict] = {}
    remaining = list(names)
    while remaining:
        argv = [*child_command, "--child", ",".join(remaining), "--work", str(work)] + ["--cpu-smoke"] * smoke
        child = subprocess.Popen(argv, cwd=ROOT, start_new_session=True)
        spawned = time.time()
        try:
            while remaining:
                name = remaining[0]
                done = _read(work / f"{name}.json")
                if done is not None:
                    results[name] = done
                    remaining.pop(0)
                    continue
                marker = _read(work / f"{name}.started")  # the section's own start: the child's import is not its time
                started = marker["time"] if marker else spawned
                limit = sizes.limits_s[name]
                code = child.poll()
                if code is not None or time.time() - started > limit:
                    if code is None:
                        _stop(child)
                        why = f"stopped at its {limit} s limit"
                    elif (done := _read(work / f"{name}.json")) is not None:
                        continue  # it finished as the process ended
                    else:
                        why = f"its process ended with exit code {code}"
                    results[name] = {**(_read(work / f"{name}.partial.json") or {}), "status": "failed", "error": why}
                    remaining.pop(0)
                    break  # a fresh child for the rest
                time.sleep(0.2)
        except KeyboardInterrupt:
            _stop(child)
            for name in remaining:
                results[name] = {"status": "failed", "error": "interrupted (Ctrl-C)"}
            return results
        if not remaining:
            child.wait()
    return results


def markdown(results: dict[str, dict], machine: dict, total_s: float, smoke: bool) -> tuple[str, list[dict]]:
    """The report's Markdown and its goal lines ({goal, measured, met})."""
    from ..common import table

    gpu = machine.get("gpu") or "no GPU"
    lines = [
        f"_{machine.get('date', '?')}, {gpu}"
        + (f" ({machine['gpu_memory_gib']} GiB)" if machine.get("gpu_memory_gib") else "")
        + f", torch {machine.get('torch', '?')}, CUDA {machine.get('cuda') or 'n/a'}, {machine.get('cpu', '?')} "
        f"({machine.get('cpu_count', '?')} cores); {total_s:.0f} s in all; `python -m bench.gpu`_"
    ]
    if smoke:
        lines.append(
            "\n**CPU smoke run (`--cpu-smoke`)**: toy sizes on the CPU; it proves the script's code paths and "
            "measures nothing."
        )
    goals = []
    for name, result in results.items():
        lines.append(f"\n### {TITLES[name]}\n")
        if result.get("columns") and result.get("rows"):
            lines.append(table(result["columns"], result["rows"]))
        for note in result.get("notes", []):
            lines.append(f"\n{note}")
        if result["status"] != "ok":
            lines.append(
                f"\n**Section failed: {result['error']}**" + (" (rows above: what finished)" * bool(result.get("rows")))
            )
        for goal, measured, met in result.get("goals") or []:
            goals.append({"goal": goal, "measured": measured, "met": met})
    if goals:
        verdict = {True: "met", False: "not met", None: "n/a"}
        rows = [[g["goal"], g["measured"], verdict[g["met"]]] for g in goals]
        lines.append("\n### Goals\n\n" + table(["goal", "measured", "met"], rows))
    return "\n".join(lines) + "\n", goals


def main(argv: list[str] | None = None) -> dict | None:
    args = build_parser().parse_args(argv)
    smoke = args.cpu_smoke
    sizes = SMOKE if smoke else FULL
    names = [n.strip() for n in args.sections.split(",") if n.strip()]
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        raise SystemExit(f"bench.gpu: unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    if args.child:
        run_child(args.child.split(","), Path(args.work), sizes)
        return None
    if not smoke and (why := refusal()):
        print(why, file=sys.stderr)
        raise SystemExit(REFUSED)

    out = Path(args.out) if args.out else ROOT / "runs" / "bench" / ("gpu-cpu-smoke.json" if smoke else "gpu.json")
    work = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    t0 = time.monotonic()
    try:
        results = run_sections(names, work, sizes, smoke)
        machine = _read(work / "machine.json") or {}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    total = time.monotonic() - t0
    text, goals = markdown(results, machine, total, smoke)
    title = "GPU check: `python -m bench.gpu`" + (" (CPU smoke run)" if smoke else "")
    print(f"\n## {title}\n\n{text}")
    for g in goals:
        print(f"goal: {g['goal']}: {g['measured']}: {({True: 'met', False: 'not met', None: 'n/a'})[g['met']]}")
    report = {"benchmark": "gpu", "title": title, "smoke": smoke, "machine": machine, "total_s": total,
              "sections": results, "goals": goals, "table": text}  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(f"## {title}\n\n{text}")
    print(f"\n(figures: {out}; table: {out.with_suffix('.md')})")
    return report
