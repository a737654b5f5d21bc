"""The ``natgrad`` command line: ``bench``, ``field`` and ``analyze``.

``natgrad bench`` trains every chosen method over its hyper-parameter grid and seeds on one
task, selects each method's best configuration by final training loss (as the seeds do), and
writes the runs (``runs.json``), a markdown summary (``summary.md``) and loss curves
(``curves.png``). The default compares SGD, Adam, KFAC, FOOF, EF, iEF and exact NGD on an MLP
on MNIST-1D (generated offline) in a few minutes on 2 CPU cores.

Examples::

    natgrad bench
    natgrad bench --task digits-mlp --methods sgd ief kfac --seeds 0 1 2 --epochs 10
    natgrad bench --methods sgd kfac --grid '{"kfac": {"lr": [0.01, 0.1], "damping": [0.001]}}'
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from natgrad.bench.registry import REGISTRY
from natgrad.bench.runner import TASKS, best_runs, get_task, plot_curves, summary_table, sweep

DEFAULT_METHODS = ("sgd", "adam", "kfac", "foof", "ef", "ief", "ngd")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``natgrad``."""
    parser = argparse.ArgumentParser(
        prog="natgrad",
        description="Natural-gradient benchmarks and analyses.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    bench = commands.add_parser(
        "bench",
        help="compare optimisers on a task (grid search, seeds, table and plots)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench.add_argument("--task", default="mnist1d-mlp", choices=sorted(TASKS))
    bench.add_argument(
        "--methods", nargs="+", default=list(DEFAULT_METHODS), choices=sorted(REGISTRY),
        metavar="METHOD", help=f"methods to compare (default: {' '.join(DEFAULT_METHODS)}; "
        f"available: {', '.join(sorted(REGISTRY))})",
    )  # fmt: skip
    bench.add_argument("--seeds", nargs="+", type=int, default=[0], help="random seeds")
    bench.add_argument("--epochs", type=int, help="override the task's number of epochs")
    bench.add_argument(
        "--grid", help='JSON replacing methods\' grids, e.g. \'{"sgd": {"lr": [0.1]}}\''
    )
    bench.add_argument("--output", default="runs/bench", help="directory for the results")

    field = commands.add_parser(
        "field",
        help="vector fields and quadratic models of seed 002's two-parameter problems",
        description="GD, NGD, iEF and EF vector fields of the seed's linear regression, computed "
        "by natgrad's preconditioners, with trajectories from the seed's four starts, and the "
        "Fisher / empirical-Fisher quadratic models of its logistic regressions.",
    )
    field.add_argument("--output", default="runs/field", help="directory for the PNG files")
    field.add_argument("--steps", type=int, default=50_000, help="trajectory length (seed)")
    field.add_argument("--grid", type=int, default=15, help="arrows per axis")

    analyze = commands.add_parser(
        "analyze",
        help="checkpoint study: γ ratios, cosines and imbalance along an SGD run",
        description="Trains an MLP with SGD, keeps a checkpoint per epoch and compares, on a "
        "few batches per checkpoint, the updates of SGD, EF, iEF, F(1), KFAC and FOOF with the "
        "exact natural gradient (seed 000, Figures 2-4).",
    )
    analyze.add_argument("--dataset", default="digits", help="a classification dataset")
    analyze.add_argument("--epochs", type=int, default=8)
    analyze.add_argument("--batches", type=int, default=4, help="batches per checkpoint")
    analyze.add_argument("--output", default="runs/analyze", help="directory for the results")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.command == "field":
        from natgrad.analysis.reports import field_report

        print("\n".join(field_report(args.output, args.steps, args.grid)))
        print(f"wrote {args.output}/regression_fields.png and logistic_quadratics.png")
        return 0
    if args.command == "analyze":
        from natgrad.analysis.reports import checkpoint_report

        print("\n".join(checkpoint_report(args.output, args.dataset, args.epochs, args.batches)))
        print(f"wrote {args.output}/rows.csv and study.png")
        return 0
    return _bench(args)


def _bench(args: argparse.Namespace) -> int:
    """``natgrad bench``."""
    task = get_task(args.task)
    if args.epochs is not None:
        if args.epochs < 1:
            raise SystemExit("--epochs must be >= 1")
        task = replace(task, epochs=args.epochs)
    grids = None
    if args.grid:
        try:
            grids = json.loads(args.grid)
        except json.JSONDecodeError as error:
            raise SystemExit(f"--grid is not valid JSON: {error}") from error
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    runs = sweep(task, args.methods, args.seeds, grids)
    (output / "runs.json").write_text(json.dumps(runs, indent=1))
    best = best_runs(runs)
    table = summary_table(best)
    (output / "summary.md").write_text(f"# {task.name}\n\n{table}\n")
    print(table)
    try:
        plot_curves(best, output / "curves.png")
    except ImportError:
        print("matplotlib is not installed: no curves.png (pip install natgrad[plots])")
    print(f"wrote {output / 'runs.json'}, {output / 'summary.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
