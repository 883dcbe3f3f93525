"""`latentdiff COMMAND ...`: dispatches to each part's `main(argv)`; no logic of its own."""

from __future__ import annotations

import importlib
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
    ("import", "autoencoder"): ("latentdiff.scripts.import_autoencoder", "a diffusers or SD VAE as an autoencoder run"),
    ("export", "autoencoder"): ("latentdiff.scripts.export_autoencoder", "an autoencoder run as a diffusers folder"),
    ("evaluate-autoencoder",): ("latentdiff.evaluation.reconstruction", "PSNR, SSIM, LPIPS and rFID of an autoencoder"),
}


def usage() -> str:
    lines = ["usage: latentdiff COMMAND [args...]", "", "commands:"]
    for words, (module, text) in COMMANDS.items():
        if importlib.util.find_spec(module) is not None:
            lines.append(f"  {' '.join(words):<20} {text}")
    lines.append("\n`latentdiff COMMAND --help` documents each command's flags.")
    return "\n".join(lines)


def main(argv: list[str] | None = None):
    argv = list(sys.argv[1:] if argv is None else argv)
    for words, (module, _) in sorted(COMMANDS.items(), key=lambda kv: -len(kv[0])):
        if tuple(argv[: len(words)]) == words:
            if importlib.util.find_spec(module) is None:
                break
            result = importlib.import_module(module).main(argv[len(words):])
            # Stage mains return their summary (for tests); the shell gets an exit code.
            return result if isinstance(result, int) else 0
    if argv and argv[0] not in ("-h", "--help"):
        print(f"latentdiff: unknown command {' '.join(argv[:2])!r}\n", file=sys.stderr)
        print(usage(), file=sys.stderr)
        raise SystemExit(2)
    print(usage())
    return 0


if __name__ == "__main__":
    main()
