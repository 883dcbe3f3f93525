"""Generation: images/s of TextToImage with 20-step DPM-Solver++(2M) and guidance, at batch 1 and 64.

Everything a user waits for is inside the timing: text encoding (cached for repeated prompts),
the guided sampling loop (one network pass over the conditional and unconditional halves as
one batch per step) and decoding. Uses the demo prior when `make demo` has made it, else the
tiny preset's networks with initial weights (the same speed, meaningless images).
"""

from __future__ import annotations

from .common import demo_pipeline, device, parser, report, table, time_it

PROMPTS = ["a photo of a sneaker", "a photo of a dress", "a photo of a bag", "a photo of a coat"]


def main(argv: list[str] | None = None) -> dict:
    p = parser("generation", __doc__)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--sampler", default="dpmpp-2m")
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--batch-sizes", default="1,64", help="comma-separated batch sizes (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per batch size; batch 1 takes 3x as many")
    args = p.parse_args(argv)

    dev = device()
    pipe, trained = demo_pipeline(dev)
    rows, figures = [], {"weights": "demo prior" if trained else "initial weights", "results": []}
    for bs in [int(b) for b in args.batch_sizes.split(",")]:
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(bs)]

        def generate():
            pipe(prompts, n=1, steps=args.steps, sampler=args.sampler, guidance=args.guidance, batch_size=bs)

        # One image is ~0.5 s and noisy here (0.39-0.57 s across processes): more repeats at batch 1.
        repeats = args.repeats * (3 if bs == 1 else 1)
        seconds = time_it(generate, warmup=1, repeats=repeats, device=dev)
        figures["results"].append({"batch_size": bs, "seconds_per_batch": seconds, "images_per_s": bs / seconds})
        rows.append([bs, f"{seconds:.3f}", f"{bs / seconds:.1f}", f"{1000 * seconds / bs:.1f}"])
        print(" | ".join(str(c) for c in rows[-1]), flush=True)
    text = table(["batch", "s/batch", "images/s", "ms/image"], rows)
    text += (
        f"\n\n{args.sampler}, {args.steps} steps, guidance {args.guidance:g} (2 x batch rows per network pass), "
        f"text encoding and decoding included; {figures['weights']}; median of {args.repeats} calls after a warm-up "
        f"({3 * args.repeats} at batch 1)."
    )
    report("generation", "6. Generation speed", text, figures, args.out)
    return figures


if __name__ == "__main__":
    main()
