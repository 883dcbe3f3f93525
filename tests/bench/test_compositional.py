"""bench.compositional end to end at toy size (--smoke): data, three stages, evaluation, defaults, table, plot."""

from __future__ import annotations

import argparse
import json

import pytest

from bench import compositional
from latentdiff.data.scenes import TASKS
from latentdiff.prior.pipeline import TextToImage


def test_compositional_smoke_writes_table_plot_and_prior_defaults(tmp_path):
    runs = tmp_path / "runs"
    argv = ["--smoke", "--runs", str(runs), "--out", str(tmp_path / "c.json"), "--recipe", "uniform"]
    figures = compositional.main(argv)
    assert [r["guidance"] for r in figures["rows"]] == [1.0, 3.0]
    assert figures["ceiling"]["all"]["overall"] == 1.0 and set(figures["ceiling"]["all"]["tasks"]) == set(TASKS)
    assert figures["held_out_prompts"] >= 1 and figures["smoke"]
    assert set(figures["autoencoder_reconstructions"]["all"]["tasks"]) == set(TASKS)
    best = compositional.recommend(figures["rows"])
    settings = TextToImage.from_run(runs / "prior").settings(["a star"], n=1)
    assert (settings.sampler, settings.steps, settings.guidance) == ("dpmpp-2m", 2, best["guidance"])
    assert settings.binding == 0.0  # the uniform recipe samples without attention binding
    assert (runs / "tasks_vs_guidance.png").read_bytes().startswith(b"\x89PNG")
    table = (runs / "table.md").read_text()
    assert "real (ceiling)" in table and "held-out" in table
    assert figures["steps"] == {"autoencoder": 2, "text": 2, "prior": 2} and figures["prior_loss_jumps"] == 0
    assert any((runs / "prior" / "latent_cache").iterdir())  # the prior trains on cached latents, as the default
    assert "steps: autoencoder 2, text 2, prior 2; the prior loss jumped 0 times" in table
    assert json.loads((tmp_path / "c.json").read_text())["figures"]["recommended"]["guidance"] == best["guidance"]


def test_recommend_takes_the_best_seen_overall_and_the_lower_guidance_on_a_tie():
    def row(w, seen):
        return {"guidance": w, "scenes": {"seen": {"overall": seen}}}

    assert compositional.recommend([row(1, 0.5), row(3, 0.8), row(5, 0.8)])["guidance"] == 3
    assert compositional.recommend([row(1, 0.9), row(3, 0.2)])["guidance"] == 1


def test_split_parses_three_shares_and_refuses_the_rest():
    assert compositional.budget_split("0.3,0.1,0.6") == {"autoencoder": 0.3, "text": 0.1, "prior": 0.6}
    for bad in ("0.5,0.5", "0.5,0.6,0.1", "0,0.3,0.7", "a,b,c"):
        with pytest.raises(argparse.ArgumentTypeError, match="sum to 1"):
            compositional.budget_split(bad)


def test_a_runs_folder_built_with_another_train_mix_is_refused(tmp_path):
    from latentdiff.scripts import data as data_cli

    data = tmp_path / "runs" / "data"
    assert data_cli.main(["scenes", "--out", str(data), "--n", "6", "--test-n", "6", "--quiet"]) == 0
    argv = ["--smoke", "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "c.json"), "--recipe", "uniform"]
    with pytest.raises(SystemExit, match="train mix"):
        compositional.main([*argv, "--task-weights", "position=3"])
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["data"]  # nothing trained
    with pytest.raises(SystemExit):  # argparse's one-line error: exits 2 before anything
        compositional.main([*argv, "--task-weights", "position=x"])
    bad_values = (["--binding", "-0.1"], ["--binding", "nan"], ["--binding-until", "1.5"], ["--sampler", "dpm-3m"],
                  ["--steps", "0"])  # fmt: skip
    for bad in bad_values:
        with pytest.raises(SystemExit):  # refused before any stage trains, not by evaluate after them
            compositional.main([*argv, *bad])
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["data"]


def test_a_curriculum_trains_the_prior_first_on_its_own_mix_then_on_the_data(tmp_path):
    runs = tmp_path / "runs"
    first = "single_object=0,two_object=0,counting=0,colors=0,position=1,color_attr=0"
    argv = ["--smoke", "--runs", str(runs), "--out", str(tmp_path / "c.json"), "--guidance", "1", "--recipe", "uniform"]
    figures = compositional.main([*argv, "--prior-first", first])
    info = json.loads((runs / "data_first" / "info.json").read_text())
    assert info["task_weights"] == dict.fromkeys(TASKS, 0) | {"position": 1}
    assert json.loads((runs / "data" / "info.json").read_text())["task_weights"] == dict.fromkeys(TASKS, 1)
    # 2 steps on the first mix, then resumed on the main data to step 4: the run's records name the main data
    assert figures["steps"]["prior"] == 4 and compositional.trained_on(runs / "prior") == (runs / "data").resolve()
    assert figures["prior_first"] == {"task_weights": info["task_weights"], "share": pytest.approx(1 / 3)}
    assert "the prior first 33% of its minutes on the mix" in (runs / "table.md").read_text()
    with pytest.raises(SystemExit):  # a share outside (0, 1): argparse's one-line error
        compositional.main([*argv, "--prior-first", first, "--prior-first-share", "1"])


def test_the_default_binding_recipe_sets_the_mix_curriculum_and_flags_and_given_flags_refine_it(tmp_path):
    import tomllib

    runs = tmp_path / "runs"
    argv = ["--smoke", "--runs", str(runs), "--out", str(tmp_path / "c.json"), "--guidance", "1"]
    figures = compositional.main([*argv, "--prior-flags", "--set grounding_pixel=0.2"])
    assert figures["recipe"] == "binding" and "recipe binding; train mix" in (runs / "table.md").read_text()
    weights = json.loads((runs / "data" / "info.json").read_text())["task_weights"]
    assert weights == dict.fromkeys(TASKS, 1) | {"color_attr": 5}
    first = json.loads((runs / "data_first" / "info.json").read_text())["task_weights"]
    assert first == dict.fromkeys(TASKS, 0) | {"position": 1} and figures["steps"]["prior"] == 4
    prior = tomllib.loads((runs / "prior" / "config.toml").read_text())
    assert (prior["grounding"], prior["grounding_pixel"]) == (0.1, 0.2)  # the recipe's, then the flag given
    model = prior["model"]
    assert (model["pooled_dim"], model["context_positions"], model["context_layers"]) == (128, 32, 2)
    assert tomllib.loads((runs / "text" / "config.toml").read_text())["token_identity"] == 1.0
    # sampled with the recipe's attention binding, recorded as the prior's default
    assert (prior["sampling"]["binding"], prior["sampling"]["binding_until"]) == (0.3, 0.5)
    assert figures["recommended"]["binding"] == 0.3
    # and the recipe's stochastic sampler (smoke sizes take 2 of its steps), recorded with the guidance
    assert prior["sampling"]["sampler"] == figures["recommended"]["sampler"] == "dpmpp-2m-sde"
    assert "attention binding 0.3 at t >= 0.5 T" in (runs / "table.md").read_text()
    # --prior-first '' turns the recipe's curriculum off, --binding 0 its binding (the rest of it kept)
    alone = tmp_path / "alone"
    figures = compositional.main([*argv, "--runs", str(alone), "--prior-first", "", "--binding", "0"])
    assert figures["prior_first"] is None and figures["steps"]["prior"] == 2 and not (alone / "data_first").exists()
    prior = tomllib.loads((alone / "prior" / "config.toml").read_text())
    assert prior["grounding_pixel"] == 0.05 and prior["sampling"]["binding"] == 0.0
    assert "attention binding" not in (alone / "table.md").read_text()
