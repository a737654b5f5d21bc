"""natgrad.Laplace against dense float64 posteriors built from explicit per-sample Jacobians.

The dense oracle is ``Λ = diag(τ) + Σ_n J_n^T H_n J_n`` (or ``Σ_n ∇l_n ∇l_n^T`` for the
empirical Fisher) with ``J_n`` and ``H_n`` from one autograd call each (tests/oracle.py), the
Kronecker factors from hooks on one datapoint at a time, and every inverse and determinant by
dense linear algebra.
"""

from __future__ import annotations

import copy
import math

import pytest
import scipy.optimize
import scipy.stats
import torch
from torch import nn

import natgrad
from natgrad.likelihoods import Gaussian, Likelihood
from oracle import dense_batch, per_sample_loss

VARIANCE = 0.5


def make_model(outputs: int = 3) -> nn.Module:
    return nn.Sequential(
        nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3, bias=False), nn.Tanh(), nn.Linear(3, outputs)
    )


def make_data(likelihood: str, num: int, outputs: int = 3, shape=(4,)):
    inputs = torch.randn(num, *shape)
    if likelihood == "categorical":
        targets = torch.randint(0, outputs, (num,))
    elif likelihood == "gaussian":
        targets = torch.randn(num, outputs)
    else:
        targets = torch.bernoulli(torch.full((num, outputs), 0.5))
    return inputs, targets


def loader(inputs, targets, size: int = 3):
    return list(zip(inputs.split(size), targets.split(size), strict=True))


def dense_curvature(model, inputs, targets, likelihood: str, fisher: str) -> torch.Tensor:
    batch = dense_batch(model, inputs, targets, likelihood, "sum", VARIANCE)
    if fisher == "exact":
        return batch.exact_fisher()
    return batch.empirical_fisher()


def dense_log_likelihood(model, inputs, targets, likelihood: str) -> float:
    with torch.no_grad():
        outputs = model(inputs)
    total = -sum(
        per_sample_loss(likelihood, outputs[n], targets[n], VARIANCE).item()
        for n in range(inputs.shape[0])
    )
    if likelihood == "gaussian":
        total -= 0.5 * outputs.numel() * math.log(2 * math.pi * VARIANCE)
    return total


def flat_params(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def dense_log_evidence(log_lik: float, theta, precision, prior_vector) -> torch.Tensor:
    """MacKay's Laplace evidence: ``log p(D|θ) + log p(θ) + P/2 log 2π - ½ log det Λ`` with the
    prior ``N(0, diag(τ)^{-1})`` written out term by term."""
    size = theta.numel()
    log_prior = (
        -0.5 * size * math.log(2 * math.pi)
        + 0.5 * prior_vector.log().sum()
        - 0.5 * (prior_vector * theta.pow(2)).sum()
    )
    return log_lik + log_prior + 0.5 * size * math.log(2 * math.pi) - 0.5 * torch.logdet(precision)


def likelihood_object(likelihood: str):
    return Gaussian(VARIANCE) if likelihood == "gaussian" else likelihood


# ---------------------------------------------------------------------------------- full


@pytest.mark.parametrize("likelihood", ["categorical", "gaussian", "bernoulli"])
@pytest.mark.parametrize("fisher", ["exact", "empirical"])
@pytest.mark.parametrize("num", [7, 40])  # 7 C rows < P (Woodbury), 40 C > P (P x P)
def test_full_precision_covariance_and_evidence_equal_dense(float64, likelihood, fisher, num):
    torch.manual_seed(0)
    model = make_model()
    inputs, targets = make_data(likelihood, num)
    la = natgrad.Laplace(
        model, likelihood_object(likelihood), fisher=fisher, structure="full", prior_precision=0.7
    ).fit(loader(inputs, targets))
    curvature = dense_curvature(model, inputs, targets, likelihood, fisher)
    size = curvature.shape[0]
    precision = curvature + 0.7 * torch.eye(size)
    assert la.parts[0].woodbury == (la.parts[0].num_rows <= size)
    assert la.parts[0].woodbury == (num == 7 or fisher == "empirical")
    torch.testing.assert_close(la.posterior_precision(), precision, rtol=1e-10, atol=1e-10)
    covariance = la.covariance_times(torch.eye(size))
    torch.testing.assert_close(covariance, torch.linalg.inv(precision), rtol=1e-9, atol=1e-9)
    log_lik = dense_log_likelihood(model, inputs, targets, likelihood)
    expected = dense_log_evidence(log_lik, flat_params(model), precision, torch.full((size,), 0.7))
    assert abs(la.log_likelihood.item() - log_lik) < 1e-10
    assert abs(la.log_marginal_likelihood().item() - expected.item()) < 1e-9


def whitened_statistics(samples, mean, precision):
    """``(S m^T Λ m, W)``: the chi-square statistic of the sample mean's deviation and the
    whitened sample covariance about the true mean, for samples ``(S, P)``."""
    factor = torch.linalg.cholesky(precision)  # Λ = L L^T, so L^T (θ - θ*) ~ N(0, I)
    centred = samples - mean
    whitened = centred @ factor
    deviation = whitened.mean(dim=0)
    return samples.shape[0] * deviation.pow(2).sum().item(), whitened.T @ whitened / len(samples)


def assert_normal_samples(samples, mean, precision):
    """Monte-Carlo bounds derived from the sample size ``S``.

    Mean: ``S (m - θ*)^T Λ (m - θ*)`` is exactly chi-square with ``P`` degrees of freedom for
    Gaussian samples; it must stay below the ``1 - 1e-9`` quantile. Covariance: each entry of
    the whitened sample covariance ``W`` has mean ``δ_ij`` and variance ``(1 + δ_ij) / S``
    and is a mean of ``S`` i.i.d. terms (normal to a very good approximation at ``S = 20000``);
    all ``P (P + 1) / 2`` entries within 7 standard deviations fails with probability below
    ``P^2 · 2.6e-12``.
    """
    num, size = samples.shape
    chi_square, whitened = whitened_statistics(samples, mean, precision)
    assert chi_square < scipy.stats.chi2.ppf(1 - 1e-9, size)
    eye = torch.eye(size)
    bound = 7 * ((1 + eye) / num).sqrt()
    assert bool(((whitened - eye).abs() <= bound).all()), (whitened - eye).abs().max()


@pytest.mark.parametrize("num", [7, 40])
def test_full_samples_match_the_dense_posterior(float64, num):
    torch.manual_seed(1)
    model = make_model()
    inputs, targets = make_data("categorical", num)
    la = natgrad.Laplace(model, "categorical", prior_precision=0.5).fit(loader(inputs, targets))
    precision = dense_curvature(model, inputs, targets, "categorical", "exact")
    precision = precision + 0.5 * torch.eye(precision.shape[0])
    samples = la.sample(20000, torch.Generator().manual_seed(3))
    assert samples.shape == (20000, la.num_params)
    assert_normal_samples(samples, flat_params(model), precision)


def test_the_sample_bounds_reject_a_wrong_posterior(float64):
    """The bounds of the sample test can fail: the diagonal posterior's samples, with the same
    mean and the same marginal precisions on the diagonal but no correlations, are rejected."""
    torch.manual_seed(1)
    model = make_model()
    inputs, targets = make_data("categorical", 7)
    diag = natgrad.Laplace(model, structure="diag", prior_precision=0.5)
    diag.fit(loader(inputs, targets))
    precision = dense_curvature(model, inputs, targets, "categorical", "exact")
    precision = precision + 0.5 * torch.eye(precision.shape[0])
    samples = diag.sample(20000, torch.Generator().manual_seed(3))
    with pytest.raises(AssertionError):
        assert_normal_samples(samples, flat_params(model), precision)


def test_woodbury_sampler_equals_the_dense_sampler_covariance_exactly(float64, monkeypatch):
    """The App. C map ``(y, z) ↦ τ^{-1/2} (y - V U^{-1}(V^T y + z))`` is linear: fed the
    standard basis of ``(y, z)`` instead of noise, its outputs' Gram is exactly ``Λ^{-1}``
    (no Monte-Carlo error)."""
    torch.manual_seed(2)
    model = make_model()
    inputs, targets = make_data("categorical", 7)
    la = natgrad.Laplace(model, prior_precision=[0.3, 2.0, 5.0]).fit(loader(inputs, targets))
    part = la.parts[0]
    assert part.woodbury
    prior = la._prior_vector()
    size, rows = part.size, part.num_rows
    basis = torch.eye(size + rows)
    draws = iter([basis[:, :size], basis[:, size:]])  # y, then z
    monkeypatch.setattr(torch, "randn", lambda *shape, **kwargs: next(draws))
    images = part.sample(size + rows, prior, None)
    monkeypatch.undo()
    precision = dense_curvature(model, inputs, targets, "categorical", "exact") + torch.diag(prior)
    torch.testing.assert_close(images.T @ images, torch.linalg.inv(precision), rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------------------------- layer, diag


def test_layer_and_diag_equal_dense_blocks(float64):
    torch.manual_seed(3)
    model = make_model()
    inputs, targets = make_data("categorical", 6)
    curvature = dense_curvature(model, inputs, targets, "categorical", "exact")
    empirical = dense_curvature(model, inputs, targets, "categorical", "empirical")
    prior = [0.5, 1.5, 3.0]
    la = natgrad.Laplace(model, structure="layer", prior_precision=prior)
    la.fit(loader(inputs, targets))
    vector = la._prior_vector()
    batch = dense_batch(model, inputs, targets, "categorical", "sum")
    layers = [m for m in model if isinstance(m, nn.Linear)]
    mask = batch.block_mask([list(m.parameters()) for m in layers])
    precision = curvature * mask + torch.diag(vector)
    torch.testing.assert_close(la.posterior_precision(), precision, rtol=1e-10, atol=1e-10)
    covariance = la.covariance_times(torch.eye(len(vector)))
    torch.testing.assert_close(covariance, torch.linalg.inv(precision), rtol=1e-9, atol=1e-9)
    log_lik = dense_log_likelihood(model, inputs, targets, "categorical")
    expected = dense_log_evidence(log_lik, flat_params(model), precision, vector)
    assert abs(la.log_marginal_likelihood().item() - expected.item()) < 1e-9
    assert_normal_samples(la.sample(20000), flat_params(model), precision)
    for fisher, dense in (("exact", curvature), ("empirical", empirical)):
        diag = natgrad.Laplace(model, fisher=fisher, structure="diag", prior_precision=prior)
        diag.fit(loader(inputs, targets))
        precision = torch.diag(dense.diagonal() + vector)
        torch.testing.assert_close(diag.posterior_precision(), precision, rtol=1e-10, atol=1e-12)
        expected = dense_log_evidence(log_lik, flat_params(model), precision, vector)
        assert abs(diag.log_marginal_likelihood().item() - expected.item()) < 1e-9


# ---------------------------------------------------------------------------------- kron


def dense_kron_factors(model, layer, inputs, targets, likelihood):
    """``A = 1/(D T) Σ ā ā^T`` and ``B = Σ_{n,t} J_{nt}^T H_n J_{nt}`` (``J_{nt}`` the logits'
    Jacobian w.r.t. the layer output at position ``t``), one datapoint at a time."""
    record = {}
    handle = layer.register_forward_hook(lambda m, args, out: record.update(a=args[0], s=out))
    total_a, total_b, count = 0, 0, 0
    for n in range(inputs.shape[0]):
        output = model(inputs[n : n + 1])[0]
        a, s = record["a"].reshape(-1, layer.in_features), record["s"]
        if layer.bias is not None:
            a = torch.cat([a, torch.ones(a.shape[0], 1)], dim=1)
        total_a = total_a + a.T @ a
        count += a.shape[0]
        jac = torch.stack(
            [torch.autograd.grad(output[c], s, retain_graph=True)[0] for c in range(len(output))]
        ).reshape(len(output), -1, layer.out_features)
        hessian = torch.autograd.functional.hessian(
            lambda z, n=n: per_sample_loss(likelihood, z, targets[n], VARIANCE), output.detach()
        )
        total_b = total_b + torch.einsum("cto,cd,dtp->op", jac, hessian, jac)
    handle.remove()
    return total_a / count, total_b.contiguous()


def to_parameter_layout(matrix_precision, d_out, d_in, has_bias):
    """Reorder a precision over the row-major ``(d_out, d_in [+1])`` matrix into the layout
    ``[weight (d_out, d_in) row-major, bias]``."""
    columns = d_in + int(has_bias)
    grid = torch.arange(d_out * columns).reshape(d_out, columns)
    order = torch.cat([grid[:, :d_in].reshape(-1), grid[:, d_in:].reshape(-1)])
    return matrix_precision[order][:, order]


@pytest.mark.parametrize("damping", ["correct", "heuristic", "a_only"])
@pytest.mark.parametrize("problem", ["mlp", "sequence"])
def test_kron_equals_its_dense_kronecker_form(float64, damping, problem):
    torch.manual_seed(4)
    if problem == "mlp":
        model = make_model()
        inputs, targets = make_data("categorical", 8)
    else:  # a weight shared over 3 tokens: the "expand" factors

        class MeanOverTokens(nn.Module):
            def forward(self, x):
                return x.mean(dim=1)

        model = nn.Sequential(
            nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3), MeanOverTokens(), nn.Linear(3, 3)
        )
        inputs, targets = make_data("categorical", 8, shape=(3, 4))
    layers = [m for m in model if isinstance(m, nn.Linear)]
    prior = torch.tensor([0.4, 2.0, 7.0])
    la = natgrad.Laplace(model, structure="kron", kron_damping=damping, prior_precision=prior)
    la.fit(loader(inputs, targets))
    blocks, log_det = [], 0.0
    for layer, tau in zip(layers, prior, strict=True):
        a, b = dense_kron_factors(model, layer, inputs, targets, "categorical")
        eye_a, eye_b = torch.eye(a.shape[0]), torch.eye(b.shape[0])
        if damping == "correct":
            matrix = torch.kron(b, a) + tau * torch.eye(a.shape[0] * b.shape[0])
        elif damping == "heuristic":
            mean_a, mean_b = a.trace() / a.shape[0], b.trace() / b.shape[0]
            tau_a = (tau * mean_a / mean_b).sqrt()
            tau_b = tau / tau_a
            matrix = torch.kron(b + tau_b * eye_b, a + tau_a * eye_a)
        else:
            beta = b.trace() / b.shape[0]
            matrix = torch.kron(beta * eye_b, a) + tau * torch.eye(a.shape[0] * b.shape[0])
        dense = to_parameter_layout(matrix, b.shape[0], layer.in_features, layer.bias is not None)
        blocks.append(dense)
        log_det += torch.logdet(dense).item() - dense.shape[0] * math.log(tau)
    precision = torch.block_diag(*blocks)
    torch.testing.assert_close(la.posterior_precision(), precision, rtol=1e-9, atol=1e-10)
    covariance = la.covariance_times(torch.eye(precision.shape[0]))
    torch.testing.assert_close(covariance, torch.linalg.inv(precision), rtol=1e-8, atol=1e-9)
    theta = flat_params(model)
    scatter = (la._prior_vector() * theta.pow(2)).sum().item()
    log_lik = dense_log_likelihood(model, inputs, targets, "categorical")
    expected = log_lik - 0.5 * (scatter + log_det)
    assert abs(la.log_marginal_likelihood().item() - expected) < 1e-8
    assert_normal_samples(la.sample(20000), theta, precision)


# ---------------------------------------------------------------------------------- predictive


@pytest.mark.parametrize("structure", ["full", "layer", "kron", "diag"])
@pytest.mark.parametrize("likelihood", ["categorical", "gaussian", "bernoulli"])
@pytest.mark.parametrize("chunked", [False, True])
def test_linearised_predictive_equals_dense(float64, structure, likelihood, chunked):
    torch.manual_seed(5)
    model = make_model()
    inputs, targets = make_data(likelihood, 9)
    size = sum(p.numel() for p in model.parameters())
    # chunked: the smallest max_entries the full fit allows (27 rows x P), so the Jacobians of
    # the 4 test inputs (4 x 3 x P numbers) come in chunks of max_entries // (4 x 3 x P) = 2.
    # "full" keeps its 27 rows (Woodbury form, 27 < P = 52); each "layer" part (p = 25, 15,
    # 12) keeps G^T G: both forms of the low-rank part are compared.
    max_entries = 27 * size if chunked else 2**27
    la = natgrad.Laplace(
        model,
        likelihood_object(likelihood),
        structure=structure,
        prior_precision=0.8,
        max_entries=max_entries,
    ).fit(loader(inputs, targets))
    test_inputs, test_targets = make_data(likelihood, 4)
    covariance = torch.linalg.inv(la.posterior_precision())
    batch = dense_batch(model, test_inputs, test_targets, likelihood, "sum", VARIANCE)
    jac = batch.output_jacobians
    output_cov = torch.einsum("ncp,pq,ndq->ncd", jac, covariance, jac)
    with torch.no_grad():
        mean = model(test_inputs)
    result = la.predictive(test_inputs, method="linearised")
    if likelihood == "gaussian":
        torch.testing.assert_close(result[0], mean, rtol=1e-12, atol=1e-12)
        expected = output_cov + VARIANCE * torch.eye(3)
        torch.testing.assert_close(result[1], expected, rtol=1e-9, atol=1e-10)
        return
    kappa = 1 / (1 + math.pi / 8 * output_cov.diagonal(dim1=1, dim2=2)).sqrt()
    squash = torch.sigmoid if likelihood == "bernoulli" else lambda z: z.softmax(dim=-1)
    torch.testing.assert_close(result, squash(kappa * mean), rtol=1e-9, atol=1e-10)
    # sampled link: the average over output samples N(f, Σ_f), within a derived MC bound
    sampled = la.predictive(test_inputs, n_samples=20000, method="linearised", link="mc")
    draws = mean + torch.einsum(
        "ncd,snd->snc", torch.linalg.cholesky(output_cov), torch.randn(20000, *mean.shape)
    )
    reference = squash(draws).mean(dim=0)  # an independent estimate of the same expectation
    # each estimate is a mean of 20000 values in [0, 1]: standard error <= 0.5 / sqrt(20000)
    assert (sampled - reference).abs().max() < 2 * 6 * 0.5 / math.sqrt(20000)


def test_mc_predictive_averages_the_sampled_networks(float64):
    torch.manual_seed(6)
    model = make_model()
    inputs, targets = make_data("categorical", 9)
    la = natgrad.Laplace(model, prior_precision=2.0).fit(loader(inputs, targets))
    thetas = la.sample(7, torch.Generator().manual_seed(9))
    probs = la.predictive(inputs[:3], n_samples=7, generator=torch.Generator().manual_seed(9))
    expected = 0
    for theta in thetas:
        copy = make_model()
        torch.nn.utils.vector_to_parameters(theta, copy.parameters())
        expected = expected + copy(inputs[:3]).softmax(dim=1).detach() / 7
    torch.testing.assert_close(probs, expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(flat_params(model), la.mean)  # the model keeps its MAP weights


# ---------------------------------------------------------------------------------- prior


@pytest.mark.parametrize("structure", ["full", "kron", "diag"])
def test_prior_optimisation_finds_the_dense_optimum(float64, structure):
    torch.manual_seed(7)
    model = make_model()
    inputs, targets = make_data("categorical", 8)
    la = natgrad.Laplace(model, structure=structure, prior_precision=1.0)
    la.fit(loader(inputs, targets))
    curvature = la.posterior_precision() - torch.eye(la.num_params)  # the fitted structure
    theta = flat_params(model)
    log_lik = dense_log_likelihood(model, inputs, targets, "categorical")

    def negative_evidence(log_tau: float) -> float:
        tau = math.exp(log_tau)
        if structure == "kron":  # the kron precision is not affine in τ: refit it
            return -la.log_marginal_likelihood(tau).item()
        precision = curvature + tau * torch.eye(la.num_params)
        vector = torch.full((la.num_params,), tau)
        return -dense_log_evidence(log_lik, theta, precision, vector).item()

    best = scipy.optimize.minimize_scalar(
        negative_evidence, bracket=(-3, 3), method="brent", tol=1e-12
    ).x
    found = la.optimize_prior_precision()
    assert found.shape == (3,) and bool((found == found[0]).all())
    assert abs(math.log(found[0].item()) - best) < 1e-6
    per_module = la.optimize_prior_precision(per_module=True)
    log_tau = per_module.log().clone().requires_grad_(True)
    gradient = torch.autograd.grad(la.log_marginal_likelihood(log_tau.exp()), log_tau)[0]
    assert gradient.abs().max() < 1e-6
    assert la.log_marginal_likelihood().item() >= -negative_evidence(best) - 1e-9


@pytest.mark.parametrize("structure", ["full", "layer"])
@pytest.mark.parametrize("num", [7, 40])  # 7 C rows < P (Woodbury), 40 C > P (P x P)
def test_evidence_gradient_in_the_prior_equals_dense(float64, structure, num):
    """One τ for all modules (the eigenvalue form of a low-rank part) and one τ per module
    (the factorised form in ``full``; the eigenvalue form per ``layer`` part): value and
    gradient in τ equal autograd through the dense evidence."""
    torch.manual_seed(8)
    model = make_model()
    inputs, targets = make_data("categorical", num)
    la = natgrad.Laplace(model, structure=structure).fit(loader(inputs, targets))
    curvature = la.posterior_precision() - torch.eye(la.num_params)  # checked dense elsewhere
    theta = flat_params(model)
    log_lik = dense_log_likelihood(model, inputs, targets, "categorical")
    sizes = [sum(p.numel() for p in m.parameters()) for m in model if isinstance(m, nn.Linear)]
    for value in (torch.tensor(0.3), torch.tensor([0.3, 2.0, 5.0])):
        tau = value.clone().requires_grad_(True)
        evidence = la.log_marginal_likelihood(tau)
        (gradient,) = torch.autograd.grad(evidence, tau)
        dense_tau = value.clone().requires_grad_(True)
        vector = (
            dense_tau.expand(la.num_params)
            if dense_tau.dim() == 0
            else torch.repeat_interleave(dense_tau, torch.tensor(sizes))
        )
        expected = dense_log_evidence(log_lik, theta, curvature + torch.diag(vector), vector)
        (dense_gradient,) = torch.autograd.grad(expected, dense_tau)
        assert abs(evidence.item() - expected.item()) < 1e-9
        torch.testing.assert_close(gradient, dense_gradient, rtol=1e-9, atol=1e-10)


def test_kron_evidence_of_a_prior_is_the_dense_form(float64):
    """(For the kron branch above: ``log_marginal_likelihood(τ)`` is the dense evidence of the
    kron precision rebuilt at that ``τ``.)"""
    torch.manual_seed(7)
    model = make_model()
    inputs, targets = make_data("categorical", 8)
    la = natgrad.Laplace(model, structure="kron", prior_precision=3.0)
    la.fit(loader(inputs, targets))
    value = la.log_marginal_likelihood(3.0).item()
    log_lik = dense_log_likelihood(model, inputs, targets, "categorical")
    dense = dense_log_evidence(
        log_lik, flat_params(model), la.posterior_precision(), la._prior_vector()
    )
    assert abs(value - dense.item()) < 1e-9


# ---------------------------------------------------------------------------------- models


def test_embedding_layernorm_conv_models_full_equal_dense(float64):
    torch.manual_seed(8)

    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(6, 4, padding_idx=0)
            self.norm = nn.LayerNorm(4)
            self.head = nn.Linear(4, 3)
            self.prompt = nn.Parameter(torch.randn(4) * 0.1)  # the torch.func fallback

        def forward(self, x):
            return self.head(self.norm(self.embed(x) + self.prompt).mean(dim=1))

    cnn = nn.Sequential(
        nn.Conv2d(2, 2, kernel_size=3, stride=2, padding=1), nn.Tanh(), nn.Flatten(),
        nn.Linear(8, 3),
    )  # fmt: skip
    problems = [
        (Tokens(), torch.randint(0, 6, (7, 5))),
        (cnn, torch.randn(7, 2, 4, 4)),
    ]
    for model, inputs in problems:
        targets = torch.randint(0, 3, (7,))
        la = natgrad.Laplace(model, prior_precision=0.9).fit(loader(inputs, targets))
        precision = dense_curvature(model, inputs, targets, "categorical", "exact")
        precision = precision + 0.9 * torch.eye(precision.shape[0])
        torch.testing.assert_close(la.posterior_precision(), precision, rtol=1e-9, atol=1e-10)
        log_lik = dense_log_likelihood(model, inputs, targets, "categorical")
        expected = dense_log_evidence(
            log_lik, flat_params(model), precision, torch.full((precision.shape[0],), 0.9)
        )
        assert abs(la.log_marginal_likelihood().item() - expected.item()) < 1e-9


# ---------------------------------------------------------------------------------- errors


def test_clear_errors(float64):
    model = make_model()
    inputs, targets = make_data("categorical", 6)

    class Custom(Likelihood):
        name = "custom"

        def reduction_factor(self, logits, reduction):
            return 1.0

        def sampled_output_grads(self, logits, num_samples, generator):
            raise NotImplementedError

        def hessian_sqrt(self, logits):
            raise NotImplementedError

    with pytest.raises(ValueError, match="normalised log-likelihood"):
        natgrad.Laplace(model, Custom())
    la = natgrad.Laplace(model)
    for call in (
        lambda: la.sample(3),
        la.log_marginal_likelihood,
        la.optimize_prior_precision,
        lambda: la.predictive(inputs),
    ):
        with pytest.raises(RuntimeError, match=r"call la.fit\(train_loader\) first"):
            call()
    with pytest.raises(ValueError, match="unknown structure"):
        natgrad.Laplace(model, structure="kfac")
    with pytest.raises(ValueError, match="unknown fisher"):
        natgrad.Laplace(model, fisher="ief")
    with pytest.raises(ValueError, match="unknown kron_damping"):
        natgrad.Laplace(model, structure="kron", kron_damping="none").fit(loader(inputs, targets))
    with pytest.raises(ValueError, match="one value per module"):
        natgrad.Laplace(model, prior_precision=[1.0, 2.0])
    with pytest.raises(ValueError, match="positive and finite"):
        natgrad.Laplace(model, prior_precision=0.0)
    with pytest.raises(ValueError, match="would keep the plain gradient"):
        natgrad.Laplace(model, overrides={"2": "plain_gradient"})
    with pytest.raises(MemoryError, match="structure='layer', 'kron'"):
        natgrad.Laplace(model, max_entries=100).fit(loader(inputs, targets))
    with pytest.raises(ValueError, match="no batches"):
        natgrad.Laplace(model).fit([])
    bad = [(inputs.clone().fill_(float("nan")), targets)]
    refit = natgrad.Laplace(model).fit(loader(inputs, targets))
    with pytest.raises(FloatingPointError, match="non-finite"):
        refit.fit(bad)
    with pytest.raises(RuntimeError, match=r"call la\.fit"):  # no stale posterior is left
        refit.sample(2)


def test_fit_leaves_the_model_as_it_was(float64):
    model = make_model()
    inputs, targets = make_data("categorical", 6)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    model.train()
    natgrad.Laplace(model).fit(loader(inputs, targets))
    assert model.training
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in model.parameters())
    handles = [m._forward_hooks for m in model.modules()]
    assert all(len(h) == 0 for h in handles)


# ---------------------------------------------------------------------------------- subsample


@pytest.mark.parametrize("structure", ["full", "layer"])
def test_subsample_keeps_a_stated_subset_scaled_by_d_over_s(float64, structure):
    """``Λ = τ I + (D / S) Σ_{n ∈ subset} J_n^T H_n J_n`` for the subset the fit reports
    (Benzing 2022 App. C's ``Λ_prior + D F`` with a subsampled Fisher)."""
    torch.manual_seed(9)
    model = make_model()
    inputs, targets = make_data("categorical", 20)
    la = natgrad.Laplace(model, structure=structure, subsample=6, prior_precision=0.4)
    la.fit(loader(inputs, targets, size=4))
    subset = la.subset
    assert subset.shape == (6,) and len(set(subset.tolist())) == 6
    assert subset.max() < 20 and la.num_datapoints == 20
    curvature = (20 / 6) * dense_curvature(
        model, inputs[subset], targets[subset], "categorical", "exact"
    )
    if structure == "layer":
        batch = dense_batch(model, inputs, targets, "categorical", "sum")
        layers = [m for m in model if isinstance(m, nn.Linear)]
        curvature = curvature * batch.block_mask([list(m.parameters()) for m in layers])
    precision = curvature + 0.4 * torch.eye(la.num_params)
    torch.testing.assert_close(la.posterior_precision(), precision, rtol=1e-10, atol=1e-10)
    log_lik = dense_log_likelihood(model, inputs, targets, "categorical")
    expected = dense_log_evidence(
        log_lik, flat_params(model), precision, torch.full((la.num_params,), 0.4)
    )
    assert abs(la.log_marginal_likelihood().item() - expected.item()) < 1e-9
    whole = natgrad.Laplace(model, subsample=25, prior_precision=0.4)
    whole.fit(loader(inputs, targets, size=4))
    full = dense_curvature(model, inputs, targets, "categorical", "exact")
    torch.testing.assert_close(
        whole.posterior_precision(), full + 0.4 * torch.eye(la.num_params), rtol=1e-10, atol=1e-10
    )


def test_reservoir_draws_every_datapoint_equally_often():
    """Algorithm R is uniform: over 4000 runs keeping 3 of 10 datapoints (batches of 4),
    each datapoint is kept ``1200`` times in expectation, standard deviation
    ``sqrt(4000 · 0.3 · 0.7) ≈ 29``; all ten within 6 standard deviations."""
    from natgrad.laplace.subsample import Reservoir

    counts = torch.zeros(10)
    generator = torch.Generator().manual_seed(0)
    for _ in range(4000):
        reservoir = Reservoir(3, generator)
        for size in (4, 4, 2):
            reservoir.assign(size)
        counts[reservoir.indices()] += 1
    assert bool(((counts - 1200).abs() < 6 * 29).all()), counts


def test_subsample_errors(float64):
    model = make_model()
    with pytest.raises(ValueError, match="subsample applies to structure='full' or 'layer'"):
        natgrad.Laplace(model, structure="kron", subsample=5)
    with pytest.raises(ValueError, match="integer >= 1"):
        natgrad.Laplace(model, subsample=0)
    inputs, targets = make_data("categorical", 6)
    with pytest.raises(MemoryError, match="smaller subsample"):
        natgrad.Laplace(model, subsample=5, max_entries=100).fit(loader(inputs, targets))


def test_mc_rows_weigh_each_sampled_label_by_one_over_m(float64, monkeypatch):
    """``fisher="mc"`` with ``M`` labels: ``Λ = τ I + 1/M Σ_{n,m} J_n^T v_nm v_nm^T J_n``. The
    label sampler is replaced by a deterministic one (``v = π - e_y`` for ``y`` the arg-max
    class and the next one), so the dense oracle can use the same vectors."""
    from natgrad.likelihoods import Categorical

    def labels(self, logits, num_samples, generator):
        probs = logits.softmax(dim=1)
        top = probs.argmax(dim=1)
        chosen = torch.stack([(top + m) % probs.shape[1] for m in range(num_samples)])
        return probs.unsqueeze(0) - torch.nn.functional.one_hot(chosen, probs.shape[1])

    monkeypatch.setattr(Categorical, "sampled_output_grads", labels)
    torch.manual_seed(10)
    model = make_model()
    inputs, targets = make_data("categorical", 8)
    la = natgrad.Laplace(model, fisher="mc", mc_samples=2, prior_precision=0.5)
    la.fit(loader(inputs, targets))
    batch = dense_batch(model, inputs, targets, "categorical", "sum")
    with torch.no_grad():
        vectors = labels(None, model(inputs), 2, None)
    precision = batch.sampled_fisher(vectors) + 0.5 * torch.eye(la.num_params)
    torch.testing.assert_close(la.posterior_precision(), precision, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("structure", ["kron", "full"])
def test_embedding_posterior_equals_linear_on_one_hot_inputs(float64, structure):
    """An ``nn.Embedding`` is a bias-free ``nn.Linear`` on one-hot inputs (weight transposed):
    both give the same posterior, its input factor the token frequencies, up to the layout
    of the weight (``(V, d)`` against ``(d, V)``)."""
    torch.manual_seed(11)
    vocabulary, width, tokens = 6, 3, 4

    class Pool(nn.Module):
        def forward(self, x):
            return x.mean(dim=1)

    embed = nn.Embedding(vocabulary, width)
    linear = nn.Linear(vocabulary, width, bias=False)
    with torch.no_grad():
        linear.weight.copy_(embed.weight.T)
    head = nn.Linear(width, 3)
    by_index = nn.Sequential(embed, Pool(), head)
    by_one_hot = nn.Sequential(linear, Pool(), head)
    indices = torch.randint(0, vocabulary, (9, tokens))
    one_hot = nn.functional.one_hot(indices, vocabulary).double()
    targets = torch.randint(0, 3, (9,))
    precisions = [
        natgrad.Laplace(model, structure=structure, prior_precision=[0.5, 2.0])
        .fit(loader(inputs, targets))
        .posterior_precision()
        for model, inputs in ((by_index, indices), (by_one_hot, one_hot))
    ]
    size = vocabulary * width
    transpose = torch.arange(size).reshape(width, vocabulary).T.reshape(-1)
    order = torch.cat([transpose, torch.arange(size, precisions[0].shape[0])])
    torch.testing.assert_close(
        precisions[0], precisions[1][order][:, order], rtol=1e-10, atol=1e-12
    )


@pytest.mark.parametrize("structure", ["kron", "full"])
def test_conv_posterior_equals_linear_on_unfolded_patches(float64, structure):
    """An ``nn.Conv2d`` is an ``nn.Linear`` shared over the unfolded patches (same weight
    layout): both give the same posterior."""
    torch.manual_seed(12)
    conv = nn.Conv2d(2, 3, kernel_size=2, stride=1, padding=1)
    linear = nn.Linear(8, 3)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.reshape(3, -1))
        linear.bias.copy_(conv.bias)

    class Patches(nn.Module):
        def forward(self, x):
            return nn.functional.unfold(x, kernel_size=2, padding=1).transpose(1, 2)

    class ToImage(nn.Module):
        def forward(self, x):
            return x.transpose(1, 2).reshape(x.shape[0], 3, 4, 4)

    head = nn.Linear(48, 2)
    by_conv = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), head)
    by_linear = nn.Sequential(Patches(), linear, ToImage(), nn.Tanh(), nn.Flatten(), head)
    inputs, targets = torch.randn(7, 2, 3, 3), torch.randint(0, 2, (7,))
    precisions = [
        natgrad.Laplace(model, structure=structure, prior_precision=[0.5, 2.0])
        .fit(loader(inputs, targets))
        .posterior_precision()
        for model in (by_conv, by_linear)
    ]
    torch.testing.assert_close(precisions[0], precisions[1], rtol=1e-10, atol=1e-12)


class TransposedLinear(nn.Module):
    """A linear layer storing its weight as ``(d_in, d_out)`` (HuggingFace's Conv1D layout)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight = nn.Parameter(linear.weight.detach().T.clone())
        self.bias = nn.Parameter(linear.bias.detach().clone())

    def forward(self, x):
        return x @ self.weight + self.bias


@pytest.mark.parametrize("damping", ["correct", "heuristic", "a_only"])
def test_kron_posterior_of_a_transposed_weight_layout_equals_the_linear_one(float64, damping):
    """The same layer stored as ``(d_in, d_out)`` (registered with TransposedLinearAdapter)
    has the Linear layer's kron posterior, permuted to its layout: precision and linearised
    predictive."""
    torch.manual_seed(6)
    linear_model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    transposed_model = nn.Sequential(TransposedLinear(linear_model[0]), nn.Tanh(), linear_model[2])
    transposed_model = copy.deepcopy(transposed_model)
    natgrad.register_adapter(TransposedLinear, natgrad.adapters.TransposedLinearAdapter())
    try:
        inputs, targets = make_data("categorical", 10, shape=(5,))
        posteriors = []
        for model in (linear_model, transposed_model):
            la = natgrad.Laplace(model, structure="kron", kron_damping=damping, prior_precision=0.7)
            la.fit(loader(inputs, targets))
            posteriors.append(la)
    finally:
        natgrad.adapters.ADAPTERS.pop(TransposedLinear)
    # parameter order: first weight (4x5 vs 5x4), first bias, then the shared head
    order = torch.cat([torch.arange(20).reshape(4, 5).T.reshape(-1), torch.arange(20, 39)])
    expected = posteriors[0].posterior_precision()[order][:, order]
    actual = posteriors[1].posterior_precision()
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(
        posteriors[1].predictive(inputs, method="linearised"),
        posteriors[0].predictive(inputs, method="linearised"),
        rtol=1e-10, atol=1e-12,
    )  # fmt: skip


def test_an_evaluated_prior_precision_is_checked_like_a_set_one(float64):
    """log_marginal_likelihood(τ) refuses what the prior_precision setter refuses."""
    torch.manual_seed(7)
    inputs, targets = make_data("categorical", 6)
    la = natgrad.Laplace(make_model(), structure="diag")
    la.fit(loader(inputs, targets))
    with pytest.raises(ValueError, match="one value per module"):
        la.log_marginal_likelihood(torch.ones(len(la.group_names) + 1))
    with pytest.raises(ValueError, match="positive and finite"):
        la.log_marginal_likelihood(-1.0)
    per_module = [2.0] * len(la.group_names)
    assert la.log_marginal_likelihood(2.0) == la.log_marginal_likelihood(per_module)
