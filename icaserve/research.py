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
#: Samples occlusion scores by default: 400 forward passes each at T = N = 100 (~1 s on the wide
#: shipped model), so the first 100 of the 300 test samples rather than all.
OCCLUSION_SAMPLES = 100


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
    quick: bool = typer.Option(
        False, "--quick", help="one dataset, LSTM vs ICA-LSTM, both recipes, T=N=40, 400 samples, short caps"),
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
    recipes: Optional[str] = typer.Option(
        None, help="comma-separated training settings: paper (the paper's), localise (the recipe); default both"),
    recipe_models: Optional[str] = typer.Option(
        None, help="comma-separated models also trained with the recipe (default: every model run)"),
    localise_epochs: Optional[int] = typer.Option(None, min=1, help="epoch cap of the recipe runs (default 300)"),
    quality_models: Optional[str] = typer.Option(
        None, help="comma-separated models whose explanations are scored per method (default: every model)"),
    quality_samples: Optional[int] = typer.Option(
        None, min=0, help="test samples scored per method (default 100; 0: no per-method quality)"),
    occlusion_samples: Optional[int] = typer.Option(
        None, min=0, help="of those, the samples occlusion scores (default 50; a forward pass per 5 x 5 window)"),
    seed: int = typer.Option(0),
    out: Optional[Path] = typer.Option(None, help="output folder (default reports/, quick: runs/reproduce-quick/)"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Reproduce the paper: accuracy and saliency quality of plain and ICA models on the box datasets."""
    from training.reproduce import (
        ReproConfig,
        estimated_seconds,
        main_table,
        record_label,
        render_targets,
        run_reproduction,
    )

    changes: dict[str, Any] = {"seed": seed}
    for key, value in (("epochs", epochs), ("ica_epochs", ica_epochs), ("patience", patience), ("n_train", n_train), ("n_test", n_test),
                       ("T", length), ("N", features), ("tsr_samples", tsr_samples), ("jobs", jobs),
                       ("datasets", _split(datasets)), ("models", _split(models)),
                       ("tsr_models", _split(tsr_models)), ("tsr_datasets", _split(tsr_datasets)),
                       ("recipes", _split(recipes)), ("recipe_models", _split(recipe_models)),
                       ("localise_epochs", localise_epochs), ("quality_models", _split(quality_models)),
                       ("quality_samples", quality_samples), ("occlusion_samples", occlusion_samples)):
        if value is not None:
            changes[key] = value
    try:
        cfg = ReproConfig.quick_mode(**changes) if quick else ReproConfig(**changes)
    except (ValueError, TypeError) as exc:
        _fail(str(exc))
    out = out or (REPO / "runs" / "reproduce-quick" if quick else REPO / "reports")
    command = "icaserve " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else None
    # Every job to its epoch cap on idle cores as fast as the reference machine: an upper guide.
    console.print(f"{len(cfg.jobs_list())} jobs on {cfg.jobs} workers; worst case (every epoch cap reached) "
                  f"~{estimated_seconds(cfg) / 60:.1f} min on an idle machine like the reference one")
    result = run_reproduction(cfg, out, progress=progress, command=command)
    Console().print(_metric_table(f"gradient saliency, test set ({result['seconds'] / 60:.1f} min)",
                                  main_table(result)))
    tsr_rows = [(r["dataset"], record_label(r) + " + TSR", r["tsr"]) for r in result["results"] if "tsr" in r]
    if tsr_rows:
        Console().print(_metric_table(f"TSR, first {cfg.tsr_samples} test samples", tsr_rows))
    Console().print("Targets (ICA-LSTM, recipe):", markup=False)
    for line in render_targets(result["targets"]):
        Console().print(line.replace("**", ""), markup=False, highlight=False, soft_wrap=True)
    console.print(f"report: {out / 'reproduction.md'}")


# -- evaluate ----------------------------------------------------------------------------------
QUALITY_LABELS = {
    "auc": "AUC ↑", "topk_jaccard": "top-k Jac ↑", "weighted_jaccard": "WJac ↑", "euclidean": "Euc ↓",
    "box_time_mass": "box-time share ↑", "box_feature_mass": "box-feature share ↑",
}


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
        # The test split does not depend on n_train: the same samples `icaserve train` tested on,
        # which training never saw (nor selected on).
        _, test = synthetic_splits(dataset, 4, n_test, length, n_features, seed)
        return test, f"{dataset} test split (seed {seed}, {n_test} samples, T={length})"
    ds = load_npz(dataset)
    if ds.masks is None:
        raise DatasetError(f"{dataset}: no `masks` array (ground truth) to score saliency against")
    return ds, f"{dataset} ({len(ds)} samples)"


def quality_table(title: str, quality: dict[str, Any]) -> Table:
    """One row per method: the metrics of `explanation_quality`, chance levels in the caption."""
    table = Table(title=title)
    table.add_column("method")
    table.add_column("n", justify="right")
    for label in QUALITY_LABELS.values():
        table.add_column(label, justify="right")
    for method, m in quality["methods"].items():
        table.add_row(method, str(m.get("n", "")), *(
            "–" if m.get(k) is None else f"{m[k]:.3f}" for k in QUALITY_LABELS))
    chance = quality.get("chance", {})
    parts = [f"accuracy {quality['accuracy']:.3f} on {quality['n_samples']} samples"]
    parts += ["chance: AUC 0.5"] + [f"{QUALITY_LABELS[k].rstrip(' ↑')} {v:.2f}" for k, v in chance.items()
                                     if k != "auc" and v is not None]
    table.caption = "; ".join(parts)
    return table


def score_model(
    net: Any, mean: Any, std: Any, n_features: int, train_length: int, training: dict[str, Any], *,
    dataset: Optional[str] = None, n_test: int = 300, length: Optional[int] = None, seed: Optional[int] = None,
    samples: Optional[int] = None, methods: Optional[list[str]] = None, tsr_samples: int = 20,
    occlusion_samples: Optional[int] = OCCLUSION_SAMPLES, ig_steps: int = 50, smoothgrad_samples: int = 20,
    batch: int = 50, report: bool = True,
) -> tuple[dict[str, Any], str]:
    """`explanation_quality` of a loaded model (TorchScript or eager, eval mode, standardised
    inputs) on its dataset: by default the synthetic one it was trained on (the training block
    names it), its held-out test split at the training seed. Returns (quality, description).
    Raises DatasetError/ValueError for data that cannot be scored."""
    import numpy as np

    from training.datasets import DatasetError
    from training.evaluation import QUALITY_METHODS, explanation_quality

    dataset = dataset or training.get("dataset")
    if not dataset:
        raise DatasetError("no --dataset given and the model's training record names none")
    seed = int(training.get("seed", 0)) if seed is None else seed
    ds, description = _eval_data(dataset, n_features, length or train_length, n_test, seed)
    if ds.n_features != n_features:
        raise DatasetError(f"the data has {ds.n_features} features, the model expects {n_features}")
    if samples is not None:
        ds = ds.subset(np.arange(min(samples, len(ds))))
        description += f", first {len(ds)} scored"
    mean_a, std_a = np.asarray(mean, dtype=np.float32), np.asarray(std, dtype=np.float32)
    X = ((ds.X - mean_a) / std_a).astype(np.float32)

    def progress(method: str, scores: dict[str, Any], seconds: float) -> None:
        if report:
            auc = scores.get("auc")
            console.print(f"  {method}: {scores['n']} samples, AUC {'–' if auc is None else f'{auc:.3f}'}, "
                          f"{seconds:.1f} s")

    params = {"integrated_gradients": {"steps": ig_steps},
              "smoothgrad": {"samples": smoothgrad_samples, "noise": 0.15, "seed": 0}}
    quality = explanation_quality(
        net, X, ds.y, ds.masks, dataset=ds.name if dataset in _synthetic() else str(dataset), seed=seed,
        methods=tuple(methods or QUALITY_METHODS), tsr_samples=tsr_samples, occlusion_samples=occlusion_samples,
        params=params, batch=batch,
        on_method=progress)
    quality["length"] = int(ds.n_steps)
    return quality, description


def checkpoint_quality(checkpoint: Path, tsr_samples: int = 20) -> dict[str, Any]:
    """`explanation_quality` of a checkpoint on its own synthetic test split, every default method,
    the table printed: what `icaserve export --evaluate` records. Raises DatasetError/ValueError."""
    from training.models import inference_copy
    from training.train import load_checkpoint

    eager, ckpt = load_checkpoint(checkpoint)
    norm = ckpt["normalization"]
    training = ckpt.get("training", {})
    console.print(f"scoring explanations of {checkpoint} ({eager.config.label})")
    quality, description = score_model(inference_copy(eager), norm["mean"], norm["std"], eager.config.n_features,
                                       ckpt["train_length"], training, n_test=300, tsr_samples=tsr_samples)
    console.print(quality_table(f"{eager.config.label} on {description}", quality))
    return quality


def _synthetic() -> tuple[str, ...]:
    from training.datasets import SYNTHETIC

    return tuple(SYNTHETIC)


def evaluate(
    model: Optional[str] = typer.Option(None, "--model", help="model name in the store"),
    version: str = typer.Option("latest", help="version number or 'latest'"),
    checkpoint: Optional[Path] = typer.Option(None, help="score a checkpoint from `icaserve train` instead"),
    dataset: Optional[str] = typer.Option(
        None, help="synthetic dataset (its test split) or an .npz with `masks`; default: the model's training set"),
    store: Optional[Path] = typer.Option(None, help="model store root"),
    method: Optional[str] = typer.Option(None, help="score only this method (see --methods)"),
    methods: Optional[str] = typer.Option(
        None, help="comma-separated: gradient, input_x_gradient, integrated_gradients, smoothgrad, occlusion, "
        "tsr (default: all six)"),
    n_test: int = typer.Option(300, min=2, help="synthetic data: test samples"),
    length: Optional[int] = typer.Option(None, min=1, help="synthetic data: time steps (default: training length)"),
    seed: Optional[int] = typer.Option(None, help="synthetic data: seed (default: the training seed)"),
    samples: Optional[int] = typer.Option(None, min=1, help="score only the first SAMPLES samples"),
    tsr_samples: int = typer.Option(20, min=0, help="samples TSR scores (it costs T + ~N*T/2 passes each)"),
    occlusion_samples: int = typer.Option(
        OCCLUSION_SAMPLES, min=0, help="samples occlusion scores (a forward pass per 5 x 5 window each)"),
    ig_steps: int = typer.Option(50, min=1, help="integrated gradients: steps (the service's default)"),
    smoothgrad_samples: int = typer.Option(20, min=1, help="SmoothGrad: noisy copies (the service's default)"),
    batch: int = typer.Option(50, min=1, help="samples per saliency call"),
    json_out: Optional[str] = typer.Option(None, "--json", help="also write the scores as JSON to this file ('-': stdout)"),
    publish: Optional[str] = typer.Option(
        None, help="with --checkpoint: export it under this name with the scores in its manifest"),
    write: bool = typer.Option(
        False, "--write", help="with --model: publish a new version of it (same files) with the scores in its manifest"),
) -> None:
    """Score a model's explanations against ground truth, per saliency method: ROC-AUC, top-k and
    weighted Jaccard, Euclidean, box-time and box-feature share, with accuracy beside them.

    --publish (a checkpoint) or --write (a stored model; versions are immutable, so a new version
    with the same files) records them in the manifest under `explanation_quality`.
    """
    from model_store import ModelStore, StoreError
    from training.datasets import DatasetError
    from training.evaluation import METHODS, QUALITY_METHODS

    if (model is None) == (checkpoint is None):
        _fail("give exactly one of --model (a stored model) or --checkpoint")
    if publish and checkpoint is None:
        _fail("--publish needs --checkpoint (stored versions are immutable; --write makes a new one)")
    if write and model is None:
        _fail("--write needs --model (for a checkpoint use --publish NAME)")
    if method is not None and methods is not None:
        _fail("give --method or --methods, not both")
    chosen = [method] if method is not None else (_split(methods) or list(QUALITY_METHODS))
    bad = [m for m in chosen if m not in METHODS]
    if bad:
        _fail(f"unknown method {bad[0]!r}: methods are {', '.join(METHODS)}")
    if method == "tsr" and samples is not None:
        tsr_samples = samples  # one method asked for by name: score all the samples asked for
    elif method == "tsr":
        tsr_samples = n_test
    if method == "occlusion":
        occlusion_samples = samples if samples is not None else n_test
    store_root = store or _default_store()
    try:
        if model is not None:
            net, manifest = _load_stored(store_root, model, version)
            mean, std = manifest.normalization.mean, manifest.normalization.std
            n_features = manifest.input.n_features
            train_length = manifest.input.train_length or 100
            training = manifest.training
            source = f"{manifest.name} v{manifest.version} ({manifest.architecture.get('label')})"
        else:
            from training.models import inference_copy
            from training.train import load_checkpoint

            eager, ckpt = load_checkpoint(checkpoint)
            net = inference_copy(eager)
            mean, std = ckpt["normalization"]["mean"], ckpt["normalization"]["std"]
            n_features, train_length = eager.config.n_features, ckpt["train_length"]
            training = ckpt.get("training", {})
            source = f"{checkpoint} ({eager.config.label})"
        start = time.perf_counter()
        quality, description = score_model(
            net, mean, std, n_features, train_length, training, dataset=dataset, n_test=n_test, length=length,
            seed=seed, samples=samples, methods=chosen, tsr_samples=tsr_samples,
            occlusion_samples=occlusion_samples, ig_steps=ig_steps,
            smoothgrad_samples=smoothgrad_samples, batch=batch)
    except (StoreError, DatasetError, ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
    seconds = time.perf_counter() - start
    out = Console(stderr=json_out == "-")
    out.print(quality_table(f"{source} on {description} ({seconds:.1f} s)", quality))
    first = next(iter(quality["methods"]), None)
    # "scores": the first method's metrics with accuracy, the format before per-method scoring.
    scores = {"accuracy": quality["accuracy"], **quality["methods"][first]} if first else {}
    payload = {"source": source, "dataset": description, "method": first, "seconds": seconds, "scores": scores,
               "explanation_quality": quality}
    if json_out == "-":
        print(json.dumps(payload, indent=2))
    elif json_out:
        path = Path(json_out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=2) + "\n")
        console.print(f"scores: {path}")
    if write:
        try:
            v = ModelStore(store_root).republish(model, version, {"explanation_quality": quality})
        except StoreError as exc:
            _fail(str(exc))
        console.print(f"[green]published[/] {model} v{v} in {store_root}: the files of v{manifest.version} "
                      "with explanation_quality in its manifest")
    if publish:
        from training.export import ExportError, export_checkpoint

        legacy = {}
        if "gradient" in quality["methods"]:  # the key older clients read
            g = quality["methods"]["gradient"]
            legacy["saliency_gradient"] = {"accuracy": quality["accuracy"],
                                           **{k: float(v) for k, v in g.items() if v is not None}}
        try:
            v = export_checkpoint(ModelStore(store_root), publish, checkpoint, extra_metrics=legacy,
                                  explanation_quality=quality)
        except (ExportError, StoreError, ValueError, FileNotFoundError) as exc:
            _fail(str(exc))
        console.print(f"[green]published[/] {publish} v{v} in {store_root} with explanation_quality")


def register(app: typer.Typer) -> None:
    app.command("reproduce")(reproduce)
    app.command("evaluate")(evaluate)
