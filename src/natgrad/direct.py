"""Per-sample gradient rows of normalisation layers: LayerNorm, GroupNorm, BatchNorm.

A normalisation layer maps its input ``x`` to ``y = x̂ ⊙ w + b``, with ``x̂`` the input
normalised by a mean and a variance and ``w``, ``b`` the affine parameters, shared over the
positions ``t`` they broadcast across (tokens for ``nn.LayerNorm``, pixels for the channel-wise
norms). With ``e`` the output-gradient rows captured exactly as for any layer
(:mod:`natgrad.capture`), datapoint ``(k, n)`` has the gradient

    ``∇w = sum_t e_{knt} ⊙ x̂_{nt}``,    ``∇b = sum_t e_{knt}``.

``w`` acts element-wise, so this is not a Kronecker pair ``(A, E)``: natgrad materialises these
rows (``K x N x P_b`` numbers, ``P_b`` twice the normalised width) and adds them to the
Woodbury Gram directly (:class:`natgrad.precond.blocks.DirectBatch`). ``x̂`` is recomputed from
the captured input with the module's own statistics and ``eps``:

* ``nn.LayerNorm``: mean and biased variance over the ``normalized_shape`` trailing dimensions;
* ``nn.GroupNorm``: over each group of channels and all positions, per datapoint;
* ``nn.BatchNorm1d/2d/3d``: per channel, the running statistics in eval mode, else the batch
  mean and biased variance of the input (what torch normalises with);
* RMSNorm (``nn.RMSNorm``, HuggingFace's ``LlamaRMSNorm``): ``x̂ = x / sqrt(mean(x^2) + eps)``
  over the trailing dimensions of the weight, no mean removed and usually no bias
  (:class:`RMSNormAdapter`; ``LlamaRMSNorm`` computes ``x̂`` in float32 whatever the input's
  dtype, and so does its adapter, so that the rows are those of the model as it runs).

Other libraries' norms are recognised by import path (:data:`NORM_ADAPTERS_BY_PATH`), so natgrad
does not import them; :func:`natgrad.register_adapter` adds a module type of one's own.

BatchNorm in train mode: the batch statistics couple the datapoints, so a per-sample gradient is
not defined by the model alone. natgrad's rows are those of the batch's own backward pass: the
row of datapoint ``(k, n)`` is the gradient of ``sum_m v_{km} · z_m`` with respect to the
parameters as used at datapoint ``n`` (one copy of the parameters per datapoint, the statistics
computed from all of them). Consequences:

* for the BatchNorm's own weight and bias, and for every layer after the BatchNorm, the
  statistics are constants (they do not depend on these parameters): the rows are the usual
  per-sample gradients of the network whose normalisation uses the batch's mean and variance;
* for layers before a train-mode BatchNorm, a row also carries the paths through the statistics
  (the gradient torch back-propagates), so the rows of the loss still sum to the true gradient,
  ``sum_n g_n = ∇L``, and EF's right-hand side is the gradient the optimiser sees. The extra
  datapoints of ``fisher="mc"``/``"exact"`` are back-propagated one vector set at a time for the
  whole batch (as always), so there a row also carries the other datapoints' vectors of its set
  through the statistics.

In eval mode the model is batch-independent and every row is the usual per-sample gradient.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class NormAdapter:
    """Rows of the affine parameters of one normalisation module type."""

    fresh_normalised: bool = False
    """Whether :meth:`normalised` returns a new tensor (no view of the input), which
    :meth:`per_sample_rows` may then overwrite with ``e ⊙ x̂`` instead of allocating another."""

    def normalised(self, module: nn.Module, layer_input: Tensor) -> Tensor:
        """``x̂``, shaped like the input."""
        raise NotImplementedError

    def sum_positions(self, module: nn.Module, values: Tensor) -> Tensor:
        """Sum ``(K, N, *input_shape)`` over the positions a parameter is shared across:
        ``(K, N, numel)`` in the parameter's layout."""
        raise NotImplementedError

    def per_sample_rows(
        self, module: nn.Module, layer_input: Tensor, output_grads: Tensor
    ) -> Tensor:
        """Per-sample gradients ``(K, N, P)`` of the trainable affine parameters, in the order
        of ``module.parameters()``, from the input and ``K`` output gradients ``(K, N, ...)``."""
        normalised = self.normalised(module, layer_input)
        in_place = (
            self.fresh_normalised
            and output_grads.shape[0] == 1
            and output_grads.shape[1:] == normalised.shape
            and output_grads.dtype == normalised.dtype
        )
        rows = []
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            values = output_grads
            if name == "weight":
                values = (
                    normalised.mul_(output_grads[0]).unsqueeze(0)
                    if in_place
                    else output_grads * normalised
                )
            rows.append(self.sum_positions(module, values))
        return torch.cat(rows, dim=-1)


def _standardise(values: Tensor, dims: tuple[int, ...], eps: float) -> Tensor:
    mean = values.mean(dim=dims, keepdim=True)
    variance = values.var(dim=dims, unbiased=False, keepdim=True)
    return (values - mean) * torch.rsqrt(variance + eps)


class LayerNormAdapter(NormAdapter):
    """``nn.LayerNorm``: weight and bias of shape ``normalized_shape``, shared over the tokens."""

    fresh_normalised = True

    def normalised(self, module: nn.Module, layer_input: Tensor) -> Tensor:
        dims = tuple(range(-len(module.normalized_shape), 0))
        return _standardise(layer_input, dims, module.eps)

    def sum_positions(self, module: nn.Module, values: Tensor) -> Tensor:
        width = math.prod(module.normalized_shape)
        return values.reshape(*values.shape[:2], -1, width).sum(dim=2)


class ChannelNormAdapter(NormAdapter):
    """Norms with one weight and bias per channel (dimension 1), shared over the positions."""

    def sum_positions(self, module: nn.Module, values: Tensor) -> Tensor:
        return values.reshape(*values.shape[:3], -1).sum(dim=3)


class GroupNormAdapter(ChannelNormAdapter):
    """``nn.GroupNorm``: statistics per datapoint over each group of channels."""

    fresh_normalised = True

    def normalised(self, module: nn.Module, layer_input: Tensor) -> Tensor:
        grouped = layer_input.reshape(layer_input.shape[0], module.num_groups, -1)
        return _standardise(grouped, (2,), module.eps).reshape(layer_input.shape)


class BatchNormAdapter(ChannelNormAdapter):
    """``nn.BatchNorm1d/2d/3d``: running statistics in eval mode, batch statistics otherwise."""

    fresh_normalised = True

    def normalised(self, module: nn.Module, layer_input: Tensor) -> Tensor:
        if module.training or module.running_mean is None:
            # torch's batch-norm kernel: the batch mean and biased variance per channel, as
            # _standardise over (0, 2, ...) computes them, in a third of its time
            return F.batch_norm(layer_input, None, None, training=True, eps=module.eps)
        shape = (1, -1) + (1,) * (layer_input.dim() - 2)
        mean = module.running_mean.reshape(shape)
        variance = module.running_var.reshape(shape)
        return (layer_input - mean) * torch.rsqrt(variance + module.eps)


class RMSNormAdapter(NormAdapter):
    """Root-mean-square norms ``y = w ⊙ x / sqrt(mean(x^2) + eps)``, weight shared over tokens.

    Parameters
    ----------
    eps_attribute
        The module attribute holding ``eps`` (``"eps"`` for ``nn.RMSNorm``,
        ``"variance_epsilon"`` for HuggingFace's RMSNorms); ``None`` in it means the machine
        epsilon of the input's dtype, as ``nn.RMSNorm`` does.
    compute_dtype
        The dtype the module normalises in (HuggingFace's RMSNorms: ``torch.float32``, then
        cast back to the input's dtype), or ``None`` for the input's own dtype.
    """

    def __init__(self, eps_attribute: str = "eps", compute_dtype: torch.dtype | None = None):
        self.eps_attribute = eps_attribute
        self.compute_dtype = compute_dtype

    def normalised(self, module: nn.Module, layer_input: Tensor) -> Tensor:
        values = layer_input if self.compute_dtype is None else layer_input.to(self.compute_dtype)
        eps = getattr(module, self.eps_attribute)
        if eps is None:
            eps = torch.finfo(values.dtype).eps
        dims = tuple(range(-module.weight.dim(), 0))
        mean_square = values.pow(2).mean(dim=dims, keepdim=True)
        return (values * torch.rsqrt(mean_square + eps)).to(layer_input.dtype)

    def sum_positions(self, module: nn.Module, values: Tensor) -> Tensor:
        width = module.weight.numel()
        return values.reshape(*values.shape[:2], -1, width).sum(dim=2)


NORM_ADAPTERS: dict[type[nn.Module], NormAdapter] = {
    nn.LayerNorm: LayerNormAdapter(),
    nn.GroupNorm: GroupNormAdapter(),
    nn.BatchNorm1d: BatchNormAdapter(),
    nn.BatchNorm2d: BatchNormAdapter(),
    nn.BatchNorm3d: BatchNormAdapter(),
}
if hasattr(nn, "RMSNorm"):  # torch >= 2.4
    NORM_ADAPTERS[nn.RMSNorm] = RMSNormAdapter("eps")

NORM_ADAPTERS_BY_PATH: dict[str, NormAdapter] = {
    "transformers.models.llama.modeling_llama.LlamaRMSNorm": RMSNormAdapter(
        "variance_epsilon", torch.float32
    ),
}
"""Adapters of other libraries' norms, by import path (``module.qualname``)."""


def norm_adapter_for(module: nn.Module) -> NormAdapter | None:
    """The adapter of ``module``'s exact type, or ``None`` if it is not a supported norm."""
    adapter = NORM_ADAPTERS.get(type(module))
    if adapter is not None:
        return adapter
    return NORM_ADAPTERS_BY_PATH.get(f"{type(module).__module__}.{type(module).__qualname__}")


__all__ = [
    "NORM_ADAPTERS",
    "NORM_ADAPTERS_BY_PATH",
    "BatchNormAdapter",
    "ChannelNormAdapter",
    "GroupNormAdapter",
    "LayerNormAdapter",
    "NormAdapter",
    "RMSNormAdapter",
    "norm_adapter_for",
]
