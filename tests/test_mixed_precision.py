"""Mixed precision and devices: every preconditioner under ``torch.autocast`` (bfloat16 on the
CPU) gives the float32 update to bfloat16 accuracy, and on CUDA the CPU update.

natgrad forms its curvature from the captured rows in float32 at least; the bfloat16 forward
pass only perturbs the rows (relative error about ``2^-8``), and the damped solve amplifies that
by at most its conditioning, kept moderate here (damping 0.1).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import natgrad

METHODS = {
    "ngd-exact": lambda model: natgrad.NGD(model, fisher="exact", damping=0.1),
    "ngd-mc": lambda model: natgrad.NGD(model, fisher="mc", mc_samples=2, damping=0.1),
    "ngd-layer": lambda model: natgrad.NGD(model, structure="layer", damping=0.1),
    "ef": lambda model: natgrad.EF(model, damping=0.1),
    "ief": lambda model: natgrad.IEF(model, damping=0.1),
    "tengrad": lambda model: natgrad.TENGraD(model, damping=0.1),
    "kfac": lambda model: natgrad.KFAC(model, damping=0.1),
    "foof": lambda model: natgrad.FOOF(model, damping=0.1),
    "fishleg": lambda model: natgrad.FishLeg(model, damping=0.1, aux_period=1),
}
BF16_TOLERANCE = 2.0**-5  # four bfloat16 epsilons


class FloatLogits(nn.Module):
    """A model whose last operation casts its logits to float32 (a common autocast idiom)."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).float()


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(10, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
        nn.Linear(16, 4),
    )  # fmt: skip


def update(model, make, inputs, targets, autocast: bool, steps: int = 2) -> torch.Tensor:
    """The direction written by the last of ``steps`` steps (a second step uses the state the
    first built: moving averages, FishLeg's learned Q)."""
    pre = make(model)
    for _ in range(steps):
        model.zero_grad()
        with torch.autocast(inputs.device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = model(inputs)
            loss = F.cross_entropy(logits, targets)
        loss.backward()
        if pre is not None:
            pre.step(logits)
    if pre is not None:
        pre.remove()
    return torch.cat([p.grad.reshape(-1).float() for p in model.parameters()])


@pytest.mark.parametrize("float_logits", [False, True])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_autocast_bfloat16_update_is_the_float32_update(method, float_logits):
    body = make_model()
    model = FloatLogits(body) if float_logits else body
    inputs, targets = torch.randn(32, 10), torch.randint(0, 4, (32,))
    expected = update(copy.deepcopy(model), METHODS[method], inputs, targets, autocast=False)
    actual = update(copy.deepcopy(model), METHODS[method], inputs, targets, autocast=True)
    gradient = update(copy.deepcopy(model), lambda m: None, inputs, targets, autocast=False)
    assert not torch.allclose(expected, gradient, rtol=0.1)  # the method preconditions
    error = ((actual - expected).norm() / expected.norm()).item()
    assert error < BF16_TOLERANCE


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("method", sorted(METHODS))
def test_cuda_update_is_the_cpu_update(method):
    """The same float64 update on CUDA as on the CPU (label sampling included: natgrad's
    generator lives on the CPU)."""
    model = make_model().double()
    inputs, targets = torch.randn(32, 10, dtype=torch.float64), torch.randint(0, 4, (32,))
    expected = update(copy.deepcopy(model), METHODS[method], inputs, targets, autocast=False)
    actual = update(
        copy.deepcopy(model).cuda(), METHODS[method], inputs.cuda(), targets.cuda(), False
    )
    assert torch.allclose(actual.cpu(), expected, rtol=1e-9, atol=1e-12)
