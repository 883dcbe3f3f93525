"""Sharding a model over torchrun's processes with PyTorch's FSDP2 (`fully_shard`), and gathering it back.

DDP keeps the whole model, its gradients and AdamW's two moments on every process; FSDP keeps
1/world_size of each (Zhao et al. 2023, "PyTorch FSDP"), all-gathering a block's weights just
before it runs and reduce-scattering its gradients after. `train.parallel = "fsdp"` picks it
(core.train.TrainConfig; `Runtime.wrap` calls `shard`).

What leaves a process stays in the layout a single process writes: checkpoints hold the bare
module's full tensors and the optimizer state in torch's own numbered form (`full_state_dict`,
`full_optimizer_state`), so a checkpoint loads whatever the world size, and for sampling in one
process, unchanged. Sampling during training runs on a gathered plain copy (`full_module`).
Every function here that takes a sharded module is a collective: all ranks call it, in the same order.
"""

from __future__ import annotations

import copy
import sys
import weakref
from collections.abc import Iterable
from typing import TYPE_CHECKING, Literal, get_args

import torch
from torch import nn

from .errors import UserError

# torch.distributed.fsdp and .checkpoint are imported where they are used: they add a second to the
# start of every command, and only a sharded run needs them.

if TYPE_CHECKING:
    from .ema import EMA
    from .runtime import Runtime

# How a model trains under torchrun (core.train.TrainConfig.parallel).
Parallel = Literal["ddp", "fsdp"]
PARALLEL_CHOICES: tuple[str, ...] = get_args(Parallel)
FSDP_STAGES = ("prior", "autoencoder")  # the stages whose loops shard their model (the others train under DDP)

# Each sharded module's plain twin with its parameters on the meta device (no memory): what `full_module` fills.
_SKELETONS: weakref.WeakKeyDictionary[nn.Module, nn.Module] = weakref.WeakKeyDictionary()


def check_parallel(stage: str, parallel: str) -> None:
    """Refuse (UserError, one line) train.parallel = "fsdp" for a stage whose loop does not shard its model."""
    if parallel == "fsdp" and stage not in FSDP_STAGES:
        raise UserError(
            f'train.parallel = "fsdp" shards the {" and the ".join(FSDP_STAGES)} only; the {stage} stage trains '
            f'under DDP: leave train.parallel out (or --set train.parallel="ddp")'
        )


def is_sharded(module: nn.Module) -> bool:
    """Whether fully_shard has sharded this module (nothing is, until torch.distributed.fsdp is imported)."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    return fsdp is not None and isinstance(module, fsdp.FSDPModule)


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The blocks a network runs one after another, children before parents: each module an nn.ModuleList holds.

    The UNet's layers, downsamplers and upsamplers, the encoder's and decoder's ResBlocks. A
    container (ModuleList, ModuleDict) is never a unit itself, as it is never called: FSDP2
    gathers a unit's weights in a forward hook. What no unit holds (stems, output convs,
    embeddings) stays with the root, whose weights stay gathered from forward to backward.
    """
    units = []
    for parent in model.modules():
        if isinstance(parent, nn.ModuleList):
            units += [m for m in parent if not isinstance(m, nn.ModuleList | nn.ModuleDict) and _owns_parameters(m)]
    # model.modules() lists parents first; fully_shard wants each child sharded before its parent.
    order = {id(m): i for i, m in enumerate(model.modules())}
    return sorted(units, key=lambda m: -order[id(m)])


def _owns_parameters(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def shard_model(model: nn.Module, runtime: Runtime, parallel: str, ema: EMA | None = None) -> None:
    """train.parallel "fsdp" under torchrun: shard `model` and the EMA's copy in place (`shard`); else nothing.

    Call it before building the optimizer (FSDP replaces the parameters) and before `Run.begin`
    (a resume then loads each rank's slices); `Runtime.wrap` leaves a sharded model as it is.
    """
    if parallel == "fsdp" and runtime.distributed:
        shard(model, runtime, also=[ema.module] if ema is not None and ema.enabled else [])


def shard(model: nn.Module, runtime: Runtime, also: Iterable[nn.Module] = ()) -> nn.Module:
    """Shard `model` in place over the process group: each `shard_units` block, then the root; returns it.

    also: modules of the same architecture to shard alike (the EMA's copy), so that their
    shards line up with the model's, tensor for tensor. Every rank first takes rank 0's
    weights, as DDP does when it wraps: each rank drew its own initial weights from its seed,
    and fully_shard keeps each rank's slice of its own copy. Under precision "bf16" the
    blocks compute with bf16 weights and reduce gradients in float32 (MixedPrecisionPolicy);
    the parameters and AdamW's state stay float32. Build the optimizer after this: FSDP
    replaces the parameters with sharded ones (DTensors).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(runtime.device.type, (runtime.world_size,))
    if runtime.precision == "bf16":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        policy = MixedPrecisionPolicy()
    for module in (model, *also):
        runtime.broadcast_module(module)
        # Parameters on the meta device: a twin that costs no memory; buffers (small, some are constants) copied.
        memo = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad) for p in module.parameters()}
        skeleton = copy.deepcopy(module, memo)
        for unit in shard_units(module):
            fully_shard(unit, mesh=mesh, mp_policy=policy)
        fully_shard(module, mesh=mesh, mp_policy=policy)
        _SKELETONS[module] = skeleton
    return model


def _options(everywhere: bool):
    """Full tensors on every rank's device, or (a checkpoint's) in rank 0's CPU memory alone."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=not everywhere)


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The bare module's state dict with full tensors: a checkpoint's weights, whatever the sharding.

    Of a sharded module a collective, gathered into rank 0's CPU memory; the other ranks get {}.
    Of any other module its own state_dict (under DDP or torch.compile: the module's inside).
    """
    if not is_sharded(module):
        from .runtime import unwrap

        return unwrap(module).state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(module, options=_options(everywhere=False))


def load_full_state_dict(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load full tensors (a checkpoint's) into a module, sharded or not; every rank passes the whole dict.

    Raises RuntimeError ("Error(s) in loading state_dict ...") when keys or shapes do not fit.
    """
    if not is_sharded(module):
        from .runtime import unwrap

        unwrap(module).load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    _check_fits(module, state)
    set_model_state_dict(module, state, options=_options(everywhere=True))


def _check_fits(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """load_state_dict's refusal, before FSDP scatters anything: missing or unexpected keys, other (full) shapes."""
    own = {name: tuple(t.shape) for name, t in module.state_dict().items()}  # DTensors: their full shapes
    problems = [f"missing key {k}" for k in sorted(own.keys() - state.keys())]
    problems += [f"unexpected key {k}" for k in sorted(state.keys() - own.keys())]
    problems += [
        f"size mismatch for {k}: {tuple(state[k].shape)} in the checkpoint, {shape} here"
        for k, shape in own.items()
        if k in state and tuple(state[k].shape) != shape
    ]
    if problems:
        raise RuntimeError(f"Error(s) in loading state_dict: {'; '.join(problems[:3])}")


def full_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state_dict as one process holds it: parameters numbered in group order, full tensors.

    For a sharded module a collective (rank 0 gets it in CPU memory, the others {}), renumbered
    from the parameter names torch.distributed.checkpoint keys it by, so that it loads into a
    plain optimizer over the bare module (`optimizer.load_state_dict`) whatever the world size.
    """
    if not is_sharded(module) or not optimizer.state:
        # No state yet (no step taken): ids and hyper-parameters only, the same at any sharding.
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    named = get_optimizer_state_dict(module, optimizer, options=_options(everywhere=False))
    if not named:
        return {}
    names = [name for group in named["param_groups"] for name in group["params"]]
    number = {name: i for i, name in enumerate(names)}
    return {
        "state": {number[name]: value for name, value in named["state"].items()},
        "param_groups": [{**group, "params": [number[n] for n in group["params"]]} for group in named["param_groups"]],
    }


def load_full_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a state that `full_optimizer_state` (or a plain optimizer) wrote; every rank passes the whole of it."""
    if not is_sharded(module) or not state.get("state"):
        optimizer.load_state_dict(state)
        return
    name_of = {p: name for name, p in module.named_parameters()}
    names = [name_of[p] for group in optimizer.param_groups for p in group["params"]]
    saved = [i for group in state["param_groups"] for i in group["params"]]
    if len(saved) != len(names):
        raise ValueError(
            f"loaded state dict has {len(saved)} parameters and this optimizer {len(names)}: the model changed"
        )
    # torch.distributed.checkpoint matches each group's keys to the optimizer's own, which lack the ones
    # a scheduler adds (LambdaLR's initial_lr); the saved values are set below, as load_state_dict sets them.
    own_keys = [set(group) for group in optimizer.param_groups]
    named = {
        "state": {names[i]: value for i, value in state["state"].items()},
        "param_groups": [
            {**{k: v for k, v in group.items() if k in keys}, "params": [names[i] for i in group["params"]]}
            for group, keys in zip(state["param_groups"], own_keys)
        ],
    }
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(module, optimizer, named, options=_options(everywhere=True))
    for group, saved_group in zip(optimizer.param_groups, state["param_groups"]):
        group.update({k: v for k, v in saved_group.items() if k != "params"})


def full_module(module: nn.Module) -> nn.Module:
    """The module itself; for a sharded one, a plain copy holding its full weights, on every rank (a collective).

    For what runs on one rank alone while the others wait (sample grids, evaluation): a sharded
    module's forward would all-gather, and hang without the other ranks. The copy costs one
    full set of weights on each rank's device while it is kept; it keeps the module's mode.
    """
    if not is_sharded(module):
        return module
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(module, options=_options(everywhere=True))
    plain = copy.deepcopy(_SKELETONS[module])
    plain.load_state_dict(state, assign=True)
    for name, buffer in module.named_buffers():  # non-persistent buffers are not in the state dict
        plain.get_buffer(name).copy_(buffer)
    plain.requires_grad_(False)
    return plain.train(module.training)


def plain_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor as a plain tensor of its full value; any other tensor as it is.

    For clip_grad_norm_'s total norm over sharded gradients: a replicated DTensor, which every
    rank already holds whole (no communication), and which must not meet plain tensors in one op.
    """
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard, a view (writing to it writes the DTensor); any other tensor as it is.

    For element-wise work on sharded weights that DTensor has no rule for (torch._foreach_copy_).
    """
    return t.to_local() if hasattr(t, "to_local") else t
