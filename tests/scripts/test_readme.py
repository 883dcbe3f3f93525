"""Every command of the ```bash blocks of README.md and docs/ runs, in order, in one fresh folder, with tiny budgets.

A newcomer runs the README top to bottom, then the pages of docs/; so does this test, in PAGES' order (README
first), in one folder, so a page may use what an earlier page made. A command already run word for word (the
README's tour repeats the first command of each page) is not run again. Each `latentdiff ...` command is run
in-process (cwd = a temporary folder, so the pages' relative paths land there) after a rewrite to
tiny budgets: training stops after 2 steps of tiny models, generation and evaluation make a few
images with 2 sampler steps, datasets hold a few dozen images; pretrained files the pages name
(Stable Diffusion's VAE) are small random stand-ins made with diffusers. The test fails when a command fails,
when its --out is inside (or holds) another command's output, or when it changes files outside what
it owns. A command that cannot run here is listed in SKIPPED with the reason, and every entry of
SKIPPED must still match a command: a new command is either run or consciously skipped. Every docs/*.md page
must be listed in PAGES, so a new page is placed in the order consciously too.
"""

from __future__ import annotations

import gzip
import os
import re
import shlex
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from latentdiff.scripts.cli import main as cli_main
from tests.helpers import AE_ARGS, PRIOR_ARGS

REPO = Path(__file__).resolve().parents[2]
# The pages whose ```bash blocks are run, in this order; a listed page that does not exist is passed over.
PAGES = (
    "README.md",
    "docs/index.md",
    "docs/training.md",
    "docs/data.md",
    "docs/autoencoder.md",
    "docs/text-encoder.md",
    "docs/prior.md",
    "docs/decoder.md",
    "docs/evaluation.md",
    "docs/serve.md",
    "docs/stable-diffusion.md",
    "docs/finetuning.md",
    "docs/scenes.md",
    "docs/devices.md",
    "docs/reliability.md",
    "docs/troubleshooting.md",
    "docs/benchmarks.md",
    "docs/sampler_accuracy.md",
    "docs/demo.md",
    "docs/architecture.md",
    "CONTRIBUTING.md",
)

# pattern (searched in the command) -> why the test does not run it
SKIPPED = {
    r"^make (demo|bench|test|lint|format)\b": "sets up .venv and trains, benchmarks or lints for minutes "
    "(make test is this suite)",
    r"^(\.venv/bin/)?(python -m )?pytest\b": "runs tests (make test runs the whole suite, this file included)",
    r"^(\.venv/bin/)?(python -m )?ruff\b": "lints or formats the tree (make lint runs it; make test fails on it)",
    r"^(\.venv/bin/)?(pip install )?pre-commit\b": "installs pre-commit and its git hook into a clone "
    "(the hook runs ruff, as make lint does)",
    r"runs/demo/": "reads `make demo`'s runs (~13 min of training), which this test does not make",
    r"^latentdiff serve\b": "serves until stopped (tests/serve/ drives it)",
    r"^tensorboard\b": "serves until stopped",
    r"^python -m bench\.samplers\b": "scores `make demo`'s prior (tests/bench/test_bench.py runs it on a tiny one)",
    r"^python -m bench\.demo_races\b": "trains and scores a prior per trial (minutes each; its parts are tested)",
    r"^python -m bench\.model_step\b": "times training steps into runs/bench (tests/bench/test_bench.py runs it small)",
    r"^python -m bench\.sd_layout\b": "builds SD 1.5's full layout (4 GB on disk, 9 GB of memory, minutes); "
    "tests/bench/test_sd_layout.py runs its toy layout",
    r"^python -m bench\.compositional\b": "trains three stages for up to 40 minutes; tests/bench/test_compositional.py "
    "runs it with --smoke",
    r"runs/compositional/": "reads python -m bench.compositional's runs, which this test does not make",
    r"--init runs/sd15/prior\b": "fine-tunes the imported SD 1.5 at 512 px for 2,000 steps; "
    "tests/prior/test_lora_diffusers.py fine-tunes an imported SD-style pipeline with LoRA and checks diffusers' image",
    r"runs/sd15-(lora|full)\b": "reads the fine-tuned SD 1.5 runs above, which are skipped",
    r"^python -m bench\.lora_concept\b": "trains a shapes prior and fine-tunes it (minutes even at --scale toy); "
    "tests/bench/test_finetune_bench.py tests its parts",
    r"^OMP_NUM_THREADS=1 python -m bench\.compositional\b": "the races of docs/scenes.md: minutes to an hour each; "
    "tests/bench/test_compositional.py runs the bench with --smoke",
    r"^python -m bench\.relations\b": "reads the priors and text runs of bench.compositional races, which this "
    "test does not make; tests/bench/test_relations.py runs it on a tiny text run and real scenes",
    r"runs/pcl/": "continues a bench.compositional race's prior (runs/pc) for 28 minutes, which this test does not "
    "make",
    r"runs/(a8|lo|pol|sh|gl|gn)/": "28-minute priors on a bench.compositional race's data and stages (links and copies "
    "of runs/po and runs/pc), which this test does not make",
    r"^python -m bench\.attributes\b": "reads the priors of bench.compositional races, which this test does not "
    "make; tests/bench/test_attributes.py runs it on a tiny prior and real scenes",
    r"^python -m bench\.counting\b": "reads the priors of bench.compositional races, which this test does not "
    "make; tests/bench/test_counting.py runs it on a tiny prior and real scenes",
    r"runs/(xp|cu|c0|cw)/": "position-first priors on the stages of a bench.compositional race (runs/wg): 20,000 "
    "scenes and 28 minutes of prior, which this test does not make",
    r"runs/(d0|d1|m0|m1)/": "the priors of 40-minute bench.compositional runs (docs/scenes.md), "
    "which this test does not make",
    r"--data runs/(A2|ti)/data\b": "an autoencoder or text race on the data of a bench.compositional race run, "
    "which this test does not make",
    r"^python -m bench\.gpu$": "needs a CUDA GPU; tests/bench/test_gpu_bench.py runs it at toy sizes (--cpu-smoke)",
    r"--preset base\b": "SD 1.5's 860M UNet (a GPU preset), with pretrained CLIP weights that are not on disk",
    r"--run runs/prior-sd\b": "generates from the base-preset prior above, which is skipped",
    r"^latentdiff import pipeline /models/sd-v1-5\.safetensors": "a file's text tower is SD's full ViT-L/14; "
    "tests/prior/test_import_pipeline.py imports small single files",
}
# Paths of pretrained files in the pages -> how the test makes a tiny stand-in (diffusers, a test dependency)
PRETRAINED = {
    "/models/sd-vae-ft-mse": "folder",
    "/models/v1-5-pruned-emaonly.safetensors": "single-file",
    "/models/stable-diffusion-v1-5": "sd-pipeline",
}

# Tiny models and budgets per training stage (the pages' own flags are kept; these come after them).
TINY_TRAIN = {
    "autoencoder": AE_ARGS,
    "text": ["--batch-size", "8", "--set", "eval_images=8"],
    "prior": PRIOR_ARGS,
    "decoder": ["--batch-size", "4", "--set", "eval_images=8"],
    "classifier": ["--batch-size", "8", "--set", "eval_images=16", "--set", "model.channels=[8, 8, 8, 8]"],
}
# What a command may write besides its --out: the report folder inside the run it reads.
WRITES_INTO_RUN = {"evaluate": "eval", "evaluate-autoencoder": "eval"}
# A training run pins the checkpoint of each run it reads (RUN/pins/, core.checkpoint.pin), so their pruning keeps it.
READS_RUNS = ("--autoencoder", "--text")
DEFAULT_OUT = {"generate": "outputs"}  # where a command without --out writes


def readme_commands(text: str) -> list[str]:
    """The shell commands of the ```bash blocks, in order: continuations joined, comments dropped."""
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.append(shlex.join(words))
    return commands


def documented_commands() -> list[tuple[str, str]]:
    """(page, command) for every ```bash command of PAGES, README first, in order."""
    return [(page, c) for page in PAGES if (REPO / page).exists() for c in readme_commands((REPO / page).read_text())]


def skip_reason(command: str) -> str | None:
    return next((why for pattern, why in SKIPPED.items() if re.search(pattern, command)), None)


def _set(argv: list[str], flag: str, value: str) -> None:
    """Give `flag` the value `value`: replace it where the command has it, else append it."""
    if flag in argv:
        argv[argv.index(flag) + 1] = value
    else:
        argv += [flag, value]


def _idx(array: np.ndarray) -> bytes:
    return bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape) + array.tobytes()


def _fashion_mnist_source(root: Path) -> Path:
    """The four Fashion-MNIST IDX files: 100 random 28x28 images of all 10 classes."""
    rng = np.random.default_rng(0)
    src = root / "idx"
    src.mkdir()
    for prefix, n in (("train", 60), ("t10k", 40)):
        (src / f"{prefix}-images-idx3-ubyte.gz").write_bytes(
            gzip.compress(_idx(rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)))
        )
        (src / f"{prefix}-labels-idx1-ubyte").write_bytes(_idx((np.arange(n) % 10).astype(np.uint8)))
    return src


def _my_images(root: Path) -> Path:
    """`~/my-images` of the README: a few captioned images."""
    folder = root / "my-images"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"a picture number {i}")
    return folder


def _pretrained_vae(root: Path) -> dict[str, Path]:
    """A small random diffusers AutoencoderKL as a diffusers folder and as a single-file SD checkpoint."""
    from tests.autoencoder import test_import as imports  # its helpers; importing it skips when diffusers is missing

    vae = imports.make_diffusers_vae(imports.SMALL)
    vae.save_pretrained(root / "vae-folder")
    imports.ldm_checkpoint(vae, root / "vae.safetensors")
    return {"folder": root / "vae-folder", "single-file": root / "vae.safetensors"}


def tiny(argv: list[str], inputs: dict[str, Path]) -> list[str]:
    """The README's `latentdiff` argv with tiny budgets (see the module docstring)."""
    stand_ins = {"~/my-images": inputs["my-images"], **{k: inputs[v] for k, v in PRETRAINED.items() if v in inputs}}
    argv = [str(stand_ins.get(a, a)) for a in argv]
    words = tuple(argv[:2])
    if words == ("data", "fashion-mnist"):  # 100 images, even where the real 70,000 are installed
        _set(argv, "--source", str(inputs["idx"]))
    elif words == ("data", "shapes"):
        _set(argv, "--n", "48")
        _set(argv, "--val-n", "8")
        _set(argv, "--test-n", "24")
    elif argv[0] == "train":
        argv += ["--steps", "2", *TINY_TRAIN[argv[1]]]
    elif words == ("import", "pipeline"):
        _set(argv, "--batch-size", "2")
        _set(argv, "--batches", "1")
    elif words == ("import", "autoencoder"):
        _set(argv, "--resolution", "32")
        _set(argv, "--batch-size", "2")
        _set(argv, "--batches", "1")
    elif argv[0] == "generate":
        _set(argv, "--n", "2")
        _set(argv, "--steps", "3")
    elif argv[0] == "evaluate":
        _set(argv, "--n", "10")
        _set(argv, "--steps", "3")
    elif argv[0] == "evaluate-autoencoder":
        _set(argv, "--n", "8")
    return argv


def _files(root: Path) -> dict[Path, tuple[int, int]]:
    return {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in root.rglob("*") if p.is_file()}


def _out(argv: list[str], cwd: Path) -> Path | None:
    """The output folder of a command: its --out, or the default of a command that has one."""
    out = argv[argv.index("--out") + 1] if "--out" in argv else DEFAULT_OUT.get(argv[0])
    return None if out is None else (cwd / out).resolve()


def _owned(argv: list[str], cwd: Path) -> list[Path]:
    """The folders a command may write: its output folder, or the report folder of the run it reads."""
    if _out(argv, cwd) is not None:
        pins = [(cwd / argv[argv.index(f) + 1] / "pins").resolve() for f in READS_RUNS if f in argv]
        return [_out(argv, cwd), *(pins if argv[0] == "train" else [])]
    if argv[0] in WRITES_INTO_RUN and "--run" in argv:
        return [(cwd / argv[argv.index("--run") + 1] / WRITES_INTO_RUN[argv[0]]).resolve()]
    return []


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def test_readme_commands_are_run_or_skipped_with_a_reason():
    pages = sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md"))
    assert not [p for p in pages if p not in PAGES], f"docs pages missing from PAGES (place them in its order): {pages}"
    documented = documented_commands()
    commands = [c for _, c in documented]
    for page in ("README.md", "docs/prior.md"):  # the extraction finds the blocks of the README and of a page
        assert any(p == page and c.startswith("latentdiff train prior") for p, c in documented), page
    unused = [p for p in SKIPPED if not any(re.search(p, c) for c in commands)]
    assert not unused, f"SKIPPED entries that match no command any more: {unused}"
    for page, command in documented:
        assert command.startswith(("latentdiff ", "python -m ")) or skip_reason(command), (
            f"{page}: command neither run by this test nor skipped with a reason: {command}"
        )


def test_readme_commands_run_in_order(tmp_path, monkeypatch, capsys):
    work = tmp_path / "clone"
    work.mkdir()
    inputs = {"idx": _fashion_mnist_source(tmp_path), "my-images": _my_images(tmp_path)}
    try:
        inputs.update(_pretrained_vae(tmp_path))
        from tests.prior.test_import_pipeline import build_pipeline  # a small random SD 1.x pipeline folder

        build_pipeline(tmp_path / "sd-pipeline", "sd1")
        inputs["sd-pipeline"] = tmp_path / "sd-pipeline"
    except pytest.skip.Exception:  # no diffusers (the dev extra): the imports are not run, the rest is
        pass
    rng = np.random.default_rng(2)  # the user's own photo and inpainting mask (white: repaint)
    Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(work / "photo.png")
    mask = np.where(np.arange(48)[:, None] < 24, 255, 0).astype(np.uint8).repeat(48, 1)  # the top half
    Image.fromarray(mask).save(work / "mask.png")
    monkeypatch.chdir(work)
    monkeypatch.setenv("LATENTDIFF_CACHE", str(tmp_path / "cache"))  # FID statistics outside the clone
    outputs: dict[Path, str] = {}  # output folder -> the command that made it
    ran = 0
    done_before: set[str] = set()
    for page, command in documented_commands():
        if skip_reason(command) or any(path in command and how not in inputs for path, how in PRETRAINED.items()):
            continue
        if command in done_before:  # the README's tour repeats a page's command: its output is already there
            continue
        done_before.add(command)
        words = shlex.split(command)
        before = _files(work)
        if words[0] == "latentdiff":
            argv = tiny(words[1:], inputs)
            owned = _owned(argv, work)
            for folder in [_out(argv, work)] if _out(argv, work) else []:
                for other, by in outputs.items():
                    assert not (_inside(folder, other) or _inside(other, folder)), (
                        f"{page}: `{command}` writes into {folder}, the output of `{by}`"
                    )
            try:
                code = cli_main(argv)
            except SystemExit as e:
                code = e.code
            assert code in (0, None), f"{page}: `{command}` (run as {argv}) failed: {capsys.readouterr().err[-2000:]}"
        else:  # python -m ...: a subprocess from the repository, as a clone's shell would run it
            env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
            done = subprocess.run(
                [sys.executable, *words[1:]], cwd=work, env=env, capture_output=True, text=True, timeout=300
            )
            assert done.returncode == 0, f"{page}: `{command}` failed: {done.stderr[-2000:]}"
            owned = []
        after = _files(work)
        changed = [p for p, stamp in after.items() if before.get(p) != stamp] + [p for p in before if p not in after]
        stray = [p for p in changed if not any(_inside(p.resolve(), folder) for folder in owned)]
        assert not stray, (
            f"{page}: `{command}` changed or removed files outside its own output: {sorted(map(str, stray))[:5]}"
        )
        if words[0] == "latentdiff" and _out(argv, work):
            outputs[_out(argv, work)] = command
        ran += 1
    assert ran >= 15
