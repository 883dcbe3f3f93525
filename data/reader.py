"""The one reader every training stage uses: webdataset shards -> batches of images and captions.

    loader = make_loader("datasets/shapes", "train", batch_size=64, seed=0, device=rt.device)
    skips = SkipCounter()
    for step, batch in enumerate(loader):
        skips.update(batch)        # batch["image"]: (B, 3, H, W) uint8
        x = from_uint8_to(batch["image"], rt.device)  # (B, 3, H, W) float32 in [-1, 1] on the device
        ...

Each batch is {"image", "caption", "meta", "key", "skipped", "skip_reasons"}. "skipped" is the
number of samples dropped (undecodable image, empty caption, missing part, truncated shard)
since the previous batch of the same stream, so summing it over batches (SkipCounter) gives
the run's total; per-sample problems are logged at most once per reason and every
WARN_EVERY-th time after, never one line per sample. A bad sample is skipped and the rest of
its shard is still read. Images stay uint8 until they reach the device: a quarter of float32's
bytes to copy, in pinned (page-locked) host memory when `device` is an accelerator, so the copy
runs asynchronously; core.pixels.from_uint8_to copies and converts them to the model's [-1, 1].
Images go through data/images.py's load_rgb (every Pillow mode to
RGB; any error skips the sample); captions that are not UTF-8 are read as cp1252/latin-1,
with one warning per stream. An endless stream's batches also carry "position", (worker,
epoch, raw samples of that epoch read), from which `Loader.resumed` restarts it.

Order is a pure function of (seed, num_workers, world_size): every epoch shuffles the shard
order with a generator seeded by (seed, epoch), shared by all ranks so their shares stay
disjoint, and shuffles samples in a buffer seeded by (seed, epoch, rank, worker). Exact resume
is therefore: make the loader again with the same arguments and discard the first `step` batches,
or, faster, start each worker at its recorded position (`Loader.resumed`) without decoding what it skips.

Sharding: each (rank, worker) pair reads every (world_size * num_workers)-th shard; when there
are fewer shards than pairs, every pair reads all shards and keeps every n-th sample instead.
Shards may be uneven, so with repeat=False ranks can get different numbers of batches.
"""

from __future__ import annotations

import copy
import glob
import itertools
import json
import logging
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext, tar_file_expander, url_opener

from latentdiff.data.captions import decode_caption
from latentdiff.data.images import IMAGE_EXTENSIONS as IMAGE_FILE_EXTENSIONS
from latentdiff.data.images import BadImage, load_rgb
from latentdiff.data.shards import INFO_FILE

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = tuple(e.lstrip(".") for e in IMAGE_FILE_EXTENSIONS)  # image members of a sample
DEFAULT_SHUFFLE_BUFFER = 2000
WARN_EVERY = 1000  # after the first skip of each reason, warn once per this many skips
WRITE_COMMANDS = (
    "`latentdiff data fashion-mnist --out DIR`, `latentdiff data shapes --out DIR --n N` "
    "or `latentdiff data folder SRC --out DIR --resolution R`"
)


def _is_remote(data: str) -> bool:
    return data.startswith("pipe:") or "://" in data


def resolve_shards(data: str, split: str) -> list[str]:
    """Shard URLs of `split`: DIR -> sorted DIR/{split}-*.tar; a brace pattern or pipe: URL is expanded.

    In a pattern, "{split}" is replaced by `split` first, so "d/{split}-{000000..000003}.tar"
    serves every split; a pattern without it names its shards whatever the split.
    """
    data = str(data)
    if os.path.isdir(data):
        shards = sorted(glob.glob(os.path.join(glob.escape(data), f"{split}-*.tar")))
        if not shards:
            raise FileNotFoundError(
                f"no {split!r} shards ({split}-*.tar) in dataset directory {data}; write a dataset there with "
                + WRITE_COMMANDS
            )
        return shards
    urls = expand_urls(data.replace("{split}", split))
    if _is_remote(data):
        return urls
    missing = [u for u in urls if not os.path.isfile(u)]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of {len(urls)} shards of {data!r} (split {split!r}) do not exist, e.g. {missing[0]}; "
            f"pass a dataset directory or shard pattern, or write a dataset with " + WRITE_COMMANDS
        )
    return urls


def read_info(data: str) -> dict[str, Any]:
    """DIR/info.json of a dataset (for a local shard pattern, the info.json beside its shards), or {}."""
    data = str(data)
    if _is_remote(data):
        return {}
    if os.path.isdir(data):
        path = Path(data) / INFO_FILE
    else:
        urls = expand_urls(data)
        path = Path(urls[0]).parent / INFO_FILE if urls else Path(INFO_FILE)
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); rewrite it or delete it") from e


class SkipCounter:
    """Running total of the samples a stream skipped: call `update(batch)` on every batch."""

    def __init__(self) -> None:
        self.total = 0
        self.by_reason: Counter = Counter()

    def update(self, batch: dict[str, Any]) -> int:
        """Add this batch's skips; returns how many it reported."""
        n = int(batch.get("skipped", 0))
        self.total += n
        self.by_reason.update(batch.get("skip_reasons", {}))
        return n

    def summary(self) -> str:
        """ "3 samples skipped (empty caption: 1, undecodable image: 2)"."""
        reasons = ", ".join(f"{r}: {n}" for r, n in sorted(self.by_reason.items()))
        return f"{self.total} samples skipped" + (f" ({reasons})" if reasons else "")


class _Skips:
    """Skips since the last batch of one stream, logging sparsely."""

    def __init__(self) -> None:
        self.pending: Counter = Counter()
        self.seen: Counter = Counter()  # all skips of this stream, for rate-limited warnings
        self.noted: Counter = Counter()  # things read anyway (warned once each)

    def add(self, reason: str, where: str) -> None:
        self.pending[reason] += 1
        self.seen[reason] += 1
        total = sum(self.seen.values())
        if self.seen[reason] == 1 or total % WARN_EVERY == 0:
            log.warning("skipped a sample (%s) at %s; %d skipped so far in this stream", reason, where, total)

    def note(self, what: str, where: str) -> None:
        """Something read anyway (a caption in a fallback encoding): warned the first time only."""
        if not self.noted[what]:
            log.warning("%s at %s (warned once per stream)", what, where)
        self.noted[what] += 1

    def take(self) -> Counter:
        taken, self.pending = self.pending, Counter()
        return taken


class _EndWatcher:
    """Read-through file wrapper that notes whether the stream ran out and what its last bytes were.

    Python's tarfile treats a header cut short as a normal end of archive, so a shard truncated
    between members would lose its tail silently. A complete tar ends in 1,024 zero bytes; a
    stream that runs dry on anything else was truncated.
    """

    def __init__(self, stream: Any, url: str) -> None:
        self.stream, self.url, self.tail, self.ran_dry = stream, url, b"", False

    def __repr__(self) -> str:  # webdataset appends the stream to error messages
        return self.url

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        if not data:
            self.ran_dry = True
        self.tail = (self.tail + data)[-1024:]
        return data

    @property
    def truncated(self) -> bool:
        return self.ran_dry and any(self.tail)

    def close(self) -> None:
        self.stream.close()


def _read_shard(url: str, skips: _Skips, count_errors: bool) -> Iterator[dict[str, Any]]:
    """Raw samples ({"__key__", "png", "txt", ...} of bytes) of one shard; a read error ends the shard."""
    errors: list[Any] = []

    def stop_shard(exn: Exception) -> bool:
        errors.append(exn)
        return False  # tell webdataset to stop this shard; the next shard starts fresh

    for opened in url_opener([{"url": url}], handler=stop_shard):
        watcher = opened["stream"] = _EndWatcher(opened["stream"], url)
        try:
            yield from _group_by_key(tar_file_expander([opened], handler=stop_shard), skips)
        finally:
            watcher.close()
        if not errors and watcher.truncated:
            errors.append("the shard ends in the middle of a tar member")
    if count_errors:
        for exn in errors:
            skips.add("unreadable or truncated shard", f"{url}: {exn!r}")


def _group_by_key(members: Iterable[dict[str, Any]], skips: _Skips) -> Iterator[dict[str, Any]]:
    """Consecutive tar members with one key ("a/b.png", "a/b.txt") as one sample {"__key__", "png", "txt", ...}.

    webdataset's group_by_keys ends the whole shard at a sample holding the same file twice;
    here only that sample is skipped (counted) and the shard goes on.
    """
    sample: dict[str, Any] | None = None
    duplicate = False

    def finish() -> Iterator[dict[str, Any]]:
        if sample is None:
            return
        if duplicate:
            skips.add("duplicate file in a sample", f"{sample['__url__']}:{sample['__key__']}")
        elif len(sample) > 2:  # more than __key__ and __url__
            yield sample

    for member in members:
        if not member:  # tar_file_expander's end-of-shard marker
            continue
        key, ext = base_plus_ext(member["fname"])
        if key is None:
            continue
        ext = ext.lower()
        if sample is None or key != sample["__key__"]:
            yield from finish()
            sample, duplicate = {"__key__": key, "__url__": member["__url__"]}, False
        duplicate = duplicate or ext in sample
        sample[ext] = member["data"]
    yield from finish()


def _shuffled(samples: Iterable[Any], size: int, rng: np.random.Generator) -> Iterator[Any]:
    """Buffer shuffle: fill `size` items, then emit a random one and put the newcomer in its place."""
    buffer: list[Any] = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        j = int(rng.integers(size))
        buffer[j], sample = sample, buffer[j]
        yield sample
    rng.shuffle(buffer)
    yield from buffer


def _decode(raw: dict[str, Any], resolution: int | None, skips: _Skips) -> dict[str, Any] | None:
    """Raw sample -> {"image": (H, W, 3) uint8, "caption", "meta", "key"}, or None (counted) when bad.

    Whatever goes wrong with one sample (any exception) skips that sample only.
    """
    key = raw.get("__key__", "?")
    where = f"{raw.get('__url__', '?')}:{key}"
    try:
        return _decode_parts(raw, key, where, resolution, skips)
    except Exception as e:  # noqa: BLE001 - one bad sample must never end the stream
        skips.add("undecodable sample", f"{where} ({type(e).__name__}: {e})")
        return None


def _decode_parts(raw: dict[str, Any], key: str, where: str, resolution: int | None,
                  skips: _Skips) -> dict[str, Any] | None:  # fmt: skip
    image_ext = next((e for e in IMAGE_EXTENSIONS if e in raw), None)
    if image_ext is None or "txt" not in raw:
        skips.add("missing image or caption", where)
        return None
    caption, encoding = decode_caption(raw["txt"])
    if not caption:
        skips.add("empty caption", where)
        return None
    if encoding != "utf-8":
        skips.note(f"a caption is not UTF-8 and was decoded as {encoding}", where)
    meta: dict[str, Any] = {}
    if "json" in raw:
        try:
            meta = json.loads(raw["json"].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            meta = None
        if not isinstance(meta, dict):
            skips.add("unreadable json", where)
            return None
    try:
        pixels = np.asarray(load_rgb(raw[image_ext], resolution), dtype=np.uint8)  # (H, W, 3)
    except BadImage as e:
        reason = "undecodable image" if e.reason == "unreadable image" else e.reason
        skips.add(reason, f"{where} ({e})")
        return None
    return {"image": pixels, "caption": caption, "meta": meta, "key": key}


def _collate(items: list[dict[str, Any]], skipped: Counter) -> dict[str, Any]:
    shapes = {it["image"].shape for it in items}
    if len(shapes) > 1:
        raise ValueError(
            f"images in one batch have different sizes {sorted(shapes)} (keys {items[0]['key']}, ...); "
            "pass resolution=R to make_loader to resize them all to R x R"
        )
    pixels = torch.from_numpy(np.stack([it["image"] for it in items]))  # (B, H, W, 3) uint8
    return {
        "image": pixels.permute(0, 3, 1, 2).contiguous(),  # (B, 3, H, W) uint8: from_uint8_to makes floats
        "caption": [it["caption"] for it in items],
        "meta": [it["meta"] for it in items],
        "key": [it["key"] for it in items],
        "skipped": sum(skipped.values()),
        "skip_reasons": dict(skipped),
    }


class ShardStream(IterableDataset):
    """Batches from shards for one rank; DataLoader workers split the rank's share further."""

    def __init__(
        self,
        urls: list[str],
        batch_size: int,
        *,
        shuffle: bool,
        seed: int,
        repeat: bool,
        resolution: int | None,
        drop_last: bool,
        rank: int,
        world_size: int,
        shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
    ) -> None:
        super().__init__()
        self.urls, self.batch_size = list(urls), batch_size
        self.shuffle, self.seed, self.repeat = shuffle, seed % 2**63, repeat
        self.resolution, self.drop_last = resolution, drop_last
        self.rank, self.world_size, self.shuffle_buffer = rank, world_size, shuffle_buffer
        self.start_at: dict[int, tuple[int, int]] = {}  # worker -> (epoch, samples read in it): see `resumed`

    def _raw_samples(self, epoch: int, part: int, parts: int, skips: _Skips) -> Iterator[dict[str, Any]]:
        urls = list(self.urls)
        if self.shuffle:  # seeded by (seed, epoch) only: every rank and worker sees the same order
            np.random.default_rng([self.seed, epoch]).shuffle(urls)
        by_shard = len(urls) >= parts
        mine = urls[part::parts] if by_shard else urls
        index = 0
        for url in mine:
            # In sample-modulo mode every pair reads every shard; only pair 0 reports a shard's errors.
            for raw in _read_shard(url, skips, count_errors=by_shard or part == 0):
                if by_shard or index % parts == part:
                    yield raw
                index += 1

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        part, parts = self.rank * num_workers + worker, self.world_size * num_workers
        skips = _Skips()
        pending: list[dict[str, Any]] = []
        # A one-pass stream holds each batch back until the next exists, so skips met after the
        # last batch (a truncated last shard, a dropped tail) are still reported, on that batch.
        held: dict[str, Any] | None = None
        start_epoch, start_index = self.start_at.get(worker, (0, 0))
        for epoch in itertools.count() if self.repeat else range(1):
            if epoch < start_epoch:
                continue  # an epoch's order depends on (seed, epoch) alone: earlier ones need not be read
            raw = self._raw_samples(epoch, part, parts, skips)
            if self.shuffle:
                raw = _shuffled(raw, self.shuffle_buffer, np.random.default_rng([self.seed, epoch, self.rank, worker]))
            raw = _Counted(raw)
            resuming = epoch == start_epoch and start_index > 0
            if resuming:
                _skip_raw(raw, start_index, skips)
            kept = 0
            for sample in raw:
                item = _decode(sample, self.resolution, skips)
                if item is None:
                    continue
                kept += 1
                pending.append(item)
                if len(pending) == self.batch_size:
                    batch, pending = _collate(pending, skips.take()), []
                    batch["position"] = (worker, epoch, raw.n)
                    if self.repeat:
                        yield batch
                        continue
                    if held is not None:
                        yield held
                    held = batch
            if kept == 0 and not resuming:  # this share has nothing readable: repeating would spin forever
                break
        if pending and not self.drop_last:
            if held is not None:
                yield held
            held = _collate(pending, Counter())
        if held is not None:
            late = skips.take()
            held["skipped"] += sum(late.values())
            held["skip_reasons"] = dict(Counter(held["skip_reasons"]) + late)
            yield held


class _Counted:
    """An iterator that counts the items it has handed out: a stream's position within its epoch."""

    def __init__(self, items: Iterable[Any]) -> None:
        self.items, self.n = iter(items), 0

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        item = next(self.items)
        self.n += 1
        return item


def _skip_raw(raw: _Counted, n: int, skips: _Skips) -> None:
    """Read (but do not decode) the first `n` raw samples of an epoch; problems met there were counted before."""
    next(itertools.islice(raw, n - 1, None), None)
    skips.take()


def _identity(batch: dict[str, Any]) -> dict[str, Any]:
    return batch  # batches are built in the workers; DataLoader only moves them


class Loader:
    """Iterable over batches; every `iter()` starts again from epoch 0, so the order is reproducible."""

    def __init__(self, dataset: ShardStream, num_workers: int, name: str, pin_memory: bool = False) -> None:
        self.dataset, self.num_workers, self.name = dataset, num_workers, name
        self.pin_memory = pin_memory  # batches in page-locked memory, for asynchronous copies to an accelerator

    def resumed(self, positions: dict[int, tuple[int, int]]) -> Loader:
        """The same stream, each worker starting where a previous run of it stopped, without decoding images.

        positions: {worker: (epoch, raw samples of that epoch read)}, from the `position` (worker,
        epoch, n) of the last batch each worker gave. Only the epoch in progress is read again (tar
        members and the shuffle buffer's draws); earlier epochs are skipped outright, since each
        epoch's order is seeded by (seed, epoch). A new DataLoader starts at worker 0: the caller
        puts the workers back in the interrupted run's turn (core.train.Run.batches).
        """
        dataset = copy.copy(self.dataset)
        dataset.start_at = {int(w): (int(e), int(n)) for w, (e, n) in positions.items()}
        return Loader(dataset, self.num_workers, self.name, self.pin_memory)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        loader = DataLoader(
            self.dataset,
            batch_size=None,
            num_workers=self.num_workers,
            collate_fn=_identity,
            pin_memory=self.pin_memory,  # pins for the current accelerator (torch >= 2.6 picks it)
        )
        n = 0
        for batch in loader:
            n += 1
            yield batch
        if self.dataset.repeat:
            raise RuntimeError(
                f"the endless stream of {self.name} ended after {n} batches: rank {self.dataset.rank} of "
                f"{self.dataset.world_size} with {self.num_workers} workers found no readable samples "
                f"(a smaller batch or fewer workers/ranks helps with tiny data; see the skip warnings)"
            )


def _dist_rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def make_loader(
    data: str,
    split: str,
    batch_size: int,
    *,
    shuffle: bool = True,
    seed: int = 0,
    num_workers: int = 0,
    repeat: bool = True,
    resolution: int | None = None,
    drop_last: bool = True,
    rank: int | None = None,
    world_size: int | None = None,
    shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
    device: torch.device | str | None = None,
) -> Loader:
    """Batches of `split` from `data` (dataset directory, brace pattern or pipe: URL).

    repeat=True: an endless stream over epochs, reshuffled each epoch (batches may span epochs).
    repeat=False: one pass; the last partial batch is kept when drop_last=False (skips counted
    in a dropped tail are lost with it). rank/world_size default to torch.distributed's.
    device: where the batches go (the run's device); an accelerator gets them in pinned memory.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if shuffle_buffer < 1:
        raise ValueError(f"shuffle_buffer must be at least 1, got {shuffle_buffer}")
    if resolution is not None and resolution < 1:
        raise ValueError(f"resolution must be positive, got {resolution}")
    dist_rank, dist_world = _dist_rank_world()
    rank = dist_rank if rank is None else rank
    world_size = dist_world if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    dataset = ShardStream(
        resolve_shards(data, split),
        batch_size,
        shuffle=shuffle,
        seed=seed,
        repeat=repeat,
        resolution=resolution,
        drop_last=drop_last,
        rank=rank,
        world_size=world_size,
        shuffle_buffer=shuffle_buffer,
    )
    return Loader(dataset, num_workers, name=f"{data} ({split})", pin_memory=pins_memory(device))


def pins_memory(device: torch.device | str | None) -> bool:
    """Whether batches bound for `device` go in pinned memory: for any accelerator, never for the CPU.

    From pinned memory a copy to the accelerator is one DMA that `non_blocking=True` leaves running
    while the host goes on; from pageable memory it is staged through a pinned buffer and blocks.
    """
    return device is not None and torch.device(device).type != "cpu"


def read_once(
    data: str,
    split: str,
    batch_size: int,
    resolution: int | None = None,
    *,
    device: torch.device | str | None = None,
) -> Loader:
    """One in-order pass over `split` on this process alone (evaluation, caching): no shuffle, the last batch kept.

    device: where the batches go, as make_loader's.
    """
    return make_loader(
        data,
        split,
        batch_size,
        shuffle=False,
        repeat=False,
        drop_last=False,
        resolution=resolution,
        rank=0,
        world_size=1,
        device=device,
    )
