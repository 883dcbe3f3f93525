"""`latentdiff evaluate-autoencoder`: how well an autoencoder reconstructs held-out images.

    latentdiff evaluate-autoencoder --run runs/ae --data datasets/fmnist [--features classifier:runs/clf]

Reconstructions are x_hat = D(mode of q(z|x)), as the prior's samples are decoded; with --decoder,
D is a `latentdiff train decoder` run for the same encoder (an upscaling decoder sees the images
area-downsampled to the encoder's resolution and is scored at its own, larger one). Reported,
averaged over the images: PSNR and SSIM (Wang et al. 2004, gaussian window; both from
core.image_metrics), LPIPS (Zhang et al. 2018) when torchvision's VGG16 weights are in the torch
hub cache, and with --features the rFID: the real images are split into halves A and B; rFID is the FID
of the reconstructions of A to B, and its floor the FID of A itself to B (same sizes), both with
95% bootstrap intervals and the notes that say when rFID is within real-vs-real noise (noise.py).
Reconstructions of another size than the real images are compared at the real size, and the
report says so (images.match_size). Without --features rFID is not computed, and the command says so.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from latentdiff.core.checkpoint import write_json
from latentdiff.core.errors import cli_errors
from latentdiff.core.image_metrics import psnr, ssim
from latentdiff.core.logger import save_grid
from latentdiff.core.pixels import from_uint8, to_uint8
from latentdiff.core.runtime import Runtime

from .fid import StatisticsCache, describe, real_reference, score_images
from .fid_command import add_feature_args, check_bootstrap
from .images import load_image_set

NO_RFID = (
    "rFID: not computed, it needs a feature space: pass --features classifier:RUN (a `latentdiff train "
    "classifier` run on the same kind of images), clip:RUN (a text run) or inception"
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="latentdiff evaluate-autoencoder", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="autoencoder run directory (`latentdiff train autoencoder --out RUN`)")
    p.add_argument("--data", required=True, help="dataset directory or shard pattern")
    p.add_argument("--split", default="test", help="split to reconstruct (default: %(default)s)")
    p.add_argument("--n", type=int, default=2000, help="images to reconstruct (default: %(default)s)")
    p.add_argument("--decoder", metavar="RUN", help="decode with this `latentdiff train decoder` run instead")
    p.add_argument(
        "--lpips",
        choices=["auto", "on", "off"],
        default="auto",
        help="LPIPS: auto (when VGG16 weights are cached), on (error if missing) or off",
    )
    p.add_argument("--out", help="report directory (default: RUN/eval)")
    add_feature_args(p, required=False, without="no rFID")
    return p


@torch.no_grad()
def evaluate_autoencoder(args: argparse.Namespace) -> dict:
    from latentdiff.autoencoder.load import load_autoencoder
    from latentdiff.decoder.perceptual import load_lpips, lpips_available, lpips_distance, vgg16_weights_path

    check_bootstrap(args.bootstrap)
    rt = Runtime.setup(0, "fp32", args.device)
    rt.announce(args.device)
    device = rt.device
    model, latent_space = load_autoencoder(args.run, device)
    decoder, upscale = model.decode, 1
    if args.decoder:
        from latentdiff.decoder.load import load_decoder

        swapped, dec_meta = load_decoder(args.decoder, device)
        if dec_meta["encoder_hash"] != latent_space.encoder_hash:
            trained_on = dec_meta["autoencoder"]["path"]
            raise ValueError(
                f"decoder {args.decoder} decodes the latents of autoencoder {trained_on} "
                f"(encoder hash {dec_meta['encoder_hash']}), not those of {args.run} "
                f"(encoder hash {latent_space.encoder_hash}); pass --run {trained_on}"
            )
        decoder, upscale = swapped, int(dec_meta.get("upscale", 1))
    res = latent_space.resolution
    real = load_image_set(args.data, split=args.split, limit=args.n, resolution=res * upscale)
    use_lpips = args.lpips == "on" or (args.lpips == "auto" and lpips_available())
    if not use_lpips and args.lpips == "auto":
        print(
            f"LPIPS: not computed, its VGG16 ImageNet weights are not at {vgg16_weights_path()} (nothing is "
            "downloaded); copy them there for LPIPS, or pass --lpips off"
        )
    lpips_model = load_lpips(without="evaluate without it: --lpips off").to(device) if use_lpips else None
    t0 = time.monotonic()
    psnrs, ssims, lpipss, recons = [], [], [], []
    for i in range(0, len(real), args.batch_size):
        x = from_uint8(real.images[i : i + args.batch_size].to(device))  # (B, 3, H, W) in [-1, 1]
        x_in = x if upscale == 1 else F.interpolate(x, size=(res, res), mode="area")  # what the encoder sees
        x_hat = decoder(model.encode(x_in).mode()).float().clamp(-1, 1)
        psnrs.append(psnr(x_hat, x).cpu())
        ssims.append(ssim(x_hat, x).cpu())
        if lpips_model is not None:
            lpipss.append(lpips_distance(lpips_model, x_hat, x).cpu())
        recons.append(to_uint8(x_hat).cpu())  # what a saved PNG would hold, for rFID
    recon = torch.cat(recons)
    report: dict = {
        "autoencoder": str(args.run),
        "decoder": args.decoder,
        "data": real.source,
        "images": len(real),
        "resolution": list(real.images.shape[-2:]),
        "psnr": torch.cat(psnrs).mean().item(),
        "ssim": torch.cat(ssims).mean().item(),
        "lpips": torch.cat(lpipss).mean().item() if lpipss else None,
    }
    if args.features:
        from .features import load_feature_space

        space = load_feature_space(args.features, inception_weights=args.inception_weights, device=device)
        cache = StatisticsCache(None if args.no_cache else args.cache_dir)
        ref = real_reference(real.images, len(real) // 2, space, cache, args.batch_size)
        # The reconstructions of the held-out images: their real originals are not in the reference.
        result = score_images(
            space, recon[ref.holdout], ref, args.batch_size, bootstraps=args.bootstrap, what="reconstructed"
        )
        report.update(
            {
                "rfid": result["fid"],
                "rfid_interval": result["fid_interval"],
                "rfid_floor": result["fid_floor"],
                "rfid_floor_interval": result["fid_floor_interval"],
                "rfid_excess": result["fid_excess"],
                "rfid_excess_interval": result["fid_excess_interval"],
                "rfid_n": result["n_fake"],
                "rfid_reference_n": result["n_reference"],
                "features": result["features"],
                "rkid": result["kid"],
                "rkid_std": result["kid_std"],
                "compared_size": result["compared_size"],
                "resized": result["resized"],
                "notes": result["notes"],
            }
        )
        print("rFID: " + describe(result, "reconstructed"))
    else:
        report["rfid"] = None
        print(NO_RFID)
    report["seconds"] = round(time.monotonic() - t0, 1)
    out = Path(args.out or Path(args.run) / "eval")
    shown = from_uint8(torch.cat([real.images[:16], recon[:16]]))
    report["grid"] = str(save_grid(shown, out / "reconstructions.png", 16))
    write_json(out / "reconstruction.json", report)
    figures = [f"PSNR {report['psnr']:.2f} dB", f"SSIM {report['ssim']:.4f}"]
    if report["lpips"] is not None:
        figures.append(f"LPIPS {report['lpips']:.4f}")
    if report["rfid"] is not None:
        span = report["rfid_interval"]
        figures.append(
            f"rFID {report['rfid']:.2f}"
            + (f" [{span[0]:.2f}, {span[1]:.2f}]" if span else "")
            + f" (floor {report['rfid_floor']:.2f}, {report['rfid_n']} images, {report['features']})"
        )
    print(f"{args.run} on {len(real)} images of {real.source}: " + ", ".join(figures))
    print(f"report: {out / 'reconstruction.json'}")
    return report


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    with cli_errors():
        return evaluate_autoencoder(args)


if __name__ == "__main__":
    main()
