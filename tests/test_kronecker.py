"""KFAC and FOOF against explicit Kronecker matrices built from an explicit forward pass."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import natgrad
from natgrad.likelihoods import get_likelihood
from natgrad.precond import factors
from natgrad.precond.inverses import EigenInverse, FOOFInverse, KroneckerInverse
from natgrad.precond.layer_gradient import LayerGradient
from oracle import relative_error

pytestmark = pytest.mark.usefixtures("float64")

TOLERANCE = 1e-8


@pytest.fixture(params=[None, 2], ids=["shipped-fold-block", "fold-block-2"])
def fold_block(request, monkeypatch):
    """FOLD_BLOCK as shipped (one block for these tiny layers: the whole product), and 2, so
    that the factors are folded block row by block row in their upper triangle only and made
    whole when read."""
    if request.param is not None:
        monkeypatch.setattr(factors, "FOLD_BLOCK", request.param)
    return request.param


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


def linear_io(model: nn.Module, inputs: torch.Tensor):
    """Inputs and outputs of every Linear, and the logits, by an explicit forward pass."""
    layer_inputs, layer_outputs, hidden = [], [], inputs
    for module in model:
        if isinstance(module, nn.Linear):
            layer_inputs.append(hidden)
            hidden = module(hidden)
            layer_outputs.append(hidden)
        else:
            hidden = module(hidden)
    return layer_inputs, layer_outputs, hidden


def explicit_factors(model, inputs, targets, fisher, reduction, vectors=None):
    """Σ_A and Σ_G of every Linear, one autograd call per datapoint and output coordinate."""
    num = inputs.shape[0]
    factor = 1.0 / num if reduction == "mean" else 1.0
    layer_inputs, _, _ = linear_io(model, inputs)
    input_covs = []
    for layer_input in layer_inputs:
        augmented = torch.cat([layer_input.detach(), torch.ones(num, 1)], dim=1)
        input_covs.append(augmented.T @ augmented / num)
    grad_covs = [torch.zeros(m.out_features, m.out_features) for m in model[::2]]
    for n in range(num):
        _, outputs, logits = linear_io(model, inputs[n : n + 1])
        loss = F.cross_entropy(logits, targets[n : n + 1], reduction="sum")
        if fisher in ("empirical", "ief"):
            rows = [torch.autograd.grad(loss, outputs, retain_graph=True)]
            weights = [1.0]
            if fisher == "ief":
                logit_grad = torch.autograd.grad(loss, logits, retain_graph=True)[0]
                weights = [1.0 / logit_grad.pow(2).sum().item()]
        elif fisher == "mc":
            rows = [
                torch.autograd.grad(logits, outputs, grad_outputs=v[n : n + 1], retain_graph=True)
                for v in vectors
            ]
            weights = [1.0 / len(vectors)] * len(vectors)
        else:
            probs = torch.softmax(logits.detach()[0], dim=0)
            hessian = torch.diag(probs) - torch.outer(probs, probs)
            jacobians = [
                torch.stack(
                    [
                        torch.autograd.grad(logits[0, c], out, retain_graph=True)[0][0]
                        for c in range(logits.shape[1])
                    ]
                )
                for out in outputs
            ]
            for index, jac in enumerate(jacobians):
                grad_covs[index] += factor * jac.T @ hessian @ jac
            continue
        for row, weight in zip(rows, weights, strict=True):
            for index, e in enumerate(row):
                grad_covs[index] += factor * weight * torch.outer(e[0], e[0])
    return input_covs, grad_covs


def weight_matrix_grads(model):
    """``[W, b]`` gradient of every Linear."""
    return [torch.cat([m.weight.grad, m.bias.grad.unsqueeze(1)], dim=1) for m in model[::2]]


def benzing_damping(input_cov, grad_cov, damping):
    """``(λ_A, λ_E)`` as Benzing (2022) eq. 2 states them, for ``W`` of ``n x m`` (``n``
    outputs, ``m`` inputs): ``λ_A λ_E = λ`` and ``λ_A / λ_E = n Tr(AAᵀ) / (m Tr(E_F E_Fᵀ))``."""
    n, m = grad_cov.shape[0], input_cov.shape[0]
    ratio = (n * input_cov.trace() / (m * grad_cov.trace())).item()  # λ_A / λ_E
    input_damping = math.sqrt(damping * ratio)  # λ_A² = λ · (λ_A / λ_E)
    return input_damping, damping / input_damping


def kron_solve(grad_cov, input_cov, gradient, damping_mode, damping):
    """Dense solve with the Kronecker curvature (row-major vec: G ⊗ A)."""
    if damping_mode == "heuristic":
        # eq. 4: the inverse of (AAᵀ + λ_A I) ⊗ (E_F E_Fᵀ + λ_E I), applied to the column-major
        # vec of ∇W (column-major: the input factor is the left one)
        input_damping, grad_damping = benzing_damping(input_cov, grad_cov, damping)
        inverse = torch.kron(
            torch.linalg.inv(input_cov + input_damping * torch.eye(input_cov.shape[0])),
            torch.linalg.inv(grad_cov + grad_damping * torch.eye(grad_cov.shape[0])),
        )
        column_major = inverse @ gradient.T.reshape(-1)
        return column_major.reshape(gradient.shape[1], gradient.shape[0]).T
    elif damping_mode == "correct":
        curvature = torch.kron(grad_cov, input_cov)
        solution = torch.linalg.solve(
            curvature + damping * torch.eye(curvature.shape[0]), gradient.reshape(-1)
        )
    else:
        curvature = torch.kron(grad_cov, input_cov)
        solution = torch.linalg.pinv(curvature, rtol=1e-10, hermitian=True) @ gradient.reshape(-1)
    return solution.reshape(gradient.shape)


def one_step(model, pre, inputs, targets, reduction="mean"):
    model.zero_grad()
    logits = model(inputs)
    loss = F.cross_entropy(logits, targets, reduction=reduction)
    loss.backward()
    plain = weight_matrix_grads(model)
    pre.step(logits)
    return plain, weight_matrix_grads(model), logits.detach()


def applied_low_rank(batch: int, two_sided: bool) -> bool:
    """Whether the inverses of :func:`make_model`'s first layer map the rows of a batch of
    ``batch`` (the low-rank form) rather than the dense gradient."""
    gradient = LayerGradient(torch.zeros(batch, 5), torch.zeros(batch, 4), has_bias=True)
    return gradient.low_rank_pays(two_sided)


@pytest.mark.parametrize("batch", [12, 2], ids=["dense-form", "low-rank-form"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("fisher", ["mc", "empirical", "ief", "exact"])
@pytest.mark.parametrize("damping_mode", ["heuristic", "correct", "none"])
def test_kfac_matches_dense_kronecker_solve(damping_mode, fisher, reduction, batch):
    assert applied_low_rank(batch, two_sided=True) == (batch == 2)
    torch.manual_seed(0)
    model = make_model()
    inputs, targets = torch.randn(batch, 4), torch.randint(0, 3, (batch,))
    damping, samples, seed = 1e-2, 4, 5
    pre = natgrad.KFAC(
        model,
        fisher=fisher,
        damping=damping,
        damping_mode=damping_mode,
        ema_decay=0.0,
        mc_samples=samples,
        reduction=reduction,
        seed=seed,
    )
    plain, actual, logits = one_step(model, pre, inputs, targets, reduction)
    vectors = None
    if fisher == "mc":
        generator = torch.Generator().manual_seed(seed)
        vectors = get_likelihood("categorical").sampled_output_grads(logits, samples, generator)
    input_covs, grad_covs = explicit_factors(model, inputs, targets, fisher, reduction, vectors)
    for layer, (a_cov, g_cov, gradient) in enumerate(
        zip(input_covs, grad_covs, plain, strict=True)
    ):
        natgrad_a, natgrad_g = pre.normalised_factors(str(2 * layer))
        assert relative_error(natgrad_a, a_cov) <= TOLERANCE
        assert relative_error(natgrad_g, g_cov) <= TOLERANCE
        expected = kron_solve(g_cov, a_cov, gradient, damping_mode, damping)
        assert relative_error(actual[layer], expected) <= TOLERANCE


@pytest.mark.parametrize("batch", [9, 2], ids=["dense-form", "low-rank-form"])
@pytest.mark.parametrize("kfac_damping", [False, True])
def test_foof_matches_equation_6(kfac_damping, batch):
    assert applied_low_rank(batch, two_sided=False) == (batch == 2)
    torch.manual_seed(1)
    model = make_model()
    inputs, targets = torch.randn(batch, 4), torch.randint(0, 3, (batch,))
    damping = 0.3
    pre = natgrad.FOOF(
        model, damping=damping, ema_decay=0.0, kfac_damping=kfac_damping, fisher="empirical"
    )
    plain, actual, _ = one_step(model, pre, inputs, targets)
    input_covs, grad_covs = explicit_factors(model, inputs, targets, "empirical", "mean")
    for layer, (a_cov, g_cov, gradient) in enumerate(
        zip(input_covs, grad_covs, plain, strict=True)
    ):
        if kfac_damping:  # App. D.8: KFAC's λ_A, the update scaled by λ_E^{-1}
            input_damping, grad_damping = benzing_damping(a_cov, g_cov, damping)
            scale = 1 / grad_damping
        else:
            input_damping, scale = damping, 1.0
        expected = (
            scale * gradient @ torch.linalg.inv(a_cov + input_damping * torch.eye(a_cov.shape[0]))
        )
        assert relative_error(actual[layer], expected) <= TOLERANCE


@pytest.mark.parametrize("method", ["foof", "kfac", "kfac-correct"])
def test_ema_and_schedule_follow_algorithm_1(method, fold_block):
    """Step by step: factors in the S steps before each inversion, inverses every T steps (the
    inverses computed from the running sums and the EMA normaliser)."""
    torch.manual_seed(2)
    model = make_model()
    decay, period, window, damping = 0.9, 3, 2, 0.1
    batches = [(torch.randn(8, 4), torch.randint(0, 3, (8,))) for _ in range(8)]
    if method == "foof":
        pre = natgrad.FOOF(
            model, damping=damping, ema_decay=decay, inv_period=period, pre_inversion_steps=window
        )
    else:
        pre = natgrad.KFAC(
            model,
            fisher="empirical",
            damping=damping,
            damping_mode="correct" if method == "kfac-correct" else "heuristic",
            ema_decay=decay,
            inv_period=period,
            pre_inversion_steps=window,
        )
    sums, weight, inverses = None, 0.0, None
    for step, (inputs, targets) in enumerate(batches):
        in_window = (step + window) % period < window
        assert pre.updates_factors(step) == in_window
        input_covs, grad_covs = explicit_factors(model, inputs, targets, "empirical", "mean")
        if in_window or sums is None:
            batch = list(zip(input_covs, grad_covs, strict=True))
            if sums is None:
                sums = [((1 - decay) * a, (1 - decay) * g) for a, g in batch]
                weight = 1 - decay
            else:
                sums = [
                    (decay * sa + (1 - decay) * a, decay * sg + (1 - decay) * g)
                    for (sa, sg), (a, g) in zip(sums, batch, strict=True)
                ]
                weight = decay * weight + (1 - decay)
        if step % period == 0:
            inverses = [(sa / weight, sg / weight) for sa, sg in sums]
        plain, actual, _ = one_step(model, pre, inputs, targets)
        for layer, ((a_cov, g_cov), gradient) in enumerate(zip(inverses, plain, strict=True)):
            if method == "foof":
                expected = gradient @ torch.linalg.inv(a_cov + damping * torch.eye(a_cov.shape[0]))
            else:
                mode = "correct" if method == "kfac-correct" else "heuristic"
                expected = kron_solve(g_cov, a_cov, gradient, mode, damping)
            assert relative_error(actual[layer], expected) <= TOLERANCE, (step, layer)


@pytest.mark.parametrize("method", ["foof", "kfac"])
def test_factors_fold_in_place_into_the_explicit_moving_average(method, fold_block):
    """The running sums are the explicit EMA of the batch covariances, and every fold after the
    first writes into the same tensors (one GEMM each, no d x d temporaries)."""
    torch.manual_seed(3)
    model = make_model()
    decay = 0.8
    options = {"damping": 0.1, "ema_decay": decay, "inv_period": 2}
    if method == "kfac":
        pre = natgrad.KFAC(model, fisher="empirical", **options)
    else:
        pre = natgrad.FOOF(model, **options)
    names = ["0", "2"]
    storage, sums = {}, None
    for step in range(4):
        inputs, targets = torch.randn(6, 4), torch.randint(0, 3, (6,))
        input_covs, grad_covs = explicit_factors(model, inputs, targets, "empirical", "mean")
        batch = list(zip(input_covs, grad_covs, strict=True))
        if sums is None:
            sums = [((1 - decay) * a, (1 - decay) * g) for a, g in batch]
        else:
            sums = [
                (decay * sa + (1 - decay) * a, decay * sg + (1 - decay) * g)
                for (sa, sg), (a, g) in zip(sums, batch, strict=True)
            ]
        one_step(model, pre, inputs, targets)
        for name, (input_sum, grad_sum) in zip(names, sums, strict=True):
            factors = [pre.input_factors[name]]
            assert relative_error(factors[0], input_sum) <= TOLERANCE, (step, name)
            if method == "kfac":
                factors.append(pre.grad_factors[name])
                assert relative_error(factors[1], grad_sum) <= TOLERANCE, (step, name)
            pointers = [factor.data_ptr() for factor in factors]
            assert storage.setdefault(name, pointers) == pointers, (step, name)


def curvlinops_problem() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A conv + linear classifier and a batch, shared by the curvlinops comparisons."""
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv2d(2, 3, kernel_size=3, stride=2, padding=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(27, 4),
    )
    return model, torch.randn(6, 2, 6, 6), torch.randint(0, 4, (6,))


def curvlinops_kfac(model, inputs, targets, fisher: str, reduction: str):
    """curvlinops' KFAC operator of the cross-entropy on one batch, natgrad's Fisher type."""
    from curvlinops import KFACLinearOperator

    return KFACLinearOperator(
        model,
        nn.CrossEntropyLoss(reduction=reduction),
        list(model.parameters()),
        [(inputs, targets)],
        fisher_type={"empirical": "empirical", "exact": "type-2"}[fisher],
        separate_weight_and_bias=False,
        check_deterministic=False,
    )


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("fisher", ["empirical", "exact"])
def test_kfac_factors_agree_with_curvlinops(fisher, reduction):
    model, inputs, targets = curvlinops_problem()
    pre = natgrad.KFAC(model, fisher=fisher, ema_decay=0.0, reduction=reduction)
    one_step_logits = model(inputs)
    F.cross_entropy(one_step_logits, targets, reduction=reduction).backward()
    pre.step(one_step_logits)
    pre.remove()  # natgrad's extra backward passes would also feed curvlinops' hooks
    operator = curvlinops_kfac(model, inputs, targets, fisher, reduction)
    operator.compute_kronecker_factors()
    for name in ("0", "3"):
        input_cov, grad_cov = pre.normalised_factors(name)
        assert relative_error(input_cov, operator._input_covariances[name]) <= TOLERANCE
        assert relative_error(grad_cov, operator._gradient_covariances[name]) <= TOLERANCE


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("fisher", ["empirical", "exact"])
@pytest.mark.parametrize("damping_mode", ["heuristic", "correct"])
def test_kfac_update_agrees_with_curvlinops_inverse(damping_mode, fisher, reduction):
    """curvlinops' KFAC inverse, with its own heuristic (Martens & Grosse 2015 sec. 6.3) or
    exact damping, applied to the gradient gives natgrad's update (a conv layer included)."""
    from curvlinops import KFACInverseLinearOperator

    model, inputs, targets = curvlinops_problem()
    damping = 0.1
    pre = natgrad.KFAC(
        model,
        fisher=fisher,
        damping=damping,
        damping_mode=damping_mode,
        ema_decay=0.0,
        reduction=reduction,
    )
    logits = model(inputs)
    F.cross_entropy(logits, targets, reduction=reduction).backward()
    gradient = [p.grad.clone() for p in model.parameters()]
    pre.step(logits)
    pre.remove()  # natgrad's extra backward passes would also feed curvlinops' hooks
    operator = curvlinops_kfac(model, inputs, targets, fisher, reduction)
    inverse = KFACInverseLinearOperator(
        operator,
        damping=damping,
        use_heuristic_damping=damping_mode == "heuristic",
        use_exact_damping=damping_mode == "correct",
    )
    expected = inverse @ gradient
    for param, update in zip(model.parameters(), expected, strict=True):
        assert relative_error(param.grad, update) <= TOLERANCE


@pytest.mark.parametrize("method", ["kfac", "foof"])
def test_state_dict_resumes_bit_identically(method, fold_block):
    torch.manual_seed(4)
    batches = [(torch.randn(8, 4), torch.randint(0, 3, (8,))) for _ in range(5)]

    def make(model):
        if method == "kfac":
            return natgrad.KFAC(model, fisher="mc", inv_period=2, ema_decay=0.5, seed=1)
        return natgrad.FOOF(model, inv_period=2, ema_decay=0.5)

    model = make_model()
    pre = make(model)
    for inputs, targets in batches[:3]:
        one_step(model, pre, inputs, targets)
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    saved = pre.state_dict()
    continued = [one_step(model, pre, x, y)[1] for x, y in batches[3:]]

    resumed_model = make_model()
    resumed_model.load_state_dict(saved_model)
    resumed = make(resumed_model)
    resumed.load_state_dict(saved)
    for (inputs, targets), expected in zip(batches[3:], continued, strict=True):
        actual = one_step(resumed_model, resumed, inputs, targets)[1]
        assert all(torch.equal(a, e) for a, e in zip(actual, expected, strict=True))


@pytest.mark.parametrize("damping_mode", ["heuristic", "correct", "none"])
def test_rank_deficient_factors_give_the_pseudo_inverse_update(damping_mode):
    """Dead units and 2 datapoints for 31 inputs: factors of rank 2 with zero rows. Damping
    1e-12 (or none) gives the pseudo-inverse update: exactly zero for the dead units, the
    float64 pseudo-inverse solve elsewhere (to 1e-3 for the damped modes, whose solve at
    condition ~1e12 loses digits; measured ~1e-4), never NaN."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(30, 40), nn.ReLU(), nn.Linear(40, 3))
    with torch.no_grad():
        model[0].bias[:20] = -100.0  # dead units: zero rows and columns in the factors
    inputs, targets = torch.randn(2, 30), torch.randint(0, 3, (2,))
    pre = natgrad.KFAC(
        model, fisher="empirical", damping=1e-12, damping_mode=damping_mode, ema_decay=0.0
    )
    plain, actual, _ = one_step(model, pre, inputs, targets)
    assert torch.equal(actual[0][:20], torch.zeros(20, 31))  # dead outputs of layer 0
    assert torch.equal(actual[1][:, :20], torch.zeros(3, 20))  # dead inputs of layer 2
    input_covs, grad_covs = explicit_factors(model, inputs, targets, "empirical", "mean")
    tolerance = TOLERANCE if damping_mode == "none" else 1e-3
    for a_cov, g_cov, gradient, update in zip(input_covs, grad_covs, plain, actual, strict=True):
        expected = kron_solve(g_cov, a_cov, gradient, "none", 0.0)
        assert relative_error(update, expected) <= tolerance


def test_foof_warm_start_averages_inputs():
    torch.manual_seed(6)
    model = make_model()
    warm = [torch.randn(5, 4) for _ in range(3)]
    pre = natgrad.FOOF(model, ema_decay=0.5)
    pre.warm_start(warm)
    augmented = [torch.cat([x, torch.ones(5, 1)], dim=1) for x in warm]
    covs = [a.T @ a / 5 for a in augmented]
    weights = [0.5**2 * 0.5, 0.5 * 0.5, 0.5]  # (1 - m) m^(t - i), before normalising
    expected = sum(w * c for w, c in zip(weights, covs, strict=True)) / sum(weights)
    assert relative_error(pre.normalised_factors("0")[0], expected) <= TOLERANCE


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"inv_period": 0}, "inv_period must be an integer >= 1"),
        ({"factor_period": 0}, "factor_period must be an integer >= 1"),
        ({"inv_period": 2, "pre_inversion_steps": 3}, "must satisfy 1 <= S <= T"),
        ({"ema_decay": 1.0}, r"ema_decay must lie in \[0, 1\)"),
        ({"ema_decay": -0.1}, r"ema_decay must lie in \[0, 1\)"),
        ({"damping_mode": "both"}, "unknown damping_mode"),
        ({"fisher": "ief_matrix"}, "Kronecker methods take fisher in"),
        ({"damping": 0.0}, "damping must be positive"),
    ],
)
def test_bad_kfac_settings_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        natgrad.KFAC(make_model(), **kwargs)


def test_kfac_unsupported_layer_raises():
    model = nn.Sequential(nn.Linear(4, 5), nn.PReLU(5), nn.Linear(5, 3))
    with pytest.raises(ValueError, match="unsupported='plain_gradient'"):
        natgrad.KFAC(model, unsupported="error")


def random_factor(size: int, rank: int | None = None) -> torch.Tensor:
    """A random positive semi-definite ``size x size`` factor (rank-deficient if ``rank``)."""
    rows = torch.randn(rank or size + 2, size)
    return rows.T @ rows / rows.shape[0]


def dense_inverse_update(kind, input_cov, grad_cov, damping, gradient):
    """``ΔW`` by explicit matrices on ``vec ∇W`` (column-major: ``A ⊗ G``)."""
    d_out, d_in = gradient.shape
    eye_in, eye_out = torch.eye(d_in), torch.eye(d_out)
    if kind in ("heuristic", "foof-kfac"):
        mean_a = torch.trace(input_cov) / d_in
        mean_g = torch.trace(grad_cov) / d_out
        input_damping = math.sqrt(damping) * math.sqrt(mean_a / mean_g)
        grad_damping = math.sqrt(damping) / math.sqrt(mean_a / mean_g)
    if kind == "heuristic":
        curvature = torch.kron(
            input_cov + input_damping * eye_in, grad_cov + grad_damping * eye_out
        )
    elif kind == "correct":
        curvature = torch.kron(input_cov, grad_cov) + damping * torch.eye(d_in * d_out)
    elif kind == "none":
        vec = torch.linalg.pinv(torch.kron(input_cov, grad_cov)) @ gradient.T.reshape(-1)
        return vec.reshape(d_in, d_out).T
    elif kind == "foof":
        return gradient @ torch.linalg.inv(input_cov + damping * eye_in)
    else:
        return gradient @ torch.linalg.inv(input_cov + input_damping * eye_in) / grad_damping
    return torch.linalg.solve(curvature, gradient.T.reshape(-1)).reshape(d_in, d_out).T


INVERSE_KINDS = {
    "heuristic": (KroneckerInverse, True, 0.1),
    "correct": (EigenInverse, True, 0.1),
    "none": (EigenInverse, True, 0.0),
    "foof": (FOOFInverse, False, 0.1),
    "foof-kfac": (FOOFInverse, True, 0.1),
}


@pytest.mark.parametrize("kind", sorted(INVERSE_KINDS))
@pytest.mark.parametrize("diagonal_input", [False, True])
def test_inverse_round_trips_through_its_tensors(kind, diagonal_input):
    """Each inverse type, rebuilt from its tensors (what state_dict saves and a rank
    broadcasts with spread_inversions), applies the dense formula; what a receiving rank fills
    (empty_like) has the same entries, shapes and floats; an entry missing is named."""
    torch.manual_seed(11)
    inverse_type, two_sided, damping = INVERSE_KINDS[kind]
    d_out, d_in, rank = 3, 5, 2
    if diagonal_input:
        input_cov = torch.rand(d_in) * (torch.arange(d_in) % 2)  # one-hot inputs: some unseen
    else:
        input_cov = random_factor(d_in, rank=3 if kind == "none" else None)
    grad_cov = random_factor(d_out, rank=2 if kind == "none" else None) if two_sided else None
    gradient = LayerGradient(torch.randn(rank, d_out), torch.randn(rank, d_in - 1), has_bias=True)
    inverse = inverse_type.compute(input_cov, grad_cov, damping)

    entries = {
        k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in inverse.tensors().items()
    }
    rebuilt = inverse_type.from_tensors(entries)
    assert list(rebuilt.tensors()) == list(inverse.tensors())
    weight, bias = rebuilt.apply(gradient, out=None)
    update = torch.cat([weight, bias.unsqueeze(1)], dim=1)
    dense_input = torch.diag(input_cov) if diagonal_input else input_cov
    expected = dense_inverse_update(kind, dense_input, grad_cov, damping, gradient.dense())
    assert torch.allclose(update, expected, rtol=1e-9, atol=1e-12)
    assert torch.equal(update, torch.cat([t.reshape(d_out, -1) for t in inverse.apply(
        gradient, out=None)], dim=1))  # fmt: skip

    empty = inverse_type.empty_like(input_cov, grad_cov).tensors()
    assert list(empty) == list(entries)
    for key, value in entries.items():
        if isinstance(value, torch.Tensor):
            assert empty[key].shape == value.shape and empty[key].dtype == value.dtype
        else:
            assert isinstance(empty[key], float) and isinstance(value, float)

    first = next(iter(entries))
    with pytest.raises(ValueError, match=f"lack \\['{first}'\\]"):
        inverse_type.from_tensors({k: v for k, v in entries.items() if k != first})


@pytest.mark.parametrize("kind", sorted(INVERSE_KINDS))
@pytest.mark.parametrize("diagonal_input", [False, True])
@pytest.mark.parametrize("has_bias", [False, True])
@pytest.mark.parametrize("rank", [2, 12], ids=["low-rank", "dense"])
def test_inverse_applies_to_the_scaled_gradient_in_either_form(
    kind, diagonal_input, has_bias, rank
):
    """Every inverse applied to ``scale Ē^T [A, 1]``, from the rows (rank 2: the inverses map
    the rows, the bias column apart) or from the dense gradient (rank 12), with or without a
    bias, equals the explicit Kronecker solve on the dense gradient, the weight written into
    the given ``.grad`` buffer where the inverse writes in place."""
    torch.manual_seed(13)
    inverse_type, two_sided, damping = INVERSE_KINDS[kind]
    d_out, d_weight, scale = 3, 5, 0.7
    d_in = d_weight + int(has_bias)
    if diagonal_input:
        input_cov = torch.rand(d_in) * (torch.arange(d_in) % 3 != 0)
    else:
        input_cov = random_factor(d_in, rank=3 if kind == "none" else None)
    grad_cov = random_factor(d_out, rank=2 if kind == "none" else None) if two_sided else None
    grad_rows, inputs = torch.randn(rank, d_out), torch.randn(rank, d_weight)
    gradient = LayerGradient(grad_rows, inputs, has_bias=has_bias, scale=scale)
    assert gradient.low_rank_pays(two_sided) == (rank == 2)
    inverse = inverse_type.compute(input_cov, grad_cov, damping)
    buffer = torch.full((d_out, d_weight), math.nan)
    weight, bias = inverse.apply(gradient, out=buffer)

    augmented = torch.cat([inputs, torch.ones(rank, 1)], dim=1) if has_bias else inputs
    dense_gradient = scale * grad_rows.T @ augmented
    dense_input = torch.diag(input_cov) if diagonal_input else input_cov
    expected = dense_inverse_update(kind, dense_input, grad_cov, damping, dense_gradient)
    assert relative_error(weight, expected[:, :d_weight]) <= 1e-10
    assert (bias is None) == (not has_bias)
    if has_bias:
        assert relative_error(bias, expected[:, d_weight]) <= 1e-10
    if inverse_type is not EigenInverse:  # KFAC and FOOF write the weight into the buffer
        assert weight is buffer


def test_state_of_another_damping_mode_is_refused_by_name():
    """A heuristic-damping state holds no eigendecompositions: loading it into KFAC with
    correct damping names the entries instead of failing at the next step."""
    torch.manual_seed(5)
    model = make_model()
    pre = natgrad.KFAC(model, damping_mode="heuristic")
    logits = model(torch.randn(6, 4))
    F.cross_entropy(logits, torch.randint(0, 3, (6,))).backward()
    pre.step(logits)
    state = pre.state_dict()
    with pytest.raises(ValueError, match=r"computed with \{'damping_mode': 'heuristic'\}"):
        natgrad.KFAC(make_model(), damping_mode="correct").load_state_dict(state)
    del state["inverse_form"]  # a state saved before the form was recorded
    with pytest.raises(ValueError, match=r"EigenInverse holds .* same method and damping"):
        natgrad.KFAC(make_model(), damping_mode="correct").load_state_dict(state)


@pytest.mark.parametrize(
    ("method", "saved", "other"),
    [
        (natgrad.KFAC, {"damping_mode": "correct"}, {"damping_mode": "none"}),
        (natgrad.FOOF, {"kfac_damping": True}, {"kfac_damping": False}),
    ],
)
def test_state_of_the_same_inverse_type_but_other_options_is_refused(method, saved, other):
    """Correct and no damping both keep eigendecompositions (the damping inside them), and FOOF
    with or without its KFAC-style damping both keep FOOF inverses: the entries fit, so only
    the recorded options tell that the inverses are another method's."""
    torch.manual_seed(5)
    model = make_model()
    pre = method(model, **saved)
    logits = model(torch.randn(6, 4))
    F.cross_entropy(logits, torch.randint(0, 3, (6,))).backward()
    pre.step(logits)
    with pytest.raises(ValueError, match="build it with the saved options"):
        method(make_model(), **other).load_state_dict(pre.state_dict())
    method(make_model(), **saved).load_state_dict(pre.state_dict())  # the same options load


@pytest.mark.parametrize("batch", [7, 2], ids=["dense-form", "low-rank-form"])
@pytest.mark.parametrize("method", ["kfac", "foof"])
def test_fused_backward_gives_the_standard_updates(method, fold_block, batch):
    """pre.backward(loss) and loss.backward() give the same updates (up to round-off: autograd
    sums the output gradients in another order) over steps that fold, invert and only apply
    (EMA normaliser below one, factors folded by blocks), with the inverses applied to the
    dense gradient or to its rows."""
    assert applied_low_rank(batch, two_sided=method == "kfac") == (batch == 2)
    torch.manual_seed(6)
    batches = [(torch.randn(batch, 4), torch.randint(0, 3, (batch,))) for _ in range(5)]
    runs = []
    for fused in (False, True):
        torch.manual_seed(0)
        model = make_model()
        options = {"ema_decay": 0.7, "inv_period": 2, "damping": 0.1}
        if method == "kfac":
            pre = natgrad.KFAC(model, fisher="exact", **options)
        else:
            pre = natgrad.FOOF(model, **options)
        updates = []
        for inputs, targets in batches:
            model.zero_grad()
            logits = model(inputs)
            loss = F.cross_entropy(logits, targets)
            pre.backward(loss) if fused else loss.backward()
            pre.step(logits)
            updates.append(weight_matrix_grads(model))
        runs.append(updates)
    for standard, fused in zip(*runs, strict=True):
        for a, b in zip(standard, fused, strict=True):
            assert relative_error(b, a) <= 1e-12


def test_failed_inversion_keeps_the_previous_inverse():
    """A non-finite factor fails the inversion before the layer's inverse is dropped to make
    room for the new one: the step is skipped and the previous inverse stays."""
    torch.manual_seed(7)
    model = make_model()
    pre = natgrad.FOOF(model, damping=0.1, inv_period=1)
    inputs, targets = torch.randn(6, 4), torch.randint(0, 3, (6,))
    one_step(model, pre, inputs, targets)
    previous = pre.inverses["0"]
    pre._input_factors["0"][0, 0] = math.nan  # stays NaN through the next fold
    with pytest.warns(natgrad.NonFiniteWarning, match="NaN or Inf"):
        one_step(model, pre, inputs, targets)
    assert pre.inverses["0"] is previous
