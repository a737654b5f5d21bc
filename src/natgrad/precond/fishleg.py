"""FishLeg: a learned inverse Fisher (Garcia et al. 2023, sec. 4, Algorithm 1, App. A.5-A.7).

FishLeg keeps auxiliary parameters ``λ`` of a positive semi-definite block-diagonal matrix
``Q(λ)`` and learns them online so that ``Q(λ) ≈ (F + γI)^{-1}`` on the directions the
gradient explores. Per preconditioned layer with weight matrix ``W`` (``d_out x d_in``, bias as
an extra input column, Conv2d kernels flattened):

* ``q_structure="kron"`` (App. A.5, eq. 53): ``Q_l = (R_l R_l^T) ⊗ (L_l L_l^T)`` with
  lower-triangular ``R_l`` (input side) and ``L_l`` (output side), applied as
  ``ΔW = L L^T G R R^T`` without forming ``Q``, ``L L^T`` or ``R R^T``: to a layer gradient
  ``G = Ē^T Ā`` of rank ``N`` as ``(Ē L L^T)^T (Ā R R^T)`` (App. A.7), and every product with
  a factor skips its zero triangle (:mod:`natgrad.precond.kron_q`);
* ``q_structure="diag"`` (App. A.6): ``Q_l = diag(q ⊙ q)``, one entry per weight.

Each step (DESIGN.md gives the statement in clean notation):

1. ``ḡ ← β ḡ + (1 - β) g`` (momentum on the gradient; ``ḡ = g`` at the first step), or, with
   ``momentum_on="update"`` (sec. 4.4, used for the paper's wall-clock results), momentum on
   ``Q g``, which keeps the low-rank structure of each layer's ``g``;
2. every ``aux_period`` steps the auxiliary step: ``u = ḡ / ||ḡ||``, ``v = Q(λ) u``,
   ``h = (F + γI) v``, and an Adam step (learning rate ``α``) on the gradient of the surrogate
   ``v · (h - u)`` with ``h - u`` held constant, which is that of
   ``A(λ) = ½ vᵀ(F + γI)v - uᵀv`` (eq. 20-21), minimal at ``Q = (F + γI)^{-1}`` on the
   explored directions. The gradient is formed in closed form, not by autograd (for ``u`` of
   rank ``N`` from products of rank ``N``), and Adam runs on the column blocks that hold the
   factors' lower triangles (:func:`~natgrad.precond.kron_q.lower_blocks`). ``F v`` is the
   exact Fisher-vector product of the batch (:mod:`natgrad.fisher_vector`): the expectation
   over model-sampled labels of the Hessian-vector product that Algorithm 1 estimates with one
   sample;
3. ``p.grad ← Q(λ) ḡ``, so an SGD step with learning rate ``η`` applies ``θ ← θ - η Q ḡ``
   (eq. 17). Use SGD without momentum: FishLeg applies its own. With momentum on the
   gradient, ``Q ḡ`` is itself kept by momentum, ``Q ḡ ← β Q ḡ + (1 - β) Q g`` with ``Q g``
   of rank ``N``, which is exact while ``Q`` is fixed; after an auxiliary step changes ``Q``,
   ``Q ḡ`` is recomputed from ``ḡ`` (the only products with a full-rank matrix, ``~d^3``
   per layer, every ``aux_period`` steps).

Data parallelism (``distributed="global"``, :mod:`natgrad.distributed`): the ranks average the
fresh directions ``Q g`` before momentum, and also the layer gradients (``momentum_on=
"gradient"``, every step: twice DDP's traffic) or, on auxiliary steps, the gradients for the
probe (``"update"``); and the
auxiliary gradients (and the value of ``A(λ)``) before Adam, so each rank's Fisher-vector
product on its own shard contributes the average ``F`` of the global objective. ``Q(λ)``, the
momentum and Adam's state stay identical on all ranks.

``Q`` starts at ``init_scale · I`` with ``init_scale = η_SGDm / η`` (sec. 4.4), so FishLeg starts
as SGD with momentum at learning rate ``η_SGDm``.
"""

from __future__ import annotations

import copy
import math
import warnings
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn

from natgrad.fisher_vector import fisher_vector_product
from natgrad.linalg import aligned_copy
from natgrad.precond import kron_q
from natgrad.precond.base import NonFiniteWarning, Preconditioner
from natgrad.precond.blocks import LayerBatch, TokenBatch
from natgrad.precond.checks import Damping, check_count, check_damping
from natgrad.precond.layer_gradient import LayerGradient, augmented_inputs

QStructure = Literal["kron", "diag"]
Q_STRUCTURES: tuple[QStructure, ...] = get_args(QStructure)
MomentumTarget = Literal["gradient", "update"]
MOMENTUM_TARGETS: tuple[MomentumTarget, ...] = get_args(MomentumTarget)
MAX_KRON_AUX_BYTES = 2**30
"""Largest Kronecker auxiliary pair of one layer FishLeg builds (e.g. an embedding with a large
vocabulary needs ``vocabulary x vocabulary``); beyond it, a clear error instead of an
out-of-memory failure."""


class FishLeg(Preconditioner):
    """FishLeg preconditioner (Garcia et al. 2023).

    Parameters
    ----------
    model
        The model; its forward pass must return the logits ``(N, C)``.
    damping
        ``γ > 0`` of ``(F + γI)^{-1}``, or a callable ``step -> γ`` evaluated at every
        auxiliary step.
    aux_lr
        ``α > 0``, the Adam learning rate of the auxiliary parameters, or a callable
        ``step -> α`` evaluated at every auxiliary step.
    aux_period
        ``k >= 1``: an auxiliary step every ``k`` steps.
    momentum
        ``β`` in ``[0, 1)``.
    init_scale
        ``η_SGDm / η``: ``Q`` starts at ``init_scale · I``.
    q_structure
        ``"kron"`` (default) or ``"diag"``.
    momentum_on
        ``"gradient"`` (Algorithm 1, line 16; default) or ``"update"`` (momentum on ``Q g``).
    **options
        The options every preconditioner takes (:class:`~natgrad.precond.base.Preconditioner`);
        ``distributed`` is ``"auto"``, ``"off"`` or ``"global"`` (module docstring).
        Normalisation layers and fallback tensors keep the plain gradient (an identity block,
        listed by :meth:`describe`).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        damping: Damping = 1e-3,
        aux_lr: Damping = 1e-3,
        aux_period: int = 10,
        momentum: float = 0.9,
        init_scale: float = 1.0,
        q_structure: QStructure = "kron",
        momentum_on: MomentumTarget = "gradient",
        **options: Any,
    ) -> None:
        self.aux_lr = aux_lr if callable(aux_lr) else check_damping(aux_lr, "aux_lr")
        check_count(aux_period, "aux_period")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must lie in [0, 1), got {momentum}")
        self.init_scale = check_damping(init_scale, "init_scale")
        if q_structure not in Q_STRUCTURES:
            raise ValueError(f"unknown q_structure={q_structure!r}: choose one of {Q_STRUCTURES}")
        if momentum_on not in MOMENTUM_TARGETS:
            raise ValueError(
                f"unknown momentum_on={momentum_on!r}: choose one of {MOMENTUM_TARGETS}"
            )
        self.aux_period = aux_period
        self.momentum = float(momentum)
        self.q_structure = q_structure
        self.momentum_on = momentum_on
        super().__init__(model, damping=damping, **options)
        self.aux_params = self._init_aux_params()
        # Adam runs on the column blocks of the Kronecker factors that hold their lower
        # triangles (kron_q.lower_blocks, ~5/8 of the entries; the entries above the diagonal
        # have zero gradients, which would leave them, and Adam's state there, at zero). The
        # factors stay the truth: copied into the blocks before, and back after, each step.
        self._adam_params: dict[str, tuple[list[nn.Parameter], ...]] = {
            name: tuple(self._adam_blocks(param) for param in pair)
            for name, pair in self.aux_params.items()
        }
        self.aux_optimizer = torch.optim.Adam(
            [p for pair in self._adam_params.values() for blocks in pair for p in blocks],
            lr=self.current_aux_lr(),
            fused=True,
        )
        # per layer ḡ (momentum_on="gradient" only), and the direction written into .grad: Q ḡ,
        # or the momentum of Q g
        self.momentum_buffers: dict[str, Tensor] = {}
        self.direction_buffers: dict[str, Tensor] = {}
        self.aux_losses: list[float] = []
        self._aux_args: tuple | None = None

    def _adam_blocks(self, param: nn.Parameter) -> list[nn.Parameter]:
        """The tensors Adam updates for one auxiliary parameter: a Kronecker factor's
        :func:`~natgrad.precond.kron_q.lower_blocks` (copies), or a diagonal ``Q``'s scales."""
        if self.q_structure == "diag":
            return [param]
        return [nn.Parameter(view.clone()) for view in kron_q.lower_blocks(param.detach())]

    def current_aux_lr(self) -> float:
        """The auxiliary learning rate of the current step (a callable ``aux_lr`` is evaluated
        at ``steps``)."""
        if callable(self.aux_lr):
            return check_damping(self.aux_lr(self.steps), "aux_lr(step)")
        return self.aux_lr

    # ------------------------------------------------------------------ Q(λ)
    def _has_bias(self, name: str) -> bool:
        return self.adapters[name].has_bias(self.selection.layers[name])

    def _init_aux_params(self) -> dict[str, tuple[nn.Parameter, ...]]:
        params: dict[str, tuple[nn.Parameter, ...]] = {}
        for name, module in self.selection.layers.items():
            d_out, d_in = self.adapters[name].matrix_shape(module)
            d_in += self._has_bias(name)
            options = {"dtype": module.weight.dtype, "device": module.weight.device}
            if self.q_structure == "kron":
                size = (d_out**2 + d_in**2) * module.weight.element_size()
                if size > MAX_KRON_AUX_BYTES:
                    raise ValueError(
                        f"FishLeg's Kronecker Q for '{name}' ({type(module).__name__}) needs "
                        f"{d_out} x {d_out} and {d_in} x {d_in} auxiliary matrices "
                        f"({size / 2**30:.1f} GiB): pass q_structure='diag' (a weight-sized Q), "
                        f"or overrides={{{name!r}: 'plain_gradient'}} to leave it to the plain "
                        "gradient"
                    )
                root = self.init_scale**0.25
                params[name] = (
                    nn.Parameter(root * torch.eye(d_out, **options)),
                    nn.Parameter(root * torch.eye(d_in, **options)),
                )
            else:
                params[name] = (
                    nn.Parameter(math.sqrt(self.init_scale) * torch.ones(d_out, d_in, **options)),
                )
        return params

    def apply_q(self, name: str, matrix: Tensor) -> Tensor:
        """``Q_l`` applied to a layer-shaped ``(d_out, d_in [+1])`` matrix (differentiable in λ)."""
        if self.q_structure == "diag":
            (scale,) = self.aux_params[name]
            return scale * scale * matrix
        left, right = self._triangular_factors(name)
        return kron_q.apply_dense(matrix.to(left.dtype), left, right)  # an embedding's may be half

    def _triangular_factors(self, name: str) -> tuple[Tensor, Tensor]:
        """``(L_l, R_l)``. Under autograd the upper triangles are masked out, so their
        gradients are zero; without autograd the parameters are used as they are (their upper
        triangles stay zero: the auxiliary gradients are lower triangular, so Adam leaves them
        at their initial zeros), saving two copies per layer and step."""
        if torch.is_grad_enabled():
            return tuple(torch.tril(p) for p in self.aux_params[name])
        return tuple(p.detach() for p in self.aux_params[name])

    def apply_q_low_rank(self, name: str, grad_rows: Tensor, inputs: Tensor) -> Tensor:
        """``Q_l (Ē^T Ā)`` as ``(Ē L L^T)^T (Ā R R^T)``: cost ``~N T d^2`` instead of ``d^3``
        (Garcia et al. 2023, App. A.7); differentiable in λ."""
        if self.q_structure == "diag":
            return self.apply_q(name, grad_rows.T @ inputs)
        return kron_q.LowRankProduct.of(grad_rows, inputs, *self._triangular_factors(name)).dense()

    def dense_q(self, name: str) -> Tensor:
        """The dense block ``Q_l`` for the row-major flattening of the ``(d_out, d_in)`` matrix."""
        with torch.no_grad():
            if self.q_structure == "diag":
                (scale,) = self.aux_params[name]
                return torch.diag((scale * scale).reshape(-1))
            left, right = (torch.tril(p) for p in self.aux_params[name])
            return torch.kron(left @ left.T, right @ right.T)

    # ------------------------------------------------------------------ steps
    def step(
        self,
        logits: Tensor,
        aux_args: tuple | None = None,
        grad_scaler: torch.amp.GradScaler | None = None,
    ) -> None:
        """As :meth:`Preconditioner.step`; ``aux_args`` are model inputs for the auxiliary
        Fisher-vector product (default: the inputs of the current forward pass)."""
        self._aux_args = aux_args
        try:
            super().step(logits, grad_scaler)
        finally:
            self._aux_args = None

    def _precondition(
        self, batches: list[LayerBatch], factor: float, per_sample_output_grad: Tensor
    ) -> None:
        # per layer the gradient as low-rank rows (Ē, Ā), or as a matrix for an embedding
        # (built by index from its token indices, never from one-hot rows)
        rows: dict[str, Tensor | tuple[Tensor, Tensor]] = {}
        for batch in batches:
            if isinstance(batch, TokenBatch):
                rows[batch.name] = LayerGradient.of(batch, factor).dense()
            else:
                # the rows as stored, their factor and ``c`` folded into one scale (no copy
                # when it is one, as without a gradient scaler)
                stored, carried = batch.loss_rows()
                grad_rows = stored[0].reshape(-1, stored.shape[-1])
                if factor != carried:
                    grad_rows = grad_rows * (factor / carried)
                rows[batch.name] = (grad_rows, augmented_inputs(batch.inputs, batch.has_bias))
        auxiliary = self.steps % self.aux_period == 0
        with torch.no_grad():
            if self.momentum_on == "gradient":
                # ḡ and Q ḡ, both by momentum: Q ḡ_t = β Q ḡ_{t-1} + (1 - β) Q g_t holds while
                # Q is fixed, so only an auxiliary step that changes Q needs the dense Q ḡ
                directions = {name: self._q_rows(name, row) for name, row in rows.items()}
                self._accumulate(self.momentum_buffers, rows, "gradients")
                self._accumulate(self.direction_buffers, directions, "directions")
                probe, products = dict(self.momentum_buffers), dict(self.direction_buffers)
            else:
                probe, products = rows, None
                if auxiliary and self.communicator.active:  # a global probe: averaged g
                    probe = {name: _dense(row) for name, row in rows.items()}
                    self.communicator.average_(list(probe.values()), "gradients")
        if auxiliary and self._auxiliary_step(probe, products):
            if self.momentum_on == "gradient":
                with torch.no_grad():
                    for name, gradient in self.momentum_buffers.items():
                        self.direction_buffers[name].copy_(self._q_dense(name, gradient))
        with torch.no_grad():
            if self.momentum_on == "update":
                directions = {name: self._q_rows(name, row) for name, row in rows.items()}
                self._accumulate(self.direction_buffers, directions, "directions")
            for batch in batches:
                self._write_direction(batch, self.direction_buffers[batch.name])

    def _q_dense(self, name: str, matrix: Tensor) -> Tensor:
        """``Q_l M`` without autograd (the factors' triangles skipped)."""
        if self.q_structure == "diag":
            (scale,) = self.aux_params[name]
            return scale.detach().square() * matrix
        left, right = self._triangular_factors(name)
        return kron_q.apply_dense(matrix.to(left.dtype), left, right)

    def _q_rows(
        self, name: str, row: Tensor | tuple[Tensor, Tensor]
    ) -> Tensor | tuple[Tensor, Tensor]:
        """``Q_l g`` of a layer gradient (dense, or low rank ``(Ē, Ā)``) without autograd: a
        matrix, or for a low-rank Kronecker product its rows ``(X, Y)`` with ``Q g = X^T Y``."""
        if isinstance(row, Tensor) or self.q_structure == "diag" or not _low_rank_pays(*row):
            return self._q_dense(name, _dense(row))
        product = kron_q.LowRankProduct.of(*row, *self._triangular_factors(name))
        return product.left_rows, product.right_rows

    def _accumulate(
        self,
        buffers: dict[str, Tensor],
        fresh: dict[str, Tensor | tuple[Tensor, Tensor]],
        kind: str,
    ) -> None:
        """``buffer ← β buffer + (1 - β) fresh`` in place (``fresh`` at the first step), the
        fresh matrices (or low-rank ``X^T Y`` as rows ``(X, Y)``, added by one GEMM) first
        averaged over the ranks."""
        if self.communicator.active:
            fresh = {name: _dense(matrix) for name, matrix in fresh.items()}
            self.communicator.average_(list(fresh.values()), kind)
        for name, matrix in fresh.items():
            previous = buffers.get(name)
            if previous is None:  # rows padded for the GEMMs that accumulate into it
                buffers[name] = aligned_copy(_dense(matrix))
            elif isinstance(matrix, Tensor):
                previous.mul_(self.momentum).add_(matrix, alpha=1 - self.momentum)
            else:
                previous.addmm_(matrix[0].T, matrix[1], beta=self.momentum, alpha=1 - self.momentum)

    def _write_direction(self, batch: LayerBatch, direction: Tensor) -> None:
        """``.grad ← Q ḡ`` (a copy: the momentum buffer stays FishLeg's), into the existing
        weight gradient where there is one."""
        d_weight = direction.shape[1] - int(batch.has_bias)
        weight, bias = direction[:, :d_weight], direction[:, d_weight] if batch.has_bias else None
        buffer = batch.grad_buffer()
        if buffer is not None and buffer.shape == weight.shape:
            buffer.copy_(weight)
            if bias is not None:
                batch.module.bias.grad = bias.to(batch.module.bias.dtype).clone()
        else:
            batch.write_grad(weight, bias)

    @torch.no_grad()
    def auxiliary_gradients(
        self,
        probe: dict[str, Tensor | tuple[Tensor, Tensor]],
        model_args: tuple,
        model_kwargs: dict | None = None,
        counted: Tensor | None = None,
        products: dict[str, Tensor] | None = None,
    ) -> tuple[float, dict[str, tuple[list[Tensor], ...]]] | None:
        """``A(λ)`` and its gradient: per layer and auxiliary parameter the list of tensors
        Adam updates, a Kronecker factor's :func:`~natgrad.precond.kron_q.lower_blocks` (the
        factor's gradient is :func:`~natgrad.precond.kron_q.from_blocks` of them) or a
        diagonal ``Q``'s scales.

        ``model_args``, ``model_kwargs``: the inputs of the Fisher-vector product's batch;
        ``counted``: its positions in the loss (token-level logits with ignored labels).

        ``probe`` holds, per layer, the direction ``ḡ`` as a layer-shaped matrix, or as its
        low-rank rows ``(Ē, Ā)`` with ``ḡ = Ē^T Ā`` (then ``Q u`` and the gradients cost
        ``~N d^2``, not ``d^3``, and ``u`` is never formed); ``products``, if given, ``Q ḡ``
        of every dense ``ḡ``. The gradients are those of the surrogate ``v · (h - u)`` with
        ``h - u`` held constant, in closed form (:mod:`natgrad.precond.kron_q`). ``None`` is
        returned if the direction is zero or the Fisher-vector product is not finite.
        """
        squared_norms = [
            p.pow(2).sum() if isinstance(p, Tensor) else ((p[0] @ p[0].T) * (p[1] @ p[1].T)).sum()
            for p in probe.values()
        ]
        norm = torch.sqrt(sum(squared_norms))
        if not norm > 0:
            return None
        # u = ḡ / ||ḡ||: a dense ḡ is kept unscaled (u's products scaled by 1 / ||ḡ||), low-rank
        # rows as (Ē / ||ḡ||, Ā); v = Q u
        directions: dict[str, Tensor | tuple[Tensor, Tensor]] = {}
        products_u, low_rank = {}, {}
        for name, p in probe.items():
            if isinstance(p, Tensor) or self.q_structure == "diag":
                directions[name] = _dense(p) if isinstance(p, Tensor) else _dense(p) / norm
                known = None if products is None else products.get(name)
                scale = 1 / norm if isinstance(p, Tensor) else 1.0
                products_u[name] = (
                    self._q_dense(name, directions[name]) if known is None else known
                ) * scale
            else:
                directions[name] = (p[0] / norm, p[1])
                low_rank[name] = kron_q.LowRankProduct.of(
                    *directions[name], *self._triangular_factors(name)
                )
                products_u[name] = low_rank[name].dense()
        params, blocks = {}, []
        for name, product in products_u.items():
            module, adapter = self.selection.layers[name], self.adapters[name]
            prefix = f"{name}." if name else ""
            d_weight = adapter.matrix_shape(module)[1]
            params[prefix + "weight"] = module.weight
            blocks.append(adapter.to_weight(module, product[:, :d_weight]))
            if self._has_bias(name):
                params[prefix + "bias"] = module.bias
                blocks.append(product[:, d_weight])
        with self.capture.paused():
            fisher_blocks = fisher_vector_product(
                self.model,
                model_args,
                params,
                blocks,
                self.likelihood,
                self.reduction,
                model_kwargs,
                counted,
            )
        del blocks
        damping = self.current_damping()
        fisher_products: dict[str, Tensor] = {}
        fisher_blocks.reverse()  # popped in layer order, each freed once used
        for name, product in products_u.items():
            module = self.selection.layers[name]
            weight_part = self.adapters[name].to_matrix(module, fisher_blocks.pop())
            if self._has_bias(name):
                weight_part = torch.cat([weight_part, fisher_blocks.pop().unsqueeze(1)], 1)
            fisher_products[name] = weight_part.add_(product, alpha=damping)  # h = (F + γI) v
        if not bool(torch.isfinite(torch.stack([h.sum() for h in fisher_products.values()])).all()):
            return None
        value, gradients = 0.0, {}
        for name in list(products_u):
            product, residual = products_u.pop(name), fisher_products.pop(name)
            direction = directions.pop(name)
            if isinstance(direction, Tensor):
                scale = 1 / norm if isinstance(probe[name], Tensor) else 1.0
                overlap = _inner(direction, product) * scale  # uᵀv
                value += float(0.5 * _inner(product, residual) - overlap)
                residual.add_(direction, alpha=-float(scale))  # W = h - u
            else:  # uᵀv = Σ_ij (ē_i · x_j)(ā_i · y_j) from the rows, u never formed
                rows = low_rank[name]
                overlap = (rows.grad_rows @ rows.left_rows.T) * (rows.inputs @ rows.right_rows.T)
                value += float(0.5 * _inner(product, residual) - overlap.sum())
                residual.addmm_(rows.grad_rows.T, rows.inputs, alpha=-1.0)  # W = h - u
            del product
            grads = tuple(
                [torch.empty_like(block) for block in blocks] for blocks in self._adam_params[name]
            )
            if self.q_structure == "diag":
                (scale_param,) = self.aux_params[name]
                torch.mul(direction, residual, out=grads[0][0]).mul_(2 * scale_param.detach())
            elif name in low_rank:
                low_rank.pop(name).factor_gradients(
                    residual, *self._triangular_factors(name), grads
                )
            else:
                kron_q.dense_factor_gradients(
                    direction, residual, *self._triangular_factors(name), grads
                )
            if isinstance(probe[name], Tensor):
                for blocks in grads:  # linear in u: ḡ's gradients times 1 / ||ḡ||
                    for block in blocks:
                        block.div_(norm)
            gradients[name] = grads
        return value, gradients

    def _auxiliary_step(
        self,
        probe: dict[str, Tensor | tuple[Tensor, Tensor]],
        products: dict[str, Tensor] | None,
    ) -> bool:
        """The auxiliary gradients and Adam's step on them; whether ``Q`` changed."""
        if self._aux_args is not None:
            result = self.auxiliary_gradients(probe, self._aux_args, products=products)
        else:  # the current batch, with the positions its loss counts
            counted = self.likelihood.counted(
                self.capture.output.detach(), self.capture.output_grad
            )
            result = self.auxiliary_gradients(
                probe, self.capture.model_args, self.capture.model_kwargs, counted, products
            )
        adam_params = [p for pair in self._adam_params.values() for ps in pair for p in ps]
        total = torch.zeros(1, dtype=torch.float64, device=adam_params[0].device)
        if result is not None:
            total += result[0]
            for name, grads in result[1].items():
                for blocks, block_grads in zip(self._adam_params[name], grads, strict=True):
                    for block, grad in zip(blocks, block_grads, strict=True):
                        block.grad = grad
        elif self.communicator.active:
            for param in adam_params:
                param.grad = torch.zeros_like(param)
        if self.communicator.active and not self.communicator.average_(
            [*(p.grad for p in adam_params), total], "aux", ok=result is not None
        ):
            result = None
        if result is None:
            where = " on some rank" if self.communicator.active else ""
            warnings.warn(
                "FishLeg skipped an auxiliary step: the gradient is zero or the Fisher-vector "
                f"product is not finite{where}; the auxiliary parameters are unchanged",
                NonFiniteWarning,
                stacklevel=4,
            )
            return False
        sums = [p.grad.sum() for p in adam_params]
        if not bool(torch.isfinite(torch.stack(sums)).all()):
            warnings.warn(
                "FishLeg skipped an auxiliary step with non-finite gradients",
                NonFiniteWarning,
                stacklevel=4,
            )
            return False
        self._copy_blocks(to_adam=True)  # the factors as they are (e.g. loaded or set)
        for group in self.aux_optimizer.param_groups:
            group["lr"] = self.current_aux_lr()
        self.aux_optimizer.step()
        self._copy_blocks(to_adam=False)
        for param in adam_params:
            param.grad = None
        self.aux_losses.append(total.item())
        return True

    @torch.no_grad()
    def _copy_blocks(self, to_adam: bool) -> None:
        """Copy the Kronecker factors' lower-triangle blocks into Adam's tensors, or back."""
        if self.q_structure == "diag":
            return
        for name, pair in self.aux_params.items():
            for param, blocks in zip(pair, self._adam_params[name], strict=True):
                for view, block in zip(kron_q.lower_blocks(param), blocks, strict=True):
                    (block if to_adam else view).copy_(view if to_adam else block)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(
            aux_params={
                name: [p.detach().clone() for p in pair] for name, pair in self.aux_params.items()
            },
            aux_optimizer=copy.deepcopy(self.aux_optimizer.state_dict()),
            momentum_buffers={k: v.clone() for k, v in self.momentum_buffers.items()},
            direction_buffers={k: v.clone() for k, v in self.direction_buffers.items()},
        )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "direction_buffers" not in state:
            raise ValueError(
                "this FishLeg state was saved by natgrad 0.1.0, whose momentum buffers and "
                "auxiliary Adam state have another layout (full factors; the momentum of Q g "
                "under momentum_on='update' in momentum_buffers): resume it with natgrad "
                "0.1.0, or restore the model and its optimizer and start FishLeg afresh"
            )
        super().load_state_dict(state)
        with torch.no_grad():
            for name, pair in self.aux_params.items():
                for param, saved in zip(pair, state["aux_params"][name], strict=True):
                    param.copy_(saved if self.q_structure == "diag" else torch.tril(saved))
        self.aux_optimizer.load_state_dict(state["aux_optimizer"])
        self.momentum_buffers = {k: aligned_copy(v) for k, v in state["momentum_buffers"].items()}
        self.direction_buffers = {
            k: aligned_copy(v) for k, v in state["direction_buffers"].items()
        }

    def _settings(self) -> str:
        return (
            f"q_structure={self.q_structure}, aux_period={self.aux_period}, "
            f"aux_lr={self.aux_lr}, momentum={self.momentum} on {self.momentum_on}, "
            + super()._settings()
        )


def _low_rank_pays(grad_rows: Tensor, inputs: Tensor) -> bool:
    """Whether ``Q`` costs less on the ``n`` rows of each side, ``~n (d_out^2 + d_in^2)``,
    than on the matrix ``Ē^T Ā``, ``~d_out d_in (d_out + d_in)`` (not for a narrow layer such
    as a classifier head with fewer outputs than rows)."""
    rank, d_out, d_in = inputs.shape[0], grad_rows.shape[1], inputs.shape[1]
    return rank * (d_out**2 + d_in**2) <= d_out * d_in * (d_out + d_in)


def _inner(first: Tensor, second: Tensor) -> Tensor:
    """``<A, B>_F`` without an elementwise product in memory."""
    dtype = torch.promote_types(first.dtype, second.dtype)
    return torch.vdot(first.reshape(-1).to(dtype), second.reshape(-1).to(dtype))


def _dense(row: Tensor | tuple[Tensor, Tensor]) -> Tensor:
    """A layer gradient as a matrix: itself, or ``Ē^T Ā`` of its low-rank rows."""
    return row if isinstance(row, Tensor) else row[0].T @ row[1]


__all__ = ["MOMENTUM_TARGETS", "Q_STRUCTURES", "FishLeg", "MomentumTarget", "QStructure"]
