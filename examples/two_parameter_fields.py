"""Vector fields and quadratic models of the two-parameter problems (seed 002 Fig. 1-2).

Writes ``docs/images/regression_fields.png`` (GD, NGD = iEF and EF fields with the seed's four
trajectories) and ``docs/images/logistic_quadratics.png`` (Fisher vs empirical-Fisher quadratic
models at the minimum), and prints how closely the NGD and iEF arrows agree.

    python examples/two_parameter_fields.py [--output docs/images] [--steps 50000]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from natgrad.analysis import fields


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="docs/images")
    parser.add_argument("--steps", type=int, default=50_000, help="trajectory length (seed: 50000)")
    parser.add_argument("--grid", type=int, default=15, help="arrows per axis")
    args = parser.parse_args()
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)

    x, y = fields.regression_data()
    theta0 = torch.linspace(-1.0, 5.0, args.grid, dtype=torch.float64)
    theta1 = torch.linspace(-1.0, 5.0, args.grid, dtype=torch.float64)
    vector_fields = fields.regression_vector_fields(x, y, theta0, theta1)
    agreement = vector_fields.cosine("ngd", "ief")
    print(
        f"NGD vs iEF arrows on {agreement.numel()} grid points: cosine min "
        f"{agreement.min().item():.15f}, max |1 - cos| {(1 - agreement).abs().max().item():.2e}"
    )
    distortion = vector_fields.cosine("ngd", "ef")
    print(
        f"NGD vs EF arrows: cosine median {distortion.median().item():.3f}, "
        f"min {distortion.min().item():.3f}"
    )
    trajectories = {
        method: [
            fields.regression_trajectory(method, start, x, y, steps=args.steps)
            for start in fields.REGRESSION_STARTS
        ]
        for method in ("gd", "ngd", "ef")
    }
    for method, lines in trajectories.items():
        ends = ", ".join(f"({p[-1, 0]:.2f}, {p[-1, 1]:.2f})" for p in lines)
        print(f"{method} trajectories end at {ends} (minimum near (2, 2))")
    fields.plot_regression_fields(
        vector_fields, x, y, trajectories, str(output / "regression_fields.png")
    )

    quadratics = {}
    for name in fields.LOGISTIC_DATASETS:
        data_x, data_y = fields.logistic_data(name)
        quadratics[name] = fields.logistic_quadratic_models(data_x, data_y)
        fisher, empirical = quadratics[name].fisher, quadratics[name].empirical_fisher
        gap = ((fisher - empirical).norm() / fisher.norm()).item()
        print(f"logistic {name}: ||F - EF|| / ||F|| = {gap:.3f} at the minimum")
    fields.plot_quadratic_models(quadratics, str(output / "logistic_quadratics.png"))
    print(f"wrote {output / 'regression_fields.png'} and {output / 'logistic_quadratics.png'}")


if __name__ == "__main__":
    main()
