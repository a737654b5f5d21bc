"""Which trainable parameters natgrad preconditions, and through which per-sample structure.

Every trainable parameter of a model lands in exactly one group, decided per module for the
module's own parameters (``module.parameters(recurse=False)``):

``layers``
    modules with a neuron-view adapter (:mod:`natgrad.capture`: ``nn.Linear``, ``nn.Conv2d``,
    ``nn.Embedding``): per-sample gradients are sums of ``e a^T``, never materialised;
``direct``
    normalisation layers (:mod:`natgrad.direct`: ``nn.LayerNorm``, ``nn.GroupNorm``,
    ``nn.BatchNorm1d/2d/3d``): per-sample gradient rows of the affine weight and bias from the
    captured input and output gradient;
``fallback``
    any other trainable tensor (a free prompt parameter, a module without adapter, an
    unsupported configuration such as a grouped convolution, a parameter shared by two
    modules): exact per-sample gradients by torch.func (:mod:`natgrad.fallback`);
``plain``
    parameters left to the plain gradient (``.grad`` untouched).

torch's recurrent layers (``nn.LSTM``, ``nn.GRU``, ``nn.RNN``) fit no group: their fused
kernels hide the weights from hooks and have no per-sample (vmap) rule, so they are refused
with an error naming :func:`natgrad.layers.replace` (drop-ins built from ``nn.Linear`` cells)
unless overridden to the plain gradient (or ``unsupported="plain_gradient"``).

The Woodbury preconditioners (:class:`natgrad.NGD` and its aliases) solve with all three
structured groups. Kronecker methods and FishLeg precondition the ``layers`` only and leave
the ``direct`` and ``fallback`` parameters to the plain gradient, an identity block
(:meth:`LayerSelection.without_per_sample_blocks`). ``pre.describe()`` lists the groups.

Module types are recognised by their adapters (:func:`natgrad.adapters.adapter_for`,
:func:`natgrad.direct.norm_adapter_for`); :func:`register_adapter` adds one for a module type
of one's own, e.g. a linear layer storing its weight transposed::

    natgrad.register_adapter(MyLinear, natgrad.adapters.TransposedLinearAdapter())

The automatic choice is overridden per module with ``overrides={module_name: policy}``,
``policy`` one of ``"fallback"`` or ``"plain_gradient"`` (module names as in
``model.named_modules()``; ``""`` is the model itself, e.g. for a prompt parameter defined on
it).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Literal, get_args

from torch import nn

from natgrad.adapters import ADAPTERS, LayerAdapter, adapter_for
from natgrad.direct import NORM_ADAPTERS, NormAdapter, norm_adapter_for

Unsupported = Literal["fallback", "error", "plain_gradient"]
Override = Literal["fallback", "plain_gradient"]
UNSUPPORTED_POLICIES: tuple[Unsupported, ...] = get_args(Unsupported)
OVERRIDE_POLICIES: tuple[Override, ...] = get_args(Override)


@dataclass
class LayerSelection:
    """The groups of trainable parameters (see the module docstring)."""

    layers: dict[str, nn.Module] = field(default_factory=dict)
    direct: dict[str, nn.Module] = field(default_factory=dict)
    fallback: dict[str, dict[str, nn.Parameter]] = field(default_factory=dict)
    plain: dict[str, nn.Parameter] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)
    """Names of the ``layers``, ``direct`` and ``fallback`` modules, in model order."""
    tied: dict[str, str] = field(default_factory=dict)
    """``{embedding: linear}``: ``layers`` that share one weight (a language model's input
    embedding and output layer); the Woodbury methods add their per-sample gradients."""

    def describe(self) -> str:
        """One clause per non-empty group, for ``Preconditioner.describe()``."""
        layers = ", ".join(f"{_label(n)} ({type(m).__name__})" for n, m in self.layers.items())
        parts = [f"neuron view: {layers or 'none'}"]
        if self.direct:
            kinds = ", ".join(f"{_label(n)} ({type(m).__name__})" for n, m in self.direct.items())
            parts.append(f"normalisation rows: {kinds}")
        if self.fallback:
            names = [name for params in self.fallback.values() for name in params]
            parts.append(f"torch.func per-sample rows: {', '.join(names)}")
        if self.tied:
            pairs = ", ".join(f"{a} = {b}" for a, b in self.tied.items())
            parts.append(f"tied weights (per-sample gradients materialised): {pairs}")
        if self.plain:
            parts.append(f"plain gradient: {', '.join(self.plain)}")
        return "; ".join(parts)

    def structured_parameters(self) -> Iterator[nn.Parameter]:
        """The trainable parameters of ``layers``, ``direct`` and ``fallback``."""
        for module in [*self.layers.values(), *self.direct.values()]:
            yield from (p for p in module.parameters(recurse=False) if p.requires_grad)
        for params in self.fallback.values():
            yield from params.values()

    def without_per_sample_blocks(self) -> LayerSelection:
        """The selection of the Kronecker methods and FishLeg: ``direct`` and ``fallback``
        parameters join the plain gradient (an identity block of the curvature)."""
        if not self.layers:
            raise ValueError(
                "the model has no trainable nn.Linear, nn.Conv2d or nn.Embedding layer: "
                "Kronecker methods and FishLeg precondition only those (the Woodbury methods, "
                "natgrad.NGD, EF, IEF, also take normalisation layers and any other tensor)"
            )
        plain = dict(self.plain)
        layers = dict(self.layers)
        for embedding, linear in self.tied.items():  # no Kronecker structure for their sum
            for name in (embedding, linear):
                for pname, param in layers.pop(name).named_parameters(recurse=False):
                    if param.requires_grad and all(param is not q for q in plain.values()):
                        plain[_join(name, pname)] = param
        if not layers:
            raise ValueError(
                "the model's only nn.Linear / nn.Embedding layers share their weight: Kronecker "
                "methods and FishLeg give tied weights the plain gradient, leaving nothing to "
                "precondition (the Woodbury methods, natgrad.NGD, EF, IEF, take tied weights)"
            )
        for name, module in self.direct.items():
            for pname, param in module.named_parameters(recurse=False):
                if param.requires_grad:
                    plain[_join(name, pname)] = param
        for params in self.fallback.values():
            plain.update(params)
        return LayerSelection(
            layers=layers, plain=plain, order=[name for name in self.order if name in layers]
        )


def register_adapter(module_type: type[nn.Module], adapter: LayerAdapter | NormAdapter) -> None:
    """Let natgrad precondition modules of exactly ``module_type`` through ``adapter``.

    Parameters
    ----------
    module_type
        An ``nn.Module`` subclass (matched exactly, not its subclasses).
    adapter
        A :class:`natgrad.adapters.LayerAdapter` for a layer whose per-sample gradients are sums
        of outer products ``e a^T`` (a linear layer: :class:`~natgrad.adapters.LinearAdapter`
        for a ``(d_out, d_in)`` weight, :class:`~natgrad.adapters.TransposedLinearAdapter` for a
        ``(d_in, d_out)`` one; the module's ``forward`` takes the input as its first argument
        and its parameters are ``weight`` and an optional ``bias``), or a
        :class:`natgrad.direct.NormAdapter` for a normalisation layer
        (:class:`~natgrad.direct.RMSNormAdapter`, ...). Replaces any earlier registration of
        the type; preconditioners built afterwards use it.
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"module_type must be an nn.Module subclass, got {module_type!r}")
    if isinstance(adapter, LayerAdapter):
        ADAPTERS[module_type] = adapter
        NORM_ADAPTERS.pop(module_type, None)
    elif isinstance(adapter, NormAdapter):
        NORM_ADAPTERS[module_type] = adapter
        ADAPTERS.pop(module_type, None)
    else:
        raise TypeError(
            "adapter must be a natgrad.adapters.LayerAdapter (linear-like layers) or a "
            f"natgrad.direct.NormAdapter (normalisation layers), got {type(adapter).__name__}"
        )


def select_layers(
    model: nn.Module,
    unsupported: Unsupported = "fallback",
    overrides: Mapping[str, Override] | None = None,
) -> LayerSelection:
    """Assign every trainable parameter of ``model`` to a group (module docstring).

    Parameters
    ----------
    model
        Any ``nn.Module``.
    unsupported
        What to do with modules that have no adapter (or an unsupported configuration):
        ``"fallback"`` (default) computes their exact per-sample gradients by torch.func;
        ``"plain_gradient"`` leaves their ``.grad`` untouched, so the optimiser applies the
        plain gradient to them and the curvature of the other layers ignores them
        (block-diagonal with respect to them); ``"error"`` raises and lists them.
    overrides
        ``{module_name: "fallback" | "plain_gradient"}``, applied to the module's own
        trainable parameters before the automatic choice.

    Raises
    ------
    ValueError
        For a module whose per-sample gradients cannot be known (e.g. ``nn.Embedding`` with
        ``max_norm``, or torch's ``nn.LSTM``: the message names
        :func:`natgrad.layers.replace`), naming it and the override to use; for unsupported
        modules with ``unsupported="error"``; for bad policies or override names.
    """
    if unsupported not in UNSUPPORTED_POLICIES:
        raise ValueError(
            f"unknown unsupported={unsupported!r}: choose one of {UNSUPPORTED_POLICIES}"
        )
    overrides = _checked_overrides(model, overrides or {})
    modules = list(model.named_modules())
    owners = Counter(
        id(p) for _, m in modules for p in m.parameters(recurse=False) if p.requires_grad
    )
    claimed = _claimed_by_layers(modules, owners)
    tied = _tied_weights(modules, owners)
    tied_names = {name for pair in tied.values() for name in pair}
    for pair in tied.values():
        policies = {overrides.get(name) for name in pair}
        if len(policies) > 1:
            first, second = pair
            raise ValueError(
                f"'{_label(first)}' and '{_label(second)}' share one weight (tied): override both "
                f"with the same policy or neither, e.g. overrides={{{first!r}: 'plain_gradient', "
                f"{second!r}: 'plain_gradient'}}"
            )
    selection = LayerSelection()
    unsupported_modules: list[str] = []
    rejected: dict[str, str] = {}
    recurrent: dict[str, str] = {}
    assigned: set[int] = set()
    for name, module in modules:
        own = {
            _join(name, pname): p
            for pname, p in module.named_parameters(recurse=False)
            if p.requires_grad and id(p) not in assigned and claimed.get(id(p), name) == name
        }
        if name in tied_names and name not in overrides:
            assigned.update(id(p) for p in own.values())
            selection.layers[name] = module
            selection.order.append(name)
            continue
        if not own:
            continue
        assigned.update(id(p) for p in own.values())
        policy = overrides.get(name)
        if isinstance(module, nn.RNNBase) and policy != "plain_gradient":
            if unsupported != "plain_gradient":
                recurrent[name] = f"'{_label(name)}' ({type(module).__name__})"
                continue
            policy = "plain_gradient"
        if policy is None:
            shared = any(
                owners[id(p)] > 1 and id(p) not in claimed
                for p in module.parameters(recurse=False)
                if p.requires_grad
            )
            policy, reason = _automatic(module, shared)
            if policy == "rejected":
                rejected[name] = f"'{_label(name)}' ({type(module).__name__}): {reason}"
                continue
            if policy == "unsupported":
                unsupported_modules.append(f"'{_label(name)}' ({type(module).__name__}): {reason}")
                policy = unsupported
        if policy == "layer":
            selection.layers[name] = module
        elif policy == "direct":
            selection.direct[name] = module
        elif policy == "fallback":
            selection.fallback[name] = own
        elif policy == "plain_gradient":
            selection.plain.update(own)
            continue
        else:  # "error": reported below
            continue
        selection.order.append(name)
    if recurrent:
        raise ValueError(
            "natgrad has no per-sample gradients for torch's recurrent layers "
            + ", ".join(recurrent.values())
            + ": their fused kernels hide the weights from natgrad's hooks and have no "
            "torch.func per-sample rule. Call model = natgrad.layers.replace(model) before "
            "building the preconditioner (it swaps in natgrad.layers.LSTM / GRU / RNN, built "
            "from nn.Linear cells, with the same weights and outputs), or pass overrides={"
            + ", ".join(f"{name!r}: 'plain_gradient'" for name in recurrent)
            + "} to train them with the plain gradient."
        )
    selection.tied = {
        embedding: linear
        for embedding, linear in tied.values()
        if embedding in selection.layers and linear in selection.layers
    }
    if rejected:
        raise ValueError(
            "natgrad cannot know the per-sample gradients of these modules: "
            + "; ".join(rejected.values())
            + ". Pass overrides={"
            + ", ".join(f"{name!r}: 'plain_gradient'" for name in rejected)
            + "} to train them with the plain gradient."
        )
    if unsupported_modules and unsupported == "error":
        raise ValueError(
            "natgrad has no adapter for these trainable modules: "
            + "; ".join(unsupported_modules)
            + ". Pass unsupported='fallback' (exact per-sample gradients by torch.func) or "
            "unsupported='plain_gradient' to leave them to the plain gradient, or choose per "
            "module with overrides={name: 'fallback' | 'plain_gradient'}."
        )
    if not selection.order:
        raise ValueError("the model has no trainable parameter for natgrad to precondition")
    return selection


def _claimed_by_layers(modules: list[tuple[str, nn.Module]], owners: Counter) -> dict[int, str]:
    """Parameters registered on several modules of which exactly one has an adapter: the
    name of that module, by parameter id.

    HuggingFace heads hold the output bias twice (``self.bias`` and ``self.decoder.bias`` are
    one tensor, e.g. BERT's ``cls.predictions``): the parent only keeps a reference and the
    layer uses it. natgrad assigns such a parameter to the layer; a parent that also used it
    in its own forward pass would need ``overrides={parent: "fallback"}``.
    """
    holders: dict[int, list[str]] = {}
    for name, module in modules:
        if adapter_for(module) is None and norm_adapter_for(module) is None:
            continue
        for param in module.parameters(recurse=False):
            if param.requires_grad and owners[id(param)] > 1:
                holders.setdefault(id(param), []).append(name)
    return {key: names[0] for key, names in holders.items() if len(names) == 1}


def _tied_weights(
    modules: list[tuple[str, nn.Module]], owners: Counter
) -> dict[int, tuple[str, str]]:
    """Weights shared by exactly an ``nn.Embedding`` and a linear layer (a language model's
    tied input and output embeddings): ``(embedding name, linear name)`` by parameter id."""
    embeddings: dict[int, str] = {}
    linears: dict[int, str] = {}
    for name, module in modules:
        adapter = adapter_for(module)
        weight = getattr(module, "weight", None)
        if adapter is None or not isinstance(weight, nn.Parameter) or owners[id(weight)] != 2:
            continue
        if not weight.requires_grad or adapter.check(module) or adapter.rejects(module):
            continue
        if isinstance(module, nn.Embedding):
            embeddings[id(weight)] = name
        elif not adapter.token_inputs:
            linears[id(weight)] = name
    return {key: (name, linears[key]) for key, name in embeddings.items() if key in linears}


def _automatic(module: nn.Module, shared: bool) -> tuple[str, str | None]:
    """``(policy, reason)``: "layer", "direct", "unsupported" or "rejected"."""
    adapter = adapter_for(module)
    if adapter is not None:
        refusal = adapter.rejects(module)
        if refusal is not None:
            return "rejected", refusal
        reason = adapter.check(module)
        if reason is None and not module.weight.requires_grad:
            reason = "its weight is frozen but its bias is trainable"
    elif norm_adapter_for(module) is not None:
        reason = None
    else:
        reason = "no natgrad adapter for this module type"
    if reason is None and shared:
        reason = "it shares a trainable parameter with another module"
    if reason is not None:
        return "unsupported", reason
    return ("layer" if adapter is not None else "direct"), None


def _checked_overrides(model: nn.Module, overrides: Mapping[str, str]) -> dict[str, str]:
    modules = dict(model.named_modules())
    for name, policy in overrides.items():
        if policy not in OVERRIDE_POLICIES:
            raise ValueError(
                f"unknown override {policy!r} for module {name!r}: choose one of "
                f"{OVERRIDE_POLICIES}"
            )
        if name not in modules:
            raise ValueError(
                f"overrides names {name!r}, which is not a module of the model (names as in "
                "model.named_modules(); '' is the model itself)"
            )
        if not any(p.requires_grad for p in modules[name].parameters(recurse=False)):
            raise ValueError(
                f"overrides names {name!r}, which has no trainable parameter of its own: "
                "overrides apply to a module's own parameters, so name its submodules"
            )
    return dict(overrides)


def _join(module_name: str, param_name: str) -> str:
    return f"{module_name}.{param_name}" if module_name else param_name


def _label(module_name: str) -> str:
    return module_name or "<root>"


__all__ = [
    "OVERRIDE_POLICIES",
    "UNSUPPORTED_POLICIES",
    "LayerSelection",
    "Override",
    "Unsupported",
    "register_adapter",
    "select_layers",
]
