"""Shared plumbing for the saliency methods: input checks, parameter validation, batched
input-gradients for many targets at once, chunking, and cost units.

Conventions used by every method:

- ``forward`` maps x (B, T, N) to logits (B, C). It may be an ``nn.Module``, a TorchScript module
  or any callable (e.g. a lambda composing normalisation and a model). It must be differentiable
  with respect to its input for the gradient-based methods; occlusion only runs it forward.
  Put the model in the mode you want explained (eval, or an inference copy with dropout at 0)
  before calling: nothing here changes module state.
- ``targets`` is an integer tensor (B, K): K class indices per sample (K = C for "all classes").
- Every method returns (B, K, T, N) signed raw attributions in x's dtype, detached.
- Costs are counted in *forward-equivalents*: one sample through the forward pass is 1, one
  backward pass of one sample for one target is ``BACKWARD_COST`` more.
- Every method takes ``should_stop`` (None, or a callable returning bool), asked before each
  chunk of work; once it answers True the method raises `Stopped`. A caller with a deadline
  (the service) thus gets its thread back within one chunk, instead of after the whole call.
"""

from __future__ import annotations

import math
import numbers
import weakref
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor

Forward = Callable[[Tensor], Tensor]

#: A backward pass for one target, in forward-equivalents (measured ~2-3x on the ICA-LSTM).
BACKWARD_COST = 2

StopCheck = Optional[Callable[[], bool]]


class Stopped(Exception):
    """Raised by a method between chunks when its ``should_stop`` callable answered True: the
    caller no longer wants the result (e.g. its deadline passed), so the rest is not computed."""


# Forwards whose backward failed under ``is_grads_batched`` (some op without a vmap rule);
# they go straight to the per-target loop next time. Weak, so it never keeps a model alive.
_UNBATCHABLE: "weakref.WeakSet[Any]" = weakref.WeakSet()


# --------------------------------------------------------------------------------------------
# input checks


def check_inputs(x: Any, targets: Any) -> tuple[Tensor, Tensor]:
    """Validate x (B, T, N) float and targets (B, K) integer; return (detached x, long targets)."""
    if not isinstance(x, Tensor):
        raise ValueError(f"x must be a torch.Tensor of shape (B, T, N), got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"x must have shape (B, T, N), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if min(x.shape) < 1:
        raise ValueError(f"x must have B, T, N >= 1, got shape {tuple(x.shape)}")
    if not isinstance(targets, Tensor):
        raise ValueError(f"targets must be an integer tensor (B, K), got {type(targets).__name__}")
    if targets.dim() != 2 or targets.shape[0] != x.shape[0] or targets.shape[1] < 1:
        raise ValueError(
            f"targets must have shape (B, K) with B = {x.shape[0]} and K >= 1, "
            f"got shape {tuple(targets.shape)}"
        )
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise ValueError(f"targets must be an integer tensor, got dtype {targets.dtype}")
    targets = targets.to(device=x.device, dtype=torch.long)
    if bool((targets < 0).any()):
        raise ValueError("targets must be class indices >= 0")
    return x.detach(), targets


def check_logits(logits: Any, rows: int, targets: Tensor) -> Tensor:
    """The forward's output must be (rows, C) and every target a valid class index."""
    if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[0] != rows:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"forward must return logits of shape (B={rows}, C), got {shape}")
    n_classes = logits.shape[1]
    if bool((targets >= n_classes).any()):
        raise ValueError(
            f"targets must be class indices < C = {n_classes}, got max {int(targets.max())}"
        )
    return logits


# --------------------------------------------------------------------------------------------
# parameter validation (every error is a ValueError that names the parameter)


def positive_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def optional_positive_int(name: str, value: Any) -> Optional[int]:
    return None if value is None else positive_int(name, value)


def finite_float(
    name: str,
    value: Any,
    minimum: Optional[float] = None,
    maximum: Optional[float] = None,
) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(f"{name} must be in [{minimum}, {maximum}], got {value!r}")
    return float(value)


def int_pair(name: str, value: Any) -> tuple[int, int]:
    """A (time, features) pair of integers >= 1."""
    if isinstance(value, Tensor) or not isinstance(value, Sequence) or isinstance(value, str):
        raise ValueError(f"{name} must be a (time, features) pair of integers, got {value!r}")
    if len(value) != 2:
        raise ValueError(f"{name} must be a (time, features) pair of integers, got {value!r}")
    return positive_int(name, value[0]), positive_int(name, value[1])


def baseline_like(name: str, value: Any, x: Tensor) -> Tensor:
    """A baseline (None = zeros, a number, or a tensor broadcastable to x) expanded to x."""
    if value is None:
        return torch.zeros_like(x)
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return torch.full_like(x, finite_float(name, value))
    if not isinstance(value, Tensor):
        raise ValueError(f"{name} must be None, a number or a tensor, got {type(value).__name__}")
    if value.is_complex() or value.dtype == torch.bool:
        raise ValueError(f"{name} must be a real tensor, got dtype {value.dtype}")
    try:
        shape = torch.broadcast_shapes(value.shape, x.shape)
    except RuntimeError:
        shape = None
    if shape != x.shape:
        raise ValueError(
            f"{name} of shape {tuple(value.shape)} does not broadcast to x's shape {tuple(x.shape)}"
        )
    value = value.detach().to(device=x.device, dtype=x.dtype)
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name} must be finite")
    return value.expand_as(x)


def check_baseline_spec(name: str, value: Any, batch: int, time_steps: int, features: int) -> None:
    """Validate a baseline without an input at hand (for cost estimates)."""
    if value is None:
        return
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        finite_float(name, value)
        return
    if not isinstance(value, Tensor):
        raise ValueError(f"{name} must be None, a number or a tensor, got {type(value).__name__}")
    target = (batch, time_steps, features)
    try:
        ok = torch.broadcast_shapes(value.shape, target) == target
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"{name} of shape {tuple(value.shape)} does not broadcast to {target}")


def stop_check(value: Any) -> StopCheck:
    """Validate a ``should_stop`` parameter: None or a callable."""
    if value is not None and not callable(value):
        raise ValueError(f"should_stop must be None or a callable, got {type(value).__name__}")
    return value


def check_stop(should_stop: StopCheck) -> None:
    """Raise `Stopped` when ``should_stop`` says so; called before each chunk of work."""
    if should_stop is not None and should_stop():
        raise Stopped("stopped: should_stop() answered True")


def reject_unknown(method: str, params: dict[str, Any], known: Sequence[str]) -> None:
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise ValueError(
            f"unknown parameter(s) {', '.join(map(repr, unknown))} for {method}; "
            f"accepted: {', '.join(known)}"
        )


# --------------------------------------------------------------------------------------------
# gradients


def one_hot_outputs(targets: Tensor, n_classes: int, dtype: torch.dtype) -> Tensor:
    """grad_outputs for all targets at once: (K, B, C) with a 1 at [k, b, targets[b, k]]."""
    rows, k = targets.shape
    out = torch.zeros(k, rows, n_classes, dtype=dtype, device=targets.device)
    out.scatter_(2, targets.t().unsqueeze(-1), 1.0)
    return out


def input_gradients(
    forward: Forward,
    x: Tensor,
    targets: Tensor,
    *,
    batched: Optional[bool] = None,
) -> Tensor:
    """d logits[b, targets[b, k]] / d x[b] for every b and k: (B, K, T, N), detached.

    One forward and one backward for all K targets of all B rows, using
    ``torch.autograd.grad(..., is_grads_batched=True)`` with one-hot grad_outputs (K, B, C).
    Rows must not interact in ``forward`` (true for models in eval mode), which is what makes
    the gradient of the summed logits equal the per-sample gradients.

    ``batched``: None tries the batched backward and, if the graph has an op without a vmap
    rule, falls back to one backward per target (retain_graph) and remembers that forward;
    False always loops; True never falls back (the error propagates).
    """
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = check_logits(forward(x), x.shape[0], targets)
        return gradients_of(logits, x, targets, forward, batched=batched)


def gradients_of(
    logits: Tensor, x: Tensor, targets: Tensor, forward: Forward, *, batched: Optional[bool] = None
) -> Tensor:
    """The backward half of `input_gradients`, for logits already computed from x (which
    requires grad) by `forward`: lets a caller choose the targets after seeing the logits
    without a second forward. `forward` rebuilds the graph if the batched backward fails."""
    with torch.enable_grad():
        if logits.grad_fn is None:
            raise RuntimeError("forward's output does not depend on its input through autograd")
        k = targets.shape[1]
        grad_outputs = one_hot_outputs(targets, logits.shape[1], logits.dtype)
        if k == 1:
            (g,) = torch.autograd.grad(logits, x, grad_outputs=grad_outputs[0])
            return g.detach().unsqueeze(1)
        try_batched = batched is True or (batched is None and not _known_unbatchable(forward))
        if try_batched:
            try:
                (g,) = torch.autograd.grad(
                    logits, x, grad_outputs=grad_outputs, is_grads_batched=True
                )
                return g.detach().transpose(0, 1)
            except RuntimeError:
                if batched is True:
                    raise
                # The failed backward may have freed part of the graph: rebuild it.
                logits = forward(x)
                out = _per_target_gradients(logits, x, grad_outputs)
                # only now: an error the loop shares (e.g. cuDNN's eval-mode RNN backward)
                # has propagated above and says nothing about vmap
                _remember_unbatchable(forward)
                return out
        return _per_target_gradients(logits, x, grad_outputs)


def _per_target_gradients(logits: Tensor, x: Tensor, grad_outputs: Tensor) -> Tensor:
    k = grad_outputs.shape[0]
    grads = []
    for i in range(k):
        (g,) = torch.autograd.grad(logits, x, grad_outputs=grad_outputs[i], retain_graph=i < k - 1)
        grads.append(g.detach())
    return torch.stack(grads, dim=1)


def _known_unbatchable(forward: Forward) -> bool:
    try:
        return forward in _UNBATCHABLE
    except TypeError:
        return False


def _remember_unbatchable(forward: Forward) -> None:
    try:
        _UNBATCHABLE.add(forward)
    except TypeError:  # not weak-referenceable: try the batched path again next time
        pass


# --------------------------------------------------------------------------------------------
# small helpers


def chunks(
    total: int, size: Optional[int], should_stop: StopCheck = None
) -> Iterator[tuple[int, int]]:
    """[start, stop) ranges covering range(total) in pieces of at most ``size`` (None = one).

    should_stop: asked before each piece (see `check_stop`), so every chunked loop of the
    methods can be abandoned between pieces."""
    step = total if size is None else size
    for start in range(0, total, max(step, 1)):
        check_stop(should_stop)
        yield start, min(start + step, total)


def minmax(t: Tensor, dims: Sequence[int]) -> Tensor:
    """Min-max scale to [0, 1] over ``dims``; a constant slice maps to 0 (like sklearn)."""
    lo = t.amin(dim=tuple(dims), keepdim=True)
    hi = t.amax(dim=tuple(dims), keepdim=True)
    span = hi - lo
    return (t - lo) / torch.where(span > 0, span, torch.ones_like(span))


def gradient_pass_cost(n_targets: int) -> int:
    """Forward-equivalents of one sample's forward plus backward for ``n_targets`` targets."""
    return 1 + BACKWARD_COST * n_targets


def check_shape_args(
    batch: Any, time_steps: Any, features: Any, n_targets: Any
) -> tuple[int, int, int, int]:
    return (
        positive_int("batch", batch),
        positive_int("time_steps", time_steps),
        positive_int("features", features),
        positive_int("n_targets", n_targets),
    )
