"""Configs fail when they load: choices, ranges, finite numbers, rules between fields; TOML round-trips."""

from __future__ import annotations

import dataclasses
import math
import typing
from pathlib import Path

import pytest

from latentdiff.autoencoder import stage as autoencoder_stage
from latentdiff.autoencoder.model import AutoencoderConfig
from latentdiff.core.config import (
    ConfigError,
    Range,
    apply_overrides,
    dumps_toml,
    from_dict,
    load_preset,
    load_toml,
    to_dict,
)
from latentdiff.core.train import TrainConfig, lr_factor
from latentdiff.decoder.stage import DecoderStageConfig
from latentdiff.evaluation.classifier import ClassifierStageConfig
from latentdiff.prior.config import PriorConfig, SamplerName
from latentdiff.prior.samplers import SAMPLERS
from latentdiff.text.stage import TextStageConfig

ROOT = Path(__file__).resolve().parents[2]
# Every stage's config and the folder of its presets.
STAGES = [
    (AutoencoderConfig, "autoencoder"),
    (PriorConfig, "prior"),
    (DecoderStageConfig, "decoder"),
    (TextStageConfig, "text"),
    (ClassifierStageConfig, "evaluation"),
]
# String fields that are free text, not a choice among names.
FREE_TEXT = {"TextStageConfig.model"}  # an open_clip config name or a path to a .json


def _leaf_types(cls: type, prefix: str = ""):
    """(dotted name, owner.field, annotation) of every non-table field of a config, nested tables walked."""
    hints = typing.get_type_hints(cls, include_extras=True)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _leaf_types(tp, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f"{cls.__name__}.{f.name}", tp


@pytest.mark.parametrize("cls,folder", STAGES)
def test_every_choice_is_a_literal(cls, folder):
    """No config field is a bare str naming one of several choices: a typo must fail at load."""
    bare = [owner for _, owner, tp in _leaf_types(cls) if tp is str and owner not in FREE_TEXT]
    assert bare == []


@pytest.mark.parametrize(
    "cls,key,choices",
    [
        (AutoencoderConfig, "train.lr_decay", "'constant', 'cosine'"),
        (AutoencoderConfig, "train.precision", "'auto', 'fp32', 'bf16'"),
        (AutoencoderConfig, "loss.reconstruction", "'l1', 'l2'"),
        (AutoencoderConfig, "loss.perceptual", "'lpips', 'none'"),
        (AutoencoderConfig, "model.attention", "'auto', 'sdpa', 'xformers', 'math'"),
        (PriorConfig, "model.attention", "'auto', 'sdpa', 'xformers', 'math'"),
        (PriorConfig, "diffusion.schedule", "'linear', 'scaled_linear', 'cosine'"),
        (PriorConfig, "diffusion.prediction", "'eps', 'x0', 'v'"),
        (PriorConfig, "diffusion.loss_weighting", "'uniform', 'min_snr'"),
        (PriorConfig, "sampling.sampler", "'ddpm', 'ddim', 'dpmpp-2m', 'euler', 'heun'"),
    ],
)
def test_a_misspelt_choice_fails_at_load_naming_the_field_and_the_choices(cls, key, choices, tmp_path):
    with pytest.raises(ConfigError) as by_override:
        apply_overrides(cls(), [f'{key}="cosin"'])
    table, name = key.split(".")
    path = tmp_path / "preset.toml"
    path.write_text(f'[{table}]\n{name} = "cosin"\n')
    with pytest.raises(ConfigError) as by_preset:
        load_toml(cls, path)
    for error in (by_override, by_preset):
        message = str(error.value)
        assert key in message and "'cosin'" in message and choices in message and "\n" not in message


def test_a_misspelt_choice_on_the_command_line_ends_before_anything_runs(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        autoencoder_stage.main(
            ["--data", str(tmp_path / "no-data"), "--out", str(tmp_path / "run"), "--set", 'train.lr_decay="cosin"']
        )
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "train.lr_decay" in err and "'constant', 'cosine'" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_literal_numbers_and_booleans_are_not_confused():
    assert apply_overrides(DecoderStageConfig(), ["upscale=4"]).upscale == 4
    for bad in ("upscale=3", "upscale=true", 'upscale="2"'):
        with pytest.raises(ConfigError, match="upscale"):
            apply_overrides(DecoderStageConfig(), [bad])
    with pytest.raises(ConfigError, match="--set steps: expected int, got True"):
        apply_overrides(TrainConfig(), ["steps=true"])  # bool is an int subclass in Python, not in a config


def test_sampler_choices_are_the_registry():
    assert set(typing.get_args(SamplerName)) == set(SAMPLERS)


@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
@pytest.mark.parametrize("key", ["train.lr", "loss.kl_weight", "train.max_minutes", "train.betas"])
def test_non_finite_numbers_are_refused(key, value):
    text = f"[0.9, {value}]" if key == "train.betas" else value
    with pytest.raises(ConfigError, match=rf"{key}.*{value} is not a finite number"):
        apply_overrides(AutoencoderConfig(), [f"{key}={text}"])


def test_lr_inf_from_the_command_line_flag_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        autoencoder_stage.main(["--data", str(tmp_path), "--out", str(tmp_path / "run"), "--lr", "inf"])
    assert exit_.value.code == 2 and "train.lr: inf is not a finite number" in capsys.readouterr().err


@pytest.mark.parametrize(
    "override,allowed",
    [
        ("train.steps=-5", ">= 1"),
        ("train.steps=0", ">= 1"),
        ("train.batch_size=0", ">= 1"),
        ("train.lr=0", "> 0"),
        ("train.lr=-1e-3", "> 0"),
        ("train.warmup_steps=-1", ">= 0"),
        ("train.ema_decay=1.0", "[0, 1)"),
        ("train.ema_decay=-0.1", "[0, 1)"),
        ("train.betas=[0.9, 1.0]", "[0, 1)"),
        ("train.grad_clip=-1", ">= 0"),
        ("train.num_workers=-2", ">= 0"),
        ("resolution=0", ">= 1"),
        ("model.channels=[8, 0]", ">= 1"),
        ("loss.disc_lr=0", "> 0"),
    ],
)
def test_impossible_values_are_refused_with_the_allowed_range(override, allowed):
    key = override.split("=")[0]
    with pytest.raises(ConfigError) as error:
        apply_overrides(AutoencoderConfig(), [override])
    assert key in str(error.value) and f"expected {allowed}" in str(error.value)


def test_possible_values_at_the_edges_load():
    cfg = apply_overrides(
        AutoencoderConfig(),
        [
            "train.steps=1",
            "train.warmup_steps=50",
            "train.ema_decay=0.0",
            "train.ema_decay=0.9999",
            "train.grad_clip=0",
            "train.max_minutes=0",
        ],
    )
    assert cfg.train.warmup_steps > cfg.train.steps  # warm-up longer than the run is allowed
    assert lr_factor(0, cfg.train) == pytest.approx(1 / 50)
    prior = apply_overrides(PriorConfig(), ["caption_dropout=1.0", "model.dropout=0", "sampling.guidance=0"])
    assert prior.caption_dropout == 1.0


def test_range_reads_as_written():
    assert str(Range(min=1)) == ">= 1" and str(Range(min=0, min_open=True)) == "> 0"
    assert str(Range(0, 1, max_open=True)) == "[0, 1)" and str(Range(max=2)) == "<= 2"
    assert 0 in Range(0, 1, max_open=True) and 1 not in Range(0, 1, max_open=True)


def test_autoencoder_resolution_must_be_a_multiple_of_the_downsampling(tmp_path):
    # three levels: f = 4
    with pytest.raises(ConfigError, match=r"resolution 30 is not a multiple of the downsampling factor 4"):
        apply_overrides(AutoencoderConfig(), ["resolution=30"])
    path = tmp_path / "ae.toml"
    path.write_text("resolution = 28\n[model]\nchannels = [8, 16, 16, 32]\n")  # four levels: f = 8
    with pytest.raises(ConfigError, match=rf"{path.name}: resolution 28 .* factor 8"):
        load_preset(AutoencoderConfig, ROOT / "autoencoder", str(path))
    assert apply_overrides(AutoencoderConfig(), ["resolution=64"]).resolution == 64


def test_eps_prediction_with_zero_terminal_snr_is_refused_at_load():
    with pytest.raises(ConfigError, match=r"diffusion: prediction \"eps\" cannot be used with zero_terminal_snr"):
        apply_overrides(PriorConfig(), ["diffusion.zero_terminal_snr=true"])  # the default prediction is eps
    for prediction in ("v", "x0"):
        overrides = ["diffusion.zero_terminal_snr=true", f'diffusion.prediction="{prediction}"']
        cfg = apply_overrides(PriorConfig(), overrides)
        assert cfg.diffusion.zero_terminal_snr


def test_rules_between_prior_fields():
    with pytest.raises(ConfigError, match=r"attention_levels \[0, 2\] name a level beyond the 2"):
        apply_overrides(PriorConfig(), ["model.channels=[16, 32]", "model.attention_levels=[0, 2]"])
    with pytest.raises(ConfigError, match="heads 3 does not divide"):
        apply_overrides(PriorConfig(), ["model.heads=3"])
    with pytest.raises(ConfigError, match="sampling.steps 20 is more than diffusion.timesteps 10"):
        apply_overrides(PriorConfig(), ["diffusion.timesteps=10", "sampling.steps=20"])


@pytest.mark.parametrize("cls,folder", STAGES)
def test_every_preset_loads_and_round_trips(cls, folder, tmp_path):
    for preset in sorted((ROOT / folder / "presets").glob("*.toml")):
        cfg = load_preset(cls, ROOT / folder, preset.stem)
        path = tmp_path / f"{preset.stem}.toml"
        path.write_text(dumps_toml(to_dict(cfg)), encoding="utf-8")
        assert load_toml(cls, path) == cfg


def test_strings_with_newlines_quotes_and_unicode_round_trip(tmp_path):
    prompts = ('a "quoted" sneaker\non two lines', "tab\there, back\\slash, 'single'", "été · 靴 · 👟", "\x7f\r\n")
    cfg = dataclasses.replace(PriorConfig(), sampling=dataclasses.replace(PriorConfig().sampling, prompts=prompts))
    path = tmp_path / "config.toml"
    path.write_text(dumps_toml(to_dict(cfg)), encoding="utf-8")
    again = load_toml(PriorConfig, path)
    assert again.sampling.prompts == prompts and again == cfg


def test_floats_round_trip_exactly(tmp_path):
    cfg = apply_overrides(AutoencoderConfig(), ["train.lr=3.0000000000000004e-4", "loss.kl_weight=1e-300"])
    path = tmp_path / "config.toml"
    path.write_text(dumps_toml(to_dict(cfg)), encoding="utf-8")
    again = load_toml(AutoencoderConfig, path)
    assert again.train.lr == cfg.train.lr and again.loss.kl_weight == 1e-300 and math.isfinite(again.train.lr)


def test_a_config_file_that_is_not_utf8_is_a_config_error(tmp_path):
    path = tmp_path / "config.toml"
    path.write_bytes(b"[train]\nlr = 1e-3\n# \xff\xfe\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_toml(AutoencoderConfig, path)


def test_from_dict_names_where_a_rule_between_fields_failed():
    with pytest.raises(ConfigError, match=r"^runs/x/config.toml.diffusion: prediction"):
        from_dict(PriorConfig, {"diffusion": {"zero_terminal_snr": True}}, "runs/x/config.toml")
