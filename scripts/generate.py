"""`latentdiff generate "prompt" ... --run PRIOR_RUN`: images from prompts, a grid, and a JSON sidecar."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import unicodedata
from pathlib import Path

from latentdiff.core.errors import cli_errors
from latentdiff.core.logger import save_grid, save_png
from latentdiff.core.outputs import fresh_output_dir
from latentdiff.prior.samplers import add_sampler_arguments, sampler_arguments


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
    p.add_argument("--out", default="outputs", help="output directory, new or empty (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the images, grid and settings.json of an earlier generate in --out")
    p.add_argument("--n", type=int, default=4, help="images per prompt (default: %(default)s)")
    add_sampler_arguments(p)
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale, >= 0 (default: the run's)")
    p.add_argument("--guidance-rescale", type=float, default=0.0,
                   help="guidance rescale phi in [0, 1] (Lin et al. 2024 §3.4; 0.7 in the paper; default: 0, off)")
    p.add_argument("--negative", default="", help="negative prompt (what guidance steers away from)")
    p.add_argument("--seed", type=int, default=0, help="same seed and settings give the same images")
    p.add_argument("--batch-size", type=int, default=64,
                   help="images per sampling pass (memory vs speed)")
    p.add_argument("--device", help="force a device (default: cuda if available, else cpu)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="the UNet's while sampling: auto is bf16 on CUDA and on CPUs with AMX, else fp32")
    return p


def slug(text: str, n: int = 40) -> str:
    """A file-name-safe ASCII slug of a prompt; "prompt" when it has no ASCII letters (emoji, Chinese)."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    if not text.strip():
        return "unconditional"
    return re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")[:n].strip("-") or "prompt"


def generate(args: argparse.Namespace) -> Path:
    from latentdiff.prior.pipeline import TextToImage

    prompts = list(args.prompts)
    if args.prompts_file:
        try:
            lines = Path(args.prompts_file).read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            raise ValueError(f"--prompts {args.prompts_file}: no such file") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"--prompts {args.prompts_file} is not UTF-8 text ({e.reason} at byte {e.start}); "
                             "save it as UTF-8") from None
        prompts += [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise ValueError('give at least one prompt ("" for unconditional), or --prompts FILE')
    out = Path(args.out)
    fresh_output_dir(out, args.overwrite, ours=["[0-9][0-9][0-9]_*.png", "grid.png", "settings.json"])
    pipe = TextToImage.from_run(args.run, device=args.device, decoder=args.decoder, precision=args.precision,
                                autoencoder=args.autoencoder, text=args.text)
    kwargs = dict(n=args.n, steps=args.steps, sampler=args.sampler, guidance=args.guidance,
                  negative_prompt=args.negative, seed=args.seed, guidance_rescale=args.guidance_rescale,
                  sampler_options=sampler_arguments(args))
    settings = pipe.settings(prompts, **kwargs, batch_size=args.batch_size)
    images = pipe(prompts, **kwargs, batch_size=args.batch_size, show_progress=True)
    files = []
    for i, image in enumerate(images):
        prompt = prompts[i // args.n]
        path = out / f"{i // args.n:03d}_{slug(prompt)}_{i % args.n:02d}.png"
        save_png(image, path)
        files.append(path.name)
    title = (f"{settings.sampler}, {settings.steps} steps, guidance {settings.guidance:g}, seed {settings.seed}"
             + (f", negative: {args.negative}" if args.negative else ""))
    grid = save_grid(images, out / "grid.png", nrow=args.n, labels=[p or "(unconditional)" for p in prompts],
                     title=title)
    (out / "settings.json").write_text(json.dumps({**dataclasses.asdict(settings), "files": files}, indent=2) + "\n")
    print(f"{len(images)} images in {out}/ (grid: {grid}; one row per prompt; settings.json beside them)")
    return grid


def main(argv: list[str] | None = None) -> Path:
    args = build_parser().parse_args(argv)
    with cli_errors():
        return generate(args)


if __name__ == "__main__":
    main()
