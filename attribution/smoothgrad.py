"""SmoothGrad (Smilkov et al. 2017): the mean gradient over Gaussian-perturbed copies of x,
as captum's ``NoiseTunnel(Saliency(abs=False)).attribute(nt_type="smoothgrad")``.

Noise: ``samples`` draws of shape (T, N) with standard deviation ``noise`` (absolute, in the
units of x; the default 0.15 suits standardised inputs, captum's 1.0 drowns them), drawn from a
private ``torch.Generator`` seeded with ``seed`` on the CPU in float64, then cast to x's dtype
and device. The same draws are used for every sample of the batch, so

- results are repeatable and do not depend on the global RNG or on the device;
- a sample gets the same attribution alone or merged with others (batch-composition invariance);
- masked copies of one input (TSR) see identical noise, so their differences measure the mask,
  not the noise.

Rows (draw s, sample b) are stacked on the batch axis, ``internal_batch_size`` rows per
forward/backward, each for all K targets at once.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from attribution.core import (
    Forward,
    StopCheck,
    check_inputs,
    check_shape_args,
    chunks,
    finite_float,
    gradient_pass_cost,
    input_gradients,
    optional_positive_int,
    positive_int,
    reject_unknown,
    stop_check,
)

NAME = "smoothgrad"
PARAMS = ("samples", "noise", "seed", "internal_batch_size", "should_stop")
DEFAULT_INTERNAL_BATCH_SIZE = 256


def _check(params: dict[str, Any]) -> tuple[int, float, int, Optional[int]]:
    samples = positive_int("samples", params.get("samples", 20))
    noise = finite_float("noise", params.get("noise", 0.15), minimum=0.0)
    seed = positive_int("seed", params.get("seed", 0), minimum=0)
    ibs = optional_positive_int(
        "internal_batch_size", params.get("internal_batch_size", DEFAULT_INTERNAL_BATCH_SIZE)
    )
    return samples, noise, seed, ibs


def noise_draws(
    samples: int,
    time_steps: int,
    features: int,
    *,
    noise: float = 0.15,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> Tensor:
    """The (samples, T, N) perturbations ``smoothgrad`` adds for these settings."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)
    eps = torch.randn((samples, time_steps, features), generator=gen, dtype=torch.float64)
    return (eps * noise).to(dtype=dtype, device=device)


def smoothgrad(
    forward: Forward,
    x: Tensor,
    targets: Tensor,
    *,
    samples: int = 20,
    noise: float = 0.15,
    seed: int = 0,
    internal_batch_size: Optional[int] = DEFAULT_INTERNAL_BATCH_SIZE,
    should_stop: StopCheck = None,
) -> Tensor:
    """(B, K, T, N) mean input gradient over ``samples`` noisy copies of each sample.
    should_stop: asked before each chunk (raises `attribution.core.Stopped`)."""
    samples, noise, seed, ibs = _check(
        {"samples": samples, "noise": noise, "seed": seed,
         "internal_batch_size": internal_batch_size}
    )
    x, targets = check_inputs(x, targets)
    should_stop = stop_check(should_stop)
    batch, t, n = x.shape
    eps = noise_draws(samples, t, n, noise=noise, seed=seed, dtype=x.dtype, device=x.device)
    total = torch.zeros((batch, targets.shape[1], t, n), dtype=x.dtype, device=x.device)
    for start, stop in chunks(samples * batch, ibs, should_stop):
        rows = torch.arange(start, stop, device=x.device)
        s, b = rows // batch, rows % batch
        total.index_add_(0, b, input_gradients(forward, x[b] + eps[s], targets[b]))
    return total / samples


def cost(batch: int, time_steps: int, features: int, n_targets: int, **params: Any) -> int:
    """samples * B forwards and backwards (forward-equivalents)."""
    reject_unknown(NAME, params, PARAMS)
    samples, _, _, _ = _check(params)
    stop_check(params.get("should_stop"))
    b, _, _, k = check_shape_args(batch, time_steps, features, n_targets)
    return samples * b * gradient_pass_cost(k)
