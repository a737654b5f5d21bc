"""Mixed precision and devices: every preconditioner under ``torch.autocast`` (bfloat16 and
float16 on the CPU) gives the float32 update to the autocast dtype's accuracy, with a
``GradScaler`` the unscaled update, and on CUDA the CPU update.

natgrad forms its curvature from the captured rows in float32 at least; the bfloat16 forward
pass only perturbs the rows (relative error about ``2^-8``), and the damped solve amplifies that
by at most its conditioning, kept moderate here (damping 0.1).
"""

from __future__ import annotations

import copy
import warnings

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
    "kfac": lambda model: natgrad.KFAC(model, damping=0.1, inv_period=1),
    "foof": lambda model: natgrad.FOOF(model, damping=0.1, inv_period=1),
    "fishleg": lambda model: natgrad.FishLeg(model, damping=0.1, aux_period=1),
}


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


def update(
    model, make, inputs, targets, autocast: bool, steps: int = 2, dtype=torch.bfloat16
) -> torch.Tensor:
    """The direction written by the last of ``steps`` steps (a second step uses the state the
    first built: moving averages, FishLeg's learned Q)."""
    pre = make(model)
    for _ in range(steps):
        model.zero_grad()
        with torch.autocast(inputs.device.type, dtype=dtype, enabled=autocast):
            logits = model(inputs)
            loss = F.cross_entropy(logits, targets)
        loss.backward()
        if pre is not None:
            pre.step(logits)
    if pre is not None:
        pre.remove()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize(
    ("dtype", "float_logits"),
    [(torch.bfloat16, False), (torch.bfloat16, True), (torch.float16, False)],
)
@pytest.mark.parametrize("method", sorted(METHODS))
def test_autocast_update_is_the_float32_update(method, dtype, float_logits):
    """Within four epsilons of the autocast dtype (2^-5 for bfloat16, 2^-8 for float16)."""
    body = make_model()
    model = FloatLogits(body) if float_logits else body
    inputs, targets = torch.randn(32, 10), torch.randint(0, 4, (32,))
    expected = update(copy.deepcopy(model), METHODS[method], inputs, targets, autocast=False)
    actual = update(copy.deepcopy(model), METHODS[method], inputs, targets, True, dtype=dtype)
    gradient = update(copy.deepcopy(model), lambda m: None, inputs, targets, autocast=False)
    assert not torch.allclose(expected, gradient, rtol=0.1)  # the method preconditions
    error = ((actual - expected).norm() / expected.norm()).item()
    assert error < 4 * torch.finfo(dtype).eps


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 6)
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.head = nn.Linear(3 * 4 * 4 + 6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        images, tokens = x[:, :16].reshape(-1, 1, 4, 4), x[:, 16].long()
        features = torch.tanh(self.conv(images)).flatten(1)
        return self.head(torch.cat([features, self.embed(tokens)], dim=1))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_half_precision_weights_give_the_float32_update(method, dtype):
    """A model converted with ``.to(dtype)`` (not autocast): Linear, Conv2d and Embedding
    weights and their ``.grad`` in half precision. natgrad forms the direction in float32 and
    stores it in the weights' dtype; the result is the float32 update of the same rounded
    weights and inputs, to the accuracy of the half-precision forward pass."""
    torch.manual_seed(1)
    model = SmallCNN().to(dtype).float()  # weights exactly representable in ``dtype``
    inputs = torch.cat([torch.randn(24, 16), torch.randint(0, 20, (24, 1)).float()], dim=1)
    inputs, targets = inputs.to(dtype).float(), torch.randint(0, 4, (24,))
    expected = update(copy.deepcopy(model), METHODS[method], inputs, targets, autocast=False)
    half = copy.deepcopy(model).to(dtype)
    actual = update(half, METHODS[method], inputs.to(dtype), targets, autocast=False)
    assert all(p.grad.dtype == dtype for p in half.parameters())
    error = ((actual.float() - expected).norm() / expected.norm()).item()
    assert error < 8 * torch.finfo(dtype).eps


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


def scaled_step(model, pre, opt, scaler, inputs, targets) -> None:
    opt.zero_grad()
    logits = model(inputs)
    scaler.scale(F.cross_entropy(logits, targets)).backward()
    pre.step(logits, grad_scaler=scaler)
    scaler.unscale_(opt)


def state_tensors(state) -> list[torch.Tensor]:
    """Every tensor and number of a (nested) state dict, in order."""
    if isinstance(state, dict):
        return [t for key in sorted(state, key=str) for t in state_tensors(state[key])]
    if isinstance(state, (list, tuple)):
        return [t for item in state for t in state_tensors(item)]
    if isinstance(state, torch.Tensor):
        return [state.detach().clone()]
    if isinstance(state, (int, float)):
        return [torch.tensor(state)]
    return []


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_grad_scaler_gives_the_unscaled_update(method, fused):
    """``scaler.scale(loss)``: natgrad divides its captured rows by the scale and writes the
    directions in the scaled units, so after ``unscale_`` they are the unscaled update."""
    model = make_model().double()
    inputs, targets = torch.randn(32, 10), torch.randint(0, 4, (32,))
    expected = update(copy.deepcopy(model), METHODS[method], inputs, targets, autocast=False)
    model = copy.deepcopy(model)
    pre = METHODS[method](model)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    for _ in range(2):  # as update(): the second step's direction
        opt.zero_grad()
        logits = model(inputs)
        loss = scaler.scale(F.cross_entropy(logits, targets))
        pre.backward(loss) if fused else loss.backward()
        pre.step(logits, grad_scaler=scaler)
        scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()
        if _ == 0:
            continue
        actual = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    assert torch.allclose(actual, expected, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_grad_scaler_overflow_is_skipped_without_touching_the_state(method):
    model = make_model()
    inputs, targets = torch.randn(32, 10), torch.randint(0, 4, (32,))
    pre = METHODS[method](model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    scaled_step(model, pre, opt, scaler, inputs, targets)
    scaler.step(opt)
    scaler.update()
    weights = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(pre.state_dict())
    opt.zero_grad()
    logits = model(inputs)
    scale = scaler.get_scale()
    scaler.scale(1e36 * F.cross_entropy(logits, targets)).backward()  # overflows float32
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an overflow is routine under a scaler: no warning
        pre.step(logits, grad_scaler=scaler)
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() < scale  # the scaler saw the overflow and lowered the scale
    for param, weight in zip(model.parameters(), weights, strict=True):
        assert torch.equal(param, weight)
    after = pre.state_dict()
    assert after.pop("skipped_steps") == 1 + state.pop("skipped_steps")
    # labels were sampled (fisher="mc") in the backward pass, before the overflow was known
    after.pop("generator"), state.pop("generator")
    before, after = state_tensors(state), state_tensors(after)
    assert len(before) == len(after)
    assert all(torch.equal(a, b) for a, b in zip(after, before, strict=True))


def test_grad_scaler_unscaled_before_step_is_refused():
    model = make_model()
    pre = natgrad.EF(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    logits = model(torch.randn(8, 10))
    scaler.scale(F.cross_entropy(logits, torch.randint(0, 4, (8,)))).backward()
    scaler.unscale_(opt)
    with pytest.raises(RuntimeError, match=r"unscale_\(optimizer\) was called before step"):
        pre.step(logits, grad_scaler=scaler)
