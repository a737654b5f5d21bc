"""FishLeg (Garcia et al. 2023) against dense float64 computations."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import natgrad
from natgrad import linalg
from natgrad.precond import fishleg, kron_q
from oracle import batch_fisher, dense_batch, relative_error

pytestmark = pytest.mark.usefixtures("float64")


def make_model(hidden: int = 4) -> nn.Module:
    return nn.Sequential(nn.Linear(3, hidden), nn.Tanh(), nn.Linear(hidden, 2))


def randomise(pre: natgrad.FishLeg) -> None:
    """Random auxiliary parameters of the form training keeps: lower-triangular Kronecker
    factors (their upper triangles stay at zero, see the test below), any diagonal scales."""
    with torch.no_grad():
        for pair in pre.aux_params.values():
            for param in pair:
                value = torch.randn_like(param) + 2 * torch.eye(*param.shape)
                param.copy_(torch.tril(value) if pre.q_structure == "kron" else value)


def explicit_q(pre: natgrad.FishLeg, name: str) -> torch.Tensor:
    """``Q_l`` for the column-major vec of the layer's ``[W | b]``, built from the auxiliary
    parameters alone: ``(R Rᵀ) ⊗ (L Lᵀ)`` with ``L`` (``d_out x d_out``) and ``R``
    (``d_in x d_in``) the lower triangles of the pair (Garcia et al. 2023, App. A.5, eq. 53), or
    ``diag(q ⊙ q)`` (App. A.6)."""
    params = [p.detach() for p in pre.aux_params[name]]
    if pre.q_structure == "diag":
        return torch.diag(params[0].pow(2).T.reshape(-1))
    left, right = (torch.tril(p) for p in params)
    return torch.kron(right @ right.T, left @ left.T)


def column_major(matrix: torch.Tensor) -> torch.Tensor:
    return matrix.T.reshape(-1)


def dense_q_of(leaves: list[torch.Tensor], q_structure: str) -> torch.Tensor:
    """Block-diagonal ``Q`` in row-major ``[W | b]`` order from (copies of) the auxiliary
    parameters, differentiable in them: ``(L Lᵀ) ⊗ (R Rᵀ)`` or ``diag(q ⊙ q)`` per layer."""
    if q_structure == "kron":
        pairs = zip(leaves[0::2], leaves[1::2], strict=True)
        grams = [(torch.tril(left), torch.tril(right)) for left, right in pairs]
        blocks = [torch.kron(left @ left.T, right @ right.T) for left, right in grams]
    else:
        blocks = [torch.diag((leaf**2).reshape(-1)) for leaf in leaves]
    return torch.block_diag(*blocks)


def assert_auxiliary_loss_is_dense(
    pre, probe, fisher, damping, gradients, value, aux_params=None
) -> None:
    """FishLeg's auxiliary gradients and ``A(λ)`` equal those of the dense
    ``½ vᵀ(F + γI)v − uᵀv`` with ``v = Q u`` (``F`` in row-major ``[W | b]`` order), ``Q``
    built from ``aux_params`` (default: the current auxiliary parameters)."""
    direction = torch.cat([p.reshape(-1) for p in probe.values()])
    direction = direction / direction.norm()
    if aux_params is None:
        aux_params = [p for pair in pre.aux_params.values() for p in pair]
    leaves = [p.detach().clone().requires_grad_(True) for p in aux_params]
    v = dense_q_of(leaves, pre.q_structure) @ direction
    objective = 0.5 * v @ (fisher + damping * torch.eye(len(v))) @ v - direction @ v
    expected = torch.autograd.grad(objective, leaves)
    for a, e in zip(gradients, expected, strict=True):
        assert torch.allclose(a, e, rtol=1e-9, atol=1e-12)
    assert value == pytest.approx(objective.item(), rel=1e-10)


def dense_gradients(pre, gradients) -> list[torch.Tensor]:
    """The auxiliary gradients as matrices of the auxiliary parameters' shapes, in order."""
    dense = []
    for name, pair in gradients.items():
        for param, blocks in zip(pre.aux_params[name], pair, strict=True):
            kron = pre.q_structure == "kron"
            dense.append(kron_q.from_blocks(blocks, param.shape[0]) if kron else blocks[0])
    return dense


def matrix_order(model: nn.Module) -> torch.Tensor:
    """Indices that reorder the flat parameter vector into row-major ``[W | b]`` blocks."""
    order, offset = [], 0
    for module in model:
        if not isinstance(module, nn.Linear):
            continue
        d_out, d_in = module.weight.shape
        for row in range(d_out):
            order += [offset + row * d_in + i for i in range(d_in)]
            order.append(offset + d_out * d_in + row)
        offset += d_out * (d_in + 1)
    return torch.tensor(order)


def forward_backward(model, pre, inputs, targets):
    model.zero_grad()
    logits = model(inputs)
    F.cross_entropy(logits, targets).backward()
    pre.step(logits)


@pytest.mark.parametrize("q_structure", ["kron", "diag"])
def test_q_products_equal_the_explicit_q(q_structure):
    """apply_q (with and without autograd), the low-rank product and dense_q (row-major) are
    the explicit Kronecker or diagonal Q of the auxiliary parameters."""
    torch.manual_seed(0)
    pre = natgrad.FishLeg(make_model(), q_structure=q_structure)
    randomise(pre)
    for name, module in pre.selection.layers.items():
        d_out, d_in = module.weight.shape[0], module.weight.shape[1] + 1
        q = explicit_q(pre, name)
        matrix = torch.randn(d_out, d_in)
        expected = q @ column_major(matrix)
        assert relative_error(column_major(pre.apply_q(name, matrix)), expected) <= 1e-12
        with torch.no_grad():
            assert relative_error(column_major(pre.apply_q(name, matrix)), expected) <= 1e-12
        rows, inputs = torch.randn(5, d_out), torch.randn(5, d_in)
        low_rank = pre.apply_q_low_rank(name, rows, inputs)
        assert relative_error(column_major(low_rank), q @ column_major(rows.T @ inputs)) <= 1e-12
        to_row_major = torch.arange(d_out * d_in).reshape(d_in, d_out).T.reshape(-1)
        assert torch.allclose(pre.dense_q(name), q[to_row_major][:, to_row_major], rtol=1e-12)


@pytest.mark.parametrize("momentum_on", ["gradient", "update"])
@pytest.mark.parametrize("q_structure", ["kron", "diag"])
def test_training_keeps_lower_triangles_and_writes_q_times_gradient(q_structure, momentum_on):
    """After 30 steps of auxiliary updates the Kronecker factors' upper triangles are still
    exactly zero (the update skips torch.tril under no_grad, relying on it), and each step's
    update is the explicit Q of that step's auxiliary parameters times the gradient."""
    torch.manual_seed(1)
    model = make_model()
    pre = natgrad.FishLeg(
        model,
        q_structure=q_structure,
        aux_period=1,
        aux_lr=0.05,
        momentum=0.0,
        momentum_on=momentum_on,
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    linears = dict(pre.selection.layers)
    for _ in range(30):
        opt.zero_grad()
        logits = model(torch.randn(8, 3))
        F.cross_entropy(logits, torch.randint(0, 2, (8,))).backward()
        plain = {n: torch.cat([m.weight.grad, m.bias.grad[:, None]], 1) for n, m in linears.items()}
        pre.step(logits)
        for name, module in linears.items():
            update = torch.cat([module.weight.grad, module.bias.grad[:, None]], dim=1)
            expected = explicit_q(pre, name) @ column_major(plain[name])
            assert relative_error(column_major(update), expected) <= 1e-12
        opt.step()
    if q_structure == "kron":
        for pair in pre.aux_params.values():
            for param in pair:
                assert torch.equal(torch.triu(param.detach(), diagonal=1), torch.zeros_like(param))
    for name in linears:  # the auxiliary steps moved Q off its start, init_scale * I = I
        q = explicit_q(pre, name)
        assert (q - torch.eye(len(q))).abs().max() > 1e-3


@pytest.mark.parametrize("q_structure", ["kron", "diag"])
def test_surrogate_gradient_equals_dense_auxiliary_gradient(q_structure):
    torch.manual_seed(2)
    model = make_model()
    inputs, targets = torch.randn(6, 3), torch.randint(0, 2, (6,))
    damping = 0.1
    pre = natgrad.FishLeg(model, damping=damping, q_structure=q_structure)
    randomise(pre)
    probe = {
        name: torch.randn(m.weight.shape[0], m.weight.shape[1] + 1)
        for name, m in pre.selection.layers.items()
    }
    value, gradients = pre.auxiliary_gradients(probe, (inputs,))
    actual = dense_gradients(pre, gradients)

    order = matrix_order(model)
    fisher = dense_batch(model, inputs, targets, "categorical", "mean").exact_fisher()
    fisher = fisher[order][:, order]
    assert_auxiliary_loss_is_dense(pre, probe, fisher, damping, actual, value)


def test_auxiliary_step_on_a_separate_batch_uses_that_batchs_fisher(monkeypatch):
    """Garcia et al. 2023, Algorithm 1, line 5: with ``aux_args`` the auxiliary loss sees the
    training batch's gradient as ``u`` and the exact Fisher of the auxiliary batch as ``F``."""
    torch.manual_seed(7)
    model = make_model()
    inputs, targets = torch.randn(6, 3), torch.randint(0, 2, (6,))
    aux_inputs = 2 * torch.randn(4, 3)
    damping = 0.1
    pre = natgrad.FishLeg(model, damping=damping, aux_period=1)
    randomise(pre)
    before = [p.detach().clone() for pair in pre.aux_params.values() for p in pair]
    model.zero_grad()
    logits = model(inputs)
    F.cross_entropy(logits, targets).backward()
    gradient = {  # the first step's momentum average is the gradient itself
        name: torch.cat([m.weight.grad, m.bias.grad.unsqueeze(1)], dim=1).clone()
        for name, m in pre.selection.layers.items()
    }
    results = []  # what the auxiliary step computed, recorded on its way to Adam
    original = pre.auxiliary_gradients
    monkeypatch.setattr(
        pre, "auxiliary_gradients", lambda *a, **k: results.append(original(*a, **k)) or results[-1]
    )
    pre.step(logits, aux_args=(aux_inputs,))
    actual = dense_gradients(pre, results[0][1])

    order = matrix_order(model)
    labels = torch.zeros(4, dtype=torch.long)  # the exact Fisher does not depend on labels
    fisher = dense_batch(model, aux_inputs, labels, "categorical", "mean").exact_fisher()
    fisher = fisher[order][:, order]
    training = dense_batch(model, inputs, targets, "categorical", "mean").exact_fisher()
    assert relative_error(training[order][:, order], fisher) > 0.1  # the batches differ
    assert_auxiliary_loss_is_dense(
        pre, gradient, fisher, damping, actual, pre.aux_losses[-1], aux_params=before
    )


@pytest.mark.slow  # 1500 steps
def test_auxiliary_steps_learn_the_inverse_fisher_of_linear_gaussian_regression():
    """Fixed θ: repeated auxiliary steps drive Q u to (F + γI)^{-1} u (Garcia et al. 2023,
    App. A.9)."""
    torch.manual_seed(3)
    model = nn.Linear(3, 2)
    inputs = torch.randn(50, 3)
    targets = inputs @ torch.randn(3, 2) + 0.5 * torch.randn(50, 2)
    likelihood = natgrad.likelihoods.Gaussian(variance=1.0)
    damping = 0.1
    pre = natgrad.FishLeg(
        model,
        likelihood=likelihood,
        damping=damping,
        aux_lr=0.02,
        aux_period=1,
        momentum=0.0,
        reduction="sum",
    )
    for _ in range(1500):
        model.zero_grad()
        logits = model(inputs)
        (0.5 * (logits - targets).pow(2).sum()).backward()
        pre.step(logits)
    gradient = torch.cat([model.weight.grad, model.bias.grad.unsqueeze(1)], dim=1).reshape(-1)

    model.zero_grad()
    (0.5 * (model(inputs) - targets).pow(2).sum()).backward()
    plain = torch.cat([model.weight.grad, model.bias.grad.unsqueeze(1)], dim=1).reshape(-1)
    order = matrix_order(nn.Sequential(model))
    fisher = dense_batch(
        nn.Sequential(model), inputs, targets, "gaussian", "sum", variance=1.0
    ).exact_fisher()[order][:, order]
    expected = torch.linalg.solve(fisher + damping * torch.eye(len(plain)), plain)
    assert relative_error(gradient, expected) < 0.05
    losses = torch.tensor(pre.aux_losses)
    assert losses[-100:].mean() < losses[:100].mean()
    assert (losses[1:] <= losses[:-1] + 1e-9).float().mean() > 0.5


@pytest.mark.parametrize("momentum_on", ["gradient", "update"])
def test_state_dict_resumes_bit_identically(momentum_on):
    torch.manual_seed(4)
    batches = [(torch.randn(8, 3), torch.randint(0, 2, (8,))) for _ in range(5)]

    def run(model, pre, batch_list):
        updates = []
        for inputs, targets in batch_list:
            forward_backward(model, pre, inputs, targets)
            updates.append([p.grad.clone() for p in model.parameters()])
        return updates

    model = make_model()
    pre = natgrad.FishLeg(model, aux_period=2, aux_lr=0.01, momentum_on=momentum_on)
    run(model, pre, batches[:3])
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    saved = pre.state_dict()
    expected = run(model, pre, batches[3:])
    resumed_model = make_model()
    resumed_model.load_state_dict(saved_model)
    resumed = natgrad.FishLeg(resumed_model, aux_period=2, aux_lr=0.01, momentum_on=momentum_on)
    resumed.load_state_dict(saved)
    actual = run(resumed_model, resumed, batches[3:])
    for step_a, step_e in zip(actual, expected, strict=True):
        assert all(torch.equal(a, e) for a, e in zip(step_a, step_e, strict=True))


def test_state_of_the_earlier_layout_is_refused_with_the_version():
    # natgrad 0.1.0 kept the momentum of Q g in momentum_buffers and no direction_buffers:
    # loading it would silently drop that momentum, so it is refused, naming the version
    torch.manual_seed(4)
    model = make_model()
    pre = natgrad.FishLeg(model, aux_period=2, momentum_on="update")
    forward_backward(model, pre, torch.randn(8, 3), torch.randint(0, 2, (8,)))
    earlier = pre.state_dict()
    earlier["momentum_buffers"] = earlier.pop("direction_buffers")
    fresh = natgrad.FishLeg(make_model(), aux_period=2, momentum_on="update")
    with pytest.raises(ValueError, match=r"natgrad 0\.1\.0.*start FishLeg afresh"):
        fresh.load_state_dict(earlier)


def test_non_finite_fisher_product_skips_auxiliary_step(monkeypatch):
    torch.manual_seed(5)
    model = make_model()
    pre = natgrad.FishLeg(model, aux_period=1)
    before = [p.detach().clone() for pair in pre.aux_params.values() for p in pair]

    def broken(*args, **kwargs):
        return [torch.full_like(p, float("nan")) for p in args[2].values()]

    monkeypatch.setattr(fishleg, "fisher_vector_product", broken)
    with pytest.warns(natgrad.NonFiniteWarning, match="skipped an auxiliary step"):
        forward_backward(model, pre, torch.randn(4, 3), torch.randint(0, 2, (4,)))
    after = [p.detach() for pair in pre.aux_params.values() for p in pair]
    assert all(torch.equal(a, b) for a, b in zip(after, before, strict=True))
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"aux_period": 0}, "aux_period must be an integer >= 1"),
        ({"damping": 0.0}, "damping must be positive"),
        ({"damping": -1.0}, "damping must be positive"),
        ({"aux_lr": 0.0}, "aux_lr must be positive"),
        ({"momentum": 1.0}, r"momentum must lie in \[0, 1\)"),
        ({"q_structure": "full"}, "unknown q_structure"),
        ({"momentum_on": "both"}, "unknown momentum_on"),
        ({"init_scale": 0.0}, "init_scale must be positive"),
    ],
)
def test_bad_fishleg_settings_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        natgrad.FishLeg(make_model(), **kwargs)


def test_fishleg_unsupported_layer_raises():
    model = nn.Sequential(nn.Linear(3, 4), nn.PReLU(4), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="PReLU"):
        natgrad.FishLeg(model, unsupported="error")


@pytest.mark.parametrize("q_structure", ["kron", "diag"])
def test_low_rank_probe_gives_the_dense_auxiliary_loss(q_structure):
    torch.manual_seed(6)
    model = make_model()
    inputs = torch.randn(5, 3)
    pre = natgrad.FishLeg(model, q_structure=q_structure)
    randomise(pre)
    rows = {
        name: (torch.randn(5, m.weight.shape[0]), torch.randn(5, m.weight.shape[1] + 1))
        for name, m in pre.selection.layers.items()
    }
    results = []
    for probe in (rows, {name: e.T @ a for name, (e, a) in rows.items()}):
        value, gradients = pre.auxiliary_gradients(probe, (inputs,))
        results.append((value, dense_gradients(pre, gradients)))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-12)
    for low_rank, dense in zip(results[0][1], results[1][1], strict=True):
        assert torch.allclose(low_rank, dense, rtol=1e-10, atol=1e-13)


def test_kronecker_q_too_large_for_a_layer_names_the_alternatives():
    """An embedding with a 20,000-word vocabulary would need a 20,000 x 20,000 auxiliary
    matrix (1.5 GiB): a clear error names q_structure='diag' and the override instead."""
    model = nn.Sequential(nn.Embedding(20_000, 8), nn.Flatten(), nn.Linear(16, 3))
    with pytest.raises(ValueError, match=r"'0' \(Embedding\).*q_structure='diag'.*'0': 'plain"):
        natgrad.FishLeg(model)
    assert natgrad.FishLeg(model, q_structure="diag").aux_params["0"][0].shape == (8, 20_000)
    natgrad.FishLeg(model, overrides={"0": "plain_gradient"})


@pytest.mark.parametrize("q_structure", ["kron", "diag"])
def test_callable_damping_and_aux_lr_take_their_value_at_each_step(q_structure):
    """γ(t) and α(t) of step t are the ones used: the value of A(λ) recorded at each auxiliary
    step is the dense ½ vᵀ(F + γ(t) I)v - uᵀv, and the auxiliary parameters follow a separate
    Adam fed the dense gradients with learning rate α(t) (constant values would fail both)."""
    torch.manual_seed(12)
    model = make_model()
    dampings, aux_lrs = [0.5, 0.02, 3.0], [0.1, 0.003, 0.05]
    pre = natgrad.FishLeg(
        model,
        damping=lambda step: dampings[step],
        aux_lr=lambda step: aux_lrs[step],
        aux_period=1,
        momentum=0.0,
        q_structure=q_structure,
    )
    randomise(pre)
    leaves = [
        p.detach().clone().requires_grad_(True) for pair in pre.aux_params.values() for p in pair
    ]
    reference = torch.optim.Adam(leaves, lr=1.0)
    order = matrix_order(model)
    for step in range(3):
        inputs, targets = torch.randn(6, 3), torch.randint(0, 2, (6,))
        model.zero_grad()
        logits = model(inputs)
        F.cross_entropy(logits, targets).backward()
        direction = torch.cat(
            [
                torch.cat([m.weight.grad, m.bias.grad.unsqueeze(1)], dim=1).reshape(-1)
                for m in model
                if isinstance(m, nn.Linear)
            ]
        )
        direction = direction / direction.norm()
        pre.step(logits)

        fisher = dense_batch(model, inputs, targets, "categorical", "mean").exact_fisher()
        fisher = fisher[order][:, order]
        v = dense_q_of(leaves, q_structure) @ direction
        curvature = fisher + dampings[step] * torch.eye(len(v))
        objective = 0.5 * v @ curvature @ v - direction @ v
        assert pre.aux_losses[step] == pytest.approx(objective.item(), rel=1e-10)
        reference.zero_grad()
        objective.backward()
        for group in reference.param_groups:
            group["lr"] = aux_lrs[step]
        reference.step()
        actual = [p.detach() for pair in pre.aux_params.values() for p in pair]
        for a, e in zip(actual, leaves, strict=True):
            assert torch.allclose(a, e.detach(), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("q_structure", ["kron", "diag"])
def test_train_mode_batchnorm_auxiliary_gradient_equals_dense_and_keeps_statistics(q_structure):
    """FishLeg's Fisher-vector products run the train-mode model (batch statistics, the
    batch's Fisher with its coupled datapoints) without touching the running statistics."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2))
    inputs, targets = torch.randn(6, 3), torch.randint(0, 2, (6,))
    damping = 0.1
    pre = natgrad.FishLeg(model, damping=damping, q_structure=q_structure, aux_period=1)
    randomise(pre)
    probe = {
        name: torch.randn(m.weight.shape[0], m.weight.shape[1] + 1)
        for name, m in pre.selection.layers.items()
    }
    before = {name: buffer.clone() for name, buffer in model.named_buffers()}
    value, gradients = pre.auxiliary_gradients(probe, (inputs,))
    actual = dense_gradients(pre, gradients)
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, before[name]), name

    order = matrix_order(model)
    fisher = batch_fisher(model, inputs, ["0.weight", "0.bias", "3.weight", "3.bias"], "mean")
    fisher = fisher[order][:, order]
    assert_auxiliary_loss_is_dense(pre, probe, fisher, damping, actual, value)

    # a training step with an auxiliary step: the running statistics are those of the
    # user's forward pass alone, as in a twin model trained without natgrad
    twin = copy.deepcopy(model)
    forward_backward(model, pre, inputs, targets)
    twin(inputs)
    assert pre.aux_losses  # the auxiliary step ran
    for (name, buffer), expected_buffer in zip(model.named_buffers(), twin.buffers(), strict=True):
        assert torch.equal(buffer, expected_buffer), name


def dense_fishleg_updates(model, batches, momentum_on, q_structure, aux_period, momentum, lr):
    """Garcia et al. 2023, Algorithm 1 written densely: explicit ``Q`` from copies of the
    initial auxiliary parameters, the explicit batch Fisher, autograd of the dense auxiliary
    loss and torch's Adam; the update of every step in row-major ``[W | b]`` order."""
    pre = natgrad.FishLeg(copy.deepcopy(model), q_structure=q_structure)  # for the initial λ
    leaves = [
        p.detach().clone().requires_grad_(True) for pair in pre.aux_params.values() for p in pair
    ]
    adam = torch.optim.Adam(leaves, lr=1e-2)
    order, damping = matrix_order(model), 1e-3
    momentum_buffer, updates = None, []
    for step, (inputs, targets) in enumerate(batches):
        model.zero_grad()
        F.cross_entropy(model(inputs), targets).backward()
        gradient = torch.cat(
            [torch.cat([m.weight.grad, m.bias.grad[:, None]], 1).reshape(-1) for m in model[::2]]
        )
        if momentum_on == "gradient":
            mixed = (
                gradient if step == 0 else momentum * momentum_buffer + (1 - momentum) * gradient
            )
            momentum_buffer = probe = mixed
        else:
            probe = gradient
        if step % aux_period == 0:
            fisher = dense_batch(model, inputs, targets, "categorical", "mean").exact_fisher()
            fisher = fisher[order][:, order]
            u = probe / probe.norm()
            v = dense_q_of(leaves, q_structure) @ u
            objective = 0.5 * v @ (fisher + damping * torch.eye(len(v))) @ v - u @ v
            adam.zero_grad()
            objective.backward()
            adam.step()
        q = dense_q_of(leaves, q_structure).detach()
        if momentum_on == "gradient":
            update = q @ momentum_buffer
        else:
            fresh = q @ gradient
            update = fresh if step == 0 else momentum * momentum_buffer + (1 - momentum) * fresh
            momentum_buffer = update
        updates.append(update)
        with torch.no_grad():
            for param, delta in zip(model.parameters(), vector_blocks(model, update), strict=True):
                param -= lr * delta
    return updates


def vector_blocks(model, vector):
    """A row-major ``[W | b]`` vector as ``(weight, bias)`` blocks of the linear layers."""
    blocks, offset = [], 0
    for module in model[::2]:
        d_out, d_in = module.weight.shape
        matrix = vector[offset : offset + d_out * (d_in + 1)].reshape(d_out, d_in + 1)
        blocks += [matrix[:, :d_in], matrix[:, d_in]]
        offset += d_out * (d_in + 1)
    return blocks


@pytest.mark.parametrize("hidden", [4, 260])  # 260: the factors' products in column blocks
@pytest.mark.parametrize("batch_size", [2, 6])  # Q on the rows of Ē and Ā / on Ē^T Ā
@pytest.mark.parametrize("q_structure", ["kron", "diag"])
@pytest.mark.parametrize("momentum_on", ["gradient", "update"])
def test_training_with_momentum_and_auxiliary_period_equals_dense_algorithm(
    momentum_on, q_structure, batch_size, hidden
):
    """Eight steps with momentum 0.9 and an auxiliary step every third one: FishLeg's updates
    (standard and fused paths, identical) equal the dense Algorithm 1 to 1e-10. With momentum
    on the gradient FishLeg keeps Q ḡ by momentum between auxiliary steps and recomputes it
    after each, which a momentum of Q ḡ carried across a change of Q would fail. The momentum
    buffers have padded rows (the bias column makes them ``hidden + 1`` or 4 wide)."""
    torch.manual_seed(13)
    initial = make_model(hidden)
    batches = [(torch.randn(batch_size, 3), torch.randint(0, 2, (batch_size,))) for _ in range(8)]
    assert fishleg._low_rank_pays(torch.ones(batch_size, hidden), torch.ones(batch_size, 4)) == (
        batch_size == 2
    )
    assert len(kron_q.product_blocks(hidden)) == (2 if hidden > 4 else 1)
    settings = {"momentum": 0.9, "aux_period": 3, "lr": 0.1}
    expected = dense_fishleg_updates(
        copy.deepcopy(initial), batches, momentum_on, q_structure, **settings
    )
    runs = []
    for fused in (False, True):
        model = copy.deepcopy(initial)
        pre = natgrad.FishLeg(
            model,
            damping=1e-3,
            aux_lr=1e-2,
            aux_period=settings["aux_period"],
            momentum=settings["momentum"],
            momentum_on=momentum_on,
            q_structure=q_structure,
        )
        opt = torch.optim.SGD(model.parameters(), lr=settings["lr"])
        updates = []
        for inputs, targets in batches:
            opt.zero_grad()
            logits = model(inputs)
            loss = F.cross_entropy(logits, targets)
            pre.backward(loss) if fused else loss.backward()
            pre.step(logits)
            updates.append(
                torch.cat(
                    [
                        torch.cat([m.weight.grad, m.bias.grad[:, None]], 1).reshape(-1)
                        for m in model[::2]
                    ]
                )
            )
            opt.step()
        assert len(pre.aux_losses) == 3
        for buffer in [*pre.momentum_buffers.values(), *pre.direction_buffers.values()]:
            assert buffer.stride(0) % linalg.ROW_ALIGNMENT == 0
        runs.append(updates)
    for standard, fused_update, dense in zip(*runs, expected, strict=True):
        assert torch.equal(standard, fused_update)
        assert relative_error(standard, dense) <= 1e-10
