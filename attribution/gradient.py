"""Gradient saliency: d logit_target / d x, signed (captum ``Saliency(abs=False)``)."""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor

from attribution.core import (
    Forward,
    StopCheck,
    check_inputs,
    check_stop,
    check_shape_args,
    chunks,
    check_logits,
    gradient_pass_cost,
    gradients_of,
    input_gradients,
    optional_positive_int,
    reject_unknown,
    stop_check,
)

NAME = "gradient"
PARAMS = ("internal_batch_size", "should_stop")


def gradient_and_logits(
    forward: Forward,
    x: Tensor,
    choose_targets: Callable[[Tensor, int], Tensor],
    *,
    internal_batch_size: Optional[int] = None,
    should_stop: StopCheck = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(logits (B, C), targets (B, K), gradients (B, K, T, N)) from one forward and one backward
    per chunk, the targets chosen from the chunk's logits: `choose_targets(logits, offset)` gives
    the (rows, K) targets of rows offset.. (e.g. each row's predicted class). The usual request,
    the gradient of the predicted class, then needs no extra forward just to find the class.
    should_stop: asked before each chunk (raises `attribution.core.Stopped`).
    """
    ibs = optional_positive_int("internal_batch_size", internal_batch_size)
    should_stop = stop_check(should_stop)
    if not isinstance(x, Tensor) or x.dim() != 3 or not x.is_floating_point():
        raise ValueError("x must be a floating-point tensor of shape (B, T, N)")
    logits_parts, target_parts, grad_parts = [], [], []
    offset = 0
    for xc in x.detach().split(ibs or x.shape[0]):
        check_stop(should_stop)
        xc = xc.requires_grad_(True)
        with torch.enable_grad():
            lc = forward(xc)
        _, tc = check_inputs(xc, choose_targets(lc.detach(), offset))
        check_logits(lc, xc.shape[0], tc)
        grad_parts.append(gradients_of(lc, xc, tc, forward))
        logits_parts.append(lc.detach())
        target_parts.append(tc)
        offset += xc.shape[0]
    return torch.cat(logits_parts), torch.cat(target_parts), torch.cat(grad_parts)


def gradient(
    forward: Forward,
    x: Tensor,
    targets: Tensor,
    *,
    internal_batch_size: Optional[int] = None,
    should_stop: StopCheck = None,
) -> Tensor:
    """(B, K, T, N) input gradients of each target's logit.

    internal_batch_size: at most this many samples per forward/backward (default None: the
    whole batch, i.e. one forward and one backward for all B samples and all K targets).
    should_stop: asked before each chunk (raises `attribution.core.Stopped`).
    """
    ibs = optional_positive_int("internal_batch_size", internal_batch_size)
    x, targets = check_inputs(x, targets)
    return batched_gradients(forward, x, targets, ibs, stop_check(should_stop))


def batched_gradients(
    forward: Forward,
    x: Tensor,
    targets: Tensor,
    internal_batch_size: Optional[int],
    should_stop: StopCheck = None,
) -> Tensor:
    parts = [
        input_gradients(forward, x[a:b], targets[a:b])
        for a, b in chunks(x.shape[0], internal_batch_size, should_stop)
    ]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)


def cost(batch: int, time_steps: int, features: int, n_targets: int, **params: Any) -> int:
    """B forwards plus B backwards for K targets (forward-equivalents)."""
    reject_unknown(NAME, params, PARAMS)
    optional_positive_int("internal_batch_size", params.get("internal_batch_size"))
    stop_check(params.get("should_stop"))
    b, _, _, k = check_shape_args(batch, time_steps, features, n_targets)
    return b * gradient_pass_cost(k)
