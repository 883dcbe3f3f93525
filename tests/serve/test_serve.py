"""`latentdiff serve` without a browser: the Generate and Runs handlers, and the server's start-up errors.

The browser test (tests/serve/test_serve_browser.py) drives the same page in headless Chromium.
"""

from __future__ import annotations

import json
import math
import re
import shlex
import socket
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from latentdiff.core.errors import UserError
from latentdiff.core.pixels import to_uint8
from latentdiff.prior.guidance import interval_text
from latentdiff.scripts import cli

pytest.importorskip("gradio", reason="latentdiff serve needs gradio: pip install -e '.[serve]' (make setup does)")

from latentdiff.serve import runs  # noqa: E402
from latentdiff.serve.app import exposure_warning, start  # noqa: E402
from latentdiff.serve.generation import PNG_KEY, Cancelled, Generator, sampler_names  # noqa: E402
from latentdiff.serve.generation import generate_command as generate_command_of  # noqa: E402

FORM = dict(prompt="a red circle", negative_prompt="", sampler="ddim", steps=2, guidance=3.0, seed=0, n=1)


@pytest.fixture
def generator(pipe, tmp_path):
    g = Generator(pipe, tmp_path / "served", device="cpu")
    yield g
    g.close()


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("steps", 0, "steps must be in 1.."),
        ("steps", -3, "steps must be in 1.."),
        ("steps", 2.5, "steps must be a whole number"),
        ("steps", None, "steps must be a whole number"),
        ("steps", 10**6, "steps must be in 1.."),
        ("guidance", float("nan"), "guidance must be a finite number"),
        ("guidance", float("inf"), "guidance must be a finite number"),
        ("guidance", "lots", "guidance must be a number"),
        ("seed", -1, "seed must be in 0.."),
        ("n", 0, "number of images must be in 1..16"),
        ("n", 17, "number of images must be in 1..16"),
        ("sampler", "dpm-fast", "unknown sampler 'dpm-fast'; choose one of ddpm"),
        ("guidance_rescale", "lots", "guidance rescale must be a number in [0, 1]"),
        ("guidance_rescale", 2, "guidance_rescale must be a finite number in [0, 1]"),
        ("guidance_interval", "5,1", "guidance interval needs 0 <= sigma_lo < sigma_hi, got (5, 1)"),
        ("guidance_interval", "low", "guidance interval must be two numbers"),
    ],
)
def test_bad_form_values_are_one_line_messages(generator, field, value, message):
    with pytest.raises(UserError, match="^" + re.escape(message)) as e:
        generator.generate(**{**FORM, field: value})
    assert "\n" not in str(e.value)
    assert not (generator.out_dir).exists()  # nothing was sampled or written


def test_form_defaults_are_the_runs_and_every_sampler_is_offered(generator, pipe):
    defaults = generator.defaults()
    assert (defaults.sampler, defaults.steps, defaults.guidance) == (
        pipe.cfg.sampling.sampler,
        pipe.cfg.sampling.steps,
        pipe.cfg.sampling.guidance,
    )
    assert defaults.sampler in sampler_names() and {"ddpm", "ddim", "dpmpp-2m"} <= set(sampler_names())
    # An empty prompt is fine (unconditional), a None from the page too.
    assert generator.check(None, None, "ddim", 2, 1.0, 0, 1).prompts == ("",)


def test_generated_pngs_carry_their_settings_and_the_command_remakes_them(generator, pipe, tmp_path):
    result = generator.generate("a green triangle", "blurry", "euler", 3, 2.5, 7, 2)
    assert len(result.files) == 2
    size = tuple(pipe("", n=1, steps=1).shape[-2:])
    for i, path in enumerate(result.files):
        with Image.open(path) as png:
            assert png.format == "PNG" and png.mode == "RGB" and png.size == size[::-1]
            parameters = json.loads(png.text[PNG_KEY])
        assert parameters["prompts"] == ["a green triangle"] and parameters["negative_prompt"] == "blurry"
        assert (parameters["sampler"], parameters["steps"], parameters["guidance"]) == ("euler", 3, 2.5)
        assert parameters["seed"] == 7 and parameters["n"] == 2 and parameters["index"] == i
        assert parameters["command"] == result.command
    words = shlex.split(result.command)
    assert words[:3] == ["latentdiff", "generate", "a green triangle"] and "--negative" in words
    out = tmp_path / "cli"
    assert cli.main([*words[1:], "--out", str(out)]) == 0
    made = sorted(p for p in out.glob("*.png") if p.name != "grid.png")
    assert len(made) == 2
    for ours, theirs in zip(result.files, made):
        a = np.asarray(Image.open(ours).convert("RGB"), dtype=int)
        b = np.asarray(Image.open(theirs).convert("RGB"), dtype=int)
        assert np.abs(a - b).max() <= 1, (ours, theirs)  # the same images (PNG rounding aside)


def test_guidance_rescale_and_interval_from_the_page_are_the_pipelines(generator, pipe):
    defaults = generator.defaults()
    assert (defaults.guidance_rescale, defaults.guidance_interval) == (0.0, None)  # the fields start at plain guidance
    assert interval_text(defaults.guidance_interval) == "all" and interval_text((0.0, math.inf)) == "0,inf"
    # The page's text fields: a number as text, the interval as "LO,HI"; empty means every step.
    result = generator.generate("a red circle", "", "dpmpp-2m", 4, 4.0, 3, 2, None, None, None, "0.7", " 0.5,10.8 ")
    assert (result.settings.guidance_rescale, result.settings.guidance_interval) == (0.7, (0.5, 10.8))
    kw = dict(n=2, steps=4, sampler="dpmpp-2m", guidance=4.0, seed=3)
    expected = to_uint8(pipe("a red circle", guidance_rescale=0.7, guidance_interval=(0.5, 10.8), **kw))
    for i, path in enumerate(result.files):
        assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), expected[i].permute(1, 2, 0).numpy())
    words = shlex.split(result.command)
    assert words[words.index("--guidance-rescale") + 1] == "0.7"
    assert words[words.index("--guidance-interval") + 1] == "0.5,10.8"
    assert generator.check("x", "", "ddim", 2, 2.0, 0, 1, guidance_interval="").guidance_interval is None


def test_a_karras_sampler_from_the_page_is_the_pipelines_on_karras_levels(generator, pipe):
    # The demo's grid samples on Karras levels; the page has no spacing field, so it offers the -karras names.
    assert {"dpmpp-2m-karras", "dpmpp-2m-sde-karras"} <= set(sampler_names())
    result = generator.generate("a red circle", "", "dpmpp-2m-karras", 4, 2.0, 3, 2, None, None, None, None, "0,5")
    assert result.settings.sampler == "dpmpp-2m" and result.settings.sampler_options["spacing"] == "karras"
    kw = dict(n=2, steps=4, guidance=2.0, seed=3, guidance_interval=(0.0, 5.0))
    expected = to_uint8(pipe("a red circle", sampler="dpmpp-2m", sampler_options={"spacing": "karras"}, **kw))
    assert not torch.equal(expected, to_uint8(pipe("a red circle", sampler="dpmpp-2m", **kw)))  # other levels
    for i, path in enumerate(result.files):
        assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), expected[i].permute(1, 2, 0).numpy())
    words = shlex.split(result.command)
    assert words[words.index("--sampler") + 1] == "dpmpp-2m" and words[words.index("--spacing") + 1] == "karras"


def test_img2img_from_the_page_is_the_pipelines_and_its_command_remakes_it(generator, pipe, tmp_path):
    init, mask = tmp_path / "init.png", tmp_path / "mask.png"
    Image.fromarray(np.full((32, 32, 3), (200, 40, 40), np.uint8)).save(init)
    Image.fromarray(np.repeat(np.array([0, 255], np.uint8), 16)[None].repeat(32, 0)).save(mask)  # right half white
    result = generator.generate(
        "a green triangle", "", "ddim", 3, 2.0, 4, 2, init_image=str(init), mask=str(mask), strength="0.8"
    )  # the slider's value may arrive as text
    assert (result.settings.strength, result.settings.mask) == (0.8, str(mask.resolve()))
    assert [p.name for p in result.files] == ["image_00_seed4.png", "image_01_seed5.png"]  # seed + k
    expected = (
        to_uint8(
            pipe(
                "a green triangle",
                n=2,
                steps=3,
                sampler="ddim",
                guidance=2.0,
                seed=4,
                init_image=init,
                mask=mask,
                strength=0.8,
            )
        )
        .permute(0, 2, 3, 1)
        .numpy()
    )
    for i, path in enumerate(result.files):
        assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), expected[i])
    words = shlex.split(result.command)
    assert words[words.index("--strength") + 1] == "0.8" and words[words.index("--mask") + 1] == str(mask.resolve())
    with pytest.raises(UserError, match="a mask needs an init image"):
        generator.generate("x", "", "ddim", 3, 2.0, 4, 1, mask=str(mask))


def test_the_command_keeps_prompts_that_look_like_options(generator):
    from latentdiff.scripts.generate import build_parser

    for prompt in ("--n 3", "-", "", "a 'quoted' prompt; rm -rf /"):
        settings = generator.check(prompt, "-blurry", "ddim", 2, 1.0, 2**60 + 1, 1)
        command = generate_command_of(settings)
        args = build_parser().parse_args(shlex.split(command)[2:])
        assert args.prompts == [prompt] and args.negative == "-blurry" and args.seed == 2**60 + 1 and args.n == 1


def test_requests_run_one_at_a_time_and_can_be_cancelled(generator, pipe):
    """A is stopped mid-sampling, C while it waits; B, queued behind A, then runs to the end."""
    passes: list[str] = []
    entered, release = threading.Event(), threading.Event()

    def hold_first_pass(module, args):  # runs after the generator's own hook, which checks the cancel flag
        passes.append(threading.current_thread().name)
        if len(passes) == 1:
            entered.set()
            release.wait(60)

    hook = pipe.unet.register_forward_pre_hook(hold_first_pass)
    outcome: dict[str, object] = {}

    def request(name, steps):
        try:
            outcome[name] = generator.generate(**{**FORM, "steps": steps}, session=name)
        except Cancelled as e:
            outcome[name] = e

    try:
        a = threading.Thread(target=request, args=("a", 50), name="a")
        a.start()
        assert entered.wait(60)
        b = threading.Thread(target=request, args=("b", 2), name="b")
        c = threading.Thread(target=request, args=("c", 2), name="c")
        b.start()
        c.start()
        assert generator.cancel("a") and generator.cancel("c")
        assert not generator.cancel("nobody")
        release.set()
        for t in (a, b, c):
            t.join(120)
    finally:
        release.set()
        hook.remove()
    assert isinstance(outcome["a"], Cancelled) and isinstance(outcome["c"], Cancelled)
    assert len(outcome["b"].files) == 1
    # A made one network pass (guided: one batched pass per step) before stopping; B's came after it, none from C.
    assert passes[0] == "a" and set(passes[1:]) == {"b"} and passes.count("a") == 1


def test_runs_tab_shows_the_prior_and_its_stages(prior_run, ae_run, text_run, tmp_path):
    stages = runs.trained_stages(prior_run[0])
    assert [(s.name, s.path) for s in stages] == [
        ("prior", prior_run[0]),
        ("autoencoder", ae_run[0]),
        ("text", text_run[0]),
    ]
    ae = runs.view(stages[1], runs.Copies(tmp_path / "served"))
    assert ae.curves is not None and ae.summary["steps"] == 3
    titles = {ax.get_title() for ax in ae.curves.axes}
    assert {"loss", "lr", "psnr"} <= titles
    loss = next(ax for ax in ae.curves.axes if ax.get_title() == "loss")
    steps, values = runs.read_metrics(ae_run[0])["loss"]
    assert steps == [1, 2, 3] and list(loss.lines[0].get_ydata()) == values
    assert any(path.endswith("reconstructions.png") for path, _ in ae.grids)


def test_runs_tab_reads_a_run_that_is_still_training(tmp_path):
    run = tmp_path / "run"
    (run / "samples").mkdir(parents=True)
    lines = [
        {"step": 10, "time": 1.0, "loss": 2.0, "lr": 1e-4},
        {"step": 20, "time": 2.0, "loss": float("nan")},
        {"step": 30, "time": 3.0, "loss": 1.5, "val_psnr": 20.5},
    ]
    text = "\n".join(json.dumps(row) for row in lines) + '\n{"step": 40, "loss": 1.'  # the line being written
    (run / "metrics.jsonl").write_text(text)
    for step in (200, 100):
        Image.new("RGB", (8, 8)).save(run / "samples" / f"recon_{step:07d}.png")
    curves = runs.read_metrics(run)
    assert curves == {"loss": ([10, 30], [2.0, 1.5]), "lr": ([10], [1e-4]), "val_psnr": ([30], [20.5])}
    assert [caption for _, caption in runs.sample_grids(run)] == ["recon 0000100", "recon 0000200"]
    assert runs.read_summary(run) == {}  # written at the end
    assert runs.evaluation_reports(run) == []
    (run / "eval").mkdir()
    (run / "eval" / "report.json").write_text("{}")
    (run / "eval" / "report.md").write_text("| guidance | FID |\n|---|---|\n| 3 | 7.4 |")
    Image.new("RGB", (8, 8)).save(run / "eval" / "tradeoff.png")
    [(report, plot)] = runs.evaluation_reports(run)
    assert "| 3 | 7.4 |" in report and plot == str(run / "eval" / "tradeoff.png")
    assert runs.curves_figure({}, "empty") is None


def test_a_busy_port_and_a_bad_run_are_one_line_errors(prior_run, pipe, capsys, monkeypatch, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(UserError, match=f"cannot serve on 127.0.0.1:{port}.*--port"):
            start(prior_run[0], port=port, pipe=pipe, quiet=True)
    monkeypatch.delenv("LATENTDIFF_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exc:
        cli.main(["serve", "--run", str(tmp_path / "nowhere")])
    assert exc.value.code == 2 and "nowhere" in capsys.readouterr().err


def test_only_loopback_is_quiet_about_exposure():
    assert exposure_warning("127.0.0.1", login=False) is None and exposure_warning("localhost", login=False) is None
    assert "no password" in exposure_warning("0.0.0.0", login=False)
