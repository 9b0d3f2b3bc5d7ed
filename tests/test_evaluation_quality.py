"""Explanation quality per method (issue 11): the metrics on a hand-made saliency map equal values
computed by hand, `explanation_quality` on a model whose attributions are known, and the
`icaserve evaluate` / `export --evaluate` paths that record it in the manifest."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from model_store import ModelStore
from model_store.store import ExplanationQuality
from training.evaluation import (
    QUALITY_METHODS,
    box_feature_mass,
    chance_levels,
    explanation_quality,
    score_saliency,
)

# A 4 x 3 map and a box on steps {0, 1} x features {0, 1} (4 of 12 cells).
S_HAND = np.array([[1.0, 0.5, 0.0],
                   [0.5, 0.0, 0.0],
                   [0.0, 0.5, 0.0],
                   [0.0, 0.0, 0.5]])
R_HAND = np.zeros((4, 3), dtype=bool)
R_HAND[:2, :2] = True
# By hand (S is already in [0, 1], so min-max scaling leaves it):
#   WJac = sum min(R,S) / sum max(R,S) = (1 + .5 + .5 + 0) / (4 + .5 + .5) = 0.4
#   Euc  = ||R - S|| / ||R|| = sqrt(0 + .25 + .25 + 1 + .25 + .25) / 2 = sqrt(2) / 2
#   AUC  = positives {1, .5, .5, 0} against negatives {six 0, two .5}: (8 + 7 + 7 + 3) / 32
#   top-k (k = 4): 1 then the first three .5s by position (cells 1, 3, 7): 3 hits -> 3 / (8 - 3)
#   box-time share = (1.5 + .5) / 3;  box-feature share = (1.5 + 1.0) / 3
EXPECTED = {"weighted_jaccard": 0.4, "euclidean": np.sqrt(2) / 2, "auc": 25 / 32, "topk_jaccard": 0.6,
            "box_time_mass": 2 / 3, "box_feature_mass": 2.5 / 3}


def test_metrics_on_a_hand_made_map() -> None:
    got = score_saliency(S_HAND[None], R_HAND[None])
    for key, value in EXPECTED.items():
        assert got[key] == pytest.approx(value), key
    # sign and scale do not matter (|.| then min-max per sample): the mean over samples is the same
    two = score_saliency(np.stack([S_HAND, -3.0 * S_HAND]), np.stack([R_HAND, R_HAND]))
    for key, value in EXPECTED.items():
        assert two[key] == pytest.approx(value), key
    assert two["n"] == 2


def test_box_feature_mass_and_chance_levels() -> None:
    S = np.zeros((2, 4, 3))
    S[0, :, 2] = 1.0  # all mass off the box's features
    S[1] = 1.0  # even spread: the box's share of features
    R = np.stack([R_HAND, R_HAND])
    np.testing.assert_allclose(box_feature_mass(R, S), [0.0, 2 / 3])
    assert np.isnan(box_feature_mass(np.zeros_like(R), S)).all()  # no box: undefined, not 0
    chance = chance_levels(R)
    assert chance == {"auc": 0.5, "box_time_mass": pytest.approx(0.5), "box_feature_mass": pytest.approx(2 / 3)}


class Linear(torch.nn.Module):
    """logits = [-<x, W>, <x, W>]: gradient of class 1 is W, SmoothGrad too (noise does not change
    a constant gradient), and with the zero baseline integrated gradients equal x * W."""

    def __init__(self, w: np.ndarray) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.as_tensor(w, dtype=torch.float32), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = (x * self.w).sum(dim=(1, 2))
        return torch.stack([-s, s], dim=1)


def test_explanation_quality_of_a_model_with_known_attributions() -> None:
    gen = np.random.default_rng(0)
    X = gen.normal(size=(10, 4, 3)).astype(np.float32)
    model = Linear(S_HAND)
    logit = (X * S_HAND).sum(axis=(1, 2))
    y = np.ones(10, dtype=np.int64)  # class 1 everywhere: its gradient is W = S_HAND
    masks = np.broadcast_to(R_HAND, X.shape).copy()
    q = explanation_quality(model, X, y, masks, dataset="hand", seed=3, tsr_samples=2)
    assert q["dataset"] == "hand" and q["seed"] == 3 and q["n_samples"] == 10
    assert q["accuracy"] == pytest.approx(float((logit > 0).mean()))
    assert list(q["methods"]) == list(QUALITY_METHODS)
    for method in ("gradient", "smoothgrad"):
        for key, value in EXPECTED.items():
            assert q["methods"][method][key] == pytest.approx(value, abs=1e-6), (method, key)
        assert q["methods"][method]["n"] == 10
    by_hand = score_saliency(X * S_HAND, masks)
    for key in EXPECTED:
        assert q["methods"]["input_x_gradient"][key] == pytest.approx(by_hand[key], abs=1e-6)
        assert q["methods"]["integrated_gradients"][key] == pytest.approx(by_hand[key], abs=1e-5)
    assert q["methods"]["tsr"]["n"] == 2
    assert q["methods"]["occlusion"]["n"] == 10
    assert q["parameters"]["occlusion"] == {"window": [4, 3]}  # the default window, clipped to (T, N)
    assert q["parameters"]["integrated_gradients"] == {"steps": 50}
    assert q["chance"]["box_time_mass"] == pytest.approx(0.5)
    ExplanationQuality.model_validate(q)  # what the store will accept
    json.dumps(q, allow_nan=False)  # no NaN anywhere


def test_occlusion_is_scored_on_its_subset_with_its_window() -> None:
    """Per-cell occlusion of a linear model with the zero baseline drops the logit by x * W in each
    cell: input x gradient's map, so its scores on the first `occlusion_samples` samples."""
    gen = np.random.default_rng(1)
    X = gen.normal(size=(6, 4, 3)).astype(np.float32)
    masks = np.broadcast_to(R_HAND, X.shape).copy()
    q = explanation_quality(Linear(S_HAND), X, np.ones(6, dtype=np.int64), masks, dataset="hand", seed=0,
                            methods=["occlusion"], occlusion_samples=4, params={"occlusion": {"window": (1, 1)}})
    assert q["methods"]["occlusion"]["n"] == 4
    assert q["parameters"]["occlusion"] == {"window": (1, 1)}
    by_hand = score_saliency(X[:4] * S_HAND, masks[:4])
    for key in EXPECTED:
        assert q["methods"]["occlusion"][key] == pytest.approx(by_hand[key], abs=1e-5), key
    skipped = explanation_quality(Linear(S_HAND), X, np.ones(6, dtype=np.int64), masks, dataset="hand", seed=0,
                                  methods=["gradient", "occlusion"], occlusion_samples=0)
    assert list(skipped["methods"]) == ["gradient"]


def test_undefined_metrics_are_null_and_bad_requests_refused() -> None:
    X = np.ones((3, 4, 3), dtype=np.float32)
    q = explanation_quality(Linear(S_HAND), X, np.ones(3, dtype=np.int64), np.zeros((3, 4, 3), dtype=bool),
                            dataset="empty", seed=0, methods=["gradient"])
    assert q["methods"]["gradient"]["auc"] is None and q["methods"]["gradient"]["box_time_mass"] is None
    assert q["chance"]["box_time_mass"] is None
    json.dumps(q, allow_nan=False)
    with pytest.raises(ValueError, match="methods"):
        explanation_quality(Linear(S_HAND), X, np.ones(3), np.zeros((3, 4, 3), bool), dataset="d", seed=0,
                            methods=["lime"])
    with pytest.raises(ValueError, match="masks"):
        explanation_quality(Linear(S_HAND), X, np.ones(3), np.zeros((3, 4, 2), bool), dataset="d", seed=0)


# -- the command line ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    from training.datasets import synthetic_splits, train_val_split
    from training.models import ModelConfig
    from training.train import TrainConfig, save_checkpoint, train

    train_ds, test_ds = synthetic_splits("earlier_box", 80, 20, T=10, N=6, seed=1)
    fit, val = train_val_split(train_ds, 0.25, 1)
    result = train(ModelConfig(n_features=6, attention="ica", r=2, d_a=4, hidden=3), fit, val,
                   TrainConfig(epochs=2, progress=False, seed=1, device="cpu"), test_ds)
    path = tmp_path_factory.mktemp("q") / "ica.pt"
    save_checkpoint(path, result, train_ds.class_names, train_ds.feature_names, train_ds.n_steps,
                    {"dataset": "earlier_box", "seed": 1})
    return path


def _run(*args: str):
    return CliRunner().invoke(__import__("icaserve.cli", fromlist=["app"]).app, [str(a) for a in args],
                              env={"COLUMNS": "250"})


def test_publish_write_and_json(checkpoint: Path, tmp_path: Path) -> None:
    root = tmp_path / "store"
    out = tmp_path / "q.json"
    res = _run("evaluate", "--checkpoint", checkpoint, "--n-test", 12, "--tsr-samples", 2, "--store", root,
               "--publish", "q-model", "--json", out)
    assert res.exit_code == 0, res.output
    assert "box-feature share" in " ".join(res.output.split())  # the rich table
    payload = json.loads(out.read_text())
    st = ModelStore(root)
    m = st.manifest("q-model", 1)
    q = m.explanation_quality
    assert q is not None and set(q.methods) == set(QUALITY_METHODS)
    assert (q.dataset, q.n_samples, q.seed) == ("earlier_box", 12, 1)  # the training set and seed by default
    assert q.methods["tsr"]["n"] == 2 and q.methods["gradient"]["n"] == 12
    assert m.model_dump()["explanation_quality"]["methods"] == payload["explanation_quality"]["methods"]
    assert "saliency_gradient" in m.metrics  # the older key stays for older clients

    # a stored model: --write makes version 2 with the same files and only the methods asked for
    res = _run("evaluate", "--model", "q-model", "--methods", "gradient,integrated_gradients", "--n-test", 12,
               "--store", root, "--write")
    assert res.exit_code == 0, res.output
    assert st.versions("q-model") == [1, 2]
    v2 = st.verify("q-model", 2)
    assert set(v2.explanation_quality.methods) == {"gradient", "integrated_gradients"}
    assert v2.files["torchscript"].sha256 == m.files["torchscript"].sha256
    assert v2.model_dump()["derived_from"] == {"version": 1}
    # the stored TorchScript scores as the checkpoint did (same samples, same method)
    for key, value in q.methods["gradient"].items():
        assert v2.explanation_quality.methods["gradient"][key] == pytest.approx(value, abs=1e-5), key

    res = _run("evaluate", "--model", "q-model", "--version", 1, "--methods", "gradient", "--n-test", 12,
               "--store", root, "--json", "-")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["explanation_quality"]["methods"]["gradient"]["n"] == 12


def test_export_evaluate_records_quality(checkpoint: Path, tmp_path: Path) -> None:
    res = _run("export", checkpoint, "--name", "e-model", "--store", tmp_path / "s", "--no-onnx", "--evaluate")
    assert res.exit_code == 0, res.output
    q = ModelStore(tmp_path / "s").manifest("e-model").explanation_quality
    assert q is not None and set(q.methods) == set(QUALITY_METHODS) and q.n_samples == 300
    plain = _run("export", checkpoint, "--name", "p-model", "--store", tmp_path / "s", "--no-onnx")
    assert plain.exit_code == 0 and ModelStore(tmp_path / "s").manifest("p-model").explanation_quality is None


def test_evaluate_refuses_bad_requests(checkpoint: Path, tmp_path: Path) -> None:
    for args, needle in (
        (["--checkpoint", checkpoint, "--write"], "--write needs --model"),
        (["--checkpoint", checkpoint, "--method", "gradient", "--methods", "tsr"], "not both"),
        (["--checkpoint", checkpoint, "--methods", "gradient,lime"], "unknown method 'lime'"),
    ):
        res = _run("evaluate", *args, "--store", tmp_path / "s")
        assert res.exit_code == 2 and needle in " ".join(res.output.split()), res.output
        assert "Traceback" not in res.output
