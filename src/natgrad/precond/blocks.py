"""Curvature blocks of one batch: what the solvers see of each preconditioned module.

Datapoint rows come in ``K`` sets of ``N`` (``K = 1`` for the true-label loss gradients; ``M``
sampled labels or ``C`` Hessian square-root columns for ``fisher="mc"``/``"exact"``), ordered
``k``-major: row ``k N + n``. Two kinds of block hold them:

* :class:`LayerBatch`, a neuron-view layer: the rows stay output gradients ``E`` of shape
  ``(K, N, T, d_out)`` next to the inputs ``A`` ``(N, T, d_in)``; the per-sample gradients
  ``g_{kn} = sum_t e_{knt} a_{nt}^T`` are never formed (Shrestha 2023, eq. 41-43);
  :class:`TokenBatch`, its variant for ``nn.Embedding``, keeps ``A`` as token indices;
* :class:`DirectBatch`, parameters whose per-sample gradients are materialised, rows of shape
  ``(K, N, P_b)``: normalisation layers (:mod:`natgrad.direct`) and the torch.func fallback
  (:mod:`natgrad.fallback`).

Both offer the Woodbury solvers the same operations on their own kind of rows: the Gram
``J_a J_b^T`` (:meth:`gram`), ``J^T u`` written into ``.grad`` (:meth:`write_combination`), the
materialised ``(K N, P_b)`` rows in the order of the parameters (:meth:`per_datapoint_grads`)
and a flat direction written into ``.grad`` (:meth:`write_flat`). Blocks add up: the Gram of a
group of blocks is the sum of their Grams (Shrestha 2023, eq. 41). For data parallelism
(:mod:`natgrad.distributed`) a block lists its row tensors with their datapoint and token
dimensions (:meth:`row_tensors`) and is rebuilt around the rows of all ranks
(:meth:`with_rows`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property

import torch
from torch import Tensor, nn

from natgrad.adapters import LayerAdapter
from natgrad.linalg import (
    combine_rows,
    combined_jtu,
    gram,
    gram_times,
    input_gram,
    per_datapoint_grads,
    symmetric_gram,
    token_gram,
    token_matrix,
    token_sums,
    uses_input_gram,
)

KEPT_GRADS_RATIO = 8
"""How many times the memory of a layer's captured tensors its datapoint gradients may take to
be kept from the Gram to ``J^T u`` (which then costs a ``K N x P`` product instead of a
weight-gradient GEMM over all positions)."""


def add_into(gram: Tensor, into: Tensor | None) -> Tensor:
    """``into + gram``, in place in ``into`` where its dtype holds the sum (``gram`` if
    ``into`` is ``None``): the Grams of a group of blocks summed without a temporary."""
    if into is None:
        return gram
    if torch.result_type(into, gram) == into.dtype:
        return into.add_(gram)
    return into + gram


@dataclass
class LayerBatch:
    """One layer's neuron view for the current batch.

    ``layer_inputs`` are the layer's captured inputs, one per call (datapoints first); the rows
    ``A`` (:attr:`inputs`) are formed from them at first use, so that a convolution's unfolded
    patches are formed only by what needs them: its weight gradients, per datapoint or summed,
    come from the inputs directly where the adapter computes them so
    (:attr:`natgrad.adapters.LayerAdapter.grads_from_inputs`).
    ``loss_output_grads`` are the true-label output-gradient rows as the loss's backward pass
    gave them, shape ``(1, N, T, d_out)``, still multiplied by ``loss_factor``, the reduction
    factor ``c`` (times a gradient scaler's scale); :attr:`loss_grads`, the rows of the
    per-datapoint losses, divides it out at first use, and a solver that folds ``1 / c`` into
    its own scaling reads the rows without that copy (:meth:`loss_rows`). ``extra_grads`` are
    the ``K`` extra datapoint sets of ``mc`` / ``exact``, shape ``(K, N, T, d_out)``, or
    ``None``.
    """

    name: str
    module: nn.Module
    adapter: LayerAdapter
    layer_inputs: list[Tensor]
    loss_output_grads: Tensor
    extra_grads: Tensor | None
    has_bias: bool
    loss_factor: float = 1.0
    _loss_grads: Tensor | None = field(default=None, repr=False)
    _rows: Tensor | None = field(default=None, repr=False)
    _inputs_gram: Tensor | None = field(default=None, repr=False)
    _kept_grads: tuple[Tensor, Tensor] | None = field(default=None, repr=False)

    @property
    def loss_grads(self) -> Tensor:
        """The true-label output gradients of the per-datapoint losses (the reduction factor
        removed), ``(1, N, T, d_out)``, divided at first use."""
        if self._loss_grads is None:
            self._loss_grads = (
                self.loss_output_grads
                if self.loss_factor == 1.0
                else self.loss_output_grads / self.loss_factor
            )
        return self._loss_grads

    def loss_rows(self) -> tuple[Tensor, float]:
        """The true-label rows as stored and the factor ``c`` they carry: ``loss_grads`` is
        ``rows / c``. Grams, ``J^T u`` and ``J_a J_b^T w`` are linear in the rows, so a solver
        that scales by ``1 / c`` itself saves copying the rows (an activation-sized tensor
        per layer)."""
        if self._loss_grads is not None:
            return self._loss_grads, 1.0
        return self.loss_output_grads, self.loss_factor

    @property
    def inputs(self) -> Tensor:
        """``A``, the input rows ``(N, T, d_in)`` of all calls (formed at first use)."""
        if self._rows is None:
            rows = [self.adapter.input_rows(self.module, x) for x in self.layer_inputs]
            self._rows = rows[0] if len(rows) == 1 else torch.cat(rows, dim=1)
        return self._rows

    @cached_property
    def d_in(self) -> int:
        """Input width of the weight matrix (no bias column)."""
        return self.adapter.matrix_shape(self.module)[1]

    @property
    def num_params(self) -> int:
        return self.loss_output_grads.shape[-1] * (self.d_in + int(self.has_bias))

    def captured(self) -> list[Tensor]:
        """The captured tensors, for the finiteness check of a step."""
        inputs = self.layer_inputs if self.layer_inputs else [self.inputs]
        tensors = [*inputs, self.loss_output_grads]
        return tensors if self.extra_grads is None else [*tensors, self.extra_grads]

    def parameters(self) -> list[nn.Parameter]:
        """The parameters whose ``.grad`` the block writes."""
        return [self.module.weight, self.module.bias] if self.has_bias else [self.module.weight]

    def row_tensors(self) -> list[tuple[Tensor, int, int | None]]:
        """The rows ``A`` and the output-gradient rows as ``(tensor, datapoint dimension,
        token dimension)``."""
        tensors = [self.inputs, self.loss_grads]
        if self.extra_grads is not None:
            tensors.append(self.extra_grads)
        dims = [(0, 1), (1, 2), (1, 2)]
        return [(t, *d) for t, d in zip(tensors, dims, strict=False)]

    def with_rows(self, tensors: Sequence[Tensor]) -> LayerBatch:
        """A copy holding other tensors in the layout of :meth:`row_tensors` (its weight
        gradients then come from the rows)."""
        extra = tensors[2] if len(tensors) > 2 else None
        return replace(
            self, layer_inputs=[], _rows=tensors[0], loss_output_grads=tensors[1],
            loss_factor=1.0, _loss_grads=None, extra_grads=extra, _inputs_gram=None,
            _kept_grads=None,
        )  # fmt: skip

    def grad_buffer(self) -> Tensor | None:
        """The weight's existing ``.grad`` as a matrix view, to be overwritten in place;
        ``None`` for half-precision weights, whose directions are formed in at least float32
        and cast when stored."""
        buffer = self.adapter.grad_buffer(self.module)
        if buffer is None or buffer.dtype in (torch.float32, torch.float64):
            return buffer
        return None

    def bias_buffer(self) -> Tensor | None:
        """The trained bias's existing ``.grad``, to be overwritten in place (``None`` if
        there is none in the bias's float32/float64 dtype)."""
        if not self.has_bias:
            return None
        grad = self.module.bias.grad
        if grad is None or grad.dtype != self.module.bias.dtype or not grad.is_contiguous():
            return None
        return grad if grad.dtype in (torch.float32, torch.float64) else None

    def write_grad(
        self,
        weight_grad: Tensor,
        bias_grad: Tensor | None,
        buffer: Tensor | None = None,
        bias_buffer: Tensor | None = None,
    ) -> None:
        """Store a layer-shaped direction in the parameters' ``.grad``; a ``weight_grad`` that
        is ``buffer`` (:meth:`grad_buffer`, written in place) is there already, and so is a
        ``bias_grad`` that is ``bias_buffer`` (:meth:`bias_buffer`)."""
        if buffer is None or weight_grad is not buffer:
            self.adapter.write_grad(self.module, weight_grad, bias_grad)
        elif bias_grad is not None and (bias_buffer is None or bias_grad is not bias_buffer):
            self.module.bias.grad = bias_grad.to(self.module.bias.dtype).contiguous()

    def gram(
        self,
        rows: Tensor,
        other_rows: Tensor | None = None,
        into: Tensor | None = None,
        upper: bool = False,
    ) -> Tensor:
        """``J_a J_b^T`` of output-gradient rows ``(K_a, N, T, d_out)`` and ``(K_b, ...)``;
        added to ``into`` (a Gram of the same shape, returned) if given (:func:`add_into`);
        ``upper``: of the symmetric Gram, only the blocks on and above the diagonal need to be
        right (:func:`natgrad.linalg.gram`)."""
        if other_rows is None and rows.shape[0] == 1 and rows.shape[2] == 1:
            # one set of rows, one position per datapoint: (A A^T [+ 1]) ⊙ (E E^T), the
            # product added to ``into`` by one call (Shrestha 2023, eq. 41)
            outer = symmetric_gram(rows.reshape(rows.shape[1], -1), mirror=not upper)
            products = self._input_products()
            if into is not None and into.dtype == outer.dtype == products.dtype:
                return into.addcmul_(outer, products)
            return add_into(outer.mul_(products), into)
        other = rows if other_rows is None else other_rows
        if not uses_input_gram(self.d_in, rows, other):  # the datapoint gradients, formed
            grads = self._datapoint_grads(rows)
            if other_rows is None:
                return add_into(symmetric_gram(grads, mirror=not upper), into)
            return add_into(grads @ self._datapoint_grads(other).T, into)
        result = gram(
            self.inputs, rows, other_rows, has_bias=self.has_bias,
            inputs_gram=self._input_products(), upper=upper,
        )  # fmt: skip
        return add_into(result, into)

    def _input_products(self) -> Tensor:
        """:func:`natgrad.linalg.input_gram` of the inputs, computed once per batch."""
        if self._inputs_gram is None:
            self._inputs_gram = input_gram(self.inputs, self.has_bias)
        return self._inputs_gram

    def gram_times(self, rows: Tensor, other_rows: Tensor, weights: Tensor) -> Tensor:
        """``J_a J_b^T w`` ``(K_a N,)`` for a weight vector ``w`` ``(K_b N,)``: without the
        Gram for one token per datapoint (:func:`natgrad.linalg.gram_times`)."""
        if rows.shape[2] != 1:
            return self.gram(rows, other_rows) @ weights
        return gram_times(rows, other_rows, weights, self._input_products())

    def write_combination(
        self, rows: Tensor, coefficients: Tensor, loss_coefficients: Tensor | None = None
    ) -> None:
        """``.grad ← J^T u = sum_{k,n} u_{kn} g_{kn}``, plus ``sum_n w_n g_n`` over the
        true-label rows for ``loss_coefficients`` ``w`` ``(N,)``: ``u^T G`` from the
        datapoint gradients ``G`` if :meth:`gram` formed and kept them (and no ``w``), else one
        GEMM ``E_u^T A`` the size of autograd's weight gradient (Shrestha 2023, eq. 43),
        computed from the layer inputs where the adapter does so without the rows ``A``."""
        buffer = self.grad_buffer()
        kept = self._kept_grads
        if loss_coefficients is None and kept is not None and kept[0] is rows:
            grads, size = kept[1], rows.shape[-1] * self.d_in
            flat = coefficients.reshape(1, -1).to(grads.dtype)
            if buffer is not None and buffer.is_contiguous():
                torch.mm(flat, grads[:, :size], out=buffer.view(1, -1))
                weight = buffer
            else:
                weight = (flat @ grads[:, :size]).view(-1, self.d_in)
            bias = (flat @ grads[:, size:])[0] if self.has_bias else None
            self.write_grad(weight, bias, buffer)
            return
        combined = combine_rows(coefficients, rows)
        if loss_coefficients is not None:
            loss_rows, loss_factor = self.loss_rows()
            weights = _per_datapoint(loss_coefficients / loss_factor, combined)
            combined.addcmul_(loss_rows[0], weights)
        if self.layer_inputs and self.adapter.grads_from_inputs:
            weight = self.adapter.weight_grad(self.module, self.layer_inputs, combined)
            if buffer is not None:
                weight = buffer.copy_(weight)
            self.write_grad(weight, combined.sum(dim=(0, 1)) if self.has_bias else None, buffer)
        else:
            bias_buffer = self.bias_buffer() if buffer is not None else None
            weight, bias = combined_jtu(
                self.inputs, combined, self.has_bias, out=buffer, bias_out=bias_buffer
            )
            self.write_grad(weight, bias, buffer, bias_buffer)

    def per_datapoint_grads(self, rows: Tensor) -> Tensor:
        """``g_{kn}`` as rows ``(K N, P)``: the weight in the layout of ``module.weight``, then
        the bias."""
        grads = self._datapoint_grads(rows)
        count, d_out, size = grads.shape[0], rows.shape[-1], rows.shape[-1] * self.d_in
        weight = self.adapter.to_weight(self.module, grads[:, :size].reshape(-1, d_out, self.d_in))
        return torch.cat([weight.reshape(count, -1), grads[:, size:]], dim=1)

    def write_flat(self, vector: Tensor) -> None:
        """``.grad ←`` a flat direction in the layout of :meth:`per_datapoint_grads`."""
        weight = self.module.weight
        matrix = self.adapter.to_matrix(self.module, vector[: weight.numel()].reshape(weight.shape))
        self.write_grad(matrix, vector[weight.numel() :] if self.has_bias else None)

    def _datapoint_grads(self, rows: Tensor) -> Tensor:
        """``g_{kn}`` as rows ``(K N, d_out d_in [+ d_out])`` in the neuron view (weight
        matrix flattened, then the bias): from the layer inputs where the adapter computes
        them without the rows ``A``. Kept for :meth:`write_combination` when they take at most
        :data:`KEPT_GRADS_RATIO` times the memory of the layer's captured tensors (a bound
        on what keeping them adds to the activations the step holds anyway)."""
        if self._kept_grads is not None and self._kept_grads[0] is rows:
            return self._kept_grads[1]
        if not (self.layer_inputs and self.adapter.grads_from_inputs):
            grads = per_datapoint_grads(self.inputs, rows, self.has_bias)
        else:
            weights = self.adapter.datapoint_weight_grads(self.module, self.layer_inputs, rows)
            columns = [weights.reshape(rows.shape[0] * rows.shape[1], -1)]
            if self.has_bias:
                columns.append(rows.sum(dim=2).reshape(columns[0].shape[0], -1))
            grads = torch.cat(columns, dim=1) if self.has_bias else columns[0]
        captured = sum(t.numel() for t in self.captured())
        if grads.numel() <= KEPT_GRADS_RATIO * captured:
            self._kept_grads = (rows, grads)
        return grads


@dataclass
class DirectBatch:
    """Materialised per-sample gradients of a group of parameters for the current batch.

    ``loss_grads`` are the per-sample gradients of the true-label losses (reduction factor
    removed), shape ``(1, N, P)``; ``extra_grads`` those of the ``K`` extra datapoint sets of
    ``mc`` / ``exact``, ``(K, N, P)``, or ``None``. Columns follow ``params``.
    """

    name: str
    params: list[nn.Parameter]
    loss_grads: Tensor
    extra_grads: Tensor | None

    @property
    def num_params(self) -> int:
        return self.loss_grads.shape[-1]

    def loss_rows(self) -> tuple[Tensor, float]:
        """``(loss_grads, 1.0)``: the rows carry no factor (as :meth:`LayerBatch.loss_rows`)."""
        return self.loss_grads, 1.0

    def captured(self) -> list[Tensor]:
        """The rows, for the finiteness check of a step."""
        return (
            [self.loss_grads] if self.extra_grads is None else [self.loss_grads, self.extra_grads]
        )

    def parameters(self) -> list[nn.Parameter]:
        """The parameters whose ``.grad`` the block writes."""
        return list(self.params)

    def row_tensors(self) -> list[tuple[Tensor, int, int | None]]:
        """:meth:`captured` as ``(tensor, datapoint dimension, token dimension)``."""
        return [(t, 1, None) for t in self.captured()]

    def with_rows(self, tensors: Sequence[Tensor]) -> DirectBatch:
        """A copy holding other tensors in the layout of :meth:`row_tensors`."""
        extra = tensors[1] if len(tensors) > 1 else None
        return replace(self, loss_grads=tensors[0], extra_grads=extra)

    def gram(
        self,
        rows: Tensor,
        other_rows: Tensor | None = None,
        into: Tensor | None = None,
        upper: bool = False,
    ) -> Tensor:
        """``G_a G_b^T`` of rows ``(K_a, N, P)`` and ``(K_b, N, P)``; added to ``into`` if
        given (:func:`add_into`); whole, whatever ``upper`` says."""
        flat = rows.reshape(-1, rows.shape[-1])
        if other_rows is None:
            return add_into(flat @ flat.T, into)
        return add_into(flat @ other_rows.reshape(-1, other_rows.shape[-1]).T, into)

    def gram_times(self, rows: Tensor, other_rows: Tensor, weights: Tensor) -> Tensor:
        """``G_a G_b^T w`` ``(K_a N,)``, as ``G_a (G_b^T w)``."""
        flat_b = other_rows.reshape(-1, other_rows.shape[-1])
        return rows.reshape(-1, rows.shape[-1]) @ (weights @ flat_b)

    def write_combination(
        self, rows: Tensor, coefficients: Tensor, loss_coefficients: Tensor | None = None
    ) -> None:
        """``.grad ← sum_{k,n} u_{kn} g_{kn}`` (plus ``sum_n w_n g_n`` of the true-label rows
        for ``loss_coefficients`` ``w``)."""
        vector = coefficients.reshape(-1) @ rows.reshape(-1, rows.shape[-1])
        if loss_coefficients is not None:
            vector += loss_coefficients @ self.loss_grads[0]
        self.write_flat(vector)

    def per_datapoint_grads(self, rows: Tensor) -> Tensor:
        """The rows as a ``(K N, P)`` matrix."""
        return rows.reshape(-1, rows.shape[-1])

    def write_flat(self, vector: Tensor) -> None:
        """``.grad ←`` consecutive slices of ``vector``, one per parameter."""
        offset = 0
        for param in self.params:
            part = vector[offset : offset + param.numel()]
            param.grad = part.reshape(param.shape).to(param.dtype).contiguous()
            offset += param.numel()


@dataclass
class TokenBatch(LayerBatch):
    """An ``nn.Embedding``'s neuron view with the inputs kept as token indices ``(N, T)``.

    The one-hot inputs ``a_{nt} = onehot(i_{nt})`` are never formed: the datapoint gradient
    ``g_{kn} = sum_t e_{knt} a_{nt}^T`` has a column per token, the sum of the ``e_{knt}``
    with that token (:func:`natgrad.linalg.token_sums`); the Gram ``J_a J_b^T`` sums the
    products of the output gradients of matching tokens (:func:`natgrad.linalg.token_gram`),
    and ``J^T u`` adds ``sum_k u_{kn} e_{knt}`` into the rows ``i_{nt}`` of the weight's
    gradient. Time and memory do not depend on the vocabulary, except for
    :meth:`per_datapoint_grads` (used only when the datapoints outnumber the parameters).
    """

    @property
    def num_params(self) -> int:
        return self.loss_output_grads.shape[-1] * self.module.num_embeddings

    def gram(
        self,
        rows: Tensor,
        other_rows: Tensor | None = None,
        into: Tensor | None = None,
        upper: bool = False,
    ) -> Tensor:
        """``J_a J_b^T`` of output-gradient rows ``(K_a, N, T, d_out)`` and ``(K_b, ...)``;
        added to ``into`` if given (:func:`add_into`); whole, whatever ``upper`` says."""
        return add_into(token_gram(self.inputs, rows, other_rows), into)

    def gram_times(self, rows: Tensor, other_rows: Tensor, weights: Tensor) -> Tensor:
        """``J_a J_b^T w``, from the Gram (:meth:`gram`)."""
        return self.gram(rows, other_rows) @ weights

    def write_combination(
        self, rows: Tensor, coefficients: Tensor, loss_coefficients: Tensor | None = None
    ) -> None:
        """``.grad ← J^T u``: ``sum_k u_{kn} e_{knt}`` (plus ``w_n e_{nt}`` of the true-label
        rows for ``loss_coefficients`` ``w``) added into row ``i_{nt}``."""
        combined = combine_rows(coefficients, rows)
        if loss_coefficients is not None:
            loss_rows, loss_factor = self.loss_rows()
            weights = _per_datapoint(loss_coefficients / loss_factor, combined)
            combined.addcmul_(loss_rows[0], weights)
        buffer = self.grad_buffer()
        grad = token_matrix(
            self.inputs, combined, self.module.num_embeddings, None if buffer is None else buffer.T
        )
        if buffer is None:
            self.module.weight.grad = grad.to(self.module.weight.dtype)

    def per_datapoint_grads(self, rows: Tensor) -> Tensor:
        """``g_{kn}`` as rows ``(K N, num_embeddings * embedding_dim)``, in the layout of
        ``module.weight``."""
        sums = token_sums(self.inputs, rows, self.module.num_embeddings)
        return sums.reshape(rows.shape[0] * rows.shape[1], -1)


def _per_datapoint(coefficients: Tensor, rows: Tensor) -> Tensor:
    """Coefficients ``(N,)`` shaped to broadcast over rows ``(N, ...)``."""
    return coefficients.view(-1, *(1,) * (rows.dim() - 1))


def tied_batches(embedding: TokenBatch, linear: LayerBatch) -> list[DirectBatch]:
    """Blocks for a weight shared by an embedding and a linear layer (tied input and output
    embeddings): the weight's per-sample gradient is the sum of both layers' ``g_{kn}``
    (materialised, ``K N x V d`` numbers); the linear layer's bias, if trained, is a block of
    its own (as every module's own parameters are), named after the linear layer."""
    weight_size = embedding.module.weight.numel()

    def rows(embedding_rows: Tensor, linear_rows: Tensor) -> Tensor:
        sets, num = linear_rows.shape[:2]
        summed = linear.per_datapoint_grads(linear_rows)
        summed[:, :weight_size] += embedding.per_datapoint_grads(embedding_rows)
        return summed.reshape(sets, num, -1)

    loss_rows = rows(embedding.loss_grads, linear.loss_grads)
    extra = None
    if linear.extra_grads is not None:
        extra = rows(embedding.extra_grads, linear.extra_grads)
    blocks = [
        DirectBatch(
            embedding.name,
            [embedding.module.weight],
            loss_rows[..., :weight_size],
            None if extra is None else extra[..., :weight_size],
        )
    ]
    if linear.has_bias:
        blocks.append(
            DirectBatch(
                linear.name,
                [linear.module.bias],
                loss_rows[..., weight_size:],
                None if extra is None else extra[..., weight_size:],
            )
        )
    return blocks


Block = LayerBatch | DirectBatch


__all__ = [
    "KEPT_GRADS_RATIO",
    "Block",
    "DirectBatch",
    "LayerBatch",
    "TokenBatch",
    "add_into",
    "tied_batches",
]
