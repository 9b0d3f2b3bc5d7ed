"""On a CUDA GPU: what the CPU suite cannot see. Marked `cuda` and skipped without a GPU;
scripts/gpu_check.sh runs them on a lent GPU machine (`pytest -m cuda`).

- Explanations on CUDA go through a second, train-mode copy of the exported TorchScript (cuDNN
  refuses RNN backward in eval mode; every dropout in the export is at p=0): on the shipped model
  (trained with dropout 0.1) the CUDA saliency equals the CPU's and repeats exactly.
- Input-cell attention (training/ica.py inside the model family) computes the same on CUDA as on
  the CPU: embedding, attention weights, logits, input gradients, in float32 and on its float64
  path, with the gate width above and below the feature count.
- The GPU memory gauges (service/metrics.py `sample_gpu`) follow torch's CUDA allocator, in-process
  and on a real server with ICASERVE_DEVICE=cuda.
- DDP with nccl: training/train.py under DistributedDataParallel gives every rank the weights of
  one process stepping on the union of the shards (2 ranks with >= 2 GPUs; with one GPU a process
  group of one, as nccl cannot put two ranks on one device).

Comparisons in "strict" mode turn TF32 off (cuDNN's RNNs and matmuls use it when allowed), so
they hold to float32 rounding; the service's default settings are compared more loosely.
Only APIs present in torch 2.11 and 2.13 are used.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning"),
]

STORE = REPO / "model_store"
NAME = "middle-box-ica-lstm"
T = N = 100


@contextlib.contextmanager
def strict_fp32() -> Iterator[None]:
    """TF32 off for cuDNN and for matmuls while the block runs; the previous settings after."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """||a - b|| / ||b|| over the whole array."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


# -- explanations through the train-mode copy ------------------------------------------------------------


@pytest.fixture(scope="module")
def shipped():
    """The shipped model loaded twice, as the service loads it: on the CPU and on CUDA."""
    from model_store import ModelStore
    from service.runtime import LoadedModel

    store = ModelStore(STORE)
    return (LoadedModel.load(store, NAME, 1, torch.device("cpu")),
            LoadedModel.load(store, NAME, 1, torch.device("cuda")))


METHODS = [("gradient", {}), ("input_x_gradient", {}), ("integrated_gradients", {"steps": 8}),
           ("smoothgrad", {"samples": 4, "noise": 0.15, "seed": 3})]


def _explain(model, x: np.ndarray, method: str, params: dict):
    from service.runtime import ExplainSpec

    specs = [ExplainSpec(method, dict(params), None, all_targets=True, attention=True) for _ in x]
    return model.explain(list(x), specs)


def test_loaded_model_keeps_a_train_mode_copy_for_cuda(shipped):
    cpu, gpu = shipped
    assert gpu.manifest.architecture["dropout"] > 0  # trained with dropout: the copy must not apply it
    assert not gpu.predict_module.training and gpu.explain_module.training
    assert not cpu.explain_module.training  # the CPU needs no copy in train mode
    assert next(gpu.explain_module.parameters()).is_cuda


@pytest.mark.parametrize("method, params", METHODS, ids=[m for m, _ in METHODS])
def test_explain_on_cuda_equals_cpu(shipped, method, params):
    cpu, gpu = shipped
    x = np.random.default_rng(0).normal(size=(3, T, N)).astype(np.float32)
    with strict_fp32():
        want = _explain(cpu, x, method, params)
        got = _explain(gpu, x, method, params)
        again = _explain(gpu, x, method, params)
    for g, a, w in zip(got, again, want):
        assert g.targets == w.targets == [0, 1]
        np.testing.assert_allclose(g.logits, w.logits, rtol=1e-4, atol=1e-5)
        scale = float(np.abs(w.saliency).max())
        assert scale > 0 and np.isfinite(g.saliency).all()
        # repeatable: no dropout in the train-mode copy (p=0.1 would move it by ~10%; CUDA's
        # atomic index_add_ only in the last bits)
        assert float(np.abs(g.saliency - a.saliency).max()) <= 1e-5 * scale, method
        assert float(np.abs(g.saliency - w.saliency).max()) <= 1e-4 * scale, method
        np.testing.assert_allclose(g.attention, w.attention, rtol=1e-4, atol=1e-6)
    # the service's own settings (TF32 where the GPU has it): the same saliency, more loosely
    for g, w in zip(_explain(gpu, x, method, params), want):
        assert rel_err(g.saliency, w.saliency) < 2e-2, method


def test_predict_on_cuda_equals_cpu(shipped):
    cpu, gpu = shipped
    seqs = [np.random.default_rng(s).normal(size=(length, N)).astype(np.float32)
            for s, length in enumerate([1, 37, T, 250])]
    with strict_fp32():
        for g, w in zip(gpu.predict(seqs), cpu.predict(seqs)):
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


# -- input-cell attention -------------------------------------------------------------------------------


# (features, hidden): gate width 4 x hidden above and below the feature count, where the model
# family may compute ICA in different forms (direct, or folded into the gate inputs)
SIZES = [(12, 8), (40, 4)]


@pytest.mark.parametrize("variant", ["matrix", "mean"])
@pytest.mark.parametrize("wide_scores", [False, True], ids=["float32-path", "float64-path"])
@pytest.mark.parametrize("n, hidden", SIZES, ids=[f"N{n}-h{h}" for n, h in SIZES])
def test_ica_on_cuda_equals_cpu(variant, wide_scores, n, hidden):
    from training.models import ModelConfig, build_model, inference_copy

    torch.manual_seed(0)
    model = inference_copy(build_model(ModelConfig(n_features=n, attention="ica", ica_variant=variant, r=6,
                                                   d_a=10, hidden=hidden, n_classes=3)))
    ica = model.encoder
    if wide_scores:  # scores spread past float32's safe range: the prefix sums run in float64
        with torch.no_grad():
            ica.w2.weight.mul_(40.0)
    assert (ica.score_spread_bound() > ica.float32_safe_spread) is wide_scores
    gpu = inference_copy(model).cuda().train()  # train mode: cuDNN's RNN backward; no dropout in it
    x = torch.randn(4, 40, n, generator=torch.Generator().manual_seed(1))

    def grads(m, xx):
        xx = xx.clone().requires_grad_(True)
        logits = m(xx)
        (g,) = torch.autograd.grad(logits[:, 1].sum(), xx)
        return logits.detach().cpu(), g.cpu()

    with strict_fp32():
        want_emb, got_emb = ica.embed(x), gpu.encoder.embed(x.cuda()).cpu()
        want_att, got_att = model.attention_weights(x), gpu.attention_weights(x.cuda()).cpu()
        (want_logits, want_grad), (got_logits, got_grad) = grads(model, x), grads(gpu, x.cuda())
    torch.testing.assert_close(got_emb.detach(), want_emb.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_att.detach(), want_att.detach(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-3, atol=1e-5 * float(want_grad.abs().max()))


# -- GPU memory gauges ----------------------------------------------------------------------------------


def test_sample_gpu_follows_the_cuda_allocator():
    from service import metrics

    def gauges() -> tuple[float, float]:
        return (metrics.REGISTRY.get_sample_value("icaserve_gpu_memory_allocated_bytes"),
                metrics.REGISTRY.get_sample_value("icaserve_gpu_memory_reserved_bytes"))

    block = torch.empty(64 << 20, dtype=torch.uint8, device="cuda")
    metrics.sample_gpu()
    allocated, reserved = gauges()
    assert allocated == torch.cuda.memory_allocated() >= 64 << 20
    assert reserved == torch.cuda.memory_reserved() >= allocated
    del block
    metrics.sample_gpu()
    after, _ = gauges()
    assert after == torch.cuda.memory_allocated() <= allocated - (64 << 20)
    # and a scrape samples them too
    text = metrics.render()[0].decode()
    assert "icaserve_gpu_memory_allocated_bytes" in text and "icaserve_gpu_memory_reserved_bytes" in text


def test_server_on_cuda_reports_gpu_memory(server_factory):
    from prometheus_client.parser import text_string_to_metric_families

    server = server_factory(STORE, {"DEVICE": "cuda"})
    try:
        with server.client() as c:
            x = np.random.default_rng(2).normal(size=(2, T, N)).round(4).tolist()
            assert c.post("/predict", json={"inputs": x}).status_code == 200
            r = c.post("/explain", json={"inputs": x, "method": "integrated_gradients", "parameters": {"steps": 8}})
            assert r.status_code == 200, r.text
            samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                       for f in text_string_to_metric_families(c.get("/metrics").text) for s in f.samples}
    finally:
        server.stop()
    allocated = samples[("icaserve_gpu_memory_allocated_bytes", ())]
    reserved = samples[("icaserve_gpu_memory_reserved_bytes", ())]
    assert 0 < allocated <= reserved, (allocated, reserved)
    loaded = {dict(labels)["device"]: v for (name, labels), v in samples.items() if name == "icaserve_model_loaded"}
    assert any(device.startswith("cuda") and v == 1 for device, v in loaded.items()), loaded


# -- DDP with nccl ----------------------------------------------------------------------------------------


def test_ddp_with_nccl(tmp_path: Path):
    from test_training import check_ddp_equivalence, run_ddp_ranks

    if torch.cuda.device_count() >= 2:
        saves = run_ddp_ranks(tmp_path, world=2, device="cuda", strict_fp32=True)
    else:
        saves = run_ddp_ranks(tmp_path, world=1, device="cuda", strict_fp32=True, world1_backend="nccl")
    with strict_fp32():
        check_ddp_equivalence(saves, backend="nccl", tol=1e-4, device="cuda")
