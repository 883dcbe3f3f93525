"""Stable Diffusion 1.5's layout here: the time to import a diffusers pipeline folder, to generate, and to export.

A StableDiffusionPipeline folder with SD 1.5's full layout (UNet2DConditionModel 860M parameters,
AutoencoderKL 84M, CLIP ViT-L/14's text tower 123M) and random weights is built by diffusers and
transformers and saved (no download; 4 GB on disk, and as much again for the imported runs and for the
export, under a temporary folder removed at the end). Timed once each (the first call, the one a user
waits for; nothing is warmed up):
- `latentdiff import pipeline` of that folder (reading and renaming every tensor, writing three runs,
  the autoencoder's latent statistics measured on --batches 512 px images);
- loading the imported prior with its stages (TextToImage.from_run) and one generation: 1 image,
  --steps DDIM steps with classifier-free guidance (2 UNet passes a step) over 64x64x4 latents, then
  the VAE decode to 512 x 512;
- `latentdiff export pipeline` of the imported run back to a folder.
The device is CUDA when there is one (then also a GPU row), else the CPU; float32.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import torch

from .common import device, parser, peak_rss_mb, report, table

# SD 1.5's UNet2DConditionModel config (the rest are diffusers' defaults, which are SD 1.x's).
SD15_UNET = dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                 cross_attention_dim=768, attention_head_dim=8)  # fmt: skip
SD15_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=512,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)  # fmt: skip
# OpenAI CLIP ViT-L/14's text tower, as SD 1.x's text_encoder/config.json has it.
SD15_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)  # fmt: skip
# --layout toy: the same kinds of parts at toy widths (64 px images), so a test runs the whole script in seconds.
TOY = {
    "unet": dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                 attention_head_dim=2, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
    "vae": dict(SD15_VAE, block_out_channels=(32, 32, 64, 64), layers_per_block=1, sample_size=64),
    "text": dict(SD15_TEXT, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 projection_dim=32),
}  # fmt: skip
LAYOUTS = {"sd15": {"unet": SD15_UNET, "vae": SD15_VAE, "text": SD15_TEXT}, "toy": TOY}
SD15_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                      set_alpha_to_one=False, clip_sample=False)  # fmt: skip


def build_folder(folder: Path, layout: str = "sd15") -> dict[str, float]:
    """A layout of LAYOUTS with random weights, saved as StableDiffusionPipeline.save_pretrained lays it out."""
    import diffusers
    import transformers

    from latentdiff.text.interchange import write_clip_tokenizer

    torch.manual_seed(0)
    configs = LAYOUTS[layout]
    unet = diffusers.UNet2DConditionModel(**configs["unet"])
    vae = diffusers.AutoencoderKL(**configs["vae"])
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(**configs["text"]))
    counts = {name: sum(p.numel() for p in m.parameters()) / 1e6 for name, m in (("unet", unet), ("vae", vae),
                                                                                    ("text", text))}  # fmt: skip
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    text.save_pretrained(folder / "text_encoder")
    write_clip_tokenizer(folder / "tokenizer", pad="end")
    diffusers.DDIMScheduler(**SD15_SCHEDULER).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}\n')
    return counts


def main(argv: list[str] | None = None) -> dict:
    p = parser("sd_layout", __doc__)
    p.add_argument("--steps", type=int, default=4, help="DDIM steps of the generation (default: %(default)s)")
    p.add_argument("--batches", type=int, default=1, help="images the import measures the latents on")
    p.add_argument("--layout", choices=list(LAYOUTS), default="sd15", help="toy: a seconds-long check of the script")
    p.add_argument("--keep", help="build the folder and the runs here and keep them (default: a temporary folder)")
    args = p.parse_args(argv)

    from latentdiff.data.shapes import build as build_shapes
    from latentdiff.prior.pipeline import TextToImage
    from latentdiff.prior.sd_export import write_diffusers_pipeline
    from latentdiff.prior.sd_import import import_pipeline

    dev = device()
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-sd-layout-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        counts = build_folder(work / "sd15", args.layout)
        side = LAYOUTS[args.layout]["vae"]["sample_size"]
        built = time.perf_counter() - t0
        data = work / "shapes"
        build_shapes(data, n=max(args.batches, 1), val_n=1, test_n=1, seed=0, resolution=side, maxcount=16)
        t0 = time.perf_counter()
        import_pipeline(work / "sd15", work / "runs", str(data), batch_size=1, batches=args.batches, device=dev)
        imported = time.perf_counter() - t0
        t0 = time.perf_counter()
        pipe = TextToImage.from_run(work / "runs" / "prior", device=dev, precision="fp32")
        loaded = time.perf_counter() - t0
        t0 = time.perf_counter()
        image = pipe(["a photo of a red circle"], steps=args.steps, sampler="ddim", guidance=7.5, seed=0,
                     sampler_options={"spacing": "sd-leading", "eta": 0.0})  # fmt: skip
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        generated = time.perf_counter() - t0
        assert image.shape == (1, 3, side, side)
        t0 = time.perf_counter()
        write_diffusers_pipeline(pipe, work / "exported")
        exported = time.perf_counter() - t0
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    where = "GPU" if dev.type == "cuda" else "CPU"
    figures = {
        "device": str(dev),
        "layout": args.layout,
        "parameters_m": counts,
        "steps": args.steps,
        "build_s": built,
        "import_s": imported,
        "load_s": loaded,
        "generate_s": generated,
        "export_s": exported,
        "peak_rss_mb": peak_rss_mb(),
    }
    rows = [
        [
            where,
            f"{imported:.1f}",
            f"{loaded:.1f}",
            f"{generated:.1f}",
            f"{exported:.1f}",
            f"{peak_rss_mb() / 1024:.1f}",
        ]
    ]
    if dev.type != "cuda":
        rows.append(["GPU", "not measured", "not measured", "not measured", "not measured", "not measured"])
    text = table(
        ["device", "import s", "load s", f"generate s (1 image, {args.steps} DDIM steps, CFG)", "export s",
         "peak RSS GB"],
        rows,
    )  # fmt: skip
    latent = LAYOUTS[args.layout]["unet"]["sample_size"]
    what = "SD 1.5's layout" if args.layout == "sd15" else "A toy layout"
    text += (
        f"\n\n{what} with random weights built by diffusers ({counts['unet']:.1f}M UNet, "
        f"{counts['vae']:.1f}M VAE, {counts['text']:.1f}M text parameters; building and saving it took "
        f"{built:.0f} s, not counted). import: `latentdiff import pipeline` with the latents measured on "
        f"{args.batches} {side} px image(s); generate: {side} x {side}, {latent}x{latent}x4 latents, float32, "
        "first call; each figure is one run, not a median."
    )
    report("sd_layout", "Stable Diffusion 1.5's layout: import, generate, export", text, figures, args.out)
    return figures


if __name__ == "__main__":
    main()
