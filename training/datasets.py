"""Datasets: the paper's six synthetic box datasets (seeded, in memory, with ground-truth masks)
and user data from `.npz` files.

A sample is T x N (time steps x features). Background cells ~ N(0, 1); for the box datasets the
label y in {-1, +1} (class 0 / class 1) shifts the cells inside the informative box to N(y, 1).
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# Boxes as (t_start, t_end, [(f_start, f_end), ...]) in fractions of T and N (half-open), so the
# same datasets can be made small for quick runs. At T = N = 100 these are the brief's integers.
_BANDS3 = [(0.0, 0.3), (0.35, 0.65), (0.7, 1.0)]
BOXES: dict[str, list[tuple[float, float, list[tuple[float, float]]]]] = {
    "earlier_box": [(0.0, 0.3, [(0.1, 0.9)])],
    "middle_box": [(0.2, 0.8, [(0.2, 0.8)])],
    "latter_box": [(0.7, 1.0, [(0.1, 0.9)])],
    "three_earlier_boxes": [(0.0, 0.4, _BANDS3)],
    "three_middle_boxes": [(0.25, 0.65, _BANDS3)],
    # One of seven 60 x 60 boxes per sample.
    "mixed_boxes": [
        (t0, t0 + 0.6, [band]) for t0 in (0.05, 0.35) for band in ((0.0, 0.6), (0.4, 1.0), (0.2, 0.8))
    ]
    + [(0.2, 0.8, [(0.2, 0.8)])],
}
SYNTHETIC = tuple(BOXES)
BOX_CLASS_NAMES = ["negative", "positive"]


class DatasetError(ValueError):
    """A data file or request for data that cannot be used; the message says why."""


@dataclass
class Dataset:
    X: np.ndarray  # (S, T, N) float32
    y: np.ndarray  # (S,) int64 class indices
    class_names: list[str]
    feature_names: list[str]
    masks: np.ndarray | None = None  # (S, T, N) bool ground truth, when known
    name: str = "data"
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.y)

    @property
    def n_steps(self) -> int:
        return self.X.shape[1]

    @property
    def n_features(self) -> int:
        return self.X.shape[2]

    def subset(self, idx: np.ndarray) -> "Dataset":
        masks = None if self.masks is None else self.masks[idx]
        return Dataset(self.X[idx], self.y[idx], self.class_names, self.feature_names, masks, self.name, self.meta)


def _box_mask(box: tuple[float, float, list[tuple[float, float]]], T: int, N: int) -> np.ndarray:
    t0, t1, bands = box
    mask = np.zeros((T, N), dtype=bool)
    for f0, f1 in bands:
        mask[round(t0 * T) : round(t1 * T), round(f0 * N) : round(f1 * N)] = True
    return mask


def make_box_dataset(name: str, n_samples: int, T: int = 100, N: int = 100, seed: int = 0) -> Dataset:
    """One split of a synthetic box dataset; balanced labels, reproducible from `seed`."""
    if name not in BOXES:
        raise DatasetError(f"unknown synthetic dataset {name!r}; choose one of {', '.join(SYNTHETIC)}")
    if n_samples < 2 or T < 1 or N < 1:
        raise DatasetError("need n_samples >= 2, T >= 1 and N >= 1")
    rng = np.random.default_rng(seed)
    y = np.repeat([0, 1], [n_samples // 2, n_samples - n_samples // 2])
    rng.shuffle(y)
    templates = np.stack([_box_mask(b, T, N) for b in BOXES[name]])
    which = rng.integers(0, len(templates), size=n_samples)
    masks = templates[which]
    X = rng.standard_normal((n_samples, T, N)).astype(np.float32)
    signs = np.where(y == 1, 1.0, -1.0).astype(np.float32)
    X += masks * signs[:, None, None]
    features = [f"f{i}" for i in range(N)]
    return Dataset(X, y.astype(np.int64), list(BOX_CLASS_NAMES), features, masks, name, {"seed": seed})


def synthetic_splits(
    name: str, n_train: int = 1000, n_test: int = 300, T: int = 100, N: int = 100, seed: int = 0
) -> tuple[Dataset, Dataset]:
    """Train and test splits drawn independently (different seeds derived from `seed`)."""
    ss = np.random.SeedSequence(seed)
    s_train, s_test = (int(s.generate_state(1)[0]) for s in ss.spawn(2))
    return (
        make_box_dataset(name, n_train, T, N, s_train),
        make_box_dataset(name, n_test, T, N, s_test),
    )


def load_npz(path: str | Path) -> Dataset:
    """User data: `X` (samples x T x N), `y` (labels: ints 0..C-1 or strings), optional
    `class_names`, `feature_names` and `masks` (samples x T x N ground truth)."""
    path = Path(path)
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.lib.npyio.NpzFile):
            with loaded as f:
                arrays = {k: f[k] for k in f.files}
    except FileNotFoundError:
        raise DatasetError(f"{path}: no such file") from None
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DatasetError(f"{path}: not a readable .npz file ({exc})") from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):  # a bare .npy array has no X / y names
        raise DatasetError(f"{path}: a single .npy array, not an .npz archive; save X and y with np.savez")
    for key in ("X", "y"):
        if key not in arrays:
            raise DatasetError(f"{path}: missing array {key!r} (found: {sorted(arrays) or 'none'})")
    X, y = arrays["X"], arrays["y"]
    if X.ndim != 3 or 0 in X.shape:
        raise DatasetError(f"{path}: X must be samples x time steps x features, got shape {X.shape}")
    if not np.issubdtype(X.dtype, np.number):
        raise DatasetError(f"{path}: X must be numeric, got dtype {X.dtype}")
    X = X.astype(np.float32)
    if not np.isfinite(X).all():
        raise DatasetError(f"{path}: X holds {int((~np.isfinite(X)).sum())} NaN or infinite values")
    if y.ndim != 1 or len(y) != len(X):
        raise DatasetError(f"{path}: y must be one label per sample ({len(X)}), got shape {y.shape}")
    if "class_names" in arrays:
        class_names = [str(c) for c in arrays["class_names"]]
    elif y.dtype.kind in "US":
        class_names = sorted({str(v) for v in y})
    else:
        class_names = None
    if y.dtype.kind in "US":
        lookup = {c: i for i, c in enumerate(class_names)}
        unknown = sorted({str(v) for v in y} - set(lookup))
        if unknown:
            raise DatasetError(f"{path}: labels {unknown[:5]} are not in class_names")
        y = np.array([lookup[str(v)] for v in y])
    elif y.dtype.kind not in "iu" and not (y.dtype.kind == "f" and np.all(y == np.round(y))):
        raise DatasetError(f"{path}: y must hold integer class indices or strings, got dtype {y.dtype}")
    y = y.astype(np.int64)
    n_classes = len(class_names) if class_names else int(y.max()) + 1
    if y.min() < 0 or y.max() >= n_classes:
        raise DatasetError(f"{path}: labels must lie in 0..{n_classes - 1}, got {y.min()}..{y.max()}")
    if n_classes < 2:
        raise DatasetError(f"{path}: need at least two classes")
    class_names = class_names or [f"class_{i}" for i in range(n_classes)]
    feature_names = [str(f) for f in arrays.get("feature_names", [f"f{i}" for i in range(X.shape[2])])]
    if len(feature_names) != X.shape[2]:
        raise DatasetError(f"{path}: {len(feature_names)} feature_names for {X.shape[2]} features")
    masks = arrays.get("masks")
    if masks is not None:
        if masks.shape != X.shape:
            raise DatasetError(f"{path}: masks must have X's shape {X.shape}, got {masks.shape}")
        masks = masks.astype(bool)
    return Dataset(X, y, class_names, feature_names, masks, path.stem)


def load(source: str, *, n_train: int = 1000, n_test: int = 300, T: int = 100, N: int = 100,
         seed: int = 0) -> tuple[Dataset, Dataset | None]:
    """A synthetic dataset by name (train, test); a UEA `.ts` file (train, its `_TEST.ts` sibling or
    None) or a UEA set packaged with sktime by name (train, test), both via training/realdata.py;
    or an .npz file (all of it, no test split)."""
    from training import realdata  # imports sktime only when a .ts source is read

    if source in BOXES:
        return synthetic_splits(source, n_train, n_test, T, N, seed)
    if realdata.is_real_source(source):
        return realdata.load_real(source)
    if source.endswith(".npz") or Path(source).exists():
        return load_npz(source), None
    raise DatasetError(f"unknown dataset {source!r}: give a synthetic name ({', '.join(SYNTHETIC)}), "
                       f"a packaged real set ({', '.join(realdata.PACKAGED)}), or a .ts or .npz path")


def train_val_split(ds: Dataset, val_fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """Stratified split, so validation (the only thing model selection looks at) is balanced."""
    if not 0.0 < val_fraction < 1.0:
        raise DatasetError(f"val_fraction must be in (0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    val_idx = []
    for c in np.unique(ds.y):
        idx = np.flatnonzero(ds.y == c)
        rng.shuffle(idx)
        val_idx.extend(idx[: max(1, round(len(idx) * val_fraction))])
    val = np.zeros(len(ds), dtype=bool)
    val[val_idx] = True
    return ds.subset(np.flatnonzero(~val)), ds.subset(np.flatnonzero(val))


@dataclass(frozen=True)
class Standardizer:
    """Per-feature standardisation fitted on training data; works for any sequence length."""

    mean: np.ndarray  # (N,)
    std: np.ndarray  # (N,)

    @classmethod
    def fit(cls, X: np.ndarray) -> "Standardizer":
        mean = X.mean(axis=(0, 1)).astype(np.float32)
        std = X.std(axis=(0, 1)).astype(np.float32)
        return cls(mean, np.where(std > 1e-8, std, 1.0).astype(np.float32))

    def apply(self, X: np.ndarray) -> np.ndarray:
        return ((X - self.mean) / self.std).astype(np.float32)
