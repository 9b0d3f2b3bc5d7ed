"""LoadedModel in-process: chunking merged batches to the memory budget changes no number."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from model_store import ModelStore
from service import runtime
from service.runtime import ExplainSpec, LoadedModel, is_folded


@pytest.fixture(scope="module")
def model(model_store: Path) -> LoadedModel:
    return LoadedModel.load(ModelStore(model_store), "ica", "latest", torch.device("cpu"))


def _inputs(n: int, length: int, features: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.standard_normal((length, features)).astype(np.float32) for _ in range(n)]


def test_rows_per_chunk_follows_the_budget(model: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    arch = model.manifest.architecture
    # folded ICA: its prefix sums hold T x r x min(N, G) values per sequence, G = 4 x hidden (LSTM)
    assert model.step_width == arch["r"] * min(model.manifest.input.n_features, 4 * arch["hidden"])
    per_row = 12 * model.step_width
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
    monkeypatch.setattr(runtime, "CHUNK_ELEMENTS", 2 * 12 * model.step_width)  # 2 rows per model call
    assert model.rows_per_chunk(12) == 2
    chunked_logits = model.predict(seqs)
    chunked = model.explain(seqs, specs)
    for a, b in zip(whole_logits, chunked_logits):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(whole, chunked):
        assert a.targets == b.targets
        np.testing.assert_allclose(a.logits, b.logits, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(a.saliency, b.saliency, rtol=1e-4, atol=1e-6)


SHIPPED = Path(__file__).resolve().parent.parent / "model_store"


def test_versions_exported_before_the_folded_form_are_served_folded_and_answer_the_same() -> None:
    """The shipped model's TorchScript computes ICA the direct way; the service rebuilds the
    folded form from its manifest and weights, and it answers as the stored file does."""
    store = ModelStore(SHIPPED)
    manifest, ts_bytes = store.read_file("middle-box-ica-lstm", 1, "torchscript")
    stored = torch.jit.load(__import__("io").BytesIO(ts_bytes)).eval()
    assert "_folded_recurrence" not in stored.code  # exported before the folded form existed
    loaded = LoadedModel.load(store, "middle-box-ica-lstm", 1, torch.device("cpu"))
    assert "_folded_recurrence" in loaded.predict_module.code
    assert is_folded(loaded.explain_module)  # TorchScript, or eager with the fused hop sum
    seqs = _inputs(3, 100, 100)
    x = torch.from_numpy(np.stack(seqs))
    z = (x - loaded.mean) / loaded.std
    xg = x.clone().requires_grad_(True)
    ref_logits = stored((xg - loaded.mean) / loaded.std)
    targets = ref_logits.argmax(1)
    (ref_grad,) = torch.autograd.grad(ref_logits.gather(1, targets[:, None]).sum(), xg)
    for got, want in zip(loaded.predict(seqs), stored(z).detach().numpy()):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    got = loaded.explain(seqs, [ExplainSpec("gradient", {}, None) for _ in seqs])
    for i, e in enumerate(got):
        assert e.targets == [int(targets[i])]
        np.testing.assert_allclose(e.saliency[0], ref_grad[i].numpy(), rtol=1e-4, atol=1e-6)


def test_refold_keeps_the_file_when_the_rebuilt_form_would_differ() -> None:
    store = ModelStore(SHIPPED)
    manifest, ts_bytes = store.read_file("middle-box-ica-lstm", 1, "torchscript")
    assert runtime.refold(ts_bytes, manifest) != ts_bytes
    wrong = manifest.model_copy(update={"architecture": {**manifest.architecture, "cell": "gru"}})
    assert runtime.refold(ts_bytes, wrong) == ts_bytes  # weights do not fit: served as stored
    plain = manifest.model_copy(update={"architecture": {**manifest.architecture, "attention": "none"}})
    assert runtime.refold(ts_bytes, plain) == ts_bytes
