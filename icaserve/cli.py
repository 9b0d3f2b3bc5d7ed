"""`icaserve`: one command for the whole life of a model: train, export, list, serve, reproduce."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

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
    dataset: str = typer.Option(
        "middle_box", help="synthetic dataset name; a real UEA set packaged with sktime (basic_motions, "
        "japanese_vowels; needs icaserve[data]); a UEA .ts file (its _TEST.ts sibling is the test set); "
        "or an .npz file (X, y, ...)"),
    cell: str = typer.Option("lstm", help="lstm, gru or rnn"),
    attention: str = typer.Option("ica", help="none, ica (input-cell attention) or self (over hidden states)"),
    variant: str = typer.Option("matrix", help="ICA variant: matrix (paper) or mean"),
    hidden: Optional[int] = typer.Option(
        None, min=1, help="hidden size (default 5; ICA models trained with the localise recipe: 64)"),
    layers: int = typer.Option(1, min=1),
    bidirectional: bool = typer.Option(False, "--bidirectional"),
    dropout: float = typer.Option(0.1, min=0.0, max=0.99),
    r: int = typer.Option(20, "--hops", min=1, help="attention hops r (not --r: torchrun would take that)"),
    d_a: int = typer.Option(50, min=1, help="attention hidden size"),
    recipe: str = typer.Option(
        "auto", help="auto (localise for ICA models, classic otherwise), localise (Adam, L2 weight decay 1e-2 "
        "except on the ICA attention's weights, train to a validation-loss plateau; ICA models: hidden 64) or "
        "classic (Adam, no weight decay, select on accuracy); the flags override it"),
    epochs: Optional[int] = typer.Option(None, min=1, help="epoch cap (recipe: localise 500, classic 100)"),
    batch_size: int = typer.Option(50, min=1),
    lr: float = typer.Option(1e-3, min=0.0),
    optimizer: Optional[str] = typer.Option(None, help="adam (coupled L2) or adamw (decoupled weight decay)"),
    weight_decay: Optional[float] = typer.Option(None, min=0.0, help="weight decay (recipe: localise 1e-2, classic 0)"),
    patience: Optional[int] = typer.Option(
        None, min=1, help="early stopping: epochs without validation improvement (localise 20, classic 15)"),
    min_delta: Optional[float] = typer.Option(None, min=0.0, help="smallest validation-loss drop that counts"),
    select: Optional[str] = typer.Option(None, help="improvement by validation loss or accuracy (ties by loss)"),
    lr_schedule: Optional[str] = typer.Option(None, help="none, cosine (over the epoch cap) or plateau (halve)"),
    attention_entropy: Optional[float] = typer.Option(
        None, min=0.0, help="weight of the ICA attention-entropy penalty (0: off)"),
    attention_weight_decay: Optional[float] = typer.Option(
        None, min=0.0, help="weight decay of the ICA attention's weights (recipe: localise 0, classic "
        "--weight-decay); 0 lets the gradient's time profile find evidence inside the sequence (README)"),
    val_fraction: float = typer.Option(0.2, min=0.01, max=0.9),
    seed: int = typer.Option(0),
    n_train: int = typer.Option(1000, min=4, help="synthetic data: training samples"),
    n_test: int = typer.Option(300, min=2, help="synthetic data: test samples"),
    length: int = typer.Option(100, min=1, help="synthetic data: time steps T"),
    features: int = typer.Option(100, min=1, help="synthetic data: features N"),
    device: str = typer.Option("auto", help="auto (GPU when present), cpu or cuda"),
    out: Optional[Path] = typer.Option(None, help="checkpoint path (default runs/<dataset>-<model>.pt)"),
    export: Optional[str] = typer.Option(None, help="also publish the trained model under this name"),
    evaluate: bool = typer.Option(False, "--evaluate", help="with --export: record explanation quality (see export)"),
    store: Path = typer.Option(DEFAULT_STORE, help="model store root (for --export)"),
) -> None:
    """Train a classifier; selects on a validation split, reports test accuracy when there is a test set."""
    from training.datasets import DatasetError, load, train_val_split
    from training.models import ModelConfig
    from training.train import TrainConfig, recipe_for, recipe_model, save_checkpoint, train_config_dict
    from training.train import train as run_training

    if export:
        from model_store import StoreError, check_name

        try:
            check_name(export)  # refuse a bad name before training, not after
        except StoreError as exc:
            _fail(str(exc))
    recipe = recipe_for(attention) if recipe == "auto" else recipe
    if hidden is None:
        hidden = recipe_model(recipe, attention).get("hidden", ModelConfig.hidden)
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
    try:
        cfg = TrainConfig.from_recipe(
            recipe, epochs=epochs, batch_size=batch_size, lr=lr,
            optimizer=optimizer, weight_decay=weight_decay, patience=patience, min_delta=min_delta, select=select,
            lr_schedule=lr_schedule, attention_entropy=attention_entropy,
            attention_weight_decay=attention_weight_decay, seed=seed, device=device)
        if cfg.attention_entropy > 0 and attention != "ica":
            raise ValueError("--attention-entropy needs --attention ica")
        if attention_weight_decay is not None and attention != "ica":
            raise ValueError("--attention-weight-decay needs --attention ica")
    except ValueError as exc:
        _fail(str(exc))
    result = run_training(config, fit_ds, val_ds, cfg, test_ds, description=f"{config.label} on {train_ds.name}")
    if int(os.environ.get("RANK", "0")) != 0:
        return  # under torchrun, only rank 0 writes
    slug = config.label.lower().replace(" ", "").replace("(", "-").replace(")", "").replace("+", "-")
    path = out or Path("runs") / f"{train_ds.name}-{slug}.pt"
    info = {"dataset": dataset, "val_fraction": val_fraction, "n_train": len(fit_ds), "n_val": len(val_ds),
            **train_config_dict(cfg)}
    save_checkpoint(path, result, train_ds.class_names, train_ds.feature_names, train_ds.n_steps, info)
    _print_metrics(result.metrics, f"{config.label} on {train_ds.name}, recipe {cfg.recipe} (best epoch "
                   f"{result.best_epoch} of {len(result.history)}, stopped at {result.stopped}, {result.seconds:.1f} s)")
    console.print(f"checkpoint: {path}")
    if export:
        _export(store, export, path, evaluate=evaluate)


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
            with_onnx: bool = True, evaluate: bool = False) -> int:
    from model_store import ModelStore, StoreError
    from training.datasets import DatasetError
    from training.export import ExportError, export_checkpoint

    try:
        quality = None
        if evaluate:  # explanation quality per method on the checkpoint's own synthetic test split
            from icaserve.research import checkpoint_quality

            quality = checkpoint_quality(checkpoint)
        version = export_checkpoint(ModelStore(store_root), name, checkpoint, max_length=max_length,
                                    with_onnx=with_onnx, explanation_quality=quality)
    except (ExportError, StoreError, DatasetError, ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
    console.print(f"[green]published[/] {name} v{version} in {store_root}"
                  + (" with explanation_quality" if evaluate else ""))
    return version


@app.command("export")
def export_cmd(
    checkpoint: Path = typer.Argument(..., help="checkpoint written by `icaserve train`"),
    name: str = typer.Option(..., "--name", help="model name in the store"),
    store: Path = typer.Option(DEFAULT_STORE, help="model store root"),
    max_length: Optional[int] = typer.Option(None, min=1, help="longest sequence the service accepts"),
    onnx: bool = typer.Option(True, "--onnx/--no-onnx", help="also write an ONNX file for /predict"),
    evaluate: bool = typer.Option(
        False, "--evaluate", help="score explanation quality per method on the training set's synthetic test "
        "split and record it in the manifest (explanation_quality)"),
) -> None:
    """Publish a checkpoint as the next version of a model (parity-checked, atomic)."""
    _export(store, name, checkpoint, max_length, onnx, evaluate)


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
    workers: Optional[int] = typer.Option(None, min=0, help="worker processes, 0: one per CPU core [ICASERVE_WORKERS, default 0]"),
    device: Optional[str] = typer.Option(None, help="auto, cpu or cuda [ICASERVE_DEVICE]"),
    default_model: Optional[str] = typer.Option(None, help="model for /predict and /explain [ICASERVE_DEFAULT_MODEL]"),
    backend: Optional[str] = typer.Option(None, help="torch or onnx, for /predict [ICASERVE_PREDICT_BACKEND]"),
    batching: Optional[bool] = typer.Option(None, "--batching/--no-batching", help="[ICASERVE_BATCHING]"),
    max_batch_size: Optional[int] = typer.Option(None, min=1, help="[ICASERVE_MAX_BATCH_SIZE, default 32]"),
    max_wait_ms: Optional[float] = typer.Option(None, min=0, help="[ICASERVE_MAX_WAIT_MS, default 0]"),
    log_json: Optional[bool] = typer.Option(None, "--log-json/--log-text", help="[ICASERVE_LOG_JSON]"),
    grpc_port: Optional[int] = typer.Option(None, min=0, max=65535,
                                            help="Open Inference Protocol gRPC port [ICASERVE_GRPC_PORT, default 8081]"),
    grpc: Optional[bool] = typer.Option(None, "--grpc/--no-grpc", help="serve gRPC beside HTTP [ICASERVE_GRPC_ENABLED, "
                                        "default on]"),
) -> None:
    """Serve /predict, /explain and the Open Inference Protocol over the model store (uvicorn).

    Every flag has an ICASERVE_* environment variable; see the README for all settings
    (keys, limits, queues)."""
    import shutil
    import tempfile

    flags = {"host": host, "port": port, "store": store, "workers": workers, "device": device,
             "default_model": default_model, "predict_backend": backend, "batching": batching,
             "max_batch_size": max_batch_size, "max_wait_ms": max_wait_ms, "log_json": log_json,
             "grpc_port": grpc_port, "grpc_enabled": grpc}
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
        if settings.workers > 1:
            from service.server import run_workers

            run_workers(settings)
        else:
            uvicorn.run(APP, **uvicorn_options(settings))  # tests/conftest.py serves with this command too
    finally:
        if own_mp_dir is not None:  # ours, made above: leave no temp folder behind
            shutil.rmtree(own_mp_dir, ignore_errors=True)


# -- predict / explain: a file against a running service or the local store ---------------------

def _auth(api_key: Optional[str]) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


class _Service:
    """The JSON API of a running service (`--url`, httpx) or of the local store served in this
    process (`--store`: the service's own app, so models load, are checked and answer exactly as
    they do when served, errors included)."""

    def __init__(self, url: Optional[str], store: Optional[Path], model: Optional[str], api_key: Optional[str]) -> None:
        if url and store:
            _fail("give --url (a running service) or --store (a local model store), not both")
        self.url, self.store, self.model, self.api_key = url, store or DEFAULT_STORE, model, api_key

    def __enter__(self) -> "_Service":
        import httpx

        if self.url:
            self.client = httpx.Client(base_url=self.url, headers=_auth(self.api_key), timeout=300.0)
            self._exit = self.client.close
        else:
            import warnings

            with warnings.catch_warnings():  # starlette asks for httpx2 in a future version; httpx works
                warnings.simplefilter("ignore")  # StarletteDeprecationWarning
                from starlette.testclient import TestClient

            from service.app import create_app
            from service.settings import Settings

            settings = Settings(store=self.store, default_model=self.model, poll_interval_s=0, api_key=None,
                                admin_key=None, log_level="warning", request_timeout_s=300)
            test_client = TestClient(create_app(settings), raise_server_exceptions=False)
            self.client = test_client.__enter__()  # runs the app's start-up: loads the store's models
            self._exit = lambda: test_client.__exit__(None, None, None)
        return self

    def __exit__(self, *_: object) -> None:
        self._exit()

    def call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        """The answer's JSON, or exit 2 printing the service's error (message, code, field)."""
        import httpx

        try:
            r = self.client.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            _fail(f"cannot reach the service at {self.url}: {exc}")
        try:
            body = r.json()
        except ValueError:
            body = None
        if r.status_code != 200 or not isinstance(body, dict):
            if isinstance(body, dict) and "error" in body:
                where = f", field {body['field']}" if body.get("field") else ""
                _fail(f"{body['error']} (HTTP {r.status_code}, {body.get('code')}{where})")
            _fail(f"HTTP {r.status_code}: {r.text[:300]}")
        return body

    def path(self, what: str, version: Optional[str]) -> str:
        if not self.model:
            if version:
                _fail("--version needs --model")
            return f"/{what}"
        return f"/models/{self.model}" + (f"/versions/{version}" if version else "") + f"/{what}"


def _read_input(file: Path) -> Any:
    from service.viewer import UploadError, read_path

    try:
        return read_path(file)
    except UploadError as exc:
        _fail(exc.message)


@app.command("predict")
def predict_cmd(
    file: Path = typer.Argument(..., help=".json (T x N, a list of them, or {\"inputs\": ...}), .csv (rows = time "
                                "steps, optional header of feature names) or .npz (X or inputs)"),
    url: Optional[str] = typer.Option(None, help="a running service, e.g. http://127.0.0.1:8000"),
    store: Optional[Path] = typer.Option(None, help="a local model store, served in this process [default: the "
                                         "shipped one, when no --url]"),
    model: Optional[str] = typer.Option(None, help="model name [default: the service's default model]"),
    version: Optional[str] = typer.Option(None, help="model version [default: latest]"),
    api_key: Optional[str] = typer.Option(None, envvar="ICASERVE_CLIENT_API_KEY", help="bearer key for --url"),
    as_json: bool = typer.Option(False, "--json", help="print the service's answer as JSON"),
) -> None:
    """Class probabilities for every sequence of FILE."""
    upload = _read_input(file)
    with _Service(url, store, model, api_key) as svc:
        answer = svc.call("POST", svc.path("predict", version), json={"inputs": upload.inputs})
    if as_json:
        print(json.dumps(answer, indent=2))
        return
    table = Table(title=f"{answer['model']} v{answer['version']}: {file.name}")
    names = list(answer["predictions"][0]["probabilities"])
    for col in ("sequence", "label", *names):
        table.add_column(col, justify="right" if col in names else "left")
    for i, p in enumerate(answer["predictions"]):
        table.add_row(str(i), p["label"], *(f"{p['probabilities'][c]:.4f}" for c in names))
    Console().print(table)


@app.command("explain")
def explain_cmd(
    file: Path = typer.Argument(..., help=".json, .csv or .npz, as for `icaserve predict`"),
    png: Path = typer.Option(..., help="write the picture here (heatmap, profiles, attention)"),
    method: str = typer.Option("gradient", help="gradient, input_x_gradient, integrated_gradients, smoothgrad, "
                               "occlusion or tsr"),
    target: str = typer.Option("predicted", help="predicted, all, or a class name or index"),
    param: list[str] = typer.Option([], "--param", help="method parameter as key=value (JSON value), e.g. steps=32; "
                                    "repeatable"),
    signed: bool = typer.Option(False, "--signed", help="signed attributions (default: absolute saliency)"),
    normalize: str = typer.Option("none", help="none, minmax or sum"),
    attention: bool = typer.Option(False, "--attention", help="also draw the input-cell attention (ICA models)"),
    sequence: int = typer.Option(0, min=0, help="which sequence of FILE"),
    npz: Optional[Path] = typer.Option(None, help="also write the numbers here (.npz, the viewer's keys)"),
    url: Optional[str] = typer.Option(None, help="a running service, e.g. http://127.0.0.1:8000"),
    store: Optional[Path] = typer.Option(None, help="a local model store [default: the shipped one, when no --url]"),
    model: Optional[str] = typer.Option(None, help="model name [default: the service's default model]"),
    version: Optional[str] = typer.Option(None, help="model version [default: latest]"),
    api_key: Optional[str] = typer.Option(None, envvar="ICASERVE_CLIENT_API_KEY", help="bearer key for --url"),
) -> None:
    """Explain one sequence of FILE and draw it: the saliency heatmap with its profiles (PNG)."""
    import numpy as np

    from icaserve.plots import draw_explanation, explanation_npz, save_png

    upload = _read_input(file)
    if sequence >= len(upload.inputs):
        _fail(f"--sequence {sequence}: {file.name} holds {len(upload.inputs)} sequence(s)")
    parameters: dict[str, Any] = {}
    for item in param:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            _fail(f"--param {item!r}: write key=value, e.g. steps=32")
        try:
            parameters[key.strip()] = json.loads(value)
        except ValueError:
            parameters[key.strip()] = value
    tgt: Any = int(target) if target.isdigit() else target
    seq = upload.inputs[sequence]
    body = {"inputs": [seq], "method": method, "parameters": parameters, "target": tgt, "absolute": not signed,
            "normalize": normalize, "attention": attention}
    with _Service(url, store, model, api_key) as svc:
        answer = svc.call("POST", svc.path("explain", version), json=body)
        manifest = svc.call("GET", f"/models/{answer['model']}").get("manifest") or {}
    e = answer["explanations"][0]
    feature_names = manifest.get("input", {}).get("feature_names") or upload.feature_names or []
    atts = e["attributions"]
    title = (f"{answer['model']} v{answer['version']} · {method} · {file.name}"
             f" · predicted {e['prediction']['label']} ({max(e['prediction']['probabilities'].values()):.3f})")
    mask = upload.masks[sequence] if upload.masks else None
    fig = draw_explanation(
        np.asarray(seq, dtype=np.float32), np.asarray([a["saliency"] for a in atts], dtype=np.float32),
        np.asarray([a["time_profile"] for a in atts]), np.asarray([a["feature_profile"] for a in atts]),
        feature_names=feature_names, target_names=[a["target"] for a in atts], title=title, signed=signed,
        attention=None if e.get("attention") is None else np.asarray(e["attention"], dtype=np.float32),
        mask=None if mask is None else np.asarray(mask, dtype=bool))
    try:
        save_png(fig, png)
    except OSError as exc:
        _fail(f"--png {png}: {exc.strerror or exc}")
    console.print(f"picture: {png}")
    if npz:
        meta = {"model": answer["model"], "version": answer["version"], "method": method, "parameters": parameters,
                "target": tgt, "absolute": not signed, "normalize": normalize,
                "class_names": list(e["prediction"]["probabilities"]), "feature_names": list(feature_names),
                "source": {"kind": "file", "name": file.name, "sequence": sequence}}
        try:
            explanation_npz(npz, inputs=np.asarray(seq, dtype=np.float32), answer=e, meta=meta, mask=mask)
        except OSError as exc:
            _fail(f"--npz {npz}: {exc.strerror or exc}")
        console.print(f"numbers: {npz}")


from icaserve import research; research.register(app)  # noqa: E402,E702  reproduce, evaluate


def main() -> None:
    app()


if __name__ == "__main__":
    main()
