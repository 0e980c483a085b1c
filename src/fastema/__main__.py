"""The `fastema` command line: `fastema demo`, `fastema bench` and `fastema posthoc`."""

from __future__ import annotations

import argparse
from pathlib import Path

from .bench import DTYPES, MODELS  # models are built lazily: this imports neither timm nor transformers


def build_parser() -> argparse.ArgumentParser:
    """The command line's parser (the GPU check's dry run parses its bench commands with it)."""
    parser = argparse.ArgumentParser(prog="fastema", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="train a small CNN on scikit-learn digits; raw vs EMA accuracy and a plot")
    demo.add_argument("--epochs", type=int, default=12)
    demo.add_argument("--lr", type=float, default=0.03)
    demo.add_argument("--output", default="demo_output/fastema-demo.png", help="where to write the PNG plot")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--posthoc", action="store_true", help="post-hoc EMA: snapshots, then a sweep over sigma_rel")
    posthoc = commands.add_parser(
        "posthoc", help="synthesize post-hoc EMAs of chosen lengths from a snapshot directory"
    )
    posthoc.add_argument("snapshot_dir", help="the directory PostHocEMA wrote its snapshots to")
    posthoc.add_argument("--sigma-rel", required=True, help="comma-separated relative EMA widths, e.g. 0.05,0.08")
    posthoc.add_argument("--step", type=int, help="the snapshot step to synthesize at (default: the last)")
    posthoc.add_argument("--out", required=True, help="where to write the state dicts (one .pt per sigma_rel)")
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
    bench.add_argument(
        "--peers", action="store_true", help="also time the installed peer libraries (pip install fastema[bench])"
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo, run_posthoc_demo

        run = run_posthoc_demo if args.posthoc else run_demo
        try:
            run(epochs=args.epochs, lr=args.lr, output=args.output, seed=args.seed)
        except ImportError as error:
            if "fastema[demo]" not in str(error):
                raise
            raise SystemExit(str(error)) from None  # the message says what to install; a traceback adds nothing
    elif args.command == "posthoc":
        write_synthesized(args.snapshot_dir, args.sigma_rel, args.step, args.out)
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
            peers=args.peers,
        )


def write_synthesized(snapshot_dir: str, sigma_rels: str, step: int | None, out: str) -> list[Path]:
    """`fastema posthoc`: one state dict per sigma_rel, written atomically to `out`."""
    from .core.checkpoint import atomic_save
    from .posthoc.profiles import check_sigma_rel
    from .posthoc.snapshots import synthesize

    try:  # every value checked before anything is written
        values = [check_sigma_rel(float(value), "--sigma-rel") for value in sigma_rels.split(",")]
    except ValueError as error:
        raise SystemExit(
            f"Invalid --sigma-rel: {sigma_rels!r}; expected comma-separated floats in (0, 0.2887) such as 0.05,0.08"
        ) from error
    try:
        synthesized = [synthesize(snapshot_dir, sigma_rel, step) for sigma_rel in values]
    except (OSError, ValueError, RuntimeError) as error:  # a missing or mixed directory, a bad step, a damaged file
        raise SystemExit(f"fastema posthoc: {error}") from error
    paths = []
    for sigma_rel, state in zip(values, synthesized):
        path = Path(out) / f"posthoc-sigma{sigma_rel:g}{'' if step is None else f'-step{step}'}.pt"
        atomic_save(state, path)
        paths.append(path)
        print(f"sigma_rel {sigma_rel:g}: {path}")
    return paths


if __name__ == "__main__":
    main()
