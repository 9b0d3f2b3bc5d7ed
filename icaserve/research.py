"""Research commands: `icaserve reproduce` (the paper's synthetic experiments) and
`icaserve evaluate` (saliency quality of a stored model or a checkpoint against ground truth).

Registered on the main app by `icaserve.cli` (`research.register(app)`); kept apart so the serving
commands do not import matplotlib or the evaluation code.
"""

from __future__ import annotations

import io
import json
import math
import shlex
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

console = Console(stderr=True)
REPO = Path(__file__).resolve().parent.parent


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(2)


def _default_store() -> Path:
    from icaserve.cli import DEFAULT_STORE

    return DEFAULT_STORE


def _split(value: Optional[str]) -> Optional[list[str]]:
    if value is None:
        return None
    items = [v.strip() for v in value.split(",") if v.strip()]
    return items


def _metric_table(title: str, rows: list[tuple[str, str, dict[str, float]]]) -> Table:
    from training.reproduce import METRIC_LABELS

    table = Table(title=title)
    table.add_column("dataset")
    table.add_column("model")
    for label in METRIC_LABELS.values():
        table.add_column(label, justify="right")
    for dataset, model, m in rows:
        table.add_row(dataset, model, *(
            "–" if m.get(k) is None or math.isnan(m[k]) else f"{m[k]:.3f}" for k in METRIC_LABELS))
    return table


def reproduce(
    quick: bool = typer.Option(False, "--quick", help="one dataset, LSTM vs ICA-LSTM, T=N=40, 400 samples, 15 epochs"),
    datasets: Optional[str] = typer.Option(None, help="comma-separated synthetic datasets (default: all six)"),
    models: Optional[str] = typer.Option(
        None, help="comma-separated: lstm, bilstm, lstm_self, ica_lstm, ica_lstm_mean, gru, ica_gru, rnn, ica_rnn"),
    epochs: Optional[int] = typer.Option(None, min=1, help="epoch cap for plain models (default 60)"),
    ica_epochs: Optional[int] = typer.Option(None, min=1, help="epoch cap for ICA models (default 6)"),
    patience: Optional[int] = typer.Option(None, min=1, help="early stopping patience (epochs)"),
    n_train: Optional[int] = typer.Option(None, min=4),
    n_test: Optional[int] = typer.Option(None, min=2),
    length: Optional[int] = typer.Option(None, min=2, help="time steps T"),
    features: Optional[int] = typer.Option(None, min=2, help="features N"),
    tsr_samples: Optional[int] = typer.Option(None, min=0, help="test samples scored with TSR (0: no TSR)"),
    tsr_models: Optional[str] = typer.Option(None, help="comma-separated models that get TSR (default lstm,ica_lstm)"),
    tsr_datasets: Optional[str] = typer.Option(None, help="comma-separated datasets with TSR (default: all run)"),
    jobs: Optional[int] = typer.Option(None, min=1, help="worker processes (one thread each)"),
    seed: int = typer.Option(0),
    out: Optional[Path] = typer.Option(None, help="output folder (default reports/, quick: runs/reproduce-quick/)"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Reproduce the paper: accuracy and saliency quality of plain and ICA models on the box datasets."""
    from training.reproduce import ReproConfig, main_table, run_reproduction

    changes: dict[str, Any] = {"seed": seed}
    for key, value in (("epochs", epochs), ("ica_epochs", ica_epochs), ("patience", patience), ("n_train", n_train), ("n_test", n_test),
                       ("T", length), ("N", features), ("tsr_samples", tsr_samples), ("jobs", jobs),
                       ("datasets", _split(datasets)), ("models", _split(models)),
                       ("tsr_models", _split(tsr_models)), ("tsr_datasets", _split(tsr_datasets))):
        if value is not None:
            changes[key] = value
    try:
        cfg = ReproConfig.quick_mode(**changes) if quick else ReproConfig(**changes)
    except (ValueError, TypeError) as exc:
        _fail(str(exc))
    out = out or (REPO / "runs" / "reproduce-quick" if quick else REPO / "reports")
    command = "icaserve " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else None
    result = run_reproduction(cfg, out, progress=progress, command=command)
    Console().print(_metric_table(f"gradient saliency, test set ({result['seconds'] / 60:.1f} min)",
                                  main_table(result)))
    tsr_rows = [(r["dataset"], r["label"] + " + TSR", r["tsr"]) for r in result["results"] if "tsr" in r]
    if tsr_rows:
        Console().print(_metric_table(f"TSR, first {cfg.tsr_samples} test samples", tsr_rows))
    console.print(f"report: {out / 'reproduction.md'}")


# -- evaluate ----------------------------------------------------------------------------------
def _load_stored(store_root: Path, name: str, version: str):
    """The store's TorchScript (checksum-verified bytes) and its manifest."""
    import torch

    from model_store import ModelStore

    manifest, data = ModelStore(store_root).read_file(name, version, "torchscript")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        model = torch.jit.load(io.BytesIO(data), map_location="cpu")
    model.eval()
    return model, manifest


def _eval_data(dataset: str, n_features: int, length: int, n_test: int, seed: int):
    """(X raw, y, masks, description) of a synthetic test split or an .npz with masks."""
    from training.datasets import SYNTHETIC, DatasetError, load_npz, synthetic_splits

    if dataset in SYNTHETIC:
        # The test split does not depend on n_train: the same samples `icaserve train` tested on.
        _, test = synthetic_splits(dataset, 4, n_test, length, n_features, seed)
        return test, f"{dataset} test split (seed {seed}, {n_test} samples, T={length})"
    ds = load_npz(dataset)
    if ds.masks is None:
        raise DatasetError(f"{dataset}: no `masks` array (ground truth) to score saliency against")
    return ds, f"{dataset} ({len(ds)} samples)"


def evaluate(
    model: Optional[str] = typer.Option(None, "--model", help="model name in the store"),
    version: str = typer.Option("latest", help="version number or 'latest'"),
    checkpoint: Optional[Path] = typer.Option(None, help="score a checkpoint from `icaserve train` instead"),
    dataset: str = typer.Option(..., help="synthetic dataset name (its test split) or an .npz with `masks`"),
    store: Optional[Path] = typer.Option(None, help="model store root"),
    method: str = typer.Option("gradient", help="gradient or tsr (TSR over gradient)"),
    n_test: int = typer.Option(300, min=2, help="synthetic data: test samples"),
    length: Optional[int] = typer.Option(None, min=1, help="synthetic data: time steps (default: training length)"),
    seed: int = typer.Option(0, help="synthetic data: seed (the one given to `icaserve train`)"),
    samples: Optional[int] = typer.Option(None, min=1, help="score only the first SAMPLES samples (TSR is costly)"),
    batch: int = typer.Option(50, min=1, help="samples per saliency call"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="also write the scores to this JSON file"),
    publish: Optional[str] = typer.Option(
        None, help="with --checkpoint: export it under this name with the scores in the manifest's metrics"),
) -> None:
    """Score a model's saliency against ground-truth masks: accuracy, WJac, Euc, AUC, top-k Jaccard.

    With --checkpoint and --publish, the checkpoint is exported to the store (like `icaserve
    export`) with the scores recorded as metrics["saliency_<method>"] in its manifest.
    """
    import numpy as np

    from model_store import StoreError
    from training.datasets import DatasetError
    from training.evaluation import METHODS, evaluate_saliency

    if (model is None) == (checkpoint is None):
        _fail("give exactly one of --model (a stored model) or --checkpoint")
    if publish and checkpoint is None:
        _fail("--publish needs --checkpoint (stored versions are immutable)")
    if method not in METHODS:
        _fail(f"method must be one of {', '.join(METHODS)}")
    store_root = store or _default_store()
    try:
        if model is not None:
            net, manifest = _load_stored(store_root, model, version)
            mean, std = manifest.normalization.mean, manifest.normalization.std
            n_features = manifest.input.n_features
            train_length = manifest.input.train_length or 100
            source = f"{manifest.name} v{manifest.version} ({manifest.architecture.get('label')})"
        else:
            from training.models import inference_copy
            from training.train import load_checkpoint

            eager, ckpt = load_checkpoint(checkpoint)
            net = inference_copy(eager)
            mean, std = ckpt["normalization"]["mean"], ckpt["normalization"]["std"]
            n_features, train_length = eager.config.n_features, ckpt["train_length"]
            source = f"{checkpoint} ({eager.config.label})"
        ds, description = _eval_data(dataset, n_features, length or train_length, n_test, seed)
    except (StoreError, DatasetError, ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
    if ds.n_features != n_features:
        _fail(f"the data has {ds.n_features} features, the model expects {n_features}")
    if samples is not None:
        ds = ds.subset(np.arange(min(samples, len(ds))))
        description += f", first {len(ds)} scored"
    mean_a, std_a = np.asarray(mean, dtype=np.float32), np.asarray(std, dtype=np.float32)
    X = ((ds.X - mean_a) / std_a).astype(np.float32)
    start = time.perf_counter()
    extra = {"chunk_size": 100} if method == "tsr" else {}
    scores = evaluate_saliency(net, X, ds.y, ds.masks, method=method, batch=batch, **extra)
    seconds = time.perf_counter() - start
    Console().print(_metric_table(f"{source} on {description}, {method} saliency ({seconds:.1f} s)",
                                  [(ds.name, source, scores)]))
    payload = {"source": source, "dataset": description, "method": method, "seconds": seconds, "scores": scores}
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(payload, indent=2) + "\n")
        console.print(f"scores: {json_out}")
    if publish:
        from model_store import ModelStore
        from training.export import ExportError, export_checkpoint

        key = f"saliency_{method}"
        metrics = {key: {**{k: float(v) for k, v in scores.items()}, "n": float(len(ds))}}
        try:
            v = export_checkpoint(ModelStore(store_root), publish, checkpoint, extra_metrics=metrics)
        except (ExportError, StoreError, ValueError, FileNotFoundError) as exc:
            _fail(str(exc))
        console.print(f"[green]published[/] {publish} v{v} in {store_root} with metrics[{key!r}]")


def register(app: typer.Typer) -> None:
    app.command("reproduce")(reproduce)
    app.command("evaluate")(evaluate)
