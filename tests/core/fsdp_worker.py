"""What tests/core/test_fsdp.py runs in each of 2 spawned gloo processes; its own module, as each imports it."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def check_helpers(rank: int, port: int, results) -> None:
    from latentdiff.core import sharding
    from latentdiff.core.runtime import Runtime
    from latentdiff.prior.unet import UNet, UNetConfig

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(rank)  # each rank draws its own initial weights, as under torchrun
        cfg = UNetConfig(channels=(16, 32), num_res_blocks=1, attention_levels=(1,), context_dim=8, heads=1)
        model = UNet(cfg)
        reference = {k: v.clone() for k, v in model.state_dict().items()}
        dist.broadcast_object_list(ref := [reference], src=0)  # rank 0's, which every rank must start from
        rt = Runtime(torch.device("cpu"), rank, 2, rank, precision="bf16")
        units = sharding.shard_units(model)
        names = sorted({type(u).__name__ for u in units})  # before fully_shard renames the classes (FSDPUNetLayer)
        sharding.shard(model, rt)
        seen = []
        model.up[0].register_forward_pre_hook(lambda m, args: seen.append(m.res.conv1.weight.dtype))
        z, t, c = torch.randn(2, 4, 8, 8), torch.tensor([1.0, 5.0]), torch.randn(2, 3, 8)
        model(z, t, c)
        full = sharding.full_state_dict(model)
        plain = sharding.full_module(model)
        results[rank] = {
            "units": names,
            "n_units": len(units),
            "sharded": all(sharding.is_sharded(u) for u in units) and sharding.is_sharded(model),
            "bf16_in_forward": seen == [torch.bfloat16],
            "fp32_kept": all(p.dtype == torch.float32 for p in model.parameters()),
            "full_is_rank0s": rank > 0 or all(torch.equal(full[k], ref[0][k]) for k in ref[0]),
            "empty_elsewhere": rank == 0 or full == {},
            "plain_is_rank0s": all(torch.equal(v, ref[0][k]) for k, v in plain.state_dict().items()),
            "plain_is_plain": not sharding.is_sharded(plain) and plain.training == model.training,
        }
    finally:
        dist.destroy_process_group()
