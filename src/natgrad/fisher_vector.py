"""Exact mini-batch Fisher-vector products through torch.func, with no Fisher matrix.

For a batch loss ``L = c sum_n l_n(z_n)`` with model outputs ``z_n = f(x_n; θ)`` the Fisher (the
generalised Gauss-Newton matrix for the likelihoods of natgrad, Kunstner et al. 2019, eq. 26-35) is
``F = c sum_n J_n^T H_n J_n`` with ``J_n = d z_n / d θ`` and ``H_n = d^2 l_n / d z_n^2``.
``F v`` is computed as a Jacobian-vector product (forward mode), the output Hessian applied to
each row, and a vector-Jacobian product (reverse mode): about the cost of three passes through
the model, and no per-sample gradient.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp, vjp

from natgrad.capture import model_logits
from natgrad.likelihoods import Likelihood, check_logits


def fisher_vector_product(
    model: nn.Module,
    model_args: tuple,
    params: dict[str, Tensor],
    vector: Sequence[Tensor],
    likelihood: Likelihood,
    reduction: str,
    model_kwargs: Mapping[str, object] | None = None,
    counted: Tensor | None = None,
) -> list[Tensor]:
    """``F v`` for the parameters ``params`` (a subset of the model's, by name).

    Parameters
    ----------
    model
        The model; parameters not in ``params`` are taken from it unchanged, buffers as
        copies (a train-mode BatchNorm normalises by the batch statistics and leaves its
        running statistics untouched).
    model_args
        Positional arguments of the model's forward pass (the inputs of the batch).
    params
        ``{name: tensor}`` of the parameters the Fisher refers to, in the order of ``vector``.
    vector
        One tensor per parameter, of the parameter's shape.
    likelihood, reduction
        The loss the Fisher belongs to (see :mod:`natgrad.likelihoods`).
    model_kwargs
        Keyword arguments of the model's forward pass (a HuggingFace model's ``input_ids``,
        ``attention_mask``, ...). The model may return the logits inside a structure
        (:func:`natgrad.capture.model_logits`).
    counted
        Boolean ``logits.shape[:-1]``: the positions in the loss
        (:meth:`natgrad.likelihoods.Likelihood.counted`); ``None``: all of them.

    Returns
    -------
    ``F v`` as one tensor per parameter.
    """
    names = list(params)
    if len(vector) != len(names):
        raise ValueError(f"the vector has {len(vector)} blocks for {len(names)} parameters")
    for name, block in zip(names, vector, strict=True):
        if block.shape != params[name].shape:
            raise ValueError(
                f"vector block for '{name}' has shape {tuple(block.shape)}, "
                f"expected {tuple(params[name].shape)}"
            )

    def outputs(*values: Tensor) -> Tensor:
        # copies of the buffers, made inside the transform: a module in train mode that
        # updates its buffers (BatchNorm's running statistics and num_batches_tracked) updates
        # the copies, so the product leaves the model as it was and torch.func sees no
        # mutation of a captured tensor; the outputs are those of the train-mode forward
        buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
        returned = functional_call(
            model,
            {**buffers, **dict(zip(names, values, strict=True))},
            model_args,
            dict(model_kwargs or {}),
        )
        return model_logits(returned)

    primals = tuple(params[name].detach() for name in names)
    logits, output_tangent = jvp(outputs, primals, tuple(vector))
    check_logits(logits)
    if counted is None:
        factor = likelihood.reduction_factor(logits, reduction)
        weighted = factor * likelihood.hessian_vector_product(logits.detach(), output_tangent)
    else:
        factor = likelihood.reduction_factor(logits, reduction, counted)
        product = likelihood.hessian_vector_product(logits.detach(), output_tangent)
        weighted = factor * product * counted.unsqueeze(-1).to(product.dtype)
    _, pullback = vjp(outputs, *primals)
    return list(pullback(weighted))


def flatten(blocks: Sequence[Tensor]) -> Tensor:
    """Concatenate blocks into one vector."""
    return torch.cat([block.reshape(-1) for block in blocks])


__all__ = ["fisher_vector_product", "flatten"]
