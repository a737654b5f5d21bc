"""Embedding, normalisation layers and the torch.func fallback against dense float64 oracles.

Every Woodbury update (EF, iEF, iEF matrix, F(M), exact; full and layer structure) on small
models containing ``nn.Embedding``, ``nn.LayerNorm``, ``nn.GroupNorm``, ``nn.BatchNorm1d/2d``
(eval mode, and train mode as defined in :mod:`natgrad.direct`), a free prompt parameter or a
weight tied between an embedding and a linear layer (their neuron-view rows added) is
compared with a dense
solve built from explicit per-sample gradients (``tests/oracle.py``); then the selection, the
plain-gradient blocks of the Kronecker methods and FishLeg, and the errors.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import natgrad
from natgrad.analysis.quality import per_sample_gradients
from natgrad.likelihoods import get_likelihood
from oracle import damped_direction, dense_batch, expected_update, flat_grad, relative_error
from problems import MeanOverTokens, TiedHead, run_natgrad

FISHERS = ["empirical", "ief", "ief_matrix", "mc", "exact"]
STRUCTURES = ["full", "layer"]
TOLERANCE = 1e-8
DAMPING, SAMPLES, SEED = 1e-2, 3, 7

pytestmark = pytest.mark.usefixtures("float64")


class Prompted(nn.Module):
    """A free prompt parameter (2 tokens) concatenated to every input sequence."""

    def __init__(self, body_trainable: bool = True) -> None:
        super().__init__()
        self.prompt = nn.Parameter(torch.randn(2, 4))
        self.body = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), MeanOverTokens(), nn.Linear(5, 3))
        self.body.requires_grad_(body_trainable)

    def forward(self, x):
        prompt = self.prompt.expand(x.shape[0], -1, -1)
        return self.body(torch.cat([prompt, x], dim=1))


def with_batch_statistics(model: nn.Module, inputs: torch.Tensor) -> nn.Module:
    """A copy in eval mode whose train-mode BatchNorms use the batch's mean and biased variance
    as running statistics: its per-sample gradients are those of the statistics-as-constants
    definition."""
    oracle = copy.deepcopy(model)
    captured = {}
    hooks = [
        m.register_forward_pre_hook(lambda m, a, name=name: captured.update({name: a[0]}))
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
    ]
    with torch.no_grad():
        model(inputs)
    for hook in hooks:
        hook.remove()
    modules = dict(oracle.named_modules())
    for name, batch_input in captured.items():
        dims = (0, *range(2, batch_input.dim()))
        modules[name].running_mean.copy_(batch_input.mean(dim=dims))
        modules[name].running_var.copy_(batch_input.var(dim=dims, unbiased=False))
    return oracle.eval()


def embedding_mean():
    model = nn.Sequential(nn.Embedding(7, 4, padding_idx=0), MeanOverTokens(), nn.Tanh())
    model.append(nn.Linear(4, 3))
    tokens = torch.randint(0, 7, (6, 3))
    tokens[0, 1] = 0  # a padding token, whose embedding row torch never trains
    return model, tokens


def embedding_flat():
    model = nn.Sequential(nn.Embedding(5, 2), nn.Flatten(), nn.Linear(6, 3))
    return model, torch.randint(0, 5, (6, 3))


def layer_norm():
    model = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Tanh(), MeanOverTokens())
    model.append(nn.Linear(5, 3))
    return model, torch.randn(6, 3, 4)


def group_norm():
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.GroupNorm(2, 4), nn.Tanh(), nn.Flatten())
    model.append(nn.Linear(16, 3))
    return model, torch.randn(5, 2, 4, 4)


def batch_norm_eval():
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3))
    with torch.no_grad():
        model[1].running_mean.copy_(torch.randn(5))
        model[1].running_var.copy_(torch.rand(5) + 0.5)
        model[1].weight.copy_(torch.randn(5))
        model[1].bias.copy_(torch.randn(5))
    return model.eval(), torch.randn(6, 4)


def batch_norm_2d_eval():
    model = nn.Sequential(nn.Conv2d(2, 3, 2), nn.BatchNorm2d(3), nn.Tanh(), nn.Flatten())
    model.append(nn.Linear(12, 3))
    with torch.no_grad():
        model[1].running_mean.copy_(torch.randn(3))
        model[1].running_var.copy_(torch.rand(3) + 0.5)
    return model.eval(), torch.randn(5, 2, 3, 3)


def batch_norm_train_first():
    """Train mode with no trainable layer before the BatchNorm: statistics are constants."""
    model = nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    return model.train(), 2 + 3 * torch.randn(6, 4)


def prompt():
    return Prompted(), torch.randn(6, 3, 4)


def prompt_only():
    return Prompted(body_trainable=False), torch.randn(6, 3, 4)


def tied():
    return TiedHead(), torch.randint(0, 3, (6, 2))


MODELS = {
    "embedding_mean": embedding_mean,
    "embedding_flat": embedding_flat,
    "layer_norm": layer_norm,
    "group_norm": group_norm,
    "batch_norm_eval": batch_norm_eval,
    "batch_norm_2d_eval": batch_norm_2d_eval,
    "batch_norm_train_first": batch_norm_train_first,
    "prompt": prompt,
    "prompt_only": prompt_only,
    "tied": tied,
}


def module_blocks(model: nn.Module) -> list[list[nn.Parameter]]:
    """One block per module, its own trainable parameters (natgrad's ``structure="layer"``)."""
    blocks, seen = [], set()
    for module in model.modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad and id(p) not in seen]
        seen.update(id(p) for p in own)
        if own:
            blocks.append(own)
    return blocks


def mc_vectors(logits):
    generator = torch.Generator().manual_seed(SEED)
    return get_likelihood("categorical").sampled_output_grads(logits, SAMPLES, generator)


@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("fisher", FISHERS)
def test_update_matches_dense_oracle(fisher, structure, model_name):
    torch.manual_seed(0)
    model, inputs = MODELS[model_name]()
    oracle_model = with_batch_statistics(model, inputs)
    targets = torch.randint(0, 3, (inputs.shape[0],))
    settings = dict(fisher=fisher, structure=structure, damping=DAMPING, mc_samples=SAMPLES)
    actual, logits = run_natgrad(
        model, inputs, targets, "categorical", "mean", seed=SEED, **settings
    )
    vectors = mc_vectors(logits) if fisher == "mc" else None
    batch = dense_batch(oracle_model, inputs, targets, "categorical", "mean")
    blocks = module_blocks(oracle_model)
    expected = expected_update(batch, fisher, structure, DAMPING, blocks, vectors)
    assert relative_error(actual, expected) <= TOLERANCE


@pytest.mark.parametrize("fisher", ["empirical", "exact"])
def test_embedding_update_does_not_depend_on_unused_vocabulary(fisher):
    """Token indices, not one-hot rows: a 50,000-word embedding whose batch uses 7 words gives
    the update of a 7-word embedding, and zero for the other words."""
    torch.manual_seed(3)
    small, inputs = embedding_mean()
    large = copy.deepcopy(small)
    weight = torch.zeros(50_000, 4)
    weight[:7] = small[0].weight.detach()
    large[0] = nn.Embedding.from_pretrained(weight, freeze=False, padding_idx=0)
    targets = torch.randint(0, 3, (inputs.shape[0],))
    settings = dict(fisher=fisher, structure="full", damping=DAMPING)
    small_update, _ = run_natgrad(small, inputs, targets, "categorical", "mean", **settings)
    large_update, _ = run_natgrad(large, inputs, targets, "categorical", "mean", **settings)
    embedding_size = 50_000 * 4
    large_embedding, rest = large_update[:embedding_size], large_update[embedding_size:]
    assert not large_embedding[7 * 4 :].any()
    combined = torch.cat([large_embedding[: 7 * 4], rest])
    assert relative_error(combined, small_update) <= 1e-12


@pytest.mark.parametrize("chunk_size", [1, 4])
@pytest.mark.parametrize("model_name", ["prompt", "tied"])
def test_fallback_in_chunks_matches_dense_oracle(model_name, chunk_size):
    torch.manual_seed(2)
    model, inputs = MODELS[model_name]()
    targets = torch.randint(0, 3, (inputs.shape[0],))
    # the tied weight (neuron view by default) and the head's bias through the fallback
    overrides = {"embed": "fallback", "head": "fallback"} if model_name == "tied" else None
    actual, _ = run_natgrad(
        model, inputs, targets, "categorical", "mean", fisher="exact", structure="full",
        damping=DAMPING, fallback_chunk_size=chunk_size, overrides=overrides,
    )  # fmt: skip
    batch = dense_batch(model, inputs, targets, "categorical", "mean")
    expected = expected_update(batch, "exact", "full", DAMPING, module_blocks(model))
    assert relative_error(actual, expected) <= TOLERANCE


@pytest.mark.parametrize("fisher", ["mc", "exact"])
def test_fallback_pulls_vectors_back_one_by_one_without_a_nested_vmap_rule(fisher):
    """PReLU's backward has no batching rule for the second vmap level (datapoints, then the
    extra output vectors of mc / exact): the fallback pulls the vectors back one by one."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(4, 5), nn.PReLU(5), nn.Linear(5, 3))
    inputs = torch.randn(6, 4)
    targets = torch.randint(0, 3, (inputs.shape[0],))
    settings = dict(fisher=fisher, structure="full", damping=DAMPING, mc_samples=SAMPLES)
    actual, logits = run_natgrad(
        model, inputs, targets, "categorical", "mean", seed=SEED, **settings
    )
    assert "torch.func per-sample rows: 1.weight" in natgrad.NGD(model).describe()
    vectors = mc_vectors(logits) if fisher == "mc" else None
    batch = dense_batch(model, inputs, targets, "categorical", "mean")
    expected = expected_update(batch, fisher, "full", DAMPING, module_blocks(model), vectors)
    assert relative_error(actual, expected) <= TOLERANCE


@pytest.mark.parametrize("chunk_size", [0, 2.5, True])
def test_fallback_chunk_size_must_be_a_positive_integer(chunk_size):
    with pytest.raises(ValueError, match="fallback_chunk_size must be an integer >= 1"):
        natgrad.EF(Prompted(), fallback_chunk_size=chunk_size)


@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("fisher", ["ief", "exact"])
def test_fused_backward_equals_standard_path(fisher, model_name):
    torch.manual_seed(1)
    model, inputs = MODELS[model_name]()
    model.eval()  # one state for both passes (train mode would update BatchNorm statistics)
    targets = torch.randint(0, 3, (inputs.shape[0],))
    results = [
        run_natgrad(model, inputs, targets, "categorical", "mean", fused=fused, fisher=fisher)[0]
        for fused in (False, True)
    ]
    assert relative_error(results[1], results[0]) <= 1e-12


# ---------------------------------------------------------------- BatchNorm in train mode
def coupled_rows(model: nn.Sequential, inputs: torch.Tensor, vectors: torch.Tensor):
    """Rows of Linear -> BatchNorm1d (train) -> Tanh -> Linear by their definition: for vector
    set k, the gradient of sum_m v_km · z_m with respect to the copy of the parameters used by
    datapoint n, the batch statistics computed from all datapoints and differentiated through.
    Returns the rows (K, N, P) and the logits."""
    num = inputs.shape[0]
    copies = [
        p.detach().expand(num, *p.shape).clone().requires_grad_(True) for p in model.parameters()
    ]
    weight0, bias0, scale, shift, weight3, bias3 = copies
    hidden = torch.einsum("noi,ni->no", weight0, inputs) + bias0
    mean, variance = hidden.mean(dim=0), hidden.var(dim=0, unbiased=False)
    normalised = (hidden - mean) / torch.sqrt(variance + model[1].eps)
    logits = torch.einsum("noi,ni->no", weight3, torch.tanh(normalised * scale + shift)) + bias3
    rows = []
    for vector in vectors:
        grads = torch.autograd.grad((vector * logits).sum(), copies, retain_graph=True)
        rows.append(torch.cat([g.reshape(num, -1) for g in grads], dim=1))
    return torch.stack(rows), logits.detach()


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("fisher", FISHERS)
def test_train_mode_batch_norm_after_a_layer_matches_its_definition(fisher, structure):
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3))
    inputs, targets = torch.randn(6, 4), torch.randint(0, 3, (6,))
    reference = copy.deepcopy(model)
    settings = dict(fisher=fisher, structure=structure, damping=DAMPING, mc_samples=SAMPLES)
    actual, logits = run_natgrad(
        model, inputs, targets, "categorical", "mean", seed=SEED, **settings
    )

    factor, likelihood = 1 / inputs.shape[0], get_likelihood("categorical")
    output_grads = torch.softmax(logits, dim=1) - F.one_hot(targets, 3)
    loss_rows, oracle_logits = coupled_rows(reference, inputs, output_grads.unsqueeze(0))
    loss_rows = loss_rows[0]
    assert torch.allclose(oracle_logits, logits, rtol=1e-12, atol=1e-12)
    reference.zero_grad()
    F.cross_entropy(reference(inputs), targets).backward()
    gradient = factor * loss_rows.sum(dim=0)  # the rows sum to the true (coupled) gradient
    assert relative_error(gradient, flat_grad(list(reference.parameters()))) <= 1e-12

    scaling = output_grads.pow(2).sum(dim=1)
    rhs = gradient
    if fisher in ("empirical", "ief"):
        curvature = factor * loss_rows.T @ loss_rows
        if fisher == "ief":
            rhs = factor * loss_rows.T @ scaling
    elif fisher == "ief_matrix":
        scaled = loss_rows / scaling.sqrt().unsqueeze(1)
        curvature = factor * scaled.T @ scaled
    else:
        vectors = mc_vectors(logits) if fisher == "mc" else likelihood.hessian_sqrt(logits)
        rows = coupled_rows(reference, inputs, vectors)[0].reshape(-1, loss_rows.shape[1])
        weight = 1 / SAMPLES if fisher == "mc" else 1.0
        curvature = factor * weight * rows.T @ rows
    if structure == "layer":
        sizes = [p.numel() for p in reference.parameters()]
        index = torch.repeat_interleave(torch.tensor([0, 0, 1, 1, 3, 3]), torch.tensor(sizes))
        curvature = curvature * (index.unsqueeze(0) == index.unsqueeze(1))
    expected = damped_direction(curvature, rhs, DAMPING)
    assert relative_error(actual, expected) <= TOLERANCE


# ---------------------------------------------------------------- selection and describe()
def test_describe_lists_every_group():
    model = nn.Sequential(nn.Embedding(5, 4), nn.LayerNorm(4), MeanOverTokens(), nn.PReLU())
    model.append(nn.Linear(4, 3))
    pre = natgrad.NGD(model, overrides={"3": "plain_gradient"})
    assert pre.describe().endswith(
        "neuron view: 0 (Embedding), 4 (Linear); normalisation rows: 1 (LayerNorm); "
        "plain gradient: 3.weight"
    )
    pre = natgrad.IEF(Prompted())
    assert "torch.func per-sample rows: prompt" in pre.describe()
    kfac = natgrad.KFAC(model)
    assert kfac.describe().endswith(
        "neuron view: 0 (Embedding), 4 (Linear); plain gradient: 1.weight, 1.bias, 3.weight"
    )


@pytest.mark.parametrize(
    "make",
    [
        lambda m: natgrad.KFAC(m, fisher="exact", inv_period=1),
        lambda m: natgrad.KFAC(m, damping_mode="correct"),
        lambda m: natgrad.FOOF(m),
        lambda m: natgrad.FishLeg(m, aux_period=1),
    ],
)
def test_kronecker_and_fishleg_give_plain_gradients_to_other_blocks(make):
    torch.manual_seed(3)
    model = Prompted()
    model.body.insert(1, nn.LayerNorm(5))
    inputs, targets = torch.randn(6, 3, 4), torch.randint(0, 3, (6,))
    model.zero_grad()
    F.cross_entropy(model(inputs), targets).backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    pre = make(model)
    assert "plain gradient: body.1.weight, body.1.bias, prompt" in pre.describe()
    for fused in (False, True):
        model.zero_grad()
        logits = model(inputs)
        loss = F.cross_entropy(logits, targets)
        pre.backward(loss) if fused else loss.backward()
        pre.step(logits)
        for name, param in model.named_parameters():
            assert torch.isfinite(param.grad).all()
            if name in ("prompt", "body.1.weight", "body.1.bias"):
                assert torch.allclose(param.grad, plain[name], rtol=1e-12, atol=0), name


@pytest.mark.parametrize(
    "make",
    [
        # inv_period=1: the second step inverts the factors the first one folded in
        lambda m: natgrad.KFAC(m, fisher="empirical", ema_decay=0.0, inv_period=1),
        lambda m: natgrad.KFAC(m, ema_decay=0.5, inv_period=1),
        lambda m: natgrad.KFAC(
            m, fisher="exact", damping_mode="correct", ema_decay=0.0, inv_period=1
        ),
        lambda m: natgrad.KFAC(m, fisher="exact", damping_mode="none", ema_decay=0.5, inv_period=1),
        lambda m: natgrad.FOOF(m, ema_decay=0.0, inv_period=1),
        lambda m: natgrad.FOOF(m, kfac_damping=True, fisher="empirical", inv_period=1),
        lambda m: natgrad.FishLeg(m, aux_period=1),
        lambda m: natgrad.FishLeg(m, aux_period=1, momentum_on="update"),
        lambda m: natgrad.FishLeg(m, aux_period=1, q_structure="diag"),
    ],
)
@pytest.mark.parametrize("padding_idx", [None, 2])
def test_kronecker_embedding_equals_linear_on_one_hot_inputs(make, padding_idx):
    """nn.Embedding in the Kronecker methods (its input factor kept diagonal, as token
    frequencies) is exactly a bias-free Linear on one-hot rows (zero rows for padding)."""
    torch.manual_seed(4)
    embedding = nn.Embedding(5, 3, padding_idx=padding_idx)
    embedded = nn.Sequential(embedding, nn.Flatten(), nn.Tanh(), nn.Linear(6, 3))
    linear = nn.Sequential(nn.Linear(5, 3, bias=False), nn.Flatten(), nn.Tanh(), nn.Linear(6, 3))
    with torch.no_grad():
        linear[0].weight.copy_(embedded[0].weight.T)
        linear[3].load_state_dict(embedded[3].state_dict())
    tokens, targets = torch.randint(0, 5, (7, 2)), torch.randint(0, 3, (7,))
    one_hot = F.one_hot(tokens, 5).double()
    if padding_idx is not None:
        one_hot[..., padding_idx] = 0
    pairs = [(embedded, tokens), (linear, one_hot)]
    grads = []
    for model, inputs in pairs:
        pre = make(model)
        for _ in range(2):
            model.zero_grad()
            logits = model(inputs)
            F.cross_entropy(logits, targets).backward()
            pre.step(logits)
        grads.append((model[0].weight.grad, model[3].weight.grad))
        if isinstance(pre, natgrad.KFAC | natgrad.FOOF) and model is embedded:
            assert pre.input_factors["0"].shape == (5,)  # diagonal, not 5 x 5
    assert torch.allclose(grads[0][0], grads[1][0].T, rtol=1e-10, atol=1e-12)
    assert torch.allclose(grads[0][1], grads[1][1], rtol=1e-10, atol=1e-12)


def test_foof_warm_start_of_an_embedding_gives_the_token_frequencies():
    torch.manual_seed(6)
    model = nn.Sequential(nn.Embedding(5, 3, padding_idx=4), nn.Flatten(), nn.Linear(6, 3))
    pre = natgrad.FOOF(model, ema_decay=0.0)
    batches = [torch.randint(0, 5, (7, 2)) for _ in range(3)]
    pre.warm_start(batches)
    last = batches[-1]  # ema_decay=0: the last batch's statistics
    one_hot = F.one_hot(last.reshape(-1), 5).double()
    one_hot[:, 4] = 0
    expected = (one_hot.T @ one_hot / one_hot.shape[0]).diagonal()
    assert torch.allclose(pre.normalised_factors("0")[0], expected, rtol=1e-14, atol=0)


def test_per_sample_gradients_cover_every_block():
    torch.manual_seed(5)
    model, inputs = embedding_mean()
    model.insert(2, nn.LayerNorm(4))
    targets = torch.randint(0, 3, (inputs.shape[0],))
    actual = per_sample_gradients(model, inputs, lambda z: F.cross_entropy(z, targets))
    expected = dense_batch(model, inputs, targets, "categorical", "mean").loss_grads
    assert relative_error(actual, expected) <= 1e-12


class MaskedPrompt(nn.Module):
    """A prompt model whose forward takes a per-token mask as a keyword argument."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = Prompted()

    def forward(self, x, *, mask):
        return self.inner(x * mask.unsqueeze(-1))


class PackedPrompt(nn.Module):
    """The same model with the mask packed into the input as a fifth feature."""

    def __init__(self, masked: MaskedPrompt) -> None:
        super().__init__()
        self.masked = masked

    def forward(self, packed):
        return self.masked(packed[..., :4], mask=packed[..., 4])


def test_fallback_splits_keyword_arguments_into_datapoints():
    torch.manual_seed(7)
    masked = MaskedPrompt()
    inputs, mask = torch.randn(6, 3, 4), torch.randint(0, 2, (6, 3)).double()
    targets = torch.randint(0, 3, (6,))
    updates = []
    for model, args, kwargs in [
        (masked, (inputs,), {"mask": mask}),
        (PackedPrompt(masked), (torch.cat([inputs, mask.unsqueeze(-1)], dim=-1),), {}),
    ]:
        pre = natgrad.NGD(model, fisher="exact", structure="layer")
        model.zero_grad()
        logits = model(*args, **kwargs)
        F.cross_entropy(logits, targets).backward()
        pre.step(logits)
        pre.remove()
        updates.append(flat_grad(list(model.parameters())))
    assert relative_error(updates[0], updates[1]) <= 1e-12


# ---------------------------------------------------------------- errors
class Squared(torch.autograd.Function):
    """A custom autograd function without a vmap rule (old-style ``forward(ctx, ...)``)."""

    @staticmethod
    def forward(ctx, values):
        ctx.save_for_backward(values)
        return values * values

    @staticmethod
    def backward(ctx, grad):
        (values,) = ctx.saved_tensors
        return 2 * values * grad


class Scaled(nn.Module):
    """A trainable element-wise scale, optionally squared by :class:`Squared` or centred over
    the batch (which makes datapoints interact)."""

    def __init__(self, width: int, mode: str) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.rand(width) + 0.5)
        self.mode = mode

    def forward(self, x):
        if self.mode == "custom_function":
            return Squared.apply(x * self.scale)
        if self.mode == "batch_coupled":
            return (x - x.mean(dim=0)) * self.scale
        return x * self.scale


@pytest.mark.parametrize(
    ("embedding", "reason"),
    [
        (nn.Embedding(5, 2, max_norm=1.0), "max_norm=1.0 renormalises the weight in place"),
        (nn.Embedding(5, 2, sparse=True), "sparse=True gives sparse gradients"),
        (nn.Embedding(5, 2, scale_grad_by_freq=True), "scale_grad_by_freq=True scales"),
    ],
)
def test_embedding_whose_gradients_cannot_be_known_is_named(embedding, reason):
    model = nn.Sequential(embedding, nn.Flatten(), nn.Linear(6, 3))
    message = rf"'0' \(Embedding\): {reason}.*overrides=\{{'0': 'plain_gradient'\}}"
    for make in (natgrad.EF, natgrad.KFAC):
        with pytest.raises(ValueError, match=message):
            make(model)
    pre = natgrad.EF(model, overrides={"0": "plain_gradient"})
    assert "plain gradient: 0.weight" in pre.describe()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda: nn.Sequential(Scaled(4, "custom_function"), nn.Linear(4, 3)),
            "failed: In order to use an autograd.Function with functorch transforms",
        ),
        (
            lambda: nn.Sequential(Scaled(4, "batch_coupled"), nn.Linear(4, 3)),
            "does not reproduce its batch output",
        ),
        (
            lambda: nn.Sequential(Scaled(4, "plain"), nn.Dropout(0.5), nn.Linear(4, 3)),
            "draws random numbers",
        ),
        (
            lambda: nn.Sequential(Scaled(4, "plain"), nn.BatchNorm1d(4), nn.Linear(4, 3)),
            r"the BatchNorm modules \['1'\] normalise with batch statistics",
        ),
    ],
)
def test_fallback_that_cannot_know_per_sample_gradients_is_named(make, message):
    torch.manual_seed(6)
    model = make()
    inputs, targets = torch.randn(6, 4), torch.randint(0, 3, (6,))
    pre = natgrad.EF(model)
    logits = model(inputs)
    F.cross_entropy(logits, targets).backward()
    full = r"'0' \(Scaled: 0.scale\) with its torch.func fallback: .*" + message
    with pytest.raises(ValueError, match=full + r".*overrides=\{'0': 'plain_gradient'\}"):
        pre.step(logits)
    pre.remove()
    pre = natgrad.EF(model, overrides={"0": "plain_gradient"})
    logits = model(inputs)
    F.cross_entropy(logits, targets).backward()
    pre.step(logits)
    assert torch.isfinite(model[-1].weight.grad).all()


def test_non_finite_inputs_skip_the_step_before_the_fallback_runs():
    model, inputs = prompt()
    inputs[1, 0, 0] = float("nan")
    pre = natgrad.IEF(model)
    logits = model(inputs)
    F.cross_entropy(logits, torch.randint(0, 3, (6,))).backward()
    with pytest.warns(natgrad.NonFiniteWarning):
        pre.step(logits)
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in model.parameters())


class TwoLookups(nn.Module):
    """One embedding called twice per forward pass (two token streams)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(6, 3, padding_idx=5)
        self.head = nn.Linear(3, 3)

    def forward(self, tokens):
        first, second = tokens[:, :2], tokens[:, 2:]
        return self.head(self.embed(first).mean(1) + self.embed(second).mean(1))


def test_foof_warm_start_folds_all_calls_of_a_module_as_one_batch_like_step():
    torch.manual_seed(8)
    tokens = torch.tensor([[0, 1, 2, 2, 4], [1, 1, 5, 3, 0]])
    warm = natgrad.FOOF(TwoLookups(), ema_decay=0.0)
    warm.warm_start([tokens])
    model = TwoLookups()
    stepped = natgrad.FOOF(model, ema_decay=0.0)
    logits = model(tokens)
    F.cross_entropy(logits, torch.tensor([0, 2])).backward()
    stepped.step(logits)
    warm_factor = warm.normalised_factors("embed")[0]
    assert torch.allclose(warm_factor, stepped.normalised_factors("embed")[0], rtol=1e-14)
    assert torch.allclose(warm_factor, torch.tensor([2, 3, 2, 1, 1, 0]) / 10.0, rtol=1e-14)


@pytest.mark.parametrize("damping_mode", ["heuristic", "correct"])
def test_state_with_a_dense_embedding_factor_loads_as_its_diagonal(damping_mode):
    """A state saved while embeddings kept a dense factor (and dense inverse entries) resumes
    as the diagonal one does; a factor that fits no layer of the model is refused."""
    torch.manual_seed(9)
    model, inputs = embedding_mean()
    targets = torch.randint(0, 3, (inputs.shape[0],))
    settings = dict(ema_decay=0.5, inv_period=3, damping_mode=damping_mode)
    pre = natgrad.KFAC(model, **settings)

    def step(pre, model):
        model.zero_grad()
        logits = model(inputs)
        F.cross_entropy(logits, targets).backward()
        pre.step(logits)
        return torch.cat([p.grad.reshape(-1) for p in model.parameters()])

    step(pre, model)
    state = copy.deepcopy(pre.state_dict())
    expected = step(pre, model)
    dense = copy.deepcopy(state)
    dense["input_factors"]["0"] = torch.diag(state["input_factors"]["0"])
    if damping_mode == "heuristic":
        dense["inverses"]["0"]["input"] = torch.diag(state["inverses"]["0"]["input"])
    else:  # eigenvectors of a diagonal factor: a permutation (here the identity)
        dense["inverses"]["0"]["input_vectors"] = torch.eye(7)
    for saved in (state, dense):
        resumed_model = copy.deepcopy(model)
        resumed = natgrad.KFAC(resumed_model, **settings)
        resumed.load_state_dict(saved)
        assert resumed.input_factors["0"].shape == (7,)
        assert torch.allclose(step(resumed, resumed_model), expected, rtol=1e-13, atol=1e-15)
    wrong = copy.deepcopy(state)
    wrong["input_factors"]["3"] = torch.eye(4)
    with pytest.raises(ValueError, match="input factor of '3' has shape"):
        natgrad.KFAC(copy.deepcopy(model), **settings).load_state_dict(wrong)
