"""R7 and R8 (Garcia et al. 2023's claims) with other seeds at the configurations a previous run
selected, without tuning again: is the verdict the same with other seeds?

Run ``python benchmarks/fishleg_claims_other_seeds.py SOURCE OUTPUT SEED...``, with ``SOURCE``
the ``--output`` directory of ``natgrad reproduce R7 R8`` (its ``R7.json`` and ``R8.json``
give the selected hyper-parameters, ``Q₀`` is derived again from SGDm's learning rate as the
claims do) and ``OUTPUT`` the directory for the new findings, e.g.
``python benchmarks/fishleg_claims_other_seeds.py runs/fishleg012 runs/fishleg345 3 4 5``.
One torch thread; prints each finding as ``natgrad reproduce`` does.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from natgrad.lab.reproduce.fishleg_claims import r7_deep_linear, r8_autoencoder
from natgrad.lab.runner import torch_threads

DERIVED = {"init_scale"}  # from SGDm's learning rate, as in the claims


def one_point(hyper: dict[str, Any]) -> dict[str, list[Any]]:
    """A grid holding only ``hyper`` (without the derived keys)."""
    return {key: [value] for key, value in hyper.items() if key not in DERIVED}


def main() -> None:
    source, output = Path(sys.argv[1]), Path(sys.argv[2])
    seeds = tuple(int(seed) for seed in sys.argv[3:])
    r7 = json.loads((source / "R7.json").read_text())["numbers"]
    grids = {label: one_point(run["hyper"]) for label, run in r7["4000 samples"]["runs"].items()}
    small = {label: one_point(run["hyper"]) for label, run in r7["40 samples"]["runs"].items()}
    if grids != small:
        raise SystemExit("R7's regimes selected different configurations: run them apart")
    r8 = json.loads((source / "R8.json").read_text())["numbers"]
    r8_grids = {
        label: one_point(r8[label]["hyper"]) for label in ("sgdm", "adam", "kfac", "fishleg")
    }
    with torch_threads(1):
        for claim, grid in ((r7_deep_linear, grids), (r8_autoencoder, r8_grids)):
            start = time.time()
            finding = claim(output, seeds=seeds, grids=grid)
            finding.seconds = time.time() - start
            finding.save(output)
            print(finding.report(), flush=True)


if __name__ == "__main__":
    main()
