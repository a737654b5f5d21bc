"""Linear algebra of the neuron view: Gram matrices, ``J v``, ``J^T u`` and damped solves.

One layer is described by its inputs ``A`` of shape ``(N, T, d_in)`` and ``K`` sets of output
gradients ``E`` of shape ``(K, N, T, d_out)``; datapoint ``(k, n)`` has the gradient
``g_{kn} = sum_t e_{knt} a_{nt}^T`` (plus ``sum_t e_{knt}`` for the bias). Rows of ``J`` are
ordered ``k``-major: row ``k N + n``.

For a dense layer (``T = 1``) the Gram matrix is ``(A A^T) ⊙ (E E^T)`` (Shrestha 2023, eq. 41;
Benzing 2022 App. I eq. 21), ``J v`` is the row sum of ``(A V^T) ⊙ E`` (Shrestha 2023, eq. 42)
and ``J^T u`` is ``E^T diag(u) A`` (Shrestha 2023, eq. 43): nothing of size ``N x P`` is formed.

For weight-shared layers (``T > 1``: sequences, convolutions) two forms exist and
:func:`gram` picks the cheaper per call:

* pairwise: ``G[kn, jm] = sum_{t,s} (a_{nt}·a_{ms}) (e_{knt}·e_{jms})``, costing about
  ``N^2 T^2 (d_in + K_b d_out) + K_a K_b N^2 T d_out`` flops;
* materialised: form the ``(K_a + K_b) N`` per-datapoint gradients (``d_out x d_in`` each) and
  multiply them, about ``(K_a + K_b) N T d_in d_out + K_a K_b N^2 d_in d_out`` flops.

Pairwise wins when ``T^2`` is small next to ``d_in d_out``; a long sequence through a narrow
layer favours materialising.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor


class NumericalWarning(RuntimeWarning):
    """A damped solve needed a fallback (eigendecomposition or extra damping)."""


def input_gram(inputs: Tensor, has_bias: bool) -> Tensor:
    """Inner products of input rows: ``(N, N)`` if ``T = 1``, else ``(N, N, T, T)``.

    The bias, a constant input column of ones, adds one to every inner product.
    """
    if inputs.shape[1] == 1:
        flat = inputs[:, 0]
        products = flat @ flat.T
    else:
        products = torch.einsum("nti,msi->nmts", inputs, inputs)
    return products.add_(1) if has_bias else products  # a new tensor: safe in place


def _pairwise_cost(n: int, t: int, d_in: int, d_out: int, k_a: int, k_b: int) -> int:
    return n * n * t * t * (d_in + k_b * d_out) + k_a * k_b * n * n * t * d_out


def _materialised_cost(n: int, t: int, d_in: int, d_out: int, k_a: int, k_b: int) -> int:
    d_in = d_in + 1
    return (k_a + k_b) * n * t * d_in * d_out + k_a * k_b * n * n * d_in * d_out


def uses_input_gram(d_in: int, output_grads: Tensor, other_output_grads: Tensor) -> bool:
    """Whether :func:`gram` works from the input Gram (``T = 1``, or weight sharing where the
    pairwise ``(N, N, T, T)`` products are cheaper than materialising the datapoint gradients);
    only then is :func:`input_gram` worth computing. ``d_in``: the inputs' width."""
    k_a, n, t, d_out = output_grads.shape
    if t == 1:
        return True
    k_b = other_output_grads.shape[0]
    return _pairwise_cost(n, t, d_in, d_out, k_a, k_b) <= _materialised_cost(
        n, t, d_in, d_out, k_a, k_b
    )


def token_sums(indices: Tensor, output_grads: Tensor, num_columns: int | None = None) -> Tensor:
    """Per datapoint, the output gradients summed by token: ``(K, N, U, d_out)``.

    For a layer on one-hot inputs (``nn.Embedding``) with token indices ``(N, T)`` (``-1``:
    no input), the gradient of datapoint ``(k, n)`` is ``sum_t e_{knt} onehot(i_{nt})^T``:
    column ``v`` holds the sum of the ``e_{knt}`` with ``i_{nt} = v``. With ``num_columns`` the
    columns are the whole vocabulary (``U = num_columns``, the datapoint gradients
    themselves); without, only the batch's distinct tokens, which is all the Gram needs
    (``U <= N T`` whatever the vocabulary).
    """
    k, n, t, d_out = output_grads.shape
    valid = indices >= 0
    if num_columns is None:
        _, columns = torch.unique(indices[valid], return_inverse=True)
        num_columns = int(columns.max()) + 1 if columns.numel() else 0
    else:
        columns = indices[valid]
    datapoints = torch.arange(n, device=indices.device).unsqueeze(1).expand(n, t)[valid]
    sums = output_grads.new_zeros(k, n * num_columns, d_out)
    sums.index_add_(1, datapoints * num_columns + columns, output_grads[:, valid])
    return sums.view(k, n, num_columns, d_out)


def token_matrix(
    indices: Tensor, rows: Tensor, num_columns: int, out: Tensor | None = None
) -> Tensor:
    """``sum_{n,t} onehot(i_{nt}) r_{nt}^T``, shape ``(num_columns, d)``: the rows ``(N, T, d)``
    added into the rows of their tokens (``-1``: none), into ``out`` if given."""
    valid = indices >= 0
    if out is None:
        out = rows.new_zeros(num_columns, rows.shape[-1])
    else:
        out.zero_()
    return out.index_add_(0, indices[valid], rows[valid].to(out.dtype))


def token_frequencies(indices: Tensor, num_columns: int, dtype: torch.dtype) -> Tensor:
    """``1/(N T) sum_{n,t} onehot(i_{nt}) onehot(i_{nt})^T`` as its diagonal ``(num_columns,)``:
    the token frequencies (padding positions count in ``N T`` but add nothing)."""
    counts = torch.bincount(indices[indices >= 0], minlength=num_columns)
    return counts.to(dtype) / indices.numel()


def token_gram(
    indices: Tensor, output_grads: Tensor, other_output_grads: Tensor | None = None
) -> Tensor:
    """Gram ``J_a J_b^T`` ``(K_a N, K_b N)`` of a layer on one-hot inputs (token indices);
    ``other_output_grads`` defaults to ``output_grads`` (the symmetric Gram).

    ``G[kn, jm] = sum over token pairs (t, s) with i_{nt} = i_{ms} of e_{knt} · e_{jms}``. Two
    forms, the cheaper chosen per call:

    * pairs: list the matching token pairs (``sum_v c_v^2`` of them, ``c_v`` the count of
      token ``v`` in the batch: about ``N T`` when tokens rarely repeat) and add their products,
      about ``K_a K_b d_out sum_v c_v^2`` flops;
    * sums: per datapoint, the output gradients summed by distinct token
      (:func:`token_sums`), then one contraction, about ``K_a K_b N^2 U d_out`` flops with
      ``U`` distinct tokens (cheap when few tokens repeat often).
    """
    grads_b = output_grads if other_output_grads is None else other_output_grads
    k_a, n, t, d_out = output_grads.shape
    k_b = grads_b.shape[0]
    flat = indices.reshape(-1)
    valid = (flat >= 0).nonzero().squeeze(1)
    _, group, counts = torch.unique(flat[valid], return_inverse=True, return_counts=True)
    num_pairs = int((counts * counts).sum())
    if num_pairs * (k_a * k_b + k_a + k_b) > k_a * k_b * n * n * counts.numel():
        sums_a = token_sums(indices, output_grads)
        sums_b = sums_a if other_output_grads is None else token_sums(indices, grads_b)
        return torch.einsum("knud,jmud->knjm", sums_a, sums_b).reshape(k_a * n, k_b * n)
    # positions sorted by token; each position pairs with every position of its token's run
    order = torch.argsort(group, stable=True)
    per_position = counts[group[order]]
    run_starts = torch.cumsum(counts, 0) - counts
    first = torch.repeat_interleave(torch.arange(order.numel(), device=flat.device), per_position)
    offsets = torch.arange(num_pairs, device=flat.device) - torch.repeat_interleave(
        torch.cumsum(per_position, 0) - per_position, per_position
    )
    second = torch.repeat_interleave(run_starts[group[order]], per_position) + offsets
    left, right = valid[order[first]], valid[order[second]]  # positions n t, flattened
    rows_a = output_grads.reshape(k_a, n * t, d_out)[:, left]
    rows_b = grads_b.reshape(k_b, n * t, d_out)[:, right]
    products = torch.einsum("kpd,jpd->kjp", rows_a, rows_b)
    cells = (left // t) * n + right // t
    gram_matrix = products.new_zeros(k_a, k_b, n * n).index_add_(2, cells, products)
    return gram_matrix.view(k_a, k_b, n, n).permute(0, 2, 1, 3).reshape(k_a * n, k_b * n)


def per_datapoint_grads(inputs: Tensor, output_grads: Tensor, has_bias: bool) -> Tensor:
    """Materialise ``g_{kn}`` as rows of shape ``(K N, d_out d_in [+ d_out])``.

    Each row is the flattened weight gradient followed by the bias gradient, the order of the
    layer's ``parameters()``.
    """
    k, n = output_grads.shape[:2]
    rows = torch.einsum("knto,nti->knoi", output_grads, inputs).reshape(k * n, -1)
    if has_bias:
        rows = torch.cat([rows, output_grads.sum(dim=2).reshape(k * n, -1)], dim=1)
    return rows


def gram(
    inputs: Tensor,
    output_grads: Tensor,
    other_output_grads: Tensor | None = None,
    has_bias: bool = False,
    inputs_gram: Tensor | None = None,
    upper: bool = False,
) -> Tensor:
    """Gram matrix ``J_a J_b^T`` of one layer's datapoint gradients.

    Parameters
    ----------
    inputs
        ``A``, shape ``(N, T, d_in)``, shared by both sets of datapoints.
    output_grads
        ``E_a``, shape ``(K_a, N, T, d_out)``.
    other_output_grads
        ``E_b``, shape ``(K_b, N, T, d_out)``; defaults to ``E_a`` (the symmetric Gram).
    has_bias
        Whether the layer has a trained bias (a constant input column).
    inputs_gram
        ``input_gram(inputs, has_bias)`` if already computed (it is shared across calls).
    upper
        For the symmetric Gram only: the blocks of :data:`SYMMETRIC_BLOCK` rows on and above
        the diagonal are enough (the caller sums several and mirrors the sum once,
        :func:`mirror_upper_`); the rest of the lower triangle may then hold anything.

    Returns
    -------
    Tensor of shape ``(K_a N, K_b N)``.
    """
    grads_b = output_grads if other_output_grads is None else other_output_grads
    k_a, n, t, d_out = output_grads.shape
    k_b = grads_b.shape[0]
    if t == 1:
        products = input_gram(inputs, has_bias) if inputs_gram is None else inputs_gram
        flat_a = output_grads.reshape(k_a * n, d_out)
        if other_output_grads is None:
            result = symmetric_gram(flat_a, mirror=not upper)
        else:
            result = flat_a @ grads_b.reshape(k_b * n, d_out).T
        if k_a == k_b == 1:
            return result.mul_(products)
        # the input products repeat in every (k_a, k_b) block: broadcast, not copied
        result.view(k_a, n, k_b, n).mul_(products.view(1, n, 1, n))
        return result
    if uses_input_gram(inputs.shape[-1], output_grads, grads_b):
        products = input_gram(inputs, has_bias) if inputs_gram is None else inputs_gram
        weighted_b = torch.einsum("nmts,jmso->njmto", products, grads_b)
        result = torch.einsum("knto,njmto->knjm", output_grads, weighted_b)
        return result.reshape(k_a * n, k_b * n)
    rows_a = per_datapoint_grads(inputs, output_grads, has_bias)
    if other_output_grads is None:
        return symmetric_gram(rows_a, mirror=not upper)
    rows_b = per_datapoint_grads(inputs, grads_b, has_bias)
    return rows_a @ rows_b.T


def gram_times(
    output_grads: Tensor, other_output_grads: Tensor, weights: Tensor, inputs_gram: Tensor
) -> Tensor:
    """``J_a J_b^T w`` without the Gram, for one token per datapoint (``T = 1``).

    ``(J_a J_b^T w)_{kn} = e^a_{kn} · sum_m P_{nm} sum_j w_{jm} e^b_{jm}``, ``P`` the input
    products (:func:`input_gram`, ``(N, N)``): ``N^2 d_out`` multiplications instead of the
    ``K_a K_b N^2 d_out`` of the Gram.

    Parameters
    ----------
    output_grads, other_output_grads
        ``E_a`` ``(K_a, N, 1, d_out)`` and ``E_b`` ``(K_b, N, 1, d_out)``.
    weights
        ``w``, ``(K_b N,)`` in ``E_b``'s row order.
    inputs_gram
        ``input_gram(inputs, has_bias)``.

    Returns
    -------
    Tensor of shape ``(K_a N,)``.
    """
    k_b, n = other_output_grads.shape[:2]
    combined = combine_rows(weights.reshape(k_b, n), other_output_grads)[:, 0]
    mapped = inputs_gram @ combined
    # row by row: an einsum would run this as N batched products of strided rows
    return torch.linalg.vecdot(output_grads[:, :, 0], mapped).reshape(-1)


ROW_ALIGNMENT = 16
"""Elements (64 bytes in float32) a row of :func:`aligned_empty` is padded to a multiple of."""


def aligned_empty(rows: int, columns: int, like: Tensor) -> Tensor:
    """An uninitialised ``rows x columns`` matrix (``like``'s dtype and device) whose row
    stride is ``columns`` rounded up to a multiple of :data:`ROW_ALIGNMENT`: a view of a
    slightly wider matrix. A GEMM that accumulates into a matrix with an odd row stride (a
    weight matrix with its bias column, ``d_in + 1`` wide) is markedly slower at one thread
    (MKL, ``1000 x 1001`` += rank 100: ~1.4x); the padding costs at most 15 columns."""
    stride = -(-columns // ROW_ALIGNMENT) * ROW_ALIGNMENT
    return like.new_empty(rows, stride)[:, :columns]


def aligned_copy(matrix: Tensor) -> Tensor:
    """A copy of a matrix in an :func:`aligned_empty` matrix."""
    return aligned_empty(*matrix.shape, like=matrix).copy_(matrix)


SYMMETRIC_BLOCK = 128
"""Rows of a symmetric product computed by one GEMM in :func:`symmetric_gram`."""


def upper_addmm_(
    out: Tensor, rows: Tensor, beta: float, alpha: float, block: int | None = None
) -> Tensor:
    """``beta * out + alpha * rows @ rows.T`` on the blocks of ``block`` rows (default
    :data:`SYMMETRIC_BLOCK`) on and above the diagonal of ``out`` only, in place, one GEMM per
    block row (about half the flops of the whole symmetric product); the rest of the lower
    triangle is left as it was, for :func:`mirror_upper_` to restore (``beta=0``: ``out``'s
    old values are ignored, not multiplied)."""
    block = SYMMETRIC_BLOCK if block is None else block
    for start in range(0, out.shape[0], block):
        stop = start + block
        out[start:stop, start:].addmm_(rows[start:stop], rows[start:].T, beta=beta, alpha=alpha)
    return out


def mirror_upper_(matrix: Tensor, block: int | None = None) -> Tensor:
    """Copy the blocks above the diagonal blocks of ``block`` rows (default
    :data:`SYMMETRIC_BLOCK`) onto the lower triangle, in place: the whole symmetric matrix
    after :func:`upper_addmm_` (whose diagonal blocks are whole)."""
    block = SYMMETRIC_BLOCK if block is None else block
    for start in range(0, matrix.shape[0] - block, block):
        stop = start + block
        matrix[stop:, start:stop].copy_(matrix[start:stop, stop:].T)
    return matrix


def symmetric_gram(rows: Tensor, mirror: bool = True) -> Tensor:
    """``rows @ rows.T``, symmetric: the blocks of :data:`SYMMETRIC_BLOCK` rows on and above
    the diagonal (:func:`upper_addmm_`), then copied onto the lower triangle
    (``mirror=False``: not copied, the rest of the lower triangle holds anything)."""
    count = rows.shape[0]
    if count <= SYMMETRIC_BLOCK:
        return rows @ rows.T
    result = rows.new_empty(count, count)
    upper_addmm_(result, rows, beta=0.0, alpha=1.0)
    return mirror_upper_(result) if mirror else result


def jvp(inputs: Tensor, output_grads: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``J v`` for a layer-shaped vector ``v = (weight (d_out, d_in), bias (d_out,))``.

    ``(J v)_{kn} = sum_t e_{knt}^T (W a_{nt} + b)`` (Shrestha 2023, eq. 42); shape ``(K, N)``.
    """
    mapped = inputs @ weight.T
    if bias is not None:
        mapped = mapped + bias
    return torch.einsum("knto,nto->kn", output_grads, mapped)


COMBINED_SETS = 16
"""Up to this many row sets :func:`combine_rows` adds one by one (beyond, one contraction)."""


def combine_rows(coefficients: Tensor, output_grads: Tensor) -> Tensor:
    """``E_u = sum_k u_k ⊙ E_k``, ``(N, T, d_out)``, of coefficients ``(K, N)`` and rows
    ``(K, N, T, d_out)``: for up to :data:`COMBINED_SETS` sets one product and ``K - 1``
    in-place multiply-adds (torch's einsum would run ``N`` small strided products), else one
    contraction."""
    sets = output_grads.shape[0]
    if sets > COMBINED_SETS:
        return torch.einsum("kn,knto->nto", coefficients, output_grads)
    column = coefficients.view(sets, -1, *(1,) * (output_grads.dim() - 2))
    combined = output_grads[0] * column[0]
    for k in range(1, sets):
        combined.addcmul_(output_grads[k], column[k])
    return combined


def jtu(
    inputs: Tensor,
    output_grads: Tensor,
    coefficients: Tensor,
    has_bias: bool,
    out: Tensor | None = None,
    bias_out: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """``J^T u = sum_{k,n} u_{kn} g_{kn}`` as ``(weight (d_out, d_in), bias or None)``.

    Computed as ``E_u^T A`` with ``E_u = sum_k u_k ⊙ E_k`` (Shrestha 2023, eq. 43): one GEMM the
    size of autograd's own weight gradient, written into ``out`` if given (the bias into
    ``bias_out``).
    """
    combined = combine_rows(coefficients, output_grads)
    return combined_jtu(inputs, combined, has_bias, out, bias_out)


def combined_jtu(
    inputs: Tensor,
    combined: Tensor,
    has_bias: bool,
    out: Tensor | None = None,
    bias_out: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """:func:`jtu` from the combined rows ``E_u`` ``(N, T, d_out)`` (:func:`combine_rows`)."""
    flat_grads = combined.reshape(-1, combined.shape[-1])
    weight = torch.mm(flat_grads.T, inputs.reshape(-1, inputs.shape[-1]), out=out)
    bias = torch.sum(flat_grads, dim=0, out=bias_out) if has_bias else None
    return weight, bias


@dataclass(frozen=True)
class SolveReport:
    """How a damped solve went: ``method`` is "cholesky", "eigh" or "eigh+damping"."""

    method: str
    damping: float


def damped_solve(
    matrix: Tensor, rhs: Tensor, damping: float, max_damping_increases: int = 8
) -> tuple[Tensor, SolveReport]:
    """Solve ``(M + damping I) x = rhs`` for a symmetric positive semi-definite ``M``.

    The solve runs in float64 (an ``N x N`` system is cheap) and falls back in steps, each
    reported with a :class:`NumericalWarning`:

    1. Cholesky factorisation of ``M + damping I``; for a float32 ``M`` of at least
       :data:`MIXED_MIN_SIZE` rows and one right-hand side, first in float32 with float64
       iterative refinement (:func:`refined_solve`), which gives a float64 solution of the same
       backward error at about half the cost, and in float64 if it does not converge;
    2. if that fails (``M`` indefinite through round-off), an eigendecomposition of ``M`` with
       negative eigenvalues clamped to zero;
    3. if the result is still not finite, the damping is multiplied by 10, up to
       ``max_damping_increases`` times.

    Returns the solution in ``rhs``'s dtype and a :class:`SolveReport`. Raises a
    ``FloatingPointError`` if ``matrix`` or ``rhs`` contains NaN or Inf.
    """
    if not damping > 0:
        raise ValueError(f"damping must be positive, got {damping}")
    target = rhs.to(torch.float64)
    # one float64 copy, checked, then factorised in place, column-major as LAPACK wants it
    # (the transpose: M is symmetric, and both factorisations read one triangle); two
    # triangular solves, as cholesky_solve would do after copying the factor
    factor = _column_major(matrix.to(torch.float64, copy=True))
    _check_finite_system(factor, target)
    vector = target.dim() == 1
    if vector:
        target = target.unsqueeze(1)
    solution = None
    if matrix.dtype == torch.float32 and matrix.shape[0] >= MIXED_MIN_SIZE and vector:
        solution = refined_solve(matrix, factor.T, target, damping)
    info = torch.zeros((), dtype=torch.int32, device=matrix.device)
    if solution is None:
        factor.diagonal().add_(damping)
        torch.linalg.cholesky_ex(factor, out=(factor, info))
        # solved whatever info says (a failed factor gives non-finite or wrong values, which
        # the one check below sends to the fallback)
        half = torch.linalg.solve_triangular(factor, target, upper=False)
        solution = torch.linalg.solve_triangular(factor.T, half, upper=True)
        del half
    del factor
    report = SolveReport("cholesky", damping)
    if int(info) != 0 or not math.isfinite(float(solution.sum())):
        eigenvalues, eigenvectors = torch.linalg.eigh(matrix.to(torch.float64))
        eigenvalues = eigenvalues.clamp_min(0)
        projected = eigenvectors.T @ target
        level = damping
        for _ in range(max_damping_increases + 1):
            solution = eigenvectors @ (projected / (eigenvalues + level).unsqueeze(1))
            if torch.isfinite(solution).all():
                break
            level *= 10
        else:
            raise FloatingPointError(
                f"the damped solve stays non-finite up to damping {level / 10:g}"
            )
        report = SolveReport("eigh" if level == damping else "eigh+damping", level)
        warnings.warn(
            f"Cholesky failed on the damped curvature system; solved by eigendecomposition "
            f"with clamped eigenvalues ({report.method}, damping {level:g})",
            NumericalWarning,
            stacklevel=2,
        )
    if vector:
        solution = solution.squeeze(1)
    return solution.to(rhs.dtype), report


MIXED_MIN_SIZE = 256
"""Systems of at least this many float32 rows are factorised in float32 and refined in float64
(:func:`refined_solve`); smaller ones cost little in float64."""
REFINEMENT_STEPS = 6
"""At most this many refinement steps of :func:`refined_solve` before it gives up."""


def refined_solve(
    matrix: Tensor, system: Tensor, target: Tensor, damping: float
) -> Tensor | None:
    """``(M + damping I)^{-1} b`` by a float32 Cholesky factor refined in float64, or ``None``.

    Mixed-precision iterative refinement as LAPACK's ``dsposv`` does it (Buttari et al. 2007):
    the float32 factor of ``M + damping I`` solves for a correction of the float64 residual
    ``r = b - (M + damping I) x`` until ``||r|| <= sqrt(n) eps64 ||M + damping I||_F ||x||``,
    the backward error of a float64 Cholesky solve. ``None`` (the caller solves in float64)
    when the float32 factorisation fails or the residual does not halve at every step, which
    happens when the system's condition number nears ``1 / eps32``.

    Parameters
    ----------
    matrix
        ``M``, float32 ``(n, n)``, symmetric (one triangle read); not modified.
    system
        ``M`` in float64 (a copy, for the residuals; not modified).
    target
        ``b``, float64 ``(n, 1)``.
    damping
        ``damping > 0``.
    """
    factor = _column_major(matrix.clone())  # float32, factorised in place
    factor.diagonal().add_(damping)
    info = torch.empty((), dtype=torch.int32, device=matrix.device)
    torch.linalg.cholesky_ex(factor, out=(factor, info))
    if int(info) != 0:
        return None

    def correction(residual: Tensor) -> Tensor:
        half = torch.linalg.solve_triangular(factor, residual.to(factor.dtype), upper=False)
        return torch.linalg.solve_triangular(factor.T, half, upper=True).to(torch.float64)

    size = system.shape[0]
    norm = float(torch.linalg.matrix_norm(system)) + damping * math.sqrt(size)
    tolerance = math.sqrt(size) * torch.finfo(torch.float64).eps * norm
    solution = correction(target)
    previous = math.inf
    for _ in range(REFINEMENT_STEPS):
        residual = torch.addmm(target, system, solution, alpha=-1.0).sub_(solution, alpha=damping)
        residual_norm = float(residual.norm())
        if not math.isfinite(residual_norm) or residual_norm > previous / 2:
            return None
        if residual_norm <= tolerance * float(solution.norm()):
            return solution
        solution += correction(residual)
        previous = residual_norm
    return None


SOLVE_METHODS = ("cholesky", "eigh", "eigh+damping")
"""The paths of :func:`damped_solve`, from the plain one to the last fallback."""


def damped_solves(
    systems: list[tuple[Tensor, Tensor]], damping: float
) -> tuple[list[Tensor], SolveReport]:
    """:func:`damped_solve` of several systems ``(M_b, rhs_b)`` (``rhs_b`` vectors), batched.

    Systems of equal size share one batched Cholesky factorisation and one finiteness check,
    which saves the per-call overhead of many small solves (one per layer for block-diagonal
    natural gradient). A system whose factorisation fails goes through :func:`damped_solve`'s
    fallbacks on its own. The report is the furthest fallback any system needed.
    """
    if not damping > 0:
        raise ValueError(f"damping must be positive, got {damping}")
    solutions: list[Tensor | None] = [None] * len(systems)
    reports = [SolveReport("cholesky", damping)]
    by_size: dict[int, list[int]] = {}
    for index, (matrix, _) in enumerate(systems):
        by_size.setdefault(matrix.shape[0], []).append(index)
    for indices in by_size.values():
        if len(indices) == 1:  # nothing to batch: the plain solve is faster
            solutions[indices[0]], report = damped_solve(*systems[indices[0]], damping)
            reports.append(report)
            continue
        matrices = torch.stack([systems[i][0] for i in indices]).to(torch.float64)
        targets = torch.stack([systems[i][1] for i in indices]).to(torch.float64).unsqueeze(2)
        _check_finite_system(matrices, targets)
        matrices.diagonal(dim1=1, dim2=2).add_(damping)  # a fresh copy: safe in place
        factors, info = torch.linalg.cholesky_ex(matrices)
        batch_solutions = torch.cholesky_solve(targets, factors).squeeze(2)
        solved = (info == 0) & torch.isfinite(batch_solutions).all(dim=1)
        for position, (index, ok) in enumerate(zip(indices, solved.tolist(), strict=True)):
            if ok:
                solutions[index] = batch_solutions[position].to(systems[index][1].dtype)
            else:
                solutions[index], report = damped_solve(*systems[index], damping)
                reports.append(report)
    return solutions, furthest_fallback(reports)


def furthest_fallback(reports: list[SolveReport]) -> SolveReport:
    """The report of the solve that needed the furthest fallback (then the most damping)."""
    return max(reports, key=lambda r: (SOLVE_METHODS.index(r.method), r.damping))


def damped_inverse(
    matrix: Tensor, damping: float, max_damping_increases: int = 8, scale: float = 1.0
) -> tuple[Tensor, SolveReport]:
    """``(scale M + damping I)^{-1}`` for a symmetric positive semi-definite ``M``, in ``M``'s
    dtype (``scale > 0``: the normaliser of a running sum, so that ``M`` is not copied to be
    scaled).

    Cholesky factorisation and ``cholesky_inverse`` of ``M + (damping / scale) I`` (about
    ``d^3`` flops), both in place in one copy of ``M`` that becomes the inverse, divided by
    ``scale``: no other ``d x d`` temporary. If the factorisation fails or is not finite, the
    same eigendecomposition ladder as :func:`damped_solve`, with a :class:`NumericalWarning`.
    Used for Kronecker factors, where a float32 ``d x d`` inverse is accurate enough once damped
    and a float64 one costs several times more.
    """
    if not damping > 0:
        raise ValueError(f"damping must be positive, got {damping}")
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")
    check_finite_matrix(matrix, "the curvature factor contains NaN or Inf")
    work = _column_major(matrix.clone())
    work.diagonal().add_(damping / scale)
    info = torch.empty((), dtype=torch.int32, device=matrix.device)
    torch.linalg.cholesky_ex(work, out=(work, info))
    if int(info) == 0:
        torch.cholesky_inverse(work, out=work)
        if is_finite_matrix(work):  # symmetric: its row-major transpose is the inverse
            return work.T.div_(scale), SolveReport("cholesky", damping)
    del work
    eye = torch.eye(matrix.shape[0], dtype=matrix.dtype, device=matrix.device)
    return damped_solve(scale * matrix, eye, damping, max_damping_increases)


def _column_major(matrix: Tensor) -> Tensor:
    """The transpose of a row-major symmetric matrix, a column-major view of the same memory:
    the layout in which LAPACK factorises and inverts in place, without a copy."""
    return matrix.T


def is_finite_matrix(matrix: Tensor) -> bool:
    """Whether every entry is finite: a finite sum has no NaN or Inf among its terms (a
    reduction, no temporary of the matrix's size, unlike ``torch.isfinite(matrix).all()``,
    which decides only when the sum overflows)."""
    return bool(torch.isfinite(matrix.sum())) or bool(torch.isfinite(matrix).all())


def _check_finite_system(matrix: Tensor, target: Tensor) -> None:
    """Raise a ``FloatingPointError`` if ``matrix`` or ``target`` has a NaN or Inf entry.

    NaN and Inf propagate into a sum, so one sum of each decides in the usual case; only a
    non-finite total, which huge finite entries can also give (a float32 sum overflows near
    3.4e38), is looked at entry by entry."""
    total = float(matrix.sum()) + float(target.sum())
    if not math.isfinite(total) and not (is_finite_matrix(matrix) and is_finite_matrix(target)):
        raise FloatingPointError("the curvature system contains NaN or Inf")


def check_finite_matrix(matrix: Tensor, message: str) -> None:
    """Raise ``FloatingPointError(message)`` if ``matrix`` has a NaN or Inf entry."""
    if not is_finite_matrix(matrix):
        raise FloatingPointError(message)


__all__ = [
    "COMBINED_SETS",
    "MIXED_MIN_SIZE",
    "REFINEMENT_STEPS",
    "ROW_ALIGNMENT",
    "SOLVE_METHODS",
    "NumericalWarning",
    "SolveReport",
    "aligned_copy",
    "aligned_empty",
    "check_finite_matrix",
    "combine_rows",
    "combined_jtu",
    "damped_inverse",
    "damped_solve",
    "damped_solves",
    "furthest_fallback",
    "gram",
    "gram_times",
    "input_gram",
    "is_finite_matrix",
    "jtu",
    "jvp",
    "mirror_upper_",
    "per_datapoint_grads",
    "refined_solve",
    "symmetric_gram",
    "token_frequencies",
    "token_gram",
    "token_matrix",
    "token_sums",
    "upper_addmm_",
]
