"""How well a CLIP pairs images with text: zero-shot classification and retrieval recall@k."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from latentdiff.core.pixels import from_uint8_to
from latentdiff.text.encoder import TextEncoder
from latentdiff.text.loss import word_cosines


@torch.inference_mode()
def class_embeddings(
    encoder: TextEncoder, class_names: Sequence[str], prompt_fn: Callable[[str], str | Sequence[str]]
) -> torch.Tensor:
    """(K, E) unit class embeddings; a prompt_fn returning several templates averages them.

    Averaging the templates' embeddings is CLIP's prompt ensembling (Radford et al. 2021, §3.1.4).
    """
    rows = []
    for name in class_names:
        prompts = prompt_fn(name)
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        emb = encoder.encode(prompts).normalized_pooled().float().mean(dim=0)  # (E,)
        rows.append(F.normalize(emb, dim=-1))
    return torch.stack(rows)


def _label_index(label: Any, class_names: Sequence[str]) -> int:
    if isinstance(label, str):
        if label not in class_names:
            raise ValueError(f"label {label!r} is not one of the class names {list(class_names)}")
        return list(class_names).index(label)
    index = int(label)
    if not 0 <= index < len(class_names):
        raise ValueError(f"label {index} is out of range for {len(class_names)} class names")
    return index


@torch.inference_mode()
def zero_shot_accuracy(
    encoder: TextEncoder,
    batches: Iterable[dict[str, Any]],
    class_names: Sequence[str],
    prompt_fn: Callable[[str], str | Sequence[str]] = lambda c: f"a photo of a {c}",
) -> float:
    """Top-1 accuracy of classifying each image as the class whose prompt embedding is most cosine-similar.

    Batches are reader dicts: "image" (B, 3, H, W) uint8 and "meta", a list of dicts whose
    "label" is a class index or a class name.
    """
    classes = class_embeddings(encoder, class_names, prompt_fn)  # (K, E)
    correct = total = 0
    for batch in batches:
        x = from_uint8_to(batch["image"], encoder.device)  # (B, 3, H, W) in [-1, 1]
        image_emb = encoder.encode_image(x, normalize=True).float()  # (B, E)
        predicted = (image_emb @ classes.to(image_emb.device).T).argmax(dim=1).cpu()  # (B,)
        labels = torch.tensor([_label_index(m["label"], class_names) for m in batch["meta"]])
        correct += int((predicted == labels).sum())
        total += len(labels)
    if total == 0:
        raise ValueError("zero_shot_accuracy got no images")
    return correct / total


def retrieval_metrics(
    image_emb: torch.Tensor, text_emb: torch.Tensor, ks: Sequence[int] = (1, 5), captions: Sequence[str] | None = None
) -> dict[str, float]:
    """Recall@k of image->text and text->image retrieval where pair i is the match of i.

    image_emb, text_emb: (N, E), normalised here. A match counts at rank r when r wrong
    candidates score at least as high, so ties count against the model: N identical
    embeddings score top-1 = 0, not 1. With `captions`, every candidate whose caption is the
    same text as pair i's is a match too (datasets with repeated captions, such as
    Fashion-MNIST's templates, would otherwise score ~0 however good the model), and the text
    candidates of image->text are the distinct captions: each caption text is ranked once (by
    its best-scoring copy), so top-k counts k distinct captions and repeats of one wrong
    caption cannot fill every slot.
    """
    if image_emb.shape != text_emb.shape or image_emb.ndim != 2:
        raise ValueError(
            f"need two (N, E) tensors of equal shape, got {tuple(image_emb.shape)} and {tuple(text_emb.shape)}"
        )
    if not (torch.isfinite(image_emb).all() and torch.isfinite(text_emb).all()):
        raise ValueError("retrieval_metrics got non-finite embeddings (NaN or inf): the model's weights are broken")
    sim = F.normalize(image_emb.float(), dim=-1) @ F.normalize(text_emb.float(), dim=-1).T  # (N, N) image x text
    n = sim.shape[0]
    if captions is None:
        label = torch.arange(n, device=sim.device)  # every pair its own caption
    else:
        if len(captions) != n:
            raise ValueError(f"got {len(captions)} captions for {n} pairs")
        ids = {c: i for i, c in enumerate(dict.fromkeys(captions))}
        label = torch.tensor([ids[c] for c in captions], device=sim.device)
    k_distinct = int(label.max()) + 1 if n else 0
    same = label[:, None] == label[None, :]  # (N, N) True where candidate j matches query i

    # image -> text over distinct captions: (N, K) score of each caption text, its best copy
    by_caption = torch.full((n, k_distinct), float("-inf"), device=sim.device)
    by_caption = by_caption.scatter_reduce(1, label.expand(n, n), sim, reduce="amax")
    own = by_caption.gather(1, label[:, None])  # (N, 1) score of image i's own caption
    wrong = torch.arange(k_distinct, device=sim.device)[None, :] != label[:, None]  # (N, K)
    i2t_rank = ((by_caption >= own) & wrong).sum(dim=1)
    # text -> image over images (each image a distinct candidate): best correct image vs wrong ones
    best_t2i = sim.masked_fill(~same, float("-inf")).amax(dim=0)  # (N,) per text
    t2i_rank = ((sim >= best_t2i[None, :]) & ~same).sum(dim=0)
    out = {}
    for k in ks:
        out[f"i2t_top{k}"] = (i2t_rank < k).float().mean().item()
        out[f"t2i_top{k}"] = (t2i_rank < k).float().mean().item()
    return out


@torch.inference_mode()
def hard_negative_accuracy(encoder: TextEncoder, batches: Iterable[dict[str, Any]]) -> dict[str, float]:
    """Share of images whose own caption scores above every caption its json lists as "negatives".

    Batches are reader dicts ("image", "caption", "meta"); images without negatives are not counted. The
    probe of compositional benchmarks such as ARO and SugarCrepe (Yuksekgonul et al. 2023; Hsieh et al.
    2023): a bag-of-words text encoder scores about chance (1 / (1 + negatives)) on swapped colours or
    relations. Returns {"hard_negative_accuracy": a, "hard_negative_images": n} and, where the json names
    a "task", "hard_negative_accuracy_<task>" per task; {} when no image has negatives.
    """
    hits: dict[str, list[bool]] = {}
    for batch in batches:
        metas = [m or {} for m in batch["meta"]]
        keep = [i for i, m in enumerate(metas) if m.get("negatives")]
        if not keep:
            continue
        images = from_uint8_to(batch["image"][keep], encoder.device)
        image_emb = encoder.encode_image(images, normalize=True).float()  # (b, E)
        groups = [[batch["caption"][i], *metas[i]["negatives"]] for i in keep]
        text_emb = encoder.encode([t for g in groups for t in g]).normalized_pooled().float()  # (sum, E)
        start = 0
        for row, i in enumerate(keep):
            scores = text_emb[start : start + len(groups[row])] @ image_emb[row]  # own caption first, then negatives
            start += len(groups[row])
            hit = bool((scores[0] > scores[1:]).all())
            hits.setdefault("", []).append(hit)
            if "task" in metas[i]:
                hits.setdefault(f"_{metas[i]['task']}", []).append(hit)
    if not hits:
        return {}
    out = {f"hard_negative_accuracy{k}": sum(v) / len(v) for k, v in sorted(hits.items())}
    out["hard_negative_images"] = len(hits[""])
    return out


@torch.inference_mode()
def token_identity_accuracy(encoder: TextEncoder, captions: Sequence[str]) -> dict[str, float]:
    """How often a word's per-token state is nearer (cosine) its own token embedding than any other word's.

    Over the distinct `captions`' words (SOT, EOT and padding left out), the candidates being every distinct
    word among them: near 1 when the states the prior reads keep each word apart, near chance when context
    swamps the word (text.loss.token_identity_loss says why that matters). Returns {"token_identity_accuracy": a,
    "token_identity_words": n}; {} when the captions hold no word.
    """
    distinct = sorted(set(captions))
    if not distinct:
        return {}
    tokens = encoder.tokenize(distinct)
    words = encoder.word_mask(tokens)
    if not words.any():
        return {}
    states = torch.cat([encoder.forward_tokens(tokens[i : i + 256]).states for i in range(0, len(tokens), 256)])
    cosines, target = word_cosines(states, tokens, words, encoder.model.token_embedding.weight)
    nearest = cosines.argmax(dim=-1)
    return {"token_identity_accuracy": (nearest == target).float().mean().item(), "token_identity_words": len(target)}
