"""Capture of the neuron view: per-layer inputs ``A`` and output gradients ``E``.

For a supported layer with weight matrix ``W`` (``d_out x d_in``, bias as an extra input column)
the gradient of datapoint ``n`` is ``sum_t e_{n,t} a_{n,t}^T``: ``t`` runs over the positions
that share the weight (the T tokens of a sequence, the output pixels of a convolution; ``T = 1``
for a plain dense layer). Everything natgrad computes starts from these rows (Benzing 2022, App. I;
Shrestha 2023, eq. 33-34), never from per-sample gradients.

Adapters (:mod:`natgrad.adapters`) turn a module's input and output gradient into rows:

* ``nn.Linear``: input ``(N, *, d_in)`` becomes ``A`` of shape ``(N, T, d_in)`` with ``T`` the
  product of the middle dimensions; the weight is shared over them.
* ``nn.Conv2d`` (``groups=1``, zero padding, any stride, dilation and padding): the input is
  unfolded into patches, ``A`` of shape ``(N, H' W', C_in k_h k_w)``, and the output gradient
  ``(N, C_out, H', W')`` becomes ``(N, H' W', C_out)``. The patches are formed only where the
  rows themselves are needed: weight gradients, per datapoint or summed, come from the
  captured input by the convolution's own weight-gradient kernel
  (:meth:`~natgrad.adapters.Conv2dAdapter.datapoint_weight_grads`).
* ``nn.Embedding``: a lookup is a linear layer on one-hot inputs, and ``E`` holds the output
  gradients ``(N, T, embedding_dim)``. The one-hot rows are never formed where they can be
  avoided: ``A`` is kept as the token indices ``(N, T)`` (``-1`` at ``padding_idx``, whose row
  torch never trains), from which the Woodbury blocks compute Grams and gradients by index
  (:class:`natgrad.precond.blocks.TokenBatch`), so the memory does not grow with the
  vocabulary; KFAC and FOOF keep the (diagonal) input factor of one-hot rows as the token
  frequencies, and they and FishLeg form the embedding's gradient by index.
  The weight matrix in the neuron view is ``(embedding_dim, num_embeddings)``, the transpose
  of ``Embedding.weight``; the adapter converts
  (:meth:`~natgrad.adapters.LayerAdapter.to_weight`).
* A linear layer that stores its weight transposed, ``(d_in, d_out)``
  (:class:`~natgrad.adapters.TransposedLinearAdapter`): HuggingFace's
  ``transformers.pytorch_utils.Conv1D`` (GPT-2's attention and MLP), recognised by its import
  path so that natgrad never imports transformers.

Adapters are looked up by the module's exact type (:func:`~natgrad.adapters.adapter_for`); a
user registers one for a module type of their own with :func:`natgrad.register_adapter`.

Normalisation layers and any other trainable tensor are not ``(A, E)`` pairs: see
:mod:`natgrad.direct` and :mod:`natgrad.fallback`, and :mod:`natgrad.selection` for which
module gets which treatment.

:class:`Capture` registers forward hooks that store each layer's input and output and a tensor
hook on each output that stores its gradient when the loss is back-propagated. A forward hook
on the model itself watches the model output (the logits) and reports its gradient to the
preconditioner, at the moment the backward pass reaches it, while the graph below is intact;
a pre-hook records the model's arguments (positional and keyword) for the passes that re-run
it (the torch.func fallback, FishLeg's Fisher-vector products).

Under ``torch.compile`` (pass the compiled module or the original; natgrad unwraps it) every
captured layer call splits the graph: the tensor hook that records the layer's output gradient
writes Python state, which dynamo cannot trace into a graph, and the split is also what makes
the layer output an autograd boundary that the hook can watch. The layers and the code between
them are compiled; the updates equal the eager ones (``tests/test_compile.py``).

The model may return the logits as a tensor or inside a structure: a ``dict`` or HuggingFace
``ModelOutput`` (its ``"logits"`` entry), or a tuple (its first non-scalar tensor that requires
a gradient; :func:`model_logits`).

Broadcast inputs: a captured module called on a batch of one while the model's batch has
``N > 1`` datapoints (GPT-2's and BERT's position embeddings, looked up with position ids of
shape ``(1, T)`` and added to every sequence) has its input and output expanded to ``N``
(views of the same values), so that the gradient reaching the output keeps one row per
datapoint instead of their sum. The model's batch size ``N`` is the largest first dimension
among the tensors passed to the model. This assumes the output is broadcast over the batch,
which is what a batch of one added to a batch of ``N`` means.

Several backward passes through one forward pass add up, as ``.grad`` does; extra datapoints
(sampled labels, Hessian columns) are back-propagated once, on the first. Those extra passes
also reach tensor hooks that other libraries placed on the model's activations: remove
natgrad's hooks (``pre.remove()``) before running another hook-based curvature tool on the
same model.

The hooks live on the model but hold only weak references to their :class:`Capture`, which
holds only a weak one to its preconditioner: a preconditioner that is deleted takes its hooks
with it (a finalizer removes them). A module can carry the hooks of one live capture at a
time; a second is refused, since each would record the other's extra backward passes. Forward
passes without gradients (``torch.no_grad()``, for logging or evaluation) are ignored.
"""

from __future__ import annotations

import gc
import inspect
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn


def model_logits(output: object) -> Tensor | None:
    """The logits in what a model returned: the tensor itself, the ``"logits"`` entry of a
    ``dict`` or HuggingFace ``ModelOutput``, else the first non-scalar floating-point tensor
    that requires a gradient among the entries of a mapping or a tuple (the first such tensor
    at all where none requires one, as inside ``torch.func`` transforms); ``None`` if none."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping):
        logits = output.get("logits")
        if isinstance(logits, Tensor):
            return logits
        output = tuple(output.values())
    if isinstance(output, (tuple, list)):
        candidates = [
            value
            for value in output
            if isinstance(value, Tensor) and value.dim() > 0 and value.is_floating_point()
        ]
        for value in candidates:
            if value.requires_grad:
                return value
        if candidates:  # inside torch.func transforms (the fallback, Fisher-vector products)
            return candidates[0]  # no tensor requires a gradient
    return None


def batch_size(args: tuple, kwargs: Mapping[str, object]) -> int | None:
    """The batch size of a model call: the largest first dimension of its tensor arguments."""
    sizes = [
        value.shape[0]
        for value in (*args, *kwargs.values())
        if isinstance(value, Tensor) and value.dim() > 0
    ]
    return max(sizes) if sizes else None


@dataclass
class LayerCall:
    """One call of a captured layer during the forward pass."""

    layer_input: Tensor
    output: Tensor
    output_grad: Tensor | None = None


class Capture:
    """Hooks that record, per layer call, the input, the output and the output's gradient.

    Parameters
    ----------
    model
        The model whose forward pass produces the logits.
    layers
        Modules to capture, by name.
    on_output_grad
        Called as ``on_output_grad(output, grad)`` when the backward pass reaches the model
        output, before it continues into the layers. The preconditioner uses it to
        back-propagate extra output vectors (sampled labels, Hessian square-root columns)
        through the intact graph with :meth:`backprop_to_layers`.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: dict[str, nn.Module],
        on_output_grad: Callable[[Tensor, Tensor], None],
    ) -> None:
        hooked = {"": model, **layers}
        for name, module in hooked.items():
            _check_not_captured(module, name)
        self.layers = layers
        self.calls: dict[str, list[LayerCall]] = {name: [] for name in layers}
        self.output: Tensor | None = None
        self.output_grad: Tensor | None = None
        self.model_args: tuple = ()
        self.model_kwargs: dict = {}
        self.batch_size: int | None = None
        self.returned: str | None = None
        """Type name of what the model's last forward pass returned (for error messages)."""
        # The hooks stay on the model, which outlives the preconditioner: they hold only weak
        # references to this capture and it only a weak one to its owner, so a preconditioner
        # that is deleted (or garbage-collected) takes its hooks with it.
        self._on_output_grad = (
            weakref.WeakMethod(on_output_grad)
            if inspect.ismethod(on_output_grad)
            else lambda: on_output_grad
        )
        self._in_forward = False
        self._nested = False
        self.layer_grads_given = False
        """Set while :meth:`natgrad.Preconditioner.backward` runs: it assigns every call's
        output gradient itself, so the layers' tensor hooks have nothing to record."""
        self._paused = False
        self._stepped: weakref.ref[Tensor] | None = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        this = weakref.ref(self)
        self._handles.append(
            model.register_forward_pre_hook(
                _forward_hook(this, model, "_start_forward"), with_kwargs=True
            )
        )
        for name, module in layers.items():
            self._handles.append(module.register_forward_hook(_layer_hook(this, module, name)))
        # registered last so that it runs after the layer hooks when the model is itself a layer
        end_forward = _forward_hook(this, model, "_end_forward")
        self._handles.append(model.register_forward_hook(end_forward))
        weakref.finalize(self, _remove_handles, self._handles)
        for module in hooked.values():
            _CAPTURED[module] = this

    @property
    def owner(self) -> object | None:
        """The object whose ``on_output_grad`` this capture calls, if it is alive."""
        method = self._on_output_grad()
        return getattr(method, "__self__", None)

    @property
    def active(self) -> bool:
        """Whether the hooks are still on the model."""
        return bool(self._handles)

    def remove(self) -> None:
        """Remove every hook; the model is left as it was."""
        _remove_handles(self._handles)
        self.clear()

    def consumed(self, output: Tensor) -> bool:
        """Whether ``output`` is the model output of the last :meth:`clear` (a finished step)."""
        return self._stepped is not None and self._stepped() is output

    def clear(self) -> None:
        """Forget the recorded tensors (frees the activations they hold)."""
        self.drop_calls()
        if self.output is not None:
            self._stepped = weakref.ref(self.output)
        self.output = None
        self.output_grad = None
        self.model_args = ()
        self.model_kwargs = {}
        self.batch_size = None
        self.returned = None

    def drop_calls(self) -> None:
        """Forget the recorded layer calls but keep the model output, its gradient and the
        model's arguments: the tensors of the calls that nothing else holds (layer outputs, a
        normalisation layer's input and output gradient once its rows are formed) are freed."""
        for calls in self.calls.values():
            calls.clear()

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Ignore forward passes inside the block (natgrad's own extra passes)."""
        previous, self._paused = self._paused, True
        try:
            yield
        finally:
            self._paused = previous

    def _start_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        # a pass without gradients (logging, evaluation) has nothing to precondition: it
        # leaves the recorded pass in place
        if self._paused or not torch.is_grad_enabled():
            return
        self.clear()
        self.model_args = args
        self.model_kwargs = kwargs
        self.batch_size = batch_size(args, kwargs)
        self._in_forward = True

    def _end_forward(self, module: nn.Module, args: tuple, output: object) -> None:
        if self._paused or not torch.is_grad_enabled():
            return
        self._in_forward = False
        self.returned = type(output).__name__
        output = model_logits(output)
        if not (isinstance(output, Tensor) and output.requires_grad):
            return
        self.output = output
        # The hook lives on the tensor; a strong reference back to the tensor would make a
        # cycle through autograd that Python's garbage collector cannot see (a leak per step).
        output_ref = weakref.ref(output)
        this = weakref.ref(self)

        def output_hook(grad: Tensor) -> None:
            capture, watched = this(), output_ref()
            if capture is None or capture._nested or watched is None:
                return
            if watched is not capture.output:
                return
            grad = grad.detach() if grad.requires_grad else grad  # create_graph=True only
            if capture.output_grad is not None:  # a further backward pass: gradients add up
                capture.output_grad = capture.output_grad + grad
                return
            capture.output_grad = grad
            on_output_grad = capture._on_output_grad()
            if on_output_grad is not None:
                on_output_grad(watched, grad)

        output.register_hook(output_hook)

    def _record_layer_call(self, name: str, args: tuple, output: Tensor) -> Tensor | None:
        """Record one call of a captured layer; return the output expanded to the model's
        batch when the layer saw a batch of one (the forward hook's replacement output)."""
        if self._paused or not (
            self._in_forward and torch.is_grad_enabled() and output.requires_grad
        ):
            return None
        layer_input = args[0].detach() if args[0].requires_grad else args[0]
        size = self.batch_size
        # a batch of one looked up from indices (position ids) and broadcast over the batch; an
        # input that requires a gradient (a learned query) is the model's own computation
        broadcast = (
            layer_input.shape[0] == 1
            and size is not None
            and size > 1
            and not args[0].requires_grad
        )
        if broadcast:  # one row for the whole batch: give each datapoint its own view
            layer_input = layer_input.expand(size, *layer_input.shape[1:])
            output = output.expand(size, *output.shape[1:])
        call = LayerCall(layer_input=layer_input, output=output)
        self.calls[name].append(call)
        call_ref = weakref.ref(call)  # no cycle tensor -> hook -> call -> tensor
        this = weakref.ref(self)

        def grad_hook(grad: Tensor) -> None:
            capture, recorded = this(), call_ref()
            if capture is None or capture._nested or capture.layer_grads_given or recorded is None:
                return
            grad = grad.detach() if grad.requires_grad else grad  # create_graph=True only
            previous = recorded.output_grad
            recorded.output_grad = grad if previous is None else previous + grad

        output.register_hook(grad_hook)
        return output if broadcast else None

    def layer_outputs(self) -> Iterator[Tensor]:
        """Every captured layer call's output, in layer order then call order."""
        for calls in self.calls.values():
            for call in calls:
                yield call.output

    def backprop_to_layers(self, vectors: Tensor) -> dict[str, list[Tensor | None]]:
        """Back-propagate a batch of output vectors to every captured layer output.

        Parameters
        ----------
        vectors
            Shape ``(K, *output.shape)``: ``K`` gradients w.r.t. the model output.

        Returns
        -------
        For each layer, one tensor per call of shape ``(K, *call_output.shape)`` (``None``
        where the layer does not influence the output). The graph is retained, so the
        surrounding backward pass continues unharmed.
        """
        if self.output is None:
            raise RuntimeError("no model output was captured: run a forward pass first")
        outputs = list(self.layer_outputs())
        if not outputs:  # no layer ran (e.g. only fallback tensors are trained)
            return {name: [] for name in self.calls}

        def one_by_one() -> tuple[Tensor | None, ...]:
            per_vector = [
                torch.autograd.grad(
                    self.output, outputs, grad_outputs=v, retain_graph=True, allow_unused=True
                )
                for v in vectors
            ]
            return tuple(
                None if per_vector[0][i] is None else torch.stack([g[i] for g in per_vector])
                for i in range(len(outputs))
            )

        self._nested = True
        try:
            if vectors.shape[0] == 1:
                grads = one_by_one()
            else:
                try:
                    grads = torch.autograd.grad(
                        self.output,
                        outputs,
                        grad_outputs=vectors,
                        retain_graph=True,
                        allow_unused=True,
                        is_grads_batched=True,
                    )
                except RuntimeError:
                    grads = one_by_one()  # some operation has no batching rule
        finally:
            self._nested = False
        result: dict[str, list[Tensor | None]] = {}
        position = 0
        for name, calls in self.calls.items():
            result[name] = [
                None if g is None else g.detach() for g in grads[position : position + len(calls)]
            ]
            position += len(calls)
        return result


_COMPILED_FRAMES = {"seen": 0}


def forget_compiled_code() -> bool:
    """Clear ``torch.compile``'s caches if it compiled code since the last call; return whether.

    ``torch.compile`` does not check hooks added after it compiled a module's code
    (``torch._dynamo.config.skip_nnmodule_hook_guards``), and it reuses code compiled for one
    module for every module of the same class: a model compiled before natgrad's hooks existed,
    or a twin of it, would run without them. Clearing the caches makes the next compiled call
    trace the hooks; other compiled models recompile once.
    """
    try:
        from torch._dynamo.utils import counters
    except ImportError:  # a torch without dynamo
        return False
    compiled = counters["frames"].get("ok", 0)
    if compiled <= _COMPILED_FRAMES["seen"]:
        return False
    torch.compiler.reset()
    _COMPILED_FRAMES["seen"] = compiled
    return True


def compiled_hint() -> str:
    """A sentence for errors about missing captures, when ``torch.compile`` ran in this process.

    Code compiled for a module of the same class before natgrad's hooks existed, or for a
    hook-free twin compiled after the preconditioner was built, runs without the hooks.
    """
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return ""
    if counters["frames"].get("ok", 0) == 0:
        return ""
    return (
        ". If the model is compiled: torch.compile may have reused code it compiled without "
        "natgrad's hooks (for a model of the same class; it does not check hooks added later): "
        "call torch.compiler.reset() after building the preconditioner and before the first "
        "compiled call"
    )


# Every module carrying a live capture's hooks, to refuse a second preconditioner on it.
_CAPTURED: weakref.WeakKeyDictionary[nn.Module, weakref.ref[Capture]] = weakref.WeakKeyDictionary()


def _forward_hook(capture: weakref.ref[Capture], model: nn.Module, method: str) -> Callable:
    """A hook of ``model`` that calls ``capture.<method>`` while the capture is alive.

    The hook ignores any other module: ``copy.deepcopy(model)`` copies the hook dictionaries,
    and the copy's hooks must not record into this capture.
    """
    hooked = weakref.ref(model)

    def hook(module: nn.Module, *args: object) -> None:
        target = capture()
        if target is not None and module is hooked():
            getattr(target, method)(module, *args)

    return hook


def _layer_hook(capture: weakref.ref[Capture], layer: nn.Module, name: str) -> Callable:
    """A layer's forward hook that records the call while the capture is alive (and only
    for this layer, not a deep copy of it)."""
    hooked = weakref.ref(layer)

    def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
        target = capture()
        if target is not None and module is hooked():
            return target._record_layer_call(name, args, output)
        return None

    return hook


def _remove_handles(handles: list[torch.utils.hooks.RemovableHandle]) -> None:
    for handle in handles:
        handle.remove()
    handles.clear()


def _check_not_captured(module: nn.Module, name: str) -> None:
    """Raise if ``module`` carries the hooks of another live preconditioner.

    Two preconditioners on one model would each record the other's extra backward passes
    (sampled labels, Hessian columns) as loss gradients and diagnose a wrong loss.
    """
    existing = _CAPTURED.get(module)
    capture = existing() if existing is not None else None
    if capture is not None and capture.active and capture.owner is not None:
        gc.collect()  # an owner deleted by the user but held in a reference cycle goes now
        capture = existing()
    if capture is None or not capture.active or capture.owner is None:
        return
    owner = capture.owner
    where = "the model" if name == "" else f"its module '{name}'"
    description = owner.describe() if hasattr(owner, "describe") else repr(owner)
    raise RuntimeError(
        f"{where} already has a live natgrad preconditioner, {description}: two "
        "preconditioners on one model would see each other's backward passes. Call "
        f"remove() on the existing {type(owner).__name__} (or delete every reference to it) "
        "before building another one"
    )


__all__ = [
    "Capture",
    "LayerCall",
    "batch_size",
    "compiled_hint",
    "forget_compiled_code",
    "model_logits",
]
