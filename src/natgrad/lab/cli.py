"""The ``natgrad`` command line: ``bench``, ``sweep``, ``reproduce``, ``laplace``, ``field``,
``analyze``.

``natgrad bench`` trains every chosen method over its hyper-parameter grid and seeds on one
task, selects each method's best configuration by final training loss (as the papers do), and
writes the runs (``runs.json``, ``runs.csv``), a markdown summary (``summary.md``) and loss
curves (``curves.png``). Under ``torchrun --nproc_per_node R`` the R processes split every
global batch and train one model (natgrad's distributed mode; first-order methods average
their gradients); rank 0 writes the results; ``natgrad sweep`` likewise trains each grid point
with all ranks, rank 0 keeping the study. The default compares SGD, Adam, KFAC, FOOF, EF,
iEF and exact NGD on an MLP on MNIST-1D (generated offline) in a few minutes on 2 CPU cores.

Examples::

    natgrad bench
    natgrad bench --task digits-mlp --methods sgd ief kfac --seeds 0 1 2 --epochs 10
    natgrad bench --methods sgd kfac --grid '{"kfac": {"lr": [0.01, 0.1], "damping": [0.001]}}'
    torchrun --standalone --nproc_per_node 2 -m natgrad.lab.cli bench --task digits-mlp
    torchrun --standalone --nproc_per_node 2 -m natgrad.lab.cli sweep --task digits-mlp
    natgrad laplace --dataset mnist5k
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from natgrad.lab.registry import REGISTRY
from natgrad.lab.reproduce import CLAIMS, cpu_seconds
from natgrad.lab.reproduce.laplace_claims import DATASET_FISHER, laplace_comparison
from natgrad.lab.runner import (
    TASKS,
    Task,
    best_runs,
    get_task,
    plot_curves,
    summary_table,
    sweep,
    torch_threads,
    write_csv,
)

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
    bench.add_argument(
        "--threads", type=int, help="torch threads per run (default: 1 for models below "
        "1M parameters, whose runs a second thread slows down on a busy machine; else torch's)",
    )  # fmt: skip
    bench.add_argument("--output", default="runs/bench", help="directory for the results")

    sweep = commands.add_parser(
        "sweep",
        help="resumable grid search through Optuna (SQLite by default), parallel workers",
        description=(
            "Like bench, but each (task, method) is an Optuna study in --storage: an "
            "interrupted sweep resumes where it stopped, and several processes (--workers, or "
            "the same command started again elsewhere) share the grid. For several machines, "
            "point --storage at a database server they all reach, e.g. "
            "postgresql://user@host/natgrad."
        ),
    )
    sweep.add_argument("--task", default="mnist1d-mlp", choices=sorted(TASKS))
    sweep.add_argument(
        "--methods", nargs="+", default=list(DEFAULT_METHODS), choices=sorted(REGISTRY),
        metavar="METHOD",
    )  # fmt: skip
    sweep.add_argument("--seeds", nargs="+", type=int, default=[0])
    sweep.add_argument("--epochs", type=int, help="override the task's number of epochs")
    sweep.add_argument("--storage", default="sqlite:///runs/sweep.db", help="Optuna storage URL")
    sweep.add_argument("--workers", type=int, default=1, help="processes per method")
    sweep.add_argument("--output", default="runs/sweep", help="directory for the summary")

    reproduce = commands.add_parser(
        "reproduce",
        help="re-run the papers' findings (R1-R13) and print a verdict for each",
        description="Each claim runs at CPU scale, writes its figures and <CLAIM>.json into "
        "--output, and gets a verdict (reproduced / partly / not reproduced) from sub-claims "
        "decided by rules fixed in natgrad.lab.reproduce; docs/reproduction.md explains each. "
        "Claims: " + "; ".join(f"{c.name}: {c.summary}" for c in CLAIMS.values()),
    )
    reproduce.add_argument("claims", nargs="*", metavar="CLAIM", help="e.g. R1 R5")
    reproduce.add_argument("--all", action="store_true", help="run every claim")
    reproduce.add_argument(
        "--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds of the training claims"
    )
    reproduce.add_argument(
        "--full", action="store_true", help="the paper's original scale where the data exist"
    )
    reproduce.add_argument(
        "--data-dir", help="directory of user-provided data (Fashion-MNIST IDX files for --full)"
    )
    reproduce.add_argument("--output", default="runs/reproduce", help="directory for results")

    laplace = commands.add_parser(
        "laplace",
        help="Laplace posteriors (full, Kronecker, diagonal) vs the MAP: NLL, ECE, OOD",
        description="Trains an MLP to a MAP, fits natgrad.Laplace over the training set in the "
        "structures full (Woodbury, Benzing 2022 App. C), kron (correct and heuristic damping, "
        "A-only) and diag, sets each prior precision by the marginal likelihood, and compares "
        "them with the MAP on held-out NLL, accuracy, calibration (ECE, reliability diagram) "
        "and OOD detection (test inputs with shuffled features), with Benzing 2022 App. G's "
        "two checks. `natgrad reproduce R13` is this command on digits.",
    )
    laplace.add_argument("--dataset", default="digits", choices=sorted(DATASET_FISHER))
    laplace.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    laplace.add_argument("--hidden", type=int, default=32, help="width of the hidden layer")
    laplace.add_argument("--epochs", type=int, default=40, help="Adam epochs to the MAP")
    laplace.add_argument("--samples", type=int, default=100, help="networks per predictive")
    laplace.add_argument("--output", default="runs/laplace", help="directory for the results")

    field = commands.add_parser(
        "field",
        help="vector fields and quadratic models of Kunstner et al. 2019's two-parameter problems",
        description="GD, NGD, iEF and EF vector fields of the paper's linear regression, computed "
        "by natgrad's preconditioners, with trajectories from the paper's four starts, and the "
        "Fisher / empirical-Fisher quadratic models of its logistic regressions.",
    )
    field.add_argument("--output", default="runs/field", help="directory for the PNG files")
    field.add_argument("--steps", type=int, default=50_000, help="trajectory length (the paper's)")
    field.add_argument("--grid", type=int, default=15, help="arrows per axis")

    analyze = commands.add_parser(
        "analyze",
        help="checkpoint study: γ ratios, cosines and imbalance along an SGD run",
        description="Trains an MLP with SGD, keeps a checkpoint per epoch and compares, on a "
        "few batches per checkpoint, the updates of SGD, EF, iEF, F(1), KFAC and FOOF with the "
        "exact natural gradient (Wu et al. 2024, Figures 2-4).",
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
        from natgrad.lab.reports import field_report

        print("\n".join(field_report(args.output, args.steps, args.grid)))
        print(f"wrote {args.output}/regression_fields.png and logistic_quadratics.png")
        return 0
    if args.command == "analyze":
        from natgrad.lab.reports import checkpoint_report

        lines, _ = checkpoint_report(args.output, args.dataset, args.epochs, args.batches)
        print("\n".join(lines))
        print(f"wrote {args.output}/rows.csv and study.png")
        return 0
    if args.command == "reproduce":
        return _reproduce(args)
    if args.command == "laplace":
        return _laplace(args)
    if args.command == "sweep":
        return _sweep(args)
    return _bench(args)


def _task(args: argparse.Namespace) -> Task:
    task = get_task(args.task)
    if args.epochs is not None:
        if args.epochs < 1:
            raise SystemExit("--epochs must be >= 1")
        task = replace(task, epochs=args.epochs)
    return task


def _report(task: Task, runs: list, output: Path) -> None:
    """Write runs.json, summary.md and curves.png for the best configurations."""
    output.mkdir(parents=True, exist_ok=True)
    (output / "runs.json").write_text(json.dumps(runs, indent=1))
    write_csv(runs, output / "runs.csv")
    best = best_runs(runs)
    table = summary_table(best)
    (output / "summary.md").write_text(f"# {task.name}\n\n{table}\n")
    print(table)
    try:
        plot_curves(best, output / "curves.png")
    except ImportError:
        print("matplotlib is not installed: no curves.png (pip install natgrad[plots])")
    print(f"wrote {output / 'runs.json'}, {output / 'runs.csv'}, {output / 'summary.md'}")


def _sweep(args: argparse.Namespace) -> int:
    """``natgrad sweep``."""
    from natgrad.lab.sweep import collect_runs, run_parallel, run_sweep

    task = _task(args)
    if args.workers > 1 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise SystemExit(
            "--workers starts independent processes; under torchrun the ranks already train "
            "each grid point together: drop --workers (or run without torchrun)"
        )
    with _process_group() as rank:
        if rank == 0 and args.storage.startswith("sqlite:///"):
            path = Path(args.storage.removeprefix("sqlite:///"))
            path.parent.mkdir(parents=True, exist_ok=True)
        for method in args.methods:
            if args.workers > 1:
                run_parallel(task, method, args.seeds, args.storage, args.workers)
            else:
                run_sweep(task, method, args.seeds, args.storage)
            if rank == 0:
                print(f"{task.name} {method}: grid done")
        if rank == 0:
            _report(task, collect_runs(task, args.methods, args.storage), Path(args.output))
    return 0


def _reproduce(args: argparse.Namespace) -> int:
    """``natgrad reproduce``."""
    from natgrad.lab.reproduce import MissingDataError, run_claim, summary_table

    names = list(CLAIMS) if args.all else args.claims
    if not names:
        raise SystemExit(f"name the claims to run ({', '.join(CLAIMS)}) or pass --all")
    unknown = [name for name in names if name not in CLAIMS]
    if unknown:
        raise SystemExit(f"unknown claims {unknown}: choose from {', '.join(CLAIMS)}")
    findings = []
    for name in names:
        print(f"{name}: {CLAIMS[name].summary} ...", flush=True)
        try:
            finding = run_claim(name, args.output, args.seeds, args.full, args.data_dir)
        except (MissingDataError, FileNotFoundError) as error:
            raise SystemExit(f"{name}: {error}") from error
        print(finding.report(), flush=True)
        findings.append(finding)
    table = summary_table(findings)
    Path(args.output, "summary.md").write_text(table + "\n")
    print(table)
    print(f"wrote {args.output}/summary.md and one JSON per claim")
    return 0


def _laplace(args: argparse.Namespace) -> int:
    """``natgrad laplace``."""
    name = f"laplace-{args.dataset}"
    start, cpu_start = time.perf_counter(), cpu_seconds()
    with torch_threads(1):
        finding = laplace_comparison(
            Path(args.output), args.dataset, args.seeds, args.epochs, args.samples, args.hidden,
            claim=name,
        )
    finding.seconds = time.perf_counter() - start
    finding.cpu_seconds = cpu_seconds() - cpu_start
    finding.save(args.output)
    print(finding.report())
    print(f"wrote {args.output}/{name}.json and {name}_reliability.png")
    return 0


def _bench(args: argparse.Namespace) -> int:
    """``natgrad bench``."""
    task = _task(args)
    grids = None
    if args.grid:
        try:
            grids = json.loads(args.grid)
        except json.JSONDecodeError as error:
            raise SystemExit(f"--grid is not valid JSON: {error}") from error
    with _process_group() as rank:
        quiet = None if rank == 0 else (lambda line: None)
        if args.threads is not None and args.threads < 1:
            raise SystemExit(f"--threads must be >= 1, got {args.threads}")
        runs = sweep(task, args.methods, args.seeds, grids, progress=quiet, threads=args.threads)
        if rank == 0:
            _report(task, runs, Path(args.output))
    return 0


@contextmanager
def _process_group() -> Iterator[int]:
    """Under ``torchrun`` (``WORLD_SIZE`` > 1): a gloo process group for the block, whose rank
    is yielded; otherwise rank 0 and no group."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield 0
        return
    import torch.distributed as dist

    dist.init_process_group("gloo")
    try:
        yield dist.get_rank()
    finally:
        dist.barrier()
        dist.destroy_process_group()
        # free the group's last native objects while the interpreter is alive: under load, a
        # rank whose objects were left to interpreter shutdown aborted there about once in
        # eight runs ("terminate called without an active exception", no Python frame)
        gc.collect()


if __name__ == "__main__":
    raise SystemExit(main())
