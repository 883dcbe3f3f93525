"""What every benchmark shares: timing, the machine's description, tables, JSON, tiny models, data.

Each benchmark is `python -m bench.NAME [flags]` from the repository root: it prints a Markdown
table (what docs/benchmarks.md carries) and writes the same figures as JSON under --out (default
runs/bench/NAME.json), with the machine, torch version and thread count they were measured on.
Figures are wall-clock medians over repeats after warm-up; nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "runs" / "demo"
OUT = ROOT / "runs" / "bench"


# ---- measuring ----------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_it(fn: Callable[[], Any], *, warmup: int = 1, repeats: int = 3, device: torch.device | None = None) -> float:
    """Median seconds per call of fn() over `repeats` calls after `warmup` untimed ones."""
    device = device or torch.device("cpu")
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def optimizer_step(loss: torch.Tensor, model: torch.nn.Module, opt: torch.optim.Optimizer, grad_clip: float) -> None:
    """The stage loops' backward, clip and AdamW step after a loss (what the benchmarks time with it)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or float("inf"))
    opt.step()


def rss_mb() -> float:
    """This process's resident memory now, MB (Linux /proc; 0 elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return 0.0


def peak_rss_mb() -> float:
    """The peak resident memory of this process so far, MB (ru_maxrss is in KB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine() -> dict[str, Any]:
    """Where the figures were measured: they mean nothing without it."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "date": datetime.date.today().isoformat(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return info


def device() -> torch.device:
    from latentdiff.core.runtime import pick_device

    return pick_device()


# ---- reporting ----------------------------------------------------------------------------------


def table(columns: list[str], rows: list[list[Any]]) -> str:
    """A Markdown table; floats are printed as they were formatted by the caller (pass strings)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def report(name: str, title: str, text: str, figures: dict[str, Any], out: str | Path | None = None) -> Path:
    """Print the table under its title and write {machine, figures, table} as JSON."""
    m = machine()
    text = text.replace(f"{ROOT}/", "")  # paths as a user in the repository root types them
    print(f"\n## {title}\n")
    print(
        f"_{m['date']}, {m['cpu']} ({m['cpu_count']} cores, {m['torch_threads']} torch threads), "
        f"torch {m['torch']}{', ' + m['gpu'] if m['gpu'] else ''}_\n"
    )
    print(text, flush=True)
    path = Path(out) if out else OUT / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps({"benchmark": name, "title": title, "machine": m, "figures": figures, "table": text}, indent=2)
        + "\n"
    )
    print(f"\n(figures: {path})")
    return path


def parser(name: str, doc: str | None, data: bool = False) -> argparse.ArgumentParser:
    """The flags every benchmark takes (--out); data: also --data, the shards `bench_data` falls back from."""
    p = argparse.ArgumentParser(
        prog=f"python -m bench.{name}", description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", help=f"JSON file for the figures (default: runs/bench/{name}.json)")
    if data:
        p.add_argument("--data", help="shards (default: the demo's, else generated shapes)")
    return p


def add_scenes_prior_flags(p: argparse.ArgumentParser, n: int, required: bool = True) -> None:
    """The flags of a benchmark that samples a scenes prior and reads its images (bench.attributes, .counting,
    .relations): --prior, --data (the palette), --n images per caption, --guidance, --steps, --binding, --seed,
    --checkpoint."""
    p.add_argument("--prior", required=required, help="a scenes prior run")
    p.add_argument("--data", required=required, help="the scenes data it was trained on (its info.json's palette)")
    p.add_argument("--n", type=int, default=n, help="images per caption (default: %(default)s)")
    p.add_argument("--guidance", type=float, help="default: the prior's [sampling] guidance")
    p.add_argument("--steps", type=int, help="default: the prior's [sampling] steps")
    p.add_argument("--binding", type=float, metavar="STEP", help="default: the prior's [sampling] binding")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--checkpoint", type=int, help="the step of a checkpoint the prior run keeps (default: its newest)")


def load_scenes_prior(args: argparse.Namespace) -> tuple[Any, dict, dict, dict[str, Any]]:
    """(pipeline, palette, sampling options, figures) for add_scenes_prior_flags' args: the prior at --checkpoint
    on device(), the scenes palette of --data, the --guidance/--steps/--binding given (else the prior's defaults),
    and {run, checkpoint, sampler, steps, guidance, binding} as it samples."""
    from latentdiff.data.reader import read_info
    from latentdiff.prior.pipeline import TextToImage

    palette = read_info(args.data)["palette"]
    pipe = TextToImage.from_run(args.prior, device=device(), checkpoint=args.checkpoint)
    given = {"guidance": args.guidance, "steps": args.steps, "binding": args.binding}
    options = {k: v for k, v in given.items() if v is not None}
    settings = pipe.settings(["a star"], n=1, **options)
    figures = {"run": args.prior, "checkpoint": pipe.checkpoint, "sampler": settings.sampler,
               "steps": settings.steps, "guidance": settings.guidance, "binding": settings.binding}  # fmt: skip
    return pipe, palette, options, figures


def prior_name(figures: dict[str, Any]) -> str:
    """A table's name for load_scenes_prior's figures: "RUN (w = 3, binding 0.3, step 2850)"."""
    at = f", step {figures['checkpoint']}" if figures["checkpoint"] is not None else ""
    bound = f", binding {figures['binding']:g}" if figures.get("binding") else ""
    return f"{figures['run']} (w = {figures['guidance']:g}{bound}{at})"


# ---- inputs -------------------------------------------------------------------------------------


def bench_data(data: str | None = None) -> str:
    """The demo's shards when they exist, else 6,000 procedural shapes made once under runs/bench/data."""
    if data:
        return data
    if (DEMO / "data" / "info.json").exists():
        return str(DEMO / "data")
    path = OUT / "data"
    if not (path / "info.json").exists():
        from latentdiff.data.shapes import build

        print(f"no demo data ({DEMO / 'data'}); writing 6,000 shapes to {path}", flush=True)
        build(path, n=6000, seed=0)
    return str(path)


def tiny_prior_config():
    from latentdiff.core.config import load_preset
    from latentdiff.prior.config import PriorConfig
    from latentdiff.prior.stage import PRESETS

    return load_preset(PriorConfig, PRESETS, "tiny")


def tiny_autoencoder(dev: torch.device):
    """The tiny preset's autoencoder with its initial weights (speed does not depend on the weights)."""
    from latentdiff.autoencoder.model import Autoencoder, AutoencoderConfig
    from latentdiff.autoencoder.stage import PRESETS
    from latentdiff.core.config import load_preset

    cfg = load_preset(AutoencoderConfig, PRESETS, "tiny")
    return Autoencoder(cfg.model).to(dev), cfg


def tiny_text_encoder(dev: torch.device):
    """The demo's frozen text encoder when it exists, else clip-tiny with initial weights."""
    from latentdiff.text.encoder import TextEncoder
    from latentdiff.text.model import build_clip, load_model_config
    from latentdiff.text.sources import load_text_encoder
    from latentdiff.text.tokens import build_tokenizer

    if (DEMO / "text" / "meta.json").exists():
        encoder = load_text_encoder(str(DEMO / "text"))
    else:
        config = load_model_config("clip-tiny")
        encoder = TextEncoder(build_clip(config), build_tokenizer(config), config, "clip-tiny (initial weights)")
    return encoder.to(dev).frozen(cache_size=4096)


def demo_pipeline(dev: torch.device):
    """(TextToImage of the demo prior, True), or a tiny pipeline with initial weights and False."""
    from latentdiff.prior.pipeline import TextToImage

    if (DEMO / "prior" / "meta.json").exists():
        return TextToImage.from_run(DEMO / "prior", device=dev), True
    from latentdiff.prior.unet import UNet

    cfg = tiny_prior_config()
    ae, _ = tiny_autoencoder(dev)
    ae.eval().requires_grad_(False)
    encoder = tiny_text_encoder(dev)
    unet = UNet(cfg.model).to(dev).eval().requires_grad_(False)
    space = untrained_latent_space(ae, cfg.resolution)
    return TextToImage(unet, cfg, encoder, ae, space, ROOT / "runs" / "bench" / "random-prior"), False


def untrained_latent_space(ae, resolution: int):
    """A LatentSpace for an autoencoder with initial weights: unit scale, clip bound 4 (speed depends on neither)."""
    from latentdiff.autoencoder.load import encoder_hash
    from latentdiff.core.latent_space import LatentSpace

    return LatentSpace(
        scale=1.0,
        absmax=4.0,
        channels=ae.cfg.latent_channels,
        downsampling=ae.cfg.downsampling,
        resolution=resolution,
        encoder_hash=encoder_hash(ae),
    )
