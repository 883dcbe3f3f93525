"""The benchmark scripts run end to end on tiny settings and write what they print.

No figure is asserted against a speed: the benchmarks measure, the tests only check that each
script runs, counts what it says it counts and writes its JSON (STYLE: speed lives in bench/).
"""

from __future__ import annotations

import json

import pytest

from bench import common, generation, latent_cache, sampler_accuracy, samplers
from latentdiff.prior.samplers import SAMPLERS, number_of_evaluations


@pytest.mark.parametrize("sampler", samplers.SAMPLERS)
@pytest.mark.parametrize("budget", [5, 10, 20, 1000])
def test_sampler_steps_fit_the_evaluation_budget(sampler, budget):
    name, _, spacing = sampler.partition(":")
    steps = samplers.steps_for(sampler, budget)
    nfe = number_of_evaluations(name, steps)
    assert nfe <= budget
    assert number_of_evaluations(name, steps + 1) > budget  # the most steps that fit
    assert samplers.refused(sampler, budget) == (name == "heun" and budget < 11)
    expected = {"dpmpp-2m-karras": "DPM++ 2M Karras"}.get(name, SAMPLERS[name].title if name in SAMPLERS else None)
    assert samplers.title(sampler) == (f"{expected} ({spacing})" if spacing else expected)


def test_sampler_benchmark_plot_names_each_sampler(tmp_path):
    point = {"fid_floor": 1.0, "n_fake": 250, "n_reference": 9750}
    points = [
        {**point, "sampler": s, "nfe": n, "nfe_budget": n, "fid": f, "prompt_accuracy": 0.9}
        for s, n, f in [("ddim", 5, 20.0), ("ddim", 10, 8.0), ("unipc:trailing", 5, 9.0), ("unipc:trailing", 10, 6.0)]
    ]
    path = samplers.plot(points, tmp_path / "plot.png", "demo prior")
    assert path.read_bytes().startswith(b"\x89PNG")


def test_sampler_benchmark_entries_carry_a_checked_spacing():
    assert samplers.entry("dpmpp-2m:logsnr") == ("dpmpp-2m", {"spacing": "logsnr"})
    assert samplers.entry("unipc") == ("unipc", {})
    with pytest.raises(SystemExit, match="dpmpp-2m:bogus"):
        samplers.entry("dpmpp-2m:bogus")


def test_sampler_accuracy_benchmark_prints_every_sampler(tmp_path):
    out = tmp_path / "acc.json"
    figures = sampler_accuracy.main(
        ["--samplers", "ddim,heun,unipc", "--budgets", "5,20", "--n", "2000", "--out", str(out)]
    )
    table = json.loads(out.read_text())["table"]
    assert "| UniPC (trailing) |" in table and "refused" in table  # Heun at 5 evaluations
    assert figures["default"]["cosine"]["heun"][0] is None
    std_err = figures["default"]["scaled_linear"]["unipc"][1][0]
    assert abs(std_err) < 0.01 and abs(figures["default"]["scaled_linear"]["ddim"][1][0]) > 0.05


def test_table_is_markdown():
    text = common.table(["a", "b"], [[1, "x"], [2, "y"]])
    assert text.splitlines() == ["| a | b |", "|---|---|", "| 1 | x |", "| 2 | y |"]


def test_generation_benchmark_writes_its_figures(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "DEMO", tmp_path / "no-demo")  # the tiny pipeline with initial weights
    out = tmp_path / "generation.json"
    figures = generation.main(["--batch-sizes", "1,2", "--steps", "2", "--repeats", "1", "--out", str(out)])
    written = json.loads(out.read_text())
    assert written["figures"] == figures and figures["weights"] == "initial weights"
    assert [r["batch_size"] for r in figures["results"]] == [1, 2]
    assert all(r["images_per_s"] > 0 for r in figures["results"])
    assert written["machine"]["torch_threads"] == 1 and "| batch |" in written["table"]


def test_latent_cache_benchmark_encodes_the_whole_split(tmp_path, monkeypatch, data):
    monkeypatch.setattr(common, "DEMO", tmp_path / "no-demo")
    out = tmp_path / "latent_cache.json"
    # A batch of 16 (the fixture has 64 training images) keeps the steps quick.
    monkeypatch.setattr(latent_cache, "tiny_prior_config", _small_prior(common.tiny_prior_config))
    figures = latent_cache.main(["--data", str(data), "--steps", "1", "--out", str(out)])
    assert figures["cached_images"] == 64  # every training image, once
    assert figures["cached_images_per_s"] > 0 and figures["on_the_fly_images_per_s"] > 0
    assert json.loads(out.read_text())["figures"]["speedup"] == pytest.approx(figures["speedup"])


def _small_prior(make):
    import dataclasses

    def small():
        cfg = make()
        return dataclasses.replace(
            cfg,
            train=dataclasses.replace(cfg.train, batch_size=16),
            model=dataclasses.replace(cfg.model, channels=(16, 32)),
        )

    return small


def test_resume_benchmark_gives_the_same_batch_both_ways(tmp_path, data):
    from bench import resume

    out = tmp_path / "resume.json"
    figures = resume.main(["--data", str(data), "--step", "20", "--batch-size", "4", "--out", str(out)])
    assert figures["same_batch"] is True and figures["before_s"] > 0 and figures["after_s"] > 0
    assert json.loads(out.read_text())["figures"]["step"] == 20


def test_demo_races_reads_trials_and_picks_the_goal_row():
    from bench import demo_races

    assert demo_races.parse_trial("lr2: --steps 450 --lr 2e-3") == ("lr2", ["--steps", "450", "--lr", "2e-3"])
    with pytest.raises(SystemExit, match="NAME: FLAGS"):
        demo_races.parse_trial("--steps 450")  # no name
    rows = [
        {"guidance": 2.0, "prompt_accuracy": 0.86, "fid": 5.1},  # lowest FID, but short of 90%
        {"guidance": 3.0, "prompt_accuracy": 0.92, "fid": 5.6},
        {"guidance": 5.0, "prompt_accuracy": 0.97, "fid": 11.8},
    ]
    assert demo_races.best(rows)["guidance"] == 3.0
    assert demo_races.best(rows[:1]) is None


def test_model_step_times_the_prior_preset_with_overrides(tmp_path):
    from bench import model_step
    from latentdiff.core.config import apply_overrides, load_preset
    from latentdiff.prior.config import PriorConfig
    from latentdiff.prior.stage import PRESETS
    from latentdiff.prior.unet import UNet

    change = ["model.channels=[16, 32]", "model.attention_levels=[0, 1]"]
    out = tmp_path / "step.json"
    rows = model_step.main(["--backends", "sdpa", "--repeats", "1", "--out", str(out), *(f"--set={c}" for c in change)])
    prior = next(r for r in rows if r["model"] == "prior UNet")
    cfg = apply_overrides(load_preset(PriorConfig, PRESETS, "tiny"), change)
    assert prior["overrides"] == change and prior["params"] == sum(p.numel() for p in UNet(cfg.model).parameters())
    assert json.loads(out.read_text())["figures"]["rows"][0]["overrides"] == change
    with pytest.raises(SystemExit):  # a key the config lacks: argparse's one-line error, no process started
        model_step.main(["--backends", "sdpa", "--set", "model.no_such_field=1", "--out", str(out)])
