"""Shared fixtures: one tiny dataset and one tiny autoencoder, text and prior run for the whole session.

They are built through each stage's `main`, as a user's command would, and reused by every
test file that needs a trained stage. Everything runs on one thread: on two shared cores, two
OpenMP threads were measured 100x slower per convolution than one when another process held a core.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from latentdiff.autoencoder.stage import main as autoencoder_main
from latentdiff.data import shapes
from latentdiff.prior.pipeline import TextToImage
from latentdiff.prior.stage import main as prior_main
from latentdiff.text.stage import main as text_main
from tests.helpers import AE_ARGS, N_TRAIN, PRIOR_ARGS

# ---------------------------------------------------------------- shared tiny runs


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("stages")


@pytest.fixture(scope="session")
def data(root) -> Path:
    out = root / "shapes"
    info = shapes.build(out, N_TRAIN, val_n=8, test_n=4, seed=0, resolution=32, maxcount=16)
    assert info["splits"]["train"] == N_TRAIN and info["classes"]
    return out


@pytest.fixture(scope="session")
def ae_run(root, data) -> tuple[Path, dict]:
    out = root / "ae"
    summary = autoencoder_main(
        ["--data", str(data), "--out", str(out), "--steps", "3", *AE_ARGS, "--set", "train.log_every=1"]
    )
    return out, summary


@pytest.fixture(scope="session")
def other_ae_run(root, data) -> Path:
    """A second autoencoder, another seed: another latent space."""
    out = root / "ae_other"
    autoencoder_main(["--data", str(data), "--out", str(out), "--steps", "1", "--seed", "1", *AE_ARGS])
    return out


@pytest.fixture(scope="session")
def text_run(root, data) -> tuple[Path, dict]:
    out = root / "text"
    # EMA on: the prior then reads ema.safetensors, and the stage evaluates the in-memory EMA model.
    summary = text_main(
        [
            "--data",
            str(data),
            "--out",
            str(out),
            "--steps",
            "3",
            "--batch-size",
            "8",
            "--set",
            "eval_images=8",
            "--set",
            "train.ema_decay=0.9",
        ]
    )
    return out, summary


@pytest.fixture(scope="session")
def prior_run(root, data, ae_run, text_run) -> tuple[Path, dict]:
    out = root / "prior"
    # No warm-up and a short EMA: the zero-initialised output convolutions must move off zero within
    # 3 steps for the text (and so guidance and negative prompts) to change the images at all.
    summary = prior_main(
        [
            "--data",
            str(data),
            "--autoencoder",
            str(ae_run[0]),
            "--text",
            str(text_run[0]),
            "--out",
            str(out),
            "--steps",
            "3",
            *PRIOR_ARGS,
            "--set",
            "train.warmup_steps=0",
            "--set",
            "train.ema_decay=0.5",
        ]
    )
    return out, summary


@pytest.fixture(scope="session")
def pipe(prior_run) -> TextToImage:
    return TextToImage.from_run(prior_run[0], device="cpu")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
