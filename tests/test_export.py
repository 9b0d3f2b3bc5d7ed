"""Export: every member of the model family reaches the store as TorchScript and ONNX that match
the eager model (outputs, and for TorchScript input-gradients) at several lengths including T = 1;
a parity failure publishes nothing; the manifest says what a server needs; publishing is atomic."""

from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
from datetime import datetime
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

import training.export as export_mod
from model_store import ModelStore
from model_store import store as store_mod
from training.datasets import Standardizer
from training.export import ATOL_GRAD, ATOL_ONNX, ATOL_OUTPUT, ExportError, export_checkpoint, export_model
from training.models import ModelConfig, build_model
from training.train import TrainResult, save_checkpoint

N_FEATURES, N_CLASSES, TRAIN_LENGTH = 3, 3, 6
FEATURES = ["hr", "bp", "temp"]
CLASSES = ["low", "mid", "high"]
NORM = {"mean": [0.5, -1.0, 2.0], "std": [1.0, 2.0, 0.5]}
LENGTHS = [1, 2, 9, 40]

SMALL = dict(n_features=N_FEATURES, n_classes=N_CLASSES, hidden=4, r=3, d_a=5, dropout=0.1)
ATTENTIONS = {
    "none": {"attention": "none"},
    "ica-matrix": {"attention": "ica", "ica_variant": "matrix"},
    "ica-mean": {"attention": "ica", "ica_variant": "mean"},
    "self": {"attention": "self"},
}
MEMBERS = {
    f"{cell}-{att}": ModelConfig(cell=cell, **kw, **SMALL) for cell in ("lstm", "gru", "rnn") for att, kw in ATTENTIONS.items()
}
MEMBERS["bilstm"] = ModelConfig(cell="lstm", bidirectional=True, **SMALL)
MEMBERS["bigru-ica-mean"] = ModelConfig(cell="gru", bidirectional=True, attention="ica", ica_variant="mean", **SMALL)


def _model(config: ModelConfig, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(config)
    with torch.no_grad():  # away from the init so a different seed is clearly a different model
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model.eval()


def _export(store: ModelStore, name: str, model, **kw) -> int:
    args = dict(class_names=CLASSES, feature_names=FEATURES, normalization=NORM, train_length=TRAIN_LENGTH)
    return export_model(store, name, model, **{**args, **kw})


class Family:
    """Exports each member once per module, on first use."""

    def __init__(self, root: Path) -> None:
        self.store = ModelStore(root)
        self.done: dict[str, tuple[int, torch.nn.Module]] = {}

    def get(self, member: str):
        if member not in self.done:
            model = _model(MEMBERS[member])
            self.done[member] = (_export(self.store, member, model), model)
        return self.done[member]


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> Family:
    return Family(tmp_path_factory.mktemp("family-store"))


def _load_ts(data: bytes):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.load(io.BytesIO(data), map_location="cpu")


def _output_and_grad(net, x: torch.Tensor, weights: torch.Tensor):
    xi = x.clone().requires_grad_(True)
    out = net(xi)
    (g,) = torch.autograd.grad((out * weights).sum(), xi)
    return out.detach(), g


@pytest.mark.parametrize("member", sorted(MEMBERS))
def test_member_exports_with_parity(family: Family, member: str) -> None:
    version, model = family.get(member)
    store = family.store
    assert store.versions(member) == [version] == [1]
    manifest = store.verify(member, version)
    assert set(manifest.files) == {"torchscript", "onnx"}
    assert manifest.architecture["label"] == MEMBERS[member].label

    _, ts_bytes = store.read_file(member, version, "torchscript")
    _, onnx_bytes = store.read_file(member, version, "onnx")
    scripted = _load_ts(ts_bytes)
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(1)
    for length in LENGTHS:
        for batch in (1, 4):
            x = 2.0 * torch.randn(batch, length, N_FEATURES, generator=gen)
            w = torch.randn(batch, N_CLASSES, generator=gen)
            out_e, grad_e = _output_and_grad(model.eval(), x, w)
            out_s, grad_s = _output_and_grad(scripted, x, w)
            assert out_e.shape == (batch, N_CLASSES)
            torch.testing.assert_close(out_s, out_e, atol=ATOL_OUTPUT, rtol=0)
            torch.testing.assert_close(grad_s, grad_e, atol=ATOL_GRAD, rtol=0)
            assert grad_e.abs().sum() > 0
            (onnx_out,) = session.run(None, {"x": x.numpy()})
            np.testing.assert_allclose(onnx_out, out_e.numpy(), atol=ATOL_ONNX, rtol=0)

    # The scripted model has no live dropout: train mode computes the same function (the
    # service relies on this to run RNN backward on cuDNN).
    x = torch.randn(2, 5, N_FEATURES, generator=gen)
    scripted.train()
    torch.testing.assert_close(scripted(x), model.eval()(x).detach(), atol=ATOL_OUTPUT, rtol=0)
    scripted.eval()
    # ICA models expose their attention; the others an empty tensor.
    att = scripted.attention_weights(x)
    if MEMBERS[member].attention == "ica":
        assert att.shape == (2, 5, 5)
        torch.testing.assert_close(att.sum(-1), torch.ones(2, 5))
    else:
        assert att.shape == (2, 0, 0)


@pytest.fixture(scope="module")
def checkpoint_export(tmp_path_factory):
    """One export through a checkpoint, as `icaserve export` does it."""
    tmp = tmp_path_factory.mktemp("ckpt-export")
    config = MEMBERS["lstm-ica-matrix"]
    model = _model(config, seed=3)
    std = Standardizer(np.array(NORM["mean"], np.float32), np.array(NORM["std"], np.float32))
    metrics = {"train": {"accuracy": 0.9, "loss": 0.3}, "validation": {"accuracy": 0.8, "loss": 0.4}}
    result = TrainResult(model, std, metrics, history=[{"epoch": 1}], best_epoch=1, seconds=1.5)
    ckpt = save_checkpoint(tmp / "m.pt", result, CLASSES, FEATURES, TRAIN_LENGTH, {"dataset": "demo", "lr": 0.01})
    store = ModelStore(tmp / "store")
    before = datetime.now().astimezone()
    version = export_checkpoint(
        store, "demo", ckpt, max_length=123, extra_metrics={"test": {"accuracy": 0.75, "loss": 0.5}}
    )
    return store, version, config, before


def test_manifest_contents(checkpoint_export) -> None:
    store, version, config, before = checkpoint_export
    assert version == 1
    m = store.manifest("demo", version)
    assert m.name == "demo" and m.version == 1 and m.schema_version == 1
    assert m.architecture == {**config.to_dict(), "label": config.label}
    assert ModelConfig.from_dict(m.architecture) == config  # enough to rebuild the model
    assert m.input.n_features == N_FEATURES
    assert m.input.feature_names == FEATURES
    assert m.input.class_names == CLASSES
    assert m.input.min_length == 1 and m.input.max_length == 123 and m.input.train_length == TRAIN_LENGTH
    assert m.input.dtype == "float32"
    np.testing.assert_allclose(m.normalization.mean, NORM["mean"])
    np.testing.assert_allclose(m.normalization.std, NORM["std"])
    assert m.metrics["validation"] == {"accuracy": 0.8, "loss": 0.4}
    assert m.metrics["test"] == {"accuracy": 0.75, "loss": 0.5}
    assert m.training["dataset"] == "demo" and m.training["lr"] == 0.01 and m.training["best_epoch"] == 1
    assert m.description == f"{config.label} classifier"
    # Checksums that verify, computed independently here.
    vdir = store.version_dir("demo", version)
    for key, filename in (("torchscript", "model.ts"), ("onnx", "model.onnx")):
        data = (vdir / filename).read_bytes()
        assert m.files[key].path == filename
        assert m.files[key].sha256 == hashlib.sha256(data).hexdigest()
        assert m.files[key].bytes == len(data)
    store.verify("demo", version)
    assert {"icaserve", "python", "torch", "onnx", "onnxruntime", "numpy"} <= set(m.versions)
    assert m.versions["torch"] == torch.__version__ and m.versions["onnxruntime"] == ort.__version__
    created = datetime.fromisoformat(m.created_at)
    assert created.tzinfo is not None
    assert abs((created - before).total_seconds()) < 600
    assert m.parity["lengths_checked"][0] == 1 and TRAIN_LENGTH in m.parity["lengths_checked"]
    assert m.parity["torchscript_output_max_abs_diff"] <= ATOL_OUTPUT
    assert m.parity["torchscript_gradient_max_abs_diff"] <= ATOL_GRAD
    assert m.parity["onnx_output_max_abs_diff"] <= ATOL_ONNX
    # The file on disk is plain JSON a person can read.
    raw = json.loads((vdir / "manifest.json").read_text())
    assert raw["input"]["class_names"] == CLASSES


def test_default_max_length_and_no_onnx(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    v = _export(store, "plain", _model(MEMBERS["gru-none"]), with_onnx=False, description="a GRU")
    m = store.manifest("plain", v)
    assert set(m.files) == {"torchscript"}
    assert not (store.version_dir("plain", v) / "model.onnx").exists()
    assert m.input.max_length == max(10 * TRAIN_LENGTH, 1000)
    assert m.parity["onnx_output_max_abs_diff"] is None
    assert m.description == "a GRU"


def test_versions_increase_per_export(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    model = _model(MEMBERS["rnn-none"])
    assert [_export(store, "m", model, with_onnx=False) for _ in range(2)] == [1, 2]
    assert store.versions("m") == [1, 2]


_ORIGINAL_TO_TS = export_mod.to_torchscript
_ORIGINAL_TO_ONNX = export_mod.to_onnx


def _staging_entries(store: ModelStore) -> list[str]:
    d = store.root / ".staging"
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


def test_torchscript_parity_failure_publishes_nothing(tmp_path: Path, monkeypatch) -> None:
    store = ModelStore(tmp_path)
    config = MEMBERS["lstm-ica-mean"]
    model = _model(config)
    assert _export(store, "m", model, with_onnx=False) == 1
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    monkeypatch.setattr(export_mod, "to_torchscript", lambda m: _ORIGINAL_TO_TS(_model(config, seed=99)))
    with pytest.raises(ExportError, match="TorchScript output differs"):
        _export(store, "m", model, with_onnx=False)
    with pytest.raises(ExportError, match="nothing published"):
        _export(store, "fresh", model, with_onnx=False)
    assert store.versions("m") == [1]
    assert store.models() == ["m"]
    assert _staging_entries(store) == []
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_onnx_parity_failure_publishes_nothing(tmp_path: Path, monkeypatch) -> None:
    store = ModelStore(tmp_path)
    config = MEMBERS["gru-self"]
    model = _model(config)
    monkeypatch.setattr(export_mod, "to_onnx", lambda m, n: _ORIGINAL_TO_ONNX(_model(config, seed=99), n))
    with pytest.raises(ExportError, match="ONNX output differs"):
        _export(store, "m", model)
    assert store.versions("m") == [] and store.models() == []
    assert _staging_entries(store) == []


def test_export_refuses_mismatched_names(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    model = _model(MEMBERS["rnn-none"])
    with pytest.raises(ExportError, match="class names"):
        _export(store, "m", model, class_names=["a", "b"])
    with pytest.raises(ExportError, match="feature names"):
        _export(store, "m", model, feature_names=["a"])
    with pytest.raises(ExportError):
        _export(store, "m", model, normalization={"mean": [0.0], "std": [1.0]})
    assert store.models() == []


def test_publish_is_atomic(tmp_path: Path, monkeypatch) -> None:
    """At the moment of the rename the staged folder is complete (manifest and files whose
    checksums match) and readers do not see the version yet; afterwards they see all of it."""
    store = ModelStore(tmp_path / "store")
    real_rename = os.rename
    seen = {}

    def checking_rename(src, dst):
        src, dst = Path(src), Path(dst)
        if src.parent == store.root / ".staging":
            assert not dst.exists()
            assert store.versions("atomic") == []  # not visible before the rename
            manifest = json.loads((src / "manifest.json").read_text())
            for entry in manifest["files"].values():
                data = (src / entry["path"]).read_bytes()
                assert hashlib.sha256(data).hexdigest() == entry["sha256"]
            seen["files"] = sorted(p.name for p in src.iterdir())
            seen["dst"] = dst
        return real_rename(src, dst)

    monkeypatch.setattr(store_mod.os, "rename", checking_rename)
    v = _export(store, "atomic", _model(MEMBERS["lstm-none"]))
    assert seen["files"] == ["manifest.json", "model.onnx", "model.ts"]
    assert seen["dst"] == store.root / "atomic" / str(v)
    assert store.versions("atomic") == [v]
    store.verify("atomic", v)


def test_failure_while_staging_publishes_nothing(tmp_path: Path, monkeypatch) -> None:
    store = ModelStore(tmp_path)
    _export(store, "m", _model(MEMBERS["rnn-self"]), with_onnx=False)

    def broken():
        raise OSError("disk went away")

    monkeypatch.setattr(export_mod, "library_versions", broken)  # called inside the stage block
    with pytest.raises(OSError, match="disk went away"):
        _export(store, "m", _model(MEMBERS["rnn-self"]), with_onnx=False)
    assert store.versions("m") == [1]
    assert _staging_entries(store) == []
    assert sorted(p.name for p in (store.root / "m").iterdir() if not p.name.startswith(".")) == ["1"]


# -- explanation_quality and the recipe in the manifest (issue 11) -----------------------------
QUALITY = {"dataset": "earlier_box", "n_samples": 300, "seed": 0, "accuracy": 1.0,
           "methods": {"gradient": {"auc": 0.94, "topk_jaccard": 0.61, "n": 300}}}


def test_export_records_explanation_quality(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    v = _export(store, "q", _model(MEMBERS["lstm-ica-matrix"]), with_onnx=False, explanation_quality=QUALITY)
    m = store.manifest("q", v)
    assert m.explanation_quality is not None and m.explanation_quality.methods["gradient"]["auc"] == 0.94
    raw = json.loads((store.version_dir("q", v) / "manifest.json").read_text())
    assert raw["explanation_quality"] == {**QUALITY, "methods": {"gradient": {"auc": 0.94, "topk_jaccard": 0.61,
                                                                              "n": 300.0}}}
    assert store.manifest("q", _export(store, "q", _model(MEMBERS["lstm-ica-matrix"]),
                                       with_onnx=False)).explanation_quality is None


def test_invalid_explanation_quality_is_refused_before_the_slow_work(tmp_path: Path, monkeypatch) -> None:
    def never(*_a, **_k):
        raise AssertionError("converted a model whose manifest would be refused")

    monkeypatch.setattr(export_mod, "to_torchscript", never)
    store = ModelStore(tmp_path)
    bad = {**QUALITY, "methods": {"gradient": {"auc": float("nan")}}}
    with pytest.raises(ExportError, match="explanation_quality"):
        _export(store, "q", _model(MEMBERS["lstm-ica-matrix"]), explanation_quality=bad)
    assert store.versions("q") == []


def test_manifest_training_block_holds_the_recipe(tmp_path: Path) -> None:
    from training.train import TrainConfig, train_config_dict

    model = _model(MEMBERS["lstm-ica-matrix"])
    result = TrainResult(model, Standardizer(np.array(NORM["mean"], np.float32), np.array(NORM["std"], np.float32)),
                         {"validation": {"accuracy": 1.0, "loss": 0.1}}, [], 7, 1.0, "plateau")
    info = {"dataset": "earlier_box", **train_config_dict(TrainConfig.from_recipe("localise", lr_schedule="cosine"))}
    ckpt = save_checkpoint(tmp_path / "c.pt", result, CLASSES, FEATURES, TRAIN_LENGTH, info)
    store = ModelStore(tmp_path / "store")
    tr = store.manifest("r", export_checkpoint(store, "r", ckpt, with_onnx=False)).training
    assert (tr["recipe"], tr["optimizer"], tr["weight_decay"], tr["select"], tr["min_delta"], tr["patience"]) == (
        "localise", "adam", 0.01, "loss", 1e-4, 20)
    assert (tr["lr_schedule"], tr["attention_entropy"], tr["epochs"], tr["stopped"], tr["best_epoch"]) == (
        "cosine", 0.0, 500, "plateau", 7)
