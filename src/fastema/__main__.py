"""The `fastema` command line: `fastema demo` (and, later, more subcommands)."""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="fastema", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="train a small CNN on scikit-learn digits; raw vs EMA accuracy and a plot")
    demo.add_argument("--epochs", type=int, default=12)
    demo.add_argument("--lr", type=float, default=0.03)
    demo.add_argument("--output", default="demo_output/fastema-demo.png", help="where to write the PNG plot")
    demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo

        run_demo(epochs=args.epochs, lr=args.lr, output=args.output, seed=args.seed)


if __name__ == "__main__":
    main()
