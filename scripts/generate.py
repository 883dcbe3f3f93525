"""`latentdiff generate "prompt" ... --run PRIOR_RUN`: images from prompts, a grid, and a JSON sidecar.

Also img2img (`--init-image IMG --strength S`), inpainting (`--mask MASK`, `--feather PX`,
`--resample U`) and `--from-png FILE` (make again the image a PNG of ours describes, or an A1111
PNG's prompt and settings with `--run`; prior/parameters.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import unicodedata
from pathlib import Path

from latentdiff.core.errors import cli_errors
from latentdiff.core.outputs import OutputFolder
from latentdiff.core.runtime import announce, sampling_precision
from latentdiff.prior.parameters import (
    a1111_arguments,
    call_arguments,
    generate_command,
    grid_title,  # noqa: F401  (re-exported: the grid's title line)
    read_png,
    save_generated_png,
    save_settings_grid,
)
from latentdiff.prior.pipeline import (
    add_binding_arguments,
    add_guidance_interval_argument,
    add_guidance_rescale_argument,
    add_precision_argument,
    add_stage_arguments,
    pipeline_from_arguments,
)
from latentdiff.prior.samplers import add_sampler_arguments, sampler_arguments

# What --from-png may be combined with: where and how to run, not what to make.
FROM_PNG_FLAGS = ("from_png", "run", "out", "overwrite", "device", "precision", "decoder", "autoencoder", "text")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="latentdiff generate", description="Generate images from text prompts.")
    p.add_argument("prompts", nargs="*", help='prompts, e.g. "a photo of a sneaker" ("" is unconditional)')
    p.add_argument("--prompts", dest="prompts_file", metavar="FILE", help="a text file with one prompt per line")
    p.add_argument(
        "--run",
        help="prior run directory (it records its autoencoder and text encoder); required unless --from-png names it",
    )
    p.add_argument("--decoder", help="a `latentdiff train decoder` run to decode with (same latent space)")
    add_stage_arguments(p)
    p.add_argument("--out", default="outputs", help="output directory, new or empty (default: %(default)s)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the images, grid and settings.json of an earlier generate in --out",
    )
    p.add_argument("--n", type=int, default=4, help="images per prompt (default: %(default)s)")
    add_sampler_arguments(p)
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale, >= 0 (default: the run's)")
    add_guidance_rescale_argument(p)
    add_guidance_interval_argument(p)
    add_binding_arguments(p)
    p.add_argument("--negative", default="", help="negative prompt (what guidance steers away from)")
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="image k of the call is made from seed + k (recorded in its PNG): the same whatever --n and --batch-size",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=64,
        help="images per sampling pass (memory vs speed; the images do not depend on it)",
    )
    p.add_argument(
        "--init-image",
        metavar="IMG",
        help="img2img (SDEdit): start from this image, read at the run's resolution (center-cropped)",
    )
    p.add_argument(
        "--strength",
        type=float,
        help="img2img: how far IMG is noised, 0..1 (the sampler starts at "
        "timestep S*T; 0 = IMG's reconstruction, 1 = text-to-image; "
        "default 0.75, 1 with --mask)",
    )
    p.add_argument(
        "--mask",
        metavar="MASK",
        help="inpainting (with --init-image): white = repaint, black = keep (kept pixels stay IMG's exactly)",
    )
    p.add_argument(
        "--feather",
        type=int,
        default=0,
        metavar="PX",
        help="inpainting: fade the new pixels in over the PX pixels of the repainted region next to the kept "
        "one (kept pixels stay exact; default: %(default)s, a hard edge)",
    )
    p.add_argument(
        "--resample",
        type=int,
        default=1,
        metavar="U",
        help="inpainting: RePaint (Lugmayr et al. 2022), each step taken U times for better seams, U x the "
        "time; with --sampler ddpm (default: %(default)s, off)",
    )
    p.add_argument(
        "--checkpoint",
        type=int,
        metavar="STEP",
        help="sample the run's checkpoint of this step (one it still keeps; default: the newest)",
    )
    p.add_argument(
        "--from-png",
        metavar="FILE",
        help="make again the image a PNG of generate or serve describes (its 'latentdiff' chunk); "
        "or, with --run, the prompt and settings of an A1111 PNG (its 'parameters' chunk)",
    )
    p.add_argument("--device", help="force a device (default: cuda if available, else cpu)")
    add_precision_argument(p)
    return p


def read_prompts(path: str) -> list[str]:
    """The non-empty lines of a UTF-8 prompts file; ValueError (one line, naming the file) otherwise."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ValueError(f"--prompts {path}: no such file") from None
    except UnicodeDecodeError as e:
        raise ValueError(
            f"--prompts {path} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8"
        ) from None
    return [line.strip() for line in lines if line.strip()]


def slug(text: str, n: int = 40) -> str:
    """A file-name-safe ASCII slug of a prompt; "prompt" when it has no ASCII letters (emoji, Chinese)."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    if not text.strip():
        return "unconditional"
    return re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")[:n].strip("-") or "prompt"


def from_png_arguments(args: argparse.Namespace, parser: argparse.ArgumentParser):
    """(prompts, pipeline keyword arguments, index or None) of the image --from-png names; refuses flags that change it.

    A PNG of ours remakes its image (from its checkpoint; its run and precision unless given); an A1111
    PNG needs --run, and one line says what was mapped and what ignored.
    """
    changed = [
        k
        for k, v in vars(args).items()
        if k not in FROM_PNG_FLAGS and v != parser.get_default(k) and not (k == "prompts" and v == [])
    ]
    if changed:
        flags = ", ".join(
            "prompts" if k == "prompts" else "--" + k.removeprefix("sampler_").replace("_", "-") for k in changed
        )
        raise ValueError(
            f"--from-png makes the recorded image again; {flags} cannot change it (generate without "
            "--from-png for other settings)"
        )
    kind, found = read_png(args.from_png)
    if kind == "a1111":
        if args.run is None:
            raise ValueError(
                f"--from-png {args.from_png} is an A1111 PNG: it names no latentdiff run; add --run PRIOR_RUN"
            )
        prompts, kwargs, mapped, ignored = a1111_arguments(args.from_png, found)
        print(
            f"--from-png {args.from_png} (A1111 parameters): mapped {', '.join(mapped)}; "
            f"ignored {', '.join(ignored) or 'nothing'}"
        )
        return prompts, kwargs, None
    args.run = args.run or found["run"]
    args.decoder = args.decoder or found.get("decoder")
    args.checkpoint = found.get("checkpoint")  # the weights it was made with (absent before: the newest)
    args.lora = [f"{file}:{scale!r}" for file, scale in found.get("loras") or []]  # merged as it was made
    if args.precision == "auto":  # the precision it was made in, unless asked otherwise
        args.precision = found.get("precision", "auto")
    return call_arguments(found)


def generate(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> Path:
    only = None
    if args.from_png:
        prompts, kwargs, index = from_png_arguments(args, parser or build_parser())
        only = None if index is None else [index]
    else:
        prompts = list(args.prompts)
        if args.prompts_file:
            prompts += read_prompts(args.prompts_file)
        if not prompts:
            raise ValueError('give at least one prompt ("" for unconditional), or --prompts FILE, or --from-png FILE')
        if args.run is None:
            raise ValueError("--run is required (the prior run to sample from), unless --from-png names it")
        kwargs = dict(
            n=args.n,
            steps=args.steps,
            sampler=args.sampler,
            guidance=args.guidance,
            negative_prompt=args.negative,
            seed=args.seed,
            guidance_rescale=args.guidance_rescale,
            guidance_interval=args.guidance_interval,
            binding=args.binding,
            binding_until=args.binding_until,
            sampler_options=sampler_arguments(args),
            batch_size=args.batch_size,
            init_image=args.init_image,
            mask=args.mask,
            strength=args.strength,
            feather=args.feather,
            resample=args.resample,
        )
    out = Path(args.out)
    # Checked before any work; written into a staging folder inside --out and swapped in when complete, so a
    # failure keeps the earlier images, and --overwrite deletes only what the earlier settings.json lists.
    with OutputFolder(out, args.overwrite, record="settings.json", also=["grid.png"]) as output:
        grid, n_images = write_images(output.staging, args, prompts, kwargs, only)
    grid = out / grid.name
    print(
        f"{n_images} image{'' if n_images == 1 else 's'} in {out}/ (grid: {grid}; one row per prompt; "
        "settings.json beside them, and in each PNG: A1111's 'parameters' and our 'latentdiff' chunk)"
    )
    return grid


def write_images(out: Path, args: argparse.Namespace, prompts, kwargs, only) -> tuple[Path, int]:
    """Generate into `out`: the images, grid.png and settings.json (whose "files" lists the images); (grid, count)."""
    pipe = pipeline_from_arguments(args)
    announce(pipe.device, sampling_precision(pipe.device, pipe.precision), asked=args.device)
    try:
        settings = pipe.settings(prompts, **kwargs)
    except ValueError as e:  # a value read from a PNG gets the command line's checks, and says where it came from
        raise ValueError(f"--from-png {args.from_png}: {e}" if args.from_png else str(e)) from None
    images = pipe.generate(settings, only=only, show_progress=True)
    command = generate_command(settings, device=args.device, decoder=args.decoder, precision=args.precision)
    indices = only or list(range(len(images)))
    files = []
    for k, image in zip(indices, images):
        prompt = settings.prompts[k // settings.n]
        path = out / f"{k // settings.n:03d}_{slug(prompt)}_{k % settings.n:02d}.png"
        save_generated_png(image, path, settings, k, command)
        files.append(path.name)
    grid = save_settings_grid(images, out / "grid.png", settings, only)
    record = {
        **dataclasses.asdict(settings),
        "files": files,
        "seeds": [settings.seed + k for k in indices],
        "command": command,
    }
    (out / "settings.json").write_text(json.dumps(record, indent=2) + "\n")
    return grid, len(images)


def main(argv: list[str] | None = None) -> Path:
    parser = build_parser()
    args = parser.parse_args(argv)
    with cli_errors():
        return generate(args, parser)


if __name__ == "__main__":
    main()
