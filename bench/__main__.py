"""`python -m bench` (what `make bench` runs): the seven benchmarks, each in its own process.

The samplers benchmark runs a reduced grid here (n = 250, NFE 5-20, in SUITE below) so the
suite stays under 20 minutes on 2 CPU cores; `python -m bench.samplers` alone runs its full
default grid (n = 2000, NFE up to 1000: many CPU-hours). Every table goes to stdout and
runs/bench/NAME.json; all of them to runs/bench/all.md.
Pass names to run a subset: `python -m bench data_loading generation`. The samplers table
scores the demo's prior; before `make demo` has made it, that table is skipped with a note.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

from .common import DEMO, OUT, ROOT

SUITE = [
    ("latent_vs_pixel", []),
    ("samplers", ["--n", "250", "--nfe", "5,10,20", "--batch-size", "250"]),
    ("data_loading", []),
    ("latent_cache", []),
    ("model_step", []),
    ("generation", []),
    ("resume", []),
]


def run_one(name: str, args: list[str]) -> int:
    """Run bench.NAME in its own process; Ctrl-C stops it and ends the suite with one line."""
    child = subprocess.Popen(
        [sys.executable, "-m", f"bench.{name}", *args], cwd=ROOT, start_new_session=True
    )  # Ctrl-C reaches only this process, not a traceback per child
    try:
        return child.wait()
    except KeyboardInterrupt:
        child.terminate()
        child.wait()
        print(f"\nbench: interrupted during bench.{name}; finished tables are in {OUT}", file=sys.stderr)
        raise SystemExit(130) from None


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if {"-h", "--help"} & set(argv):
        names = "\n".join(f"  {name}" for name, _ in SUITE)
        print(
            f"usage: python -m bench [NAME ...]\n\n{__doc__}\nbenchmarks (each also runs alone as "
            f"`python -m bench.NAME --help`):\n{names}"
        )
        return
    wanted = set(argv)
    unknown = wanted - {name for name, _ in SUITE}
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {sorted(unknown)}; choose from {[name for name, _ in SUITE]}")
    t_all = time.monotonic()
    failed, skipped = [], []
    for name, args in SUITE:
        if wanted and name not in wanted:
            continue
        if name == "samplers" and not (DEMO / "prior" / "meta.json").exists():
            skipped.append(name)
            print(
                f"\n=== bench.{name}: skipped: it scores the demo's prior, which does not exist yet "
                f"({DEMO / 'prior'}); run `make demo` first",
                flush=True,
            )
            continue
        t0 = time.monotonic()
        print(f"\n=== bench.{name} {' '.join(args)}", flush=True)
        returncode = run_one(name, args)
        print(f"=== bench.{name}: {time.monotonic() - t0:.0f} s", flush=True)
        if returncode != 0:
            failed.append(name)
    total = time.monotonic() - t_all
    # all.md: every table there is, so a partial run (`python -m bench generation`) updates its own.
    sections = []
    for name, args in SUITE:
        path = OUT / f"{name}.json"
        if path.exists():
            result = json.loads(path.read_text())
            m = result["machine"]
            sections.append(
                f"## {result['title']}\n\n_{m['date']}, {m['cpu']}, {m['torch_threads']} threads, torch "
                f"{m['torch']}; `python -m bench.{name} {' '.join(args)}`_\n\n{result['table']}\n"
            )
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "all.md").write_text("\n".join(sections))
    print(
        f"\nbench: {len(sections)} tables in {OUT / 'all.md'}; this run took {total / 60:.1f} min"
        + (f"; skipped: {', '.join(skipped)}" if skipped else "")
    )
    if failed:
        raise SystemExit(f"bench: failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
