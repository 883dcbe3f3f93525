"""`latentdiff generate "prompt" ... --run PRIOR_RUN`: images from prompts, a grid, and a JSON sidecar."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from pathlib import Path

from latentdiff.core.errors import cli_errors
from latentdiff.core.logger import save_grid


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="latentdiff generate", description="Generate images from text prompts.")
    p.add_argument("prompts", nargs="*", help='prompts, e.g. "a photo of a sneaker" ("" is unconditional)')
    p.add_argument("--prompts", dest="prompts_file", metavar="FILE", help="a text file with one prompt per line")
    p.add_argument("--run", required=True, help="prior run directory (it records its autoencoder and text encoder)")
    p.add_argument("--decoder", help="a `latentdiff train decoder` run to decode with (same latent space)")
    p.add_argument("--autoencoder", metavar="RUN", help="the prior's autoencoder run, if not where the run recorded it "
                                                        "(its latent space must be the one the prior trained on)")
    p.add_argument("--text", metavar="RUN", help="the prior's text encoder (run or openclip:MODEL:PRETRAINED), if "
                                                 "not where the run recorded it (same weights, checked by hash)")
    p.add_argument("--out", default="outputs", help="output directory (default: %(default)s)")
    p.add_argument("--n", type=int, default=4, help="images per prompt (default: %(default)s)")
    p.add_argument("--steps", type=int, help="sampler steps (default: the run's sampling.steps)")
    p.add_argument("--sampler", help="ddpm | ddim | dpmpp-2m | euler | heun (default: the run's)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: the run's)")
    p.add_argument("--negative", default="", help="negative prompt (what guidance steers away from)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0: deterministic)")
    p.add_argument("--seed", type=int, default=0, help="same seed and settings give the same images")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", help="force a device (default: cuda if available, else cpu)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="the UNet's while sampling: auto is bf16 on CUDA and on CPUs with AMX, else fp32")
    return p


def slug(text: str, n: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:n] or "unconditional"


def generate(args: argparse.Namespace) -> Path:
    from latentdiff.prior.pipeline import TextToImage

    prompts = list(args.prompts)
    if args.prompts_file:
        lines = Path(args.prompts_file).read_text(encoding="utf-8").splitlines()
        prompts += [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise ValueError('give at least one prompt ("" for unconditional), or --prompts FILE')
    pipe = TextToImage.from_run(args.run, device=args.device, decoder=args.decoder, precision=args.precision,
                                autoencoder=args.autoencoder, text=args.text)
    kwargs = dict(n=args.n, steps=args.steps, sampler=args.sampler, guidance=args.guidance,
                  negative_prompt=args.negative, seed=args.seed, eta=args.eta)
    settings = pipe.settings(prompts, **kwargs, batch_size=args.batch_size)
    images = pipe(prompts, **kwargs, batch_size=args.batch_size, show_progress=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for i, image in enumerate(images):
        prompt = prompts[i // args.n]
        path = out / f"{i // args.n:03d}_{slug(prompt)}_{i % args.n:02d}.png"
        save_grid(image[None], path, nrow=1)
        files.append(path.name)
    grid = save_grid(images, out / "grid.png", nrow=args.n)
    (out / "settings.json").write_text(json.dumps({**dataclasses.asdict(settings), "files": files}, indent=2) + "\n")
    print(f"{len(images)} images in {out}/ (grid: {grid}; one row per prompt; settings.json beside them)")
    return grid


def main(argv: list[str] | None = None) -> Path:
    args = build_parser().parse_args(argv)
    with cli_errors():
        return generate(args)


if __name__ == "__main__":
    main()
