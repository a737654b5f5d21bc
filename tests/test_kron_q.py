"""FishLeg's Kronecker-Q products and auxiliary gradients (natgrad.precond.kron_q) against
dense float64 products and autograd, at widths where the triangular blocks are used."""

from __future__ import annotations

import pytest
import torch

from natgrad.precond import kron_q
from oracle import relative_error

pytestmark = pytest.mark.usefixtures("float64")

D_OUT, D_IN, RANK = 520, 300, 7  # 4 and 2 column blocks, in products and for Adam


def lower(size: int) -> torch.Tensor:
    return torch.tril(torch.randn(size, size)) + size**0.5 * torch.eye(size)


def test_the_factors_are_split_into_blocks():
    assert kron_q.block_width(D_OUT) == 130 and kron_q.block_width(D_IN) == 150
    assert kron_q.block_width(200) == 200  # one block: a dense product
    # the products' blocks: 128 columns from column 0, a narrow last block joined
    assert kron_q.product_blocks(D_OUT) == [(0, 128), (128, 256), (256, 384), (384, 520)]
    assert kron_q.product_blocks(D_IN) == [(0, 128), (128, 300)]
    assert kron_q.product_blocks(330) == [(0, 128), (128, 256), (256, 330)]
    assert kron_q.product_blocks(200) == [(0, 200)]


def test_triangular_products_equal_dense_products():
    torch.manual_seed(0)
    left, right = lower(D_OUT), lower(D_IN)
    x, matrix = torch.randn(RANK, D_OUT), torch.randn(D_OUT, D_IN)
    assert relative_error(kron_q.times_lower(x, left), x @ left) <= 1e-13
    assert relative_error(kron_q.times_lower_t(x, left), x @ left.T) <= 1e-13
    expected = left @ left.T @ matrix @ right @ right.T
    assert relative_error(kron_q.apply_dense(matrix, left, right), expected) <= 1e-13
    rows, inputs = torch.randn(RANK, D_OUT), torch.randn(RANK, D_IN)
    product = kron_q.LowRankProduct.of(rows, inputs, left, right)
    expected = left @ left.T @ rows.T @ inputs @ right @ right.T
    assert relative_error(product.dense(), expected) <= 1e-13
    square = torch.randn(D_OUT, D_OUT)
    out = [torch.full_like(view, float("nan")) for view in kron_q.lower_blocks(square)]
    kron_q.tril_product(square, left, out, right_lower=True)
    actual = kron_q.from_blocks(out, D_OUT)
    assert relative_error(actual, torch.tril(square @ left)) <= 1e-13
    assert sum(block.numel() for block in out) == 5 * D_OUT**2 // 8  # 4 blocks: 5/8 of it


@pytest.mark.parametrize("low_rank", [True, False])
def test_auxiliary_gradients_equal_autograd_of_the_surrogate(low_rank):
    """∇L, ∇R of <L Lᵀ u R Rᵀ, W> (W constant) in closed form equal autograd through the
    lower triangles of the factors, for u dense or u = Eᵀ A."""
    torch.manual_seed(1)
    left, right = lower(D_OUT), lower(D_IN)
    rows, inputs = torch.randn(RANK, D_OUT), torch.randn(RANK, D_IN)
    direction = rows.T @ inputs if low_rank else torch.randn(D_OUT, D_IN)
    weights = torch.randn(D_OUT, D_IN)
    leaves = [left.clone().requires_grad_(True), right.clone().requires_grad_(True)]
    masked = [torch.tril(leaf) for leaf in leaves]
    product = masked[0] @ masked[0].T @ direction @ masked[1] @ masked[1].T
    expected = torch.autograd.grad((product * weights).sum(), leaves)
    out = tuple(
        [torch.full_like(view, float("nan")) for view in kron_q.lower_blocks(factor)]
        for factor in (left, right)
    )
    if low_rank:
        kron_q.LowRankProduct.of(rows, inputs, left, right).factor_gradients(
            weights, left, right, out
        )
    else:
        kron_q.dense_factor_gradients(direction, weights, left, right, out)
    for blocks, wanted in zip(out, expected, strict=True):
        assert relative_error(kron_q.from_blocks(blocks, len(wanted)), wanted) <= 1e-12
