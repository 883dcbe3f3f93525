"""Encode the training set once and train the prior from the stored posterior moments.

The frozen encoder's q(z|x) never changes during prior training, so encoding every image
at every step is wasted work (CALIBRATION.md: 60k images take 37 s to encode). The cache keeps
the posterior mean and std of each training image (sampling z = mean + std * eps afresh
each time, as on the fly) with its caption and json, keyed by the encoder's content hash, the data's
fingerprint (core.runs.data_fingerprint), the resolution and the precision, so a dataset rebuilt
in place is encoded again.

The shard is the unit of work. Under torchrun rank r encodes shards r, r + W, r + 2W, ... (W ranks),
with the run's DataLoader workers and precision, and writes each shard's moments and captions as one
part file, atomically. Rank 0 then waits for the other ranks' parts by looking for their files (no
collective is in flight, so no process-group watchdog can end the wait) and streams the parts, in
shard order, into one latents.safetensors; cache.json, written last, commits the cache. Every batch
holds images of one shard only, so each image is encoded in the same batch whatever the world size
or the number of workers: the cache is the same, bit for bit on the CPU. A build that was stopped
keeps its finished parts, and the next one encodes only the shards that are missing.

Files under the cache folder:
    cache.json                 {"key", "count", "skipped"}: the commit record, written last
    latents.safetensors        "mean", "std": (N, C, h, w) float32, in shard order
    captions.json              {"captions": [N strings], "meta": [N dicts, each sample's json]}
    parts/key.json             the key the parts being built belong to
    parts/shard-000003.safetensors   one shard's "mean" and "std"; its captions, json and skips in the metadata

Every rank reads latents.safetensors through safetensors' memory map, so the ranks of one node
share the page cache instead of each holding the cache in its own memory (docs/reliability.md,
"The latent cache", has the figures).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm.auto import tqdm

from latentdiff.autoencoder.load import encoder_hash
from latentdiff.core import checkpoint as ckpt
from latentdiff.core.pixels import from_uint8_to
from latentdiff.core.runs import data_fingerprint
from latentdiff.data.reader import ShardStream, pins_memory, read_info, resolve_shards

CACHE_INFO, LATENTS, CAPTIONS, PARTS = "cache.json", "latents.safetensors", "captions.json", "parts"
POLL_S = 0.5  # how often a rank that waits for another's files looks for them


class LatentCache:
    def __init__(self, mean: torch.Tensor, std: torch.Tensor, captions: list[str], meta: list[dict]):
        self.mean, self.std, self.captions, self.meta = mean, std, captions, meta

    def __len__(self) -> int:
        return len(self.captions)

    @classmethod
    @torch.no_grad()
    def build(
        cls,
        ae,
        data: str,
        path: Path,
        resolution: int,
        rt,
        batch_size: int = 256,
        num_workers: int = 0,
    ) -> LatentCache:
        """Load the cache at `path` if it was made by this encoder from this data as it is now, else encode and
        write it, saying why in one line (another encoder, or the data rebuilt since).

        Under torchrun every rank calls this: rank 0 decides whether to build and all ranks share the
        encoding (see the module's docstring); the one collective is that decision, taken at once.
        mean and std come back memory-mapped from latents.safetensors: (N, C, h, w) float32 on the CPU.
        Raises ValueError when the split has no readable sample.
        """
        path = Path(path)
        key = {
            "encoder_hash": encoder_hash(ae),
            "data": str(Path(data).resolve()) if Path(data).exists() else data,
            # a dataset rebuilt in place keeps its path: its shards' sizes and times tell it apart
            "data_fingerprint": _fingerprint(data),
            "resolution": resolution,
            "precision": rt.precision,  # bf16 autocast encodes other moments than float32
            "sample_json": True,  # each sample's json is kept beside its caption (the grounding loss reads it)
        }
        (build,) = rt.any_rank(rt.is_main and _prepare(path, key, data))
        if build:
            shards = resolve_shards(data, "train")
            _encode_share(ae, shards, path / PARTS, resolution, rt, batch_size, num_workers, read_info(data))
            if rt.is_main:
                _merge(path, key, len(shards), data)
            else:
                _wait_for(lambda: (path / CACHE_INFO).is_file())
        # safetensors maps the file: tensors backed by the page cache, which the ranks of a node share
        tensors = ckpt.load_weights(path / LATENTS)
        listed = ckpt.read_json(path / CAPTIONS)
        return cls(tensors["mean"], tensors["std"], listed["captions"], listed["meta"])

    def loader(self, batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1):
        """Endless batches over seeded per-epoch permutations; each rank takes every world_size-th item."""
        n = len(self)
        if n < batch_size * world_size:
            raise ValueError(f"the latent cache holds {n} samples, fewer than one batch of {batch_size} per rank")
        epoch = 0
        while True:
            g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            order = torch.randperm(n, generator=g)[rank::world_size]
            for i in range(0, len(order) - batch_size + 1, batch_size):
                idx = order[i : i + batch_size]
                yield {
                    "mean": self.mean[idx],
                    "std": self.std[idx],
                    "caption": [self.captions[j] for j in idx.tolist()],
                    "meta": [self.meta[j] for j in idx.tolist()],
                    "skipped": 0,
                }
            epoch += 1

    @staticmethod
    def sample(batch: dict, device: torch.device) -> torch.Tensor:
        """z ~ q(z|x) from cached moments (global RNG, as the on-the-fly path)."""
        mean, std = batch["mean"].to(device), batch["std"].to(device)
        return mean + std * torch.randn_like(mean)


# ---- deciding (rank 0) ---------------------------------------------------------------------------

WHY = {
    "encoder_hash": "the autoencoder's encoder is another",
    "data": "the data is another",
    "data_fingerprint": "{data} changed since (rebuilt or replaced)",
    "resolution": "the resolution is another",
    "precision": "it was encoded at another precision (or by an earlier latentdiff)",
    "sample_json": "it holds no sample json (made by an earlier latentdiff)",
}


def _fingerprint(data: str) -> str | None:
    fingerprint = data_fingerprint(data)
    return fingerprint.sha256 if fingerprint is not None else None


def _recorded_key(info_path: Path) -> dict | None:
    """The key a cache (or a build's parts) was made with, or None when there is no readable record."""
    try:
        return ckpt.read_json(info_path).get("key")
    except (FileNotFoundError, ckpt.CheckpointError, AttributeError):
        return None


def _prepare(path: Path, key: dict, data: str) -> bool:
    """Whether the cache must be (re)built. If so, its commit record is removed first (so the other ranks can
    wait for the new one) and parts/ is made ready for this key, keeping the parts of a stopped build of it."""
    recorded = _recorded_key(path / CACHE_INFO)
    if recorded == key and (path / LATENTS).is_file() and (path / CAPTIONS).is_file():
        return False
    if recorded is not None:
        changed = [WHY[k].format(data=data) for k in key if recorded.get(k) != key[k]] or ["its files are missing"]
        print(f"latent cache {path}: {'; '.join(changed)}; encoding the data again", flush=True)
    (path / CACHE_INFO).unlink(missing_ok=True)
    parts = path / PARTS
    if _recorded_key(parts / "key.json") != key:  # parts of another encoder or data: never mixed in
        shutil.rmtree(parts, ignore_errors=True)
    ckpt.write_json(parts / "key.json", {"key": key})
    return True


# ---- encoding (every rank) -----------------------------------------------------------------------


def _part(parts: Path, shard: int) -> Path:
    return parts / f"shard-{shard:06d}.safetensors"


def _done_shards(parts: Path) -> set[int]:
    """The shards whose part file is complete (written by atomic rename, so present means whole)."""
    names = os.listdir(parts) if parts.is_dir() else []
    prefix, suffix = "shard-", ".safetensors"
    return {int(n[len(prefix) : -len(suffix)]) for n in names if n.startswith(prefix) and n.endswith(suffix)}


class _ShardBatches(IterableDataset):
    """The batches of some shards, each shard read whole and in order by one DataLoader worker, then an
    end marker {"shard": i, "end": True}. A batch holds one shard's images only (its last batch may be short)."""

    def __init__(self, shards: list[tuple[int, str]], batch_size: int, resolution: int) -> None:
        super().__init__()
        self.shards, self.batch_size, self.resolution = shards, batch_size, resolution

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for index, url in self.shards[worker::workers]:
            # ShardStream hands worker w every `workers`-th URL of its list (data/reader.py's sharding rule):
            # listing this shard once per worker gives this worker all of it, in order.
            stream = ShardStream(
                [url] * workers,
                self.batch_size,
                shuffle=False,
                seed=0,
                repeat=False,
                resolution=self.resolution,
                drop_last=False,
                rank=0,
                world_size=1,
            )
            for batch in stream:
                yield {**batch, "shard": index}
            yield {"shard": index, "end": True}


def _as_is(item: dict[str, Any]) -> dict[str, Any]:
    return item  # batches are made in the workers; DataLoader only moves them


class _Moments:
    """One shard's posterior moments, captions and sample json as its batches arrive."""

    def __init__(self) -> None:
        self.mean: list[torch.Tensor] = []
        self.std: list[torch.Tensor] = []
        self.captions: list[str] = []
        self.meta: list[dict] = []
        self.skipped = 0

    def save(self, path: Path) -> None:
        # An empty shard still gets its part (a 0-element tensor), so the others know it is done.
        mean = torch.cat(self.mean) if self.mean else torch.zeros(0)
        std = torch.cat(self.std) if self.std else torch.zeros(0)
        meta = {"captions": json.dumps(self.captions), "meta": json.dumps(self.meta), "skipped": self.skipped}
        ckpt.save_weights(path, {"mean": mean, "std": std}, metadata=meta)


def _encode_share(ae, shards: list[str], parts: Path, resolution: int, rt, batch_size: int, num_workers: int,
                  info: dict) -> None:  # fmt: skip
    """Encode this rank's shards that have no part yet, one part file each; rank 0 then waits for all parts."""
    done = _done_shards(parts)
    mine = [(i, url) for i, url in enumerate(shards) if i % rt.world_size == rt.rank and i not in done]
    total = (info.get("splits") or {}).get("train")
    progress = _Progress(parts, {i for i, _ in mine}, total if isinstance(total, int) else None) if rt.is_main else None
    device = next(ae.parameters()).device
    if mine:
        batches = DataLoader(
            _ShardBatches(mine, batch_size, resolution),
            batch_size=None,
            num_workers=min(num_workers, len(mine)),
            collate_fn=_as_is,
            pin_memory=pins_memory(device),
        )
        building: dict[int, _Moments] = {}
        for item in batches:
            moments = building.setdefault(item["shard"], _Moments())
            if item.get("end"):
                moments.save(_part(parts, item["shard"]))
                del building[item["shard"]]
                continue
            with rt.autocast():
                post = ae.encode(from_uint8_to(item["image"], device))
            moments.mean.append(post.mean.float().cpu())
            moments.std.append(post.std.float().cpu())
            moments.captions += item["caption"]
            moments.meta += item["meta"]
            moments.skipped += item["skipped"]
            if progress is not None:
                progress.add(len(item["caption"]) + item["skipped"])
    if progress is not None:
        _wait_for(lambda: len(progress.poll()) == len(shards))
        progress.close()


class _Progress:
    """Rank 0's bar over the whole split, in images: its own as it encodes them, every other shard's
    (another rank's, or one a stopped build finished) when its part file appears."""

    def __init__(self, parts: Path, own: set[int], total: int | None) -> None:
        self.parts, self.own, self.counted = parts, own, set()
        self.bar = tqdm(total=total, desc="caching latents", unit="image")
        self.last = 0.0
        self.poll()

    def add(self, n: int) -> None:
        self.bar.update(n)
        if time.monotonic() - self.last > 1:
            self.poll()

    def poll(self) -> set[int]:
        """The shards done so far; the bar counts the others' new ones."""
        self.last = time.monotonic()
        done = _done_shards(self.parts)
        for shard in sorted(done - self.own - self.counted):
            meta = _part_metadata(_part(self.parts, shard))
            self.bar.update(len(json.loads(meta["captions"])) + int(meta["skipped"]))
            self.counted.add(shard)
        return done

    def close(self) -> None:
        self.bar.close()


def _wait_for(ready: Callable[[], bool], tick: Callable[[], Any] | None = None) -> None:
    """Poll `ready` until it holds: a wait on files, not a collective, so no process-group timeout ends it.

    A rank that fails ends the others: torchrun stops the whole group when one of its processes exits.
    """
    while not ready():
        if tick is not None:
            tick()
        time.sleep(POLL_S)


# ---- merging (rank 0) ----------------------------------------------------------------------------


def _part_metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def _merge(path: Path, key: dict, n_shards: int, data: str) -> None:
    """Stream every part, in shard order, into latents.safetensors and captions.json, commit with cache.json,
    then remove the parts. The parts are memory-mapped, so the merge never holds the cache in memory."""
    parts = [_part(path / PARTS, i) for i in range(n_shards)]
    tensors = [ckpt.load_weights(p) for p in parts]
    infos = [_part_metadata(p) for p in parts]
    full = [t for t in tensors if t["mean"].numel()]
    if not full:
        raise ValueError(f"the train split of {data} has no readable sample to cache (see the skip warnings)")
    _write_concatenated(path / LATENTS, {name: [t[name] for t in full] for name in ("mean", "std")})
    captions = [c for m in infos for c in json.loads(m["captions"])]
    meta = [x for m in infos for x in json.loads(m["meta"])]
    ckpt.write_json(path / CAPTIONS, {"captions": captions, "meta": meta})
    skipped = sum(int(m["skipped"]) for m in infos)
    ckpt.write_json(path / CACHE_INFO, {"key": key, "count": len(captions), "skipped": skipped})
    shutil.rmtree(path / PARTS)


def _write_concatenated(path: Path, columns: dict[str, list[torch.Tensor]]) -> None:
    """One safetensors file whose tensor NAME is the concatenation of columns[NAME] along dim 0, written a
    piece at a time, so it never exists whole in memory (ckpt.save_weights would need it so).

    The safetensors format (github.com/huggingface/safetensors): an 8-byte little-endian header length, a
    JSON header giving each tensor's dtype, shape and [begin, end) byte offsets in the data, then the data.
    Every piece must be float32 with the same trailing shape.
    """
    header, offset = {}, 0
    for name, pieces in columns.items():
        if any(p.dtype != torch.float32 or p.shape[1:] != pieces[0].shape[1:] for p in pieces):
            raise ValueError(f"{name}: pieces of other dtypes or shapes cannot be concatenated")
        nbytes = sum(p.numel() * 4 for p in pieces)
        shape = [sum(p.shape[0] for p in pieces), *pieces[0].shape[1:]]
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors itself writes it

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(text)) + text)
            for pieces in columns.values():
                for p in pieces:
                    f.write(p.contiguous().numpy().data)  # a view of the mapped part: no copy

    ckpt.atomic_write(path, write)
