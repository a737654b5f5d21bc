"""Fit and sampling time and peak memory of the full Laplace posterior vs the parameter count.

Purpose
-------
Compare natgrad's full-covariance Laplace posterior (``natgrad.Laplace(structure="full")``:
the exact-Fisher rows ``G`` of the data set kept as they are, samples by the Woodbury form of
Benzing 2022 App. C) with a dense ``P x P`` Laplace posterior built from the same rows
(``Λ = τ I + G^T G`` formed, then its Cholesky factor, then triangular solves), on an MLP
``20-h-h-10`` (tanh, float64) whose width ``h`` sets ``P``, with ``D`` random datapoints
(``R = 10 D`` rows). Both fit the same curvature; the dense one is what a library that forms
the ``P x P`` matrix does.

Run ``python benchmarks/laplace_scaling.py`` (a few minutes). Options: ``--widths`` (default
``16 32 64 128 256 512``), ``--datapoints`` (``D``, default 50), ``--samples`` (default 100),
``--dense-max`` (the largest ``P`` given to the dense posterior, default 40000: ``P^2`` float64
numbers are 12.8 GB at ``P = 40000``) and ``--json PATH``. It prints a table and checks
nothing.

Each (method, width) runs in a fresh subprocess (this script with ``--worker``). ``fit s`` is
the wall-clock time of ``Laplace.fit`` plus, for the dense posterior, forming ``Λ`` and its
Cholesky factor; ``sample s`` the time to draw ``--samples`` samples; ``peak MiB`` the increase
of the process's resident-memory high-water mark (``ru_maxrss``) over fitting and sampling.
On a busy machine the times are indicative only.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch
from torch import nn

import natgrad


def max_rss_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024**2 if sys.platform == "darwin" else peak / 1024


def make_problem(width: int, datapoints: int):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(20, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 10)
    )
    inputs, targets = torch.randn(datapoints, 20), torch.randint(0, 10, (datapoints,))
    return model, list(zip(inputs.split(25), targets.split(25), strict=True))


def worker(method: str, width: int, datapoints: int, samples: int) -> dict:
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(int(os.environ.get("NATGRAD_THREADS", "2")))
    model, loader = make_problem(width, datapoints)
    size = sum(p.numel() for p in model.parameters())
    baseline = max_rss_mib()
    start = time.perf_counter()
    la = natgrad.Laplace(model, fisher="exact", structure="full", max_entries=2**40).fit(loader)
    part = la.parts[0]
    if method == "dense":
        precision = la.posterior_precision()  # τ I + G^T G, P x P
        factor = torch.linalg.cholesky(precision)
        del precision
    fit_seconds = time.perf_counter() - start
    start = time.perf_counter()
    if method == "dense":
        noise = torch.randn(size, samples)
        draws = la.mean + torch.linalg.solve_triangular(factor.T, noise, upper=True).T
    else:
        draws = la.sample(samples)
    sample_seconds = time.perf_counter() - start
    assert draws.shape == (samples, size)
    return {
        "method": method,
        "width": width,
        "P": size,
        "rows": part.num_rows,
        "woodbury": part.woodbury,
        "fit_s": fit_seconds,
        "sample_s": sample_seconds,
        "peak_mib": max_rss_mib() - baseline,
    }


def run_worker(method: str, width: int, datapoints: int, samples: int) -> dict:
    command = [
        sys.executable, __file__, "--worker", method, "--widths", str(width),
        "--datapoints", str(datapoints), "--samples", str(samples),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        return {"method": method, "width": width, "error": result.stderr.strip()[-500:]}
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[16, 32, 64, 128, 256, 512])
    parser.add_argument("--datapoints", type=int, default=50)
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--dense-max", type=int, default=40000)
    parser.add_argument("--json")
    parser.add_argument("--worker")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.widths[0], args.datapoints, args.samples)))
        return
    print(f"load average at start: {os.getloadavg()[0]:.1f} ({os.cpu_count()} CPUs)")
    print("| method | width | P | rows R | fit s | sample s | peak RSS increase MiB |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for width in args.widths:
        size = 20 * width + width + width * width + width + 10 * width + 10
        for method in ("woodbury", "dense"):
            if method == "dense" and size > args.dense_max:
                continue
            row = run_worker(method, width, args.datapoints, args.samples)
            rows.append(row)
            if "error" in row:
                print(f"| {method} | {width} | {size} | error: {row['error'][-120:]} |")
                continue
            print(
                f"| {method} | {width} | {row['P']} | {row['rows']} | {row['fit_s']:.3f} | "
                f"{row['sample_s']:.3f} | {row['peak_mib']:.0f} |",
                flush=True,
            )
    print(f"load average at end: {os.getloadavg()[0]:.1f}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    main()
