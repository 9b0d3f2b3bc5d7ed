"""Pictures of explanations for the command line (`icaserve explain --png`): the same view as the
browser viewer (/viewer): a time x feature saliency heatmap with its colour bar, the time profile
under it and the feature profile beside it, the true box outlined when one is known, and the
input-cell attention matrix for ICA models.

Colour maps as in the viewer, both colour-blind safe: viridis for magnitudes (absolute saliency),
RdBu_r (blue-white-red, symmetric about 0) for signed values. Drawn with matplotlib's Agg canvas
directly (no pyplot): no display needed and no global backend switched in the caller's process.

`explanation_npz` writes the numbers with the keys the viewer's .npz download uses.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.collections import LineCollection
from matplotlib.patches import Rectangle


def _ticks(n: int, most: int) -> np.ndarray:
    step = max(1, int(np.ceil(n / most)))
    return np.arange(0, n, step)


def _outline(mask: np.ndarray) -> list[list[tuple[float, float]]]:
    """Cell edges between a masked cell and an unmasked one (or the border), in heatmap
    coordinates (x: time, y: feature; cells centred on integers)."""
    padded = np.pad(mask, 1)
    segments = []
    for t, f in np.argwhere(mask):
        x0, x1, y0, y1 = t - 0.5, t + 0.5, f - 0.5, f + 0.5
        if not padded[t, f + 1]:
            segments.append([(x0, y0), (x0, y1)])
        if not padded[t + 2, f + 1]:
            segments.append([(x1, y0), (x1, y1)])
        if not padded[t + 1, f]:
            segments.append([(x0, y0), (x1, y0)])
        if not padded[t + 1, f + 2]:
            segments.append([(x0, y1), (x1, y1)])
    return segments


def draw_explanation(
    inputs: np.ndarray,
    saliency: np.ndarray,
    time_profiles: np.ndarray,
    feature_profiles: np.ndarray,
    *,
    feature_names: Sequence[str],
    target_names: Sequence[str],
    title: str,
    signed: bool,
    mask: np.ndarray | None = None,
    attention: np.ndarray | None = None,
) -> Figure:
    """One row per target: heatmap (features down, time across), feature profile, colour bar;
    the time profile under each heatmap. `saliency` is K x T x N, the profiles K x T and K x N;
    `mask` (T x N bool), the ground truth, is outlined."""
    k, t_len, n_feat = saliency.shape
    rows = 2 * k + (1 if attention is not None else 0)
    heights = [4, 1.2] * k + ([5] if attention is not None else [])
    fig = Figure(figsize=(11, 1.0 + 1.1 * sum(heights) * 0.75), layout="constrained")
    grid = fig.add_gridspec(rows, 3, width_ratios=[8, 1.6, 0.25], height_ratios=heights)
    fig.suptitle(title)
    cmap = "RdBu_r" if signed else "viridis"
    for i in range(k):
        sal = saliency[i]
        ax = fig.add_subplot(grid[2 * i, 0])
        if signed:
            m = float(np.abs(sal).max()) or 1.0
            vmin, vmax = -m, m
        else:
            vmin, vmax = float(sal.min()), float(sal.max())
            if vmax <= vmin:
                vmax = vmin + 1.0
        image = ax.imshow(sal.T, aspect="auto", interpolation="nearest", cmap=cmap, vmin=vmin, vmax=vmax,
                          origin="upper", extent=(-0.5, t_len - 0.5, n_feat - 0.5, -0.5))
        if mask is not None and mask.shape == sal.shape:
            for colour, width in (("black", 3.0), ("white", 1.2)):
                ax.add_collection(LineCollection(_outline(mask), colors=colour, linewidths=width))
        hot_t, hot_f = np.unravel_index(int(np.argmax(np.abs(sal))), sal.shape)
        ax.add_patch(Rectangle((hot_t - 0.5, hot_f - 0.5), 1, 1, fill=False, edgecolor="#e69f00", linewidth=2))
        yt = _ticks(n_feat, 25)
        ax.set_yticks(yt, [str(feature_names[j]) if j < len(feature_names) else f"f{j}" for j in yt], fontsize=7)
        ax.set_ylabel("feature")
        ax.set_title(f"target {target_names[i]}: hottest cell time {hot_t}, "
                     f"{feature_names[hot_f] if hot_f < len(feature_names) else hot_f}", fontsize=9)
        ax.tick_params(labelbottom=False)
        fp = fig.add_subplot(grid[2 * i, 1], sharey=ax)
        fp.barh(np.arange(n_feat), feature_profiles[i], height=0.9, color="#0b5cad")
        fp.set_title("feature profile", fontsize=8)
        fp.tick_params(labelleft=False, labelsize=7)
        cb = fig.add_subplot(grid[2 * i, 2])
        fig.colorbar(image, cax=cb, label="saliency" if not signed else "saliency (signed)")
        tp = fig.add_subplot(grid[2 * i + 1, 0], sharex=ax)
        tp.bar(np.arange(t_len), time_profiles[i], width=0.9, color="#0b5cad")
        tp.set_xlabel("time step")
        tp.set_ylabel("time\nprofile", fontsize=8)
        tp.tick_params(labelsize=7)
    if attention is not None:
        ax = fig.add_subplot(grid[rows - 1, 0])
        lower = attention[np.tril_indices(len(attention))]
        hi = float(np.quantile(lower, 0.99)) if lower.size else 1.0
        image = ax.imshow(attention, aspect="equal", interpolation="nearest", cmap="viridis", vmin=0,
                          vmax=hi or 1.0)
        ax.set_xlabel("attended time step")
        ax.set_ylabel("time step t")
        ax.set_title("input-cell attention (averaged over hops; colours capped at the 99th percentile)", fontsize=9)
        fig.colorbar(image, cax=fig.add_subplot(grid[rows - 1, 2]), label="weight")
    return fig


def save_png(fig: Figure, path: str | Path) -> None:
    FigureCanvasAgg(fig)
    fig.savefig(path, format="png", dpi=110)


def explanation_npz(path: str | Path, *, inputs: np.ndarray, answer: dict[str, Any], meta: dict[str, Any],
                    mask: np.ndarray | None = None) -> None:
    """The numbers of one sequence's explanation (an /explain answer's `explanations[i]`), with
    the keys of the viewer's download: inputs, saliency (K x T x N), time_profile, feature_profile,
    targets, logits, probabilities, attention (T x T, when asked for), mask, meta (UTF-8 JSON)."""
    atts = answer["attributions"]
    arrays: dict[str, np.ndarray] = {
        "inputs": np.asarray(inputs, dtype=np.float32),
        "saliency": np.asarray([a["saliency"] for a in atts], dtype=np.float32),
        "time_profile": np.asarray([a["time_profile"] for a in atts], dtype=np.float32),
        "feature_profile": np.asarray([a["feature_profile"] for a in atts], dtype=np.float32),
        "targets": np.asarray([a["target_index"] for a in atts], dtype=np.int32),
        "logits": np.asarray(answer["prediction"]["logits"], dtype=np.float32),
        "probabilities": np.asarray(list(answer["prediction"]["probabilities"].values()), dtype=np.float32),
    }
    if answer.get("attention") is not None:
        arrays["attention"] = np.asarray(answer["attention"], dtype=np.float32)
    if mask is not None:
        arrays["mask"] = np.asarray(mask, dtype=np.uint8)
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    Path(path).write_bytes(buf.getvalue())
