"""The page of `latentdiff serve`: a Gradio app with a Generate tab and a Runs tab.

The request logic lives in generation.py and runs.py; this module only lays out the page and
wires its events. Offline by construction: analytics and Gradio's version check are off, no share
link, no server-side rendering, no MCP server, no run-history sync, and the default theme's fonts
ship inside the gradio wheel (the browser test checks that every request the page makes goes to
the server itself). Generation requests are queued one at a time across all browser tabs.

On a shared machine (issue #28): the Runs tab serves copies, never a run folder (runs.Copies);
Gradio's own copies of served files and the uploads live in a folder only this account can read;
a login, the queue's size and the upload size come from access.Access.
"""

from __future__ import annotations

import atexit
import html
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # read by gradio at import and at launch

import gradio as gr  # noqa: E402  (after the environment it reads)

from latentdiff.core.errors import UserError  # noqa: E402
from latentdiff.prior.guidance import interval_text  # noqa: E402
from latentdiff.prior.pipeline import TextToImage  # noqa: E402

from .access import Access  # noqa: E402
from .generation import MAX_IMAGES, PNG_KEY, Cancelled, Generator, sampler_names  # noqa: E402
from .runs import Copies, Stage, trained_stages, view  # noqa: E402

# Tiny latents decode to 32-px images: scale them up without blurring.
CSS = "#gallery img, .grids img { image-rendering: pixelated; }"
REFRESH_SECONDS = 10  # the Runs tab's auto-refresh period, while a run trains
CACHE = (1800, 3600)  # Gradio's copies of served files: checked every 30 min, deleted after an hour


def _message(error: Exception) -> gr.Error:
    """A one-line error on the page (HTML-escaped: it may quote what the user typed), no traceback."""
    return gr.Error(html.escape(str(error)), print_exception=False)


def _generate_tab(generator: Generator) -> None:
    defaults = generator.defaults()
    with gr.Row():
        with gr.Column(scale=2):
            prompt = gr.Textbox(label="Prompt", lines=2, placeholder="a large red circle on the left", elem_id="prompt")
            negative = gr.Textbox(
                label="Negative prompt", placeholder="what guidance steers away from", elem_id="negative"
            )
            with gr.Row():
                sampler = gr.Dropdown(sampler_names(), value=defaults.sampler, label="Sampler", elem_id="sampler")
                steps = gr.Number(defaults.steps, label="Steps", precision=0, elem_id="steps")
            with gr.Row():
                guidance = gr.Number(defaults.guidance, label="Guidance scale", step=0.5, elem_id="guidance")
                seed = gr.Number(0, label="Seed", precision=0, elem_id="seed")
            n = gr.Slider(1, MAX_IMAGES, value=4, step=1, label="Number of images", elem_id="n")
            with gr.Accordion("Guidance rescale and interval", open=False):
                with gr.Row():
                    rescale = gr.Number(
                        defaults.guidance_rescale,
                        label="Guidance rescale (0: plain guidance, 0.7: Lin et al.'s)",
                        minimum=0,
                        maximum=1,
                        step=0.1,
                        elem_id="guidance-rescale",
                    )
                    interval = gr.Textbox(
                        interval_text(defaults.guidance_interval),
                        label="Guided noise levels: sigma_lo,sigma_hi (all: every step)",
                        placeholder="0,5",
                        elem_id="guidance-interval",
                    )
            with gr.Accordion("img2img and inpainting", open=False):
                with gr.Row():
                    init_image = gr.Image(
                        type="filepath", label="Init image (SDEdit)", sources=["upload"], elem_id="init-image"
                    )
                    mask = gr.Image(type="filepath", label="Mask (white = repaint)", sources=["upload"], elem_id="mask")
                strength = gr.Slider(
                    0.0, 1.0, value=0.75, step=0.05, label="Strength (0: the image, 1: text only)", elem_id="strength"
                )
            with gr.Row():
                go = gr.Button("Generate", variant="primary", elem_id="generate")
                stop = gr.Button("Cancel", variant="stop", elem_id="cancel")
        with gr.Column(scale=3):
            gallery = gr.Gallery(
                label="Images",
                columns=4,
                height=360,
                object_fit="contain",
                elem_id="gallery",
                buttons=["download", "fullscreen"],
            )
            command = gr.Textbox(
                label="The same images from the command line", buttons=["copy"], interactive=False, elem_id="command"
            )
            files = gr.File(
                label=f"PNG files (settings in the `{PNG_KEY}` text chunk)",
                file_count="multiple",
                interactive=False,
                elem_id="files",
            )

    # Gradio passes the request and the progress tracker (found by annotation and default), then the
    # inputs below in their order: the fields of Generator.check.
    def run(request: gr.Request, progress=gr.Progress(track_tqdm=True), *form):  # track_tqdm: the pipeline's bar
        try:
            result = generator.generate(*form, session=request.session_hash or "", show_progress=True)
        except (UserError, Cancelled) as e:
            raise _message(e) from None
        images = [(str(f), f"image {i}, seed {result.settings.seed + i}") for i, f in enumerate(result.files)]
        return images, result.command, [str(f) for f in result.files]

    def cancel(request: gr.Request):
        generator.cancel(request.session_hash or "")

    # One request at a time over every tab and session; the others wait in the queue, with their position shown.
    event = gr.on(
        [go.click, prompt.submit],
        run,
        [prompt, negative, sampler, steps, guidance, seed, n, init_image, mask, strength, rescale, interval],
        [gallery, command, files],
        concurrency_limit=1,
        concurrency_id="generate",
        show_progress_on=gallery,
    )
    stop.click(cancel, None, None, cancels=[event], queue=False)


def _runs_tab(stages: list[Stage], copies: Copies):
    """Lay out one group per run; returns the function that fills them and the components it fills.

    The image files shown are `copies` of the runs' files (the runs' folders are never served).
    """
    with gr.Row():
        refresh = gr.Button("Refresh", elem_id="refresh", scale=0, min_width=120)
        live = gr.Checkbox(label=f"refresh every {REFRESH_SECONDS} s (while a run trains)", value=False, scale=2)
        stamp = gr.Markdown(elem_id="runs-read-at")
    outputs = [stamp]
    for stage in stages:
        with gr.Group():
            heading = gr.Markdown(f"### {stage.name}")
            plot = gr.Plot(label=f"{stage.name}: training curves", format="png", elem_id=f"curves-{stage.name}")
            with gr.Row():
                # Preview mode: the newest grid whole (grids are wide: 16 images a row), the others below it.
                grids = gr.Gallery(
                    label="sample grids, oldest first",
                    columns=8,
                    height=300,
                    object_fit="contain",
                    preview=True,
                    elem_classes=["grids"],
                    scale=3,
                )
                summary = gr.JSON(label="summary.json", scale=2)
            report = gr.Markdown()
            report_plots = gr.Gallery(label="evaluation trade-off", columns=2, height=320, visible=False)
        outputs += [heading, plot, grids, summary, report, report_plots]

    def show():
        values = [f"read at {time.strftime('%H:%M:%S')}"]
        for stage in stages:
            v = view(stage, copies)
            note = "" if v.curves is not None else "\n\nNo per-step metrics in metrics.jsonl yet."
            plots = [p for _, p in v.reports if p]
            values += [
                f"### {stage.name} · `{stage.path}`{note}",
                gr.update(value=v.curves, visible=v.curves is not None),
                gr.update(value=v.grids, selected_index=len(v.grids) - 1 if v.grids else None),
                v.summary,
                "\n\n".join(text for text, _ in v.reports),
                gr.update(value=plots, visible=bool(plots)),
            ]
        # The previous call's copies go: Gradio copied them into its cache when that call returned, and
        # the Runs handlers share one concurrency id, so no other call is between its return and this one.
        copies.prune()
        return values

    timer = gr.Timer(REFRESH_SECONDS, active=False)
    live.change(lambda on: gr.Timer(active=on), live, timer)
    # Re-reading is cheap (one metrics.jsonl per run); the tick must not grey out the page every 10 s.
    refresh.click(show, None, outputs, concurrency_id="runs", show_progress="minimal")
    timer.tick(show, None, outputs, concurrency_id="runs", show_progress="hidden")
    return show, outputs


def build(
    generator: Generator, stages: list[Stage], run: str | Path, copies: Copies, access: Access = Access()
) -> gr.Blocks:
    """The page: a Generate tab over `generator` and a Runs tab over `stages` (their images served as `copies`).

    access.max_queue bounds the requests waiting over every tab (Gradio's queue max_size).
    """
    with gr.Blocks(title=f"latentdiff: {Path(run).name}", analytics_enabled=False, delete_cache=CACHE) as blocks:
        gr.Markdown(f"## latentdiff · `{run}`")
        with gr.Tabs():
            with gr.Tab("Generate", id="generate-tab", elem_id="generate-tab"):
                _generate_tab(generator)
            with gr.Tab("Runs", id="runs-tab", elem_id="runs-tab"):
                show, outputs = _runs_tab(stages, copies)
        blocks.load(show, None, outputs, concurrency_id="runs", show_progress="hidden")
    blocks.queue(default_concurrency_limit=1, max_size=access.max_queue)
    return blocks


@dataclass
class Server:
    """A running page; `close()` stops it and removes the generated files."""

    blocks: gr.Blocks
    generator: Generator
    url: str
    out_dir: Path

    def wait(self) -> None:
        """Serve until Ctrl-C."""
        self.blocks.block_thread()

    def close(self) -> None:
        self.blocks.close()
        self.generator.close()
        shutil.rmtree(self.out_dir, ignore_errors=True)


def _private_gradio_cache() -> None:
    """Point Gradio's cache (its copy of every file it serves, and the uploads) at a folder only this account
    can read, removed when the process exits; a GRADIO_TEMP_DIR the user set is kept.

    Gradio's default, TMP/gradio, is readable by every local account (and one account's folder there
    stops another's server from writing). Gradio reads the variable when it builds each component
    and the app, so this runs before the page is built, once per process (servers in one process share it).
    """
    if os.environ.get("GRADIO_TEMP_DIR"):
        return
    folder = tempfile.mkdtemp(prefix="latentdiff-gradio-")  # mode 0700
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    os.environ["GRADIO_TEMP_DIR"] = folder


def start(
    run: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 7860,
    pipe: TextToImage | None = None,
    decoder: str | None = None,
    device: str | None = None,
    precision: str = "auto",
    quiet: bool = False,
    access: Access = Access(),
) -> Server:
    """Load the prior run once (unless `pipe` is given) and serve the page on host:port in a background thread.

    access: the login (Gradio's; no login when it has no users), the queue and the upload limits.
    Raises UserError when the port cannot be bound; CheckpointError (from the loader) for a bad run.
    """
    stages = trained_stages(run, decoder)
    if pipe is None:
        pipe = TextToImage.from_run(run, device=device, decoder=decoder, precision=precision)
    _private_gradio_cache()
    out_dir = Path(tempfile.mkdtemp(prefix="latentdiff-serve-"))  # mode 0700: the generated PNGs, the copies
    generator = Generator(pipe, out_dir, decoder=decoder, device=device, precision=precision)
    blocks = build(generator, stages, run, Copies(out_dir / "runs"), access)
    try:
        _, url, _ = blocks.launch(
            server_name=host,
            server_port=port,
            auth=list(access.users) or None,
            auth_message="Log in with a user and password given to latentdiff serve --auth or --auth-file.",
            max_file_size=access.max_upload,
            prevent_thread_lock=True,
            quiet=quiet,
            share=False,
            ssr_mode=False,
            mcp_server=False,
            pwa=False,
            enable_monitoring=False,
            run_history=False,
            footer_links=[],
            show_error=False,
            css=CSS,
        )
    except OSError as e:
        generator.close()
        shutil.rmtree(out_dir, ignore_errors=True)
        raise UserError(f"cannot serve on {host}:{port} ({e}); pass another --port") from None
    return Server(blocks, generator, url, out_dir)


def exposure_warning(host: str, login: bool) -> str | None:
    """What serving on a non-loopback address means, or None for 127.0.0.1 / localhost / ::1.

    login: whether the page asks for a user and password (--auth, --auth-file).
    """
    if host in ("127.0.0.1", "localhost", "::1"):
        return None
    if login:
        return (
            f"warning: serving on {host} over plain HTTP: the login and every image cross the network without "
            "encryption; prefer an SSH tunnel to 127.0.0.1, or a reverse proxy with TLS"
        )
    return (
        f"warning: serving on {host}: anyone who can reach this machine on that address can use the page, "
        "with no password: generate (your CPU/GPU time) and read the runs' metrics, grids and summaries"
    )
