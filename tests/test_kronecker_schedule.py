"""KFAC's and FOOF's default schedule (issue 18): what it is, that the documentation states it,
and that its first steps (one inversion, then steps that reuse it while the factors keep
folding batches in) match the dense formula."""

from __future__ import annotations

import copy
import inspect
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import natgrad
from natgrad.precond.kronecker import DEFAULT_INV_PERIOD, KroneckerPreconditioner
from oracle import relative_error
from test_kronecker import (
    benzing_damping,
    explicit_factors,
    kron_solve,
    make_model,
    weight_matrix_grads,
)

TOLERANCE = 1e-8
README = Path(__file__).resolve().parents[1] / "README.md"
DEFAULT_SCHEDULE = f"factor_period=1, inv_period={DEFAULT_INV_PERIOD}, pre_inversion_steps=None"


def test_the_default_schedule_is_the_documented_one():
    defaults = {
        name: parameter.default
        for name, parameter in inspect.signature(KroneckerPreconditioner).parameters.items()
    }
    assert DEFAULT_INV_PERIOD > 1
    assert (defaults["factor_period"], defaults["inv_period"]) == (1, DEFAULT_INV_PERIOD)
    assert defaults["pre_inversion_steps"] is None
    for method in (natgrad.KFAC, natgrad.FOOF):
        pre = method(make_model())
        assert (pre.factor_period, pre.inv_period, pre.pre_inversion_steps) == (
            1,
            DEFAULT_INV_PERIOD,
            None,
        )
        assert DEFAULT_SCHEDULE in " ".join(method.__doc__.split()), method.__name__
        pre.remove()
    assert DEFAULT_SCHEDULE in " ".join(README.read_text().split())


def dense_update(method, a_cov, g_cov, gradient, damping):
    """The update of one layer from the factors ``(Σ_A, Σ_G)`` it was inverted from."""
    eye = torch.eye(a_cov.shape[0])
    if method == "foof":
        return gradient @ torch.linalg.inv(a_cov + damping * eye)
    if method == "foof-kfac-damping":  # Benzing 2022, App. D.8
        input_damping, grad_damping = benzing_damping(a_cov, g_cov, damping)
        return gradient @ torch.linalg.inv(a_cov + input_damping * eye) / grad_damping
    return kron_solve(g_cov, a_cov, gradient, method.removeprefix("kfac-"), damping)


METHODS = {
    "kfac-heuristic": lambda m, d: natgrad.KFAC(m, fisher="empirical", damping=d),
    "kfac-correct": lambda m, d: natgrad.KFAC(
        m, fisher="empirical", damping=d, damping_mode="correct"
    ),
    "kfac-none": lambda m, d: natgrad.KFAC(m, fisher="empirical", damping_mode="none"),
    "foof": lambda m, d: natgrad.FOOF(m, damping=d),
    "foof-kfac-damping": lambda m, d: natgrad.FOOF(
        m, damping=d, kfac_damping=True, fisher="empirical"
    ),
}


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("method", list(METHODS))
def test_default_schedule_inverts_the_first_batch_then_reuses_that_inverse(method):
    """Step 0 inverts the factors of the first batch (``x̂_1 = x_1``), never an uninitialised
    factor; steps 1, 2, 3 precondition with that same inverse while the moving averages take
    in their batches (checked against the explicit EMA), so the inversion at ``T`` sees them.
    The standard (``loss.backward()``) and fused (``pre.backward(loss)``) paths agree."""
    torch.manual_seed(3)
    model = make_model()
    twin, fused_model = copy.deepcopy(model), copy.deepcopy(model)  # twin: no hooks
    damping, decay = 0.05, 0.95
    pre, fused_pre = METHODS[method](model, damping), METHODS[method](fused_model, damping)
    batches = [(torch.randn(7, 4), torch.randint(0, 3, (7,))) for _ in range(4)]
    sums, weight, inverted = None, 0.0, None
    for step, (inputs, targets) in enumerate(batches):
        assert pre.inverts(step) == (step == 0) and pre.updates_factors(step)
        covs = list(zip(*explicit_factors(twin, inputs, targets, "empirical", "mean"), strict=True))
        if sums is None:
            sums = [((1 - decay) * a, (1 - decay) * g) for a, g in covs]
        else:
            sums = [
                (decay * sa + (1 - decay) * a, decay * sg + (1 - decay) * g)
                for (sa, sg), (a, g) in zip(sums, covs, strict=True)
            ]
        weight = decay * weight + (1 - decay)
        if step == 0:
            inverted = [(sa / weight, sg / weight) for sa, sg in sums]
        twin.zero_grad()
        F.cross_entropy(twin(inputs), targets).backward()
        plain = weight_matrix_grads(twin)
        for net, precond, fused in ((model, pre, False), (fused_model, fused_pre, True)):
            net.zero_grad()
            logits = net(inputs)
            loss = F.cross_entropy(logits, targets)
            precond.backward(loss) if fused else loss.backward()
            precond.step(logits)
        actual, actual_fused = weight_matrix_grads(model), weight_matrix_grads(fused_model)
        for layer, ((a_cov, g_cov), gradient) in enumerate(zip(inverted, plain, strict=True)):
            expected = dense_update(method, a_cov, g_cov, gradient, damping)
            assert torch.isfinite(actual[layer]).all()
            assert relative_error(actual[layer], expected) <= TOLERANCE, (step, layer)
            assert relative_error(actual_fused[layer], actual[layer]) <= 1e-12, (step, layer)
            natgrad_a, _ = pre.normalised_factors(str(2 * layer))
            assert relative_error(natgrad_a, sums[layer][0] / weight) <= TOLERANCE
