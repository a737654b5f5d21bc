"""Kronecker-factored preconditioners: KFAC (seed 001 eq. 2-4, App. D-E) and FOOF (eq. 5-6).

Per layer with weight matrix ``W`` (``d_out x d_in``, bias as an extra input column), the
curvature block is approximated by ``Σ_A ⊗ Σ_G`` with

* ``Σ_A = 1/(N T) sum_{n,t} a_{nt} a_{nt}^T`` (input covariance, bias column included),
* ``Σ_G = c w sum_{k,n,t} e_{knt} e_{knt}^T`` (output-gradient covariance of the datapoints of
  the chosen Fisher type, ``c`` the reduction factor, ``w`` the row weight; the "expand"
  convention for weight sharing),

so that ``Σ_A ⊗ Σ_G`` approximates ``c w sum_{k,n} g_{kn} g_{kn}^T``, as curvlinops' KFAC does.
Both are exponential moving averages with decay ``m``, normalised (seed 001 App. D.1:
``x̂ ← m x̂ + (1 - m) x``, divided by ``1 - m^t``, i.e. ``x̂_1 = x_1``); ``m = 0`` is
subsampled KFAC.

Updates, with ``∇W`` the loss gradient of the layer (``G = Σ_G``, ``A = Σ_A``):

* KFAC, heuristic damping (eq. 2, 4): ``ΔW = (G + λ_E I)^{-1} ∇W (A + λ_A I)^{-1}`` with
  ``λ_A λ_E = λ`` and ``λ_A / λ_E = (d_out tr A) / (d_in tr G)``;
* KFAC, correct damping (eq. 3): ``vec ΔW = (A ⊗ G + λ I)^{-1} vec ∇W``, solved in the
  eigenbases of ``A`` and ``G``;
* KFAC, no damping: ``ΔW = G^+ ∇W A^+`` (eigenvalues below ``rtol * max`` are treated as zero,
  so rank-deficient factors give a pseudo-inverse, never Inf);
* FOOF (eq. 6): ``ΔW = ∇W (A + λ I)^{-1}``; with ``kfac_damping=True`` (App. D.8, Fig. 3) the
  damping is KFAC's ``λ_A`` and the update is multiplied by ``λ_E^{-1}``.

Amortisation (Algorithm 1 and App. K): inverses (or eigenbases) are recomputed every ``T`` steps
(``inv_period``); the factors are updated every ``k`` steps (``factor_period``) and, if
``pre_inversion_steps = S`` is given, only in the ``S`` steps before each inversion
(``(t + S) mod T < S``). Within a step natgrad first folds the current batch into the factors
(if scheduled), then inverts (if scheduled), then applies the inverse, so ``T = 1, m = 0`` is
subsampled KFAC on the current batch; Algorithm 1 lists the update first, which delays the
curvature by one batch. The first step always initialises the factors and their inverses.

Data parallelism (``distributed="global"``, :mod:`natgrad.distributed`): the factors are
averaged over the ranks right after a step's batch statistics are folded in, which averages the
statistics (the moving averages are linear and were identical on all ranks), so factors and
inverses are the same on every rank before any inversion; each rank preconditions its own
gradient and the directions are averaged, which equals preconditioning the averaged gradient
(the inverse is linear and shared). On a step that inverts, the average is waited for before
the inversion; on a step that does not, it runs in the background (``async_op``) while the
step, the optimiser and the next forward and backward passes go on, and is waited for when the
factors are next read (the next fold, an inversion, :meth:`state_dict`, ``input_factors``).

By default every rank computes every inverse. With ``spread_inversions=True`` the layers due
for inversion are dealt out over the ranks by cost (``d_in^3 + d_out^3``, largest first, each
to the least loaded rank); each rank inverts its share and broadcasts it, so every rank ends
with the same inverses for about ``1/R`` of the inversion work and one broadcast of every
inverse (the size of the layer's factors: ``d_in^2 + d_out^2`` numbers for KFAC, plus
eigenvalues for the eigen-based damping modes, ``d_in^2`` for FOOF, ``V`` for an embedding's
diagonal factor). If an inversion fails on its rank, every rank raises (a non-finite factor
skips the step everywhere, as without spreading). It pays when inversions are a large part
of the step (wide layers, frequent inversions).

The gradient ``∇W = Ē^T Ā`` has rank at most ``N T``; when that is below the layer widths the
inverses are applied to ``Ē`` and ``Ā`` (cost ``~N T d^2``) instead of to the ``d_out x d_in``
matrix (cost ``~d^3``), chosen per layer.

``nn.Embedding`` (:class:`~natgrad.precond.blocks.TokenBatch`): the inputs are one-hot, so
``Σ_A`` is diagonal, the token frequencies ``diag(c_v) / (N T)``, and is kept as that vector
(``num_embeddings`` numbers instead of its square); its inverse, eigenvalues and damping split
are elementwise, ``∇W`` is formed by adding the output gradients into their tokens' columns,
and the right factor scales columns. The result is the dense computation on one-hot inputs,
exactly, for any vocabulary size.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from natgrad.capture import LayerAdapter
from natgrad.datapoints import check_fisher, output_vectors, row_multipliers, row_weight
from natgrad.likelihoods import Likelihood
from natgrad.linalg import damped_inverse, token_frequencies, token_matrix
from natgrad.precond.base import Damping, Preconditioner, check_count
from natgrad.precond.blocks import Block, LayerBatch, TokenBatch

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

    from natgrad.distributed import PendingAverage

DAMPING_MODES = ("heuristic", "correct", "none")
KFAC_FISHERS = ("mc", "empirical", "ief", "exact")
PSEUDO_INVERSE_RTOL = 1e-10


def augmented_inputs(inputs: Tensor, has_bias: bool) -> Tensor:
    """``Ā``: layer inputs ``(N, T, d_in)`` as ``(N T, d_in [+1])`` rows, bias column of ones."""
    rows = inputs.reshape(-1, inputs.shape[-1])
    if has_bias:
        rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
    return rows


def input_covariance(
    adapter: LayerAdapter, module: nn.Module, rows: Tensor, dtype: torch.dtype
) -> Tensor:
    """``Σ_A`` of one batch's input rows: ``Ā^T Ā / (N T)``, or its diagonal
    ``(num_embeddings,)`` for token inputs (module docstring)."""
    if adapter.token_inputs:
        return token_frequencies(rows, module.num_embeddings, dtype)
    inputs = augmented_inputs(rows, adapter.has_bias(module))
    return inputs.T @ inputs / inputs.shape[0]


@dataclass
class LayerGradient:
    """A layer's ``∇W``: low rank, ``Ē^T Ā`` from ``grad_rows`` ``(R, d_out)`` and ``inputs``
    ``(R, d_in)``, or a dense ``matrix`` ``(d_out, d_in)`` (token inputs)."""

    grad_rows: Tensor | None = None
    inputs: Tensor | None = None
    matrix: Tensor | None = None

    @classmethod
    def of(cls, batch: LayerBatch, grad_rows: Tensor) -> LayerGradient:
        """The gradient of ``batch`` from its output-gradient rows ``(N T, d_out)``."""
        if isinstance(batch, TokenBatch):
            rows = grad_rows.reshape(*batch.inputs.shape, -1)
            return cls(matrix=token_matrix(batch.inputs, rows, batch.module.num_embeddings).T)
        return cls(grad_rows, augmented_inputs(batch.inputs, batch.has_bias))

    def scaled(self, scale: float) -> LayerGradient:
        """``scale ∇W``."""
        if self.matrix is not None:
            return LayerGradient(matrix=scale * self.matrix)
        return LayerGradient(scale * self.grad_rows, self.inputs)

    def dense(self) -> Tensor:
        """``∇W`` as a ``(d_out, d_in)`` matrix."""
        return self.matrix if self.matrix is not None else self.grad_rows.T @ self.inputs

    def low_rank_pays(self, two_sided: bool) -> bool:
        """Whether applying the inverses to the low-rank factors is cheaper than to ``∇W``."""
        if self.matrix is not None:
            return False
        rank, d_out, d_in = self.inputs.shape[0], self.grad_rows.shape[1], self.inputs.shape[1]
        return _low_rank_is_cheaper(rank, d_out, d_in, two_sided)


def _check_schedule(
    ema_decay: float, factor_period: int, inv_period: int, pre_inversion_steps: int | None
) -> None:
    if not 0 <= ema_decay < 1:
        raise ValueError(f"ema_decay must lie in [0, 1), got {ema_decay}")
    check_count(factor_period, "factor_period")
    check_count(inv_period, "inv_period")
    if pre_inversion_steps is not None:
        if isinstance(pre_inversion_steps, bool) or not isinstance(pre_inversion_steps, int):
            raise ValueError(f"pre_inversion_steps must be an integer, got {pre_inversion_steps!r}")
        if not 1 <= pre_inversion_steps <= inv_period:
            raise ValueError(
                f"pre_inversion_steps S={pre_inversion_steps} must satisfy 1 <= S <= T = "
                f"inv_period={inv_period} (Algorithm 1 of seed 001)"
            )


class KroneckerPreconditioner(Preconditioner):
    """Shared machinery of KFAC and FOOF: factor EMAs, schedules, low-rank application."""

    uses_grad_factor: bool = True

    def __init__(
        self,
        model: nn.Module,
        *,
        likelihood: str | Likelihood,
        fisher: str,
        damping: Damping,
        ema_decay: float,
        factor_period: int,
        inv_period: int,
        pre_inversion_steps: int | None,
        mc_samples: int,
        reduction: str,
        unsupported: str,
        overrides: Mapping[str, str] | None,
        seed: int,
        distributed: str,
        process_group: ProcessGroup | None,
        spread_inversions: bool,
    ) -> None:
        if fisher not in KFAC_FISHERS:
            check_fisher(fisher)
            raise ValueError(f"Kronecker methods take fisher in {KFAC_FISHERS}, got {fisher!r}")
        _check_schedule(ema_decay, factor_period, inv_period, pre_inversion_steps)
        check_count(mc_samples, "mc_samples")
        self.fisher = fisher
        self.ema_decay = float(ema_decay)
        self.factor_period = factor_period
        self.inv_period = inv_period
        self.pre_inversion_steps = pre_inversion_steps
        self.mc_samples = mc_samples
        self.spread_inversions = bool(spread_inversions)
        super().__init__(
            model,
            likelihood=likelihood,
            reduction=reduction,
            damping=damping,
            unsupported=unsupported,
            overrides=overrides,
            seed=seed,
            distributed=distributed,
            process_group=process_group,
        )
        # per layer: running (unnormalised) sums and the EMA normaliser 1 - m^t
        self._input_factors: dict[str, Tensor] = {}
        self._grad_factors: dict[str, Tensor] = {}
        self._pending_factors: PendingAverage | None = None
        self.ema_weights: dict[str, float] = {}
        self.inverses: dict[str, dict[str, Any]] = {}

    @property
    def input_factors(self) -> dict[str, Tensor]:
        """Per layer, the running (unnormalised) EMA sum of the input covariances."""
        self._settle_factors()
        return self._input_factors

    @property
    def grad_factors(self) -> dict[str, Tensor]:
        """Per layer, the running (unnormalised) EMA sum of the output-gradient covariances."""
        self._settle_factors()
        return self._grad_factors

    def _settle_factors(self) -> None:
        """Wait for a factor average still under way (module docstring)."""
        if self._pending_factors is not None:
            pending, self._pending_factors = self._pending_factors, None
            pending.wait()

    # ------------------------------------------------------------------ schedule
    def updates_factors(self, step: int) -> bool:
        """Whether the factors take in the batch of ``step`` (Algorithm 1, lines 10-11)."""
        if step % self.factor_period != 0:
            return False
        if self.pre_inversion_steps is None:
            return True
        return (step + self.pre_inversion_steps) % self.inv_period < self.pre_inversion_steps

    def inverts(self, step: int) -> bool:
        """Whether the inverses are recomputed at ``step`` (Algorithm 1, lines 7-8)."""
        return step % self.inv_period == 0

    def _needs_factor_update(self, name: str) -> bool:
        return self.updates_factors(self.steps) or name not in self.ema_weights

    def _extra_output_vectors(self, logits: Tensor) -> Tensor | None:
        if not self.uses_grad_factor or self.fisher not in ("mc", "exact"):
            return None
        if not any(self._needs_factor_update(name) for name in self.selection.layers):
            return None
        return output_vectors(self.fisher, self.likelihood, logits, self.mc_samples, self.generator)

    # ------------------------------------------------------------------ factors
    def normalised_factors(self, name: str) -> tuple[Tensor, Tensor | None]:
        """The normalised EMAs ``(Σ_A, Σ_G)`` of a layer (``Σ_G`` is None for FOOF)."""
        weight = self.ema_weights[name]
        grad_factor = self.grad_factors.get(name)
        return (
            self.input_factors[name] / weight,
            None if grad_factor is None else grad_factor / weight,
        )

    def _fold_in(self, name: str, input_cov: Tensor, grad_cov: Tensor | None) -> None:
        decay = self.ema_decay
        if name not in self.ema_weights:
            self.input_factors[name] = (1 - decay) * input_cov
            if grad_cov is not None:
                self.grad_factors[name] = (1 - decay) * grad_cov
            self.ema_weights[name] = 1 - decay
            return
        self.input_factors[name] = decay * self.input_factors[name] + (1 - decay) * input_cov
        if grad_cov is not None:
            self.grad_factors[name] = decay * self.grad_factors[name] + (1 - decay) * grad_cov
        self.ema_weights[name] = decay * self.ema_weights[name] + (1 - decay)

    def _batch_grad_cov(
        self, batch: LayerBatch, factor: float, per_sample_output_grad: Tensor
    ) -> Tensor:
        if batch.extra_grads is not None:
            rows = batch.extra_grads
        else:
            multipliers = row_multipliers(
                "ief_matrix" if self.fisher == "ief" else self.fisher, per_sample_output_grad
            )
            rows = batch.loss_grads
            if multipliers is not None:
                rows = rows * multipliers.reshape(1, -1, 1, 1)
        flat = rows.reshape(-1, rows.shape[-1])
        return (factor * row_weight(self.fisher, self.mc_samples)) * (flat.T @ flat)

    # ------------------------------------------------------------------ main loop
    def _precondition(
        self, batches: list[LayerBatch], factor: float, per_sample_output_grad: Tensor
    ) -> None:
        updated = [batch for batch in batches if self._needs_factor_update(batch.name)]
        for batch in updated:
            self._fold_in(
                batch.name, *self._batch_statistics(batch, factor, per_sample_output_grad)
            )
        inverting = [
            batch.name
            for batch in batches
            if self.inverts(self.steps) or batch.name not in self.inverses
        ]
        if updated:
            # the averages were identical on all ranks before this fold and are linear in the
            # batch statistics: averaging them averages this step's statistics
            factors = [self.input_factors[b.name] for b in updated] + [
                self.grad_factors[b.name] for b in updated if b.name in self.grad_factors
            ]
            if inverting:
                self.communicator.average_(factors, "factors")
            else:
                self._pending_factors = self.communicator.start_average(factors, "factors")
        self._invert_layers(inverting)
        for batch in batches:
            grad_rows = factor * batch.loss_grads[0].reshape(-1, batch.loss_grads.shape[-1])
            batch.write_grad(
                *self._apply(
                    self.inverses[batch.name],
                    LayerGradient.of(batch, grad_rows),
                    batch.has_bias,
                    batch.grad_buffer(),
                )
            )

    def _batch_statistics(
        self, batch: LayerBatch, factor: float, per_sample_output_grad: Tensor
    ) -> tuple[Tensor, Tensor | None]:
        """The current batch's ``(Σ_A, Σ_G)`` of a layer (``Σ_G`` is None for FOOF)."""
        input_cov = input_covariance(
            batch.adapter, batch.module, batch.inputs, batch.loss_grads.dtype
        )
        if not self.uses_grad_factor:
            return input_cov, None
        if self.fisher in ("mc", "exact") and batch.extra_grads is None:
            raise RuntimeError(f"layer '{batch.name}' received no sampled datapoints this step")
        return input_cov, self._batch_grad_cov(batch, factor, per_sample_output_grad)

    def _directions_to_average(self, batches: list[Block]) -> list[nn.Parameter]:
        return [param for batch in batches for param in batch.parameters()]

    def invert_all(self) -> None:
        """Recompute every layer's inverse from its current factors (e.g. to time it); with
        ``spread_inversions`` under communication, a collective call: every rank must make it."""
        self._invert_layers(list(self.input_factors))

    def _invert_layers(self, names: list[str]) -> None:
        """Recompute the inverses of ``names``: all here, or dealt out over the ranks and
        broadcast with ``spread_inversions`` (module docstring)."""
        if not names:
            return
        if not (self.spread_inversions and self.communicator.active):
            for name in names:
                self.inverses[name] = self._invert(*self.normalised_factors(name))
            return
        owners = self.inversion_owners(names)
        inverses, failure = {}, None
        try:
            for name in names:
                if owners[name] == self.communicator.rank:
                    inverses[name] = self._invert(*self.normalised_factors(name))
        except Exception as error:  # agreed on below, so no rank waits for a broadcast
            failure = error
        self._agree_on_inversions(failure)
        self._share_inverses(names, owners, inverses)
        for name in names:  # in the order of names on every rank
            self.inverses[name] = inverses[name]

    def _agree_on_inversions(self, failure: Exception | None) -> None:
        """With spread inversions: raise on every rank if an inversion failed on any.

        A ``FloatingPointError`` (non-finite factors) becomes one on every rank, so the step is
        skipped everywhere; any other error is re-raised where it happened and reported as a
        ``RuntimeError`` on the other ranks.
        """
        numerical = isinstance(failure, FloatingPointError)
        flags = self.communicator.small([numerical, failure is not None and not numerical])
        numerical_ranks, other_ranks = self.communicator.all_reduce_sum(flags, "checks").tolist()
        if failure is not None and not numerical:
            raise failure
        if other_ranks:
            raise RuntimeError(
                "an inversion failed on another rank (spread_inversions): see its error"
            )
        if numerical_ranks:
            raise failure or FloatingPointError(
                "an inversion on another rank met non-finite factors (spread_inversions)"
            )

    def _factor_shapes(self, name: str) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
        """The shapes of a layer's factors: ``Σ_A`` ``(d_in [+1],) * 2``, or ``(V,)`` when
        diagonal, and ``Σ_G`` ``(d_out, d_out)`` (None without it)."""
        grad_factor = self.grad_factors.get(name)
        input_shape = tuple(self.input_factors[name].shape)
        return input_shape, None if grad_factor is None else tuple(grad_factor.shape)

    def inversion_owners(self, names: list[str]) -> dict[str, int]:
        """The rank that inverts each layer with ``spread_inversions``: layers by decreasing
        cost ``d_in^3 + d_out^3`` (``d_in`` for a diagonal ``Σ_A``; ties in the given order),
        each to the least loaded rank (ties to the lowest). The same on every rank, as the
        layer shapes are."""
        costs = {
            name: sum(
                shape[0] ** 3 if len(shape) == 2 else shape[0]
                for shape in self._factor_shapes(name)
                if shape
            )
            for name in names
        }
        loads = [0] * self.communicator.world_size
        owners = {}
        for name in sorted(names, key=lambda n: -costs[n]):
            rank = loads.index(min(loads))
            owners[name] = rank
            loads[rank] += costs[name]
        return owners

    def _share_inverses(
        self, names: list[str], owners: dict[str, int], inverses: dict[str, dict[str, Any]]
    ) -> None:
        """Complete ``inverses`` (this rank's own) with the other ranks': each rank broadcasts
        the tensors of the inverses it computed (one buffer per rank); one all-reduce carries
        their floats (damping values, scales) in float64."""
        communicator = self.communicator
        layouts = {name: self._inverse_layout(*self._factor_shapes(name)) for name in names}
        floats = {name: [k for k, s in layouts[name].items() if s is None] for name in names}
        float_values = torch.zeros(
            len(names), max(len(keys) for keys in floats.values()), dtype=torch.float64,
            device=communicator.device,
        )  # fmt: skip
        for source in range(communicator.world_size):
            owned = [name for name in names if owners[name] == source]
            entries = [(n, k, s) for n in owned for k, s in layouts[n].items() if s is not None]
            if not entries:
                continue
            sizes = [math.prod(shape) for *_, shape in entries]
            dtype = self.input_factors[owned[0]].dtype  # one buffer, one dtype
            if source == communicator.rank:
                buffer = torch.cat([inverses[n][k].reshape(-1).to(dtype) for n, k, _ in entries])
            else:
                buffer = self.input_factors[owned[0]].new_empty(sum(sizes))
            communicator.broadcast_(buffer, source, "inverses")
            if source != communicator.rank:
                for (name, key, shape), part in zip(entries, buffer.split(sizes), strict=True):
                    layer_dtype = self.input_factors[name].dtype
                    inverses.setdefault(name, {})[key] = part.view(shape).to(layer_dtype)
        for row, name in enumerate(names):
            if owners[name] == communicator.rank:
                for column, key in enumerate(floats[name]):
                    float_values[row, column] = inverses[name][key]
        if float_values.numel():
            communicator.all_reduce_sum(float_values, "inverses")
        for row, name in enumerate(names):
            for column, key in enumerate(floats[name]):
                inverses[name][key] = float_values[row, column].item()

    def _invert(self, input_cov: Tensor, grad_cov: Tensor | None) -> dict[str, Any]:
        raise NotImplementedError

    def _inverse_layout(
        self, input_shape: tuple[int, ...], grad_shape: tuple[int, ...] | None
    ) -> dict[str, Any]:
        """The entries of :meth:`_invert`'s result for factors of these shapes, ``{key: tensor
        shape, or None for a float}``, for broadcasting the inverses (``spread_inversions``)."""
        raise NotImplementedError

    def _apply(
        self,
        inverse: dict[str, Any],
        gradient: LayerGradient,
        has_bias: bool,
        out: Tensor | None,
    ) -> tuple[Tensor, Tensor | None]:
        """The update as ``(weight (d_out, d_in), bias or None)``, the weight into ``out``."""
        raise NotImplementedError

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(
            input_factors={k: v.clone() for k, v in self.input_factors.items()},
            grad_factors={k: v.clone() for k, v in self.grad_factors.items()},
            ema_weights=dict(self.ema_weights),
            inverses=_copy_inverses(self.inverses),
        )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._settle_factors()  # an average under way would land in the replaced factors
        self._input_factors = {k: v.clone() for k, v in state["input_factors"].items()}
        self._grad_factors = {k: v.clone() for k, v in state["grad_factors"].items()}
        self.ema_weights = dict(state["ema_weights"])
        self.inverses = _copy_inverses(state["inverses"])
        self._check_loaded_factors()

    def _check_loaded_factors(self) -> None:
        """Raise if a loaded input factor does not fit its layer. An embedding's dense factor
        (saved before natgrad kept it diagonal) becomes its diagonal, which is all it holds
        for one-hot inputs, and so do the input parts of its inverse."""
        for name, factor in self._input_factors.items():
            module = self.selection.layers.get(name)
            if module is None:
                raise ValueError(f"the state holds factors of '{name}', not a layer of this model")
            adapter = self.adapters[name]
            if adapter.token_inputs:
                expected: tuple[int, ...] = (module.num_embeddings,)
                if factor.dim() == 2 and tuple(factor.shape) == expected * 2:
                    self._input_factors[name] = factor.diagonal().clone()
                    inverse = self.inverses.get(name, {})
                    if "input" in inverse:  # the inverse of a diagonal is diagonal
                        inverse["input"] = inverse["input"].diagonal().clone()
                    if "input_vectors" in inverse:  # diag(V Λ V^T), in the tokens' order
                        vectors = inverse.pop("input_vectors")
                        inverse["input_values"] = vectors.pow(2) @ inverse["input_values"]
                    continue
            else:
                expected = (adapter.matrix_shape(module)[1] + int(adapter.has_bias(module)),) * 2
            if tuple(factor.shape) != expected:
                raise ValueError(
                    f"the state's input factor of '{name}' has shape {tuple(factor.shape)}, "
                    f"but this model's layer needs {expected}: load a state saved from the "
                    "same model"
                )

    def _settings(self) -> str:
        return (
            f"fisher={self.fisher}, ema_decay={self.ema_decay}, inv_period={self.inv_period}, "
            f"pre_inversion_steps={self.pre_inversion_steps}, "
            f"spread_inversions={self.spread_inversions}, " + super()._settings()
        )


def _copy_inverses(inverses: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """A copy of per-layer inverse entries (tensors cloned, floats kept)."""
    return {
        name: {k: v.clone() if isinstance(v, Tensor) else v for k, v in inverse.items()}
        for name, inverse in inverses.items()
    }


def _mean_eigenvalue(factor: Tensor) -> float:
    """``tr F / dim``, of a matrix or of a diagonal kept as a vector."""
    diagonal = factor if factor.dim() == 1 else factor.diagonal()
    return diagonal.sum().item() / factor.shape[0]


def _damped_inverse(factor: Tensor, damping: float) -> Tensor:
    """``(F + λ I)^{-1}``; elementwise for a diagonal kept as a vector (entries ``>= 0``)."""
    if factor.dim() == 1:
        return 1.0 / (factor + damping)
    return damped_inverse(factor, damping)[0]


def _heuristic_split(input_cov: Tensor, grad_cov: Tensor, damping: float) -> tuple[float, float]:
    """``(λ_A, λ_E)`` with ``λ_A λ_E = λ`` and ``λ_A/λ_E = (d_out tr A)/(d_in tr G)`` (eq. 2)."""
    mean_input = _mean_eigenvalue(input_cov)
    mean_grad = _mean_eigenvalue(grad_cov)
    ratio = math.sqrt(mean_input / mean_grad) if mean_input > 0 and mean_grad > 0 else 1.0
    root = math.sqrt(damping)
    return root * ratio, root / ratio


def _eigen(matrix: Tensor) -> tuple[Tensor, Tensor | None]:
    """Eigenvalues (clamped at 0) and eigenvectors; a diagonal kept as a vector is its own
    eigenvalues, with the identity (``None``) as eigenvectors."""
    if matrix.dim() == 1:
        return matrix.clamp_min(0), None
    values, vectors = torch.linalg.eigh(matrix.to(torch.float64))
    return values.clamp_min(0).to(matrix.dtype), vectors.to(matrix.dtype)


def _times_right(matrix: Tensor, right: Tensor | None) -> Tensor:
    """``matrix @ right``: ``right`` a matrix, a diagonal kept as a vector, or the identity."""
    if right is None:
        return matrix
    return matrix * right if right.dim() == 1 else matrix @ right


def _sandwich(left: Tensor | None, gradient: LayerGradient, right: Tensor | None) -> Tensor:
    """``left^T ∇W right``, as ``(Ē left)^T (Ā right)`` when the rank ``N T`` is small."""
    if gradient.low_rank_pays(left is not None):
        mapped_grads = gradient.grad_rows if left is None else gradient.grad_rows @ left
        return mapped_grads.T @ _times_right(gradient.inputs, right)
    matrix = gradient.dense()
    if left is not None:
        matrix = left.T @ matrix
    return _times_right(matrix, right)


def _low_rank_is_cheaper(rank: int, d_out: int, d_in: int, two_sided: bool) -> bool:
    left_cost = d_out * d_out if two_sided else 0
    low_rank = rank * (left_cost + d_in * d_in + d_out * d_in)
    dense = rank * d_out * d_in + d_out * d_in * d_in + (d_out**2 * d_in if two_sided else 0)
    return low_rank <= dense


def _split_sandwich(
    left: Tensor | None,
    gradient: LayerGradient,
    right: Tensor | None,
    has_bias: bool,
    out: Tensor | None,
) -> tuple[Tensor, Tensor | None]:
    """:func:`_sandwich` split into weight and bias parts, the weight written into ``out``.

    In the low-rank form the two parts are separate products, so the weight lands in the
    existing ``.grad`` without an intermediate ``d_out x d_in`` copy.
    """
    if gradient.low_rank_pays(left is not None):
        grad_rows, inputs = gradient.grad_rows, gradient.inputs
        d_weight = inputs.shape[1] - int(has_bias)
        mapped_grads = (grad_rows if left is None else grad_rows @ left).T
        mapped_inputs = inputs @ right
        weight = torch.mm(mapped_grads, mapped_inputs[:, :d_weight], out=out)
        return weight, (mapped_grads @ mapped_inputs[:, d_weight]) if has_bias else None
    full = _sandwich(left, gradient, right)
    d_weight = full.shape[1] - int(has_bias)
    return full[:, :d_weight], (full[:, d_weight] if has_bias else None)


class KFAC(KroneckerPreconditioner):
    """Kronecker-factored approximate curvature (seed 001 eq. 2-4, App. D-E).

    Parameters
    ----------
    model, likelihood, reduction, unsupported, overrides, seed
        As for :class:`natgrad.NGD`; normalisation layers and fallback tensors keep the plain
        gradient (an identity block, listed by :meth:`describe`).
    fisher
        Datapoints of the second factor: ``"mc"`` (``mc_samples`` sampled labels, default),
        ``"empirical"``, ``"ief"`` (rows rescaled by ``1/||d l_n / d z_n||``, the iEF matrix;
        seed 000 sec. 5) or ``"exact"`` (Hessian square-root columns).
    damping
        ``λ > 0`` (or a callable of the step): split into ``λ_A, λ_E`` (heuristic) or added to
        the Kronecker product (correct); ignored for ``damping_mode="none"``.
    damping_mode
        ``"heuristic"`` (default), ``"correct"`` or ``"none"``.
    ema_decay, factor_period, inv_period, pre_inversion_steps
        ``m``, ``k``, ``T`` and ``S`` of the schedule (module docstring).
    distributed, process_group
        ``"auto"`` (default: ``"global"`` if ``torch.distributed`` is initialised, else
        ``"off"``), ``"off"`` or ``"global"`` (factors and directions averaged over the ranks;
        :mod:`natgrad.distributed`), and the group of the ranks.
    spread_inversions
        With communication: deal the inversions out over the ranks by cost and broadcast them
        (module docstring) instead of inverting every layer on every rank. Ignored without
        communication.
    """

    def __init__(
        self,
        model: nn.Module,
        likelihood: str | Likelihood = "categorical",
        fisher: str = "mc",
        damping: Damping = 1e-3,
        damping_mode: str = "heuristic",
        ema_decay: float = 0.95,
        factor_period: int = 1,
        inv_period: int = 1,
        pre_inversion_steps: int | None = None,
        mc_samples: int = 1,
        *,
        reduction: str = "mean",
        unsupported: str = "fallback",
        overrides: Mapping[str, str] | None = None,
        seed: int = 0,
        distributed: str = "auto",
        process_group: ProcessGroup | None = None,
        spread_inversions: bool = False,
    ) -> None:
        if damping_mode not in DAMPING_MODES:
            raise ValueError(
                f"unknown damping_mode={damping_mode!r}: choose one of {DAMPING_MODES}"
            )
        self.damping_mode = damping_mode
        super().__init__(
            model,
            likelihood=likelihood,
            fisher=fisher,
            damping=damping,
            ema_decay=ema_decay,
            factor_period=factor_period,
            inv_period=inv_period,
            pre_inversion_steps=pre_inversion_steps,
            mc_samples=mc_samples,
            reduction=reduction,
            unsupported=unsupported,
            overrides=overrides,
            seed=seed,
            distributed=distributed,
            process_group=process_group,
            spread_inversions=spread_inversions,
        )

    def _settings(self) -> str:
        return f"damping_mode={self.damping_mode}, " + super()._settings()

    def _invert(self, input_cov: Tensor, grad_cov: Tensor | None) -> dict[str, Any]:
        if self.damping_mode == "heuristic":
            input_damping, grad_damping = _heuristic_split(
                input_cov, grad_cov, self.current_damping()
            )
            return {
                "input": _damped_inverse(input_cov, input_damping),
                "grad": _damped_inverse(grad_cov, grad_damping),
                "input_damping": input_damping,
                "grad_damping": grad_damping,
            }
        input_values, input_vectors = _eigen(input_cov)
        grad_values, grad_vectors = _eigen(grad_cov)
        inverse = {
            "input_values": input_values,
            "grad_values": grad_values,
            "grad_vectors": grad_vectors,
            "damping": self.current_damping() if self.damping_mode == "correct" else 0.0,
        }
        if input_vectors is not None:  # none for a diagonal Σ_A: its eigenvectors are I
            inverse["input_vectors"] = input_vectors
        return inverse

    def _inverse_layout(
        self, input_shape: tuple[int, ...], grad_shape: tuple[int, ...] | None
    ) -> dict[str, Any]:
        if self.damping_mode == "heuristic":
            return {
                "input": input_shape,
                "grad": grad_shape,
                "input_damping": None,
                "grad_damping": None,
            }
        layout: dict[str, Any] = {
            "input_values": input_shape[:1],
            "grad_values": grad_shape[:1],
            "grad_vectors": grad_shape,
            "damping": None,
        }
        if len(input_shape) == 2:
            layout["input_vectors"] = input_shape
        return layout

    def _apply(
        self,
        inverse: dict[str, Any],
        gradient: LayerGradient,
        has_bias: bool,
        out: Tensor | None,
    ) -> tuple[Tensor, Tensor | None]:
        if self.damping_mode == "heuristic":
            return _split_sandwich(inverse["grad"], gradient, inverse["input"], has_bias, out)
        input_vectors, grad_vectors = inverse.get("input_vectors"), inverse["grad_vectors"]
        rotated = _sandwich(grad_vectors, gradient, input_vectors)
        eigenvalues = torch.outer(inverse["grad_values"], inverse["input_values"])
        if self.damping_mode == "correct":
            scaled = rotated / (eigenvalues + inverse["damping"])
        else:
            floor = PSEUDO_INVERSE_RTOL * eigenvalues.max().clamp_min(
                torch.finfo(rotated.dtype).tiny
            )
            scaled = torch.where(eigenvalues > floor, rotated / eigenvalues.clamp_min(floor), 0.0)
        update = grad_vectors @ scaled
        if input_vectors is not None:
            update = update @ input_vectors.T
        d_weight = update.shape[1] - int(has_bias)
        return update[:, :d_weight], (update[:, d_weight] if has_bias else None)


class FOOF(KroneckerPreconditioner):
    """First-order optimisation on neurons, FOOF (seed 001 eq. 5-6, Algorithm 1, App. K).

    ``ΔW = ∇W (Σ_A + λ I)^{-1}`` per layer, ``Σ_A`` the normalised EMA of the input covariance.
    With ``kfac_damping=True`` it is the variant of App. D.8 used in Fig. 3: ``Σ_G`` and the
    heuristic ``λ_A, λ_E`` are computed as in :class:`KFAC` (with ``fisher`` and
    ``mc_samples``), and the update is ``∇W (Σ_A + λ_A I)^{-1} / λ_E``. ``distributed``,
    ``process_group`` and ``spread_inversions`` as for :class:`KFAC`.
    """

    def __init__(
        self,
        model: nn.Module,
        damping: Damping = 1.0,
        ema_decay: float = 0.95,
        inv_period: int = 1,
        pre_inversion_steps: int | None = None,
        factor_period: int = 1,
        *,
        kfac_damping: bool = False,
        likelihood: str | Likelihood = "categorical",
        fisher: str = "mc",
        mc_samples: int = 1,
        reduction: str = "mean",
        unsupported: str = "fallback",
        overrides: Mapping[str, str] | None = None,
        seed: int = 0,
        distributed: str = "auto",
        process_group: ProcessGroup | None = None,
        spread_inversions: bool = False,
    ) -> None:
        self.kfac_damping = bool(kfac_damping)
        self.uses_grad_factor = self.kfac_damping
        super().__init__(
            model,
            likelihood=likelihood,
            fisher=fisher,
            damping=damping,
            ema_decay=ema_decay,
            factor_period=factor_period,
            inv_period=inv_period,
            pre_inversion_steps=pre_inversion_steps,
            mc_samples=mc_samples,
            reduction=reduction,
            unsupported=unsupported,
            overrides=overrides,
            seed=seed,
            distributed=distributed,
            process_group=process_group,
            spread_inversions=spread_inversions,
        )

    def _settings(self) -> str:
        return f"kfac_damping={self.kfac_damping}, " + super()._settings()

    def warm_start(self, inputs: Iterable[Tensor]) -> None:
        """Fold the input covariances of a few batches into the EMA before training (App. K).

        Runs the model forward (without gradients) on each batch, then computes the inverses.
        Only the input factor needs no labels, so this is available for plain FOOF. With
        ``distributed="global"`` every rank passes as many batches and the factors are averaged.
        """
        if self.kfac_damping:
            raise ValueError(
                "warm_start() needs labels for the second factor: use kfac_damping=False"
            )
        handles = []
        calls: dict[str, list[Tensor]] = {name: [] for name in self.selection.layers}
        for name, module in self.selection.layers.items():
            adapter = self.adapters[name]

            def record(module: nn.Module, args: tuple, name: str = name, adapter=adapter) -> None:
                calls[name].append(adapter.input_rows(module, args[0].detach()))

            handles.append(module.register_forward_pre_hook(record))
        count = 0
        try:
            with torch.no_grad():
                for batch_inputs in inputs:
                    self.model(batch_inputs)
                    count += 1
                    # a module called several times: its calls' rows are one batch's tokens,
                    # as in step()
                    for name, rows in calls.items():
                        if rows:
                            module = self.selection.layers[name]
                            covariance = input_covariance(
                                self.adapters[name], module, torch.cat(rows, dim=1),
                                module.weight.dtype,
                            )  # fmt: skip
                            self._fold_in(name, covariance, None)
                            rows.clear()
        finally:
            for handle in handles:
                handle.remove()
            self.capture.clear()
        if self.communicator.active:
            self.communicator.check_same_count(count, "warm_start batches")
            self.communicator.average_(list(self.input_factors.values()), "factors")
        self.invert_all()

    def _invert(self, input_cov: Tensor, grad_cov: Tensor | None) -> dict[str, Any]:
        damping = self.current_damping()
        if not self.kfac_damping:
            return {"input": _damped_inverse(input_cov, damping), "scale": 1.0}
        input_damping, grad_damping = _heuristic_split(input_cov, grad_cov, damping)
        return {
            "input": _damped_inverse(input_cov, input_damping),
            "scale": 1.0 / grad_damping,
            "input_damping": input_damping,
            "grad_damping": grad_damping,
        }

    def _inverse_layout(
        self, input_shape: tuple[int, ...], grad_shape: tuple[int, ...] | None
    ) -> dict[str, Any]:
        layout: dict[str, Any] = {"input": input_shape, "scale": None}
        if self.kfac_damping:
            layout.update(input_damping=None, grad_damping=None)
        return layout

    def _apply(
        self,
        inverse: dict[str, Any],
        gradient: LayerGradient,
        has_bias: bool,
        out: Tensor | None,
    ) -> tuple[Tensor, Tensor | None]:
        if inverse["scale"] != 1.0:
            gradient = gradient.scaled(inverse["scale"])
        return _split_sandwich(None, gradient, inverse["input"], has_bias, out)


__all__ = ["DAMPING_MODES", "FOOF", "KFAC", "KFAC_FISHERS", "KroneckerPreconditioner"]
