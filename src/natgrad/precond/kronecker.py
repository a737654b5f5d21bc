"""Kronecker-factored preconditioners: the machinery KFAC (Benzing 2022, eq. 2-4, App. D-E;
:mod:`natgrad.precond.kfac`) and FOOF (eq. 5-6; :mod:`natgrad.precond.foof`) share.

Per layer with weight matrix ``W`` (``d_out x d_in``, bias as an extra input column), the
curvature block is approximated by ``Σ_A ⊗ Σ_G`` with

* ``Σ_A = 1/(N T) sum_{n,t} a_{nt} a_{nt}^T`` (input covariance, bias column included),
* ``Σ_G = c w sum_{k,n,t} e_{knt} e_{knt}^T`` (output-gradient covariance of the datapoints of
  the chosen Fisher type, ``c`` the reduction factor, ``w`` the row weight; the "expand"
  convention for weight sharing),

so that ``Σ_A ⊗ Σ_G`` approximates ``c w sum_{k,n} g_{kn} g_{kn}^T``, as curvlinops' KFAC does.
Both are exponential moving averages with decay ``m``, normalised (Benzing 2022, App. D.1:
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
curvature by one batch. The first step always initialises the factors and their inverses
(from that one batch, ``x̂_1 = x_1``), so no step applies an uninitialised inverse. A damping that
varies with the step takes effect at the next inversion.

Default schedule: ``factor_period=1, inv_period=20, pre_inversion_steps=None`` (``k = 1``,
``T = 20``; :data:`DEFAULT_INV_PERIOD`): factors every step, inverses every 20 steps, as
Martens & Grosse 2015 (inverses every ``T_3 = 20`` iterations) and within what Benzing
2022 found harmless (App. D.3-D.7: one inversion per epoch, ``T = 100 ... 500``). Measured by
``python benchmarks/kronecker_schedule.py`` (docs/performance.md, "Default schedule"):
on the MLP 784-1000-1000-1000-10 (4,000 MNIST images, batch 100, 200 steps, learning rate
tuned per schedule, 2 seeds) KFAC reached a training loss of 1.2e-3 at ``T = 20`` for 3.6x the
CPU time of an SGD step, against 1.2e-2 at 11.8x for ``T = 1``; FOOF 1.8e-3 at 7.1x (``T = 1``)
and 4.6e-3 at 2.4x (``T = 50``). On a small CNN every schedule trained to below 5e-4 (KFAC
``T = 1``: one seed of two stalled at 0.56), ``T = 1`` costing 4.4x and ``T = 20`` 3.5x. A
stale inverse can need a smaller learning rate than one refreshed every step (the CNN's KFAC
diverged at ``T >= 10`` with a rate that ``T = 1`` took).
Inverting every step (``inv_period=1``) is the most faithful and the most expensive; folding the
factors only before each inversion (``pre_inversion_steps``) or every ``k`` steps is the next
saving, worth most for convolutions, whose factor folds need the unfolded patches.

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
for inversion are dealt out over the ranks by cost and each rank broadcasts its share
(:mod:`natgrad.precond.assignment`), so every rank ends with the same inverses for about
``1/R`` of the inversion work and one broadcast of every inverse. It pays when inversions are
a large part of the step (wide layers, frequent inversions).

The per-layer inverses are typed (:mod:`natgrad.precond.inverses`), and are applied to the
gradient's low-rank factors when that is cheaper (:mod:`natgrad.precond.layer_gradient`). The
batch statistics are folded in place, a dense factor in its upper triangle only
(:mod:`natgrad.precond.factors`), made whole before it is read; an inversion works from the
running sums and the EMA normaliser (no normalised copy) and replaces the layer's inverse.

``nn.Embedding`` (:class:`~natgrad.precond.blocks.TokenBatch`): the inputs are one-hot, so
``Σ_A`` is diagonal, the token frequencies ``diag(c_v) / (N T)``, and is kept as that vector
(``num_embeddings`` numbers instead of its square); its inverse, eigenvalues and damping split
are elementwise, ``∇W`` is formed by adding the output gradients into their tokens' columns,
and the right factor scales columns. The result is the dense computation on one-hot inputs,
exactly, for any vocabulary size.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Literal, get_args

import torch
from torch import Tensor, nn

from natgrad.adapters import LayerAdapter
from natgrad.datapoints import check_fisher, output_vectors, row_multipliers, row_weight
from natgrad.linalg import check_finite_matrix
from natgrad.precond.assignment import InversionAssignment
from natgrad.precond.base import Preconditioner
from natgrad.precond.blocks import Block, LayerBatch
from natgrad.precond.checks import Damping, check_count
from natgrad.precond.factors import Outer, input_statistic, symmetrise_upper_
from natgrad.precond.inverses import LayerInverse
from natgrad.precond.layer_gradient import LayerGradient

if TYPE_CHECKING:
    from natgrad.distributed import PendingAverage

KroneckerFisher = Literal["mc", "empirical", "ief", "exact"]
KFAC_FISHERS: tuple[KroneckerFisher, ...] = get_args(KroneckerFisher)
DEFAULT_INV_PERIOD = 20
"""The default ``inv_period`` ``T`` of KFAC and FOOF (factors every step, ``S = None``):
module docstring, "Default schedule"."""


def input_covariance(
    adapter: LayerAdapter, module: nn.Module, rows: Tensor, dtype: torch.dtype
) -> Tensor:
    """``Σ_A`` of one batch's input rows: ``Ā^T Ā / (N T)``, or its diagonal
    ``(num_embeddings,)`` for token inputs (module docstring)."""
    return input_statistic(adapter, module, rows, dtype).dense()


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
                f"inv_period={inv_period} (Benzing 2022, Algorithm 1)"
            )


class KroneckerPreconditioner(Preconditioner):
    """Shared machinery of KFAC and FOOF: factor EMAs, schedules, inversions.

    Parameters
    ----------
    model, damping
        As for :class:`~natgrad.precond.base.Preconditioner`.
    fisher
        Datapoints of the second factor ``Σ_G``: ``"mc"`` (``mc_samples`` sampled labels,
        default), ``"empirical"``, ``"ief"`` (rows rescaled by ``1/||d l_n / d z_n||``, the
        iEF matrix; Wu et al. 2024, sec. 5) or ``"exact"`` (Hessian square-root columns).
    ema_decay, factor_period, inv_period, pre_inversion_steps
        ``m`` (default 0.95), ``k`` (1), ``T`` (20) and ``S`` (None) of the schedule (module
        docstring, "Default schedule").
    mc_samples
        ``M >= 1``, the labels sampled per datapoint for ``fisher="mc"``.
    spread_inversions
        With communication: deal the inversions out over the ranks by cost and broadcast them
        (:mod:`natgrad.precond.assignment`) instead of inverting every layer on every rank.
        Ignored without communication.
    **options
        The options every preconditioner takes (:class:`~natgrad.precond.base.Preconditioner`);
        ``distributed`` is ``"auto"``, ``"off"`` or ``"global"`` (factors and directions
        averaged over the ranks; module docstring). Normalisation layers and fallback tensors
        keep the plain gradient (an identity block, listed by :meth:`describe`).
    """

    uses_grad_factor: bool = True

    def __init__(
        self,
        model: nn.Module,
        *,
        damping: Damping,
        fisher: KroneckerFisher = "mc",
        ema_decay: float = 0.95,
        factor_period: int = 1,
        inv_period: int = DEFAULT_INV_PERIOD,
        pre_inversion_steps: int | None = None,
        mc_samples: int = 1,
        spread_inversions: bool = False,
        **options: Any,
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
        super().__init__(model, damping=damping, **options)
        # per layer: running (unnormalised) sums and the EMA normaliser 1 - m^t
        self._input_factors: dict[str, Tensor] = {}
        self._grad_factors: dict[str, Tensor] = {}
        self._pending_factors: PendingAverage | None = None
        # layers whose dense factors hold a stale lower triangle (folded upper only)
        self._stale_lower: set[str] = set()
        self.ema_weights: dict[str, float] = {}
        self.inverses: dict[str, LayerInverse] = {}
        self.assignment = InversionAssignment(self.communicator)

    @property
    def input_factors(self) -> dict[str, Tensor]:
        """Per layer, the running (unnormalised) EMA sum of the input covariances."""
        self._settle_factors(list(self._stale_lower))
        return self._input_factors

    @property
    def grad_factors(self) -> dict[str, Tensor]:
        """Per layer, the running (unnormalised) EMA sum of the output-gradient covariances."""
        self._settle_factors(list(self._stale_lower))
        return self._grad_factors

    def _settle_factors(self, names: Iterable[str] = ()) -> None:
        """Wait for a factor average still under way (module docstring); then make the
        factors of ``names`` whole where only their upper triangle was folded."""
        if self._pending_factors is not None:
            pending, self._pending_factors = self._pending_factors, None
            pending.wait()
        for name in names:
            if name in self._stale_lower:
                self._stale_lower.discard(name)
                for factor in (self._input_factors[name], self._grad_factors.get(name)):
                    if factor is not None and factor.dim() == 2:
                        symmetrise_upper_(factor)

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

    def _fold_in(self, name: str, input_stat: Outer, grad_stat: Outer | None) -> None:
        """Fold one batch's statistics into the layer's moving averages, in place; a dense
        average only in its upper triangle (made whole when next read: :meth:`_settle_factors`)."""
        self._settle_factors()
        decay = self.ema_decay
        first = name not in self.ema_weights
        self._input_factors[name] = input_stat.fold_into(
            None if first else self._input_factors[name], decay, upper=True
        )
        if grad_stat is not None:
            self._grad_factors[name] = grad_stat.fold_into(
                None if first else self._grad_factors[name], decay, upper=True
            )
        if not first:
            self._stale_lower.add(name)
        previous = 0.0 if first else self.ema_weights[name]
        self.ema_weights[name] = decay * previous + (1 - decay)

    def _batch_grad_statistic(
        self, batch: LayerBatch, factor: float, per_sample_output_grad: Tensor
    ) -> Outer:
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
        return Outer(flat, factor * row_weight(self.fisher, self.mc_samples))

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
            # (a stale lower triangle is averaged too, and restored from the averaged upper one)
            factors = [self._input_factors[b.name] for b in updated] + [
                self._grad_factors[b.name] for b in updated if b.name in self._grad_factors
            ]
            if inverting:
                self.communicator.average_(factors, "factors")
            else:
                self._pending_factors = self.communicator.start_average(factors, "factors")
        self._invert_layers(inverting)
        for batch in batches:
            buffer = batch.grad_buffer()
            update = self.inverses[batch.name].apply(LayerGradient.of(batch, factor), buffer)
            batch.write_grad(*update, buffer)

    def _batch_statistics(
        self, batch: LayerBatch, factor: float, per_sample_output_grad: Tensor
    ) -> tuple[Outer, Outer | None]:
        """The current batch's ``(Σ_A, Σ_G)`` of a layer (``Σ_G`` is None for FOOF)."""
        input_stat = input_statistic(
            batch.adapter, batch.module, batch.inputs, batch.loss_output_grads.dtype
        )
        if not self.uses_grad_factor:
            return input_stat, None
        if self.fisher in ("mc", "exact") and batch.extra_grads is None:
            raise RuntimeError(f"layer '{batch.name}' received no sampled datapoints this step")
        return input_stat, self._batch_grad_statistic(batch, factor, per_sample_output_grad)

    def _directions_to_average(self, batches: list[Block]) -> list[nn.Parameter]:
        return [param for batch in batches for param in batch.parameters()]

    def invert_all(self) -> None:
        """Recompute every layer's inverse from its current factors (e.g. to time it); with
        ``spread_inversions`` under communication, a collective call: every rank must make it."""
        self._invert_layers(list(self.input_factors))

    def _invert_layers(self, names: list[str]) -> None:
        """Recompute the inverses of ``names``: all here, or dealt out over the ranks and
        broadcast with ``spread_inversions`` (:mod:`natgrad.precond.assignment`)."""
        if not names:
            return
        self._settle_factors(names)
        if not (self.spread_inversions and self.communicator.active):
            for name in names:
                self.inverses[name] = self._invert_layer(name, replaces=True)
            return
        self.inverses.update(
            self.assignment.invert(
                {name: self._inversion_cost(name) for name in names},
                self._invert_layer,
                lambda name: self.inverse_type.empty_like(
                    self._input_factors[name], self._grad_factors.get(name)
                ),
            )
        )

    def _invert_layer(self, name: str, replaces: bool = False) -> LayerInverse:
        """The inverse of a layer's normalised factors, computed from the running sums and the
        EMA normaliser (no normalised copy). ``replaces``: the result replaces the layer's
        inverse, which is dropped first, once the factors are known to be finite, so that its
        memory can hold the new one (a failed inversion keeps it)."""
        input_factor, grad_factor = self._input_factors[name], self._grad_factors.get(name)
        if replaces:
            for factor in (input_factor, grad_factor):
                if factor is not None:
                    check_finite_matrix(factor, "the curvature factor contains NaN or Inf")
            self.inverses.pop(name, None)
        return self._invert(input_factor, grad_factor, 1.0 / self.ema_weights[name])

    def _inversion_cost(self, name: str) -> int:
        """``d_in^3 + d_out^3`` of a layer's factors (``d_in`` for a diagonal ``Σ_A``)."""
        factors = [self._input_factors[name], self._grad_factors.get(name)]
        return sum(
            factor.shape[0] ** 3 if factor.dim() == 2 else factor.shape[0]
            for factor in factors
            if factor is not None
        )

    def inversion_owners(self, names: list[str]) -> dict[str, int]:
        """The rank that inverts each layer with ``spread_inversions``
        (:meth:`natgrad.precond.assignment.InversionAssignment.owners`)."""
        return self.assignment.owners({name: self._inversion_cost(name) for name in names})

    def _invert(
        self, input_factor: Tensor, grad_factor: Tensor | None, scale: float
    ) -> LayerInverse:
        """The inverse of a layer's normalised factors ``scale * (input_factor, grad_factor)``
        at the current damping."""
        raise NotImplementedError

    @property
    def inverse_type(self) -> type[LayerInverse]:
        """The type of the method's per-layer inverses (:mod:`natgrad.precond.inverses`)."""
        raise NotImplementedError

    @property
    def inverse_form(self) -> dict[str, Any]:
        """The options that decide what the per-layer inverses hold; a saved state is loaded
        only into a preconditioner with the same ones."""
        raise NotImplementedError

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(
            input_factors={k: v.clone() for k, v in self.input_factors.items()},
            grad_factors={k: v.clone() for k, v in self.grad_factors.items()},
            ema_weights=dict(self.ema_weights),
            inverses={name: _cloned(inverse.tensors()) for name, inverse in self.inverses.items()},
            inverse_form=dict(self.inverse_form),
        )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("inverse_form")  # absent from states saved before it was recorded
        if saved is not None and saved != self.inverse_form:
            raise ValueError(
                f"the state's inverses were computed with {saved}, but this "
                f"{type(self).__name__} has {self.inverse_form}: build it with the saved options "
                "to resume from this state"
            )
        super().load_state_dict(state)
        self._settle_factors()  # an average under way would land in the replaced factors
        self._stale_lower.clear()
        self._input_factors = {k: v.clone() for k, v in state["input_factors"].items()}
        self._grad_factors = {k: v.clone() for k, v in state["grad_factors"].items()}
        self.ema_weights = dict(state["ema_weights"])
        self.inverses = {
            name: self.inverse_type.from_tensors(_cloned(entries))
            for name, entries in state["inverses"].items()
        }
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
                    if name in self.inverses:
                        self.inverses[name] = self.inverses[name].with_diagonal_input()
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


def _cloned(entries: Mapping[str, Tensor | float]) -> dict[str, Tensor | float]:
    """A copy of an inverse's entries (tensors cloned, floats kept)."""
    return {k: v.clone() if isinstance(v, Tensor) else v for k, v in entries.items()}


__all__ = [
    "KFAC_FISHERS",
    "KroneckerFisher",
    "KroneckerPreconditioner",
]
