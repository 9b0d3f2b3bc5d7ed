"""Occlusion (Zeiler & Fergus 2014), as captum's ``Occlusion`` on a (T, N) input.

A (time, features) window slides over the input with the given stride; for each position the
window's cells are set to the baseline and the drop in each target's logit,
logit(x) - logit(x_occluded), is credited to every occluded cell. A cell's attribution is the
mean over the windows that covered it. Window positions follow captum: along each axis
ceil((size - window) / stride) + 1 starts at 0, stride, 2*stride, ...; a last window that runs
past the end is cut at the edge, so every cell is covered.

Defaults: window (5, 5), each side clipped to the input's size (so (min(5, T), min(5, N))): the
paper's boxes start and end on multiples of 5, and a 100 x 100 input needs 400 windows.
Use window=(1, 1) for per-cell occlusion (T*N windows) or (1, N) for per-time-step.
stride defaults to the window (non-overlapping tiles); a stride larger than the window would
leave cells uncovered and is refused, except along an axis the window spans entirely.

Forward passes only, no gradients: all (sample, window) copies are stacked on the batch axis,
``internal_batch_size`` per forward, and every forward scores all K targets at once.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import Tensor

from attribution.core import (
    Forward,
    StopCheck,
    baseline_like,
    check_baseline_spec,
    check_inputs,
    check_logits,
    check_shape_args,
    chunks,
    int_pair,
    optional_positive_int,
    reject_unknown,
    stop_check,
)

NAME = "occlusion"
PARAMS = ("window", "stride", "baseline", "internal_batch_size", "should_stop")
DEFAULT_WINDOW = (5, 5)
DEFAULT_INTERNAL_BATCH_SIZE = 1024


def resolve_window(
    time_steps: int, features: int, window: Any = None, stride: Any = None
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Validated (window, stride) for a (T, N) input, defaults applied."""
    if window is None:
        win = (min(DEFAULT_WINDOW[0], time_steps), min(DEFAULT_WINDOW[1], features))
    else:
        win = int_pair("window", window)
        if win[0] > time_steps or win[1] > features:
            raise ValueError(
                f"window {win} is larger than the input's (T, N) = ({time_steps}, {features})"
            )
    st = win if stride is None else int_pair("stride", stride)
    for size, w, s in ((time_steps, win[0], st[0]), (features, win[1], st[1])):
        if s > w and w < size:
            raise ValueError(f"stride {st} must not exceed window {win}: cells would be skipped")
    return win, st


def window_starts(size: int, window: int, stride: int) -> list[int]:
    return [i * stride for i in range(math.ceil((size - window) / stride) + 1)]


def _cover(size: int, window: int, stride: int, like: Tensor) -> Tensor:
    """(n_windows, size) 0/1 matrix: which positions each window start covers."""
    starts = torch.tensor(window_starts(size, window, stride), device=like.device)
    pos = torch.arange(size, device=like.device)
    return ((pos >= starts[:, None]) & (pos < starts[:, None] + window)).to(like.dtype)


def occlusion(
    forward: Forward,
    x: Tensor,
    targets: Tensor,
    *,
    window: Any = None,
    stride: Any = None,
    baseline: Any = None,
    internal_batch_size: Optional[int] = DEFAULT_INTERNAL_BATCH_SIZE,
    should_stop: StopCheck = None,
) -> Tensor:
    """(B, K, T, N) occlusion attributions (see the module docstring for the parameters).
    should_stop: asked before each chunk (raises `attribution.core.Stopped`)."""
    ibs = optional_positive_int("internal_batch_size", internal_batch_size)
    should_stop = stop_check(should_stop)
    x, targets = check_inputs(x, targets)
    batch, t, n = x.shape
    win, st = resolve_window(t, n, window, stride)
    base = baseline_like("baseline", baseline, x)
    cover_t = _cover(t, win[0], st[0], x)  # (I, T)
    cover_n = _cover(n, win[1], st[1], x)  # (J, N)
    n_i, n_j = cover_t.shape[0], cover_n.shape[0]
    n_windows = n_i * n_j
    k = targets.shape[1]
    with torch.no_grad():
        initial = check_logits(forward(x), batch, targets).gather(1, targets)  # (B, K)
        drops = torch.empty(batch * n_windows, k, dtype=initial.dtype, device=x.device)
        for start, stop in chunks(batch * n_windows, ibs, should_stop):
            rows = torch.arange(start, stop, device=x.device)
            b, w = rows // n_windows, rows % n_windows
            mask = (cover_t[w // n_j][:, :, None] * cover_n[w % n_j][:, None, :]).bool()
            occluded = torch.where(mask, base[b], x[b])
            logits = check_logits(forward(occluded), stop - start, targets[b])
            drops[start:stop] = initial[b] - logits.gather(1, targets[b])
        drops = drops.to(x.dtype).view(batch, n_i, n_j, k)
        total = torch.einsum("it,bijk,jn->bktn", cover_t, drops, cover_n)
        counts = cover_t.sum(0)[:, None] * cover_n.sum(0)[None, :]
    return total / counts


def n_windows(time_steps: int, features: int, window: Any = None, stride: Any = None) -> int:
    win, st = resolve_window(time_steps, features, window, stride)
    return len(window_starts(time_steps, win[0], st[0])) * len(
        window_starts(features, win[1], st[1])
    )


def cost(batch: int, time_steps: int, features: int, n_targets: int, **params: Any) -> int:
    """B * (1 + number of windows) forwards; the K targets come free."""
    reject_unknown(NAME, params, PARAMS)
    optional_positive_int("internal_batch_size", params.get("internal_batch_size"))
    stop_check(params.get("should_stop"))
    b, t, n, _ = check_shape_args(batch, time_steps, features, n_targets)
    check_baseline_spec("baseline", params.get("baseline"), b, t, n)
    return b * (1 + n_windows(t, n, params.get("window"), params.get("stride")))
