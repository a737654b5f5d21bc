"""Dense float64 oracles: explicit per-sample gradients, explicit Fisher matrices, explicit solves.

Everything here is computed the slow, obvious way (one backward pass per datapoint and output
coordinate, dense ``P x P`` matrices, ``torch.linalg.solve``), independently of natgrad's
neuron-view code, so the tests can compare natgrad's updates with it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def per_sample_loss(likelihood: str, output: Tensor, target: Tensor, variance: float) -> Tensor:
    """``l_n`` for one datapoint (output and target of shape ``(C,)``), summed over outputs."""
    if likelihood == "categorical":
        return F.cross_entropy(output.unsqueeze(0), target.unsqueeze(0), reduction="sum")
    if likelihood == "gaussian":
        return (output - target).pow(2).sum() / (2 * variance)
    if likelihood == "bernoulli":
        return F.binary_cross_entropy_with_logits(output, target, reduction="sum")
    raise ValueError(likelihood)


def reduction_constant(likelihood: str, reduction: str, logits: Tensor) -> float:
    """The factor ``c`` of ``L = c sum_n l_n`` that torch's loss functions use."""
    if reduction == "sum":
        return 1.0
    if likelihood == "categorical":
        return 1.0 / logits.shape[0]
    return 1.0 / logits.numel()


@dataclass
class DenseBatch:
    """Explicit objects of one batch, all float64 and dense."""

    params: list[nn.Parameter]
    factor: float
    loss_grads: Tensor  # (N, P): per-sample gradients of l_n at the true labels
    output_jacobians: Tensor  # (N, C, P): d z_n / d theta
    output_grads: Tensor  # (N, C): d l_n / d z_n
    output_hessians: Tensor  # (N, C, C): d^2 l_n / d z_n^2

    @property
    def gradient(self) -> Tensor:
        """``∇L = c sum_n ∇l_n``."""
        return self.factor * self.loss_grads.sum(dim=0)

    def empirical_fisher(self) -> Tensor:
        return self.factor * self.loss_grads.T @ self.loss_grads

    def exact_fisher(self) -> Tensor:
        jac, hess = self.output_jacobians, self.output_hessians
        return self.factor * torch.einsum("ncp,ncd,ndq->pq", jac, hess, jac)

    def sampled_fisher(self, vectors: Tensor) -> Tensor:
        """``c / M sum_{m,n} (J_n^T v_mn)(J_n^T v_mn)^T`` for output vectors ``(M, N, C)``."""
        rows = torch.einsum("ncp,mnc->mnp", self.output_jacobians, vectors).reshape(
            -1, self.output_jacobians.shape[-1]
        )
        return self.factor / vectors.shape[0] * rows.T @ rows

    def ief_scaling(self) -> Tensor:
        """``s_n = ||d l_n / d z_n||^2`` (Wu et al. 2024, eq. 6)."""
        return self.output_grads.pow(2).sum(dim=1)

    def ief_matrix(self) -> Tensor:
        """``c J^T diag(s)^{-1} J`` (Wu et al. 2024, eq. 5)."""
        scaled = self.loss_grads / self.ief_scaling().sqrt().unsqueeze(1)
        return self.factor * scaled.T @ scaled

    def block_mask(self, blocks: list[list[nn.Parameter]]) -> Tensor:
        """1 on the diagonal blocks given by parameter groups, 0 elsewhere."""
        sizes = {id(p): p.numel() for p in self.params}
        offsets, position = {}, 0
        for p in self.params:
            offsets[id(p)] = position
            position += sizes[id(p)]
        mask = torch.zeros(position, position, dtype=torch.float64)
        for block in blocks:
            index = torch.cat(
                [torch.arange(offsets[id(p)], offsets[id(p)] + sizes[id(p)]) for p in block]
            )
            mask[index.unsqueeze(1), index.unsqueeze(0)] = 1
        return mask


def dense_batch(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    likelihood: str,
    reduction: str,
    variance: float = 0.5,
) -> DenseBatch:
    """Per-sample gradients, output Jacobians and Hessians by one autograd call each."""
    params = [p for p in model.parameters() if p.requires_grad]
    loss_grads, jacobians, output_grads, hessians = [], [], [], []
    for n in range(inputs.shape[0]):
        output = model(inputs[n : n + 1])[0]
        loss = per_sample_loss(likelihood, output, targets[n], variance)
        grads = torch.autograd.grad(loss, params, retain_graph=True)
        loss_grads.append(torch.cat([g.reshape(-1) for g in grads]))
        rows = []
        for c in range(output.shape[0]):
            grads = torch.autograd.grad(output[c], params, retain_graph=True)
            rows.append(torch.cat([g.reshape(-1) for g in grads]))
        jacobians.append(torch.stack(rows))
        detached = output.detach().requires_grad_(True)
        output_loss = per_sample_loss(likelihood, detached, targets[n], variance)
        output_grads.append(torch.autograd.grad(output_loss, detached)[0])
        hessians.append(
            torch.autograd.functional.hessian(
                lambda z, n=n: per_sample_loss(likelihood, z, targets[n], variance),
                output.detach(),
            )
        )
    with torch.no_grad():
        logits = model(inputs)
    return DenseBatch(
        params=params,
        factor=reduction_constant(likelihood, reduction, logits),
        loss_grads=torch.stack(loss_grads),
        output_jacobians=torch.stack(jacobians),
        output_grads=torch.stack(output_grads),
        output_hessians=torch.stack(hessians),
    )


def relative_error(actual: Tensor, expected: Tensor) -> float:
    """``||actual - expected|| / ||expected||``: the tests' measure of agreement."""
    return ((actual - expected).norm() / expected.norm()).item()


def batch_fisher(model: nn.Module, inputs: Tensor, params: list[str], reduction: str) -> Tensor:
    """``c sum_n J_n^T H_n J_n`` over the named parameters, ``J_n`` the rows of the Jacobian
    of the whole batch's output: the Fisher of a model whose datapoints interact (BatchNorm in
    train mode), for the categorical likelihood. Runs a copy of the model (its buffers are
    left alone)."""
    model = copy.deepcopy(model)
    params = [dict(model.named_parameters())[name] for name in params]
    logits = model(inputs)
    jacobian = torch.stack(
        [
            torch.cat([g.reshape(-1) for g in torch.autograd.grad(z, params, retain_graph=True)])
            for z in logits.reshape(-1)
        ]
    ).reshape(*logits.shape, -1)
    hessians = torch.stack(
        [
            torch.autograd.functional.hessian(
                lambda z: per_sample_loss("categorical", z, torch.tensor(0), 0.5), row
            )
            for row in logits.detach()
        ]
    )
    factor = reduction_constant("categorical", reduction, logits)
    return factor * torch.einsum("nca,ncd,ndb->ab", jacobian, hessians, jacobian)


def damped_direction(curvature: Tensor, rhs: Tensor, damping: float) -> Tensor:
    """``(C + λI)^{-1} rhs`` by a dense solve."""
    eye = torch.eye(curvature.shape[0], dtype=curvature.dtype)
    return torch.linalg.solve(curvature + damping * eye, rhs)


def flat_grad(params: list[nn.Parameter]) -> Tensor:
    """Concatenate ``.grad`` of the parameters."""
    return torch.cat([p.grad.reshape(-1) for p in params])


def expected_update(batch, fisher, structure, damping, blocks, vectors=None):
    """The damped update of a (fisher, structure) pair by a dense solve.

    ``blocks`` are the parameter groups of ``structure="layer"``; ``vectors`` the sampled
    output gradients ``(M, N, C)`` of ``fisher="mc"``.
    """
    if fisher == "empirical":
        curvature, rhs = batch.empirical_fisher(), batch.gradient
    elif fisher == "ief":
        curvature = batch.empirical_fisher()
        rhs = batch.factor * batch.loss_grads.T @ batch.ief_scaling()
    elif fisher == "ief_matrix":
        curvature, rhs = batch.ief_matrix(), batch.gradient
    elif fisher == "mc":
        curvature, rhs = batch.sampled_fisher(vectors), batch.gradient
    else:
        curvature, rhs = batch.exact_fisher(), batch.gradient
    if structure == "layer":
        curvature = curvature * batch.block_mask(blocks)
    return damped_direction(curvature, rhs, damping)
