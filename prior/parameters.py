"""The settings every generated PNG carries: the `parameters` text chunk, the command that remakes it, reading it back.

Stable Diffusion tools write their settings into a PNG text chunk named "parameters"; latentdiff
writes its `GenerationSettings` there as JSON, with the image's index k in its call, its seed
(seed + k: its own generator) and the `latentdiff generate` command line. `generate` and `serve`
both write it through `png_parameters`; `latentdiff generate --from-png FILE` reads it back
(`read_png_parameters`, `call_arguments`) and makes the same image again.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
from pathlib import Path

from .pipeline import GenerationSettings

PNG_KEY = "parameters"  # the text chunk Stable Diffusion tools read the settings from


def _option(name: str, value: str) -> list[str]:
    """`--name value`, or `--name=value` when the value starts with "-" (argparse would read it as an option)."""
    return [f"{name}={value}"] if value.startswith("-") else [name, value]


def generate_command(
    settings: GenerationSettings, decoder: str | None = None, device: str | None = None, precision: str = "auto"
) -> str:
    """The `latentdiff generate` command line that makes the same images (one shell-quoted line)."""
    # Prompts come first, unless one starts with "-" and would read as an option: then last, after "--".
    dashed = any(p.startswith("-") for p in settings.prompts)
    words = [
        "latentdiff",
        "generate",
        *([] if dashed else settings.prompts),
        *_option("--run", settings.run),
        "--n",
        str(settings.n),
        "--steps",
        str(settings.steps),
        "--sampler",
        settings.sampler,
        "--guidance",
        repr(settings.guidance),
        "--seed",
        str(settings.seed),
    ]
    for key, value in sorted(settings.sampler_options.items()):
        if value is None:  # "the sampler's own" (e.g. sigma_max of the schedule): the command's default too
            continue
        words += _option(f"--{key.replace('_', '-')}", str(value))
    if settings.guidance_rescale:
        words += ["--guidance-rescale", repr(settings.guidance_rescale)]
    if settings.guidance_interval is not None:
        words += ["--guidance-interval", ",".join(repr(float(x)) for x in settings.guidance_interval)]
    if settings.init_image is not None:
        words += _option("--init-image", settings.init_image) + ["--strength", repr(settings.strength)]
    if settings.mask is not None:
        words += _option("--mask", settings.mask)
    if settings.batch_size != 64:
        words += ["--batch-size", str(settings.batch_size)]
    if settings.negative_prompt:
        words += _option("--negative", settings.negative_prompt)
    if decoder:
        words += _option("--decoder", decoder)
    if device:
        words += ["--device", device]
    if precision != "auto":
        words += ["--precision", precision]
    if dashed:
        words += ["--", *settings.prompts]
    return shlex.join(words)


def png_parameters(settings: GenerationSettings, index: int, command: str) -> str:
    """The `parameters` text chunk of image `index` of a call: its settings, seed and command, as JSON."""
    return json.dumps(
        {**dataclasses.asdict(settings), "index": index, "image_seed": settings.seed + index, "command": command}
    )


def read_png_parameters(path: str | Path) -> dict:
    """The `parameters` chunk of a PNG that latentdiff wrote, as a dict; ValueError naming the file otherwise."""
    from PIL import Image

    try:
        with Image.open(path) as png:
            text = getattr(png, "text", {}).get(PNG_KEY)
    except (OSError, ValueError) as e:
        raise ValueError(f"--from-png {path}: cannot read it as an image ({e})") from None
    if text is None:
        raise ValueError(
            f"--from-png {path}: no '{PNG_KEY}' text chunk; only PNGs that latentdiff generate or "
            "serve wrote carry their settings"
        )
    try:
        params = json.loads(text)
    except json.JSONDecodeError:
        params = None
    names = {f.name for f in dataclasses.fields(GenerationSettings)}
    if (
        not isinstance(params, dict)
        or not {"index", "prompts", "run"} <= params.keys()
        or params.keys() - names - {"index", "image_seed", "command"}
    ):
        raise ValueError(
            f"--from-png {path}: its '{PNG_KEY}' chunk is not latentdiff's JSON settings (another tool wrote it?)"
        )
    return params


def call_arguments(params: dict) -> tuple[list[str], dict, int]:
    """(prompts, keyword arguments of TextToImage.__call__, index of the image) that remake the image of `params`.

    The whole call is described (prompts, n, seed, batch size), and `only=[index]` makes just the
    batch that held the image, so it comes out exactly as it was.
    """
    kwargs = dict(
        n=params["n"],
        steps=params["steps"],
        sampler=params["sampler"],
        guidance=params["guidance"],
        negative_prompt=params["negative_prompt"],
        seed=params["seed"],
        guidance_rescale=params["guidance_rescale"],
        guidance_interval=params.get("guidance_interval"),  # absent in PNGs from before the option: every step
        sampler_options=dict(params["sampler_options"]),
        batch_size=params["batch_size"],
        init_image=params.get("init_image"),
        mask=params.get("mask"),
        strength=params.get("strength") if params.get("init_image") else None,
    )
    return list(params["prompts"]), kwargs, int(params["index"])
