"""Progress bars that tell the truth under a time budget."""

from __future__ import annotations

from latentdiff.core.train import steps_within_budget


def test_budgeted_total_follows_the_pace_not_the_preset():
    # 10 steps in 60 s of a 10-minute budget: about 100 steps in all, not the preset's 100,000.
    assert steps_within_budget(0, 10, 60.0, 10.0, 100_000) == 100
    # A resumed run counts its pace from where it started.
    assert steps_within_budget(500, 510, 60.0, 10.0, 100_000) == 600
    # Never past train.steps, never behind the step already reached.
    assert steps_within_budget(0, 10, 60.0, 10.0, 50) == 50
    assert steps_within_budget(0, 10, 600.0, 0.5, 1000) == 10
    # A budget partly spent before the loop (a latent cache's 2 minutes of 10): the pace fills the 8 left.
    assert steps_within_budget(0, 10, 60.0, 10.0, 100_000, spent_s=120.0) == 80
