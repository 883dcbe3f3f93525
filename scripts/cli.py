"""`latentdiff COMMAND ...`: dispatches to each part's `main(argv)`; no logic of its own."""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import sys

# command words -> module with a `main(argv)`; imported only when used, so `--help` is instant.
COMMANDS = {
    ("data",): ("latentdiff.scripts.data", "write webdataset shards: fashion-mnist, shapes, or a folder"),
    ("train", "autoencoder"): ("latentdiff.autoencoder.stage", "train the KL autoencoder (the latent space)"),
    ("train", "text"): ("latentdiff.text.stage", "train a CLIP on your captions (the text encoder)"),
    ("train", "prior"): ("latentdiff.prior.stage", "train the text-conditioned latent diffusion model"),
    ("train", "decoder"): ("latentdiff.decoder.stage", "fine-tune or upscale the decoder, encoder frozen"),
    ("train", "classifier"): ("latentdiff.evaluation.classifier_stage", "train the FID feature classifier"),
    ("generate",): ("latentdiff.scripts.generate", "generate images from prompts with a prior run"),
    ("fid",): ("latentdiff.evaluation.fid_command", "FID and KID between two image sets (folders or shards)"),
    ("evaluate",): ("latentdiff.evaluation.evaluate", "sweep guidance: FID, prompt accuracy, CLIP score, plot"),
    ("serve",): ("latentdiff.scripts.serve", "a local web page: generate images, watch training curves and grids"),
    ("import", "autoencoder"): ("latentdiff.scripts.import_autoencoder", "a diffusers or SD VAE as an autoencoder run"),
    ("export", "autoencoder"): ("latentdiff.scripts.export_autoencoder", "an autoencoder run as a diffusers folder"),
    ("import", "pipeline"): ("latentdiff.scripts.import_pipeline", "SD 1.x/2.x (diffusers or one file) as 3 runs"),
    ("export", "pipeline"): ("latentdiff.scripts.export_pipeline", "a prior run as a diffusers SD pipeline folder"),
    ("export", "lora"): ("latentdiff.scripts.export_lora", "a LoRA prior run's adapters as a kohya/diffusers file"),
    ("evaluate-autoencoder",): ("latentdiff.evaluation.reconstruction", "PSNR, SSIM, LPIPS and rFID of an autoencoder"),
}


def usage() -> str:
    lines = ["usage: latentdiff COMMAND [args...]", "", "commands:"]
    for words, (module, text) in COMMANDS.items():
        if importlib.util.find_spec(module) is not None:
            lines.append(f"  {' '.join(words):<20} {text}")
    lines.append("\n`latentdiff COMMAND --help` documents each command's flags.")
    return "\n".join(lines)


def version() -> str:
    try:
        return importlib.metadata.version("latentdiff")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def group_usage(word: str) -> str:
    """The commands that start with `word` (e.g. the stages of `latentdiff train`)."""
    lines = [f"usage: latentdiff {word} WHAT [args...]", "", f"latentdiff {word} takes one of:"]
    for words, (_, text) in COMMANDS.items():
        if words[0] == word and len(words) > 1:
            lines.append(f"  {' '.join(words):<20} {text}")
    return "\n".join(lines)


def main(argv: list[str] | None = None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--version"]:
        print(f"latentdiff {version()}")
        return 0
    for words, (module, _) in sorted(COMMANDS.items(), key=lambda kv: -len(kv[0])):
        if tuple(argv[: len(words)]) == words:
            if importlib.util.find_spec(module) is None:
                break
            result = importlib.import_module(module).main(argv[len(words) :])
            # Stage mains return their summary (for tests); the shell gets an exit code.
            return result if isinstance(result, int) else 0
    groups = {words[0] for words in COMMANDS if len(words) > 1}
    if argv and argv[0] in groups:
        # `latentdiff train` alone (or with an unknown stage): list what can follow.
        if argv[1:2] in (["-h"], ["--help"]):
            print(group_usage(argv[0]))
            return 0
        what = f"unknown {argv[0]} {argv[1]!r}" if len(argv) > 1 else f"{argv[0]} needs one of the words below"
        print(f"latentdiff: {what}\n\n{group_usage(argv[0])}", file=sys.stderr)
        raise SystemExit(2)
    if argv and argv[0] not in ("-h", "--help"):
        print(f"latentdiff: unknown command {' '.join(argv[:2])!r}\n", file=sys.stderr)
        print(usage(), file=sys.stderr)
        raise SystemExit(2)
    print(usage())
    return 0


if __name__ == "__main__":
    main()
