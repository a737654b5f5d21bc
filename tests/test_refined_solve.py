"""Float32 Cholesky with float64 iterative refinement gives the float64 solve's answer.

Large float32 systems (the exact Fisher's ``N (C - 1)`` rows) are factorised in float32 and
refined in float64 (:func:`natgrad.linalg.refined_solve`); systems too ill-conditioned for
that go through the float64 factorisation. Both are checked against ``torch.linalg.solve`` of
the same system in float64.
"""

from __future__ import annotations

import pytest
import torch

from natgrad import linalg
from natgrad.linalg import damped_solve, refined_solve
from oracle import relative_error
from problems import make_mlp, make_targets, run_natgrad


def gram_system(size: int, rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A float32 Gram of rank ``rank`` (singular, like a Woodbury system) and a right-hand
    side."""
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randn(size, rank, generator=generator, dtype=torch.float32)
    matrix = rows @ rows.T / rank
    return matrix, torch.randn(size, generator=generator, dtype=torch.float32)


def oracle(matrix: torch.Tensor, rhs: torch.Tensor, damping: float) -> torch.Tensor:
    system = matrix.double() + damping * torch.eye(matrix.shape[0], dtype=torch.float64)
    return torch.linalg.solve(system, rhs.double())


def spy_refinements(monkeypatch) -> list[bool]:
    """Record, per call of refined_solve, whether it returned a solution."""
    results: list[bool] = []

    def spy(*args):
        solution = refined_solve(*args)
        results.append(solution is not None)
        return solution

    monkeypatch.setattr(linalg, "refined_solve", spy)
    return results


@pytest.mark.parametrize("damping", [1e-3, 1e-1])
def test_refined_float32_solve_matches_the_float64_solve(monkeypatch, damping):
    refined = spy_refinements(monkeypatch)
    matrix, rhs = gram_system(300, 200, 0)
    solution, report = damped_solve(matrix, rhs, damping)
    assert refined == [True]
    assert report.method == "cholesky"
    # the float64 answer, not a float32 one: far below float32's 1e-7
    expected = oracle(matrix, rhs, damping)
    target = rhs.double().unsqueeze(1)
    system64 = matrix.double()
    refined_solution = refined_solve(matrix, system64, target, damping)
    # the float64 solve's own accuracy at this conditioning (~5e3 / damping ratio), far below
    # the float32 factor's 1e-4
    assert relative_error(refined_solution.squeeze(1), expected) <= 1e-10
    assert relative_error(solution.double(), expected) <= 1e-7  # rounded to rhs's float32


def test_ill_conditioned_systems_are_solved_in_float64(monkeypatch):
    """Eigenvalues from 1 to 1e-9 and damping 1e-7: condition number ~1e7, beyond float32;
    the refinement gives up and the float64 factorisation answers exactly as without it."""
    refined = spy_refinements(monkeypatch)
    generator = torch.Generator().manual_seed(1)
    basis, _ = torch.linalg.qr(torch.randn(300, 300, generator=generator, dtype=torch.float64))
    matrix = ((basis * torch.logspace(0, -9, 300, dtype=torch.float64)) @ basis.T).float()
    rhs = torch.randn(300, generator=generator, dtype=torch.float32)
    solution, report = damped_solve(matrix, rhs, 1e-7)
    assert refined == [False]
    assert report.method == "cholesky"
    monkeypatch.setattr(linalg, "MIXED_MIN_SIZE", 10**9)
    alone, _ = damped_solve(matrix, rhs, 1e-7)
    assert torch.equal(solution, alone)
    assert relative_error(solution.double(), oracle(matrix, rhs, 1e-7)) <= 1e-6


def test_only_large_float32_systems_with_one_right_hand_side_are_refined(monkeypatch):
    refined = spy_refinements(monkeypatch)
    matrix, rhs = gram_system(300, 200, 2)
    damped_solve(matrix.double(), rhs.double(), 1e-2)  # float64: solved in float64
    damped_solve(matrix, torch.stack([rhs, rhs], dim=1), 1e-2)  # several right-hand sides
    damped_solve(matrix[:100, :100], rhs[:100], 1e-2)  # below MIXED_MIN_SIZE
    assert refined == []


def test_exact_fisher_update_with_refined_solves_matches_float64_solves(monkeypatch):
    """A float32 exact-Fisher step whose system is refined (MIXED_MIN_SIZE lowered to 1)
    writes the update of the float64 solve, to float32 rounding of the solution."""
    refined = spy_refinements(monkeypatch)
    updates = []
    for size in (1, 10**9):
        monkeypatch.setattr(linalg, "MIXED_MIN_SIZE", size)
        torch.manual_seed(0)
        model, inputs = make_mlp(3)
        model.float()
        update, _ = run_natgrad(
            model, inputs.float(), make_targets("categorical", inputs.shape[0], 3),
            "categorical", "mean", fused=True, fisher="exact", damping=1e-2,
        )  # fmt: skip
        updates.append(update.double())
    assert refined == [True]
    assert relative_error(updates[0], updates[1]) <= 1e-6
