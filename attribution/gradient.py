"""Gradient saliency: d logit_target / d x, signed (captum ``Saliency(abs=False)``)."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from attribution.core import (
    Forward,
    check_inputs,
    check_shape_args,
    chunks,
    gradient_pass_cost,
    input_gradients,
    optional_positive_int,
    reject_unknown,
)

NAME = "gradient"
PARAMS = ("internal_batch_size",)


def gradient(
    forward: Forward,
    x: Tensor,
    targets: Tensor,
    *,
    internal_batch_size: Optional[int] = None,
) -> Tensor:
    """(B, K, T, N) input gradients of each target's logit.

    internal_batch_size: at most this many samples per forward/backward (default None: the
    whole batch, i.e. one forward and one backward for all B samples and all K targets).
    """
    ibs = optional_positive_int("internal_batch_size", internal_batch_size)
    x, targets = check_inputs(x, targets)
    return batched_gradients(forward, x, targets, ibs)


def batched_gradients(
    forward: Forward, x: Tensor, targets: Tensor, internal_batch_size: Optional[int]
) -> Tensor:
    parts = [
        input_gradients(forward, x[a:b], targets[a:b])
        for a, b in chunks(x.shape[0], internal_batch_size)
    ]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)


def cost(batch: int, time_steps: int, features: int, n_targets: int, **params: Any) -> int:
    """B forwards plus B backwards for K targets (forward-equivalents)."""
    reject_unknown(NAME, params, PARAMS)
    optional_positive_int("internal_batch_size", params.get("internal_batch_size"))
    b, _, _, k = check_shape_args(batch, time_steps, features, n_targets)
    return b * gradient_pass_cost(k)
