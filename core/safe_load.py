"""Weight files written by other tools, read without ever running code from them.

A pickle is a program: `torch.load(weights_only=False)`, which torch hub's loader (so torchvision
and lpips), torch-fidelity and older open_clip releases call, runs whatever a planted or swapped
file asks. So every file latentdiff reads that it did not write itself (the torch hub cache,
an open_clip checkpoint, a VAE to import, a package's bundled weights) is read here, by us:
safetensors, or a pickle through `torch.load(weights_only=True)`, which builds nothing but
tensors and plain containers. The libraries are then handed tensors (a state dict), never a path,
so what they would do with a file, in any version the dependency ranges allow, does not matter.

    state = read_tensor_file(path, "torchvision's VGG16 weights")
    check_published_hash(path, "torchvision's VGG16 weights", url)   # name-<sha256 prefix>.pth files

torch before 2.6 had a weights_only unpickler that a crafted file could escape (CVE-2025-32434),
so a pickle is refused there; safetensors files read on any version.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .checkpoint import CheckpointError, sha256

SAFE_PICKLE_TORCH = (2, 6)  # the first torch whose weights_only unpickler is not escapable (CVE-2025-32434)
# torch hub's convention for published files: NAME-<first hex digits of the file's sha256>.EXT
_HASH_IN_NAME = re.compile(r"-([a-f0-9]{6,})\.")


def _torch_version() -> tuple[int, int]:
    major, minor = re.match(r"(\d+)\.(\d+)", torch.__version__).groups()
    return int(major), int(minor)


def refusal_reason(error: BaseException) -> str:
    """The one informative line of torch's multi-line weights_only refusal ("Unsupported global: GLOBAL exec")."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    for ln in lines:
        found = re.search(r"Unsupported (global: GLOBAL \S+|operand \d+)", ln)
        if found:
            return found.group(0)
    for ln in lines:
        if ln.startswith("Unsupported"):
            return ln
    return f"{type(error).__name__}: {lines[0][:160] if lines else 'no message'}"


def read_tensor_file(path: str | Path, what: str = "a weights file") -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file or of a torch pickle, read without running code from the file.

    what: the file's role, for messages ("torchvision's VGG16 weights"). A pickle's tensors may sit
    under "state_dict" (LDM's .ckpt, open_clip's training checkpoints), beside other plain values,
    which are dropped; CPU tensors are returned. Raises FileNotFoundError for a missing file and
    CheckpointError (one line) for a pickle that needs code, a TorchScript archive, a file that is
    not a checkpoint, or any pickle on torch < 2.6.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    with open(path, "rb") as f:
        head = f.read(4)
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path} is not a readable safetensors file ({e}); it should be {what}") from None
    advice = "convert it to safetensors with a tool you trust, or fetch the published file again"
    if _torch_version() < SAFE_PICKLE_TORCH:
        raise CheckpointError(
            f"{path} is a pickle, and torch {torch.__version__} cannot read a pickle without risking running code "
            f"from it (CVE-2025-32434): upgrade torch to 2.6 or later, or convert {what} to safetensors"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if head[:2] != b"PK" and head[:1] != b"\x80":  # neither torch's zip format nor a protocol 2+ pickle
            raise CheckpointError(
                f"{path} is neither a safetensors file nor a torch checkpoint (it begins {head!r}): it should be {what}"
            ) from None
        raise CheckpointError(
            f"{path} is a pickle that needs code to load ({refusal_reason(e)}), not a plain tensor state dict; "
            f"latentdiff reads pickles only through torch.load(weights_only=True): {advice}"
        ) from None
    except Exception as e:  # noqa: BLE001 - torch raises several types for files that are not checkpoints at all
        if "TorchScript" in str(e):
            raise CheckpointError(
                f"{path} is a TorchScript archive, which holds code; latentdiff reads only plain tensor state "
                f"dicts: {advice}"
            ) from None
        raise CheckpointError(
            f"{path} is not a readable torch checkpoint ({refusal_reason(e)}); it is truncated or damaged, "
            f"or not {what}"
        ) from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} holds a {type(obj).__name__} without tensors, not {what}")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def published_hash_prefix(path: str | Path) -> str | None:
    """The sha256 prefix a torch-hub style name promises ("vgg16-397923af.pth" -> "397923af"), if any."""
    found = _HASH_IN_NAME.search(Path(path).name)
    return found.group(1) if found else None


def check_published_hash(path: str | Path, what: str, source: str) -> str:
    """Verify that `path`'s sha256 starts with the prefix its name carries; returns the full sha256.

    torch hub checks this only when it downloads, so a file copied into the cache by hand (what an
    offline user does) was never checked. source: where the true file is published, for the message.
    Raises CheckpointError (one line) naming both hashes.
    """
    prefix = published_hash_prefix(path)
    digest = sha256(path)
    if prefix is not None and not digest.startswith(prefix):
        raise CheckpointError(
            f"{path} is not {what}: its sha256 begins {digest[: len(prefix)]}, the published file's {prefix} "
            f"(a damaged, truncated or substituted file); replace it with the file from {source}"
        )
    return digest
