"""Preconditioners: one class per curvature structure, sharing :class:`Preconditioner`."""

from natgrad.precond.base import NonFiniteWarning, Preconditioner
from natgrad.precond.woodbury import EF, IEF, NGD, STRUCTURES, TENGraD

__all__ = ["EF", "IEF", "NGD", "STRUCTURES", "NonFiniteWarning", "Preconditioner", "TENGraD"]
