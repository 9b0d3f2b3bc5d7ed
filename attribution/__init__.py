"""Saliency methods over any differentiable classifier x (B, T, N) -> logits (B, C).

Used by the HTTP service and by offline evaluation. One method per module, captum-style:

    gradient              d logit / d x                        (captum Saliency(abs=False))
    input_x_gradient      x * d logit / d x                    (captum InputXGradient)
    integrated_gradients  path integral from a baseline        (captum IntegratedGradients)
    smoothgrad            mean gradient over noisy copies      (captum NoiseTunnel smoothgrad)
    occlusion             logit drop when a window is masked   (captum Occlusion)
    tsr                   Temporal Saliency Rescaling over any of the above

Every method takes targets (B, K) (K class indices per sample; K = C for all classes) and
returns (B, K, T, N) signed raw attributions in x's dtype, detached; taking |.| and normalising
is the caller's business. Gradient-based methods get all K targets of all rows from one forward
and one backward (``torch.autograd.grad(..., is_grads_batched=True)``), with a per-target loop
as fallback for graphs that cannot be vmapped.

TSR is registered in ``METHODS`` like the others, with ``base_method`` (one of
``BASE_METHODS``, default "gradient") as one of its parameters, so ``attribute("tsr", ...)`` and
``estimate_cost("tsr", ...)`` need no special case anywhere. ``tsr`` (the function, re-exported
from the module of the same name, which stays importable as ``from attribution.tsr import ...``)
is the positional form that takes a base method's name first, ``tsr_cost`` its cost.

``estimate_cost`` / ``tsr_cost`` give, before running anything, the work a call will do in
forward-equivalents (one sample through the forward = 1, one backward per target =
``BACKWARD_COST``), and validate the parameters as the call would: every parameter that changes
the work (TSR's ``threshold_quantile`` included) reaches the estimate.

Every method takes ``should_stop`` (a callable asked before each chunk of work; `Stopped` is
raised once it answers True), so a caller with a deadline is not held to the end of a long call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from torch import Tensor

from attribution import gradient as _gradient
from attribution import input_x_gradient as _input_x_gradient
from attribution import integrated_gradients as _integrated_gradients
from attribution import occlusion as _occlusion
from attribution import smoothgrad as _smoothgrad
from attribution import tsr as _tsr
from attribution.core import BACKWARD_COST, Forward, Stopped, input_gradients, reject_unknown
from attribution.gradient import gradient_and_logits
from attribution.tsr import tsr  # the function: from here on, attribution.tsr is this

__all__ = [
    "BACKWARD_COST",
    "BASE_METHODS",
    "Forward",
    "METHODS",
    "Method",
    "Stopped",
    "attribute",
    "estimate_cost",
    "gradient_and_logits",
    "input_gradients",
    "resolve_base_method",
    "resolve_method",
    "tsr",
    "tsr_cost",
]


@dataclass(frozen=True)
class Method:
    """A registered method: the attribution function, its parameter names and cost model.

    ``params`` are the names it always accepts; ``params_for``, when set, gives the names it
    accepts alongside given parameters (TSR: its own plus those of its ``base_method``)."""

    name: str
    fn: Callable[..., Tensor]
    params: tuple[str, ...]
    cost: Callable[..., int]
    gradient_based: bool
    params_for: Optional[Callable[[dict[str, Any]], tuple[str, ...]]] = None

    def accepted(self, params: dict[str, Any]) -> tuple[str, ...]:
        """The parameter names this method takes together with ``params`` (ValueError if a
        parameter that decides the others, e.g. TSR's base_method, is bad)."""
        return self.params if self.params_for is None else self.params_for(params)

    def check_params(self, params: dict[str, Any]) -> None:
        reject_unknown(self.name, params, self.accepted(params))


def _method(module: Any, gradient_based: bool) -> Method:
    return Method(
        name=module.NAME,
        fn=getattr(module, module.NAME),
        params=module.PARAMS,
        cost=module.cost,
        gradient_based=gradient_based,
    )


#: The methods TSR can refine (every method but TSR itself).
BASE_METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        _method(_gradient, True),
        _method(_input_x_gradient, True),
        _method(_integrated_gradients, True),
        _method(_smoothgrad, True),
        _method(_occlusion, False),
    )
}

METHODS: dict[str, Method] = {
    **BASE_METHODS,
    _tsr.NAME: Method(
        name=_tsr.NAME,
        fn=_tsr.tsr_method,
        params=_tsr.OWN_PARAMS,
        cost=_tsr.method_cost,
        gradient_based=False,  # depends on its base method
        params_for=_tsr.params_for,
    ),
}


def resolve_method(method: Any) -> Method:
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}")
    return METHODS[method]


def resolve_base_method(method: Any) -> Method:
    """A method TSR can refine (not TSR itself)."""
    if not isinstance(method, str) or method not in BASE_METHODS:
        raise ValueError(f"base_method must be one of {sorted(BASE_METHODS)}, got {method!r}")
    return BASE_METHODS[method]


def attribute(
    method: str, forward: Forward, x: Tensor, targets: Tensor, /, **params: Any
) -> Tensor:
    """(B, K, T, N) attributions of ``targets`` (B, K) by ``method`` (a key of METHODS)."""
    spec = resolve_method(method)
    spec.check_params(params)
    return spec.fn(forward, x, targets, **params)


def estimate_cost(
    method: str, batch: int, time_steps: int, features: int, n_targets: int, **params: Any
) -> int:
    """Forward-equivalents that ``attribute(method, ...)`` will spend on a (batch, time_steps,
    features) input with ``n_targets`` targets per sample; raises ValueError on bad params."""
    return resolve_method(method).cost(batch, time_steps, features, n_targets, **params)


def tsr_cost(
    base_method: str, batch: int, time_steps: int, features: int, n_targets: int, **params: Any
) -> int:
    """Upper bound of the forward-equivalents ``tsr(base_method, ...)`` will spend."""
    return _tsr.cost(base_method, batch, time_steps, features, n_targets, **params)
