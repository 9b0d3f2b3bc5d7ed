"""Input x Gradient: x * d logit_target / d x (captum ``InputXGradient``)."""

from __future__ import annotations

from typing import Any, Optional

from torch import Tensor

from attribution.core import (
    Forward,
    StopCheck,
    check_inputs,
    check_shape_args,
    gradient_pass_cost,
    optional_positive_int,
    reject_unknown,
    stop_check,
)
from attribution.gradient import batched_gradients

NAME = "input_x_gradient"
PARAMS = ("internal_batch_size", "should_stop")


def input_x_gradient(
    forward: Forward,
    x: Tensor,
    targets: Tensor,
    *,
    internal_batch_size: Optional[int] = None,
    should_stop: StopCheck = None,
) -> Tensor:
    """(B, K, T, N) gradient times input; same passes as ``gradient``."""
    ibs = optional_positive_int("internal_batch_size", internal_batch_size)
    x, targets = check_inputs(x, targets)
    return batched_gradients(forward, x, targets, ibs, stop_check(should_stop)) * x.unsqueeze(1)


def cost(batch: int, time_steps: int, features: int, n_targets: int, **params: Any) -> int:
    reject_unknown(NAME, params, PARAMS)
    optional_positive_int("internal_batch_size", params.get("internal_batch_size"))
    stop_check(params.get("should_stop"))
    b, _, _, k = check_shape_args(batch, time_steps, features, n_targets)
    return b * gradient_pass_cost(k)
