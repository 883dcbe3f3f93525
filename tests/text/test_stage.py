"""The text stage end to end: the run it writes loads back as the model it trained."""

from __future__ import annotations

import pytest
import torch

from latentdiff.core import checkpoint as ckpt
from latentdiff.core.config import load_toml
from latentdiff.text.encoder import TextEncoder
from latentdiff.text.model import build_clip, load_model_config
from latentdiff.text.sources import load_text_encoder
from latentdiff.text.stage import TextStageConfig, evaluate
from latentdiff.text.tokens import build_tokenizer
from tests.helpers import run_weights


def test_text_run_loads_and_matches_the_trained_model(text_run, data):
    run, summary = text_run
    assert summary["steps"] == 3
    assert 0.0 <= summary["val_zero_shot_accuracy"] <= 1.0
    meta = ckpt.read_meta(run, "text")
    assert meta["ema"] is True and load_toml(TextStageConfig, run / "config.toml").model == "clip-tiny"
    encoder = load_text_encoder(run)
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())
    # By hand from the EMA weights: the same embeddings, bit for bit.
    by_hand = build_clip(load_model_config("clip-tiny"))
    by_hand.load_state_dict(run_weights(run, ckpt.EMA))
    # Frozen like the loaded one: MultiheadAttention takes another (equal up to rounding) path otherwise.
    by_hand.eval().requires_grad_(False)
    prompts = ["a red circle", "a small blue square on the left", ""]
    out = encoder.encode(prompts)
    with torch.no_grad():
        tokens = encoder.tokenize(prompts)
        assert torch.equal(out.pooled, by_hand.encode_text(tokens))
        tokenizer = build_tokenizer(load_model_config("clip-tiny"))
        reference = TextEncoder(by_hand, tokenizer, settings=encoder.settings).encode(prompts)
    assert encoder.settings.attend == "all"  # the tiny preset's: diffusers' pipeline passes no text mask
    assert torch.equal(out.states, reference.states) and torch.equal(out.mask, reference.mask)
    assert torch.isfinite(out.states).all()
    # The summary was measured on the in-memory EMA model; the loaded one gives the same figures.
    again = evaluate(encoder, str(data), TextStageConfig(eval_images=8))
    assert again == pytest.approx({k: summary[k] for k in again})


def test_truncated_captions_are_a_figure_of_the_run(tmp_path):
    from PIL import Image

    from latentdiff.scripts.data import main as data_main
    from latentdiff.text.stage import main as text_main

    src = tmp_path / "src"
    src.mkdir()
    for i in range(24):
        Image.new("RGB", (32, 32), (10 * i, 100, 200)).save(src / f"{i:02d}.png")
        words = "very " * (60 if i % 2 else 1)  # every other caption is far past the 77-token context
        (src / f"{i:02d}.txt").write_text(f"a {words}blue square number {i}")
    assert data_main(["folder", str(src), "--out", str(tmp_path / "ds"), "--resolution", "32", "--quiet"]) == 0
    with pytest.warns(Warning, match="Warned once"):
        summary = text_main(
            [
                "--data",
                str(tmp_path / "ds"),
                "--out",
                str(tmp_path / "run"),
                "--steps",
                "2",
                "--batch-size",
                "8",
                "--set",
                "eval_images=8",
            ]
        )
    assert summary["truncated_captions"] > 0
