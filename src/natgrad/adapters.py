"""Adapters: how each layer type maps to the neuron view.

A layer whose per-sample weight gradients are sums of outer products ``e a^T`` (Benzing 2022,
App. I) is described by a :class:`LayerAdapter`: which rows ``A`` of its input and ``E`` of its
output gradient it has, and how its weight is laid out as the ``(d_out, d_in)`` matrix those
rows multiply. natgrad has adapters for ``nn.Linear``, ``nn.Conv2d`` (by unfolding),
``nn.Embedding`` (one-hot inputs kept as token indices) and, found by import path so that
natgrad does not import the library, HuggingFace's ``Conv1D``; users register their own with
:func:`natgrad.register_adapter`. :mod:`natgrad.capture` records the rows at run time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.grad import conv2d_weight


class LayerAdapter:
    """How one module type maps to the neuron view: rows of ``A`` and ``E``, weight matrix."""

    def check(self, module: nn.Module) -> str | None:
        """Return why this adapter cannot handle ``module``, or ``None`` if it can.

        Such a module may still have exact per-sample gradients by another route (the
        torch.func fallback of :mod:`natgrad.fallback`).
        """
        return None

    def rejects(self, module: nn.Module) -> str | None:
        """Return why no per-sample gradient of ``module`` can be known, or ``None``.

        Unlike :meth:`check`, no other route helps (the forward pass changes the weight in
        place, or torch couples the datapoints' gradients): natgrad raises unless the module
        is overridden to the plain gradient.
        """
        return None

    def matrix_shape(self, module: nn.Module) -> tuple[int, int]:
        """``(d_out, d_in)`` of the layer's weight matrix in the neuron view (no bias column)."""
        shape = module.weight.shape  # no indexing: weight[0] would be a tensor operation
        return shape[0], math.prod(shape[1:])

    def to_weight(self, module: nn.Module, matrix: Tensor) -> Tensor:
        """Weight matrices ``(*, d_out, d_in)`` in the layout of ``module.weight``."""
        return matrix.reshape(*matrix.shape[:-2], *module.weight.shape)

    def to_matrix(self, module: nn.Module, weight: Tensor) -> Tensor:
        """Tensors shaped like ``module.weight`` (after any leading batch dimensions) as
        ``(*, d_out, d_in)`` weight matrices (views of a contiguous tensor)."""
        lead = weight.shape[: weight.dim() - module.weight.dim()]
        return weight.reshape(*lead, module.weight.shape[0], -1)

    token_inputs: bool = False
    """Whether :meth:`input_rows` gives token indices ``(N, T)`` instead of dense rows."""

    def check_input(self, module: nn.Module, layer_input: Tensor) -> None:
        """Raise a ``ValueError`` naming the expected shape if ``layer_input`` has none the
        adapter can turn into rows (checked when the layer is captured, before any row is
        formed)."""

    def input_rows(self, module: nn.Module, layer_input: Tensor) -> Tensor:
        """``A`` of shape ``(N, T, d_in)`` (no bias column) from the module input, or token
        indices ``(N, T)`` if :attr:`token_inputs`."""
        raise NotImplementedError

    grads_from_inputs: bool = False
    """Whether :meth:`datapoint_weight_grads` and :meth:`weight_grad` compute weight gradients
    from the layer's inputs without forming the rows ``A`` (worth it where the rows are much
    larger than the inputs, as a convolution's unfolded patches are)."""

    def datapoint_weight_grads(
        self, module: nn.Module, layer_inputs: Sequence[Tensor], output_grads: Tensor
    ) -> Tensor:
        """Per-datapoint weight gradients ``g_{kn} = sum_t e_{knt} a_{nt}^T``, ``(K, N, d_out,
        d_in)``, from the layer's inputs (one per call, their positions concatenated in
        ``output_grads``) and output-gradient rows ``(K, N, T, d_out)`` as :meth:`output_rows`
        gives them (only if :attr:`grads_from_inputs`)."""
        raise NotImplementedError

    def weight_grad(
        self, module: nn.Module, layer_inputs: Sequence[Tensor], output_grads: Tensor
    ) -> Tensor:
        """``sum_{n,t} e_{nt} a_{nt}^T``, ``(d_out, d_in)``, from the layer's inputs and
        output-gradient rows ``(N, T, d_out)`` (only if :attr:`grads_from_inputs`)."""
        raise NotImplementedError

    def output_rows(self, module: nn.Module, output_grad: Tensor, lead: int) -> Tensor:
        """``E`` of shape ``(*lead_shape, N, T, d_out)`` from a gradient w.r.t. the output.

        ``lead`` is the number of leading batch dimensions in front of the datapoint dimension
        (0 for the loss gradient, 1 for a batch of back-propagated vectors).
        """
        raise NotImplementedError

    @staticmethod
    def has_bias(module: nn.Module) -> bool:
        """Whether the layer's bias is trained (and so is a constant input column)."""
        bias = getattr(module, "bias", None)
        return bias is not None and bias.requires_grad

    def grad_buffer(self, module: nn.Module) -> Tensor | None:
        """The existing weight ``.grad`` as a ``(d_out, d_in)`` view to overwrite in place.

        Writing into the gradient autograd just allocated saves a fresh allocation (and its
        page faults) per step; ``None`` when there is no usable gradient tensor.
        """
        weight = module.weight
        grad = weight.grad
        if grad is None or grad.dtype != weight.dtype or not grad.is_contiguous():
            return None
        return self.to_matrix(module, grad)

    def write_grad(self, module: nn.Module, weight_grad: Tensor, bias_grad: Tensor | None) -> None:
        """Set ``.grad`` of weight (and bias) from a weight matrix and a bias vector."""
        # contiguous, as autograd lays out gradients (it accumulates into them in place)
        weight = self.to_weight(module, weight_grad).to(module.weight.dtype).contiguous()
        module.weight.grad = weight
        if bias_grad is not None:
            module.bias.grad = bias_grad.to(module.bias.dtype).contiguous()


class LinearAdapter(LayerAdapter):
    """``nn.Linear`` on inputs ``(N, d_in)`` or ``(N, *, d_in)`` (weight shared over ``*``)."""

    def check_input(self, module: nn.Module, layer_input: Tensor) -> None:
        if layer_input.dim() < 2:
            raise ValueError(
                f"natgrad needs a batch dimension: nn.Linear got an input of shape "
                f"{tuple(layer_input.shape)}; pass inputs of shape (N, ..., {module.in_features})"
            )

    def input_rows(self, module: nn.Module, layer_input: Tensor) -> Tensor:
        self.check_input(module, layer_input)
        return layer_input.reshape(layer_input.shape[0], -1, layer_input.shape[-1])

    def output_rows(self, module: nn.Module, output_grad: Tensor, lead: int) -> Tensor:
        shape = output_grad.shape
        return output_grad.reshape(*shape[: lead + 1], -1, shape[-1])

    def to_weight(self, module: nn.Module, matrix: Tensor) -> Tensor:
        # nn.Linear stores the (d_out, d_in) matrix itself: no reshape (a torch call) per step
        return matrix if module.weight.dim() == 2 else super().to_weight(module, matrix)

    def to_matrix(self, module: nn.Module, weight: Tensor) -> Tensor:
        return weight if module.weight.dim() == 2 else super().to_matrix(module, weight)


class TransposedLinearAdapter(LinearAdapter):
    """A linear layer whose weight is stored as ``(d_in, d_out)``: ``y = x W + b``.

    HuggingFace's ``transformers.pytorch_utils.Conv1D`` (GPT-2) is one. The neuron-view
    weight matrix is ``weight.T``; a module type of one's own with this layout and a ``weight``
    (and optional ``bias``) attribute is registered with
    ``natgrad.register_adapter(MyModule, TransposedLinearAdapter())``.
    """

    def matrix_shape(self, module: nn.Module) -> tuple[int, int]:
        return module.weight.shape[1], module.weight.shape[0]

    def to_weight(self, module: nn.Module, matrix: Tensor) -> Tensor:
        return matrix.transpose(-1, -2)

    def to_matrix(self, module: nn.Module, weight: Tensor) -> Tensor:
        return weight.transpose(-1, -2)


class Conv2dAdapter(LayerAdapter):
    """``nn.Conv2d`` with ``groups=1`` and zero padding; the weight is shared over positions.

    The rows ``A`` are the unfolded patches, ``C_in k_h k_w`` numbers per output position: far
    more than the input itself. Weight gradients, per datapoint or summed, are computed without
    them by the convolution's own weight-gradient kernel (:meth:`datapoint_weight_grads`,
    :meth:`weight_grad`), so the patches are formed only for what needs the rows themselves
    (KFAC/FOOF input factors, the pairwise Gram of :func:`natgrad.linalg.gram`).
    """

    grads_from_inputs = True

    def check(self, module: nn.Module) -> str | None:
        if module.groups != 1:
            return f"groups={module.groups} (natgrad supports groups=1)"
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r} (natgrad supports 'zeros')"
        if isinstance(module.padding, str):
            return f"padding={module.padding!r} (give explicit integer padding)"
        return None

    def check_input(self, module: nn.Module, layer_input: Tensor) -> None:
        if layer_input.dim() != 4:
            raise ValueError(
                f"natgrad needs batched images: nn.Conv2d got an input of shape "
                f"{tuple(layer_input.shape)}; pass (N, C, H, W)"
            )

    def input_rows(self, module: nn.Module, layer_input: Tensor) -> Tensor:
        self.check_input(module, layer_input)
        # the patches of F.unfold, laid out (N, positions, C k_h k_w) in one copy: unfolding
        # F.unfold's (N, C k_h k_w, positions) output is im2col plus a transposing copy
        (pad_h, pad_w), (dil_h, dil_w) = module.padding, module.dilation
        (k_h, k_w), (stride_h, stride_w) = module.kernel_size, module.stride
        padded = F.pad(layer_input, (pad_w, pad_w, pad_h, pad_h))
        windows = padded.unfold(2, dil_h * (k_h - 1) + 1, stride_h).unfold(
            3, dil_w * (k_w - 1) + 1, stride_w
        )[..., ::dil_h, ::dil_w]  # (N, C, H', W', k_h, k_w)
        n, _, out_h, out_w = windows.shape[:4]
        return windows.permute(0, 2, 3, 1, 4, 5).reshape(n, out_h * out_w, -1)

    def output_rows(self, module: nn.Module, output_grad: Tensor, lead: int) -> Tensor:
        return output_grad.flatten(start_dim=-2).transpose(-1, -2)

    @staticmethod
    def output_size(module: nn.Module, layer_input: Tensor) -> tuple[int, int]:
        """``(H', W')``, the output positions of the convolution on ``layer_input``."""
        height, width = (
            (size + 2 * pad - dil * (kernel - 1) - 1) // stride + 1
            for size, pad, dil, kernel, stride in zip(
                layer_input.shape[-2:], module.padding, module.dilation, module.kernel_size,
                module.stride, strict=True,
            )
        )  # fmt: skip
        return height, width

    def _calls(
        self, module: nn.Module, layer_inputs: Sequence[Tensor], output_grads: Tensor
    ) -> list[tuple[Tensor, Tensor]]:
        """Per call, its input and its output gradients ``(*lead, d_out, H', W')`` (the
        call's positions of the rows ``(*lead, T, d_out)``)."""
        calls, start = [], 0
        for layer_input in layer_inputs:
            out_h, out_w = self.output_size(module, layer_input)
            grads = output_grads[..., start : start + out_h * out_w, :].transpose(-1, -2)
            calls.append((layer_input, grads.unflatten(-1, (out_h, out_w))))
            start += out_h * out_w
        return calls

    def datapoint_weight_grads(
        self, module: nn.Module, layer_inputs: Sequence[Tensor], output_grads: Tensor
    ) -> Tensor:
        """Per-datapoint weight gradients by one weight-gradient convolution per call, the
        ``K N`` datapoints as groups: channels ``(k, n, c)`` of the input repeated ``K``
        times, output channels ``(k, n, o)`` of the gradients (as ``torch.func.vmap`` batches
        a convolution's weight gradient)."""
        sets, num, _, d_out = output_grads.shape
        parts = []
        for layer_input, grads in self._calls(module, layer_inputs, output_grads):
            channels, height, width = layer_input.shape[1:]
            inputs = layer_input.expand(sets, *layer_input.shape)
            parts.append(
                conv2d_weight(
                    inputs.reshape(1, sets * num * channels, height, width),
                    (sets * num * d_out, channels // module.groups, *module.kernel_size),
                    grads.reshape(1, sets * num * d_out, *grads.shape[-2:]),
                    module.stride, module.padding, module.dilation, sets * num * module.groups,
                ).reshape(sets, num, d_out, -1)
            )  # fmt: skip
        return sum(parts[1:], start=parts[0])

    def weight_grad(
        self, module: nn.Module, layer_inputs: Sequence[Tensor], output_grads: Tensor
    ) -> Tensor:
        parts = [
            conv2d_weight(
                layer_input, module.weight.shape, grads.contiguous(), module.stride,
                module.padding, module.dilation, module.groups,
            ).reshape(module.weight.shape[0], -1)
            for layer_input, grads in self._calls(module, layer_inputs, output_grads)
        ]  # fmt: skip
        return sum(parts[1:], start=parts[0])


class EmbeddingAdapter(LinearAdapter):
    """``nn.Embedding`` as a linear layer on one-hot inputs, weight shared over the tokens.

    The inputs are kept as token indices ``(N, T)``, ``-1`` marking ``padding_idx`` (the
    one-hot rows would be ``(N, T, num_embeddings)``). The neuron-view weight matrix is
    ``Embedding.weight`` transposed.
    """

    token_inputs = True

    def rejects(self, module: nn.Module) -> str | None:
        if module.max_norm is not None:
            return (
                f"max_norm={module.max_norm} renormalises the weight in place in the forward pass"
            )
        if module.sparse:
            return "sparse=True gives sparse gradients (natgrad writes dense ones)"
        if module.scale_grad_by_freq:
            return "scale_grad_by_freq=True scales gradients by counts over the whole batch"
        return None

    def check_input(self, module: nn.Module, layer_input: Tensor) -> None:
        if layer_input.dim() < 1:
            raise ValueError(
                "natgrad needs a batch dimension: nn.Embedding got a single index; pass "
                "indices of shape (N,) or (N, T)"
            )

    def input_rows(self, module: nn.Module, layer_input: Tensor) -> Tensor:
        self.check_input(module, layer_input)
        indices = layer_input.reshape(layer_input.shape[0], -1).long()
        if module.padding_idx is not None:  # torch gives the padding row no gradient
            indices = indices.masked_fill(indices == module.padding_idx, -1)
        return indices

    def matrix_shape(self, module: nn.Module) -> tuple[int, int]:
        return module.embedding_dim, module.num_embeddings

    def to_weight(self, module: nn.Module, matrix: Tensor) -> Tensor:
        return matrix.transpose(-1, -2)

    def to_matrix(self, module: nn.Module, weight: Tensor) -> Tensor:
        return weight.transpose(-1, -2)


ADAPTERS: dict[type[nn.Module], LayerAdapter] = {
    nn.Linear: LinearAdapter(),
    nn.Conv2d: Conv2dAdapter(),
    nn.Embedding: EmbeddingAdapter(),
}


ADAPTERS_BY_PATH: dict[str, LayerAdapter] = {
    "transformers.pytorch_utils.Conv1D": TransposedLinearAdapter(),
}
"""Adapters of other libraries' module types, by import path (``module.qualname``), so that
natgrad does not import those libraries."""


def type_path(module_type: type) -> str:
    """``"package.module.QualName"`` of a class."""
    return f"{module_type.__module__}.{module_type.__qualname__}"


def adapter_for(module: nn.Module) -> LayerAdapter | None:
    """The adapter of ``module``'s exact type, or ``None`` if natgrad has none."""
    adapter = ADAPTERS.get(type(module))
    return adapter if adapter is not None else ADAPTERS_BY_PATH.get(type_path(type(module)))


__all__ = [
    "ADAPTERS",
    "ADAPTERS_BY_PATH",
    "Conv2dAdapter",
    "EmbeddingAdapter",
    "LayerAdapter",
    "LinearAdapter",
    "TransposedLinearAdapter",
    "adapter_for",
    "type_path",
]
