"""Attention binding at sampling time: each named object's words read at one place, apart from the others'.

A test-time guidance on the prior's cross-attention maps after Attend-and-Excite (Chefer et al. 2023,
"Attend-and-Excite: attention-based semantic guidance for text-to-image diffusion models": the latent z_t
updated by a gradient step on a loss over the maps, z_t <- z_t - alpha grad L, in the first steps, where the
layout is decided) with the loss of SynGen (Rassin et al. 2023, "Linguistic binding in diffusion models enables
improved attribute correspondence": a positive term drawing a modifier's map to its noun's, a negative one
pushing it from the other nouns'). The words come from the caption's parse: each object the caption names has a
shape word and, in "a red star and a blue ring", a colour word.

For one caption and one transformer's map A (positions P x tokens T, rows summing to 1), a word's map is the
attention its tokens receive at each position, normalised over the positions: d_w(p) = a_w(p) / sum_p a_w(p),
a_w(p) = sum_{j in w} A(p, j). With JS the Jensen-Shannon divergence (0 to log 2), object o's colour word c_o
and shape word s_o,

    E = sum_o JS(d_{c_o}, d_{s_o}) + sum_{o < o'} (log 2 - JS(d_{s_o}, d_{s_o'}))
          + sum_{o != o'} (log 2 - JS(d_{c_o}, d_{s_o'}))

averaged over the transformers: the colour read where its shape is (binding), two shapes read at two places
(no object neglected or merged), and a colour not read where another shape is (no leak). JS is bounded, unlike a
KL divergence, so the terms that push maps apart cannot run away.

`binding_denoiser` wraps a sampler's denoiser: at levels t >= `until`, z_t is moved by `step` along the
energy's negative gradient, normalised per row to unit RMS (Attend-and-Excite's update, z_t <- z_t - alpha grad E,
with the step set in units of z_t's own scale, so one value fits every schedule); the prediction x0_hat is taken
at the moved state, and eps_hat recomputed so the pair stays consistent with the sampler's z_t (as inpainting's
`keep_known`). Every sampler then follows the moved state's x0_hat. A step costs one more conditional pass and its
backward while it applies.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from latentdiff.data.scenes import COLORS, parse_caption

from .denoiser import Denoiser
from .grounding import object_words, word_token_positions
from .schedule import NoiseSchedule
from .text_conditioning import Conditioning

Group = tuple[list[int] | None, list[int]]  # (the colour word's token positions or None, the shape word's)
LOG2 = math.log(2.0)


def caption_groups(tokenizer, caption: str) -> list[Group]:
    """The named objects of a scenes caption: [(colour tokens or None, shape tokens)] in naming order.

    [] where there is nothing to bind: text that is not a scenes caption, a caption naming one object ("a red
    star": on the scenes priors binding its colour word to its shape word drew fewer right colours,
    docs/scenes.md), a counting caption (one plural word names every object), or text the tokenizer splits
    otherwise than word by word (prior.grounding.word_token_positions).
    """
    try:
        prompt = parse_caption(caption)
    except ValueError:
        return []
    spans = word_token_positions(tokenizer, caption)
    if spans is None or len(prompt.objects) < 2:  # counting: one entry for all its objects
        return []
    words = caption.split()
    objects: list[list] = [[None, None] for _ in prompt.objects]
    for i, (o,) in object_words(caption, {"objects": list(prompt.objects)}):
        objects[o][0 if words[i] in COLORS else 1] = spans[i]
    return [(colour, shape) for colour, shape in objects]


def _js(p: Tensor, q: Tensor) -> Tensor:
    """Jensen-Shannon divergence (nats) between distributions over the last dim."""
    m = 0.5 * (p + q) + 1e-12
    return 0.5 * (p * ((p + 1e-12) / m).log()).sum(-1) + 0.5 * (q * ((q + 1e-12) / m).log()).sum(-1)


def binding_energy(maps: Sequence[Tensor], groups: Sequence[Sequence[Group]]) -> Tensor:
    """E per row (B,), averaged over the maps (module docstring); 0 for a row without two words to bind.

    maps: UNet.cross_attention_maps' list, each (B, h * w, T); groups: caption_groups of each row.
    """
    rows = []
    for b, objects in enumerate(groups):
        terms = []
        for probs in maps:

            def read(tokens: list[int]) -> Tensor:
                a = probs[b, :, tokens].sum(-1)
                return a / a.sum().clamp_min(1e-12)

            shape = [read(s) for _, s in objects]
            colour = [None if c is None else read(c) for c, _ in objects]
            for o in range(len(objects)):
                if colour[o] is not None:
                    terms.append(_js(colour[o], shape[o]))
                for k in range(len(objects)):
                    if k != o and colour[o] is not None:
                        terms.append(LOG2 - _js(colour[o], shape[k]))
                    if k > o:
                        terms.append(LOG2 - _js(shape[o], shape[k]))
        rows.append(torch.stack(terms).sum() / len(maps) if terms else maps[0].new_zeros(()))
    return torch.stack(rows)


def binding_denoiser(
    denoiser: Denoiser,
    unet: torch.nn.Module,
    cond: Conditioning,
    groups: Sequence[Sequence[Group]],
    schedule: NoiseSchedule,
    step: float,
    until: float,
    dtype: torch.dtype | None = None,
) -> Denoiser:
    """The denoiser with x0_hat taken at z_t - step * g / rms(g), g = dE/dz_t, at t >= until (module docstring).

    cond: the rows' (states, mask, pooled), as the UNet takes them; groups: caption_groups per row; step >= 0 in
    units of z_t's RMS (0: the denoiser itself); until: the smallest timestep it applies at (0..T-1); dtype: the
    autocast dtype of the gradient's pass (the sampler's, e.g. bf16; None: float32), the energy taken in float32.
    Raises ValueError for a negative or non-finite step.
    """
    if not (math.isfinite(step) and step >= 0):
        raise ValueError(f"binding step must be a finite number >= 0, got {step!r}")
    if step == 0 or not any(groups):
        return denoiser

    def binding(z_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        if float(t.max()) < until:
            return denoiser(z_t, t)
        # under a caller's inference mode: copies that autograd may use
        with torch.inference_mode(False), torch.enable_grad():
            z = z_t.detach().clone().requires_grad_(True)
            states, mask, pooled = (None if c is None else c.detach().clone() for c in cond)
            with unet.cross_attention_maps() as maps, torch.autocast(z.device.type, dtype, enabled=dtype is not None):
                unet(z, t.detach().clone(), states, mask, pooled)
            (grad,) = torch.autograd.grad(binding_energy([m.float() for m in maps], groups).sum(), z)
        rms = grad.pow(2).mean(dim=tuple(range(1, grad.ndim)), keepdim=True).sqrt()
        moved = z_t - step * grad / rms.clamp_min(1e-12) * (rms > 0)
        x0, _ = denoiser(moved, t)
        return x0, schedule.eps_from_x0(z_t, x0, t)

    return binding
