"""`latentdiff train classifier`: the CNN whose features FID uses and whose predictions judge prompts.

One loop: lr, forward, loss (cross-entropy summed over heads), backward, clip, step, EMA,
log, checkpoint. After training: accuracy on val (and test, when the dataset has it), overall
(every head right) and per head; summary.json carries val_accuracy.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from latentdiff.core import checkpoint as ckpt
from latentdiff.core.ema import EMA
from latentdiff.core.flags import add_train_args
from latentdiff.core.pixels import from_uint8_to
from latentdiff.core.runs import follow, record_path
from latentdiff.core.train import Run, make_optimizer, stage_main
from latentdiff.data.reader import make_loader, read_info, read_once, resolve_shards

from .classifier import (
    Classifier,
    ClassifierStageConfig,
    Heads,
    classification_loss,
    correct,
    heads_from_info,
    targets_from_meta,
)

PRESETS = Path(__file__).parent


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="latentdiff train classifier",
        description="Train the small CNN whose penultimate features are the FID feature "
        "space and whose predictions score prompt faithfulness.",
    )
    add_train_args(p, "classifier", presets=PRESETS)
    return p


@torch.no_grad()
def evaluate_accuracy(
    model: Classifier, data: str, split: str, heads: Heads, resolution: int, max_images: int, batch_size: int = 250
) -> dict[str, float]:
    """Fraction of up to `max_images` images of `split` with every head right ("accuracy") and per head."""
    device = next(model.parameters()).device
    loader = read_once(data, split, batch_size, resolution, device=device)
    hits: dict[str, list[torch.Tensor]] = {}
    seen = 0
    for batch in loader:
        take = min(len(batch["meta"]), max_images - seen)
        targets = {k: v[:take] for k, v in targets_from_meta(heads, batch["meta"][:take]).items()}
        for k, v in correct(model.predict(from_uint8_to(batch["image"][:take], device)), targets).items():
            hits.setdefault(k, []).append(v)
        seen += take
        if seen >= max_images:
            break
    if not seen:
        raise ValueError(f"no {split} images in {data}; the {split} split is empty")
    out = {f"{split}_accuracy": torch.cat(hits["all"]).float().mean().item(), f"{split}_images": seen}
    if len(heads) > 1:
        out.update({f"{split}_accuracy_{k}": torch.cat(v).float().mean().item() for k, v in hits.items() if k != "all"})
    return out


def _has_split(data: str, split: str) -> bool:
    try:
        resolve_shards(data, split)
        return True
    except FileNotFoundError:
        return False


def train(args: argparse.Namespace) -> dict:
    # A new run reads images at the dataset's resolution unless --set resolution=N says otherwise.
    derive = follow(args, "resolution", lambda: read_info(args.data).get("resolution"))
    run = Run.start(args, ClassifierStageConfig, PRESETS, stage="classifier", derive=derive)
    cfg, rt = run.config, run.runtime
    tcfg = cfg.train
    heads = heads_from_info(read_info(args.data), where=str(args.data))
    recorded = (run.recorded or {}).get("heads")
    if recorded is not None and recorded != heads:
        raise ValueError(
            f"{run.path} was trained with heads {recorded} but {args.data} has {heads}; "
            "resume on the data the run was started with"
        )

    model = Classifier(cfg.model, heads, cfg.resolution).to(rt.device)
    opt = make_optimizer(model.parameters(), tcfg)
    ema = EMA(model, tcfg.ema_decay, tcfg.ema_warmup)
    scheduler = run.begin(
        {"model": model},
        {"model": opt},
        ema,
        meta={
            "heads": heads,
            "data": record_path(args.data, run.path),
            "resolution": cfg.resolution,
            "feature_dim": cfg.model.feature_dim,
        },
    )
    net = run.wrap(model)
    loader = make_loader(
        args.data,
        "train",
        tcfg.batch_size,
        seed=tcfg.seed,
        num_workers=tcfg.num_workers,
        resolution=cfg.resolution,
        device=rt.device,
    )
    batches = run.batches(loader)  # a resumed run skips what it has seen, dropout noise unchanged
    model.train()
    for step in run.steps():
        batch = next(batches)
        x = from_uint8_to(batch["image"], rt.device)  # (B, 3, H, W) in [-1, 1]
        targets = {k: v.to(rt.device) for k, v in targets_from_meta(heads, batch["meta"]).items()}
        lr = scheduler.get_last_lr()[0]
        with rt.autocast():
            logits = net(x)
        loss = classification_loss({k: v.float() for k, v in logits.items()}, targets).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip or math.inf)
        if run.finite(step, loss, grad_norm):
            opt.step()
        run.advance(x.shape[0], batch["skipped"])
        ema.update(model)

        if run.every(tcfg.log_every, step):
            hits = correct({k: v.detach().argmax(-1) for k, v in logits.items()}, targets)
            run.log(
                step,
                {
                    "loss": loss.item(),
                    "lr": lr,
                    "grad_norm": grad_norm.item(),
                    "train_accuracy": hits["all"].float().mean().item(),
                },
            )
        if run.every(tcfg.ckpt_every, step):
            run.checkpoint(step + 1)

    summary = {"parameters": sum(p.numel() for p in model.parameters())}
    if rt.is_main:
        final = ema.final(model)
        for split in ("val", "test"):
            if split == "val" or _has_split(args.data, split):
                summary.update(evaluate_accuracy(final, args.data, split, heads, cfg.resolution, cfg.eval_images))
        # Recorded beside the weights, so `evaluate` can print the judge's own accuracy with its verdicts.
        accuracies = {k: v for k, v in summary.items() if k.startswith(("val_", "test_"))}
        ckpt.write_json(run.path / ckpt.META, {**ckpt.read_meta(run.path), **accuracies})
    return run.finish(summary)


def main(argv: list[str] | None = None) -> dict:
    return stage_main(build_parser, train, argv)


if __name__ == "__main__":
    main()
