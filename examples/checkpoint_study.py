"""Checkpoint study on scikit-learn's digits (seed 000 sec. 6-8, Figures 2-4), at CPU scale.

Trains an MLP 64-128-128-10 (ReLU) with SGD for a few epochs, keeps a checkpoint per epoch,
and at every checkpoint compares on a few batches of 32 the updates of SGD, EF, iEF, F(1),
KFAC and FOOF with the exact natural gradient (damping 1e-7, as seed 000). Writes
``runs/checkpoint_study/rows.csv`` and ``study.png`` and prints the median ratios per
checkpoint and the rank correlation between imbalance and γ_EF/γ_SGD.

    pip install scikit-learn matplotlib
    python examples/checkpoint_study.py [--epochs 8] [--batches 4] [--output runs/checkpoint_study]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from natgrad.analysis import study


def digits_batches(batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Standardised digits (1797 x 64), shuffled once, in batches."""
    from sklearn.datasets import load_digits

    data = load_digits()
    inputs = torch.tensor(data.data, dtype=torch.float32)
    inputs = (inputs - inputs.mean(0)) / inputs.std(0).clamp_min(1e-6)
    targets = torch.tensor(data.target)
    order = torch.randperm(len(inputs), generator=torch.Generator().manual_seed(0))
    return list(zip(inputs[order].split(batch_size), targets[order].split(batch_size), strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batches", type=int, default=4, help="batches per checkpoint")
    parser.add_argument("--output", default="runs/checkpoint_study")
    args = parser.parse_args()
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)

    batches = digits_batches(32)
    model = nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
    )
    checkpoints = study.train_with_checkpoints(
        model, batches, F.cross_entropy, epochs=args.epochs, lr=0.05
    )
    model.double()
    checkpoints = [{k: v.double() for k, v in state.items()} for state in checkpoints]
    evaluation = [(x.double(), y) for x, y in batches[-args.batches :]]
    rows = study.checkpoint_study(model, checkpoints, evaluation, F.cross_entropy)
    study.write_rows(rows, output / "rows.csv")
    study.plot_study(rows, output / "study.png")

    methods = [k.removeprefix("gamma_ratio_") for k in rows[0] if k.startswith("gamma_ratio_")]
    print("median γ_method / γ_SGD per checkpoint (below 1: closer to NGD than SGD)")
    print("checkpoint " + " ".join(f"{m:>8s}" for m in methods))
    for index in range(len(checkpoints)):
        chosen = [r for r in rows if r["checkpoint"] == index]
        medians = [
            torch.tensor([r[f"gamma_ratio_{m}"] for r in chosen]).median().item() for m in methods
        ]
        print(f"{index:10d} " + " ".join(f"{v:8.3f}" for v in medians))
    correlation = study.rank_correlation(
        [r["imbalance"] for r in rows], [r["gamma_ratio_ef"] for r in rows]
    )
    print(
        f"Spearman correlation of imbalance and γ_EF/γ_SGD over {len(rows)} batches: "
        f"{correlation:.3f}"
    )
    print(f"wrote {output / 'rows.csv'} and {output / 'study.png'}")


if __name__ == "__main__":
    main()
