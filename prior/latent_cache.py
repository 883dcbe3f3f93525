"""Encode the training set once and train the prior from the stored posterior moments.

The frozen encoder's q(z|x) never changes during prior training, so encoding every image
at every step is wasted work (CALIBRATION.md: 60k images take 37 s to encode). The cache keeps
the posterior mean and std of each training image (sampling z = mean + std * eps afresh
each time, as on the fly) with its caption, keyed by the encoder's content hash and the data's
fingerprint (core.runs.data_fingerprint), so a dataset rebuilt in place is encoded again.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from latentdiff.autoencoder.load import encoder_hash
from latentdiff.core import checkpoint as ckpt
from latentdiff.core.runs import data_fingerprint
from latentdiff.data.reader import read_once


class LatentCache:
    def __init__(self, mean: torch.Tensor, std: torch.Tensor, captions: list[str]):
        self.mean, self.std, self.captions = mean, std, captions

    def __len__(self) -> int:
        return len(self.captions)

    @classmethod
    @torch.no_grad()
    def build(cls, ae, data: str, path: Path, resolution: int, rt, batch_size: int = 256) -> LatentCache:
        """Load the cache at `path` if it was made by this encoder from this data as it is now, else encode and
        write it, saying why in one line (another encoder, or the data rebuilt since)."""
        fingerprint = data_fingerprint(data)
        key = {
            "encoder_hash": encoder_hash(ae),
            "data": str(Path(data).resolve()) if Path(data).exists() else data,
            # a dataset rebuilt in place keeps its path: its shards' sizes and times tell it apart
            "data_fingerprint": fingerprint.sha256 if fingerprint is not None else None,
            "resolution": resolution,
        }
        info_path = path / "cache.json"
        recorded = _recorded_key(info_path) if rt.is_main else None
        if rt.is_main and recorded != key:  # missing, stale or damaged: (re)build it
            if recorded is not None:
                why = {
                    "encoder_hash": "the autoencoder's encoder is another",
                    "data": "the data is another",
                    "data_fingerprint": f"{data} changed since (rebuilt or replaced)",
                    "resolution": "the resolution is another",
                }
                changed = [why[k] for k in key if recorded.get(k) != key[k]]
                print(f"latent cache {path}: {'; '.join(changed)}; encoding the data again", flush=True)
            means, stds, captions = [], [], []
            loader = read_once(data, "train", batch_size, resolution)
            skipped = 0
            for batch in tqdm(loader, desc="caching latents", unit="batch"):
                post = ae.encode(batch["image"].to(next(ae.parameters()).device))
                means.append(post.mean.cpu())
                stds.append(post.std.cpu())
                captions += batch["caption"]
                skipped += batch["skipped"]
            ckpt.save_weights(path / "latents.safetensors", {"mean": torch.cat(means), "std": torch.cat(stds)})
            ckpt.write_json(path / "captions.json", {"captions": captions})
            ckpt.write_json(info_path, {"key": key, "count": len(captions), "skipped": skipped})
        rt.barrier()
        tensors = ckpt.load_weights(path / "latents.safetensors")
        captions = ckpt.read_json(path / "captions.json")["captions"]
        return cls(tensors["mean"], tensors["std"], captions)

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
                    "skipped": 0,
                }
            epoch += 1

    @staticmethod
    def sample(batch: dict, device: torch.device) -> torch.Tensor:
        """z ~ q(z|x) from cached moments (global RNG, as the on-the-fly path)."""
        mean, std = batch["mean"].to(device), batch["std"].to(device)
        return mean + std * torch.randn_like(mean)


def _recorded_key(info_path: Path) -> dict | None:
    """The key a cache was built with, or None when there is no readable cache.json."""
    try:
        return ckpt.read_json(info_path).get("key")
    except (FileNotFoundError, ckpt.CheckpointError, AttributeError):
        return None
