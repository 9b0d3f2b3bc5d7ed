"""Integrated Gradients (Sundararajan et al. 2017), as captum's ``IntegratedGradients``.

IG_k(x) = (x - x') * sum_s w_s * d logit_k / d x evaluated at x' + alpha_s (x - x'),
with (alpha_s, w_s) from a quadrature rule on [0, 1]; Gauss-Legendre by default (captum's
default). The steps are stacked on the batch axis: rows (step s, sample b) in step-major order,
processed ``internal_batch_size`` rows at a time, each chunk one forward and one backward for
all K targets.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from attribution.core import (
    Forward,
    StopCheck,
    baseline_like,
    check_baseline_spec,
    check_inputs,
    check_shape_args,
    chunks,
    gradient_pass_cost,
    input_gradients,
    optional_positive_int,
    positive_int,
    reject_unknown,
    stop_check,
)

NAME = "integrated_gradients"
PARAMS = ("steps", "baseline", "integration", "internal_batch_size", "should_stop")
QUADRATURES = (
    "gausslegendre",
    "riemann_left",
    "riemann_right",
    "riemann_middle",
    "riemann_trapezoid",
)
DEFAULT_INTERNAL_BATCH_SIZE = 256


@functools.lru_cache(maxsize=512)
def _gauss_legendre(steps: int) -> tuple[np.ndarray, np.ndarray]:
    # An eigenvalue problem of size `steps` (~0.1 s at 256 steps): computed once per step count,
    # not on every cost estimate (the server prices every request before it queues it).
    nodes, weights = np.polynomial.legendre.leggauss(steps)
    alphas, w = 0.5 * (1.0 + nodes), 0.5 * weights
    alphas.setflags(write=False)  # shared by every caller
    w.setflags(write=False)
    return alphas, w


def quadrature(method: str, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """(alphas, weights) in float64, the same rules as captum's approximation_methods."""
    if not isinstance(method, str) or method not in QUADRATURES:
        raise ValueError(f"integration must be one of {QUADRATURES}, got {method!r}")
    if method == "gausslegendre":
        return _gauss_legendre(int(steps))
    if steps < 2:
        raise ValueError(f"steps must be >= 2 for {method}, got {steps}")
    weights = np.full(steps, 1.0 / steps)
    kind = method.split("_")[1]
    if kind == "trapezoid":
        weights[0] /= 2
        weights[-1] /= 2
        alphas = np.linspace(0.0, 1.0, steps)
    elif kind == "left":
        alphas = np.linspace(0.0, 1.0 - 1.0 / steps, steps)
    elif kind == "right":
        alphas = np.linspace(1.0 / steps, 1.0, steps)
    else:
        alphas = np.linspace(1.0 / (2 * steps), 1.0 - 1.0 / (2 * steps), steps)
    return alphas, weights


def _check(params: dict[str, Any]) -> tuple[int, str, Optional[int]]:
    steps = positive_int("steps", params.get("steps", 50))
    method = params.get("integration", "gausslegendre")
    quadrature(method, steps)  # validates method and steps together
    ibs = optional_positive_int(
        "internal_batch_size", params.get("internal_batch_size", DEFAULT_INTERNAL_BATCH_SIZE)
    )
    return steps, method, ibs


def integrated_gradients(
    forward: Forward,
    x: Tensor,
    targets: Tensor,
    *,
    steps: int = 50,
    baseline: Any = None,
    integration: str = "gausslegendre",
    internal_batch_size: Optional[int] = DEFAULT_INTERNAL_BATCH_SIZE,
    should_stop: StopCheck = None,
) -> Tensor:
    """(B, K, T, N) integrated gradients.

    steps: quadrature points (default 50). baseline: None (zeros), a number, or a tensor
    broadcastable to x. integration: the quadrature, captum's ``method`` names
    ("gausslegendre", the default, or "riemann_left/right/middle/trapezoid").
    internal_batch_size: rows (step, sample) per forward/backward (default 256; None = all
    steps * B rows at once, like captum's default). should_stop: asked before each chunk
    (raises `attribution.core.Stopped`).
    """
    steps, method, ibs = _check(
        {"steps": steps, "integration": integration, "internal_batch_size": internal_batch_size}
    )
    x, targets = check_inputs(x, targets)
    should_stop = stop_check(should_stop)
    base = baseline_like("baseline", baseline, x)
    alphas_np, weights_np = quadrature(method, steps)
    alphas = torch.tensor(alphas_np, dtype=x.dtype, device=x.device)
    weights = torch.tensor(weights_np, dtype=x.dtype, device=x.device)
    batch = x.shape[0]
    diff = x - base
    total = torch.zeros((batch, targets.shape[1]) + x.shape[1:], dtype=x.dtype, device=x.device)
    for start, stop in chunks(steps * batch, ibs, should_stop):
        rows = torch.arange(start, stop, device=x.device)
        s, b = rows // batch, rows % batch
        scaled = base[b] + alphas[s].view(-1, 1, 1) * diff[b]
        g = input_gradients(forward, scaled, targets[b])
        total.index_add_(0, b, g * weights[s].view(-1, 1, 1, 1))
    return total * diff.unsqueeze(1)


def cost(batch: int, time_steps: int, features: int, n_targets: int, **params: Any) -> int:
    """steps * B forwards and backwards (forward-equivalents)."""
    reject_unknown(NAME, params, PARAMS)
    steps, _, _ = _check(params)
    stop_check(params.get("should_stop"))
    b, t, n, k = check_shape_args(batch, time_steps, features, n_targets)
    check_baseline_spec("baseline", params.get("baseline"), b, t, n)
    return steps * b * gradient_pass_cost(k)
