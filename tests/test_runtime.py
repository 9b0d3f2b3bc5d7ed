"""LoadedModel in-process: chunking merged batches to the memory budget changes no number."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from model_store import ModelStore
from service import runtime
from service.runtime import ExplainSpec, LoadedModel


@pytest.fixture(scope="module")
def model(model_store: Path) -> LoadedModel:
    return LoadedModel.load(ModelStore(model_store), "ica", "latest", torch.device("cpu"))


def _inputs(n: int, length: int, features: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.standard_normal((length, features)).astype(np.float32) for _ in range(n)]


def test_rows_per_chunk_follows_the_budget(model: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    arch = model.manifest.architecture
    per_row = 12 * model.manifest.input.n_features * arch["r"]  # T x N x r for an ICA model
    monkeypatch.setattr(runtime, "CHUNK_ELEMENTS", 3 * per_row)
    assert model.rows_per_chunk(12) == 3
    monkeypatch.setattr(runtime, "CHUNK_ELEMENTS", 1)
    assert model.rows_per_chunk(12) == 1  # never zero


@pytest.mark.parametrize("method,params", [
    ("gradient", {}),
    ("integrated_gradients", {"steps": 8, "baseline": 0.0}),
    ("smoothgrad", {"samples": 4, "noise": 0.1, "seed": 1}),
    ("occlusion", {"window": (3, 2)}),
])
def test_chunked_equals_unchunked(model: LoadedModel, monkeypatch: pytest.MonkeyPatch, method: str,
                                  params: dict) -> None:
    seqs = _inputs(7, 12, model.manifest.input.n_features)
    specs = [ExplainSpec(method, dict(params), None, all_targets=True) for _ in seqs]
    whole_logits = model.predict(seqs)
    whole = model.explain(seqs, specs)
    per_row = 12 * model.manifest.input.n_features * model.manifest.architecture["r"]
    monkeypatch.setattr(runtime, "CHUNK_ELEMENTS", 2 * per_row)  # 2 rows per model call
    assert model.rows_per_chunk(12) == 2
    chunked_logits = model.predict(seqs)
    chunked = model.explain(seqs, specs)
    for a, b in zip(whole_logits, chunked_logits):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(whole, chunked):
        assert a.targets == b.targets
        np.testing.assert_allclose(a.logits, b.logits, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(a.saliency, b.saliency, rtol=1e-4, atol=1e-6)
