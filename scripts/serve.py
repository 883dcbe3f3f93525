"""`latentdiff serve --run PRIOR_RUN`: the local web page to generate images and watch training (latentdiff.serve)."""

from __future__ import annotations

import argparse
import signal
import sys

from latentdiff.core.errors import UserError, cli_errors
from latentdiff.core.runtime import announce, sampling_precision
from latentdiff.prior.pipeline import TextToImage, add_lora_argument, add_precision_argument, lora_arguments
from latentdiff.serve.access import MAX_QUEUE, MAX_UPLOAD, Access


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="latentdiff serve", description="A local web page: generate images from a prior run, watch its training."
    )
    p.add_argument("--run", required=True, help="prior run directory (its autoencoder and text runs are shown too)")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: %(default)s: other machines cannot reach it, but every account and "
        "program on this one can; 0.0.0.0 exposes it to the network, over plain HTTP)",
    )
    p.add_argument("--port", type=int, default=7860, help="port (default: %(default)s)")
    login = p.add_mutually_exclusive_group()
    login.add_argument(
        "--auth",
        metavar="USER:PASSWORD",
        help="ask for this user and password before showing the page (visible in `ps` and your shell history: "
        "prefer --auth-file)",
    )
    login.add_argument(
        "--auth-file",
        metavar="FILE",
        help="ask for a login: FILE holds one USER:PASSWORD a line and must be closed to other accounts (chmod 600)",
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=MAX_QUEUE,
        help="requests that may wait at once, over every browser tab; more are refused (default: %(default)s)",
    )
    p.add_argument(
        "--max-upload",
        default=f"{MAX_UPLOAD // 2**20}MB",
        metavar="SIZE",
        help="largest file a visitor may upload (init image, mask), e.g. 5MB or 512KB, 1 KB = 1024 bytes "
        "(default: %(default)s)",
    )
    p.add_argument("--decoder", help="a `latentdiff train decoder` run to decode with (same latent space)")
    p.add_argument("--device", help="force a device (default: cuda if available, else cpu)")
    add_lora_argument(p)
    add_precision_argument(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with cli_errors():
        access = Access.from_flags(args.auth, args.auth_file, args.max_queue, args.max_upload)
        try:
            from latentdiff.serve.app import exposure_warning, start
        except ModuleNotFoundError as e:
            if e.name != "gradio":
                raise
            raise UserError(
                "latentdiff serve needs gradio: pip install 'latentdiff[serve]' (make setup installs it)"
            ) from None
        pipe = None
        if args.lora:  # the prior with the LoRA files merged; loaded here as start() would load it
            loras = lora_arguments(args)
            pipe = TextToImage.from_run(
                args.run, device=args.device, decoder=args.decoder, precision=args.precision, loras=loras
            )
        server = start(
            args.run,
            pipe=pipe,
            host=args.host,
            port=args.port,
            decoder=args.decoder,
            device=args.device,
            precision=args.precision,
            quiet=True,
            access=access,
        )
        pipe = server.generator.pipe
        announce(pipe.device, sampling_precision(pipe.device, pipe.precision), asked=args.device)
        warning = exposure_warning(args.host, access.login)
        if warning:
            print(warning, file=sys.stderr)
        print(f"latentdiff serve: {server.url} (Ctrl-C to stop)", flush=True)
        # `kill` (SIGTERM) stops it as Ctrl-C does, so the generated images and the copies are removed either way.
        signal.signal(signal.SIGTERM, _interrupt)
        try:
            server.wait()
        except KeyboardInterrupt:
            pass  # outside Gradio's wait, which catches it itself ("closing server")
        finally:
            server.close()
    return 0


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    main()
