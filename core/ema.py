"""Exponential moving average of a model's weights, held in torch.optim.swa_utils.AveragedModel."""

from __future__ import annotations

import torch
from torch.optim.swa_utils import AveragedModel


def ema_decay(decay: float, warmup: bool, n: int) -> float:
    """The decay of update n + 1 (n updates so far): `decay`, or with warm-up min(decay, (1 + n) / (10 + n)).

    With a fixed 0.999, the weights of step 0 still hold 0.999^500 = 61% of the average after
    500 steps, so a short CPU run's EMA would be mostly its untrained start.
    """
    return min(decay, (1 + n) / (10 + n)) if warmup else decay


class EMA(torch.nn.Module):
    """theta_ema <- decay * theta_ema + (1 - decay) * theta, after every optimizer step.

    A thin holder around `AveragedModel` (buffers averaged too, so BatchNorm statistics
    follow) that saves and restores like any module. `decay = 0` keeps no copy at all.
    """

    def __init__(self, model: torch.nn.Module, decay: float, warmup: bool = True):
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay, self.warmup = decay, warmup
        self.averaged = AveragedModel(model, use_buffers=True) if decay > 0 else None
        if self.averaged is not None:
            self.averaged.requires_grad_(False)
        # The update count on the host: AveragedModel.update_parameters reads its n_averaged tensor
        # (and copies it to the device) every update, two waits for the device per step on a GPU.
        # n_averaged is still kept up to date, so checkpoints hold it as before.
        self._n = 0
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
        """theta_ema <- lerp(theta_ema, theta, 1 - d) over parameters and floating buffers; the first update copies.

        Integer buffers (BatchNorm's num_batches_tracked) are counts, not weights: an average of
        them means nothing (and lerp has no integer kernel), so the EMA model takes the model's.
        Nothing here reads a tensor back to the host.
        """
        from .sharding import local_tensor

        if self.averaged is None:
            return
        # A model sharded by FSDP (train.parallel "fsdp") and its EMA copy, sharded alike: the EMA of each shard.
        ema = [local_tensor(t) for t in (*self.averaged.module.parameters(), *self.averaged.module.buffers())]
        new = [local_tensor(t.detach()) for t in (*model.parameters(), *model.buffers())]
        if self._n == 0:
            torch._foreach_copy_(ema, new)
        else:
            floats = [i for i, t in enumerate(ema) if t.is_floating_point() or t.is_complex()]
            counts = [i for i, t in enumerate(ema) if not (t.is_floating_point() or t.is_complex())]
            d = ema_decay(self.decay, self.warmup, self._n)
            if floats:
                torch._foreach_lerp_([ema[i] for i in floats], [new[i] for i in floats], 1 - d)
            if counts:
                torch._foreach_copy_([ema[i] for i in counts], [new[i] for i in counts])
        self._n += 1
        self.averaged.n_averaged.fill_(self._n)
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
            self._n = 0

    def load(self, weights: dict[str, torch.Tensor], n_averaged: torch.Tensor | int) -> None:
        """Take a checkpoint's full EMA weights; a copy sharded like its model (fsdp) takes its slices."""
        from .sharding import load_full_state_dict

        if self.averaged is None:
            return
        load_full_state_dict(self.averaged.module, weights)
        self._n = int(n_averaged)  # read once, when a run resumes
        self.averaged.n_averaged.fill_(self._n)
