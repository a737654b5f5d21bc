"""One options contract: ``model`` then keyword-only options, the shared ones declared once."""

from __future__ import annotations

import inspect
import typing

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import natgrad
from natgrad.precond.base import Preconditioner

METHODS = [
    natgrad.NGD,
    natgrad.EF,
    natgrad.IEF,
    natgrad.TENGraD,
    natgrad.KFAC,
    natgrad.FOOF,
    natgrad.FishLeg,
]
SHARED = [
    "likelihood",
    "reduction",
    "unsupported",
    "overrides",
    "seed",
    "distributed",
    "process_group",
    "fallback_chunk_size",
]


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.__name__)
def test_every_option_after_model_is_keyword_only(method):
    parameters = list(inspect.signature(method).parameters.values())
    assert parameters[0].name == "model"
    kinds = {p.name: p.kind for p in parameters[1:]}
    assert set(kinds.values()) <= {inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.VAR_KEYWORD}
    with pytest.raises(TypeError, match="positional"):
        method(make_model(), "categorical")


def test_shared_options_are_declared_once_with_literal_types():
    """The base class declares the shared options; no method re-declares one."""
    base = inspect.signature(Preconditioner.__init__).parameters
    assert all(base[name].kind is inspect.Parameter.KEYWORD_ONLY for name in SHARED)
    for method in METHODS:
        for cls in method.__mro__:
            if cls is Preconditioner or "__init__" not in vars(cls):
                continue
            own = inspect.signature(cls.__init__).parameters
            assert not set(SHARED) & set(own), f"{cls.__name__} re-declares a shared option"
    hints = typing.get_type_hints(
        Preconditioner.__init__, localns={"ProcessGroup": object, "nn": nn}
    )
    assert typing.get_args(hints["reduction"]) == ("mean", "sum")
    assert typing.get_args(hints["distributed"]) == ("auto", "off", "global", "local")


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.__name__)
def test_unknown_option_names_itself(method):
    """The error names the method the user called (not the base class) and the option meant."""
    meant = rf"^{method.__name__}\(\) got .*'dampng' \(did you mean 'damping'\?\)"
    with pytest.raises(TypeError, match=meant):
        method(make_model(), dampng=1.0)
    with pytest.raises(TypeError, match="'zzz';"):
        method(make_model(), zzz=1.0)


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.__name__)
def test_every_method_takes_the_shared_options(method):
    torch.manual_seed(0)
    model = make_model()
    pre = method(
        model,
        likelihood="categorical",
        reduction="sum",
        unsupported="error",
        overrides={},
        seed=4,
        distributed="off",
        process_group=None,
        fallback_chunk_size=8,
    )
    assert (pre.reduction, pre.seed, pre.communicator.mode) == ("sum", 4, "off")
    logits = model(torch.randn(5, 3))
    F.cross_entropy(logits, torch.randint(0, 2, (5,)), reduction="sum").backward()
    pre.step(logits)
    assert pre.steps == 1
