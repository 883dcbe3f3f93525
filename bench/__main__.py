"""`python -m bench` (what `make bench` runs): the seven benchmarks, each in its own process.

The samplers benchmark runs a reduced grid here (--n and --nfe below) so the suite stays under
20 minutes on 2 CPU cores; run `python -m bench.samplers` with the issue's defaults for the
full grid. Every table goes to stdout and runs/bench/NAME.json; all of them to runs/bench/all.md.
Pass names to run a subset: `python -m bench data_loading generation`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

from .common import OUT, ROOT

SUITE = [
    ("latent_vs_pixel", []),
    ("samplers", ["--n", "250", "--nfe", "5,10,20,50", "--batch-size", "250"]),
    ("data_loading", []),
    ("latent_cache", []),
    ("model_step", []),
    ("generation", []),
    ("resume", []),
]


def main(argv: list[str] | None = None) -> None:
    wanted = set(sys.argv[1:] if argv is None else argv)
    unknown = wanted - {name for name, _ in SUITE}
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {sorted(unknown)}; choose from {[name for name, _ in SUITE]}")
    t_all = time.monotonic()
    failed = []
    for name, args in SUITE:
        if wanted and name not in wanted:
            continue
        t0 = time.monotonic()
        print(f"\n=== bench.{name} {' '.join(args)}", flush=True)
        done = subprocess.run([sys.executable, "-m", f"bench.{name}", *args], cwd=ROOT)
        print(f"=== bench.{name}: {time.monotonic() - t0:.0f} s", flush=True)
        if done.returncode != 0:
            failed.append(name)
    total = time.monotonic() - t_all
    # all.md: every table there is, so a partial run (`python -m bench generation`) updates its own.
    sections = []
    for name, args in SUITE:
        path = OUT / f"{name}.json"
        if path.exists():
            result = json.loads(path.read_text())
            m = result["machine"]
            sections.append(f"## {result['title']}\n\n_{m['date']}, {m['cpu']}, {m['torch_threads']} threads, torch "
                            f"{m['torch']}; `python -m bench.{name} {' '.join(args)}`_\n\n{result['table']}\n")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "all.md").write_text("\n".join(sections))
    print(f"\nbench: {len(sections)} tables in {OUT / 'all.md'}; this run took {total / 60:.1f} min")
    if failed:
        raise SystemExit(f"bench: failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
