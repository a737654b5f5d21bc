"""natgrad: natural-gradient optimisation and Fisher-approximation analysis for PyTorch."""

from natgrad import (
    adapters,
    analysis,
    capture,
    datapoints,
    direct,
    distributed,
    fallback,
    fisher_vector,
    laplace,
    layers,
    likelihoods,
    linalg,
    selection,
)
from natgrad.laplace import Laplace
from natgrad.linalg import NumericalWarning
from natgrad.precond import (
    EF,
    FOOF,
    IEF,
    KFAC,
    NGD,
    FishLeg,
    NonFiniteWarning,
    Preconditioner,
    TENGraD,
)
from natgrad.selection import register_adapter

__version__ = "0.1.0"

__all__ = [
    "EF",
    "FOOF",
    "IEF",
    "KFAC",
    "NGD",
    "FishLeg",
    "Laplace",
    "NonFiniteWarning",
    "NumericalWarning",
    "Preconditioner",
    "TENGraD",
    "adapters",
    "analysis",
    "capture",
    "datapoints",
    "direct",
    "distributed",
    "fallback",
    "fisher_vector",
    "laplace",
    "layers",
    "likelihoods",
    "linalg",
    "register_adapter",
    "selection",
]
