"""The Generate tab's request handler, without any web framework: check a form, sample, write PNGs.

One `Generator` per server holds the loaded `TextToImage` pipeline. Requests run one at a time
(a lock; the page's queue already serialises them, the lock keeps the model safe from any other
caller) and each can be cancelled between two network evaluations: a forward pre-hook on the
UNet raises `Cancelled` once the request's flag is set, so a long sampling run stops within one
UNet pass instead of running to the end.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from pathlib import Path

from latentdiff.core.errors import UserError
from latentdiff.prior.parameters import (  # noqa: F401  (re-exported)
    PNG_KEY,
    generate_command,
    png_parameters,
    save_generated_png,
)
from latentdiff.prior.pipeline import GenerationSettings, TextToImage
from latentdiff.prior.samplers import ALIASES, SAMPLERS

MAX_IMAGES = 16  # per request: one sampling batch, so the `generate` command below makes the same images
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes any int64 >= 0


class Cancelled(Exception):
    """Raised inside the sampling loop when the request that started it was cancelled."""


@dataclass(frozen=True)
class Result:
    """What one request made: the PNG files (settings embedded), the settings and the command that remakes them."""

    files: list[Path]
    settings: GenerationSettings
    command: str


def sampler_names() -> list[str]:
    """The samplers, then their Karras-level variants (`generate --sampler dpmpp-2m-karras`): no spacing field."""
    return [*SAMPLERS, *(name for name in ALIASES if name.endswith("-karras"))]


def _integer(name: str, value, low: int, high: int) -> int:
    """A form value as an int in low..high, or a UserError naming the field."""
    if isinstance(value, bool):
        raise UserError(f"{name} must be a whole number, got {value!r}")
    try:
        number = value if isinstance(value, int) else float(value)  # an int stays exact beyond 2**53
    except (TypeError, ValueError):
        raise UserError(f"{name} must be a whole number, got {value!r}") from None
    if not math.isfinite(number) or number != int(number):
        raise UserError(f"{name} must be a whole number, got {value!r}")
    if not low <= number <= high:
        raise UserError(f"{name} must be in {low}..{high}, got {int(number)}")
    return int(number)


class Generator:
    """Serves generation requests from one loaded pipeline; `out_dir` receives the PNGs."""

    def __init__(
        self,
        pipe: TextToImage,
        out_dir: str | Path,
        *,
        decoder: str | None = None,
        device: str | None = None,
        precision: str = "auto",
    ):
        self.pipe = pipe
        self.out_dir = Path(out_dir)
        self.command_flags = dict(decoder=decoder, device=device, precision=precision)
        self._lock = threading.Lock()
        self._requests = 0
        self._flags: dict[str, threading.Event] = {}  # session -> cancel flag of its waiting or running request
        self._running: threading.Event | None = None  # the flag of the request sampling now
        self._unhook = pipe.unet.register_forward_pre_hook(self._stop_if_cancelled)

    def _stop_if_cancelled(self, module, args) -> None:
        if self._running is not None and self._running.is_set():
            raise Cancelled("generation cancelled")

    @property
    def busy(self) -> bool:
        """A request is sampling now."""
        return self._running is not None

    @property
    def completed(self) -> int:
        """Requests that ran to the end (and wrote their PNGs), since the server started."""
        return self._requests

    def defaults(self) -> GenerationSettings:
        """The run's own sampling settings: the form's initial values."""
        return self.pipe.settings("")

    def check(
        self,
        prompt,
        negative_prompt,
        sampler,
        steps,
        guidance,
        seed,
        n,
        init_image=None,
        mask=None,
        strength=None,
        guidance_rescale=None,
        guidance_interval=None,
    ) -> GenerationSettings:
        """Form values -> resolved settings; any bad value is a UserError that says which and why.

        The arguments are the Generate tab's fields in the page's order (app.py passes them so).
        init_image, mask: image files (img2img, inpainting; prior/img2img.py), None for text-to-image;
        strength: img2img's, in [0, 1] (None: the pipeline's default).
        guidance_rescale: in [0, 1] (Lin et al. 2024 §3.4; None: 0); guidance_interval: "LO,HI" in VE sigma,
        guidance only where sigma_lo < sigma(t) <= sigma_hi (Kynkäänniemi et al. 2024), "all" or empty:
        every step (prior/guidance.py).
        """
        prompt, negative_prompt = prompt or "", negative_prompt or ""  # an empty prompt is unconditional
        if not isinstance(prompt, str) or not isinstance(negative_prompt, str):
            raise UserError("the prompt and the negative prompt must be text")
        if sampler not in sampler_names():
            raise UserError(f"unknown sampler {sampler!r}; choose one of {', '.join(sampler_names())}")
        T = self.pipe.schedule.T
        steps = _integer("steps", steps, 1, T)
        seed = _integer("seed", seed, 0, MAX_SEED)
        n = _integer("number of images", n, 1, MAX_IMAGES)
        try:
            guidance = float(guidance)
        except (TypeError, ValueError):
            raise UserError(f"guidance must be a number, got {guidance!r}") from None
        if not math.isfinite(guidance):
            raise UserError(f"guidance must be a finite number, got {guidance}")
        if guidance_rescale is None or guidance_rescale == "":
            guidance_rescale = 0.0
        try:
            guidance_rescale = float(guidance_rescale)
        except (TypeError, ValueError):
            raise UserError(f"guidance rescale must be a number in [0, 1], got {guidance_rescale!r}") from None
        if guidance_interval is None or (isinstance(guidance_interval, str) and not guidance_interval.strip()):
            guidance_interval = "all"
        if init_image is None:  # the form's strength applies to img2img only; a mask alone is refused below
            strength = None
        elif strength is not None:
            try:
                strength = float(strength)
            except (TypeError, ValueError):
                raise UserError(f"strength must be a number in [0, 1], got {strength!r}") from None
        try:
            return self.pipe.settings(
                prompt,
                n=n,
                steps=steps,
                sampler=sampler,
                guidance=guidance,
                guidance_rescale=guidance_rescale,
                guidance_interval=guidance_interval,
                negative_prompt=negative_prompt,
                seed=seed,
                init_image=init_image,
                mask=mask,
                strength=strength,
            )
        except (TypeError, ValueError) as e:
            raise UserError(str(e)) from None

    def generate(self, *form, session: str = "", show_progress: bool = False, **named) -> Result:
        """Sample n images for one prompt (img2img / inpainting with an init image) and write them as PNGs.

        form, named: the form's fields, as `check` takes them. Raises UserError or Cancelled.
        """
        settings = self.check(*form, **named)
        command = generate_command(settings, **self.command_flags)
        # Registered before waiting for the lock, so a request still waiting can be cancelled too.
        flag = self._flags[session] = threading.Event()
        try:
            with self._lock:
                if flag.is_set():
                    raise Cancelled("generation cancelled before it started")
                self._running = flag
                try:
                    images = self.pipe.generate(settings, show_progress=show_progress)
                finally:
                    self._running = None
                self._requests += 1
                folder = self.out_dir / f"{self._requests:05d}"
        finally:
            if self._flags.get(session) is flag:
                del self._flags[session]
        files = [
            save_generated_png(image, folder / f"image_{i:02d}_seed{settings.seed + i}.png", settings, i, command)
            for i, image in enumerate(images)
        ]
        return Result(files, settings, command)

    def cancel(self, session: str = "") -> bool:
        """Stop the request of `session`, waiting or sampling; True if there was one."""
        flag = self._flags.get(session)
        if flag is None:
            return False
        flag.set()
        return True

    def close(self) -> None:
        self._unhook.remove()
