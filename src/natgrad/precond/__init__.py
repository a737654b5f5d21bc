"""Preconditioners: one class per curvature structure, sharing :class:`Preconditioner`."""

from natgrad.precond.base import NonFiniteWarning, Preconditioner
from natgrad.precond.fishleg import FishLeg
from natgrad.precond.foof import FOOF
from natgrad.precond.kfac import KFAC
from natgrad.precond.woodbury import EF, IEF, NGD, STRUCTURES, TENGraD

__all__ = [
    "EF",
    "FOOF",
    "IEF",
    "KFAC",
    "NGD",
    "STRUCTURES",
    "FishLeg",
    "NonFiniteWarning",
    "Preconditioner",
    "TENGraD",
]
