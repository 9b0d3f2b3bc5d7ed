"""Export a trained checkpoint into the model store: TorchScript (the service's format), ONNX
(fast /predict), and a manifest. Parity is checked before anything is published; a failed check
publishes nothing.
"""

from __future__ import annotations

import io
import platform
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from pydantic import ValidationError

from model_store import ModelStore, check_name
from model_store.store import ExplanationQuality
from training.models import RecurrentClassifier, inference_copy

ATOL_OUTPUT = 1e-5
ATOL_ONNX = 1e-4
ATOL_GRAD = 1e-5


class ExportError(RuntimeError):
    """Export refused to publish; the message says which check failed."""


@dataclass
class ParityReport:
    torchscript_output: float
    torchscript_gradient: float
    onnx_output: float | None
    lengths: list[int]

    def as_dict(self) -> dict[str, Any]:
        return {
            "torchscript_output_max_abs_diff": self.torchscript_output,
            "torchscript_gradient_max_abs_diff": self.torchscript_gradient,
            "onnx_output_max_abs_diff": self.onnx_output,
            "lengths_checked": self.lengths,
            "tolerances": {"output": ATOL_OUTPUT, "gradient": ATOL_GRAD, "onnx": ATOL_ONNX},
        }


def to_torchscript(model: RecurrentClassifier) -> bytes:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.script(inference_copy(model))
        buf = io.BytesIO()
        torch.jit.save(scripted, buf)
    return buf.getvalue()


def to_onnx(model: RecurrentClassifier, n_features: int) -> bytes:
    """ONNX with dynamic batch and time axes (opset 18, the exporter that handles nn.LSTM fast)."""
    clean = inference_copy(model)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            clean,
            (torch.zeros(1, 4, n_features),),
            buf,
            input_names=["x"],
            output_names=["logits"],
            dynamic_axes={"x": {0: "batch", 1: "time"}, "logits": {0: "batch"}},
            opset_version=18,
            dynamo=False,
        )
    return buf.getvalue()


def check_parity(
    model: RecurrentClassifier, ts_bytes: bytes, onnx_bytes: bytes | None, lengths: list[int], seed: int = 0
) -> ParityReport:
    """TorchScript vs eager (outputs and input-gradients), ONNX vs eager (outputs)."""
    eager = inference_copy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.load(io.BytesIO(ts_bytes), map_location="cpu")
    session = None
    if onnx_bytes is not None:
        session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(seed)
    n = model.config.n_features
    worst_out = worst_grad = 0.0
    worst_onnx: float | None = None if session is None else 0.0
    for length in lengths:
        x = torch.randn(3, length, n, generator=gen)
        weights = torch.randn(3, model.config.n_classes, generator=gen)
        grads = []
        outs = []
        for net in (eager, scripted):
            xi = x.clone().requires_grad_(True)
            out = net(xi)
            (g,) = torch.autograd.grad((out * weights).sum(), xi)
            outs.append(out.detach())
            grads.append(g)
        worst_out = max(worst_out, (outs[0] - outs[1]).abs().max().item())
        worst_grad = max(worst_grad, (grads[0] - grads[1]).abs().max().item())
        if session is not None:
            onnx_out = session.run(None, {"x": x.numpy()})[0]
            worst_onnx = max(worst_onnx or 0.0, float(np.abs(onnx_out - outs[0].numpy()).max()))
    report = ParityReport(worst_out, worst_grad, worst_onnx, lengths)
    failures = []
    if not worst_out <= ATOL_OUTPUT:
        failures.append(f"TorchScript output differs from eager by {worst_out:.3g} (> {ATOL_OUTPUT})")
    if not worst_grad <= ATOL_GRAD:
        failures.append(f"TorchScript input-gradient differs from eager by {worst_grad:.3g} (> {ATOL_GRAD})")
    if worst_onnx is not None and not worst_onnx <= ATOL_ONNX:
        failures.append(f"ONNX output differs from eager by {worst_onnx:.3g} (> {ATOL_ONNX})")
    if failures:
        raise ExportError("parity check failed, nothing published: " + "; ".join(failures))
    return report


def library_versions() -> dict[str, str]:
    import onnx

    from importlib.metadata import PackageNotFoundError, version

    try:
        own = version("icaserve")
    except PackageNotFoundError:
        own = "unknown"
    return {
        "icaserve": own,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": ort.__version__,
        "numpy": np.__version__,
    }


def export_model(
    store: ModelStore,
    name: str,
    model: RecurrentClassifier,
    *,
    class_names: list[str],
    feature_names: list[str],
    normalization: dict[str, list[float]],
    train_length: int,
    max_length: int | None = None,
    metrics: dict[str, dict[str, float]] | None = None,
    training: dict[str, Any] | None = None,
    description: str = "",
    with_onnx: bool = True,
    explanation_quality: dict[str, Any] | None = None,
) -> int:
    """Publish `model` as the next version of `name`; returns the version number.

    `explanation_quality` (training.evaluation.explanation_quality) goes into the manifest as is;
    the store validates it and refuses the version if it is malformed."""
    check_name(name)  # refuse before the slow work
    if explanation_quality is not None:
        try:
            ExplanationQuality.model_validate(explanation_quality)
        except ValidationError as exc:
            raise ExportError(f"explanation_quality is invalid: {exc}") from None
    cfg = model.config
    if len(class_names) != cfg.n_classes:
        raise ExportError(f"{len(class_names)} class names for a model with {cfg.n_classes} classes")
    if len(feature_names) != cfg.n_features or len(normalization["mean"]) != cfg.n_features:
        raise ExportError(f"feature names and normalisation must have {cfg.n_features} entries")
    max_length = max_length or max(10 * train_length, 1000)
    ts_bytes = to_torchscript(model)
    onnx_bytes = to_onnx(model, cfg.n_features) if with_onnx else None
    lengths = sorted({1, 2, min(train_length, max_length), 37})
    parity = check_parity(model, ts_bytes, onnx_bytes, lengths)
    with store.stage(name) as stage:
        (stage.dir / "model.ts").write_bytes(ts_bytes)
        if onnx_bytes is not None:
            (stage.dir / "model.onnx").write_bytes(onnx_bytes)
        stage.manifest = {
            "description": description or f"{cfg.label} classifier",
            "architecture": {**cfg.to_dict(), "label": cfg.label},
            "input": {
                "n_features": cfg.n_features,
                "feature_names": feature_names,
                "class_names": class_names,
                "min_length": 1,
                "max_length": max_length,
                "train_length": train_length,
            },
            "normalization": normalization,
            "metrics": metrics or {},
            "training": training or {},
            "parity": parity.as_dict(),
            "versions": library_versions(),
        }
        if explanation_quality is not None:
            stage.manifest["explanation_quality"] = explanation_quality
    assert stage.version is not None
    return stage.version


def export_checkpoint(
    store: ModelStore, name: str, checkpoint: str | Path, *, max_length: int | None = None,
    extra_metrics: dict[str, dict[str, float]] | None = None, with_onnx: bool = True,
    explanation_quality: dict[str, Any] | None = None,
) -> int:
    from training.train import load_checkpoint

    model, ckpt = load_checkpoint(checkpoint)
    return export_model(
        store,
        name,
        model,
        class_names=ckpt["class_names"],
        feature_names=ckpt["feature_names"],
        normalization=ckpt["normalization"],
        train_length=ckpt["train_length"],
        max_length=max_length,
        metrics={**ckpt["metrics"], **(extra_metrics or {})},
        training=ckpt["training"],
        with_onnx=with_onnx,
        explanation_quality=explanation_quality,
    )
