"""Datasets: the six synthetic box datasets against the brief's table (PAPER.md), `.npz` user
data (good files round-trip, bad ones give a DatasetError naming the problem), standardisation
and the stratified train/validation split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from training.datasets import (
    BOX_CLASS_NAMES,
    SYNTHETIC,
    Dataset,
    DatasetError,
    Standardizer,
    load,
    load_npz,
    make_box_dataset,
    synthetic_splits,
    train_val_split,
)

# The brief's table at T = N = 100, written out in integers (time steps, [feature bands]),
# half-open, independently of the fractions in training/datasets.py.
_BANDS3 = [(0, 30), (35, 65), (70, 100)]
EXPECTED_BOXES = {
    "earlier_box": [((0, 30), [(10, 90)])],
    "middle_box": [((20, 80), [(20, 80)])],
    "latter_box": [((70, 100), [(10, 90)])],
    "three_earlier_boxes": [((0, 40), _BANDS3)],
    "three_middle_boxes": [((25, 65), _BANDS3)],
    "mixed_boxes": [((t0, t0 + 60), [band]) for t0 in (5, 35) for band in ((0, 60), (40, 100), (20, 80))]
    + [((20, 80), [(20, 80)])],
}


def _mask(box) -> np.ndarray:
    (t0, t1), bands = box
    m = np.zeros((100, 100), dtype=bool)
    for f0, f1 in bands:
        m[t0:t1, f0:f1] = True
    return m


@pytest.fixture(scope="module")
def full_size() -> dict[str, Dataset]:
    """Every dataset at the paper's T = N = 100 (fewer samples than the paper's 1000: enough)."""
    return {name: make_box_dataset(name, 210, seed=3) for name in SYNTHETIC}


def test_six_datasets() -> None:
    assert set(SYNTHETIC) == set(EXPECTED_BOXES)
    assert len(SYNTHETIC) == 6


@pytest.mark.parametrize("name", sorted(EXPECTED_BOXES))
def test_shapes_dtypes_and_balance(full_size: dict[str, Dataset], name: str) -> None:
    ds = full_size[name]
    assert ds.X.shape == (210, 100, 100) and ds.X.dtype == np.float32
    assert ds.y.shape == (210,) and ds.y.dtype == np.int64
    assert ds.masks is not None and ds.masks.shape == ds.X.shape and ds.masks.dtype == bool
    assert np.bincount(ds.y).tolist() == [105, 105]
    assert ds.class_names == BOX_CLASS_NAMES
    assert ds.feature_names == [f"f{i}" for i in range(100)]
    assert (ds.n_steps, ds.n_features, len(ds)) == (100, 100, 210)
    assert ds.name == name
    # An odd count is as balanced as it can be.
    odd = make_box_dataset(name, 7, T=5, N=5, seed=0)
    assert sorted(np.bincount(odd.y).tolist()) == [3, 4]


@pytest.mark.parametrize("name", [n for n in sorted(EXPECTED_BOXES) if n != "mixed_boxes"])
def test_masks_are_the_briefs_boxes(full_size: dict[str, Dataset], name: str) -> None:
    ds = full_size[name]
    (box,) = EXPECTED_BOXES[name]
    expected = _mask(box)
    assert (ds.masks == expected[None]).all()
    (t0, t1), bands = box
    assert expected.sum() == (t1 - t0) * sum(f1 - f0 for f0, f1 in bands)


def test_mixed_boxes_each_sample_gets_one_of_seven(full_size: dict[str, Dataset]) -> None:
    ds = full_size["mixed_boxes"]
    templates = np.stack([_mask(b) for b in EXPECTED_BOXES["mixed_boxes"]])
    assert templates.sum(axis=(1, 2)).tolist() == [3600] * 7  # seven 60 x 60 boxes
    assert len({t.tobytes() for t in templates}) == 7
    match = (ds.masks[:, None] == templates[None]).all(axis=(2, 3))  # (S, 7)
    assert (match.sum(axis=1) == 1).all()
    assert set(match.argmax(axis=1).tolist()) == set(range(7))  # all seven occur


@pytest.mark.parametrize("name", sorted(EXPECTED_BOXES))
def test_box_cells_shift_by_label(full_size: dict[str, Dataset], name: str) -> None:
    ds = full_size[name]
    pos, neg = ds.y == 1, ds.y == 0
    inside_pos = ds.X[pos][ds.masks[pos]]
    inside_neg = ds.X[neg][ds.masks[neg]]
    outside = ds.X[~ds.masks]
    assert abs(inside_pos.mean() - 1.0) < 0.05
    assert abs(inside_neg.mean() + 1.0) < 0.05
    assert abs(outside.mean()) < 0.02
    for cells in (inside_pos, inside_neg, outside):
        assert abs(cells.std() - 1.0) < 0.05  # unit noise everywhere


def test_small_sizes_scale_the_boxes() -> None:
    ds = make_box_dataset("earlier_box", 10, T=20, N=8, seed=0)
    expected = np.zeros((20, 8), dtype=bool)
    expected[0:6, 1:7] = True  # 0-30% of T, 10-90% of N, rounded
    assert (ds.masks == expected).all()


def test_seeded_reproducibility_and_distinct_splits() -> None:
    a = make_box_dataset("middle_box", 50, T=12, N=6, seed=5)
    b = make_box_dataset("middle_box", 50, T=12, N=6, seed=5)
    c = make_box_dataset("middle_box", 50, T=12, N=6, seed=6)
    assert np.array_equal(a.X, b.X) and np.array_equal(a.y, b.y) and np.array_equal(a.masks, b.masks)
    assert not np.array_equal(a.X, c.X)
    tr1, te1 = synthetic_splits("mixed_boxes", 40, 30, T=20, N=10, seed=1)
    tr2, te2 = synthetic_splits("mixed_boxes", 40, 30, T=20, N=10, seed=1)
    assert np.array_equal(tr1.X, tr2.X) and np.array_equal(te1.X, te2.X)
    assert np.array_equal(tr1.masks, tr2.masks) and np.array_equal(te1.y, te2.y)
    assert len(tr1) == 40 and len(te1) == 30
    # Train and test are independent draws: no sample of one appears in the other.
    assert not np.array_equal(tr1.X[:30], te1.X)
    train_rows = {x.tobytes() for x in tr1.X}
    assert not any(x.tobytes() in train_rows for x in te1.X)
    tr3, _ = synthetic_splits("mixed_boxes", 40, 30, T=20, N=10, seed=2)
    assert not np.array_equal(tr1.X, tr3.X)


def test_load_by_name_and_errors() -> None:
    train, test = load("latter_box", n_train=20, n_test=10, T=10, N=5, seed=0)
    assert len(train) == 20 and test is not None and len(test) == 10
    with pytest.raises(DatasetError, match="unknown dataset 'nope'"):
        load("nope")
    with pytest.raises(DatasetError, match="unknown synthetic dataset"):
        make_box_dataset("nope", 10)
    with pytest.raises(DatasetError):
        make_box_dataset("earlier_box", 1)
    with pytest.raises(DatasetError):
        make_box_dataset("earlier_box", 10, T=0)


# -- .npz user data -------------------------------------------------------------------------


def _save(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def _xy(n: int = 6, T: int = 4, N: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, T, N))
    y = np.arange(n) % 2
    return X, y


def test_load_npz_minimal(tmp_path: Path) -> None:
    X, y = _xy()
    ds = load_npz(_save(tmp_path / "mine.npz", X=X, y=y))
    assert ds.X.dtype == np.float32 and np.allclose(ds.X, X)
    assert ds.y.dtype == np.int64 and ds.y.tolist() == y.tolist()
    assert ds.class_names == ["class_0", "class_1"]
    assert ds.feature_names == ["f0", "f1", "f2"]
    assert ds.masks is None
    assert ds.name == "mine"
    # The same through `load` (an .npz has no test split).
    full, test = load(str(tmp_path / "mine.npz"))
    assert test is None and np.array_equal(full.X, ds.X)


def test_load_npz_full(tmp_path: Path) -> None:
    X, y = _xy(n=6, N=3)
    masks = np.zeros(X.shape, dtype=np.uint8)
    masks[:, 1, 2] = 1
    ds = load_npz(
        _save(
            tmp_path / "full.npz",
            X=X.astype(np.float64),
            y=y,
            class_names=np.array(["low", "high"]),
            feature_names=np.array(["hr", "bp", "temp"]),
            masks=masks,
        )
    )
    assert ds.class_names == ["low", "high"]
    assert ds.feature_names == ["hr", "bp", "temp"]
    assert ds.masks is not None and ds.masks.dtype == bool and ds.masks.sum() == 6 and ds.masks[:, 1, 2].all()


def test_load_npz_string_labels(tmp_path: Path) -> None:
    X, _ = _xy(n=5)
    y = np.array(["dog", "cat", "dog", "bird", "cat"])
    ds = load_npz(_save(tmp_path / "s.npz", X=X, y=y))
    assert ds.class_names == ["bird", "cat", "dog"]  # sorted when not given
    assert ds.y.tolist() == [2, 1, 2, 0, 1]
    # With class_names, their order defines the indices (and unused classes are allowed).
    ds2 = load_npz(_save(tmp_path / "s2.npz", X=X, y=y, class_names=np.array(["dog", "cat", "bird", "fish"])))
    assert ds2.class_names == ["dog", "cat", "bird", "fish"]
    assert ds2.y.tolist() == [0, 1, 0, 2, 1]


def test_load_npz_integral_float_labels(tmp_path: Path) -> None:
    X, y = _xy()
    ds = load_npz(_save(tmp_path / "f.npz", X=X, y=y.astype(np.float32)))
    assert ds.y.dtype == np.int64 and ds.y.tolist() == y.tolist()


def _bad_files(tmp_path: Path):
    X, y = _xy()
    X_nan = X.copy()
    X_nan[0, 1, 2] = np.nan
    X_inf = X.copy()
    X_inf[1, 0, 0] = np.inf
    (tmp_path / "text.npz").write_text("this is not a zip archive")
    np.save(tmp_path / "bare.npy", X)
    cases = {
        "missing X": (_save(tmp_path / "a.npz", y=y), "missing array 'X'"),
        "missing y": (_save(tmp_path / "b.npz", X=X), "missing array 'y'"),
        "X 2-D": (_save(tmp_path / "c.npz", X=X[:, :, 0], y=y), "samples x time steps x features"),
        "X 4-D": (_save(tmp_path / "c4.npz", X=X[..., None], y=y), "samples x time steps x features"),
        "X empty": (_save(tmp_path / "c0.npz", X=X[:, :0], y=y), "samples x time steps x features"),
        "X strings": (_save(tmp_path / "cs.npz", X=np.full((6, 4, 3), "a"), y=y), "numeric"),
        "NaN": (_save(tmp_path / "d.npz", X=X_nan, y=y), "NaN"),
        "inf": (_save(tmp_path / "d2.npz", X=X_inf, y=y), "infinite"),
        "y too short": (_save(tmp_path / "e.npz", X=X, y=y[:-1]), "one label per sample"),
        "y 2-D": (_save(tmp_path / "e2.npz", X=X, y=y[:, None]), "one label per sample"),
        "label above range": (
            _save(tmp_path / "f.npz", X=X, y=np.array([0, 1, 2, 0, 1, 2]), class_names=np.array(["a", "b"])),
            "labels must lie in 0..1",
        ),
        "negative label": (_save(tmp_path / "g.npz", X=X, y=np.array([0, 1, -1, 0, 1, 1])), "labels must lie in"),
        "fractional labels": (_save(tmp_path / "h.npz", X=X, y=y + 0.5), "integer class indices"),
        "one class": (_save(tmp_path / "i.npz", X=X, y=np.zeros(6, dtype=int)), "at least two classes"),
        "unknown string label": (
            _save(tmp_path / "j.npz", X=X, y=np.array(list("abcaba")), class_names=np.array(["a", "b"])),
            "not in class_names",
        ),
        "feature_names length": (
            _save(tmp_path / "k.npz", X=X, y=y, feature_names=np.array(["x", "y"])),
            "2 feature_names for 3 features",
        ),
        "masks shape": (_save(tmp_path / "l.npz", X=X, y=y, masks=np.zeros((6, 4, 2), bool)), "masks must have"),
        "not a zip": (tmp_path / "text.npz", "not a readable .npz"),
        "bare .npy": (tmp_path / "bare.npy", "not an .npz archive"),
        "missing file": (tmp_path / "absent.npz", "no such file"),
        "object arrays": (_object_npz(tmp_path / "o.npz", X, y), "not a readable .npz"),
    }
    return cases


def _object_npz(path: Path, X, y) -> Path:
    np.savez(path, X=np.array([X[0], "text"], dtype=object), y=y)  # needs pickle, which is refused
    return path


BAD_CASES = [
    "missing X", "missing y", "X 2-D", "X 4-D", "X empty", "X strings", "NaN", "inf", "y too short", "y 2-D",
    "label above range", "negative label", "fractional labels", "one class", "unknown string label",
    "feature_names length", "masks shape", "not a zip", "bare .npy", "missing file", "object arrays",
]


@pytest.mark.parametrize("case", BAD_CASES)
def test_load_npz_bad_files(tmp_path: Path, case: str) -> None:
    path, message = _bad_files(tmp_path)[case]
    with pytest.raises(DatasetError) as info:
        load_npz(path)
    text = str(info.value)
    assert message in text, text
    assert str(path) in text  # the message names the file
    assert isinstance(info.value, ValueError)


# -- standardisation and splitting ----------------------------------------------------------


def test_standardizer_fit_apply() -> None:
    rng = np.random.default_rng(0)
    X = (rng.standard_normal((40, 15, 3)) * np.array([1.0, 5.0, 0.1]) + np.array([0.0, 10.0, -3.0])).astype(
        np.float32
    )
    X[:, :, 2] = 7.0  # a constant feature must not divide by zero
    std = Standardizer.fit(X)
    assert std.mean.shape == (3,) and std.std.shape == (3,)
    assert std.mean.dtype == np.float32 and std.std.dtype == np.float32
    np.testing.assert_allclose(std.mean, X.mean(axis=(0, 1)), rtol=1e-5)
    assert std.std[2] == 1.0
    Z = std.apply(X)
    assert Z.dtype == np.float32 and Z.shape == X.shape
    np.testing.assert_allclose(Z[..., :2].mean(axis=(0, 1)), 0.0, atol=1e-5)
    np.testing.assert_allclose(Z[..., :2].std(axis=(0, 1)), 1.0, atol=1e-4)
    assert np.allclose(Z[..., 2], 0.0)
    # Any sequence length; a single sample; float64 input comes back float32.
    short = std.apply(X[:2, :1].astype(np.float64))
    assert short.shape == (2, 1, 3) and short.dtype == np.float32
    np.testing.assert_allclose(short, Z[:2, :1], atol=1e-6)
    # Applying the train statistics to other data does not re-fit.
    other = std.apply(X + 1.0)
    np.testing.assert_allclose(other[..., 1], Z[..., 1] + 1.0 / std.std[1], atol=1e-5)


def _tagged(n_per_class: tuple[int, ...]) -> Dataset:
    y = np.concatenate([np.full(k, c) for c, k in enumerate(n_per_class)]).astype(np.int64)
    n = len(y)
    X = np.zeros((n, 2, 1), dtype=np.float32)
    X[:, 0, 0] = np.arange(n)  # each sample's identity
    masks = X > 0
    return Dataset(X, y, [f"c{i}" for i in range(len(n_per_class))], ["f"], masks, "tagged")


def test_train_val_split_is_stratified_and_disjoint() -> None:
    ds = _tagged((80, 20))  # imbalanced, so a non-stratified split would show it
    fit, val = train_val_split(ds, 0.25, seed=0)
    fit_ids = set(fit.X[:, 0, 0].astype(int).tolist())
    val_ids = set(val.X[:, 0, 0].astype(int).tolist())
    assert not fit_ids & val_ids
    assert fit_ids | val_ids == set(range(100))
    assert np.bincount(val.y).tolist() == [20, 5]
    assert np.bincount(fit.y).tolist() == [60, 15]
    # Labels, masks and names travel with their samples.
    assert all(ds.y[i] == c for i, c in zip(val.X[:, 0, 0].astype(int), val.y))
    assert np.array_equal(val.masks, val.X > 0)
    assert val.class_names == ds.class_names and fit.feature_names == ds.feature_names
    # Seeded: same seed same split, another seed another split.
    _, val2 = train_val_split(ds, 0.25, seed=0)
    _, val3 = train_val_split(ds, 0.25, seed=1)
    assert np.array_equal(val.X, val2.X)
    assert set(val3.X[:, 0, 0].tolist()) != set(val.X[:, 0, 0].tolist())


def test_train_val_split_small_class_still_validated() -> None:
    ds = _tagged((30, 2, 3))
    fit, val = train_val_split(ds, 0.1, seed=0)
    assert set(val.y.tolist()) == {0, 1, 2}  # at least one of each class
    assert set(fit.y.tolist()) == {0, 1, 2}
    assert len(fit) + len(val) == len(ds)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_train_val_split_rejects_bad_fraction(fraction: float) -> None:
    with pytest.raises(DatasetError, match="val_fraction"):
        train_val_split(_tagged((5, 5)), fraction, seed=0)
