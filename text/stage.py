"""`latentdiff train text`: a CLIP trained contrastively on your (image, caption) pairs.

The symmetric InfoNCE objective of CLIP (Radford et al. 2021, Fig. 3) through open_clip's
ClipLoss, with the learnable temperature clamped at 100 as CLIP does. The prior later reads
this model's text tower; evaluation uses its image tower for CLIP score. With `hard_negatives`,
each image is also contrasted with the near-miss captions its json lists (text.loss.hard_negative_loss).
With `token_identity` > 0, each word's per-token state is also trained to name its own word among the
batch's words (text.loss.token_identity_loss), so the states the prior reads keep "left" apart from "right".
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from latentdiff.core.config import NonNegativeFloat, PositiveInt
from latentdiff.core.ema import EMA
from latentdiff.core.flags import add_train_args
from latentdiff.core.pixels import from_uint8_to
from latentdiff.core.runs import follow, record_path
from latentdiff.core.train import Run, TrainConfig, make_optimizer, stage_main
from latentdiff.data.captions import class_prompt
from latentdiff.data.reader import make_loader, read_info, read_once

from .encoder import TextEncoder, TextEncoderConfig
from .evaluate import hard_negative_accuracy, retrieval_metrics, token_identity_accuracy, zero_shot_accuracy
from .loss import clamp_logit_scale, hard_negative_loss, token_identity_loss
from .model import build_clip, load_model_config, preprocess_images
from .tokens import build_tokenizer

PRESETS = Path(__file__).parent


@dataclass(frozen=True)
class TextStageConfig:
    model: str = "clip-tiny"  # open_clip model config: one of text/configs/*.json, a .json path, or an open_clip name
    train: TrainConfig = field(default_factory=TrainConfig)
    resolution: PositiveInt = 32  # image side read from the shards (the image tower resizes to its own size)
    eval_images: PositiveInt = 2000  # validation images for retrieval and zero-shot figures
    # Which states, padding and mask later stages read (Stable Diffusion's encoders: text.encoder.SD1 / SD2).
    encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    image_tower: bool = True  # False: the weights hold the text tower only (an imported SD text encoder)
    # Also contrast each image with the captions its sample's json lists as "negatives" (false for it, near its
    # own: `latentdiff data scenes` writes them), text.loss.hard_negative_loss; docs/text-encoder.md.
    hard_negatives: bool = False
    # Weight of the word identity term on the per-token states (text.loss.token_identity_loss; 0: off, the
    # contrastive loss alone); docs/text-encoder.md, "Word identity in the token states".
    token_identity: NonNegativeFloat = 0.0


class TowersWithStates(nn.Module):
    """CLIP's forward (normalised image and text features, the logit scale) and the text's per-token states as
    the prior reads them, in one call, so DDP sees one pass. Same computation as open_clip's CLIP.forward."""

    def __init__(self, encoder: TextEncoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, images: torch.Tensor, tokens: torch.Tensor):
        out = self.encoder.forward_tokens(tokens)
        model = self.encoder.model
        return (
            model.encode_image(images, normalize=True),
            F.normalize(out.pooled, dim=-1),
            model.logit_scale.exp(),
            out.states,
        )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="latentdiff train text",
        description="Train a CLIP contrastively on (image, caption) shards; its text tower conditions the prior.",
    )
    add_train_args(p, "text", presets=PRESETS)
    return p


@torch.no_grad()
def evaluate(encoder: TextEncoder, data: str, cfg: TextStageConfig) -> dict[str, float]:
    """Zero-shot accuracy over the class prompts (labelled data), retrieval recall@1/5 on val and, where
    the samples list "negatives", how often an image's own caption beats them (per task where named)."""

    def val_batches():
        loader = read_once(data, "val", 250, cfg.resolution, device=encoder.device)
        seen = 0
        for batch in loader:
            yield batch
            seen += len(batch["caption"])
            if seen >= cfg.eval_images:
                break

    metrics: dict[str, float] = {}
    classes = read_info(data).get("classes")
    if classes:
        metrics["val_zero_shot_accuracy"] = zero_shot_accuracy(encoder, val_batches(), classes, class_prompt)
    images, texts, captions = [], [], []
    with_negatives = []  # kept from the same pass, so data without negatives is not read again
    for batch in val_batches():
        images.append(encoder.encode_image(from_uint8_to(batch["image"], encoder.device), normalize=True).float())
        texts.append(encoder.encode(batch["caption"]).normalized_pooled().float())
        captions += batch["caption"]
        if any((m or {}).get("negatives") for m in batch["meta"]):
            with_negatives.append(batch)
    # Retrieval among 1000 candidates; a candidate with the same caption text is a match too.
    image_emb, text_emb = torch.cat(images)[:1000], torch.cat(texts)[:1000]
    metrics.update({f"val_{k}": v for k, v in retrieval_metrics(image_emb, text_emb, captions=captions[:1000]).items()})
    metrics["val_retrieval_candidates"] = image_emb.shape[0]
    metrics.update({f"val_{k}": v for k, v in hard_negative_accuracy(encoder, with_negatives).items()})
    metrics.update({f"val_{k}": v for k, v in token_identity_accuracy(encoder, captions).items()})
    return metrics


def require_negatives(data: str, cfg: TextStageConfig) -> None:
    """With hard_negatives on, ValueError unless the first train sample's json lists "negatives"."""
    if not cfg.hard_negatives:
        return
    first = next(iter(read_once(data, "train", 1, cfg.resolution)))
    if "negatives" not in (first["meta"][0] or {}):
        raise ValueError(
            f'hard_negatives = true, but the samples of {data} list no "negatives" in their json '
            "(`latentdiff data scenes` writes them); remake the data or leave hard_negatives off"
        )


def train(args: argparse.Namespace) -> dict:
    # A new run reads images at the dataset's resolution unless --set resolution=N says otherwise, and
    # records a model config given as a .json path resolved, so the run rebuilds from any directory.
    def derive(cfg: TextStageConfig) -> TextStageConfig:
        cfg = follow(args, "resolution", lambda: read_info(args.data).get("resolution"))(cfg)
        require_negatives(args.data, cfg)
        return replace(cfg, model=str(Path(cfg.model).resolve())) if cfg.model.endswith(".json") else cfg

    run = Run.start(args, TextStageConfig, PRESETS, stage="text", derive=derive)
    cfg, rt = run.config, run.runtime
    if not cfg.image_tower:
        raise ValueError("image_tower = false: contrastive training needs CLIP's image tower; remove the setting")
    if args.resume:  # a new run was checked before its folder was made
        require_negatives(args.data, cfg)
    tcfg = cfg.train
    model_config = load_model_config(cfg.model)
    model = build_clip(model_config).to(rt.device)
    tokenizer = build_tokenizer(model_config)
    encoder = TextEncoder(model, tokenizer, model_config=model_config, source=str(run.path), settings=cfg.encoder)
    opt = make_optimizer(model.parameters(), tcfg)
    ema = EMA(model, tcfg.ema_decay, tcfg.ema_warmup)
    scheduler = run.begin({"model": model}, {"model": opt}, ema, meta={"data": record_path(args.data, run.path)})
    net = run.wrap(TowersWithStates(encoder) if cfg.token_identity else model)
    # Under DDP, ClipLoss gathers every rank's features so each rank contrasts against the global batch.
    clip_loss = open_clip.ClipLoss(gather_with_grad=rt.distributed, rank=rt.rank, world_size=rt.world_size)

    loader = make_loader(
        args.data,
        "train",
        tcfg.batch_size,
        seed=tcfg.seed,
        num_workers=tcfg.num_workers,
        resolution=cfg.resolution,
        device=rt.device,
    )
    batches = run.batches(loader)  # a resumed run skips what it has seen
    for step in run.steps():
        batch = next(batches)
        captions = batch["caption"]
        negatives = [(m or {}).get("negatives", []) if cfg.hard_negatives else [] for m in batch["meta"]]
        # One forward for captions and negatives: the towers run apart, so the text side may be longer.
        tokens = encoder.tokenize(captions + [c for n in negatives for c in n])
        images = preprocess_images(from_uint8_to(batch["image"], rt.device), model)
        lr = scheduler.get_last_lr()[0]
        with rt.autocast():
            # normalised (B, E), (B + N, E); with token_identity also the states (B + N, T, D)
            image_features, text_features, logit_scale, *states = net(images, tokens)
            own, negative = text_features[: len(captions)], text_features[len(captions) :]
            clip = clip_loss(image_features, own, logit_scale)  # one value: the softmax spans the batch
            terms, loss = {"clip_loss": clip}, clip  # terms: logged apart when there is more than one
            if cfg.hard_negatives:
                counts = [len(n) for n in negatives]
                terms["hard_negative_loss"] = hard_negative_loss(image_features, own, negative, counts, logit_scale)
                loss = loss + terms["hard_negative_loss"]
            if cfg.token_identity:
                words = encoder.word_mask(tokens)
                terms["token_identity_loss"] = token_identity_loss(
                    states[0], tokens, words, model.token_embedding.weight
                )
                loss = loss + cfg.token_identity * terms["token_identity_loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip or math.inf)
        if run.finite(step, loss, grad_norm):
            opt.step()
        clamp_logit_scale(model)
        run.advance(images.shape[0], batch["skipped"])
        ema.update(model)

        if run.every(tcfg.log_every, step):
            run.log(
                step,
                {
                    "loss": loss.item(),
                    "lr": lr,
                    "grad_norm": grad_norm.item(),
                    "logit_scale": model.logit_scale.exp().item(),
                    **({k: v.item() for k, v in terms.items()} if len(terms) > 1 else {}),
                },
            )
        if run.every(tcfg.ckpt_every, step):
            run.checkpoint(step + 1)

    # Captions longer than the text context were warned about once; the count is a figure of the run.
    summary = {"truncated_captions": encoder.truncated}
    if rt.is_main:
        final = ema.final(model)
        summary.update(
            evaluate(TextEncoder(final, encoder.tokenizer, model_config).frozen(cache_size=64), args.data, cfg)
        )
    return run.finish(summary)


def main(argv: list[str] | None = None) -> dict:
    return stage_main(build_parser, train, argv)


if __name__ == "__main__":
    main()
