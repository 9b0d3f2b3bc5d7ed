"""Temporal Saliency Rescaling (Ismail et al., NeurIPS 2020) over any base method.

For each sample and target, with R = base attribution of x:

1. time relevance d_t = sum |R - R'_t|, where R'_t is the base attribution of x with time
   column t set to the baseline; d is min-max scaled over time.
2. for steps with d_t strictly above the ``threshold_quantile`` quantile of d (linear
   interpolation, as numpy's default; the authors used 0.55): feature relevance
   f_{t,i} = sum |R - R'_{t,i}| with the single cell (t, i) set to the baseline, min-max scaled
   over features; every other step gets ``feature_default`` (0.1 in the authors' code) for all
   features.
3. score(t, i) = d_t * f_{t,i}, min-max scaled over the whole (T, N) map.

Min-max scaling of a constant vector gives zeros (as sklearn's minmax_scale, which the authors
used); in particular T = 1 gives an all-zero map.

Batched: all T masked copies of every sample, then all N single-cell copies of every kept
(sample, step), are stacked and sent to the base method ``chunk_size`` copies per call (each of
which the base method splits further by its own ``internal_batch_size``). A step kept for any of
a sample's K targets is expanded once and its copies scored for all K targets. ``should_stop``
is asked before every such call and handed on to the base method (see `attribution.core`).

Registered in ``attribution.METHODS`` as "tsr" with ``base_method`` as a parameter (default
"gradient"): ``attribute("tsr", f, x, targets, base_method="smoothgrad", samples=8)`` and
``estimate_cost("tsr", ...)`` work like any other method, and the parameters TSR accepts are its
own plus those of its base method (`params_for`). ``tsr(base_method, ...)`` and
``cost(base_method, ...)`` remain the positional forms.
"""

from __future__ import annotations

import math
from typing import Any

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
    finite_float,
    minmax,
    positive_int,
    reject_unknown,
    stop_check,
)

NAME = "tsr"
DEFAULT_BASE_METHOD = "gradient"
DEFAULT_CHUNK_SIZE = 64
#: TSR's own parameters; it also accepts those of its base method (see `params_for`).
OWN_PARAMS = (
    "base_method", "threshold_quantile", "feature_default", "baseline", "chunk_size", "should_stop"
)


def params_for(params: dict[str, Any]) -> tuple[str, ...]:
    """The parameter names TSR accepts alongside ``params``: its own and its base method's (so
    a parameter of another base method is refused by name). Raises ValueError on a bad base."""
    from attribution import resolve_base_method

    base = resolve_base_method(params.get("base_method", DEFAULT_BASE_METHOD))
    return OWN_PARAMS + tuple(p for p in base.params if p not in OWN_PARAMS)


def _check(params: dict[str, Any]) -> tuple[float, float, int]:
    q = finite_float("threshold_quantile", params.get("threshold_quantile", 0.55), 0.0, 1.0)
    fd = finite_float("feature_default", params.get("feature_default", 0.1))
    chunk = positive_int("chunk_size", params.get("chunk_size", DEFAULT_CHUNK_SIZE))
    return q, fd, chunk


def tsr(
    base_method: str,
    forward: Forward,
    x: Tensor,
    targets: Tensor,
    *,
    threshold_quantile: float = 0.55,
    feature_default: float = 0.1,
    baseline: Any = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    should_stop: StopCheck = None,
    **base_params: Any,
) -> Tensor:
    """(B, K, T, N) TSR scores in [0, 1] on top of ``base_method`` (a name in
    ``attribution.BASE_METHODS``).

    baseline: the value masked cells take (None = zeros, a number, or a tensor broadcastable
    to x). Base methods that take a baseline (integrated gradients, occlusion) use the same one.
    chunk_size: masked copies per base-method call. should_stop: asked before each base-method
    call and handed on to it (raises `attribution.core.Stopped`). base_params: the base
    method's parameters.
    """
    from attribution import resolve_base_method

    spec = resolve_base_method(base_method)
    should_stop = stop_check(should_stop)
    q, fd, chunk = _check(
        {"threshold_quantile": threshold_quantile, "feature_default": feature_default,
         "chunk_size": chunk_size}
    )
    x, targets = check_inputs(x, targets)
    batch, t, n = x.shape
    k = targets.shape[1]
    base = baseline_like("baseline", baseline, x)
    takes_baseline = "baseline" in spec.params
    spec.cost(1, t, n, k, **base_params)  # validates the base method's parameters up front

    extra = {"baseline": base} if takes_baseline else {}
    base_params = {**base_params, "should_stop": should_stop}
    ref = torch.cat([
        spec.fn(forward, x[lo:hi], targets[lo:hi], **base_params,
                **{key: v[lo:hi] for key, v in extra.items()})
        for lo, hi in chunks(batch, chunk, should_stop)
    ])  # (B, K, T, N)

    def relevance(rows_b: Tensor, rows_t: Tensor, rows_i: Tensor | None) -> Tensor:
        """sum |R - R'| per copy and target, (copies, K) in float64: copy r is x[rows_b[r]]
        with time column rows_t[r] (or only the cell (rows_t[r], rows_i[r])) set to the
        baseline. Only ``chunk`` copies and their attributions exist at a time."""
        parts = []
        for start, stop in chunks(len(rows_b), chunk, should_stop):
            b = rows_b[start:stop].to(x.device)
            tt = rows_t[start:stop].to(x.device)
            r = torch.arange(stop - start, device=x.device)
            inputs = x[b].clone()
            if rows_i is None:
                inputs[r, tt] = base[b, tt]
            else:
                ii = rows_i[start:stop].to(x.device)
                inputs[r, tt, ii] = base[b, tt, ii]
            more = {"baseline": base[b]} if takes_baseline else {}
            masked = spec.fn(forward, inputs, targets[b], **base_params, **more)
            # float64 whatever x's dtype: torch.quantile needs float32/64, and the authors'
            # numpy code summed in float64
            parts.append((ref[b] - masked).abs().sum(dim=(2, 3), dtype=torch.float64))
        return torch.cat(parts, dim=0)

    # 1. time relevance: copy (b, t) has column t masked
    rows_b = torch.arange(batch).repeat_interleave(t)
    d = relevance(rows_b, torch.arange(t).repeat(batch), None)
    d = d.view(batch, t, k).transpose(1, 2)  # (B, K, T)
    d = minmax(d, dims=(2,))
    keep = d > torch.quantile(d, q, dim=2, keepdim=True)  # (B, K, T)

    # 2. feature relevance for the steps kept by any target: copy (b, t, i) masks one cell
    feat = torch.full((batch, k, t, n), fd, dtype=torch.float64, device=x.device)
    pairs = keep.any(dim=1).nonzero().cpu()  # (P, 2): (b, t)
    if len(pairs):
        f = relevance(
            pairs[:, 0].repeat_interleave(n),
            pairs[:, 1].repeat_interleave(n),
            torch.arange(n).repeat(len(pairs)),
        )
        f = f.view(len(pairs), n, k).transpose(1, 2)
        f = minmax(f, dims=(2,))  # (P, K, N)
        sel_b, sel_t = pairs[:, 0].to(x.device), pairs[:, 1].to(x.device)
        kept = keep[sel_b, :, sel_t].unsqueeze(-1)  # (P, K, 1)
        feat[sel_b, :, sel_t] = torch.where(kept, f, feat[sel_b, :, sel_t])

    # 3. score
    return minmax(d.unsqueeze(-1) * feat, dims=(2, 3)).to(x.dtype)


def cost(
    base_method: str,
    batch: int,
    time_steps: int,
    features: int,
    n_targets: int,
    *,
    threshold_quantile: float = 0.55,
    feature_default: float = 0.1,
    baseline: Any = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    should_stop: StopCheck = None,
    **base_params: Any,
) -> int:
    """Upper bound, in forward-equivalents: (1 + T + kept * N) base attributions per sample,
    kept = the steps expanded per sample, at most min(T, K * (T - 1 - floor(q * (T - 1)))).
    So ``threshold_quantile`` counts: at q = 0 every step but the least relevant is expanded
    (kept = T - 1 for one target), at the default 0.55 less than half."""
    from attribution import resolve_base_method

    spec = resolve_base_method(base_method)
    stop_check(should_stop)
    q, _, _ = _check(
        {"threshold_quantile": threshold_quantile, "feature_default": feature_default,
         "chunk_size": chunk_size}
    )
    b, t, n, k = check_shape_args(batch, time_steps, features, n_targets)
    check_baseline_spec("baseline", baseline, b, t, n)
    per_sample = spec.cost(1, t, n, k, **base_params)
    kept = min(t, k * (t - 1 - math.floor(q * (t - 1))))
    return b * per_sample * (1 + t + kept * n)


# --------------------------------------------------------------------------------------------
# the registered form: base_method as a parameter, like every other method's parameters


def tsr_method(
    forward: Forward,
    x: Tensor,
    targets: Tensor,
    *,
    base_method: str = DEFAULT_BASE_METHOD,
    **params: Any,
) -> Tensor:
    """``tsr(base_method, ...)`` with the base method as a keyword (``METHODS["tsr"].fn``)."""
    return tsr(base_method, forward, x, targets, **params)


def method_cost(batch: int, time_steps: int, features: int, n_targets: int, **params: Any) -> int:
    """``cost`` with the base method as a keyword (``METHODS["tsr"].cost``); refuses parameters
    that neither TSR nor its base method takes."""
    reject_unknown(NAME, params, params_for(params))
    rest = {k: v for k, v in params.items() if k != "base_method"}
    return cost(params.get("base_method", DEFAULT_BASE_METHOD), batch, time_steps, features,
                n_targets, **rest)
