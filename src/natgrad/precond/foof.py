"""FOOF: first-order optimisation on neurons (Benzing 2022, eq. 5-6, Algorithm 1, App. K).

The factors, their schedule and the shared update machinery are
:class:`~natgrad.precond.kronecker.KroneckerPreconditioner`'s (its module docstring states the
update); this module adds FOOF's inverse (:class:`~natgrad.precond.inverses.FOOFInverse`) and
its warm start from unlabelled batches.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from natgrad.precond.checks import Damping
from natgrad.precond.factors import input_statistic
from natgrad.precond.inverses import FOOFInverse, LayerInverse
from natgrad.precond.kronecker import KroneckerPreconditioner


class FOOF(KroneckerPreconditioner):
    """First-order optimisation on neurons, FOOF (Benzing 2022, eq. 5-6, Algorithm 1, App. K).

    Default schedule ``factor_period=1, inv_period=20, pre_inversion_steps=None``, as
    :class:`~natgrad.precond.kfac.KFAC`. Inverting every step (``inv_period=1``) cost FOOF
    7.1x an SGD step on Benzing 2022's MLP (loss 1.8e-3 after 200 steps), ``inv_period=50``
    2.4x (4.6e-3; :mod:`natgrad.precond.kronecker`, ``python
    benchmarks/kronecker_schedule.py``).

    ``ΔW = ∇W (Σ_A + λ I)^{-1}`` per layer, ``Σ_A`` the normalised EMA of the input covariance.
    With ``kfac_damping=True`` it is the variant of App. D.8 used in Fig. 3: ``Σ_G`` and the
    heuristic ``λ_A, λ_E`` are computed as in :class:`~natgrad.precond.kfac.KFAC` (with
    ``fisher`` and ``mc_samples``), and the update is ``∇W (Σ_A + λ_A I)^{-1} / λ_E``.

    Parameters
    ----------
    model
        The model; its forward pass must return the logits ``(N, C)``.
    damping
        ``λ > 0`` (default 1), or a callable of the step.
    kfac_damping
        Whether to use KFAC's damping split (App. D.8).
    **options
        The schedule (``ema_decay``, ``factor_period``, ``inv_period``,
        ``pre_inversion_steps``), ``spread_inversions`` and, with ``kfac_damping``, ``fisher``
        and ``mc_samples``, as for
        :class:`~natgrad.precond.kronecker.KroneckerPreconditioner`; and the options every
        preconditioner takes (:class:`~natgrad.precond.base.Preconditioner`).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        damping: Damping = 1.0,
        kfac_damping: bool = False,
        **options: Any,
    ) -> None:
        self.kfac_damping = bool(kfac_damping)
        self.uses_grad_factor = self.kfac_damping
        super().__init__(model, damping=damping, **options)

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
                            statistic = input_statistic(
                                self.adapters[name], module, torch.cat(rows, dim=1),
                                module.weight.dtype,
                            )  # fmt: skip
                            self._fold_in(name, statistic, None)
                            rows.clear()
        finally:
            for handle in handles:
                handle.remove()
            self.capture.clear()
        if self.communicator.active:
            self.communicator.check_same_count(count, "warm_start batches")
            self.communicator.average_(list(self.input_factors.values()), "factors")
        self.invert_all()

    def _invert(
        self, input_factor: Tensor, grad_factor: Tensor | None, scale: float
    ) -> LayerInverse:
        return FOOFInverse.compute(input_factor, grad_factor, self.current_damping(), scale)

    @property
    def inverse_type(self) -> type[LayerInverse]:
        return FOOFInverse

    @property
    def inverse_form(self) -> dict[str, Any]:
        return {"kfac_damping": self.kfac_damping}


__all__ = ["FOOF"]
