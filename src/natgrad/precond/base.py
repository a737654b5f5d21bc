"""Shared machinery of natgrad's preconditioners: capture, checks, fused backward, state.

A preconditioner is used between the backward pass and any ``torch.optim`` step::

    logits = model(x)
    loss = F.cross_entropy(logits, y)
    loss.backward()           # or pre.backward(loss): the fused, cheaper path
    pre.step(logits)          # rewrites p.grad with the preconditioned direction
    opt.step()

``step`` writes ``p.grad = (C + λI)^{-1} ∇L``-like directions with the sign of a gradient, so a
plain SGD step with learning rate η applies the papers' equations' ``θ ← θ - η Δ``.

Conventions
-----------
* The logits are the tensor the model's forward returns (or its ``"logits"`` entry:
  :func:`natgrad.capture.model_logits`), of shape ``(N, C)``, or ``(N, T, C)`` for token-level
  categorical losses (:mod:`natgrad.likelihoods`); natgrad reads its gradient during the
  backward pass, so the same tensor must be passed to ``step``.
* The loss is ``c * sum_n l_n`` with ``l_n`` the likelihood's per-datapoint loss and ``c`` the
  reduction factor (``reduction="mean"`` as torch's default, or ``"sum"``). The curvature is
  that of this loss, ``C = c * sum(datapoint outer products)``, so with a mean-reduced loss the
  damping acts on the curvature of the mean loss (the papers' sum-loss equations with damping
  ``λ / c``).
* One forward pass and one backward pass per step: a new forward pass forgets the previous one.

Data parallelism (``distributed=``, ``process_group=``) is described in
:mod:`natgrad.distributed`: the base class agrees with the other ranks before each step, lets
a subclass exchange rows before its solve (:meth:`Preconditioner._exchange`) and averages
directions after it (:meth:`Preconditioner._directions_to_average`).

Which parameters are preconditioned, and through which per-sample structure, is decided by
:func:`natgrad.selection.select_layers` (``unsupported`` and ``overrides``). Subclasses that
solve with materialised per-sample rows (``per_sample_blocks = True``: the Woodbury family)
receive :class:`~natgrad.precond.blocks.DirectBatch` blocks for normalisation layers and
fallback tensors; the others leave those parameters to the plain gradient.
"""

from __future__ import annotations

import difflib
import inspect
import math
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from natgrad.adapters import adapter_for
from natgrad.capture import Capture, compiled_hint, forget_compiled_code
from natgrad.direct import norm_adapter_for
from natgrad.distributed import (
    Communicator,
    DistributedMode,
    check_fused_backward,
    step_seed,
    unwrap,
)
from natgrad.fallback import DEFAULT_CHUNK_SIZE, Fallback
from natgrad.likelihoods import (
    Likelihood,
    LikelihoodName,
    Reduction,
    check_logits,
    check_reduction,
    get_likelihood,
)
from natgrad.linalg import SolveReport
from natgrad.precond.blocks import Block, DirectBatch, LayerBatch, TokenBatch, tied_batches
from natgrad.precond.checks import (
    Damping,
    at_least_float32,
    check_count,
    check_damping,
    check_not_broadcast,
    check_not_meta,
    loss_scale,
)
from natgrad.selection import Override, Unsupported, select_layers

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

class NonFiniteWarning(RuntimeWarning):
    """A step was skipped because the loss gradient or the captured rows were not finite."""


class Preconditioner:
    """Base class: hooks, input checks, the fused backward path and ``state_dict``.

    Every preconditioner takes the model, then keyword-only options: its own, and these
    shared ones, declared here once (subclasses pass them on as ``**options``).

    Parameters
    ----------
    model
        The model; its forward pass must return the logits ``(N, C)``. A
        ``DistributedDataParallel`` wrapper is unwrapped.
    damping
        ``λ > 0``, or a callable ``step -> λ`` (:data:`Damping`), evaluated at every step that
        uses it.
    likelihood
        ``"categorical"`` (``F.cross_entropy``, default), ``"gaussian"`` (``F.mse_loss``),
        ``"bernoulli"`` (``F.binary_cross_entropy_with_logits``) or a
        :class:`natgrad.likelihoods.Likelihood`.
    reduction
        ``"mean"`` (default) or ``"sum"``: the reduction of the loss (module docstring for how
        it scales the curvature).
    unsupported
        ``"fallback"`` (default: exact per-sample gradients by torch.func), ``"error"`` or
        ``"plain_gradient"`` for trainable modules natgrad has no adapter for
        (:func:`natgrad.selection.select_layers`).
    overrides
        ``{module_name: "fallback" | "plain_gradient"}``: per-module choice instead of the
        automatic one.
    seed
        Seed of the generator that samples labels (saved in :meth:`state_dict`).
    distributed
        ``"auto"`` (default: ``"global"`` if ``torch.distributed`` is initialised, else
        ``"off"``), ``"off"``, ``"global"`` or ``"local"`` (where the method supports it); see
        :mod:`natgrad.distributed`.
    process_group
        The ``torch.distributed`` group of the data-parallel ranks (default: the whole world).
    fallback_chunk_size
        Datapoints the torch.func fallback re-runs at a time (default 32; ``None``: the whole
        batch at once), which bounds the fallback's activation memory (:mod:`natgrad.fallback`).
        Only methods with ``per_sample_blocks`` (the Woodbury family) precondition fallback
        tensors; the others leave them to the plain gradient and ignore it.

    Notes
    -----
    Subclasses implement :meth:`_precondition` and, if their datapoints need extra
    back-propagated output vectors, :meth:`_extra_output_vectors`. With
    ``per_sample_blocks = True`` they also receive normalisation layers and fallback tensors as
    :class:`~natgrad.precond.blocks.DirectBatch` blocks; otherwise those parameters keep the
    plain gradient.
    """

    per_sample_blocks: bool = False
    gathers_rows: bool = False
    """Whether ``"global"`` mode all-gathers every rank's rows before :meth:`_precondition`
    (the Woodbury family solves the global batch's system on every rank)."""
    distributed_modes: tuple[str, ...] = ("global",)
    """The active ``distributed`` modes of the method, the first being what ``"auto"`` picks."""

    def __init__(
        self,
        model: nn.Module,
        *,
        damping: Damping = 1e-3,
        likelihood: LikelihoodName | Likelihood = "categorical",
        reduction: Reduction = "mean",
        unsupported: Unsupported = "fallback",
        overrides: Mapping[str, Override] | None = None,
        seed: int = 0,
        distributed: DistributedMode = "auto",
        process_group: ProcessGroup | None = None,
        fallback_chunk_size: int | None = DEFAULT_CHUNK_SIZE,
        **unknown: object,
    ) -> None:
        if unknown:
            raise TypeError(self._unknown_options_message(sorted(unknown)))
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        check_not_meta(model)
        # a DistributedDataParallel wrapper: the capture hooks its forward pass, everything
        # else (selection, parameter names, functional calls) uses the wrapped module
        self.wrapper = model
        self.model = model = unwrap(model)
        self.likelihood = get_likelihood(likelihood)
        if self.likelihood.datapoint == "token" and not self.per_sample_blocks:
            raise ValueError(
                f"{type(self).__name__} takes sequences as datapoints: per-token datapoints "
                "(datapoint='token') are offered by the Woodbury methods (natgrad.NGD, EF, IEF)"
            )
        self.reduction = check_reduction(reduction)
        # a likelihood of one's own may override check_output_grad without the newer `factor`
        self._check_takes_factor = (
            "factor" in inspect.signature(self.likelihood.check_output_grad).parameters
        )
        self.damping = damping if callable(damping) else check_damping(damping)
        selection = select_layers(model, unsupported, overrides)
        self.selection = (
            selection if self.per_sample_blocks else selection.without_per_sample_blocks()
        )
        self.adapters = {name: adapter_for(m) for name, m in self.selection.layers.items()}
        self.norm_adapters = {
            name: norm_adapter_for(m) for name, m in self.selection.direct.items()
        }
        if fallback_chunk_size is not None:
            check_count(fallback_chunk_size, "fallback_chunk_size")
        self.fallback = (
            Fallback(model, self.selection.fallback, fallback_chunk_size)
            if self.selection.fallback
            else None
        )
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)
        self.steps = 0
        self.skipped_steps = 0
        self.last_solve: SolveReport | None = None
        self._extra_vectors: Tensor | None = None
        self._extra_grads: dict[str, list[Tensor | None]] | None = None
        self._grad_buffers: dict[str, Tensor] = {}
        self._order = {name: index for index, name in enumerate(self.selection.order)}
        self.capture = Capture(
            self.wrapper, {**self.selection.layers, **self.selection.direct}, self._on_output_grad
        )
        if forget_compiled_code():
            warnings.warn(
                "torch.compile had compiled code in this process before natgrad's hooks existed "
                "and would reuse it without them (it does not check hooks added later), so "
                "natgrad cleared its caches (torch.compiler.reset()): compiled models recompile "
                "at their next call. Build preconditioners before the first compiled call to "
                "avoid the recompilation.",
                stacklevel=3,
            )
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.communicator = Communicator(
            distributed,
            process_group,
            self.distributed_modes,
            type(self).__name__,
            trainable[0].device if trainable else None,
        )
        if self.communicator.active:
            self.communicator.check_replicas(self.describe(), trainable)

    @classmethod
    def _unknown_options_message(cls, names: list[str]) -> str:
        """The error for misspelt options: it names the method (not this base class), the
        closest option, and every option the method takes."""
        options = {
            name
            for klass in cls.__mro__
            if "__init__" in vars(klass)
            for name, parameter in inspect.signature(klass.__init__).parameters.items()
            if parameter.kind is inspect.Parameter.KEYWORD_ONLY
        }
        hints = []
        for name in names:
            close = difflib.get_close_matches(name, options, n=1)
            hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        return (
            f"{cls.__name__}() got unexpected keyword arguments {', '.join(hints)}; its options "
            f"are {', '.join(sorted(options))}"
        )

    # ------------------------------------------------------------------ hooks

    def _extra_output_vectors(self, logits: Tensor) -> Tensor | None:
        """Output vectors ``(K, N, C)`` to back-propagate this step, or ``None``."""
        return None

    def _on_output_grad(self, output: Tensor, grad: Tensor) -> None:
        self._extra_grads = None
        self._extra_vectors = None
        if output.is_meta:
            return  # step() says why nothing can be computed on the meta device
        if not bool(torch.isfinite(output.detach().sum())):
            return  # step() skips this batch; no labels can be sampled from NaN logits
        if self.communicator.active:  # per rank and step, so any rank's state_dict resumes
            self.generator.manual_seed(step_seed(self.seed, self.communicator.rank, self.steps))
        vectors = self._extra_output_vectors(at_least_float32(output.detach()))
        if vectors is not None:
            counted = self.likelihood.counted(output.detach(), grad)
            if counted is not None:  # positions outside the loss (label -100) have no datapoint
                vectors = vectors * counted.unsqueeze(-1).to(vectors.dtype)
            self._extra_vectors = vectors
            self._extra_grads = self.capture.backprop_to_layers(vectors.to(output.dtype))

    # ------------------------------------------------------------------ public API
    def current_damping(self) -> float:
        """The damping of the current step (a callable damping is evaluated at ``steps``)."""
        if callable(self.damping):
            return check_damping(self.damping(self.steps), "damping(step)")
        return self.damping

    def backward(self, loss: Tensor) -> None:
        """Back-propagate ``loss`` only as far as the captured layers' outputs (fused path).

        Replaces ``loss.backward()``: autograd computes the layer-output gradients and the
        plain gradients of parameters natgrad does not precondition, but not the weight
        gradients of captured layers, which :meth:`step` then writes directly as one product
        ``E^T diag(u) A`` per layer. This saves one weight-sized matrix product per layer.
        """
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            raise ValueError("backward() needs the scalar loss tensor")
        check_fused_backward(self.wrapper)
        if self.capture.output is None:
            raise RuntimeError(
                "backward() found no captured forward pass: call model(x) with gradients "
                "enabled before computing the loss" + compiled_hint()
            )
        check_not_broadcast(loss, self.capture.output)
        outputs = list(self.capture.layer_outputs())
        plain = list(self.selection.plain.values())
        # the model output is a target too, so that the backward pass reaches it (and natgrad
        # reads its gradient) even when only fallback tensors are preconditioned
        targets = [*outputs, *plain, self.capture.output]
        self.capture.layer_grads_given = True  # assigned below, not by the layers' hooks
        try:
            grads = torch.autograd.grad(loss, targets, allow_unused=True)
        finally:
            self.capture.layer_grads_given = False
        calls = [call for calls in self.capture.calls.values() for call in calls]
        for call, grad in zip(calls, grads[: len(outputs)], strict=True):
            call.output_grad = grad  # no graph (create_graph=False): nothing to detach
        for name, module in self.selection.layers.items():
            layer_calls = self.capture.calls[name]
            if not layer_calls or any(call.output_grad is None for call in layer_calls):
                continue  # not in the loss: step() leaves its .grad as loss.backward() would
            # step() writes the direction into these buffers, reused from step to step
            bias = module.bias if self.adapters[name].has_bias(module) else None
            for key, param in ((name, module.weight), (f"{name}.bias", bias)):
                if param is None or not param.requires_grad or param.grad is not None:
                    continue
                buffer = self._grad_buffers.get(key)
                if buffer is None or buffer.shape != param.shape or buffer.dtype != param.dtype:
                    buffer = self._grad_buffers[key] = torch.empty_like(param)
                param.grad = buffer
        for param, grad in zip(plain, grads[len(outputs) : len(outputs) + len(plain)], strict=True):
            if grad is None:
                continue
            param.grad = grad.detach() if param.grad is None else param.grad + grad

    def step(self, logits: Tensor, grad_scaler: torch.amp.GradScaler | None = None) -> None:
        """Replace the captured layers' ``.grad`` with the preconditioned direction.

        Parameters
        ----------
        logits
            The tensor the model's forward pass returned, after ``loss.backward()`` (or
            :meth:`backward`) on a loss computed from it.
        grad_scaler
            The ``torch.amp.GradScaler`` whose ``scale(loss)`` was back-propagated. natgrad
            divides what it captured by the scale, so its curvature is that of the loss, and
            writes the directions multiplied by the scale, in the units of the other
            gradients, for ``grad_scaler.step(optimizer)`` to unscale (call
            ``grad_scaler.unscale_(optimizer)`` after this step, not before). A step whose
            scaled gradients overflowed leaves the curvature state alone and writes Inf into
            the preconditioned gradients, so that ``grad_scaler.step`` skips it and lowers the
            scale.
        """
        self.communicator.check_mode()
        output_grad = self._checked_output_grad(logits)
        scale = loss_scale(grad_scaler)
        if scale != 1.0 and getattr(self.likelihood, "datapoint", "sequence") == "token":
            raise NotImplementedError(
                "a GradScaler with per-token datapoints (Categorical(datapoint='token')) is not "
                "supported yet: their rows are built during the backward pass, before the scale "
                "is known. Use datapoint='sequence' (the default) with the scaler, or per-token "
                "datapoints without it"
            )
        counted = self.likelihood.counted(logits, output_grad)
        factor = self.likelihood.reduction_factor(
            logits, self.reduction, *(() if counted is None else (counted,))
        )
        batches = self._layer_batches(logits.shape[0], factor * scale)
        # the blocks hold what the step reads: the layer outputs, and what only the rows of
        # normalisation layers needed, are freed before the step allocates its own tensors
        # (less memory at the peak, fewer fresh pages for the allocator to fault in)
        self.capture.drop_calls()
        self._extra_grads = None
        values = logits.detach()
        try:
            finite = self._all_finite([values, output_grad], batches)
            finite, plain = self._agree(finite, batches)
            if not finite and scale != 1.0:
                self._leave_overflow_to_scaler()
                return
            if not finite:
                self._skip_step(
                    "the logits, the loss gradient or the captured layer rows contain NaN/Inf"
                    + (" (on some rank)" if self.communicator.active else "")
                )
                return
            self.likelihood.check_output_grad(
                logits, output_grad if scale == 1.0 else output_grad / scale, self.reduction,
                counted=counted, **({"factor": factor} if self._check_takes_factor else {}),
            )  # fmt: skip
            # the captured gradient has no graph (autograd's, detached by the capture)
            per_sample_output_grad = at_least_float32(output_grad) / (factor * scale)
            batches += self._fallback_batches(values, per_sample_output_grad)
            if not batches:
                raise RuntimeError(
                    "no captured layer received a gradient: call loss.backward() on a loss that "
                    "depends on the model's layers before step()" + compiled_hint()
                )
            batches.sort(key=lambda batch: self._order[batch.name])
            failure = None
            try:
                self._precondition(*self._exchange(batches, factor, per_sample_output_grad))
            except FloatingPointError as error:
                failure = str(error)
            failure = self._synchronise(plain + self._directions_to_average(batches), failure)
            if failure is not None:
                self._skip_step(failure)
                return
            if scale != 1.0:  # back into the units of the scaled gradients
                for batch in batches:
                    for param in batch.parameters():
                        param.grad.mul_(scale)
            self.steps += 1
        finally:
            self.capture.clear()
            self._extra_grads = None
            self._extra_vectors = None

    def describe(self) -> str:
        """A one-line summary: method, settings and which modules are preconditioned."""
        summary = f"{type(self).__name__}({self._settings()}): {self.selection.describe()}"
        if self.communicator.active:
            summary += (
                f"; distributed: {self.communicator.mode} over {self.communicator.world_size} ranks"
            )
        return summary

    def remove(self) -> None:
        """Remove natgrad's hooks from the model."""
        self.capture.remove()

    def state_dict(self) -> dict[str, Any]:
        """Step counters, the sampling RNG state and (non-callable) hyper-parameters."""
        state: dict[str, Any] = {
            "steps": self.steps,
            "skipped_steps": self.skipped_steps,
            "seed": self.seed,
            "generator": self.generator.get_state(),
        }
        if not callable(self.damping):
            state["damping"] = self.damping
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved; the next step continues identically."""
        self.steps = int(state["steps"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.seed = int(state.get("seed", self.seed))
        self.generator.set_state(state["generator"])
        if "damping" in state:
            self.damping = check_damping(state["damping"])

    # ------------------------------------------------------------------ subclass hooks
    def _precondition(
        self, batches: list[Block], factor: float | Tensor, per_sample_output_grad: Tensor
    ) -> None:
        """Write the preconditioned direction of every block into ``.grad``.

        ``batches`` holds :class:`~natgrad.precond.blocks.LayerBatch` blocks and, if
        ``per_sample_blocks``, :class:`~natgrad.precond.blocks.DirectBatch` blocks, in model
        order. ``factor`` is the reduction factor ``c`` of the loss, or per-datapoint weights
        ``(N,)`` when :meth:`_exchange` returns them.
        """
        raise NotImplementedError

    def _exchange(
        self, batches: list[Block], factor: float, per_sample_output_grad: Tensor
    ) -> tuple[list[Block], float | Tensor, Tensor]:
        """The arguments of :meth:`_precondition`: in ``"global"`` mode, for a subclass that
        sets :attr:`gathers_rows`, the rows of the global batch (:meth:`Communicator.gather`);
        otherwise this rank's own."""
        if self.gathers_rows and self.communicator.mode == "global":
            return self.communicator.gather(batches, factor, per_sample_output_grad)
        return batches, factor, per_sample_output_grad

    def _directions_to_average(self, batches: list[Block]) -> list[nn.Parameter]:
        """Parameters whose written direction is per rank, averaged over the ranks after
        :meth:`_precondition` (with the plain gradients); none by default, where the direction
        is already the same on every rank."""
        return []

    def _settings(self) -> str:
        return f"likelihood={self.likelihood.name}, damping={self.damping}"

    # ------------------------------------------------------------------ internals
    def _agree(self, finite: bool, batches: list[Block]) -> tuple[bool, list[nn.Parameter]]:
        """Whether the step is finite on every rank, and the plain parameters to average
        after it (those with a gradient on some rank; all of them without communication)."""
        plain = list(self.selection.plain.values())
        if not self.communicator.active:  # nothing to agree on: the plain gradients there are
            return finite, [param for param in plain if param.grad is not None]
        present = {batch.name for batch in batches}
        finite, used = self.communicator.agree(
            finite,
            {name: name in present for name in [*self.selection.layers, *self.selection.direct]},
            [param.grad is not None for param in plain],
        )
        return finite, [param for param, flag in zip(plain, used, strict=True) if flag]

    def _synchronise(self, params: list[nn.Parameter], failure: str | None) -> str | None:
        """Average ``.grad`` of ``params`` over the ranks (a missing one counts as zero) and
        agree on whether the step failed anywhere; returns the failure, if any."""
        if not self.communicator.active:
            return failure
        for param in params:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
        grads = [param.grad for param in params]
        if not self.communicator.average_(grads, "directions", ok=failure is None):
            return failure or "the solve failed on another rank"
        return None

    def _checked_output_grad(self, logits: Tensor) -> Tensor:
        check_logits(logits)
        if logits.is_meta:
            check_not_meta(self.model)
            raise ValueError(
                "the logits are on the meta device (shapes without values): natgrad computes "
                "with the values, so run the model on a real device"
            )
        if self.capture.output is None:
            if self.capture.consumed(logits):
                raise RuntimeError(
                    "step() was already called for these logits: natgrad forgets a forward "
                    "pass once it has preconditioned its gradients, so each step() needs a new "
                    "logits = model(x) and loss.backward()"
                )
            raise RuntimeError(
                "step() found no captured forward pass: call logits = model(x) with gradients "
                "enabled, then loss.backward(), then pre.step(logits)" + compiled_hint()
            )
        if logits is not self.capture.output and not logits.requires_grad:
            raise ValueError(
                "the logits passed to step() were computed without gradients (under "
                "torch.no_grad() or torch.inference_mode(), or detached): pass the logits of "
                "the forward pass whose loss you back-propagated; a forward pass without "
                "gradients (e.g. for logging) may run at any time and is ignored"
            )
        if logits is not self.capture.output:
            raise ValueError(
                "the logits passed to step() are not the tensor returned by the model's last "
                "forward pass: natgrad reads the gradient of that tensor, so pass it unchanged "
                "and compute the loss from it"
                + (
                    ""
                    if self.capture.returned == "Tensor"
                    else f" (the model returned a {self.capture.returned}: natgrad watches its "
                    "'logits' entry, or the first non-scalar tensor of a tuple)"
                )
            )
        if self.capture.output_grad is None:
            raise RuntimeError(
                "step() was called before a backward pass reached these logits: call "
                "loss.backward() (or pre.backward(loss)) on a loss computed from these logits"
            )
        return self.capture.output_grad

    def _layer_batches(self, num_datapoints: int, factor: float) -> list[Block]:
        """Blocks of the captured modules (neuron-view layers and normalisation layers)."""
        batches: list[Block] = []
        for name, module in self.selection.layers.items():
            calls = self.capture.calls[name]
            if not calls or any(call.output_grad is None for call in calls):
                continue  # the layer did not take part in this loss: its .grad stays as is
            adapter = self.adapters[name]
            layer_inputs = []
            for call in calls:
                adapter.check_input(module, call.layer_input)
                layer_inputs.append(at_least_float32(call.layer_input))
            if len(calls) == 1:  # the usual case: nothing to concatenate
                loss_grads = at_least_float32(adapter.output_rows(module, calls[0].output_grad, 0))
            else:
                rows = [adapter.output_rows(module, c.output_grad, 0) for c in calls]
                loss_grads = torch.cat([at_least_float32(r) for r in rows], dim=1)
            wrong = loss_grads.shape[0] if loss_grads.shape[0] != num_datapoints else None
            for x in layer_inputs:
                if x.shape[0] != num_datapoints:
                    wrong = x.shape[0]
                    break
            if wrong is not None:
                raise ValueError(
                    f"layer '{name}' saw a batch of {wrong} rows but the logits have "
                    f"{num_datapoints}: natgrad needs the batch dimension first and unchanged "
                    "through the model"
                )
            extra = None
            if self._extra_grads is not None:
                parts = self._extra_grads[name]
                if any(part is None for part in parts):
                    continue
                extra = _concat(
                    [at_least_float32(adapter.output_rows(module, p, lead=1)) for p in parts], dim=2
                )
            batch_class = TokenBatch if adapter.token_inputs else LayerBatch
            batches.append(
                batch_class(
                    name=name,
                    module=module,
                    adapter=adapter,
                    layer_inputs=layer_inputs,
                    loss_output_grads=loss_grads.unsqueeze(0),
                    extra_grads=extra,
                    has_bias=adapter.has_bias(module),
                    loss_factor=factor,
                )
            )
        for name, module in self.selection.direct.items():
            batch = self._norm_batch(name, module, num_datapoints, factor)
            if batch is not None:
                batches.append(batch)
        for embedding, linear in self.selection.tied.items():  # one block per shared weight
            pair = {b.name: b for b in batches if b.name in (embedding, linear)}
            if len(pair) == 2:
                batches = [b for b in batches if b.name not in pair]
                batches += tied_batches(pair[embedding], pair[linear])
        return batches

    def _norm_batch(
        self, name: str, module: nn.Module, num_datapoints: int, factor: float
    ) -> DirectBatch | None:
        """Per-sample rows of a normalisation layer, summed over its calls (``None`` if it did
        not take part in the loss)."""
        calls = self.capture.calls[name]
        if not calls or any(call.output_grad is None for call in calls):
            return None
        adapter = self.norm_adapters[name]
        if calls[0].layer_input.shape[0] != num_datapoints:
            raise ValueError(
                f"layer '{name}' saw a batch of {calls[0].layer_input.shape[0]} rows but the "
                f"logits have {num_datapoints}: natgrad needs the batch dimension first and "
                "unchanged through the model"
            )
        loss_rows = sum(
            adapter.per_sample_rows(
                module, at_least_float32(c.layer_input), at_least_float32(c.output_grad)[None]
            )
            for c in calls
        )
        extra = None
        if self._extra_grads is not None:
            parts = self._extra_grads[name]
            if any(part is None for part in parts):
                return None
            extra = sum(
                adapter.per_sample_rows(
                    module, at_least_float32(c.layer_input), at_least_float32(part)
                )
                for c, part in zip(calls, parts, strict=True)
            )
        params = [p for p in module.parameters(recurse=False) if p.requires_grad]
        return DirectBatch(name, params, loss_rows / factor, extra)

    def _fallback_batches(self, logits: Tensor, per_sample_output_grad: Tensor) -> list[Block]:
        """Per-sample rows of the fallback tensors by torch.func (:mod:`natgrad.fallback`)."""
        if self.fallback is None:
            return []
        vectors = per_sample_output_grad.unsqueeze(0)
        if self._extra_vectors is not None:
            vectors = torch.cat([vectors, self._extra_vectors])
        with self.capture.paused():
            rows = self.fallback.rows(
                self.capture.model_args, self.capture.model_kwargs, vectors, logits
            )
        extra = self._extra_vectors is not None
        return [
            DirectBatch(
                name, list(self.selection.fallback[name].values()), r[:1], r[1:] if extra else None
            )
            for name, r in rows.items()
        ]

    @staticmethod
    def _all_finite(tensors: list[Tensor], batches: list[Block]) -> bool:
        """Whether ``tensors`` and every captured value are finite, by one sum per tensor
        (NaN and Inf propagate into a sum; a sum overflowing float range also counts as
        non-finite, as in the hook that skips sampling labels from such logits), each read as
        a number: no stacking of the sums (a torch call dearer than the reads on small
        tensors), and the first non-finite one decides."""
        tensors = list(tensors)
        for batch in batches:
            tensors += batch.captured()
        return all(math.isfinite(float(t.sum())) for t in tensors)

    def _leave_overflow_to_scaler(self) -> None:
        """An overflow of the scaled loss: Inf in every preconditioned gradient, so that
        ``GradScaler.step`` skips the step and lowers the scale; no state changes."""
        for param in self.selection.structured_parameters():
            param.grad = torch.full_like(param, math.inf)
        self.skipped_steps += 1

    def _skip_step(self, reason: str) -> None:
        """Zero every trainable gradient of the model so no NaN reaches the weights."""
        for param in self.model.parameters():
            if param.requires_grad and param.grad is not None:
                param.grad = torch.zeros_like(param)
        for param in self.selection.structured_parameters():
            if param.grad is None:
                param.grad = torch.zeros_like(param)
        self.skipped_steps += 1
        warnings.warn(
            f"natgrad skipped step {self.steps}: {reason}; the gradients were set to zero",
            NonFiniteWarning,
            stacklevel=3,
        )


def _concat(tensors: list[Tensor], dim: int) -> Tensor:
    """``torch.cat`` without the copy when there is a single tensor (one call of the layer)."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=dim)


__all__ = ["NonFiniteWarning", "Preconditioner"]
