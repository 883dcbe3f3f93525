"""Exponential moving average of a model's weights, through torch.optim.swa_utils."""

from __future__ import annotations

import torch
from torch.optim.swa_utils import AveragedModel


def _ema_multi_avg_fn(decay: float, warmup: bool):
    """theta_ema <- lerp(theta_ema, theta, 1 - d) on floating tensors; other tensors are copied.

    With warm-up the decay ramps up as d = min(decay, (1 + n) / (10 + n)) over the first n
    updates: with a fixed 0.999, the weights of step 0 still hold 0.999^500 = 61% of the
    average after 500 steps, so a short CPU run's EMA would be mostly its untrained start.
    Integer buffers (BatchNorm's num_batches_tracked) are counts, not weights: an average of
    them means nothing (and lerp has no integer kernel), so the EMA model takes the model's.
    AveragedModel calls this once per (device, dtype) group, so a call's tensors share a dtype.
    """

    @torch.no_grad()
    def ema_update(ema_params: list[torch.Tensor], params: list[torch.Tensor], num_averaged) -> None:
        if not ema_params:
            return
        if not (ema_params[0].is_floating_point() or ema_params[0].is_complex()):
            torch._foreach_copy_(ema_params, params)
            return
        n = int(num_averaged)
        d = min(decay, (1 + n) / (10 + n)) if warmup else decay
        torch._foreach_lerp_(ema_params, params, 1 - d)

    return ema_update


class EMA(torch.nn.Module):
    """theta_ema <- decay * theta_ema + (1 - decay) * theta, after every optimizer step.

    A thin holder around `AveragedModel` (buffers averaged too, so BatchNorm statistics
    follow) that saves and restores like any module. `decay = 0` keeps no copy at all.
    """

    def __init__(self, model: torch.nn.Module, decay: float, warmup: bool = True):
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        avg_fn = _ema_multi_avg_fn(decay, warmup)
        self.averaged = AveragedModel(model, multi_avg_fn=avg_fn, use_buffers=True) if decay > 0 else None
        if self.averaged is not None:
            self.averaged.requires_grad_(False)
        # Non-persistent buffers are constants built from the config, not learnt (CLIP's causal
        # mask, -inf above the diagonal): averaging them would give lerp(-inf, -inf) = nan.
        persistent = model.state_dict().keys()
        self._constant_buffers = [name for name, _ in model.named_buffers() if name not in persistent]

    @property
    def enabled(self) -> bool:
        return self.averaged is not None

    @property
    def module(self) -> torch.nn.Module | None:
        return self.averaged.module if self.averaged is not None else None

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        if self.averaged is not None:
            self.averaged.update_parameters(model)
            ema_buffers, model_buffers = dict(self.averaged.module.named_buffers()), dict(model.named_buffers())
            for name in self._constant_buffers:
                ema_buffers[name].copy_(model_buffers[name])

    def final(self, model: torch.nn.Module) -> torch.nn.Module:
        """What a finished run evaluates and ships: the EMA weights when kept, else the model; in eval mode."""
        from .runtime import unwrap

        chosen = self.averaged.module if self.averaged is not None else unwrap(model)
        return chosen.eval()

    def weights(self) -> dict[str, torch.Tensor]:
        """The averaged model's state dict, with the same keys as the model's."""
        return self.averaged.module.state_dict() if self.averaged is not None else {}

    def count(self) -> torch.Tensor:
        return self.averaged.n_averaged if self.averaged is not None else torch.tensor(0)

    @torch.no_grad()
    def restart(self, model: torch.nn.Module) -> None:
        """Start the average over from `model`'s current weights (EMA switched on when a run resumes)."""
        from .runtime import unwrap

        if self.averaged is not None:
            self.averaged.module.load_state_dict(unwrap(model).state_dict())
            self.averaged.n_averaged.zero_()

    def load(self, weights: dict[str, torch.Tensor], n_averaged: torch.Tensor | int) -> None:
        if self.averaged is None:
            return
        self.averaged.module.load_state_dict(weights)
        self.averaged.n_averaged.fill_(int(n_averaged))
