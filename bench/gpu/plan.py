"""What `python -m bench.gpu` runs: its sections, their sizes and time limits, the goals, the GPUs' peaks.

Plain data, no torch: `python -m bench.gpu --help` reads it before anything heavy is imported.
Two sizes: FULL (the check on one GPU, 8 minutes at most) and SMOKE (`--cpu-smoke`: every
section's code path at toy sizes on the CPU, for the tests; its figures mean nothing).
"""

from __future__ import annotations

from dataclasses import dataclass, field

SECTIONS = ("stages", "train_step", "generation", "data")
TITLES = {
    "stages": "1. Every stage for a few steps, a resume, a generate, a serve start-up",
    "train_step": "2. The base prior's training step at 256 px",
    "generation": "3. Generation with an SD-1.5-sized UNet at 64x64 latents",
    "data": "4. Data loading at 256 px from JPEG shards against the step",
}

# bf16 dense tensor-core peaks, TFLOP/s, from NVIDIA's datasheets (the datasheets print the figure
# "with sparsity", twice these): H100 Tensor Core GPU datasheet (SXM 1,979, PCIe 1,513, NVL 1,671),
# H200 datasheet (SXM 1,979, NVL 1,671), A100 datasheet (312 dense). Matched against
# torch.cuda.get_device_name in order, first match wins; a name matching none is "unknown device".
PEAK_BF16_TFLOPS: tuple[tuple[tuple[str, ...], str, float], ...] = (
    (("H100", "PCIE"), "H100 PCIe", 756.0),
    (("H100", "NVL"), "H100 NVL", 835.0),
    (("H100",), "H100 SXM", 989.0),  # "NVIDIA H100 80GB HBM3" is the SXM part
    (("GH200",), "GH200", 989.0),  # before H200, whose name it contains
    (("H200", "NVL"), "H200 NVL", 835.0),
    (("H200",), "H200 SXM", 989.0),
    (("A100",), "A100", 312.0),
)

# The goals of issue #27 on an H100 in bf16 (MosaicML's SD-2 UNet: 137.5 images/s per A100 at 256 px;
# SD-1.5 with torch.compile on an H100: 66 steps/s at batch 1).
GOAL_MFU = 0.40  # model FLOP utilisation of the base prior's training step
GOAL_TRAIN_IMAGES_S = 275.0  # images/s of that step at 256 px
GOAL_GENERATION_STEPS_S = 66.0  # guided steps/s of an SD-1.5-sized UNet at batch 1
GOAL_DATA_RATIO = 2.0  # the loader's images/s over the step's


@dataclass(frozen=True)
class Sizes:
    """How big each section runs: the GPU check (FULL) or the CPU smoke run (SMOKE)."""

    device: str  # what every command and model runs on
    precision: str  # training and sampling precision (bf16 autocast)
    limits_s: dict[str, int]  # per-section wall-clock limits, seconds; a section past its limit is stopped
    # 1. stages
    shapes_n: int  # training images of the `latentdiff data shapes` dataset (val and test: an eighth each)
    stage_steps: int  # optimizer steps per stage; the resume adds 2 more
    stage_flags: dict[str, tuple[str, ...]] = field(default_factory=dict)  # extra flags per command (smoke only)
    # 2. training step
    prior_preset: str = "base"
    prior_overrides: tuple[str, ...] = ()  # applied to every variant (smoke: a toy batch)
    train_warmup: int = 3  # untimed steps per variant (compilation happens here)
    train_steps: int = 10  # timed steps per variant, back to back, one synchronisation at the end
    compile_backend: str = "inductor"  # torch.compile's backend (smoke: "eager", dynamo only, no code generation)
    # 3. generation
    sd_latent: int = 64  # the latent side (SD-1.5 at 512 px)
    sd_context: int = 768  # SD-1.5's text width (CLIP ViT-L/14)
    sd_tokens: int = 77  # text positions per prompt (SD-1.5 pads every prompt to 77)
    sd_toy: bool = False  # smoke: the tiny preset's UNet instead of SD-1.5's sizes
    generation_batches: tuple[int, ...] = (1, 8)
    generation_steps: int = 20  # sampler steps per image (one guided network call each)
    generation_repeats: int = 3  # timed calls per row after one warm-up
    generation_compile: bool = True  # also a compiled row at batch 1 (the public 66 steps/s is compiled)
    # 4. data
    data_n: int = 2048  # JPEG images written to shards for the loader
    data_resolution: int = 256
    data_batches: int = 40  # timed batches after the first


FULL = Sizes(
    device="cuda",
    precision="bf16",
    # 450 s in all; with start-up and the report the run fits 8 minutes.
    limits_s={"stages": 120, "train_step": 200, "generation": 90, "data": 40},
    shapes_n=512,
    stage_steps=5,
)

# Toy sizes: the tiny presets shrunk as the test suite shrinks them (tests/helpers.py), batch 2-4.
_TINY_PRIOR = ("--batch-size", "4", "--set", "model.channels=[16, 32]", "--set", "model.num_res_blocks=1")
SMOKE = Sizes(
    device="cpu",
    precision="fp32",  # bf16 autocast is slow on most CPUs; the flags that set it are the same
    limits_s={"stages": 90, "train_step": 60, "generation": 30, "data": 30},  # generous: CI machines are shared
    shapes_n=32,
    stage_steps=1,
    stage_flags={
        "autoencoder": (
            "--batch-size",
            "4",
            "--set",
            "scale_batches=1",
            "--set",
            "model.channels=[8, 16, 16]",
        ),
        "text": ("--batch-size", "4"),
        "prior": (*_TINY_PRIOR, "--set", "sampling.steps=2", "--set", "sampling.per_prompt=1"),
        "decoder": ("--batch-size", "4"),
        "classifier": ("--batch-size", "4", "--set", "model.channels=[8, 8, 8, 8]"),
        "generate": ("--n", "1", "--steps", "2"),
    },
    prior_preset="tiny",
    prior_overrides=("train.batch_size=2", "model.channels=[16, 32]"),
    train_warmup=1,
    train_steps=1,
    compile_backend="eager",
    sd_latent=8,
    sd_context=128,
    sd_tokens=8,
    sd_toy=True,
    generation_batches=(1, 2),
    generation_steps=2,
    generation_repeats=1,
    data_n=32,
    data_resolution=32,
    data_batches=2,
)


def peak_tflops(device_name: str) -> tuple[str, float] | None:
    """(the part, its bf16 dense peak in TFLOP/s) for a CUDA device name, or None for a device not in the table."""
    name = device_name.upper()
    for words, part, peak in PEAK_BF16_TFLOPS:
        if all(w in name for w in words):
            return part, peak
    return None
