"""Posterior precision structures of :class:`natgrad.laplace.Laplace`, one part per block.

The posterior precision is ``Λ = diag(τ) + Σ_r g_r g_r^T`` (the curvature rows ``g_r`` of
:mod:`natgrad.laplace.rows`, ``τ`` the prior precision of every parameter), or an
approximation of it that is block-diagonal over *parts*; each part covers a set of flat
parameter indices and offers the same operations on its own precision ``Λ_b``:

* :meth:`sample`: draws ``ε ~ N(0, Λ_b^{-1})``;
* :meth:`covariance_times`: ``M Λ_b^{-1}`` for rows ``M``;
* :meth:`output_covariance`: ``J Λ_b^{-1} J^T`` per datapoint, for Jacobians ``J``;
* :meth:`log_det_ratio`: ``log det Λ_b - log det diag(τ_b)``, differentiable in ``τ``;
* :meth:`precision_matrix`: the dense ``Λ_b`` (small models and tests only).

Parts:

:class:`LowRankPart` (``structure="full"``: one part; ``"layer"``: one per module) keeps the
rows ``G`` (``R x p``) themselves while ``R <= p`` and samples by Benzing 2022 App. C
(eq. 7-14): with ``V = diag(τ)^{-1/2} G^T`` and ``U = I_R + V^T V``, ``x = y - V U^{-1}(V^T y +
z)`` for ``y ~ N(0, I_p)``, ``z ~ N(0, I_R)`` has covariance ``(I + V V^T)^{-1}``, so
``diag(τ)^{-1/2} x ~ N(0, Λ^{-1})``: time and memory linear in ``p`` for a fixed ``R``, no
``p x p`` matrix. ``log det Λ - log det diag(τ) = log det U`` (matrix-determinant lemma).
Once the rows outnumber the parameters (``R > p``) the part keeps ``G^T G`` instead (the
``p x p`` system is then the smaller one) and samples through its Cholesky factor.

:class:`DiagonalPart`: ``Λ_b = diag(τ + Σ_r g_r ⊙ g_r)``.

:class:`KroneckerPart` (``structure="kron"``, one per neuron-view layer): the layer's weight
matrix ``W`` (``d_out x d_in``, bias as an extra column) has curvature ``≈ B ⊗ A`` in the
row-major layout of ``W``, with KFAC's factors over the whole data set (the "expand"
convention of :mod:`natgrad.precond.kronecker`): ``A = 1/(D T) Σ_{n,t} a a^T`` (bias column
included; for ``nn.Embedding`` its diagonal, the token counts) and ``B = w Σ_{r,t} e e^T``.
With eigenvalues ``a_j`` of ``A`` and ``b_i`` of ``B`` the precision has the eigenvalues

=============  ==================================================================
``correct``    ``b_i a_j + τ`` (``B ⊗ A + τ I``)
``heuristic``  ``(b_i + τ_B)(a_j + τ_A)``, ``τ_A τ_B = τ``, ``τ_A / τ_B = mean(a) / mean(b)``
               (KFAC's heuristic split, Benzing 2022 eq. 2)
``a_only``     ``β a_j + τ`` with ``β = tr B / d_out`` (FOOF-like: ``B`` replaced by the
               multiple of ``I`` with the same trace)
=============  ==================================================================

in the eigenbasis ``Q_B ⊗ Q_A``, which all operations use (Benzing 2022 App. G).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from natgrad.adapters import LayerAdapter
from natgrad.laplace.predictive import output_covariance
from natgrad.precond.blocks import LayerBatch
from natgrad.precond.inverses import eigen, split_damping
from natgrad.precond.kronecker import input_covariance

KronDamping = Literal["correct", "heuristic", "a_only"]
KRON_DAMPINGS = ("correct", "heuristic", "a_only")


def _cholesky(matrix: Tensor, what: str) -> Tensor:
    factor, info = torch.linalg.cholesky_ex(matrix)
    if int(info) != 0:
        raise FloatingPointError(
            f"the {what} is not numerically positive definite (Cholesky failed at column "
            f"{int(info)}): raise the prior precision or fit in float64"
        )
    return factor


def _logdet_spd(matrix: Tensor, what: str) -> Tensor:
    return 2 * _cholesky(matrix, what).diagonal().log().sum()


class LowRankPart:
    """``Λ_b = diag(τ_b) + G^T G`` from the rows ``G`` themselves (Woodbury) or ``G^T G``.

    Parameters
    ----------
    index
        The part's flat parameter indices, ``(p,)``.
    max_entries
        The most numbers the part may keep (``min(R, p) * p``); beyond, :meth:`add` raises.
    """

    def __init__(self, index: Tensor, max_entries: int, capacity: int | None = None) -> None:
        self.index = index
        self.max_entries = max_entries
        self.capacity = capacity
        self._chunks: list[Tensor] = []  # the rows of G, one tensor per batch (never joined)
        self._num_rows = 0
        self._gram: Tensor | None = None  # G^T G once the rows outnumber the parameters
        self._cache: tuple[Tensor, Tensor] | None = None
        self._gram_eigenvalues: Tensor | None = None
        self._reservoir: Tensor | None = None  # (capacity, K, p) rows of the kept datapoints

    @property
    def size(self) -> int:
        return self.index.numel()

    @property
    def num_rows(self) -> int:
        return self._num_rows

    @property
    def woodbury(self) -> bool:
        """Whether the part solves in the ``R x R`` row space (``R <= p``)."""
        return self._gram is None

    def add(self, rows: Tensor) -> None:
        """Append weighted rows ``(r, p)``."""
        self._num_rows += rows.shape[0]
        kept = min(self._num_rows, self.size) * self.size
        if kept > self.max_entries:
            raise MemoryError(
                f"a low-rank Laplace block of {self.size} parameters with {self._num_rows} "
                f"curvature rows so far needs {kept} numbers (min(rows, parameters) x "
                f"parameters) beyond max_entries={self.max_entries}: use fisher='empirical' "
                "(one row per datapoint instead of one per class), smaller blocks "
                "(structure='layer', 'kron' or 'diag'), subsample=S datapoints, or raise "
                "max_entries"
            )
        if self._gram is not None:
            self._gram += rows.T @ rows
            return
        self._chunks.append(rows)
        if self._num_rows > self.size:  # the p x p system is now the smaller one
            self._gram = sum(chunk.T @ chunk for chunk in self._chunks)
            self._chunks.clear()

    def keep(self, rows: Tensor, num_datapoints: int, assignments: list[tuple[int, int]]) -> None:
        """Subsample mode: of the batch's rows ``(K N, p)`` (row ``k N + n``), store those of
        datapoint ``n`` in reservoir slot ``s`` for each ``(n, s)`` of ``assignments``."""
        per_datapoint = rows.reshape(-1, num_datapoints, self.size)
        if self._reservoir is None:
            kept = self.capacity * per_datapoint.shape[0] * self.size
            if kept > self.max_entries:
                raise MemoryError(
                    f"subsample={self.capacity} datapoints of {per_datapoint.shape[0]} rows "
                    f"and {self.size} parameters need {kept} numbers beyond max_entries="
                    f"{self.max_entries}: use a smaller subsample, fisher='empirical', another "
                    "structure, or raise max_entries"
                )
            self._reservoir = rows.new_zeros(self.capacity, per_datapoint.shape[0], self.size)
        for datapoint, slot in assignments:
            self._reservoir[slot] = per_datapoint[:, datapoint]

    def finish(self, dtype: torch.dtype, kept: int | None = None, scale: float = 1.0) -> None:
        """Settle the rows after the last batch; in subsample mode the first ``kept``
        reservoir slots, their rows multiplied by ``scale``."""
        if self._reservoir is not None:
            rows = self._reservoir[:kept].reshape(-1, self.size) * scale
            self._reservoir = None
            self.add(rows)
        if self._gram is None and not self._chunks:
            self._chunks.append(torch.zeros(0, self.size, dtype=dtype))

    # ------------------------------------------------------------------ products with G
    def _times_rows(self, matrix: Tensor) -> Tensor:
        """``M G^T`` for ``M`` ``(k, p)``: ``(k, R)``."""
        return torch.cat([matrix @ chunk.T for chunk in self._chunks], dim=1)

    def _rows_combination(self, coefficients: Tensor) -> Tensor:
        """``C G`` for ``C`` ``(k, R)``: ``(k, p)``."""
        result, start = None, 0
        for chunk in self._chunks:
            part = coefficients[:, start : start + chunk.shape[0]] @ chunk
            result = part if result is None else result + part
            start += chunk.shape[0]
        return result

    def _woodbury_matrix(self, prior: Tensor) -> Tensor:
        """``U = I + G diag(τ)^{-1} G^T`` (``R x R``), one chunk of ``G`` copied at a time."""
        inverse = 1 / prior
        rows = torch.cat([self._times_rows(chunk * inverse) for chunk in self._chunks])
        return torch.eye(self._num_rows, dtype=rows.dtype) + rows

    def precision_matrix(self, prior: Tensor) -> Tensor:
        if self._gram is not None:
            return torch.diag(prior) + self._gram
        return torch.diag(prior) + sum(chunk.T @ chunk for chunk in self._chunks)

    def _factor(self, prior: Tensor) -> Tensor:
        """The Cholesky factor of ``U`` (Woodbury form) or of ``Λ_b`` (``p x p`` form), kept
        for the last ``τ`` (sampling and predictions reuse it; the evidence, differentiated
        in ``τ``, does not)."""
        if self._cache is not None and torch.equal(self._cache[0], prior):
            return self._cache[1]
        prior = prior.detach()
        if self.woodbury:
            factor = _cholesky(self._woodbury_matrix(prior), "Woodbury system I + V^T V")
        else:
            factor = _cholesky(self.precision_matrix(prior), "posterior precision")
        self._cache = (prior.clone(), factor)
        return factor

    def sample(self, num: int, prior: Tensor, generator: torch.Generator | None) -> Tensor:
        factor = self._factor(prior)
        dtype = prior.dtype
        if not self.woodbury:
            noise = torch.randn(self.size, num, generator=generator, dtype=dtype)
            return torch.linalg.solve_triangular(factor.T, noise, upper=True).T
        root = prior.rsqrt()
        y = torch.randn(num, self.size, generator=generator, dtype=dtype)
        z = torch.randn(num, self._num_rows, generator=generator, dtype=dtype)
        # x = y - V U^{-1} (V^T y + z), V = diag(τ)^{-1/2} G^T; the sample is diag(τ)^{-1/2} x
        coefficients = torch.cholesky_solve((self._times_rows(y * root) + z).T, factor).T
        return (y - self._rows_combination(coefficients) * root) * root

    def covariance_times(self, matrix: Tensor, prior: Tensor) -> Tensor:
        factor = self._factor(prior)
        if not self.woodbury:
            return torch.cholesky_solve(matrix.T, factor).T
        # M Λ^{-1} = M D - M D G^T U^{-1} G D with D = diag(τ)^{-1}
        scaled = matrix / prior
        projected = torch.cholesky_solve(self._times_rows(scaled).T, factor).T
        return scaled - self._rows_combination(projected) / prior

    def output_covariance(self, jacobians: Tensor, prior: Tensor) -> Tensor:
        """``J Λ_b^{-1} J^T`` per datapoint for Jacobians ``(N, C, p)``: ``(N, C, C)``.

        In the Woodbury form ``J Λ_b^{-1} J^T = J D J^T - W U^{-1} W^T`` with ``D =
        diag(τ)^{-1}`` and ``W = J D G^T``, so ``G`` enters one product (``W``), not the two
        of :meth:`covariance_times`; ``U^{-1}`` is applied as ``(L^{-1} W^T)^T (L^{-1} W^T)``
        with the Cholesky factor ``L`` of ``U``."""
        if not self.woodbury:
            return output_covariance(jacobians, lambda rows: self.covariance_times(rows, prior))
        factor = self._factor(prior)
        num, outputs, size = jacobians.shape
        scaled = jacobians / prior
        projected = self._times_rows(scaled.reshape(num * outputs, size))
        whitened = torch.linalg.solve_triangular(factor, projected.T, upper=False)
        whitened = whitened.T.reshape(num, outputs, -1)
        prior_term = torch.einsum("ncp,ndp->ncd", scaled, jacobians)
        return prior_term - torch.einsum("ncr,ndr->ncd", whitened, whitened)

    def log_det_ratio(self, prior: Tensor) -> Tensor:
        if not self.woodbury:
            precision = self.precision_matrix(prior)
            return _logdet_spd(precision, "posterior precision") - prior.log().sum()
        return _logdet_spd(self._woodbury_matrix(prior), "Woodbury system I + V^T V")

    def log_det_ratio_uniform(self, prior: Tensor) -> Tensor:
        """:meth:`log_det_ratio` for one ``τ`` (a 0-dim tensor) over the whole part:
        ``Σ_i log(1 + λ_i / τ)`` over the eigenvalues ``λ`` of ``G G^T`` (Woodbury form) or
        ``G^T G``, which share their nonzero values. The eigenvalues are computed once, so
        each evaluation (e.g. of :meth:`Laplace.optimize_prior_precision`) costs ``min(R, p)``
        instead of a new ``R^2 p`` system and its factorisation."""
        if self._gram_eigenvalues is None:
            if self.woodbury:
                gram = torch.cat([self._times_rows(chunk) for chunk in self._chunks])
            else:
                gram = self._gram
            self._gram_eigenvalues = torch.linalg.eigvalsh(gram).clamp_min(0)
        return torch.log1p(self._gram_eigenvalues.to(prior.dtype) / prior).sum()


class DiagonalPart:
    """``Λ_b = diag(τ_b + d)``, ``d = Σ_r g_r ⊙ g_r`` the diagonal of the curvature."""

    def __init__(self, index: Tensor) -> None:
        self.index = index
        self.diagonal: Tensor | None = None

    def add(self, rows: Tensor) -> None:
        squares = rows.pow(2).sum(dim=0)
        self.diagonal = squares if self.diagonal is None else self.diagonal + squares

    def finish(self, dtype: torch.dtype) -> None:
        if self.diagonal is None:
            self.diagonal = torch.zeros(self.index.numel(), dtype=dtype)

    def precision_matrix(self, prior: Tensor) -> Tensor:
        return torch.diag(prior + self.diagonal)

    def sample(self, num: int, prior: Tensor, generator: torch.Generator | None) -> Tensor:
        noise = torch.randn(num, self.index.numel(), generator=generator, dtype=prior.dtype)
        return noise * (prior + self.diagonal).rsqrt()

    def covariance_times(self, matrix: Tensor, prior: Tensor) -> Tensor:
        return matrix / (prior + self.diagonal)

    def output_covariance(self, jacobians: Tensor, prior: Tensor) -> Tensor:
        """``J Λ_b^{-1} J^T`` per datapoint for Jacobians ``(N, C, p)``: ``(N, C, C)``."""
        return torch.einsum("ncp,ndp->ncd", jacobians / (prior + self.diagonal), jacobians)

    def log_det_ratio(self, prior: Tensor) -> Tensor:
        return torch.log1p(self.diagonal / prior).sum()


class KroneckerPart:
    """One neuron-view layer's Kronecker-factored precision (module docstring)."""

    def __init__(
        self, index: Tensor, module: nn.Module, adapter: LayerAdapter, has_bias: bool,
        damping: KronDamping,
    ) -> None:  # fmt: skip
        if damping not in KRON_DAMPINGS:
            raise ValueError(f"unknown kron_damping={damping!r}: choose one of {KRON_DAMPINGS}")
        self.index, self.module, self.adapter = index, module, adapter
        self.has_bias, self.damping = has_bias, damping
        self._input_sum: Tensor | None = None
        self._grad_sum: Tensor | None = None
        self._count = 0
        self.input_factor: Tensor | None = None
        self.grad_factor: Tensor | None = None

    def add(self, batch: LayerBatch, rows: Tensor, row_weight: float) -> None:
        """Fold in one batch: inputs ``A`` of the block, output-gradient rows ``(K, N, T, o)``."""
        positions = batch.inputs.shape[0] * batch.inputs.shape[1]
        # the batch's mean of a a^T (KFAC's own statistic) times its positions: the sum
        inputs = positions * input_covariance(self.adapter, self.module, batch.inputs, rows.dtype)
        flat = rows.reshape(-1, rows.shape[-1])
        grads = row_weight * (flat.T @ flat)
        if self._input_sum is None:
            self._input_sum, self._grad_sum = inputs, grads
        else:
            self._input_sum, self._grad_sum = self._input_sum + inputs, self._grad_sum + grads
        self._count += positions

    def finish(self, dtype: torch.dtype) -> None:
        if self._input_sum is None:
            raise RuntimeError(f"the layer {type(self.module).__name__} never took part in a loss")
        self.input_factor = self._input_sum / self._count
        self.grad_factor = self._grad_sum
        self._input_values, self._input_vectors = eigen(self.input_factor)
        self._grad_values, self._grad_vectors = eigen(self.grad_factor)

    # ------------------------------------------------------------------ layouts
    @property
    def shape(self) -> tuple[int, int]:
        """``(d_out, d_in [+1])`` of the layer matrix."""
        return self.grad_factor.shape[0], self.input_factor.shape[0]

    def _to_matrix(self, flat: Tensor) -> Tensor:
        """Flat parameter rows ``(k, p)`` (weight layout, then bias) as ``(k, d_out, d_in+1)``."""
        weight_size = self.module.weight.numel()
        weight = flat[:, :weight_size].reshape(-1, *self.module.weight.shape)
        matrix = self.adapter.to_matrix(self.module, weight)
        if self.has_bias:
            matrix = torch.cat([matrix, flat[:, weight_size:].unsqueeze(2)], dim=2)
        return matrix

    def _to_flat(self, matrix: Tensor) -> Tensor:
        """The inverse of :meth:`_to_matrix`."""
        weight = matrix[..., : matrix.shape[2] - int(self.has_bias)]
        weight = self.adapter.to_weight(self.module, weight).reshape(matrix.shape[0], -1)
        if self.has_bias:
            return torch.cat([weight, matrix[..., -1]], dim=1)
        return weight

    def eigenvalues(self, prior: Tensor) -> Tensor:
        """The precision's eigenvalues ``(d_out, d_in+1)`` in the Kronecker eigenbasis."""
        tau = prior[0]
        a, b = self._input_values, self._grad_values
        if self.damping == "correct":
            return b.unsqueeze(1) * a.unsqueeze(0) + tau
        if self.damping == "a_only":
            beta = b.sum() / b.numel()
            return beta * a.unsqueeze(0).expand(b.numel(), -1) + tau
        tau_a, tau_b = split_damping(a.mean(), b.mean(), tau)  # KFAC's heuristic split
        return (b + tau_b).unsqueeze(1) * (a + tau_a).unsqueeze(0)

    def _in_basis(self, matrix: Tensor, scale: Tensor) -> Tensor:
        """``Q_B ((Q_B^T M Q_A) ⊙ scale) Q_A^T`` for every ``M`` of ``(k, d_out, d_in+1)``."""
        rotated = self._grad_vectors.T @ matrix
        if self._input_vectors is not None:
            rotated = rotated @ self._input_vectors
        rotated = rotated * scale
        if self._input_vectors is not None:
            rotated = rotated @ self._input_vectors.T
        return self._grad_vectors @ rotated

    def precision_matrix(self, prior: Tensor) -> Tensor:
        eye = torch.eye(self.index.numel(), dtype=prior.dtype)
        return self._to_flat(self._in_basis(self._to_matrix(eye), self.eigenvalues(prior)))

    def sample(self, num: int, prior: Tensor, generator: torch.Generator | None) -> Tensor:
        noise = torch.randn(num, *self.shape, generator=generator, dtype=prior.dtype)
        scaled = noise * self.eigenvalues(prior).rsqrt()
        rotated = self._grad_vectors @ scaled
        if self._input_vectors is not None:
            rotated = rotated @ self._input_vectors.T
        return self._to_flat(rotated)

    def covariance_times(self, matrix: Tensor, prior: Tensor) -> Tensor:
        return self._to_flat(self._in_basis(self._to_matrix(matrix), 1 / self.eigenvalues(prior)))

    def output_covariance(self, jacobians: Tensor, prior: Tensor) -> Tensor:
        """``J Λ_b^{-1} J^T`` per datapoint for Jacobians ``(N, C, p)``: ``(N, C, C)``."""
        return output_covariance(jacobians, lambda rows: self.covariance_times(rows, prior))

    def log_det_ratio(self, prior: Tensor) -> Tensor:
        values = self.eigenvalues(prior)
        return values.log().sum() - values.numel() * prior[0].log()


Part = LowRankPart | DiagonalPart | KroneckerPart


__all__ = [
    "KRON_DAMPINGS",
    "DiagonalPart",
    "KronDamping",
    "KroneckerPart",
    "LowRankPart",
    "Part",
]
