"""The settings every generated PNG carries, the command that remakes it, and reading them back.

Two text chunks (`save_generated_png`, the one writer of `generate`, `serve` and nothing else):
- "parameters": the Stable Diffusion web UI's (A1111's) text, which A1111, Civitai and other
  readers show: the prompt, a `Negative prompt: ...` line when there is one, then
  `Steps: N, Sampler: NAME, CFG scale: W, Seed: S, Size: WxH, Model: RUN` (`a1111_parameters`);
- "latentdiff" (iTXt, UTF-8): our `GenerationSettings` as JSON, with the image's index k in its
  call, its seed (seed + k: its own generator) and the `latentdiff generate` command line.
`latentdiff generate --from-png FILE` reads ours back (`read_png`, `call_arguments`) and makes the
same image again; PNGs of ours from before the split (JSON in "parameters") still read. An A1111
PNG's common fields are mapped (`a1111_arguments`), and the command line's checks apply to them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shlex
from pathlib import Path

from latentdiff.core.logger import save_grid, save_png

from .pipeline import GenerationSettings
from .samplers import KNOWN_AS, resolve

PNG_KEY = "latentdiff"  # the iTXt chunk holding our settings as JSON
A1111_KEY = "parameters"  # the text chunk the Stable Diffusion web UI writes and its readers read
A1111_NAMES = {ours: theirs for theirs, ours in KNOWN_AS.items() if "Karras" not in theirs}  # dpmpp-2m -> DPM++ 2M


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
    # always written: a run's [sampling] binding is the default, so an image made without it says so
    words += ["--binding", repr(settings.binding)]
    if settings.binding:
        words += ["--binding-until", repr(settings.binding_until)]
    if settings.init_image is not None:
        words += _option("--init-image", settings.init_image) + ["--strength", repr(settings.strength)]
    if settings.mask is not None:
        words += _option("--mask", settings.mask)
    if settings.feather:
        words += ["--feather", str(settings.feather)]
    if settings.resample > 1:
        words += ["--resample", str(settings.resample)]
    if settings.checkpoint is not None:
        words += ["--checkpoint", str(settings.checkpoint)]
    for file, scale in settings.loras:
        words += _option("--lora", f"{file}:{scale!r}")
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
    """Our chunk of image `index` of a call: its settings, seed and command, as JSON (UTF-8 kept as it is)."""
    return json.dumps(
        {**dataclasses.asdict(settings), "index": index, "image_seed": settings.seed + index, "command": command},
        ensure_ascii=False,
    )


def _quoted(value: str) -> str:
    """A value of the A1111 settings line: as it is, or JSON-quoted when it holds a "," ":" or line break."""
    return json.dumps(value, ensure_ascii=False) if re.search(r"[,:\n]", value) else value


def a1111_parameters(settings: GenerationSettings, index: int, size: tuple[int, int]) -> str:
    """The A1111 `parameters` text of image `index` of a call; size: (width, height) in pixels.

    The seed is the image's own (seed + index): `generate PROMPT --n 1 --seed S` makes it alone. The
    sampler is named as the web UI names it where it has one ("DPM++ 2M"), the Karras spacing as its
    "Schedule type"; what A1111 cannot say is in our own chunk.
    """
    lines = [settings.prompts[index // settings.n]]
    if settings.negative_prompt:
        lines.append(f"Negative prompt: {settings.negative_prompt}")
    fields = {"Steps": str(settings.steps), "Sampler": A1111_NAMES.get(settings.sampler, settings.sampler)}
    if settings.sampler_options.get("spacing") == "karras":
        fields["Schedule type"] = "Karras"
    fields |= {
        "CFG scale": format(settings.guidance, "g"),
        "Seed": str(settings.seed + index),
        "Size": f"{size[0]}x{size[1]}",
        "Model": Path(settings.run).name,
    }
    if settings.init_image is not None:
        fields["Denoising strength"] = format(settings.strength, "g")
    lines.append(", ".join(f"{key}: {_quoted(value)}" for key, value in fields.items()))
    return "\n".join(lines)


def save_generated_png(image, path: str | Path, settings: GenerationSettings, index: int, command: str) -> Path:
    """Write image `index` of a call ((3, H, W) in [-1, 1]) as a PNG carrying both chunks (module docstring)."""
    size = (image.shape[-1], image.shape[-2])
    return save_png(
        image,
        path,
        text={A1111_KEY: a1111_parameters(settings, index, size)},
        itxt={PNG_KEY: png_parameters(settings, index, command)},
    )


def grid_title(settings: GenerationSettings) -> str:
    """The line above a grid: every setting that changes the images, beside the prompts labelling its rows.

    The sampler's options are named where they differ from its defaults ("dpmpp-2m, spacing karras, ...").
    """
    defaults = resolve(settings.sampler)[0].options
    changed = "".join(
        f", {key.replace('_', ' ')} {format(value, 'g') if isinstance(value, float) else value}"
        for key, value in sorted(settings.sampler_options.items())
        if value is not None and defaults.get(key) != value
    )
    return (
        f"{settings.sampler}{changed}, {settings.steps} steps, guidance {settings.guidance:g}"
        + (" for sigma in ({:g}, {:g}]".format(*settings.guidance_interval) if settings.guidance_interval else "")
        + (f", guidance rescale {settings.guidance_rescale:g}" if settings.guidance_rescale else "")
        + f", seed {settings.seed}"
        + (f", negative: {settings.negative_prompt}" if settings.negative_prompt else "")
        + (f", img2img strength {settings.strength:g}" if settings.init_image else "")
        + (f", RePaint U {settings.resample}" if settings.resample > 1 else "")
    )


def save_settings_grid(images, path: str | Path, settings: GenerationSettings, only: list[int] | None = None) -> Path:
    """The grid of a call's images: one row per prompt, labelled, under `grid_title`; `only`: one column.

    `generate` and the prior's training previews both write theirs here, so a preview's recorded
    command remakes its grid pixel for pixel.
    """
    labels = None if only else [p or "(unconditional)" for p in settings.prompts]
    return save_grid(images, path, nrow=1 if only else settings.n, labels=labels, title=grid_title(settings))


# ---- reading a PNG back -----------------------------------------------------------------------


def read_png(path: str | Path) -> tuple[str, dict]:
    """("latentdiff", our settings) or ("a1111", {"prompt", "negative", "fields"}) of a PNG; ValueError otherwise.

    Ours: the "latentdiff" chunk, or JSON in "parameters" (how latentdiff wrote PNGs before).
    """
    from PIL import Image

    try:
        with Image.open(path) as png:
            png.load()  # text chunks after the image data are read with it
            chunks = dict(getattr(png, "text", {}))
    except (OSError, ValueError) as e:
        raise ValueError(f"--from-png {path}: cannot read it as an image ({e})") from None
    ours, theirs = chunks.get(PNG_KEY), chunks.get(A1111_KEY)
    if ours is None and theirs is not None and theirs.lstrip().startswith("{"):
        ours = theirs  # JSON in "parameters": a PNG of ours from before the split
    if ours is not None:
        return "latentdiff", _our_settings(path, ours)
    if theirs is None:
        raise ValueError(
            f"--from-png {path}: no '{PNG_KEY}' or '{A1111_KEY}' text chunk; only PNGs that latentdiff or the "
            "Stable Diffusion web UI (A1111) wrote carry their settings"
        )
    return "a1111", _a1111_fields(path, theirs)


def read_png_parameters(path: str | Path) -> dict:
    """Our settings of a PNG that latentdiff wrote, as a dict; ValueError naming the file otherwise."""
    kind, params = read_png(path)
    if kind != "latentdiff":
        raise ValueError(f"--from-png {path}: its '{A1111_KEY}' chunk is A1111's, not latentdiff's settings")
    return params


def _our_settings(path, text: str) -> dict:
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
        raise ValueError(f"--from-png {path}: its settings chunk is not latentdiff's JSON settings (damaged?)")
    return params


_A1111_FIELD = re.compile(r'\s*([\w][\w \-/]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')  # Key: value, or Key: "a, b"


def _a1111_fields(path, text: str) -> dict:
    """{"prompt", "negative", "fields"} of an A1111 text: prompt lines, `Negative prompt:` lines, the settings line."""
    *lines, last = text.strip("\n").split("\n")
    fields = {}
    for key, value in _A1111_FIELD.findall(last):
        if value.startswith('"'):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass
        fields[key.strip()] = value.strip()
    if "Steps" not in fields:  # the web UI's settings line always names the steps
        raise ValueError(f"--from-png {path}: its '{A1111_KEY}' chunk is neither latentdiff's nor A1111's settings")
    prompt, negative = [], []
    for line in lines:
        if negative or line.startswith("Negative prompt:"):
            negative.append(line.removeprefix("Negative prompt:").removeprefix(" "))
        else:
            prompt.append(line)
    return {"prompt": "\n".join(prompt), "negative": "\n".join(negative), "fields": fields}


def _number(path, fields: dict, key: str, kind: type):
    """An A1111 field as int or float (None when absent); ValueError naming the PNG, the field and the value."""
    if key not in fields:
        return None
    text = fields[key]
    try:
        value = kind(text)
    except ValueError:
        what = "a whole number" if kind is int else "a number"
        raise ValueError(f"--from-png {path}: its A1111 {key} {text!r} is not {what}") from None
    if kind is float and not math.isfinite(value):
        raise ValueError(f"--from-png {path}: its A1111 {key} {text!r} gives guidance {value}, not a finite number")
    return value


def a1111_arguments(path, found: dict) -> tuple[list[str], dict, list[str], list[str]]:
    """(prompts, keyword arguments of TextToImage.settings, what was mapped, what was ignored) of an A1111 PNG.

    Mapped: the prompt, negative prompt, Steps, Sampler (where it names one of ours; "Schedule type:
    Karras" as spacing karras), CFG scale (guidance), Seed; every value is checked later as the
    command line's are (TextToImage.settings). Ignored, and named: everything else, the Size too
    (a run makes images at its own resolution). Raises ValueError for a field that is not a number.
    """
    fields = dict(found["fields"])
    mapped, ignored = ["prompt"], []
    kwargs: dict = dict(n=1, negative_prompt=found["negative"], sampler_options={})
    if found["negative"]:
        mapped.append("negative prompt")
    steps = _number(path, fields, "Steps", int)
    kwargs["steps"] = steps
    mapped.append(f"steps {steps}")
    name, schedule = fields.pop("Sampler", None), fields.pop("Schedule type", None)
    if name is not None:
        try:
            spec, preset = resolve(name)
        except ValueError:
            ignored.append(f"Sampler {name} (none of ours: the run's sampler)")
        else:
            kwargs["sampler"] = spec.name
            if schedule == "Karras":
                kwargs["sampler_options"]["spacing"] = "karras"
            spacing = kwargs["sampler_options"].get("spacing", preset.get("spacing"))
            mapped.append(f"sampler {name}{f', {schedule}' if schedule == 'Karras' else ''} as {spec.name}")
            if spacing:
                mapped[-1] += f" (spacing {spacing})"
    if schedule is not None and schedule != "Karras":
        ignored.append(f"Schedule type {schedule}")
    for key, arg, kind, label in (("CFG scale", "guidance", float, "CFG scale"), ("Seed", "seed", int, "seed")):
        value = _number(path, fields, key, kind)
        if value is not None:
            kwargs[arg] = value
            mapped.append(f"{label} {fields[key]}")
    for key, value in fields.items():
        if key not in ("Steps", "CFG scale", "Seed"):
            shown = value if len(value) <= 24 else value[:21] + "..."
            ignored.append(f"{key} {shown}" + (" (the run makes its own size)" if key == "Size" else ""))
    return [found["prompt"]], kwargs, mapped, ignored


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
        feather=params.get("feather", 0),  # absent before inpainting composited its pixels: none
        resample=params.get("resample", 1),
        binding=params.get("binding", 0.0),  # absent in PNGs from before attention binding: none
        binding_until=params.get("binding_until", 0.5),
    )
    return list(params["prompts"]), kwargs, int(params["index"])
