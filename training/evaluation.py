"""Scoring saliency against ground truth, as the paper does (PAPER.md, "Scoring an explanation").

Per sample, with R the binary ground-truth mask (T x N) and S = |saliency of the true class|
min-max scaled to [0, 1] over the whole T x N matrix:

- weighted Jaccard   sum(min(R, S)) / sum(max(R, S))                 higher is better, in [0, 1]
- Euclidean          ||R - S||_2 / ||R||_2                           lower is better
- ROC-AUC            of S as a score for R (rank-based, ties count 1/2)   0.5 = chance
- top-k Jaccard      |top_k(S) & R| / |top_k(S) | R| with k = |R|     in [0, 1]
- box-time mass      share of S's mass on the time steps the box covers (not in the paper: the
                     time-only view of its claim; uniform saliency scores the box's share of steps)
- box-feature mass   share of S's mass on the features the box covers (any time step; uniform
                     saliency scores the box's share of features)

each averaged over the samples where it is defined (a sample whose mask is empty has no
Euclidean; one whose mask is empty or full has no AUC). A constant saliency map (e.g. all zeros)
scales to S = 0 everywhere, like sklearn's minmax_scale: WJac 0, Euc 1, AUC 0.5. The top-k set of
a map with ties at the k-th value is not unique; ties are broken by position (stable sort), so a
constant map gets the first k cells.

`evaluate_saliency` computes the saliency (the `attribution` package) in batches and scores it,
together with the model's accuracy on the same samples. `explanation_quality` does that for
several methods with the service's default parameters (the numbers are what /explain serves) and
returns the record the manifest keeps under `explanation_quality` (model_store.store).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

METRICS = ("weighted_jaccard", "euclidean", "auc", "topk_jaccard", "box_time_mass", "box_feature_mass")
#: Every method evaluation can compute (the attribution registry's).
METHODS = ("gradient", "input_x_gradient", "integrated_gradients", "smoothgrad", "occlusion", "tsr")
#: What `icaserve evaluate` scores by default: the gradient family, occlusion and TSR (the last two
#: on a subset where asked: occlusion is a forward pass per window, 400 at T = N = 100; TSR hundreds
#: of gradient passes a sample). Occlusion is the one that localises evidence moving between samples
#: (mixed boxes: AUC .98 where the best gradient method reaches .79; README).
QUALITY_METHODS = ("gradient", "input_x_gradient", "integrated_gradients", "smoothgrad", "occlusion", "tsr")
#: The service's defaults (README, /explain parameters), so the scores describe what it serves.
DEFAULT_PARAMS: dict[str, dict[str, Any]] = {
    "integrated_gradients": {"steps": 50},
    "smoothgrad": {"samples": 20, "noise": 0.15, "seed": 0},
    "tsr": {"base_method": "gradient", "threshold_quantile": 0.55, "feature_default": 0.1},
}


# -- per-sample metrics ------------------------------------------------------------------------
def minmax_scale(saliency: np.ndarray) -> np.ndarray:
    """|saliency| of each sample (S, T, N) scaled to [0, 1] over its T x N map; constant -> 0."""
    a = np.abs(np.asarray(saliency, dtype=np.float64))
    flat = a.reshape(len(a), -1)
    lo = flat.min(axis=1, keepdims=True)
    span = flat.max(axis=1, keepdims=True) - lo
    out = (flat - lo) / np.where(span > 0, span, 1.0)
    return out.reshape(a.shape)


def weighted_jaccard(R: np.ndarray, S: np.ndarray) -> np.ndarray:
    """Per sample sum(min(R, S)) / sum(max(R, S)); NaN where both are all zero."""
    R, S = _flat(R), _flat(S)
    num = np.minimum(R, S).sum(axis=1)
    den = np.maximum(R, S).sum(axis=1)
    return np.divide(num, den, out=np.full(len(R), np.nan), where=den > 0)


def euclidean(R: np.ndarray, S: np.ndarray) -> np.ndarray:
    """Per sample ||R - S|| / ||R||; NaN where the mask is empty."""
    R, S = _flat(R), _flat(S)
    num = np.linalg.norm(R - S, axis=1)
    den = np.linalg.norm(R, axis=1)
    return np.divide(num, den, out=np.full(len(R), np.nan), where=den > 0)


def roc_auc(R: np.ndarray, S: np.ndarray) -> np.ndarray:
    """Per sample ROC-AUC of scores S for the binary labels R (Mann-Whitney U, average ranks for
    ties, so a constant S gives 0.5); NaN where R is all 0 or all 1."""
    R, S = _flat(R).astype(bool), _flat(S)
    out = np.full(len(R), np.nan)
    for i, (r, s) in enumerate(zip(R, S)):
        n_pos = int(r.sum())
        n_neg = r.size - n_pos
        if n_pos == 0 or n_neg == 0:
            continue
        ranks = _average_ranks(s)
        out[i] = (ranks[r].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)
    return out


def topk_jaccard(R: np.ndarray, S: np.ndarray) -> np.ndarray:
    """Per sample Jaccard of the k most salient cells with the mask, k = number of mask cells;
    NaN where the mask is empty."""
    R, S = _flat(R).astype(bool), _flat(S)
    out = np.full(len(R), np.nan)
    for i, (r, s) in enumerate(zip(R, S)):
        k = int(r.sum())
        if k == 0:
            continue
        top = np.argsort(-s, kind="stable")[:k]
        inter = int(r[top].sum())
        out[i] = inter / (2 * k - inter)
    return out


def score_saliency(saliency: np.ndarray, masks: np.ndarray) -> dict[str, float]:
    """The four metrics averaged over samples: raw (signed or not) saliency (S, T, N) of the true
    class against boolean masks (S, T, N). Also `n`, the number of samples."""
    saliency = np.asarray(saliency)
    masks = np.asarray(masks)
    if saliency.shape != masks.shape or saliency.ndim != 3:
        raise ValueError(f"saliency {saliency.shape} and masks {masks.shape} must both be (S, T, N)")
    S = minmax_scale(saliency)
    R = masks.astype(np.float64)
    per_sample = {
        "weighted_jaccard": weighted_jaccard(R, S),
        "euclidean": euclidean(R, S),
        "auc": roc_auc(R, S),
        "topk_jaccard": topk_jaccard(R, S),
        "box_time_mass": box_time_mass(R, S),
        "box_feature_mass": box_feature_mass(R, S),
    }
    out = {name: _nanmean(v) for name, v in per_sample.items()}
    out["n"] = float(len(S))
    return out


def _box_share(R: np.ndarray, S: np.ndarray, along: int) -> np.ndarray:
    """Per sample, the share of |saliency| on the box's extent along axis `along` (1: time steps,
    2: features) of (S, T, N) maps, the other axis summed; NaN where the map is all zero or the
    mask empty."""
    R, S = np.asarray(R, dtype=bool), np.abs(np.asarray(S, dtype=np.float64))
    other = 3 - along
    covered = R.any(axis=other)  # (S, T) or (S, N)
    mass = S.sum(axis=other)
    total = mass.sum(axis=1)
    inside = (mass * covered).sum(axis=1)
    ok = (total > 0) & covered.any(axis=1)
    return np.divide(inside, total, out=np.full(len(R), np.nan), where=ok)


def box_time_mass(R: np.ndarray, S: np.ndarray) -> np.ndarray:
    """Per sample, the share of saliency mass on the time steps the box covers (any feature);
    NaN where the map is all zero or the mask empty. A time-only view of "where the evidence
    was": uniform saliency scores the share of steps in the box, vanishing saliency ~0 for an
    early box."""
    return _box_share(R, S, along=1)


def box_feature_mass(R: np.ndarray, S: np.ndarray) -> np.ndarray:
    """Per sample, the share of saliency mass on the features the box covers (any time step);
    NaN where the map is all zero or the mask empty. The feature-only view: uniform saliency
    scores the box's share of features."""
    return _box_share(R, S, along=2)


def chance_levels(masks: np.ndarray) -> dict[str, float]:
    """What an even spread of saliency scores: AUC 0.5, and the box's mean share of time steps
    and of features (the chance level of box_time_mass and box_feature_mass)."""
    R = np.asarray(masks, dtype=bool)
    steps = R.any(axis=2).mean(axis=1)
    feats = R.any(axis=1).mean(axis=1)
    has = R.reshape(len(R), -1).any(axis=1)
    return {"auc": 0.5, "box_time_mass": _nanmean(np.where(has, steps, np.nan)),
            "box_feature_mass": _nanmean(np.where(has, feats, np.nan))}


def time_profile(saliency: np.ndarray) -> np.ndarray:
    """Mean share of saliency mass per time step (T,): each sample's |saliency| normalised to
    sum 1 (a zero map counts as uniform), summed over features, averaged over samples."""
    a = np.abs(np.asarray(saliency, dtype=np.float64))
    per_step = a.sum(axis=2)  # (S, T)
    total = per_step.sum(axis=1, keepdims=True)
    share = np.where(total > 0, per_step / np.where(total > 0, total, 1.0), 1.0 / a.shape[1])
    return share.mean(axis=0)


def _flat(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    return a.reshape(len(a), -1)


def _average_ranks(s: np.ndarray) -> np.ndarray:
    """1-based ranks of s, tied values sharing the mean of their ranks."""
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    starts = np.flatnonzero(np.r_[True, sorted_s[1:] != sorted_s[:-1]])
    ends = np.r_[starts[1:], len(s)]  # exclusive
    mean_rank = (starts + ends + 1) / 2.0  # mean of 1-based ranks start+1 .. end
    ranks = np.empty(len(s))
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def _nanmean(v: np.ndarray) -> float:
    v = v[~np.isnan(v)]
    return float(v.mean()) if len(v) else float("nan")


# -- saliency of a model -----------------------------------------------------------------------
def compute_saliency(
    forward: Callable[[Tensor], Tensor],
    X: np.ndarray | Tensor,
    y: np.ndarray | Tensor,
    method: str = "gradient",
    batch: int = 100,
    **params: Any,
) -> np.ndarray:
    """Raw attribution (S, T, N) of each sample's true class y, `batch` samples per call.

    method: a key of the attribution registry (METHODS); for "tsr" the base method is
    `base_method` (or `base`, the older name; default gradient). Other params go to the method.
    `forward` must be in the mode that is to be explained (eval, dropout off) and take
    standardised inputs.
    """
    from attribution import attribute
    from icaserve.tuning import release_free_memory

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    X = torch.as_tensor(X, dtype=torch.float32)
    targets = torch.as_tensor(np.asarray(y), dtype=torch.long).view(-1, 1)
    if len(X) != len(targets):
        raise ValueError(f"{len(X)} samples but {len(targets)} labels")
    params = dict(params)
    if method == "tsr" and "base" in params:
        params["base_method"] = params.pop("base")
    parts = []
    for start in range(0, len(X), batch):
        xb, tb = X[start : start + batch], targets[start : start + batch]
        a = attribute(method, forward, xb, tb, **params)
        parts.append(a[:, 0].detach().cpu().numpy())
        del a
        release_free_memory()  # each batch's large blocks back to the kernel (icaserve.tuning)
    return np.concatenate(parts, axis=0) if parts else np.zeros((0, *X.shape[1:]), dtype=np.float32)


@torch.no_grad()
def accuracy(forward: Callable[[Tensor], Tensor], X: np.ndarray | Tensor, y: np.ndarray | Tensor,
             batch: int = 256) -> float:
    X = torch.as_tensor(X, dtype=torch.float32)
    y = torch.as_tensor(np.asarray(y), dtype=torch.long)
    correct = 0
    for start in range(0, len(X), batch):
        correct += int((forward(X[start : start + batch]).argmax(1) == y[start : start + batch]).sum())
    return correct / max(len(X), 1)


def evaluate_saliency(
    forward: Callable[[Tensor], Tensor],
    X_std: np.ndarray | Tensor,
    y: np.ndarray | Tensor,
    masks: np.ndarray,
    method: str = "gradient",
    batch: int = 100,
    **params: Any,
) -> dict[str, float]:
    """Accuracy and the saliency metrics of `forward` on standardised inputs X_std (S, T, N) with
    labels y and ground-truth masks (S, T, N); keys: accuracy, weighted_jaccard, euclidean, auc,
    topk_jaccard, box_time_mass, box_feature_mass, n."""
    masks = np.asarray(masks)
    if masks.shape != tuple(np.shape(X_std)):
        raise ValueError(f"masks {masks.shape} must have the inputs' shape {tuple(np.shape(X_std))}")
    saliency = compute_saliency(forward, X_std, y, method, batch, **params)
    return {"accuracy": accuracy(forward, X_std, y), **score_saliency(saliency, masks)}


def explanation_quality(
    forward: Callable[[Tensor], Tensor],
    X_std: np.ndarray | Tensor,
    y: np.ndarray | Tensor,
    masks: np.ndarray,
    *,
    dataset: str,
    seed: int,
    methods: tuple[str, ...] | list[str] = QUALITY_METHODS,
    tsr_samples: int = 20,
    occlusion_samples: int | None = None,
    params: dict[str, dict[str, Any]] | None = None,
    batch: int = 50,
    on_method: Callable[[str, dict[str, float], float], None] | None = None,
) -> dict[str, Any]:
    """Saliency quality per method, as the manifest's `explanation_quality` records it:

        {"dataset", "n_samples", "seed", "accuracy", "methods": {method: {metric: value, "n": scored}},
         "parameters": {method: params}, "chance": {metric: value}}

    Every method scores the true class of the same samples; TSR (hundreds of passes a sample)
    only the first `tsr_samples` (0: TSR is skipped), occlusion the first `occlusion_samples`
    (None: all; 0: skipped). An undefined metric is None, never NaN.
    `on_method(name, scores, seconds)` is called after each method (progress for a CLI).
    """
    import time

    masks = np.asarray(masks)
    if masks.shape != tuple(np.shape(X_std)):
        raise ValueError(f"masks {masks.shape} must have the inputs' shape {tuple(np.shape(X_std))}")
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"methods must be some of {', '.join(METHODS)}, got {list(methods)!r}")
    params = {**DEFAULT_PARAMS, **(params or {})}
    X_std = np.asarray(X_std, dtype=np.float32)
    y = np.asarray(y)
    out: dict[str, Any] = {"dataset": dataset, "n_samples": int(len(X_std)), "seed": int(seed),
                           "accuracy": accuracy(forward, X_std, y), "methods": {}, "parameters": {}}
    for method in methods:
        subset = {"tsr": tsr_samples, "occlusion": occlusion_samples}.get(method)
        n = len(X_std) if subset is None else min(subset, len(X_std))
        if n == 0:
            continue
        method_params = dict(params.get(method, {}))
        extra = {"chunk_size": 100} if method == "tsr" else {}
        start = time.perf_counter()
        # TSR one sample per call: its masked copies of several samples at once held GBs on the
        # hidden-64 shipped model (8.4 GB for 6 samples in one call, 1.5 GB one by one).
        per_call = 1 if method == "tsr" else batch
        saliency = compute_saliency(forward, X_std[:n], y[:n], method, per_call, **method_params, **extra)
        scores = score_saliency(saliency, masks[:n])
        seconds = time.perf_counter() - start
        out["methods"][method] = {k: (None if math.isnan(v) else float(v)) for k, v in scores.items() if k != "n"}
        out["methods"][method]["n"] = int(n)
        if method == "occlusion" and "window" not in method_params:  # record the default it resolved
            from attribution.occlusion import resolve_window

            method_params["window"] = list(resolve_window(X_std.shape[1], X_std.shape[2])[0])
        out["parameters"][method] = method_params
        if on_method is not None:
            on_method(method, out["methods"][method], seconds)
    out["chance"] = {k: (None if math.isnan(v) else v) for k, v in chance_levels(masks).items()}
    return out
