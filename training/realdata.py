"""Real multivariate time-series data, offline: UEA `.ts` files read with sktime's own loader, and
two UEA sets that sktime ships inside its wheel, by name.

Why sktime: the issue asks for a well-kept loader, not a hand-written parser. aeon (the other
maintainer of the format) needs numba < 0.64 in its 1.6 release, which conflicts with the locked
numpy, so the `data` extra pins `sktime>=1.2,<1.3`. Nothing is downloaded: the packaged sets are
the `.ts` files in sktime's installed `datasets/data/<Name>/` folder.

A `.ts` file becomes the project's `Dataset`: X float32 (samples, time, channels), y int, the class
names as the header's `@classLabel` lists them (file order, original case: sktime lowercases
labels), channel names `dim_0`... as sktime names them. Series of unequal length (JapaneseVowels:
7..29 steps) are padded at the end by repeating each series' last value, to the longest series of
the train and test files together, so both splits share one length and no test step is cut; the
true lengths are kept in `meta["lengths"]`.

`python -m training.realdata --report` trains the models of reports/real_data.md and redraws its
figures (see `main`).
"""

from __future__ import annotations

import argparse
import importlib.util
import re
from pathlib import Path
from typing import Any

import numpy as np

from training.datasets import Dataset, DatasetError

#: Packaged sets: name -> (UEA archive name, what it is).
PACKAGED: dict[str, tuple[str, str]] = {
    "basic_motions": ("BasicMotions", "smart-watch 3D accelerometer + 3D gyroscope, 10 s at 10 Hz; "
                      "standing, running, walking, badminton"),
    "japanese_vowels": ("JapaneseVowels", "12 LPC cepstrum coefficients of nine male speakers uttering "
                        "/ae/; the class is the speaker; 7..29 frames"),
}
INSTALL_HINT = "reading .ts data needs sktime: pip install 'icaserve[data]'"
_TRAIN_RE = re.compile(r"_TRAIN(\.ts)$", re.IGNORECASE)
_HEADER_TAGS = ("problemname", "timestamps", "missing", "univariate", "dimensions", "equallength",
                "serieslength", "classlabel", "targetlabel", "data")


def _sktime() -> Any:
    """sktime's .ts reader, or a DatasetError saying how to install it (it is an optional extra)."""
    if importlib.util.find_spec("sktime") is None:
        raise DatasetError(INSTALL_HINT)
    try:
        from sktime.datasets import load_from_tsfile
    except ImportError as exc:
        raise DatasetError(f"{INSTALL_HINT} ({exc})") from None
    return load_from_tsfile


def sktime_data_dir() -> Path:
    """The folder of `.ts` files inside the installed sktime package (never the network)."""
    spec = importlib.util.find_spec("sktime")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError(INSTALL_HINT)
    return Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"


def packaged_names() -> list[str]:
    return list(PACKAGED)


def _resolve_packaged(name: str) -> str | None:
    """The PACKAGED key for `name` (its key or its UEA name, any case), else None."""
    lowered = name.strip().lower()
    for key, (archive, _) in PACKAGED.items():
        if lowered in (key, archive.lower()):
            return key
    return None


def is_real_source(source: str) -> bool:
    """Whether `load` should hand `source` to this module: a `.ts` path or a packaged name."""
    return source.lower().endswith(".ts") or _resolve_packaged(source) is not None


# -- locating what sktime's messages leave out ------------------------------------------------------
def _lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return []


def _data_lines(lines: list[str]) -> list[tuple[int, str]]:
    """(1-based line number, text) of the non-empty lines after `@data`."""
    out, started = [], False
    for number, text in enumerate(lines, 1):
        stripped = text.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if started:
            out.append((number, stripped))
        elif stripped.lower() == "@data":
            started = True
    return out


def _locate(path: Path, message: str) -> str:
    """`line N` or `field @tag` for a reader message, when it can be found; '' otherwise.

    sktime names the line for some errors; for a bad number or a wrong count of dimensions it
    does not, so the first data line holding the bad token (or a different count) is named."""
    match = re.search(r"\bline (\d+)", message)
    if match:
        return f"line {match.group(1)}"
    lines = _lines(path)
    match = re.search(r"could not convert string to float: '(.*)'", message)
    if match:
        token = match.group(1)
        for number, text in _data_lines(lines):
            values = re.split(r"[,:]", text)
            if any(v.strip().lower() == token for v in values):
                return f"line {number}, value {token!r}"
        return f"value {token!r}"
    if "number of dimensions" in message:
        rows = _data_lines(lines)
        if rows:
            first = rows[0][1].count(":")
            for number, text in rows[1:]:
                if text.count(":") != first:
                    return f"line {number}"
    if not any(t.strip().startswith("@") for t in lines):
        return "no .ts header (@problemName ... @data) at all"
    lowered = message.lower()
    if "metadata incomplete" in lowered or "full set of metadata" in lowered:
        present = {t.strip().split()[0].lower().lstrip("@") for t in lines if t.strip().startswith("@")}
        missing = [f"@{t}" for t in ("problemName", "timeStamps", "univariate", "classLabel", "data")
                   if t.lower() not in present]
        return f"field {', '.join(missing)} missing" if missing else ""
    for tag in _HEADER_TAGS:
        if tag in lowered.replace(" ", ""):
            for number, text in enumerate(lines, 1):
                if text.strip().lower().startswith("@" + tag):
                    return f"line {number}, field @{tag}"
            return f"field @{tag}"
    return ""


def _header_labels(path: Path) -> list[str]:
    """The `@classLabel true a b c` values in their file order and case (sktime lowercases them)."""
    for text in _lines(path):
        stripped = text.strip()
        if stripped.lower().startswith("@classlabel"):
            tokens = stripped.split()
            return tokens[2:] if len(tokens) > 2 and tokens[1].lower() == "true" else []
        if stripped.lower() == "@data":
            break
    return []


# -- reading -------------------------------------------------------------------------------------
def _read_ts(path: Path) -> tuple[list[np.ndarray], np.ndarray, list[str], list[str]]:
    """One `.ts` file by sktime: per-sample (T_i, N) float arrays, lowercase labels, the header's
    class labels and the channel names. Every reader failure becomes a DatasetError naming the
    file and, where known, the line or field."""
    load_from_tsfile = _sktime()
    from sktime.datatypes import convert

    if not path.is_file():
        raise DatasetError(f"{path}: no such file")
    try:
        X, y = load_from_tsfile(str(path), return_data_type="nested_univ")
    except (OSError, ValueError, TypeError, IndexError, KeyError) as exc:
        message = str(exc) or type(exc).__name__
        where = _locate(path, message)
        raise DatasetError(f"{path}{': ' + where if where else ''}: not a readable .ts file ({message})") from None
    labels = _header_labels(path)
    if not labels:
        raise DatasetError(f"{path}: field @classLabel: a classification file must list its class labels "
                           "(@classLabel true a b ...)")
    channels = [str(c) for c in X.columns]
    lengths = X.map(len).to_numpy()
    if (lengths == 0).any():
        case, dim = (int(v) for v in np.argwhere(lengths == 0)[0])
        raise DatasetError(f"{path}: case {case + 1}, channel {channels[dim]}: empty series")
    if (lengths == lengths.flat[0]).all():
        cube = np.asarray(convert(X, from_type="nested_univ", to_type="numpy3D"), dtype=np.float64)
        series = [c.T for c in cube]  # sktime: (instance, channel, time); here time x channel
    else:
        series = [np.stack([_pad(np.asarray(X.iat[i, j], dtype=np.float64), int(lengths[i].max()))
                            for j in range(X.shape[1])], axis=1) for i in range(len(X))]
    for i, s in enumerate(series):
        bad = ~np.isfinite(s)
        if bad.any():
            raise DatasetError(f"{path}: case {i + 1} holds {int(bad.sum())} missing or infinite values "
                               "('?' or NaN); fill them before training")
    return series, np.asarray([str(v).strip().lower() for v in y]), labels, channels


def _pad(values: np.ndarray, length: int) -> np.ndarray:
    """A series lengthened to `length` by repeating its last value (held, not zero: a zero is a
    real value for standardised data and would be a step change)."""
    if len(values) >= length:
        return values[:length]
    return np.concatenate([values, np.full(length - len(values), values[-1])])


def _to_dataset(path: Path, series: list[np.ndarray], y_lower: np.ndarray, class_names: list[str],
                channels: list[str], length: int, name: str) -> Dataset:
    lookup = {c.lower(): i for i, c in enumerate(class_names)}
    unknown = sorted(str(v) for v in set(y_lower) - set(lookup))
    if unknown:
        raise DatasetError(f"{path}: labels {unknown[:5]} are not in @classLabel ({' '.join(class_names)})")
    lengths = [len(s) for s in series]
    X = np.stack([np.stack([_pad(s[:, j], length) for j in range(s.shape[1])], axis=1) for s in series])
    meta = {"source": str(path), "lengths": lengths, "min_length": min(lengths), "max_length": max(lengths),
            "padded_to": length if min(lengths) < length else None,
            "padding": "end, last value repeated" if min(lengths) < length else None}
    y = np.asarray([lookup[v] for v in y_lower], dtype=np.int64)
    return Dataset(X.astype(np.float32), y, list(class_names), list(channels), None, name, meta)


def test_sibling(train_path: Path) -> Path | None:
    """`X_TEST.ts` beside `X_TRAIN.ts`, when it exists."""
    if not _TRAIN_RE.search(train_path.name):
        return None
    sibling = train_path.with_name(_TRAIN_RE.sub(lambda m: "_TEST" + m.group(1), train_path.name))
    return sibling if sibling.is_file() else None


def load_ts(path: str | Path, *, name: str | None = None) -> tuple[Dataset, Dataset | None]:
    """A `.ts` file (train) and its `_TEST.ts` sibling when present (test, else None). Both splits
    use the train file's class labels and are padded to one common length."""
    path = Path(path)
    series, y, labels, channels = _read_ts(path)
    name = name or _TRAIN_RE.sub("", path.name).removesuffix(".ts").removesuffix(".TS") or path.stem
    test_path = test_sibling(path)
    test = None
    if test_path is not None:
        t_series, t_y, _, t_channels = _read_ts(test_path)
        if len(t_channels) != len(channels):
            raise DatasetError(f"{test_path}: {len(t_channels)} channels, but {path.name} has {len(channels)}")
        test = (t_series, t_y)
    length = max(len(s) for s in series + (test[0] if test else []))
    train_ds = _to_dataset(path, series, y, labels, channels, length, name)
    test_ds = None if test is None else _to_dataset(test_path, *test, labels, channels, length, name)
    return train_ds, test_ds


def load_packaged(name: str) -> tuple[Dataset, Dataset]:
    """A UEA set shipped inside sktime, by its name here (or its archive name): (train, test)."""
    key = _resolve_packaged(name)
    if key is None:
        raise DatasetError(f"unknown packaged dataset {name!r}; available: {', '.join(PACKAGED)}")
    archive = PACKAGED[key][0]
    folder = sktime_data_dir() / archive
    train_path = folder / f"{archive}_TRAIN.ts"
    if not train_path.is_file():
        raise DatasetError(f"{train_path}: missing from the installed sktime; reinstall icaserve[data]")
    train_ds, test_ds = load_ts(train_path, name=key)
    if test_ds is None:
        raise DatasetError(f"{folder / (archive + '_TEST.ts')}: missing from the installed sktime")
    return train_ds, test_ds


def load_real(source: str) -> tuple[Dataset, Dataset | None]:
    """`training.datasets.load`'s route for `.ts` paths and packaged names."""
    if _resolve_packaged(source) is not None and not Path(source).is_file():
        return load_packaged(source)
    return load_ts(source)


# -- the report (reports/real_data.md) -------------------------------------------------------------
def _class_figure(ds: Dataset, saliency: np.ndarray, valid: np.ndarray, standardized: np.ndarray,
                  title: str, path: Path) -> None:
    """Per class: the class-mean standardised signal and the mean |saliency|, channels x time,
    side by side; padded steps are left out of both means."""
    from matplotlib.figure import Figure

    from icaserve.plots import save_png

    classes = list(range(len(ds.class_names)))
    fig = Figure(figsize=(11, 1.0 + 1.6 * len(classes)), layout="constrained")
    fig.suptitle(title, fontsize=10)
    axes = fig.subplots(len(classes), 2, squeeze=False)
    lim = 0.0
    means, sals = [], []
    for c in classes:
        idx = ds.y == c
        w = valid[idx][..., None].astype(np.float64)  # (n, T, 1)
        count = np.maximum(w.sum(axis=0), 1.0)
        means.append((standardized[idx] * w).sum(axis=0) / count)
        sals.append((np.abs(saliency[idx]) * w).sum(axis=0) / count)
        lim = max(lim, float(np.abs(means[-1]).max()))
    smax = max(float(s.max()) for s in sals) or 1.0
    T, N = ds.n_steps, ds.n_features
    for c in classes:
        for col, (data, cmap, vmin, vmax, label) in enumerate((
                (means[c], "RdBu_r", -lim or -1, lim or 1, "mean signal (z)"),
                (sals[c], "viridis", 0.0, smax, "mean |IG|"))):
            ax = axes[c, col]
            image = ax.imshow(data.T, aspect="auto", interpolation="nearest", cmap=cmap, vmin=vmin, vmax=vmax,
                              extent=(-0.5, T - 0.5, N - 0.5, -0.5))
            ax.set_yticks(range(N), ds.feature_names, fontsize=6)
            ax.set_ylabel(f"{ds.class_names[c]}\nchannel", fontsize=8)
            ax.tick_params(axis="x", labelsize=7, labelbottom=c == len(classes) - 1)
            if c == 0:
                ax.set_title(label + (" (shared colour scale)" if col else " (blue-white-red)"), fontsize=9)
            if c == len(classes) - 1:
                ax.set_xlabel("time step")
            fig.colorbar(image, ax=ax, fraction=0.03, pad=0.01)
    save_png(fig, path)


def nearest_neighbour_baselines(train: Dataset, test: Dataset) -> dict[str, float]:
    """Test accuracy of 1-NN with Euclidean distance and with dependent DTW (squared Euclidean
    cost over all channels, full warping window), the archive's reference classifiers, computed
    here on the same splits (raw values, padded series as loaded) for a baseline that does not
    rest on a number copied from a paper. DTW runs over all test x train pairs at once."""
    a = test.X.astype(np.float64)[:, None]  # (n_test, 1, T, N)
    b = train.X.astype(np.float64)[None]  # (1, n_train, T, N)
    ed = ((a - b) ** 2).sum(axis=(2, 3))
    T = train.n_steps
    prev = np.full((len(test), len(train), T), np.inf)
    for i in range(T):
        row = np.empty_like(prev)
        for j in range(T):
            cost = ((a[:, :, i] - b[:, :, j]) ** 2).sum(-1)
            if i == 0 and j == 0:
                best = 0.0
            else:
                best = np.minimum(prev[:, :, j], row[:, :, j - 1] if j else np.inf)
                if i and j:
                    best = np.minimum(best, prev[:, :, j - 1])
            row[:, :, j] = cost + best
        prev = row
    dtw = prev[:, :, -1]
    return {name: float((train.y[d.argmin(axis=1)] == test.y).mean()) for name, d in (("ed", ed), ("dtw_d", dtw))}


def run_report(out_dir: Path, figures_dir: Path, runs_dir: Path, hidden: int = 32, ig_steps: int = 32) -> dict:
    """Train ICA-LSTM (recipe localise) and LSTM (classic) on both packaged sets with the
    project's `train()` (CPU, seed 0), test them, and draw the saliency figures of the ICA model
    and the plain one. Returns the numbers the report quotes."""
    import json
    import time

    import torch

    from training.datasets import train_val_split
    from training.evaluation import compute_saliency
    from training.models import ModelConfig
    from training.train import TrainConfig, recipe_for, save_checkpoint, train, train_config_dict

    torch.set_num_threads(1)
    figures_dir.mkdir(parents=True, exist_ok=True)
    runs_dir.mkdir(parents=True, exist_ok=True)
    from icaserve.machine import machine_line

    results: dict[str, Any] = {"machine": f"{machine_line()}, 1 thread", "runs": []}
    started = time.perf_counter()
    for key in PACKAGED:
        train_ds, test_ds = load_packaged(key)
        fit_ds, val_ds = train_val_split(train_ds, 0.2, 0)
        # ICA with its default recipe, the plain LSTM with its default (classic) and, to separate
        # the architecture from the recipe, the plain LSTM with the ICA model's recipe.
        for attention, recipe in (("ica", recipe_for("ica")), ("none", recipe_for("none")), ("none", "localise")):
            config = ModelConfig(n_features=train_ds.n_features, n_classes=len(train_ds.class_names),
                                 cell="lstm", attention=attention, hidden=hidden)
            cfg = TrainConfig.from_recipe(recipe, seed=0, device="cpu", progress=False)
            result = train(config, fit_ds, val_ds, cfg, test_ds, description=f"{config.label} on {key}")
            slug = ("ica_lstm" if attention == "ica" else "lstm") + ("" if recipe == recipe_for(attention) else
                                                                    f"_{recipe}")
            save_checkpoint(runs_dir / f"{key}-{slug}.pt", result, train_ds.class_names, train_ds.feature_names,
                            train_ds.n_steps, {"dataset": key, "val_fraction": 0.2, **train_config_dict(cfg)})
            model = result.model.eval()
            xs = result.standardizer.apply(test_ds.X)
            sal = compute_saliency(model, xs, test_ds.y, "integrated_gradients", batch=64, steps=ig_steps)
            lengths = np.asarray(test_ds.meta["lengths"])
            valid = np.arange(test_ds.n_steps)[None, :] < lengths[:, None]
            _class_figure(test_ds, sal, valid, xs,
                          f"{PACKAGED[key][0]} test set, {config.label}, recipe {recipe}: class-mean signal and mean |integrated "
                          f"gradients| of the true class ({ig_steps} steps, zero baseline)",
                          figures_dir / f"real_{key}_{slug}.png")
            row = {"dataset": key, "model": config.label, "recipe": cfg.recipe, "hidden": hidden,
                   "epochs_run": len(result.history), "best_epoch": result.best_epoch, "stopped": result.stopped,
                   "seconds": round(result.seconds, 1), **{f"{k}_accuracy": round(v["accuracy"], 4)
                                                             for k, v in result.metrics.items()}}
            results["runs"].append(row)
            print(row, flush=True)
        results.setdefault("baselines", {})[key] = nearest_neighbour_baselines(train_ds, test_ds)
        print(key, results["baselines"][key], flush=True)
        results.setdefault("data", {})[key] = {
            "n_train": len(train_ds), "n_test": len(test_ds), "steps": train_ds.n_steps,
            "channels": train_ds.n_features, "classes": train_ds.class_names,
            "lengths": [train_ds.meta["min_length"], max(train_ds.meta["max_length"], test_ds.meta["max_length"])]}
    results["wall_seconds"] = round(time.perf_counter() - started, 1)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "real_data.json").write_text(json.dumps(results, indent=1) + "\n")
    return results


def main(argv: list[str] | None = None) -> None:
    """`python -m training.realdata --report`: retrain and redraw reports/real_data.md's numbers
    (reports/real_data.json) and figures (reports/figures/real_*.png); the text is written by hand."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--report", action="store_true", help="train the report's models and draw its figures")
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("reports"))
    parser.add_argument("--runs", type=Path, default=Path("runs/real_data"))
    args = parser.parse_args(argv)
    if not args.report:
        for key, (archive, what) in PACKAGED.items():
            print(f"{key}: UEA {archive} ({what})")
        return
    run_report(args.out, args.out / "figures", args.runs, hidden=args.hidden)


if __name__ == "__main__":
    main()
