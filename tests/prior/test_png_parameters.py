"""PNG parameters other tools read: the A1111 text in `parameters`, our JSON in an iTXt chunk of its own, and
`--from-png` on PNGs of ours (old and new) and of the Stable Diffusion web UI (issue #28)."""

from __future__ import annotations

import json
import re
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from latentdiff.scripts import cli


def png_chunks(path) -> list[tuple[bytes, bytes]]:
    """(type, data) of every chunk of a PNG file, read from its bytes (not through PIL)."""
    raw = path.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, at = [], 8
    while at < len(raw):
        (length,) = struct.unpack(">I", raw[at : at + 4])
        chunks.append((raw[at + 4 : at + 8], raw[at + 8 : at + 8 + length]))
        at += 12 + length
    return chunks


def a1111_fields(text: str) -> tuple[str, str, dict[str, str]]:
    """(prompt, negative prompt, settings) of an A1111 `parameters` text, read as the web UI documents it:
    prompt lines, an optional `Negative prompt: ...` line, then one `Key: value, Key: value` line."""
    *lines, last = text.split("\n")
    settings = dict(re.findall(r'\s*([\w][\w \-/]*): ("(?:\\.|[^"])*"|[^,]*)(?:,|$)', last))
    prompt, negative = [], []
    for line in lines:
        if line.startswith("Negative prompt: ") or negative:
            negative.append(line.removeprefix("Negative prompt: "))
        else:
            prompt.append(line)
    return "\n".join(prompt), "\n".join(negative), settings


def generate(prior_run, out, *extra) -> dict:
    argv = ["generate", "--run", str(prior_run[0]), "--steps", "3", "--out", str(out), *extra]
    assert cli.main(argv) == 0
    return json.loads((out / "settings.json").read_text())


def test_generated_pngs_carry_a1111_parameters_and_our_json_in_utf8_itxt(prior_run, tmp_path):
    record = generate(
        prior_run,
        tmp_path / "gen",
        "a red circle ☀",
        "--n",
        "2",
        "--seed",
        "7",
        "--sampler",
        "DPM++ 2M Karras",
        "--guidance",
        "2.5",
        "--negative",
        "blurry, dark",
    )
    png = tmp_path / "gen" / record["files"][1]  # image 1: seed 8
    with Image.open(png) as image:
        prompt, negative, fields = a1111_fields(image.text["parameters"])
    assert (prompt, negative) == ("a red circle ☀", "blurry, dark")
    assert fields["Steps"] == "3" and fields["CFG scale"] == "2.5" and fields["Seed"] == "8"
    assert fields["Sampler"] == "DPM++ 2M" and fields["Schedule type"] == "Karras" and fields["Size"] == "32x32"
    assert fields["Model"] == prior_run[0].name
    ours = [data for kind, data in png_chunks(png) if kind == b"iTXt" and data.startswith(b"latentdiff\0")]
    assert len(ours) == 1  # keyword, NUL, compression flag and method, language, NUL, translated keyword, NUL, text
    flag, rest = ours[0][11], ours[0][13:]  # after b"latentdiff\0": compression flag, method, then the rest
    _, _, text = rest.split(b"\0", 2)
    text = zlib.decompress(text) if flag else text
    params = json.loads(text.decode("utf-8"))
    assert params["prompts"] == ["a red circle ☀"] and (params["index"], params["image_seed"]) == (1, 8)
    assert params["sampler"] == "dpmpp-2m" and params["sampler_options"]["spacing"] == "karras"


def a1111_png(path, parameters: str, size=(64, 96)):
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    Image.new("RGB", size, "grey").save(path, pnginfo=info)
    return path


WEB_UI = (
    "a blue square, (masterpiece:1.2)\non two lines\nNegative prompt: red, green\n"
    "Steps: 3, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 4.5, Seed: 1234, Size: 512x768, "
    'Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Lora hashes: "a: 1, b: 2", Version: v1.9.4'
)


def test_from_png_maps_an_a1111_png_and_says_what_it_mapped_and_ignored(prior_run, tmp_path, capsys):
    source = a1111_png(tmp_path / "webui.png", WEB_UI)
    capsys.readouterr()
    run = ["--run", str(prior_run[0])]
    assert cli.main(["generate", "--from-png", str(source), *run, "--out", str(tmp_path / "a")]) == 0
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("--from-png")]
    assert len(said) == 1, said
    line = said[0]
    for mapped in ("prompt", "negative prompt", "steps 3", "sampler DPM++ 2M", "CFG scale 4.5", "seed 1234"):
        assert mapped in line.split("ignored")[0], (mapped, line)
    for ignored in ("Size 512x768", "Model hash", "Model", "Lora hashes", "Version"):
        assert ignored in line.split("ignored")[1], (ignored, line)
    record = json.loads((tmp_path / "a" / "settings.json").read_text())
    assert record["prompts"] == ["a blue square, (masterpiece:1.2)\non two lines"]
    assert (record["negative_prompt"], record["steps"], record["guidance"], record["seed"], record["n"]) == (
        "red, green",
        3,
        4.5,
        1234,
        1,
    )
    assert record["sampler"] == "dpmpp-2m" and record["sampler_options"]["spacing"] == "karras"
    # The same image as the command line with those values.
    direct = generate(
        prior_run,
        tmp_path / "b",
        "a blue square, (masterpiece:1.2)\non two lines",
        "--n",
        "1",
        "--seed",
        "1234",
        "--sampler",
        "dpmpp-2m",
        "--spacing",
        "karras",
        "--guidance",
        "4.5",
        "--negative",
        "red, green",
    )
    with Image.open(tmp_path / "a" / record["files"][0]) as a, Image.open(tmp_path / "b" / direct["files"][0]) as b:
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_from_png_a1111_sampler_we_lack_is_ignored_and_named(prior_run, tmp_path, capsys):
    source = a1111_png(tmp_path / "lms.png", "a cross\nSteps: 2, Sampler: LMS, CFG scale: 3, Seed: 5, Size: 32x32")
    run = ["--run", str(prior_run[0])]
    assert cli.main(["generate", "--from-png", str(source), *run, "--out", str(tmp_path / "o")]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("--from-png"))
    assert "Sampler LMS" in line.split("ignored")[1]
    record = json.loads((tmp_path / "o" / "settings.json").read_text())
    assert (record["prompts"], record["steps"], record["seed"], record["negative_prompt"]) == (["a cross"], 2, 5, "")


@pytest.mark.parametrize(
    "fields, says",
    [
        ("Steps: 0, CFG scale: 3, Seed: 5", "steps"),
        ("Steps: many, CFG scale: 3, Seed: 5", "Steps 'many'"),
        ("Steps: 2, CFG scale: -3, Seed: 5", "guidance"),
        ("Steps: 2, CFG scale: nan, Seed: 5", "guidance"),
        ("Steps: 2, CFG scale: 3, Seed: -1", "seed"),
        ("Steps: 2, CFG scale: 3, Seed: 2.5", "Seed '2.5'"),
        ("Steps: 100000, CFG scale: 3, Seed: 5", "steps"),
    ],
)
def test_from_png_a1111_values_get_the_command_lines_bounds(prior_run, tmp_path, capsys, fields, says):
    source = a1111_png(tmp_path / "bad.png", f"a cross\n{fields}, Size: 32x32")
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", "--from-png", str(source), "--run", str(prior_run[0]), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and str(source) in err and says in err, err
    assert not (tmp_path / "o").exists()


def test_from_png_a1111_needs_a_run(tmp_path, capsys):
    source = a1111_png(tmp_path / "webui.png", WEB_UI)
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", "--from-png", str(source), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "--run" in err


def test_from_png_still_reads_our_old_pngs_with_json_in_parameters(prior_run, tmp_path):
    record = generate(prior_run, tmp_path / "gen", "a red circle", "--n", "2", "--seed", "3")
    png = tmp_path / "gen" / record["files"][1]
    with Image.open(png) as image:
        ours, pixels = image.text["latentdiff"], np.asarray(image)
    old = PngImagePlugin.PngInfo()
    old.add_text("parameters", ours)  # how latentdiff wrote its PNGs before: the JSON in `parameters`
    Image.fromarray(pixels).save(tmp_path / "old.png", pnginfo=old)
    assert cli.main(["generate", "--from-png", str(tmp_path / "old.png"), "--out", str(tmp_path / "again")]) == 0
    remade = json.loads((tmp_path / "again" / "settings.json").read_text())
    assert remade["files"] == [record["files"][1]] and remade["seeds"] == [4]
    with Image.open(tmp_path / "again" / remade["files"][0]) as image:
        assert np.array_equal(np.asarray(image), pixels)


def test_serve_writes_pngs_through_the_same_function():
    from latentdiff.prior import parameters
    from latentdiff.serve import generation

    assert generation.save_generated_png is parameters.save_generated_png
    assert generation.PNG_KEY == parameters.PNG_KEY == "latentdiff"
