"""`--cache-latents` under torchrun: every rank encodes its share of the shards, no rank waits in a
collective while others encode, the cache is the same whatever the world size or the workers, and an
interrupted build keeps the parts it finished."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from latentdiff.autoencoder.load import load_autoencoder
from latentdiff.core.runtime import Runtime
from latentdiff.prior.latent_cache import LatentCache
from tests.helpers import N_TRAIN

# A process group this short ends a barrier in which one rank waits for another to encode (it did before
# the ranks shared the work), yet leaves the ranks' one short vote time to meet on a busy machine.
GROUP_TIMEOUT_S = 10
SLOW_S = 6.0  # rank 0's extra time per encoded batch: its share (2 shards of 16) outlasts the timeout
BATCH = 16  # one batch per shard of the fixture (4 shards of 16)


def _counting(ae, delay_s: float = 0.0, fail_after: int | None = None) -> list[int]:
    """Wrap ae.encode to count the images it encodes (and sleep, or fail after `fail_after` calls)."""
    import time

    counts, encode = [0, 0], ae.encode

    def counted(x):
        if fail_after is not None and counts[1] >= fail_after:
            raise KeyboardInterrupt  # as a stopped run: the parts written so far stay
        time.sleep(delay_s)
        counts[0] += x.shape[0]
        counts[1] += 1
        return encode(x)

    ae.encode = counted
    return counts


def _rank(rank: int, world_size: int, init_file: str, data: str, ae_dir: str, out: str) -> None:
    """One of two gloo processes building the cache of `data`, rank 0 slower than the group's timeout."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    ae, space = load_autoencoder(ae_dir)  # before joining: the ranks then reach the build together
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=GROUP_TIMEOUT_S),
    )
    counts = _counting(ae, SLOW_S if rank == 0 else 0.0)
    rt = Runtime(torch.device("cpu"), rank=rank, world_size=world_size)
    cache = LatentCache.build(ae, data, Path(out) / "cache", space.resolution, rt, batch_size=BATCH, num_workers=2)
    row = {
        "encoded": counts[0],
        "captions": cache.captions,
        "meta": cache.meta,
        "mean_sum": cache.mean.double().sum().item(),
    }
    Path(out, f"rank{rank}.json").write_text(json.dumps(row))
    dist.destroy_process_group()


def test_two_ranks_share_the_encoding_and_build_what_one_builds(data, ae_run, tmp_path):
    import torch.multiprocessing as mp

    two = tmp_path / "two"
    two.mkdir()
    mp.spawn(_rank, args=(2, str(tmp_path / "init"), str(data), str(ae_run[0]), str(two)), nprocs=2, join=True)
    ranks = [json.loads((two / f"rank{r}.json").read_text()) for r in (0, 1)]
    # Each rank encoded its own two shards, and no rank timed out waiting for the slow one.
    assert [r["encoded"] for r in ranks] == [N_TRAIN // 2, N_TRAIN // 2]

    ae, space = load_autoencoder(ae_run[0])
    counts = _counting(ae)
    one = LatentCache.build(ae, str(data), tmp_path / "one", space.resolution, Runtime(torch.device("cpu")), BATCH)
    assert counts[0] == N_TRAIN and len(one) == N_TRAIN
    # The same latents and captions in the same order, bit for bit, whatever the world size and workers.
    a, b = (load_file(str(p / "latents.safetensors")) for p in (tmp_path / "one", two / "cache"))
    assert a.keys() == b.keys() == {"mean", "std"}
    assert all(torch.equal(a[k], b[k]) for k in a)
    for r in ranks:  # every rank reads the whole cache
        assert r["captions"] == one.captions and r["mean_sum"] == one.mean.double().sum().item()
        assert r["meta"] == one.meta and len(one.meta) == N_TRAIN
    assert not (two / "cache" / "parts").exists()  # the parts were merged and removed


def test_progress_counts_the_images_of_the_whole_split(data, ae_run, tmp_path, capsys):
    ae, space = load_autoencoder(ae_run[0])
    LatentCache.build(ae, str(data), tmp_path / "cache", space.resolution, Runtime(torch.device("cpu")), BATCH)
    err = capsys.readouterr().err
    assert f"{N_TRAIN}/{N_TRAIN}" in err and "image" in err


def test_an_interrupted_build_keeps_its_finished_shards(data, ae_run, tmp_path):
    ae, space = load_autoencoder(ae_run[0])
    rt = Runtime(torch.device("cpu"))
    path = tmp_path / "cache"
    _counting(ae, fail_after=2)
    with pytest.raises(KeyboardInterrupt):
        LatentCache.build(ae, str(data), path, space.resolution, rt, BATCH)
    assert not (path / "cache.json").exists()  # nothing committed
    ae, _ = load_autoencoder(ae_run[0])
    counts = _counting(ae)
    resumed = LatentCache.build(ae, str(data), path, space.resolution, rt, BATCH)
    assert counts[0] == N_TRAIN - 2 * BATCH  # the two finished shards were not encoded again
    fresh = LatentCache.build(ae, str(data), tmp_path / "fresh", space.resolution, rt, BATCH)
    assert resumed.captions == fresh.captions and torch.equal(resumed.mean, fresh.mean)
    assert torch.equal(resumed.std, fresh.std)
