"""The `fastema` command line: `fastema demo` and `fastema bench`."""

from __future__ import annotations

import argparse

from .bench import DTYPES, MODELS  # models are built lazily: this imports neither timm nor transformers


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="fastema", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="train a small CNN on scikit-learn digits; raw vs EMA accuracy and a plot")
    demo.add_argument("--epochs", type=int, default=12)
    demo.add_argument("--lr", type=float, default=0.03)
    demo.add_argument("--output", default="demo_output/fastema-demo.png", help="where to write the PNG plot")
    demo.add_argument("--seed", type=int, default=0)
    bench = commands.add_parser("bench", help="time fastema's EMA step against the for-loop, fused steps and the floor")
    bench.add_argument("--models", help="comma-separated subset of: " + ", ".join(MODELS))
    bench.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    bench.add_argument("--dtype", default="float32", choices=list(DTYPES))
    bench.add_argument("--ema-dtype", choices=list(DTYPES), help="dtype of the EMA (default: the model's)")
    bench.add_argument("--ema-device", choices=["cpu"], help="offload the EMA to host memory (with --device cuda)")
    bench.add_argument("--channels-last", action="store_true", help="convert the models to channels-last first")
    bench.add_argument("--json", action="store_true", help="print JSON instead of markdown tables")
    bench.add_argument("--plot", metavar="PATH", help="write a PNG bar chart of every method relative to the floor")
    bench.add_argument("--budget", type=float, default=0.5, help="seconds of timing per method and model")
    bench.add_argument("--train-batch", type=int, default=2, help="batch size of the training step; 0 skips it")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo

        run_demo(epochs=args.epochs, lr=args.lr, output=args.output, seed=args.seed)
    elif args.command == "bench":
        from .bench import run_bench

        run_bench(
            models=args.models.split(",") if args.models else None,
            device=args.device,
            dtype=args.dtype,
            channels_last=args.channels_last,
            as_json=args.json,
            plot=args.plot,
            budget_s=args.budget,
            train_batch=args.train_batch or None,
            ema_dtype=args.ema_dtype,
            ema_device=args.ema_device,
        )


if __name__ == "__main__":
    main()
