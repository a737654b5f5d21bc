"""natgrad.linalg against explicit per-datapoint gradients built by loops."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from natgrad import linalg
from natgrad.adapters import EmbeddingAdapter
from natgrad.linalg import (
    _materialised_cost,
    _pairwise_cost,
    gram,
    jtu,
    jvp,
    per_datapoint_grads,
    token_sums,
)
from natgrad.precond.blocks import TokenBatch
from oracle import relative_error

pytestmark = pytest.mark.usefixtures("float64")


def explicit_grads(inputs, output_grads, has_bias):
    """g_kn = sum_t outer(e_knt, a_nt), bias sum_t e_knt, flattened, one row per (k, n)."""
    rows = []
    for k in range(output_grads.shape[0]):
        for n in range(inputs.shape[0]):
            weight = sum(
                torch.outer(output_grads[k, n, t], inputs[n, t]) for t in range(inputs.shape[1])
            )
            row = [weight.reshape(-1)]
            if has_bias:
                row.append(output_grads[k, n].sum(dim=0))
            rows.append(torch.cat(row))
    return torch.stack(rows)


@settings(max_examples=25, deadline=None)
@given(
    num=st.integers(1, 4),
    positions=st.integers(1, 5),
    d_in=st.integers(1, 6),
    d_out=st.integers(1, 6),
    k_a=st.integers(1, 3),
    k_b=st.integers(1, 3),
    has_bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_gram_jvp_jtu_match_explicit_gradients(
    num, positions, d_in, d_out, k_a, k_b, has_bias, seed
):
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(num, positions, d_in, generator=generator)
    grads_a = torch.randn(k_a, num, positions, d_out, generator=generator)
    grads_b = torch.randn(k_b, num, positions, d_out, generator=generator)
    rows_a = explicit_grads(inputs, grads_a, has_bias)
    rows_b = explicit_grads(inputs, grads_b, has_bias)
    assert torch.allclose(per_datapoint_grads(inputs, grads_a, has_bias), rows_a, rtol=1e-12)
    assert torch.allclose(gram(inputs, grads_a, has_bias=has_bias), rows_a @ rows_a.T, rtol=1e-10)
    cross = gram(inputs, grads_a, grads_b, has_bias=has_bias)
    assert torch.allclose(cross, rows_a @ rows_b.T, rtol=1e-10, atol=1e-12)

    weight = torch.randn(d_out, d_in, generator=generator)
    bias = torch.randn(d_out, generator=generator) if has_bias else None
    vector = torch.cat([weight.reshape(-1)] + ([bias] if has_bias else []))
    products = jvp(inputs, grads_a, weight, bias).reshape(-1)
    assert torch.allclose(products, rows_a @ vector, rtol=1e-10, atol=1e-12)

    coefficients = torch.randn(k_a, num, generator=generator)
    weight_part, bias_part = jtu(inputs, grads_a, coefficients, has_bias)
    expected = rows_a.T @ coefficients.reshape(-1)
    assert torch.allclose(weight_part.reshape(-1), expected[: d_out * d_in], rtol=1e-10, atol=1e-12)
    if has_bias:
        assert torch.allclose(bias_part, expected[d_out * d_in :], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    ("positions", "d_in", "d_out", "branch"),
    [(2, 30, 30, "pairwise"), (40, 2, 2, "materialised")],
)
def test_both_weight_sharing_gram_branches(positions, d_in, d_out, branch):
    num, k_a, k_b = 3, 2, 1
    pairwise = _pairwise_cost(num, positions, d_in, d_out, k_a, k_b)
    materialised = _materialised_cost(num, positions, d_in, d_out, k_a, k_b)
    assert (pairwise <= materialised) == (branch == "pairwise")
    torch.manual_seed(0)
    inputs = torch.randn(num, positions, d_in)
    grads_a = torch.randn(k_a, num, positions, d_out)
    grads_b = torch.randn(k_b, num, positions, d_out)
    expected = explicit_grads(inputs, grads_a, True) @ explicit_grads(inputs, grads_b, True).T
    assert torch.allclose(gram(inputs, grads_a, grads_b, has_bias=True), expected, rtol=1e-10)


def test_input_gram_is_only_computed_where_the_gram_uses_it():
    """A transformer-sized layer (N = 100, T = 40 tokens, 32 x 32) materialises its datapoint
    gradients (100 x 1056 floats) instead of forming the (N, N, T, T) input products, 16M
    entries that once dominated an EF step (1 s of a 1.05 s step)."""
    from natgrad.linalg import uses_input_gram

    rows = torch.randn(1, 100, 40, 32)
    assert not uses_input_gram(32, rows, rows)
    assert uses_input_gram(32, rows[:, :, :1], rows[:, :, :1])  # T = 1
    wide = torch.randn(1, 3, 2, 30)  # 2 positions of 30 x 30: pairwise products are cheaper
    assert uses_input_gram(30, wide, wide)


@settings(max_examples=25, deadline=None)
@given(
    num=st.integers(1, 4),
    tokens=st.integers(1, 5),
    vocabulary=st.integers(1, 6),
    d_out=st.integers(1, 4),
    k_a=st.integers(1, 3),
    k_b=st.integers(1, 3),
    padding=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_token_batch_matches_explicit_one_hot_gradients(
    num, tokens, vocabulary, d_out, k_a, k_b, padding, seed
):
    """An embedding's block from token indices (repeats, padding) against the explicit
    gradients of its one-hot inputs: Gram, J^T u and the datapoint gradients."""
    generator = torch.Generator().manual_seed(seed)
    embedding = torch.nn.Embedding(vocabulary, d_out, padding_idx=0 if padding else None)
    adapter = EmbeddingAdapter()
    indices = torch.randint(0, vocabulary, (num, tokens), generator=generator)
    inputs = adapter.input_rows(embedding, indices)
    one_hot = torch.nn.functional.one_hot(indices, vocabulary).double()
    if padding:
        one_hot[..., 0] = 0  # torch never trains the padding row
    rows_a = torch.randn(k_a, num, tokens, d_out, generator=generator)
    rows_b = torch.randn(k_b, num, tokens, d_out, generator=generator)
    batch = TokenBatch("embedding", embedding, adapter, [indices], rows_a[:1], None, False)
    assert torch.equal(batch.inputs, inputs)
    # explicit gradients in the neuron view (d_out, vocabulary), as rows of module.weight
    explicit_a = explicit_grads(one_hot, rows_a, False)
    explicit_b = explicit_grads(one_hot, rows_b, False)
    to_weight = lambda g: g.reshape(-1, d_out, vocabulary).transpose(1, 2).reshape(len(g), -1)  # noqa: E731
    assert torch.allclose(batch.gram(rows_a), explicit_a @ explicit_a.T, atol=1e-12)
    assert torch.allclose(batch.gram(rows_a, rows_b), explicit_a @ explicit_b.T, atol=1e-12)
    assert torch.allclose(batch.per_datapoint_grads(rows_a), to_weight(explicit_a), atol=1e-12)
    coefficients = torch.randn(k_a, num, generator=generator)
    batch.write_combination(rows_a, coefficients)
    expected = to_weight((coefficients.reshape(-1) @ explicit_a).unsqueeze(0))[0]
    assert torch.allclose(embedding.weight.grad.reshape(-1), expected, atol=1e-12)
    if padding:
        assert not embedding.weight.grad[0].any()


@pytest.mark.parametrize(
    ("indices", "uses_sums"),
    [
        (torch.arange(12).reshape(3, 4), False),  # every token once: the matching pairs
        (torch.zeros(3, 4, dtype=torch.long), True),  # one token repeated: sums per token
        (torch.tensor([[0, 1, -1, 1], [2, 1, 1, -1], [0, 0, 3, 4]]), None),  # padding
    ],
)
def test_token_gram_branches_match_explicit_gradients(monkeypatch, indices, uses_sums):
    calls = []
    monkeypatch.setattr(
        linalg, "token_sums", lambda *a, **k: calls.append(1) or token_sums(*a, **k)
    )
    generator = torch.Generator().manual_seed(0)
    rows_a = torch.randn(2, 3, 4, 5, generator=generator)
    rows_b = torch.randn(3, 3, 4, 5, generator=generator)
    one_hot = torch.nn.functional.one_hot(indices.clamp_min(0), 13) * (indices >= 0).unsqueeze(-1)
    expected = (
        explicit_grads(one_hot.double(), rows_a, False)
        @ explicit_grads(one_hot.double(), rows_b, False).T
    )
    assert torch.allclose(linalg.token_gram(indices, rows_a, rows_b), expected, atol=1e-12)
    if uses_sums is not None:
        assert bool(calls) == uses_sums


@pytest.mark.parametrize(("positions", "d_in", "d_out"), [(1, 4, 5), (40, 2, 2)])
def test_symmetric_gram_by_blocks_matches_explicit_gradients(monkeypatch, positions, d_in, d_out):
    """Blocks of 3 rows (the shipped size exceeds these K N): the upper blocks by GEMMs and
    their mirror give the whole Gram, for T = 1 and for the materialised branch."""
    monkeypatch.setattr(linalg, "SYMMETRIC_BLOCK", 3)
    torch.manual_seed(1)
    inputs = torch.randn(4, positions, d_in)
    grads = torch.randn(3, 4, positions, d_out)
    rows = explicit_grads(inputs, grads, True)
    expected = rows @ rows.T
    assert relative_error(gram(inputs, grads, has_bias=True), expected) <= 1e-12
    assert relative_error(linalg.symmetric_gram(rows), expected) <= 1e-12
