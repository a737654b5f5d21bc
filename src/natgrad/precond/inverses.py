"""Per-layer inverses of the Kronecker-factored curvature (Benzing 2022, eq. 2-6).

Each type is computed from a layer's normalised factors ``(Σ_A, Σ_G)`` (``Σ_G`` is ``None``
for FOOF) and a damping ``λ``, and applies itself to the layer's gradient ``∇W``:

* :class:`KroneckerInverse`, KFAC with heuristic damping (eq. 2, 4):
  ``ΔW = (Σ_G + λ_E I)^{-1} ∇W (Σ_A + λ_A I)^{-1}`` with ``λ_A λ_E = λ`` and
  ``λ_A / λ_E = (d_out tr Σ_A) / (d_in tr Σ_G)``;
* :class:`EigenInverse`, KFAC with correct damping (eq. 3):
  ``vec ΔW = (Σ_A ⊗ Σ_G + λ I)^{-1} vec ∇W``, solved in the eigenbases of the factors; with
  ``λ = 0`` the pseudo-inverse ``ΔW = Σ_G^+ ∇W Σ_A^+`` (eigenvalues below
  :data:`PSEUDO_INVERSE_RTOL` times the largest count as zero, so rank-deficient factors never
  give Inf);
* :class:`FOOFInverse`, FOOF (eq. 6): ``ΔW = ∇W (Σ_A + λ I)^{-1}``, or with KFAC's damping
  split (App. D.8, Fig. 3) ``ΔW = ∇W (Σ_A + λ_A I)^{-1} / λ_E``.

An ``nn.Embedding``'s ``Σ_A`` is diagonal (its inputs are one-hot) and kept as a vector: every
type then holds the input side as a vector (its inverse, or its eigenvalues with the identity
as eigenvectors) and applies it elementwise.

The tensors and floats of an inverse, :meth:`LayerInverse.tensors`, are what ``state_dict``
saves and what a rank broadcasts with ``spread_inversions``
(:class:`natgrad.precond.assignment.InversionAssignment`); :meth:`LayerInverse.from_tensors`
rebuilds the inverse from them and :meth:`LayerInverse.empty_like` gives the receiving rank
an inverse of the right layout to fill.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import TypeVar

import torch
from torch import Tensor

from natgrad.linalg import damped_inverse
from natgrad.precond.layer_gradient import (
    LayerGradient,
    sandwich,
    split_bias,
    split_sandwich,
)

Number = TypeVar("Number", float, Tensor)

PSEUDO_INVERSE_RTOL = 1e-10
"""Eigenvalues of ``Σ_A ⊗ Σ_G`` below this fraction of the largest are zero for the
undamped pseudo-inverse."""

InverseT = TypeVar("InverseT", bound="LayerInverse")


@dataclass(eq=False)
class LayerInverse(ABC):
    """A layer's inverse curvature: its tensors and floats, and how it maps ``∇W`` to ``ΔW``.

    Subclasses are dataclasses whose fields are tensors or floats (``None`` for an entry the
    inverse does not hold); :meth:`tensors` and :meth:`from_tensors` read and write them by
    field name.
    """

    @classmethod
    @abstractmethod
    def compute(
        cls: type[InverseT],
        input_cov: Tensor,
        grad_cov: Tensor | None,
        damping: float,
        scale: float = 1.0,
    ) -> InverseT:
        """The inverse of the normalised factors ``(Σ_A, Σ_G) = scale * (input_cov, grad_cov)``
        with damping ``λ`` (``scale``: the EMA normaliser, so that the running sums are not
        copied to be normalised)."""

    @classmethod
    @abstractmethod
    def empty_like(
        cls: type[InverseT], input_factor: Tensor, grad_factor: Tensor | None
    ) -> InverseT:
        """An inverse of factors shaped as these, its tensors uninitialised and its floats
        zero: what a rank fills with the entries another rank broadcasts."""

    @abstractmethod
    def apply(
        self, gradient: LayerGradient, out: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        """The update ``ΔW`` as ``(weight (d_out, d_in), bias or None)`` (a bias if
        ``gradient.has_bias``), the weight written into ``out`` where the computation allows
        it."""

    @abstractmethod
    def with_diagonal_input(self: InverseT) -> InverseT:
        """The same inverse with its input side kept as a diagonal: for a dense embedding
        factor saved before natgrad kept it as a vector (one-hot inputs make it diagonal)."""

    def tensors(self) -> dict[str, Tensor | float]:
        """The inverse's entries by name, in field order, without copies."""
        entries = {field.name: getattr(self, field.name) for field in fields(self)}
        return {name: value for name, value in entries.items() if value is not None}

    @classmethod
    def from_tensors(cls: type[InverseT], entries: Mapping[str, Tensor | float]) -> InverseT:
        """The inverse holding ``entries`` (as :meth:`tensors` returns them), without copies."""
        names = [field.name for field in fields(cls)]
        required = [field.name for field in fields(cls) if field.default is not None]
        unknown = sorted(set(entries) - set(names))
        missing = sorted(set(required) - set(entries))
        if unknown or missing:
            raise ValueError(
                f"{cls.__name__} holds {names}, but the state's entries lack {missing} and "
                f"add {unknown}: load a state saved with the same method and damping settings"
            )
        return cls(**{name: entries[name] for name in names if name in entries})


@dataclass(eq=False)
class KroneckerInverse(LayerInverse):
    """KFAC with heuristic damping (Benzing 2022, eq. 2, 4): the damped factor inverses."""

    input: Tensor
    """``(Σ_A + λ_A I)^{-1}``, a vector for a diagonal ``Σ_A``."""
    grad: Tensor
    """``(Σ_G + λ_E I)^{-1}``."""
    input_damping: float
    """``λ_A``."""
    grad_damping: float
    """``λ_E``."""

    @classmethod
    def compute(
        cls, input_cov: Tensor, grad_cov: Tensor | None, damping: float, scale: float = 1.0
    ) -> KroneckerInverse:
        input_damping, grad_damping = heuristic_split(input_cov, grad_cov, damping)
        return cls(
            damped_factor_inverse(input_cov, input_damping, scale),
            damped_factor_inverse(grad_cov, grad_damping, scale),
            input_damping,
            grad_damping,
        )

    @classmethod
    def empty_like(cls, input_factor: Tensor, grad_factor: Tensor | None) -> KroneckerInverse:
        return cls(torch.empty_like(input_factor), torch.empty_like(grad_factor), 0.0, 0.0)

    def apply(
        self, gradient: LayerGradient, out: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        return split_sandwich(self.grad, gradient, self.input, out)

    def with_diagonal_input(self) -> KroneckerInverse:
        if self.input.dim() == 1:
            return self
        # the inverse of a diagonal is diagonal
        return replace(self, input=self.input.diagonal().clone())


@dataclass(eq=False)
class EigenInverse(LayerInverse):
    """KFAC with correct damping (Benzing 2022, eq. 3), or without damping (``damping = 0``:
    the pseudo-inverse): the factors' eigendecompositions."""

    input_values: Tensor
    """Eigenvalues of ``Σ_A`` (clamped at 0)."""
    grad_values: Tensor
    """Eigenvalues of ``Σ_G`` (clamped at 0)."""
    grad_vectors: Tensor
    """Eigenvectors of ``Σ_G``, as columns."""
    damping: float
    """``λ`` added to the eigenvalues of ``Σ_A ⊗ Σ_G``; 0 for the pseudo-inverse."""
    input_vectors: Tensor | None = None
    """Eigenvectors of ``Σ_A``; ``None`` (the identity) for a diagonal ``Σ_A``."""

    @classmethod
    def compute(
        cls, input_cov: Tensor, grad_cov: Tensor | None, damping: float, scale: float = 1.0
    ) -> EigenInverse:
        input_values, input_vectors = eigen(input_cov, scale)
        grad_values, grad_vectors = eigen(grad_cov, scale)
        return cls(input_values, grad_values, grad_vectors, damping, input_vectors)

    @classmethod
    def empty_like(cls, input_factor: Tensor, grad_factor: Tensor | None) -> EigenInverse:
        return cls(
            input_factor.new_empty(input_factor.shape[0]),
            grad_factor.new_empty(grad_factor.shape[0]),
            torch.empty_like(grad_factor),
            0.0,
            None if input_factor.dim() == 1 else torch.empty_like(input_factor),
        )

    def apply(
        self, gradient: LayerGradient, out: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        rotated = sandwich(self.grad_vectors, gradient, self.input_vectors)
        eigenvalues = torch.outer(self.grad_values, self.input_values)
        if self.damping > 0:
            scaled = rotated / (eigenvalues + self.damping)
        else:
            floor = PSEUDO_INVERSE_RTOL * eigenvalues.max().clamp_min(
                torch.finfo(rotated.dtype).tiny
            )
            scaled = torch.where(eigenvalues > floor, rotated / eigenvalues.clamp_min(floor), 0.0)
        update = self.grad_vectors @ scaled
        if self.input_vectors is not None:
            update = update @ self.input_vectors.T
        return split_bias(update, gradient.has_bias)

    def with_diagonal_input(self) -> EigenInverse:
        if self.input_vectors is None:
            return self
        # diag(V Λ V^T), in the tokens' order
        values = self.input_vectors.pow(2) @ self.input_values
        return replace(self, input_values=values, input_vectors=None)


@dataclass(eq=False)
class FOOFInverse(LayerInverse):
    """FOOF (Benzing 2022, eq. 6), with KFAC's damping split if the inverse was computed with
    ``Σ_G`` (App. D.8)."""

    input: Tensor
    """``(Σ_A + λ I)^{-1}``, or ``(Σ_A + λ_A I)^{-1}``; a vector for a diagonal ``Σ_A``."""
    scale: float
    """``1``, or ``1 / λ_E``."""
    input_damping: float | None = None
    """``λ_A`` (with KFAC's damping split only)."""
    grad_damping: float | None = None
    """``λ_E`` (with KFAC's damping split only)."""

    @classmethod
    def compute(
        cls, input_cov: Tensor, grad_cov: Tensor | None, damping: float, scale: float = 1.0
    ) -> FOOFInverse:
        if grad_cov is None:
            return cls(damped_factor_inverse(input_cov, damping, scale), 1.0)
        input_damping, grad_damping = heuristic_split(input_cov, grad_cov, damping)
        return cls(
            damped_factor_inverse(input_cov, input_damping, scale),
            1.0 / grad_damping,
            input_damping,
            grad_damping,
        )

    @classmethod
    def empty_like(cls, input_factor: Tensor, grad_factor: Tensor | None) -> FOOFInverse:
        if grad_factor is None:
            return cls(torch.empty_like(input_factor), 0.0)
        return cls(torch.empty_like(input_factor), 0.0, 0.0, 0.0)

    def apply(
        self, gradient: LayerGradient, out: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        if self.scale != 1.0:
            gradient = gradient.scaled(self.scale)
        return split_sandwich(None, gradient, self.input, out)

    def with_diagonal_input(self) -> FOOFInverse:
        if self.input.dim() == 1:
            return self
        return replace(self, input=self.input.diagonal().clone())


def mean_eigenvalue(factor: Tensor) -> float:
    """``tr F / dim``, of a matrix or of a diagonal kept as a vector."""
    diagonal = factor if factor.dim() == 1 else factor.diagonal()
    return diagonal.sum().item() / factor.shape[0]


def damped_factor_inverse(factor: Tensor, damping: float, scale: float = 1.0) -> Tensor:
    """``(s F + λ I)^{-1}``; elementwise for a diagonal kept as a vector (entries ``>= 0``)."""
    if factor.dim() == 1:
        return 1.0 / (scale * factor + damping)
    return damped_inverse(factor, damping, scale=scale)[0]


def heuristic_split(input_cov: Tensor, grad_cov: Tensor, damping: float) -> tuple[float, float]:
    """``(λ_A, λ_E)`` with ``λ_A λ_E = λ`` and ``λ_A/λ_E = (d_out tr A)/(d_in tr G)``
    (Benzing 2022, eq. 2); the same for factors scaled alike (running sums of one EMA)."""
    return split_damping(mean_eigenvalue(input_cov), mean_eigenvalue(grad_cov), damping)


def split_damping(mean_input: Number, mean_grad: Number, damping: Number) -> tuple[Number, Number]:
    """``(λ_A, λ_E)`` with ``λ_A λ_E = λ`` and ``λ_A / λ_E = mean_input / mean_grad``, the
    factors' mean eigenvalues (an even split if one is zero); floats or scalar tensors, so the
    Kronecker Laplace posterior can differentiate it in ``λ``."""
    ratio = (mean_input / mean_grad) ** 0.5 if mean_input > 0 and mean_grad > 0 else 1.0
    root = damping**0.5
    return root * ratio, root / ratio


def eigen(matrix: Tensor, scale: float = 1.0) -> tuple[Tensor, Tensor | None]:
    """Eigenvalues (clamped at 0) and eigenvectors of ``scale * matrix``; a diagonal kept as a
    vector is its own eigenvalues, with the identity (``None``) as eigenvectors."""
    if matrix.dim() == 1:
        return (scale * matrix).clamp_min(0), None
    values, vectors = torch.linalg.eigh(matrix.to(torch.float64))
    return (scale * values).clamp_min(0).to(matrix.dtype), vectors.to(matrix.dtype)


__all__ = [
    "PSEUDO_INVERSE_RTOL",
    "EigenInverse",
    "FOOFInverse",
    "KroneckerInverse",
    "LayerInverse",
    "eigen",
    "heuristic_split",
    "split_damping",
]
