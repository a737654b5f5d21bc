"""torch.compile: a compiled model gets the same natgrad updates as the eager one.

Compiled with ``backend="aot_eager"`` (dynamo and AOTAutograd, no code generation), which
keeps the test fast on CPU; the inductor backend changes the kernels, not how natgrad's hooks
meet the graph. Measured here: each captured layer call splits the graph (the tensor hook
that records its output gradient writes Python state, which cannot be traced into a graph);
nothing else in natgrad's hooks does.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import natgrad
from oracle import relative_error

pytestmark = [
    pytest.mark.usefixtures("float64"),
    # natgrad says when it clears torch.compile's caches; tests here compile many twins
    pytest.mark.filterwarnings("ignore:torch.compile had compiled code"),
]

METHODS = {
    "ef": lambda model: natgrad.EF(model, damping=1e-3),
    "kfac": lambda model: natgrad.KFAC(
        model, fisher="empirical", ema_decay=0.5, damping=1e-2, inv_period=1
    ),
}


def make_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 3))


def train(model: nn.Module, method: str, wrap: str, fused: bool) -> list[torch.Tensor]:
    """Three SGD steps; the preconditioned direction of each step, flat."""
    torch.manual_seed(1)
    batches = [(torch.randn(8, 5), torch.randint(0, 3, (8,))) for _ in range(3)]
    if wrap == "compile, then natgrad":
        model = torch.compile(model, backend="aot_eager")
        pre = METHODS[method](model)
    else:
        pre = METHODS[method](model)
        if wrap == "natgrad, then compile":
            model = torch.compile(model, backend="aot_eager")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    directions = []
    for inputs, targets in batches:
        optimizer.zero_grad()
        logits = model(inputs)
        loss = F.cross_entropy(logits, targets)
        pre.backward(loss) if fused else loss.backward()
        pre.step(logits)
        directions.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
        optimizer.step()
    pre.remove()
    return directions


@pytest.mark.parametrize(
    "method, wrap, fused",
    [
        ("ef", "compile, then natgrad", False),
        ("ef", "compile, then natgrad", True),
        ("ef", "natgrad, then compile", False),
        ("kfac", "compile, then natgrad", False),
        ("kfac", "natgrad, then compile", True),
    ],
)
def test_compiled_model_gets_the_eager_updates(method, wrap, fused):
    torch._dynamo.reset()
    eager = train(make_mlp(), method, "eager", fused)
    compiled = train(make_mlp(), method, wrap, fused)
    for step, (actual, expected) in enumerate(zip(compiled, eager, strict=True)):
        assert relative_error(actual, expected) <= 1e-12, step


def test_compiled_wrapper_is_unwrapped_for_names():
    model = make_mlp()
    eager_description = natgrad.KFAC(copy.deepcopy(model)).describe()
    pre = natgrad.KFAC(torch.compile(model, backend="aot_eager"))
    assert pre.describe() == eager_description
    assert "_orig_mod" not in pre.describe() and set(pre.selection.layers) == {"0", "2", "4"}
    pre.remove()


def test_graph_splits_only_at_captured_layer_calls():
    model = make_mlp()
    inputs = torch.randn(8, 5)
    torch._dynamo.reset()
    assert torch._dynamo.explain(model)(inputs).graph_count == 1
    pre = natgrad.EF(model)
    explanation = torch._dynamo.explain(model)(inputs)
    pre.remove()
    # each of the 3 captured Linear calls runs as its own compiled frame (its graph, then
    # the code up to the next layer): at most two graphs per captured call
    assert 1 < explanation.graph_count <= 2 * 3


@pytest.mark.parametrize("order", ["compile, then natgrad", "natgrad, then compile"])
def test_code_compiled_before_the_hooks_is_not_reused(order):
    """torch.compile reuses code compiled for a twin of the model (same class, no natgrad
    hooks) and does not check hooks added later: natgrad clears its caches, says so, and the
    compiled model gets the eager update."""
    eager = make_mlp()
    twin = torch.compile(copy.deepcopy(eager), backend="aot_eager")
    inputs, targets = torch.randn(8, 5), torch.randint(0, 3, (8,))
    F.cross_entropy(twin(inputs), targets).backward()  # compiled without any hook

    model = copy.deepcopy(eager)
    with pytest.warns(UserWarning, match=r"torch.compiler.reset\(\)"):
        if order == "compile, then natgrad":
            model = torch.compile(model, backend="aot_eager")
            pre = natgrad.EF(model, damping=1e-3)
        else:
            pre = natgrad.EF(model, damping=1e-3)
            model = torch.compile(model, backend="aot_eager")
    logits = model(inputs)
    F.cross_entropy(logits, targets).backward()
    pre.step(logits)
    pre.remove()
    assert_eager_ef_update(model, eager, inputs, targets)


def test_no_compiled_code_no_reset(recwarn):
    """Building a second preconditioner without compiling anything in between clears nothing."""
    natgrad.EF(make_mlp(), damping=1e-3)  # clears what earlier tests compiled, if anything
    recwarn.clear()
    natgrad.EF(make_mlp(), damping=1e-3)
    assert not [w for w in recwarn if "torch.compiler.reset" in str(w.message)]


def test_a_twin_compiled_after_the_preconditioner_gets_an_error_naming_the_fix():
    """natgrad first, then a hook-free twin compiled and run, then the model compiled: the
    twin's code runs without natgrad's hooks, and step() says what to do."""
    model, twin = make_mlp(), make_mlp()
    eager = copy.deepcopy(model)
    pre = natgrad.EF(model, damping=1e-3)
    inputs, targets = torch.randn(8, 5), torch.randint(0, 3, (8,))
    compiled_twin = torch.compile(twin, backend="aot_eager")
    F.cross_entropy(compiled_twin(inputs), targets).backward()
    compiled = torch.compile(model, backend="aot_eager")
    logits = compiled(inputs)
    F.cross_entropy(logits, targets).backward()
    with pytest.raises(RuntimeError, match=r"call torch.compiler.reset\(\) after building"):
        pre.step(logits)
    pre.remove()
    torch.compiler.reset()  # the fix the message names
    pre = natgrad.EF(model, damping=1e-3)
    logits = compiled(inputs)
    F.cross_entropy(logits, targets).backward()
    pre.step(logits)  # captured now: the eager update
    assert_eager_ef_update(model, eager, inputs, targets)


def assert_eager_ef_update(model, eager, inputs, targets) -> None:
    """``model``'s ``.grad`` is the EF direction of the eager twin on the same batch."""
    reference = natgrad.EF(eager, damping=1e-3)
    logits = eager(inputs)
    F.cross_entropy(logits, targets).backward()
    reference.step(logits)
    reference.remove()
    actual = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    expected = torch.cat([p.grad.reshape(-1) for p in eager.parameters()])
    assert relative_error(actual, expected) <= 1e-12
