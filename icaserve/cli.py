"""`icaserve`: one command for the whole life of a model: train, export, list, serve, reproduce."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    help="Explainable time-series models with input-cell attention: train, export, serve.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
DEFAULT_STORE = Path(os.environ.get("ICASERVE_STORE", Path(__file__).resolve().parent.parent / "model_store"))


@app.callback()
def _setup(ctx: typer.Context) -> None:
    from icaserve.tuning import tune_malloc

    if ctx.invoked_subcommand != "serve":  # the service applies it per its ICASERVE_TUNE_MALLOC setting
        tune_malloc()


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(2)


@app.command()
def train(
    dataset: str = typer.Option("middle_box", help="synthetic dataset name or path to an .npz file (X, y, ...)"),
    cell: str = typer.Option("lstm", help="lstm, gru or rnn"),
    attention: str = typer.Option("ica", help="none, ica (input-cell attention) or self (over hidden states)"),
    variant: str = typer.Option("matrix", help="ICA variant: matrix (paper) or mean"),
    hidden: int = typer.Option(5, min=1),
    layers: int = typer.Option(1, min=1),
    bidirectional: bool = typer.Option(False, "--bidirectional"),
    dropout: float = typer.Option(0.1, min=0.0, max=0.99),
    r: int = typer.Option(20, "--hops", min=1, help="attention hops r (not --r: torchrun would take that)"),
    d_a: int = typer.Option(50, min=1, help="attention hidden size"),
    epochs: int = typer.Option(100, min=1),
    batch_size: int = typer.Option(50, min=1),
    lr: float = typer.Option(1e-3, min=0.0),
    patience: int = typer.Option(15, min=1, help="early stopping: epochs without validation improvement"),
    val_fraction: float = typer.Option(0.2, min=0.01, max=0.9),
    seed: int = typer.Option(0),
    n_train: int = typer.Option(1000, min=4, help="synthetic data: training samples"),
    n_test: int = typer.Option(300, min=2, help="synthetic data: test samples"),
    length: int = typer.Option(100, min=1, help="synthetic data: time steps T"),
    features: int = typer.Option(100, min=1, help="synthetic data: features N"),
    device: str = typer.Option("auto", help="auto (GPU when present), cpu or cuda"),
    out: Optional[Path] = typer.Option(None, help="checkpoint path (default runs/<dataset>-<model>.pt)"),
    export: Optional[str] = typer.Option(None, help="also publish the trained model under this name"),
    store: Path = typer.Option(DEFAULT_STORE, help="model store root (for --export)"),
) -> None:
    """Train a classifier; selects on a validation split, reports test accuracy when there is a test set."""
    from training.datasets import DatasetError, load, train_val_split
    from training.models import ModelConfig
    from training.train import TrainConfig, save_checkpoint, train_config_dict
    from training.train import train as run_training

    if export:
        from model_store import StoreError, check_name

        try:
            check_name(export)  # refuse a bad name before training, not after
        except StoreError as exc:
            _fail(str(exc))
    try:
        train_ds, test_ds = load(dataset, n_train=n_train, n_test=n_test, T=length, N=features, seed=seed)
        fit_ds, val_ds = train_val_split(train_ds, val_fraction, seed)
        config = ModelConfig(
            n_features=train_ds.n_features, n_classes=len(train_ds.class_names), cell=cell, attention=attention,
            ica_variant=variant, hidden=hidden, layers=layers, bidirectional=bidirectional, dropout=dropout,
            r=r, d_a=d_a,
        )
    except (DatasetError, ValueError) as exc:
        _fail(str(exc))
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, patience=patience, seed=seed, device=device)
    result = run_training(config, fit_ds, val_ds, cfg, test_ds, description=f"{config.label} on {train_ds.name}")
    if int(os.environ.get("RANK", "0")) != 0:
        return  # under torchrun, only rank 0 writes
    slug = config.label.lower().replace(" ", "").replace("(", "-").replace(")", "").replace("+", "-")
    path = out or Path("runs") / f"{train_ds.name}-{slug}.pt"
    info = {"dataset": dataset, "val_fraction": val_fraction, "n_train": len(fit_ds), "n_val": len(val_ds),
            **train_config_dict(cfg)}
    save_checkpoint(path, result, train_ds.class_names, train_ds.feature_names, train_ds.n_steps, info)
    _print_metrics(result.metrics, f"{config.label} on {train_ds.name} (best epoch {result.best_epoch}, "
                   f"{result.seconds:.1f} s)")
    console.print(f"checkpoint: {path}")
    if export:
        _export(store, export, path)


def _print_metrics(metrics: dict[str, dict[str, float]], title: str) -> None:
    table = Table(title=title)
    table.add_column("split")
    keys = sorted({k for m in metrics.values() for k in m})
    for k in keys:
        table.add_column(k, justify="right")
    for split, m in metrics.items():
        table.add_row(split, *(f"{m[k]:.4f}" if k in m else "" for k in keys))
    console.print(table)


def _export(store_root: Path, name: str, checkpoint: Path, max_length: Optional[int] = None,
            with_onnx: bool = True) -> int:
    from model_store import ModelStore, StoreError
    from training.export import ExportError, export_checkpoint

    try:
        version = export_checkpoint(ModelStore(store_root), name, checkpoint, max_length=max_length,
                                    with_onnx=with_onnx)
    except (ExportError, StoreError, ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
    console.print(f"[green]published[/] {name} v{version} in {store_root}")
    return version


@app.command("export")
def export_cmd(
    checkpoint: Path = typer.Argument(..., help="checkpoint written by `icaserve train`"),
    name: str = typer.Option(..., "--name", help="model name in the store"),
    store: Path = typer.Option(DEFAULT_STORE, help="model store root"),
    max_length: Optional[int] = typer.Option(None, min=1, help="longest sequence the service accepts"),
    onnx: bool = typer.Option(True, "--onnx/--no-onnx", help="also write an ONNX file for /predict"),
) -> None:
    """Publish a checkpoint as the next version of a model (parity-checked, atomic)."""
    _export(store, name, checkpoint, max_length, onnx)


@app.command()
def models(
    name: Optional[str] = typer.Argument(None, help="show one model's versions and latest manifest"),
    store: Path = typer.Option(DEFAULT_STORE, help="model store root"),
    as_json: bool = typer.Option(False, "--json", help="print the manifest(s) as JSON"),
) -> None:
    """List the models in the store, or show one."""
    from model_store import ModelStore, StoreError

    st = ModelStore(store)
    try:
        names = [name] if name else st.models()
        manifests = [st.manifest(n) for n in names]
    except StoreError as exc:
        _fail(str(exc))
    if as_json:
        print(json.dumps([m.model_dump() for m in manifests], indent=2))
        return
    table = Table(title=f"models in {st.root}")
    for col in ("name", "versions", "latest", "architecture", "features", "classes", "val acc", "test acc", "created"):
        table.add_column(col)
    for m in manifests:
        acc = m.metrics.get("validation", {}).get("accuracy")
        test = m.metrics.get("test", {}).get("accuracy")
        table.add_row(
            m.name, ",".join(map(str, st.versions(m.name))), str(m.version), str(m.architecture.get("label")),
            str(m.input.n_features), ", ".join(m.input.class_names),
            "" if acc is None else f"{acc:.3f}", "" if test is None else f"{test:.3f}", m.created_at,
        )
    Console().print(table)


@app.command()
def serve(
    host: Optional[str] = typer.Option(None, help="bind address [ICASERVE_HOST, default 127.0.0.1]"),
    port: Optional[int] = typer.Option(None, help="port [ICASERVE_PORT, default 8000]"),
    store: Optional[Path] = typer.Option(None, help="model store root [ICASERVE_STORE, default: the shipped one]"),
    workers: Optional[int] = typer.Option(None, min=1, help="worker processes [ICASERVE_WORKERS, default 1]"),
    device: Optional[str] = typer.Option(None, help="auto, cpu or cuda [ICASERVE_DEVICE]"),
    default_model: Optional[str] = typer.Option(None, help="model for /predict and /explain [ICASERVE_DEFAULT_MODEL]"),
    backend: Optional[str] = typer.Option(None, help="torch or onnx, for /predict [ICASERVE_PREDICT_BACKEND]"),
    batching: Optional[bool] = typer.Option(None, "--batching/--no-batching", help="[ICASERVE_BATCHING]"),
    max_batch_size: Optional[int] = typer.Option(None, min=1, help="[ICASERVE_MAX_BATCH_SIZE, default 32]"),
    max_wait_ms: Optional[float] = typer.Option(None, min=0, help="[ICASERVE_MAX_WAIT_MS, default 0]"),
    log_json: Optional[bool] = typer.Option(None, "--log-json/--log-text", help="[ICASERVE_LOG_JSON]"),
) -> None:
    """Serve /predict, /explain and the Open Inference Protocol over the model store (uvicorn).

    Every flag has an ICASERVE_* environment variable; see the README for all settings
    (keys, limits, queues)."""
    import shutil
    import tempfile

    flags = {"host": host, "port": port, "store": store, "workers": workers, "device": device,
             "default_model": default_model, "predict_backend": backend, "batching": batching,
             "max_batch_size": max_batch_size, "max_wait_ms": max_wait_ms, "log_json": log_json}
    for key, value in flags.items():
        if value is not None:
            os.environ[f"ICASERVE_{key.upper()}"] = str(value).lower() if isinstance(value, bool) else str(value)
    from pydantic import ValidationError

    from service.settings import Settings

    try:
        settings = Settings()
    except ValidationError as exc:
        _fail(str(exc))
    own_mp_dir = None
    if settings.workers > 1:
        # Metrics across workers: a fresh directory every start, set before any worker imports the client.
        mp_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or tempfile.mkdtemp(prefix="icaserve-metrics-")
        own_mp_dir = None if os.environ.get("PROMETHEUS_MULTIPROC_DIR") else mp_dir
        shutil.rmtree(mp_dir, ignore_errors=True)
        os.makedirs(mp_dir)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = mp_dir
        if not os.environ.get("ICASERVE_CONTROL_DIR"):  # POST /admin/reload reaches every worker through it
            import atexit

            os.environ["ICASERVE_CONTROL_DIR"] = control_dir = tempfile.mkdtemp(prefix="icaserve-control-")
            atexit.register(shutil.rmtree, control_dir, True)
    import signal

    import uvicorn

    def _exit_0(*_: object) -> None:
        raise SystemExit(0)

    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal to our handler, which would
    # otherwise be the default one and kill us with status 143 (skipping the clean-up below): a
    # graceful stop exits 0, as it does with several workers.
    signal.signal(signal.SIGTERM, _exit_0)
    from service.server import APP, uvicorn_options

    try:
        uvicorn.run(APP, **uvicorn_options(settings))  # tests/conftest.py serves with this command too
    finally:
        if own_mp_dir is not None:  # ours, made above: leave no temp folder behind
            shutil.rmtree(own_mp_dir, ignore_errors=True)


from icaserve import research; research.register(app)  # noqa: E402,E702  reproduce, evaluate


def main() -> None:
    app()


if __name__ == "__main__":
    main()
