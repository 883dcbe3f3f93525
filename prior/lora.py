"""LoRA on the prior's UNet (Hu et al. 2021): adapters trained through peft, and the file others load.

A LoRA layer computes W x + (alpha / r) B A x, with W (out, in) frozen, A (r, in) and B (out, r) trained,
B starting at zero so training starts from the base model (Hu et al. 2021, eq. 3 and §4.1). For a
convolution A is a conv with W's kernel (r, in, k, k) and B a 1x1 conv (out, r, 1, 1), as peft, kohya's
LoCon and diffusers build them. Merged with a user's scale s: W' = W + s (alpha / r) B A.

Names. In a run, the adapters are `Adapters`: a module holding each adapted layer's A and B (the very
tensors peft injected into the UNet) under the layer's own name, `down.1.attn.block.self_attn.to_q.lora_A.weight`;
checkpoints and the EMA hold these alone. In a LoRA file they carry the kohya / diffusers-SD naming that
diffusers' `load_lora_weights` and ComfyUI's LoRA loader read: the layer's diffusers module path
(prior/interchange.diffusers_namer) with "." replaced by "_", prefixed "lora_unet_", then
`.lora_down.weight` (A), `.lora_up.weight` (B) and `.alpha` (a 0-d tensor), e.g.
`lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from latentdiff.core.errors import UserError

from .config import LoraConfig, LoraTarget
from .interchange import diffusers_namer
from .unet import UNet, UNetConfig

ADAPTER = "default"  # peft's adapter name; one adapter per UNet here
PREFIX = "lora_unet_"

# Which of the UNet's layers each lora.targets entry adapts (full module names; the UNet's own naming).
TARGET_PATTERNS: dict[LoraTarget, re.Pattern] = {
    "attn": re.compile(r"\.(self_attn|cross_attn)\.(to_q|to_k|to_v|to_out)$"),
    "ff": re.compile(r"\.ff\.(proj_in|proj_out)$"),
    "conv": re.compile(r"\.res\.(conv1|conv2|skip)$"),
}


def require_peft():
    """The peft package, imported on first use; UserError (one line) naming the install command when missing."""
    try:
        import peft
    except ImportError:
        raise UserError(
            "lora.rank > 0 needs peft, which is not installed: pip install peft (or pip install 'latentdiff[lora]')"
        ) from None
    return peft


def target_names(unet: nn.Module, targets: Sequence[LoraTarget]) -> list[str]:
    """The full names of the nn.Linear / nn.Conv2d layers of `unet` that `targets` adapt, in module order."""
    patterns = [TARGET_PATTERNS[t] for t in targets]
    return [
        name
        for name, module in unet.named_modules()
        if isinstance(module, (nn.Linear, nn.Conv2d)) and any(p.search(name) for p in patterns)
    ]


class Adapters(nn.Module):
    """The LoRA layers (A, B) that peft added to a UNet, under the names of the layers they adapt.

    It shares its parameters with the UNet: the optimizer, the EMA (a copy of this module alone) and the
    checkpoints take it where a full run takes the UNet, so only the adapters train and are saved.
    """

    def __init__(self, unet: nn.Module, names: Sequence[str]):
        super().__init__()
        self.names = list(names)
        for name in self.names:
            layer = unet.get_submodule(name)
            holder: nn.Module = self
            for part in name.split("."):
                if part not in holder._modules:
                    holder.add_module(part, nn.Module())
                holder = holder._modules[part]
            holder.add_module("lora_A", layer.lora_A[ADAPTER])  # (r, in) or conv (r, in, k, k)
            holder.add_module("lora_B", layer.lora_B[ADAPTER])  # (out, r) or conv (out, r, 1, 1)

    @contextmanager
    def holding(self, state: dict[str, torch.Tensor]) -> Iterator[None]:
        """These weights (the EMA's) in the adapters for the block, the trained ones put back after."""
        if not state:
            yield
            return
        kept = {k: v.detach().clone() for k, v in self.state_dict().items()}
        self.load_state_dict(state)
        try:
            yield
        finally:
            self.load_state_dict(kept)


def add_adapters(unet: UNet, cfg: LoraConfig) -> Adapters:
    """Freeze `unet` and inject peft LoRA layers (rank, alpha, dropout of `cfg`) into the layers cfg.targets name.

    A starts as peft draws it (Kaiming-uniform, from the global RNG), B at zero: the UNet's output is unchanged.
    Raises UserError when peft is missing or no layer matches (a UNet without transformers and "attn").
    """
    peft = require_peft()
    names = target_names(unet, cfg.targets)
    if not names:
        raise UserError(f'lora.targets {list(cfg.targets)} match no layer of this UNet; add "conv" or "ff"')
    unet.requires_grad_(False)
    config = peft.LoraConfig(
        r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=names, bias="none"
    )
    peft.inject_adapter_in_model(config, unet, adapter_name=ADAPTER)
    adapters = Adapters(unet, names)
    adapters.requires_grad_(True)
    return adapters


# ---------------------------------------------------------------- merged weights


@dataclass(frozen=True)
class LoraLayer:
    """One adapted layer: W' = W + scale * (alpha / rank) * up @ down."""

    module: str  # the UNet's name of the layer, e.g. "down.1.attn.block.self_attn.to_q"
    down: torch.Tensor  # A: (r, in) or (r, in, k, k)
    up: torch.Tensor  # B: (out, r) or (out, r, 1, 1)
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self, shape: torch.Size) -> torch.Tensor:
        """(alpha / r) B A in float32, shaped like the layer's weight."""
        up, down = self.up.float().flatten(1), self.down.float().flatten(1)  # (out, r), (r, in * k * k)
        return ((self.alpha / self.rank) * (up @ down)).reshape(shape)


def layers_from_adapters(state: dict[str, torch.Tensor], alpha: float) -> list[LoraLayer]:
    """An Adapters state dict (a LoRA run's checkpoint) as LoraLayers."""
    modules = [k.removesuffix(".lora_A.weight") for k in state if k.endswith(".lora_A.weight")]
    return [LoraLayer(m, state[f"{m}.lora_A.weight"], state[f"{m}.lora_B.weight"], alpha) for m in modules]


@torch.no_grad()
def merge(unet: nn.Module, layers: Sequence[LoraLayer], scale: float, where: str) -> None:
    """W <- W + scale (alpha / r) B A for each layer, in place, in W's dtype (a UNet without peft layers).

    Raises UserError (one line) for a layer the UNet lacks or whose shape differs.
    """
    for layer in layers:
        try:
            weight = unet.get_submodule(layer.module).weight
        except AttributeError:
            raise UserError(f"{where}: adapts {layer.module}, which this prior's UNet does not have") from None
        out_in = (layer.up.shape[0], layer.down.flatten(1).shape[1])
        if out_in != (weight.shape[0], weight[0].numel()):
            raise UserError(
                f"{where}: the adapter of {layer.module} is for a {out_in[0]} x {out_in[1]} weight, but this prior's "
                f"is {weight.shape[0]} x {weight[0].numel()}; it was trained on another model"
            )
        weight.add_((scale * layer.delta(weight.shape)).to(weight.dtype))


# ---------------------------------------------------------------- the file


def kohya_namer(cfg: UNetConfig):
    """UNet layer name -> its LoRA file name, `lora_unet_` + the diffusers module path with "_" for "."."""
    namer = diffusers_namer(cfg)
    return lambda module: PREFIX + namer(module + ".weight").removesuffix(".weight").replace(".", "_")


def file_tensors(layers: Sequence[LoraLayer], cfg: UNetConfig) -> dict[str, torch.Tensor]:
    """The LoRA file's tensors (kohya / diffusers-SD names, float32, contiguous) for these layers."""
    name = kohya_namer(cfg)
    out = {}
    for layer in layers:
        key = name(layer.module)
        out[f"{key}.lora_down.weight"] = layer.down.float().contiguous()
        out[f"{key}.lora_up.weight"] = layer.up.float().contiguous()
        out[f"{key}.alpha"] = torch.tensor(float(layer.alpha))
    return out


def lora_metadata(cfg, meta: dict, run: str | Path, step: int, weights: str) -> dict[str, str]:
    """The LoRA file's header: latentdiff's records (source run, base, rank, alpha, targets, version) and kohya's
    ss_network_* keys, which kohya's and A1111's tools show. cfg: the run's PriorConfig; meta: its meta.json."""
    import importlib.metadata

    try:
        version = importlib.metadata.version("latentdiff")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    init = meta.get("init") or {}
    return {
        "latentdiff.version": version,
        # Folder names, not paths: the file is made to be shared, and a path names the maker's disk.
        "latentdiff.source_run": Path(run).resolve().name,
        "latentdiff.step": str(step),
        "latentdiff.weights": weights,
        "latentdiff.base": Path(init["path"]).name if init.get("path") else "",
        "latentdiff.base_step": str(init.get("step", "")),
        "latentdiff.base_hash": str(init.get("hash", "")),
        "latentdiff.rank": str(cfg.lora.rank),
        "latentdiff.alpha": f"{cfg.lora.alpha:g}",
        "latentdiff.targets": ",".join(cfg.lora.targets),
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(cfg.lora.rank),
        "ss_network_alpha": f"{cfg.lora.alpha:g}",
    }


def write_lora_file(path: str | Path, layers: Sequence[LoraLayer], cfg: UNetConfig, metadata: dict[str, str]) -> Path:
    """Write a LoRA safetensors (file_tensors) with `metadata` (strings) in its header; returns the path."""
    from latentdiff.core import checkpoint as ckpt

    path = Path(path)
    if path.suffix != ".safetensors":
        raise UserError(f"{path}: a LoRA file is written as .safetensors; name it FILE.safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    ckpt.save_weights(path, file_tensors(layers, cfg), {k: str(v) for k, v in metadata.items()})
    return path


def read_lora_file(path: str | Path, cfg: UNetConfig) -> list[LoraLayer]:
    """The layers of a kohya / diffusers-SD LoRA file for a UNet of `cfg` (the file's alpha; rank when absent).

    Raises UserError (one line) for a missing file, a key that names no layer of this UNet (another model, or
    text-encoder LoRA weights, `lora_te_...`, which latentdiff does not apply) or an up without its down.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise UserError(f"LoRA file {path} does not exist")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path} is not a readable safetensors file ({e})") from None
    name = kohya_namer(cfg)
    with torch.device("meta"):
        modules = dict(UNet(cfg).named_modules())
    ours = {name(m): m for m, module in modules.items() if isinstance(module, (nn.Linear, nn.Conv2d))}
    layers, seen = [], set()
    for key in state:
        stem, _, kind = key.partition(".")
        if kind not in ("lora_down.weight", "lora_up.weight", "alpha"):
            raise UserError(f"{path}: {key} is not a LoRA tensor (lora_down.weight, lora_up.weight or alpha)")
        if stem.startswith("lora_te"):
            raise UserError(
                f"{path}: {stem} is a text-encoder LoRA layer, which latentdiff does not apply (only lora_unet_ ones)"
            )
        if stem not in ours:
            raise UserError(f"{path}: {stem} names no layer of this prior's UNet; the file was made for another model")
        if stem in seen:
            continue
        seen.add(stem)
        down, up = state.get(f"{stem}.lora_down.weight"), state.get(f"{stem}.lora_up.weight")
        if down is None or up is None:
            raise UserError(f"{path}: {stem} has no {'lora_down' if down is None else 'lora_up'}.weight")
        alpha = state.get(f"{stem}.alpha")
        layers.append(LoraLayer(ours[stem], down, up, float(alpha) if alpha is not None else float(down.shape[0])))
    if not layers:
        raise UserError(f"{path} holds no LoRA tensors")
    return layers


def parse_lora(text: str) -> tuple[str, float]:
    """`FILE[:SCALE]` -> (FILE, SCALE); the scale is 1 when absent. Raises UserError for a scale that is no number."""
    head, sep, tail = text.rpartition(":")
    if not sep or not head or "/" in tail or tail.endswith(".safetensors"):
        return text, 1.0
    try:
        return head, float(tail)
    except ValueError:
        raise UserError(f"--lora {text}: the scale after ':' must be a number, e.g. --lora {head}:0.8") from None


def export_lora(run: str | Path, out: str | Path, *, ema: bool = True, checkpoint: int | None = None) -> dict:
    """Write the adapters of LoRA run `run` (its newest checkpoint, or the one of step `checkpoint`) to `out`.

    Returns {"out", "layers", "rank", "step", "weights", "bytes"}. Raises UserError for a run that is not a
    LoRA run, CheckpointError for a missing checkpoint.
    """
    from latentdiff.core import checkpoint as ckpt
    from latentdiff.core.runs import read_config

    from .config import PriorConfig
    from .pipeline import checkpoint_folder

    run = Path(run)
    folder, step = checkpoint_folder(run, checkpoint)
    meta = ckpt.read_meta(folder, "prior")
    if not meta.get("lora"):
        raise UserError(
            f"{run} is not a LoRA run (lora.rank = 0): its whole UNet trained; "
            f"export it with `latentdiff export pipeline {run}`"
        )
    cfg = read_config(ckpt.committed_file(folder, ckpt.CONFIG).parent, PriorConfig)
    weights = "ema" if ema and meta.get("ema") else "model"
    state = ckpt.load_weights(ckpt.committed_file(folder, ckpt.EMA if weights == "ema" else ckpt.MODEL))
    layers = layers_from_adapters(state, cfg.lora.alpha)
    step = int(meta.get("step", step or 0))
    path = write_lora_file(out, layers, cfg.model, lora_metadata(cfg, meta, run, step, weights))
    return {
        "out": str(path),
        "layers": len(layers),
        "rank": cfg.lora.rank,
        "step": step,
        "weights": weights,
        "bytes": path.stat().st_size,
    }
