"""`python -m bench.finetune_memory`: COMPUTED memory of fine-tuning SD 1.5's UNet on one GPU (not measured on a GPU).

Each row adds up, for the `base` preset's UNet (SD 1.5's layout, 859.5M parameters) over 64x64x4 latents (512-px
images) and 77 text tokens of width 768:
- weights, gradients, optimizer moments and EMA, from the parameter counts (fp32 master weights; AdamW: two fp32
  moments, 8 bytes a parameter; bitsandbytes' AdamW8bit: two 8-bit moments, 2 bytes a parameter, its block
  statistics left out); a LoRA run keeps gradients, moments and EMA for its adapters alone;
- activations: the bytes of every tensor autograd saves for the backward pass (parameters left out, a view
  counted once with its base), counted by a saved-tensors hook on one forward pass of the UNet built on the meta
  device (no memory is allocated, nothing runs on a GPU), in bf16 as under autocast; attention saves what a
  fused (flash / memory-efficient) kernel saves on a GPU: q, k, v, the output and the log-sum-exp, never the
  (N x N) weights; with gradient checkpointing, what the layers keep (their inputs) plus the largest layer's own
  activations, recomputed one layer at a time.
The largest batch leaves FIXED_GB for the frozen autoencoder and text encoder (fp32) and CUDA's context; not
counted: the allocator's fragmentation, the kernels' temporary buffers (so stay a step below it).
docs/finetuning.md carries the table.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from latentdiff.core.config import load_preset
from latentdiff.prior.config import LoraConfig, PriorConfig
from latentdiff.prior.lora import target_names
from latentdiff.prior.stage import PRESETS
from latentdiff.prior.unet import UNet, UNetLayer

GB = 1e9


def activation_bytes(cfg, batch: int, side: int, tokens: int = 77) -> tuple[float, float, float]:
    """(all saved activations, their part kept between layers, the largest layer's own) in bytes, bf16, meta."""
    with torch.device("meta"):
        unet = UNet(cfg).to(torch.bfloat16).train()
        z = torch.zeros(batch, cfg.in_channels, side, side, dtype=torch.bfloat16, requires_grad=False)
        c = torch.zeros(batch, tokens, cfg.context_dim, dtype=torch.bfloat16)
        t = torch.zeros(batch)
    total, per_layer, inputs = [0], [], [0]
    params = {id(p) for p in unet.parameters()}
    seen: set[int] = set()

    def pack(x):
        base = x._base if x._base is not None else x
        if id(base) not in params and id(base) not in seen:
            seen.add(id(base))
            total[0] += base.numel() * base.element_size()
        return x

    def enter(module, args):
        module._start = total[0]
        inputs[0] += args[0].numel() * args[0].element_size()

    def leave(module, args, out):
        per_layer.append(total[0] - module._start)

    for m in unet.modules():
        if isinstance(m, UNetLayer):
            m.register_forward_pre_hook(enter)
            m.register_forward_hook(leave)
    real_sdpa = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = lambda q, k, v, attn_mask=None: _FusedAttention.apply(q, k, v)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            unet(z, t, c, None)
    finally:
        F.scaled_dot_product_attention = real_sdpa
    inside = sum(per_layer)
    return float(total[0]), float(total[0] - inside + inputs[0]), float(max(per_layer))


class _FusedAttention(torch.autograd.Function):
    """Stands in for a fused attention kernel while counting: the output's shape, and the tensors it saves."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)  # (B, heads, N, d)
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)  # (B, heads, N)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        raise NotImplementedError("only counts what the forward saves")


def rows(batch: int, side: int, ranks=(4, 16, 64)) -> list[dict]:
    cfg = load_preset(PriorConfig, PRESETS, "base").model
    with torch.device("meta"):
        unet = UNet(cfg)
    n = sum(p.numel() for p in unet.parameters())
    act, kept, largest = activation_bytes(cfg, batch, side)
    out = []
    for label, trained, moments in [
        ("full, AdamW", n, 8),
        ("full, AdamW8bit", n, 2),
        *[(f"LoRA r={r} attn, AdamW", lora_params(unet, r), 8) for r in ranks],
    ]:
        static = 4 * n + (4 + moments + 4) * trained  # fp32 weights; grads, moments, EMA of what trains
        for ckpt, a in (("off", act), ("on", kept + largest)):
            out.append({"what": label, "trained": trained, "checkpointing": ckpt, "static": static, "act": a})
    return out


def lora_params(unet: UNet, rank: int) -> int:
    total = 0
    for name in target_names(unet, LoraConfig(rank=rank).targets):
        w = unet.get_submodule(name).weight
        total += rank * (w.shape[0] + w[0].numel())
    return total


FIXED_GB = 1.3  # the frozen autoencoder and CLIP ViT-L text tower in fp32 (207M parameters) and CUDA's context


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.finetune_memory", description=__doc__.splitlines()[0])
    p.add_argument("--side", type=int, default=64, help="latent side (64: 512-px images)")
    args = p.parse_args(argv)
    print(f"COMPUTED (not measured on a GPU): SD 1.5 UNet, {args.side}x{args.side} latents, bf16 autocast, EMA kept")
    print(
        "| run | trained | checkpointing | weights, grads, moments, EMA (GB) | activations per sample (GB) "
        "| largest batch in 24 / 40 / 80 GB |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows(1, args.side):
        fits = []
        for gpu in (24, 40, 80):
            left = gpu - FIXED_GB - r["static"] / GB
            fits.append(str(int(left // (r["act"] / GB))) if left > 0 else "does not fit")
        print(
            f"| {r['what']} | {r['trained'] / 1e6:.1f}M | {r['checkpointing']} | {r['static'] / GB:.2f} | "
            f"{r['act'] / GB:.2f} | {' / '.join(fits)} |"
        )


if __name__ == "__main__":
    main()
