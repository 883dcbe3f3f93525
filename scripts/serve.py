"""`latentdiff serve --run PRIOR_RUN`: the local web page to generate images and watch training (latentdiff.serve)."""

from __future__ import annotations

import argparse
import sys

from latentdiff.core.errors import UserError, cli_errors
from latentdiff.prior.pipeline import add_precision_argument


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="latentdiff serve", description="A local web page: generate images from a prior run, watch its training."
    )
    p.add_argument("--run", required=True, help="prior run directory (its autoencoder and text runs are shown too)")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: %(default)s, this machine only; 0.0.0.0 exposes it to the "
        "network, without a password)",
    )
    p.add_argument("--port", type=int, default=7860, help="port (default: %(default)s)")
    p.add_argument("--decoder", help="a `latentdiff train decoder` run to decode with (same latent space)")
    p.add_argument("--device", help="force a device (default: cuda if available, else cpu)")
    add_precision_argument(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with cli_errors():
        try:
            from latentdiff.serve.app import exposure_warning, start
        except ModuleNotFoundError as e:
            if e.name != "gradio":
                raise
            raise UserError(
                "latentdiff serve needs gradio: pip install 'latentdiff[serve]' (make setup installs it)"
            ) from None
        server = start(
            args.run,
            host=args.host,
            port=args.port,
            decoder=args.decoder,
            device=args.device,
            precision=args.precision,
            quiet=True,
        )
        warning = exposure_warning(args.host)
        if warning:
            print(warning, file=sys.stderr)
        print(f"latentdiff serve: {server.url} (Ctrl-C to stop)", flush=True)
        try:
            server.wait()
        finally:
            server.close()
    return 0


if __name__ == "__main__":
    main()
