"""Predictive distributions of a Laplace posterior: Monte-Carlo and linearised (GLM).

The linearised predictive replaces the network by its first-order expansion around the MAP,
``f(x; θ) ≈ f(x; θ*) + J(x)(θ - θ*)``, so the outputs are Gaussian with mean ``f(x; θ*)`` and
covariance ``Σ_f(x) = J(x) Σ J(x)^T`` (``Σ`` the posterior covariance). The Jacobians
``J(x)`` come from ``torch.func`` (reverse mode, vectorised over the outputs); ``Σ J^T`` is
applied by the posterior's own structure, never as a ``P x P`` matrix. Then

* Gaussian likelihood: the predictive is ``N(f(x; θ*), Σ_f(x) + σ^2 I)`` (closed form);
* categorical: ``softmax(κ ⊙ f)`` with ``κ_c = (1 + π/8 Σ_f,cc)^{-1/2}`` (the probit
  approximation, ``link="probit"``), or the average of ``softmax(f_s)`` over samples
  ``f_s ~ N(f, Σ_f)`` (``link="mc"``);
* Bernoulli: ``σ(κ ⊙ f)`` likewise, or the sampled average.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap

from natgrad.likelihoods import Bernoulli, Categorical, Gaussian, Likelihood

Link = Literal["probit", "mc"]


def output_jacobians(
    model: nn.Module, names: list[str], params: list[Tensor], inputs: Tensor
) -> tuple[Tensor, Tensor]:
    """``(f(x; θ), J(x))``: outputs ``(N, C)`` and Jacobians ``(N, C, P)`` w.r.t. the named
    parameters, flattened and concatenated in the order given.

    Each datapoint is differentiated on its own (``vmap`` over the batch), so the model must
    treat datapoints independently (eval mode for batch normalisation).
    """

    def single(values: tuple[Tensor, ...], x: Tensor) -> Tensor:
        out = functional_call(model, dict(zip(names, values, strict=True)), (x.unsqueeze(0),))
        return out.squeeze(0)

    detached = tuple(p.detach() for p in params)
    with torch.no_grad():
        outputs = functional_call(model, dict(zip(names, detached, strict=True)), (inputs,))
    blocks = vmap(jacrev(single), in_dims=(None, 0))(detached, inputs)
    jacobians = torch.cat([b.reshape(*outputs.shape, -1) for b in blocks], dim=2)
    return outputs, jacobians


def output_covariance(jacobians: Tensor, covariance_times: Callable[[Tensor], Tensor]) -> Tensor:
    """``Σ_f = J Σ J^T`` per datapoint, ``(N, C, C)``, from ``M ↦ M Σ`` on rows ``(k, P)``."""
    num, outputs, size = jacobians.shape
    rows = jacobians.reshape(num * outputs, size)
    mapped = covariance_times(rows).reshape(num, outputs, size)
    return torch.einsum("ncp,ndp->ncd", mapped, jacobians)


def linearised_predictive(
    likelihood: Likelihood,
    mean: Tensor,
    covariance: Tensor,
    link: Link,
    num_samples: int,
    generator: torch.Generator | None,
) -> Tensor | tuple[Tensor, Tensor]:
    """The GLM predictive from output means ``(N, C)`` and covariances ``(N, C, C)`` (module
    docstring): class probabilities, or ``(mean, covariance)`` for the Gaussian."""
    if isinstance(likelihood, Gaussian):
        eye = torch.eye(mean.shape[1], dtype=mean.dtype)
        return mean, covariance + likelihood.variance * eye
    squash = _squash(likelihood)
    if link == "probit":
        variances = covariance.diagonal(dim1=1, dim2=2)
        return squash(mean / (1 + math.pi / 8 * variances).sqrt())
    if link != "mc":
        raise ValueError(f"unknown link={link!r}: choose 'probit' or 'mc'")
    jitter = 1e-12 * covariance.diagonal(dim1=1, dim2=2).amax(dim=1).clamp_min(1.0)
    eye = torch.eye(mean.shape[1], dtype=mean.dtype)
    factor = torch.linalg.cholesky(covariance + jitter[:, None, None] * eye)
    noise = torch.randn(num_samples, *mean.shape, generator=generator, dtype=mean.dtype)
    samples = mean + torch.einsum("ncd,snd->snc", factor, noise)
    return squash(samples).mean(dim=0)


def _squash(likelihood: Likelihood) -> Callable[[Tensor], Tensor]:
    if isinstance(likelihood, Categorical):
        return lambda logits: torch.softmax(logits, dim=-1)
    if isinstance(likelihood, Bernoulli):
        return torch.sigmoid
    raise ValueError(f"no predictive probabilities for {type(likelihood).__name__}")


def sampled_predictive(likelihood: Likelihood, outputs: Tensor) -> Tensor | tuple[Tensor, Tensor]:
    """The Monte-Carlo predictive from the outputs ``(S, N, C)`` of ``S`` sampled networks:
    the averaged probabilities, or ``(mean, covariance)`` for the Gaussian (the outputs'
    sample covariance plus ``σ^2 I``)."""
    if isinstance(likelihood, Gaussian):
        mean = outputs.mean(dim=0)
        centred = outputs - mean
        covariance = torch.einsum("snc,snd->ncd", centred, centred) / outputs.shape[0]
        eye = torch.eye(mean.shape[1], dtype=mean.dtype)
        return mean, covariance + likelihood.variance * eye
    return _squash(likelihood)(outputs).mean(dim=0)


__all__ = [
    "Link",
    "linearised_predictive",
    "output_covariance",
    "output_jacobians",
    "sampled_predictive",
]
