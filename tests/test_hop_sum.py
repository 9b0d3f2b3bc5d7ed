"""The fused hop sum of folded ICA (training/hop_sum.py, hop_sum.c): equal to the stock ops it
replaces, forward and backward, in every place it runs; absent from exported graphs."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ica_reference import reference_forward
from training import hop_sum
from training.ica import prefix_weighted_sum
from training.models import ModelConfig, build_model

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(not hop_sum.available(), reason="no C compiler: the stock ops run")


@pytest.fixture(params=["vectorised", "portable"])
def kernel_path(request):
    """The float32 matrix variant on the kernel's AVX-512 path (where this machine has it) and on its
    portable loops: the tests that take this fixture hold for both."""
    if request.param == "vectorised":
        if not hop_sum.vectorised():
            pytest.skip("the kernel was built without AVX-512")
        yield
    else:
        with hop_sum.portable_loops():
            assert not hop_sum.vectorised()
            yield


def _pair(b: int, t: int, ph: int, r: int, g: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    p = torch.randn(b, t, g, ph, generator=gen, dtype=dtype).requires_grad_(True)
    w = (torch.rand(b, t, r, generator=gen, dtype=dtype) + 1e-3).requires_grad_(True)
    return p, w


@pytest.mark.parametrize("ph", ["per hop", "shared"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("t", [1, 2, 37])
def test_fused_equals_the_stock_ops_forward_and_backward(ph, dtype, t, kernel_path):
    """Against the stock ops in float64 on the same values: 1e-12 in float64. In float32 (the kernel
    sums in float32, as torch's CUDA cumsum does), 1e-5 of each result's scale or twice the error
    of the stock ops in float32, whichever is larger: some gradients are differences of near-equal
    sums (at T = 1 dL/dw is 0, which float32 stock ops miss by 3e-5)."""
    r, g = 4, 6
    p, w = _pair(3, t, r if ph == "per hop" else 1, r, g, dtype)
    p64, w64 = (v.detach().double().requires_grad_(True) for v in (p, w))
    want = prefix_weighted_sum(p64, w64)
    got = hop_sum.hop_sum(p, w)
    grad_u = torch.randn(want.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    wants = (want, *torch.autograd.grad(want, (p64, w64), grad_u))
    gots = (got, *torch.autograd.grad(got, (p, w), grad_u.to(dtype)))
    stock = prefix_weighted_sum(p, w)
    stocks = (stock, *torch.autograd.grad(stock, (p, w), grad_u.to(dtype)))
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for a, b, c in zip(wants, gots, stocks):
        atol = tol * float(a.detach().abs().max().clamp(min=1))
        if dtype == torch.float32:
            atol = max(atol, 2 * float((c.detach().double() - a.detach()).abs().max()))
        torch.testing.assert_close(b.double(), a, rtol=tol, atol=atol)


@pytest.mark.parametrize("ph", [3, 1])
def test_gradcheck(ph):
    p, w = _pair(2, 7, ph, 3, 4, torch.float64, seed=1)
    assert torch.autograd.gradcheck(hop_sum.hop_sum, (p, w))


def test_weights_spanning_float32s_range_stay_exact(kernel_path):
    """Weights exp(z) from 1 down to e^-60 (the float32 safe spread, training/ica.py): the float32
    running sums keep early steps' tiny weights (float32's smallest normal is ~1e-38)."""
    p, _ = _pair(2, 50, 5, 5, 3, torch.float32)
    z = -60 * torch.rand(2, 50, 5, generator=torch.Generator().manual_seed(3))
    w = torch.exp(z).requires_grad_(True)
    want = prefix_weighted_sum(p.double(), w.double())
    got = hop_sum.hop_sum(p, w)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_non_contiguous_inputs_are_taken_as_their_values():
    p, w = _pair(4, 9, 3, 3, 5, torch.float64)
    pt = p.detach().transpose(0, 1).contiguous().transpose(0, 1)  # same values, other strides
    assert not pt.is_contiguous()
    torch.testing.assert_close(hop_sum.hop_sum(pt, w), prefix_weighted_sum(p, w))


@pytest.mark.parametrize("r", [8, 11, 20])
def test_full_blocks_of_hops_and_a_remainder_equal_the_stock_ops(r):
    """The kernel takes hops eight at a time, then one by one: r = 8, 11 and 20 take both paths."""
    for ph in (r, 1):
        p, w = _pair(2, 13, ph, r, 5, torch.float64, seed=r)
        want = prefix_weighted_sum(p, w)
        got = hop_sum.hop_sum(p, w)
        grad_u = torch.randn(want.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
        for a, b in zip((want, *torch.autograd.grad(want, (p, w), grad_u)),
                        (got, *torch.autograd.grad(got, (p, w), grad_u))):
            torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)


def _kernel_both_ways(b: int, t: int, r: int, g: int, online: bool, seed: int) -> list[list[torch.Tensor]]:
    """Every output of the float32 kernel, forward then backward (u, the weights, 1 / D, the running
    maxima, dL/dp, dL/dw), on the AVX-512 path and then on the portable loops."""
    gen = torch.Generator().manual_seed(seed)
    p = torch.randn(b, t, g, r, generator=gen)
    scores = 30 * torch.randn(b, t, r, generator=gen) if online else torch.rand(b, t, r, generator=gen) + 1e-3
    grad_u = torch.randn(b, t, g, generator=gen)
    runs = []
    for portable in (False, True):
        with hop_sum.portable_loops() if portable else contextlib.nullcontext():
            w, u, inv_den = scores.clone(), torch.empty(b, t, g), torch.empty(b, t, r)
            m = torch.empty(b, t, r) if online else None
            hop_sum._forward(p, w, u, inv_den, m, 0, b)
            grad_p, grad_w = torch.empty(b * t, g * r), torch.empty(b, t, r)
            hop_sum._backward(p, w, inv_den, grad_u, grad_p, grad_w, m, 0, b, times_w=online)
            runs.append([u, w, inv_den, grad_p, grad_w] + ([m] if online else []))
    return runs


@pytest.mark.parametrize("online", [True, False], ids=["online", "weights given"])
@pytest.mark.parametrize(("r", "g"), [(1, 3), (5, 1), (16, 16), (17, 20), (20, 20), (33, 37), (70, 5)])
def test_the_vectorised_kernel_equals_the_portable_loops(r, g, online):
    """Hop widths of one partial vector, whole vectors, a remainder, and more blocks than the path
    holds in registers (70 = 5 blocks); gate counts below, at and past 16 (the sums' tree); the
    online mode with scores spread over +-100 (many rising maxima) and given weights; T = 1, 2, 37.
    Both paths sum in the same order per hop and step: they agree to float32 rounding."""
    if not hop_sum.vectorised():
        pytest.skip("the kernel was built without AVX-512")
    for t in (1, 2, 37):
        fast, portable = _kernel_both_ways(3, t, r, g, online, seed=r * 100 + g + t)
        for a, b in zip(fast, portable):
            assert torch.isfinite(a).all()
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max().clamp(min=1)))


def _folded_case(b: int, ph: int, r: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    n, g, t = 7, 3, 9
    x = torch.randn(b, t, n, generator=gen, dtype=dtype).requires_grad_(True)
    rows = torch.randn(g * ph, n, generator=gen, dtype=dtype).requires_grad_(True)
    w = (torch.rand(b, t, r, generator=gen, dtype=dtype) + 1e-3).requires_grad_(True)
    return x, rows, w


@pytest.mark.parametrize("ph", ["per hop", "shared"])
@pytest.mark.parametrize("chunk_bytes", [1, 3 * 9 * 3 * 11 * 8, 1 << 20], ids=["one", "three", "all"])
def test_folded_gates_equal_projection_then_hop_sum_in_any_chunking(ph, chunk_bytes, monkeypatch):
    """Chunks of one sequence, of three (5 = 3 + 2: a partial last chunk) and the whole batch give
    the stock composition's values and gradients for x, the weights and the prefix weights."""
    monkeypatch.setattr(hop_sum, "CHUNK_BYTES", chunk_bytes)
    r = 11
    n_ph = r if ph == "per hop" else 1
    x, rows, w = _folded_case(5, n_ph, r, torch.float64)
    p = torch.matmul(x, rows.t()).reshape(5, 9, -1, n_ph)
    want = prefix_weighted_sum(p, w)
    got = hop_sum.folded_gates(x, rows, w, n_ph)
    grad_u = torch.randn(want.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    for a, b in zip((want, *torch.autograd.grad(want, (x, rows, w), grad_u)),
                    (got, *torch.autograd.grad(got, (x, rows, w), grad_u))):
        torch.testing.assert_close(b, a, rtol=1e-11, atol=1e-11)


def test_folded_gates_gradcheck_and_float32_inputs_with_float64_weights(monkeypatch):
    """gradcheck over several chunks; and the float64 fallback (weights past the float32-safe
    spread) takes float32 inputs and weights, computing in float64."""
    monkeypatch.setattr(hop_sum, "CHUNK_BYTES", 1)
    x, rows, w = _folded_case(3, 4, 4, torch.float64, seed=2)
    assert torch.autograd.gradcheck(lambda a, b, c: hop_sum.folded_gates(a, b, c, 4), (x, rows, w))
    x32 = x.detach().float().requires_grad_(True)
    got = hop_sum.folded_gates(x32, rows.detach().float(), w.detach(), 4)
    assert got.dtype == torch.float64
    want = prefix_weighted_sum(torch.matmul(x32.detach().double(), rows.detach().float().double().t())
                                     .reshape(3, 9, -1, 4), w.detach())
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    (gx,) = torch.autograd.grad(got.sum(), x32)
    assert gx.dtype == torch.float32 and torch.isfinite(gx).all()


def _model(variant: str, hidden: int = 5, cell: str = "lstm", n: int = 40) -> torch.nn.Module:
    """G = 4, 3 or 1 x hidden < N: the folded form whose hop sum the kernel computes."""
    torch.manual_seed(0)
    return build_model(ModelConfig(n_features=n, attention="ica", ica_variant=variant, hidden=hidden, r=4, d_a=6,
                                   cell=cell)).eval()


@pytest.mark.parametrize("variant", ["matrix", "mean"])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_models_on_the_fused_path_equal_the_step_by_step_reference(variant, cell):
    model = _model(variant, cell=cell).double()
    assert model.folded and hop_sum.applies(torch.zeros(1, 1, 1, 1, dtype=torch.float64),
                                            torch.zeros(1, 1, 1, dtype=torch.float64))
    x = torch.randn(3, 11, 40, dtype=torch.float64)
    outs = []
    for fn in (model, lambda z: reference_forward(model, z)):
        xg = x.clone().requires_grad_(True)
        logits = fn(xg)
        outs.append((logits.detach(), torch.autograd.grad(logits[:, 0].sum(), xg)[0]))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_the_toggle_switches_the_path_and_both_agree(monkeypatch):
    model = _model("matrix")
    x = torch.randn(2, 20, 40)
    calls = []
    original = hop_sum.folded_ica
    monkeypatch.setattr(hop_sum, "folded_ica", lambda *args: calls.append(1) or original(*args))
    fused = model(x)
    assert len(calls) == 1
    with hop_sum.use_stock_ops():
        assert not hop_sum.available()
        stock = model(x)
    assert len(calls) == 1 and hop_sum.available()
    torch.testing.assert_close(fused, stock, rtol=1e-5, atol=1e-6)


def test_exports_keep_the_stock_ops():
    """A scripted or traced model never calls the library: exported files load anywhere."""
    model = _model("matrix")
    x = torch.randn(2, 15, 40)
    scripted = torch.jit.script(model)
    assert "hop_sum" not in scripted.code and "_folded_recurrence" in scripted.code
    torch.testing.assert_close(scripted(x), model(x), rtol=1e-5, atol=1e-6)
    traced = torch.jit.trace(model, x)
    assert "HopSum" not in str(traced.inlined_graph) and "FoldedGates" not in str(traced.inlined_graph)
    torch.testing.assert_close(traced(x), model(x), rtol=1e-5, atol=1e-6)
    buf = io.BytesIO()
    torch.jit.save(scripted, buf)
    assert b"hop_sum" not in buf.getvalue()


def test_switched_off_by_environment_the_stock_ops_run():
    code = ("from training import hop_sum; import torch; "
            "p = torch.randn(1, 3, 2, 2); w = torch.rand(1, 3, 2); "
            "print(hop_sum.available(), hop_sum.applies(p, w))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "ICASERVE_FUSED_ICA": "0"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]


def test_without_a_compiler_the_stock_ops_run_with_one_warning(tmp_path):
    code = ("import logging; logging.basicConfig(); from training import hop_sum; "
            "print(hop_sum.available())")
    env = {**os.environ, "CC": str(tmp_path / "no-such-cc"), "ICASERVE_KERNEL_DIR": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False"]
    assert out.stderr.count("stock torch ops") == 1, out.stderr


def test_a_fresh_cache_builds_once_and_is_reused(tmp_path):
    code = "from training import hop_sum; print(hop_sum.available())"
    env = {**os.environ, "ICASERVE_KERNEL_DIR": str(tmp_path)}
    for _ in range(2):
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=180,
                             env=env)
        assert out.stdout.split() == ["True"], out.stderr
    assert len(list(tmp_path.glob("hop_sum-*.so"))) == 1
    assert not [f for f in tmp_path.iterdir() if not f.name.startswith("hop_sum-")]  # no temporary left


def test_the_service_serves_cpu_models_eagerly_with_the_same_answers(tmp_path):
    """LoadedModel on CPU explains with an eager module and the fused kernel, equal to the stored
    TorchScript; predictions stay on the TorchScript."""
    import numpy as np

    from model_store import ModelStore
    from service.runtime import ExplainSpec, LoadedModel

    store = ModelStore(ROOT / "model_store")
    fused = LoadedModel.load(store, "middle-box-ica-lstm", 2, torch.device("cpu"))
    assert not isinstance(fused.explain_module, torch.jit.ScriptModule)
    assert isinstance(fused.predict_module, torch.jit.ScriptModule)
    with hop_sum.use_stock_ops():
        plain = LoadedModel.load(store, "middle-box-ica-lstm", 2, torch.device("cpu"))
    assert isinstance(plain.explain_module, torch.jit.ScriptModule)
    assert fused.step_width == plain.step_width
    seqs = [np.random.default_rng(i).standard_normal((100, 100)).astype(np.float32) for i in range(3)]
    np.testing.assert_allclose(np.stack(fused.predict(seqs)), np.stack(plain.predict(seqs)), rtol=1e-5, atol=1e-5)
    spec = [ExplainSpec("gradient", {}, None)] * 3
    for a, b in zip(fused.explain(seqs, spec), plain.explain(seqs, spec)):
        np.testing.assert_allclose(a.saliency, b.saliency, rtol=1e-4, atol=1e-6)
        assert a.targets == b.targets


def test_explanations_skip_the_weight_gradient_gemm_but_training_gets_it(monkeypatch):
    """autograd.grad w.r.t. the inputs alone of a model whose weights require grad: the engine
    will not use the weights' gradient, so FoldedGates does not compute it; .backward() does."""
    model = _model("matrix")
    x = torch.randn(3, 12, 40)
    calls = []
    original = torch.Tensor.addmm_

    def counting(self, *args, **kwargs):
        calls.append(tuple(self.shape))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "addmm_", counting)
    rows = (model.rnn.weight_ih_l0.shape[0] * model.encoder.r, x.shape[2])  # the (gate, hop) rows' gradient
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model(xg)[:, 0].sum(), xg)
    assert rows not in calls and torch.isfinite(grad).all()
    model(x)[:, 0].sum().backward()
    assert rows in calls
    want = model.rnn.weight_ih_l0.grad.clone()
    model.zero_grad()
    with hop_sum.use_stock_ops():
        model(x)[:, 0].sum().backward()
    torch.testing.assert_close(want, model.rnn.weight_ih_l0.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batch", [1, 8])
def test_scores_equal_tanh_below_and_above_the_sigmoid_switch(batch):
    """Below _SIGMOID_TANH_MIN elements the scores use tanh; above, 2 sigmoid(2a) - 1 with tanh's
    backward: equal values and input-gradients (float32 2e-6, float64 1e-12); exports keep tanh."""
    from training import ica

    for dtype, tol in ((torch.float32, 2e-6), (torch.float64, 1e-12)):
        enc = ica.InputCellAttention(100, r=4, d_a=50).to(dtype)
        x = (3 * torch.randn(batch, 100, 100, dtype=dtype)).requires_grad_(True)
        assert (x.shape[0] * x.shape[1] * 50 >= ica._SIGMOID_TANH_MIN) == (batch == 8)
        got = enc.scores(x)
        want = enc.w2(torch.tanh(enc.w1(x)))
        g = torch.randn(got.shape, dtype=dtype)
        for a, b in zip((got, *torch.autograd.grad(got, x, g)), (want, *torch.autograd.grad(want, x, g))):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    scripted = torch.jit.script(ica.InputCellAttention(100, r=4, d_a=50))
    graph = str(scripted.inlined_graph)
    assert "SigmoidTanh" not in graph and "aten::tanh" in graph and "aten::sigmoid" not in graph


def _stock_prefix_weights(enc, x: torch.Tensor, wide: bool) -> torch.Tensor:
    """`_prefix_weights` on stock autograd ops (what scripted and traced graphs run)."""
    e = enc.w2(torch.tanh(enc.w1(x)))
    z = e - e.detach().amax(dim=1, keepdim=True)
    return torch.exp(z.double() if wide else z)


@pytest.mark.parametrize("wide", [False, True], ids=["float32 sums", "float64 fallback"])
@pytest.mark.parametrize("batch", [1, 8])
def test_prefix_weights_by_hand_equal_the_stock_ops(batch, wide):
    """training/ica.py `_PrefixWeights` (eager CPU) against the stock ops: values and the gradients
    of x, W1 and W2, below and above the sigmoid switch, with and without the float64 fallback
    (float32 2e-6 of each result's scale, float64 1e-12)."""
    from training import ica

    for dtype, tol in ((torch.float32, 2e-6), (torch.float64, 1e-12)):
        enc = ica.InputCellAttention(100, r=4, d_a=50).to(dtype)
        x = (3 * torch.randn(batch, 100, 100, dtype=dtype)).requires_grad_(True)
        got = ica._PrefixWeights.apply(x, enc.w1.weight, enc.w2.weight, wide and dtype == torch.float32)
        want = _stock_prefix_weights(enc, x, wide and dtype == torch.float32)
        assert got.dtype == want.dtype
        g = torch.randn(got.shape, dtype=got.dtype)
        inputs = (x, enc.w1.weight, enc.w2.weight)
        for a, b in zip((got, *torch.autograd.grad(got, inputs, g)), (want, *torch.autograd.grad(want, inputs, g))):
            scale = float(b.detach().abs().max().clamp(min=1))
            torch.testing.assert_close(a, b, rtol=tol, atol=tol * scale)


def test_prefix_weights_gradcheck():
    """Through a softmax over time: the shift by the maximum carries no gradient (by design, as in
    the stock ops), which only a shift-invariant function of the weights makes exact."""
    from training import ica

    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 5, 4, dtype=torch.float64, generator=gen).requires_grad_(True)
    w1 = torch.randn(3, 4, dtype=torch.float64, generator=gen).requires_grad_(True)
    w2 = torch.randn(2, 3, dtype=torch.float64, generator=gen).requires_grad_(True)
    def softmax(*args: torch.Tensor) -> torch.Tensor:
        w = ica._PrefixWeights.apply(*args, False)
        return w / w.sum(dim=1, keepdim=True)

    assert torch.autograd.gradcheck(softmax, (x, w1, w2))


def test_explanations_skip_the_attention_weight_gradients(monkeypatch):
    """An explanation (autograd.grad w.r.t. the inputs) of a model whose weights require grad makes
    no GEMM shaped like W1 or W2 (on the AVX-512 path no torch GEMM at all: the node is one C call);
    .backward() does, and gets the stock ops' weight gradients."""
    model = _model("matrix")
    enc = model.encoder
    weight_shapes = {tuple(enc.w1.weight.shape), tuple(enc.w2.weight.shape)}
    x = torch.randn(3, 12, 40)
    shapes = []
    original = torch.mm

    def counting(*args, **kwargs):
        out = original(*args, **kwargs)
        shapes.append(tuple(out.shape))
        return out

    monkeypatch.setattr(torch, "mm", counting)
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model(xg)[:, 0].sum(), xg)
    assert torch.isfinite(grad).all() and not weight_shapes & set(shapes)
    model(x)[:, 0].sum().backward()
    assert weight_shapes <= set(shapes)
    want = (enc.w1.weight.grad.clone(), enc.w2.weight.grad.clone())
    model.zero_grad()
    monkeypatch.setattr(torch.jit, "is_tracing", lambda: True)  # stock ops throughout
    model(x)[:, 0].sum().backward()
    for a, b in zip(want, (enc.w1.weight.grad, enc.w2.weight.grad)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", ["matrix", "mean"])
@pytest.mark.parametrize("batch", [1, 7])
def test_one_node_float32_path_equals_the_stock_ops(variant, batch, kernel_path):
    """Float32 with the prefix sums in float32: `FoldedICA` (C tanh, shift and exp, dL/de from the
    kernel, the score path's input-gradient added in place) against the stock ops: gate inputs and
    the gradients of x, W1, W2 and W_ih, 1e-5 of each result's scale."""
    from training import ica

    torch.manual_seed(1)
    enc = ica.InputCellAttention(40, r=4, d_a=6, variant=variant)
    w_ih = (0.3 * torch.randn(8, 4 * 40 if variant == "matrix" else 40)).requires_grad_(True)
    x = (2 * torch.randn(batch, 30, 40)).requires_grad_(True)
    calls = []
    original = hop_sum.FoldedICA.forward

    def counting(ctx, *args):
        calls.append(1)
        return original(ctx, *args)

    hop_sum.FoldedICA.forward = staticmethod(counting)
    try:
        got = enc.gate_inputs(x, w_ih)
    finally:
        hop_sum.FoldedICA.forward = staticmethod(original)
    assert calls and not enc._wide(x)
    with hop_sum.use_stock_ops():
        want = enc.gate_inputs(x, w_ih)
    g = torch.randn(got.shape)
    inputs = (x, enc.w1.weight, enc.w2.weight, w_ih)
    for a, b in zip((got, *torch.autograd.grad(got, inputs, g)), (want, *torch.autograd.grad(want, inputs, g))):
        scale = float(b.detach().abs().max().clamp(min=1))
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize(("variant", "t"), [("matrix", 25), ("mean", 25), ("matrix", 5000)])
def test_wide_scores_stay_float32_in_the_online_kernel_and_agree(variant, t, kernel_path):
    """Past the float32-safe score spread the stock ops sum in float64; `FoldedICA`'s online mode
    (weights relative to each hop's running maximum) stays in float32 and gives the same gate
    inputs and gradients, finite, up to T = 5000 (1e-5 of each result's scale; against a float64
    reference both were measured at 1e-6)."""
    from training import ica

    torch.manual_seed(2)
    enc = ica.InputCellAttention(40, r=4, d_a=6, variant=variant)
    with torch.no_grad():
        enc.w2.weight.mul_(40.0)
    assert enc.score_spread_bound() > enc.float32_safe_spread
    w_ih = (0.3 * torch.randn(8, 4 * 40 if variant == "matrix" else 40)).requires_grad_(True)
    x = (2 * torch.randn(2, t, 40)).requires_grad_(True)
    calls = []
    original = hop_sum.FoldedICA.forward
    hop_sum.FoldedICA.forward = staticmethod(lambda ctx, *a: calls.append(1) or original(ctx, *a))
    try:
        got = enc.gate_inputs(x, w_ih)
    finally:
        hop_sum.FoldedICA.forward = staticmethod(original)
    assert calls and got.dtype == torch.float32
    with hop_sum.use_stock_ops():
        want = enc.gate_inputs(x, w_ih)
    g = torch.randn(got.shape)
    inputs = (x, enc.w1.weight, enc.w2.weight, w_ih)
    for a, b in zip((got, *torch.autograd.grad(got, inputs, g)), (want, *torch.autograd.grad(want, inputs, g))):
        assert torch.isfinite(a).all()
        scale = float(b.detach().abs().max().clamp(min=1))
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_each_path_computes_the_attention_weights_once(monkeypatch, dtype):
    """The fused float32 node computes its own weights; every other path (float64 sums, stock ops)
    computes them once."""
    from training import ica

    enc = ica.InputCellAttention(40, r=4, d_a=6).to(dtype)
    w_ih = torch.randn(8, 160, dtype=dtype)
    x = torch.randn(2, 10, 40, dtype=dtype)
    calls = []
    original = ica.InputCellAttention._prefix_weights
    monkeypatch.setattr(ica.InputCellAttention, "_prefix_weights", lambda self, z: calls.append(1) or original(self, z))
    enc.gate_inputs(x, w_ih)
    assert len(calls) == (0 if dtype == torch.float32 else 1)
    with hop_sum.use_stock_ops():
        enc.gate_inputs(x, w_ih)
    assert len(calls) == (1 if dtype == torch.float32 else 2)


@pytest.mark.parametrize("variant", ["matrix", "mean"])
def test_second_derivatives_equal_the_stock_ops(variant):
    """The fused backward passes are first-order; asked for a graph (create_graph) they
    differentiate the stock ops rebuilt on the saved inputs, so a Hessian-vector product in x and
    a gradient penalty's weight gradients are those of the stock ops (float32: `FoldedICA`;
    float64: `_PrefixWeights` and `FoldedGates`), not silently missing terms."""
    for dtype, tol in ((torch.float32, 1e-4), (torch.float64, 1e-9)):
        model = _model(variant).to(dtype)
        x0 = torch.randn(2, 10, 40, dtype=dtype)
        v = torch.randn(2, 10, 40, dtype=dtype)
        results = []
        for stock in (False, True):
            model.zero_grad()
            x = x0.clone().requires_grad_(True)
            with (hop_sum.use_stock_ops() if stock else contextlib.nullcontext()):
                (g,) = torch.autograd.grad(model(x)[:, 0].sum(), x, create_graph=True)
                (hvp,) = torch.autograd.grad((g * v).sum(), x, retain_graph=True)
                (g * g).sum().backward()
            results.append([hvp, model.encoder.w1.weight.grad.clone(), model.rnn.weight_ih_l0.grad.clone()])
        for a, b in zip(*results):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol * float(b.abs().max().clamp(min=1)))


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "stock"])
def test_an_empty_batch_gives_empty_gate_inputs(fused):
    from training import ica

    enc = ica.InputCellAttention(12, r=3, d_a=5)
    w_ih = torch.randn(4, 36, requires_grad=True)
    x = torch.randn(0, 5, 12, requires_grad=True)
    if fused:
        u = enc.gate_inputs(x, w_ih)
    else:
        with hop_sum.use_stock_ops():
            u = enc.gate_inputs(x, w_ih)
    u.sum().backward()
    assert u.shape == (0, 5, 4) and x.grad.shape == x.shape


def test_autocast_takes_the_stock_ops():
    """Under CPU autocast the GEMMs return bfloat16, which the float32 kernel must never see: the
    stock ops run, with the same answers as stock ops under autocast. In a subprocess, since a
    regression here is a heap overwrite, not an exception."""
    code = (
        "import torch\n"
        "from training import hop_sum, ica\n"
        "torch.manual_seed(0)\n"
        "enc = ica.InputCellAttention(12, r=3, d_a=50)\n"
        "x, w_ih = torch.randn(2, 5, 12, requires_grad=True), torch.randn(4, 36)\n"
        "with torch.autocast('cpu', dtype=torch.bfloat16):\n"
        "    assert not hop_sum.applies(x, x)\n"
        "    got = enc.gate_inputs(x, w_ih)\n"
        "    with hop_sum.use_stock_ops():\n"
        "        want = enc.gate_inputs(x, w_ih)\n"
        "(g1,) = torch.autograd.grad(got.float().sum(), x)\n"
        "(g2,) = torch.autograd.grad(want.float().sum(), x)\n"
        "assert torch.equal(got, want) and torch.equal(g1, g2)\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


# Shapes for the whole-node C path (hop_sum.c `icaserve_ica_forward_f32`): hop counts below, at and
# past one vector of 16 (r = 33: three vectors, the last masked); projection widths G*r that end a
# GEMM panel on a partial vector (8*5 = 40, 4*33 = 132) or fill it (20*20 = 400); T short of, at and
# past the 6-row tile (T = 1 included); odd feature and attention widths (N = 17, d_a = 7).
WHOLE_SHAPES = [
    # batch, T, N, r, d_a, G
    (1, 1, 17, 5, 7, 8),
    (3, 6, 40, 4, 6, 8),
    (2, 13, 17, 33, 7, 4),
    (5, 31, 100, 20, 50, 20),
    (1, 100, 100, 20, 50, 20),
    (2, 7, 20, 70, 66, 2),  # r and d_a past one 64-column panel
]


@pytest.mark.parametrize(("batch", "t", "n", "r", "d_a", "g"), WHOLE_SHAPES)
def test_whole_node_in_c_equals_the_chunked_path_and_the_stock_ops(monkeypatch, batch, t, n, r, d_a, g):
    """`FoldedICA` as one C call a sequence at a time (its own register-tiled GEMMs, forward and the
    input-gradient) gives the gate inputs and dL/dx of the chunked path (torch's GEMMs around the
    kernel) and of the stock ops, to 1e-5 of each result's scale."""
    if not hop_sum.vectorised():
        pytest.skip("the kernel was built without AVX-512")
    from training import ica

    torch.manual_seed(3)
    enc = ica.InputCellAttention(n, r=r, d_a=d_a)
    for prm in enc.parameters():
        prm.requires_grad_(False)  # an explanation: no weight gradient
    w_ih = 0.3 * torch.randn(g, r * n)
    x = 2 * torch.randn(batch, t, n)
    gu = torch.randn(batch, t, g)
    used = []
    original = hop_sum._whole_in_c

    def run(whole: bool, stock: bool = False):
        monkeypatch.setattr(hop_sum, "_whole_in_c", lambda *a: used.append(whole) or (whole and original(*a)))
        xg = x.clone().requires_grad_(True)
        with hop_sum.use_stock_ops() if stock else contextlib.nullcontext():
            u = enc.gate_inputs(xg, w_ih)
        return u.detach(), torch.autograd.grad(u, xg, gu)[0]

    whole = run(True)
    assert used == [True] and original(enc.w2.weight, r)
    for other in (run(False), run(False, stock=True)):
        for a, b in zip(whole, other):
            assert torch.isfinite(a).all()
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max().clamp(min=1)))


def test_whole_node_weight_gradients_take_the_chunked_backward():
    """Training (weight gradients wanted) runs the whole-node forward and the chunked backward, which
    reads the same saved tensors: the gradients of x and every weight equal the stock ops'."""
    if not hop_sum.vectorised():
        pytest.skip("the kernel was built without AVX-512")
    from training import ica

    torch.manual_seed(4)
    enc = ica.InputCellAttention(30, r=5, d_a=7)
    w_ih = (0.3 * torch.randn(8, 5 * 30)).requires_grad_(True)
    x = (2 * torch.randn(3, 14, 30)).requires_grad_(True)
    g = torch.randn(3, 14, 8)
    inputs = (x, enc.w1.weight, enc.w2.weight, w_ih)
    got = torch.autograd.grad(enc.gate_inputs(x, w_ih), inputs, g)
    with hop_sum.use_stock_ops():
        want = torch.autograd.grad(enc.gate_inputs(x, w_ih), inputs, g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max().clamp(min=1)))


def test_packed_weights_follow_the_weights():
    """The C path packs the weights once and reuses them while they are unchanged; an in-place update
    (an optimiser step), a load_state_dict or another model's weights give answers from the new
    values, never stale packs."""
    if not hop_sum.vectorised():
        pytest.skip("the kernel was built without AVX-512")
    torch.manual_seed(5)
    model, other = _model("matrix"), _model("matrix")
    with torch.no_grad():
        for prm in other.parameters():
            prm.add_(0.1 * torch.randn_like(prm))
    x = torch.randn(2, 12, 40)

    def stock(m):
        with hop_sum.use_stock_ops():
            return m(x)

    first = model(x)
    assert model(x).equal(first)  # the cached packs: the same answer
    for m in (other, model):
        torch.testing.assert_close(m(x), stock(m), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        model.encoder.w1.weight.mul_(1.5)
        model.rnn.weight_ih_l0.add_(0.05)
    changed = model(x)
    assert not changed.equal(first)
    torch.testing.assert_close(changed, stock(model), rtol=1e-5, atol=1e-6)
    model.load_state_dict(other.state_dict())
    torch.testing.assert_close(model(x), other(x), rtol=0, atol=0)


@pytest.mark.parametrize(("m", "k", "nc"), [(1, 1, 1), (7, 13, 17), (100, 100, 400), (13, 450, 100), (6, 5, 64), (5, 33, 130)])
def test_tiled_gemm_equals_torch(m, k, nc):
    """The C path's register-tiled GEMM (`pack` + `tiled_mm`, what `FoldedICA` multiplies with) equals
    torch's matmul, for row counts short of and past its 6-row tile and widths that end a 64-column
    panel on a partial vector; b may be a transposed view (the forward packs W^T)."""
    if not hop_sum.vectorised():
        pytest.skip("the kernel was built without AVX-512")
    torch.manual_seed(6)
    a, b = torch.randn(m, k), torch.randn(nc, k).t()
    want = a @ b
    tol = 1e-6 * float(want.abs().max().clamp(min=1))  # float32 sums in another order
    torch.testing.assert_close(hop_sum.tiled_mm(a, hop_sum.pack(b), nc), want, rtol=1e-5, atol=tol)
    out = torch.full((m, nc), float("nan"))
    assert hop_sum.tiled_mm(a, hop_sum.pack(b.contiguous()), nc, out) is out
    torch.testing.assert_close(out, want, rtol=1e-5, atol=tol)
    with pytest.raises(ValueError):  # a packed partner of another depth
        hop_sum.tiled_mm(a[:, 1:], hop_sum.pack(b), nc)


# The projected order (G >= N): widths N short of, at and past 128 (the backward keeps dL/dx[t] in
# registers up to 8 vectors), T = 1 included, the shipped model's shape last (hidden 64: G = 256).
PROJECTED_SHAPES = [
    # batch, T, N, r, d_a, G
    (1, 1, 5, 3, 4, 8),
    (2, 13, 17, 5, 7, 20),
    (3, 30, 40, 4, 6, 40),
    (2, 9, 130, 3, 5, 140),
    (2, 100, 100, 20, 50, 256),
]


def _projected_case(n: int, r: int, d_a: int, g: int, scale: float = 1.0):  # noqa: ANN202
    from training import ica

    torch.manual_seed(7)
    enc = ica.InputCellAttention(n, r=r, d_a=d_a)
    with torch.no_grad():
        enc.w2.weight.mul_(scale)
    enc.requires_grad_(False)
    return enc, 0.3 * torch.randn(g, r * n)


def _gates_and_grad(enc, w_ih: torch.Tensor, x: torch.Tensor, gu: torch.Tensor, stock: bool):  # noqa: ANN001, ANN202
    xg = x.clone().requires_grad_(True)
    with hop_sum.use_stock_ops() if stock else contextlib.nullcontext():
        u = enc.gate_inputs(xg, w_ih)
    return u.detach(), torch.autograd.grad(u, xg, gu)[0]


@pytest.mark.parametrize(("batch", "t", "n", "r", "d_a", "g"), PROJECTED_SHAPES)
def test_projected_path_equals_the_stock_ops(monkeypatch, batch, t, n, r, d_a, g):
    """G >= N with frozen weights (an explanation): `ProjectedICA`, one C call a sequence at a time
    whose backward recomputes the per-hop means instead of keeping them, gives the stock ops' gate
    inputs and dL/dx, to 1e-5 of each result's scale."""
    if not hop_sum.vectorised():
        pytest.skip("the kernel was built without AVX-512")
    enc, w_ih = _projected_case(n, r, d_a, g)
    x, gu = 2 * torch.randn(batch, t, n), torch.randn(batch, t, g)
    calls = []
    original = hop_sum.ProjectedICA.forward
    monkeypatch.setattr(hop_sum.ProjectedICA, "forward", staticmethod(lambda ctx, *a: calls.append(1) or original(ctx, *a)))
    got = _gates_and_grad(enc, w_ih, x, gu, stock=False)
    assert calls == [1]
    want = _gates_and_grad(enc, w_ih, x, gu, stock=True)
    assert calls == [1]
    for a, b in zip(got, want):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max().clamp(min=1)))


def test_projected_path_stays_float32_past_the_safe_spread():
    """W2 x 40 (score spread past the float32-safe 60, where stock ops sum in float64) over T = 3000:
    the online softmax keeps the C path in float32, finite, equal to the stock ops."""
    if not hop_sum.vectorised():
        pytest.skip("the kernel was built without AVX-512")
    enc, w_ih = _projected_case(8, 4, 6, 32, scale=40.0)
    assert enc.score_spread_bound() > enc.float32_safe_spread
    x, gu = 2 * torch.randn(2, 3000, 8), torch.randn(2, 3000, 32)
    got = _gates_and_grad(enc, w_ih, x, gu, stock=False)
    want = _gates_and_grad(enc, w_ih, x, gu, stock=True)
    for a, b in zip(got, want):
        assert a.dtype == torch.float32 and torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max().clamp(min=1)))


def test_projected_path_leaves_training_to_the_stock_ops(monkeypatch):
    """Weights that require grad under grad mode (training) keep the stock ops, so their gradients
    come from autograd; with grad mode off the same model takes the C path and answers the same."""
    if not hop_sum.vectorised():
        pytest.skip("the kernel was built without AVX-512")
    model = _model("matrix", hidden=16)  # G = 64 >= N = 40: the projected order
    assert model.rnn.weight_ih_l0.shape[0] >= 40
    calls = []
    original = hop_sum.ProjectedICA.forward
    monkeypatch.setattr(hop_sum.ProjectedICA, "forward", staticmethod(lambda ctx, *a: calls.append(1) or original(ctx, *a)))
    x = torch.randn(2, 12, 40)
    model(x)[:, 0].sum().backward()
    assert not calls and model.encoder.w1.weight.grad is not None
    with torch.no_grad():
        fast = model(x)
    assert calls == [1]
    with hop_sum.use_stock_ops(), torch.no_grad():
        torch.testing.assert_close(fast, model(x), rtol=1e-5, atol=1e-6)


def test_projected_second_derivatives_equal_the_stock_ops():
    """A Hessian-vector product in x through the projected C path (create_graph) differentiates the
    stock ops rebuilt on the saved inputs: the stock ops' answer."""
    if not hop_sum.vectorised():
        pytest.skip("the kernel was built without AVX-512")
    model = _model("matrix", hidden=16).requires_grad_(False)
    x0, v = torch.randn(2, 10, 40), torch.randn(2, 10, 40)
    results = []
    for stock in (False, True):
        x = x0.clone().requires_grad_(True)
        with hop_sum.use_stock_ops() if stock else contextlib.nullcontext():
            (g,) = torch.autograd.grad(model(x)[:, 0].sum(), x, create_graph=True)
            (hvp,) = torch.autograd.grad((g * v).sum(), x)
        results.append((g.detach(), hvp))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max().clamp(min=1)))


@pytest.mark.parametrize(("batch", "t"), [(0, 5), (2, 0)])
@pytest.mark.parametrize("hidden", [5, 16], ids=["folded", "projected"])
def test_c_paths_take_empty_batches_and_sequences(batch, t, hidden):
    """No sequences, or sequences of no steps, through either C node: empty answers, no error."""
    model = _model("matrix", hidden=hidden).requires_grad_(False)
    x = torch.randn(batch, t, 40, requires_grad=True)
    u = model.encoder.gate_inputs(x, model.rnn.weight_ih_l0)
    assert u.shape == (batch, t, model.rnn.weight_ih_l0.shape[0])
    (grad,) = torch.autograd.grad(u.sum(), x, allow_unused=True)
    assert grad is None or grad.shape == x.shape


def test_c_paths_refuse_shapes_that_do_not_agree():
    """A feature width the weights were not made for is refused before any C GEMM reads past the
    packed weights (the stock ops refused it too)."""
    if not hop_sum.vectorised():
        pytest.skip("the kernel was built without AVX-512")
    model = _model("matrix")
    for width in (39, 41, 64):
        with pytest.raises(ValueError, match="shapes do not agree"):
            model(torch.randn(2, 5, width))
    enc = model.encoder
    w_ih = torch.randn(64, 4 * 40)
    with pytest.raises(ValueError, match="shapes do not agree"):
        hop_sum.projected_ica(torch.randn(2, 5, 41), enc.w1.weight, enc.w2.weight, w_ih)
    with pytest.raises(ValueError, match="shapes do not agree"):
        hop_sum.projected_ica(torch.randn(2, 5, 40), enc.w1.weight, enc.w2.weight, w_ih[:, 1:])


@pytest.mark.parametrize("hidden", [5, 16], ids=["folded", "projected"])
def test_packed_weights_follow_data_swaps_and_in_place_updates(hidden):
    """Both C nodes' packed weights: a `.data` swap (a new storage, possibly at a freed one's address)
    and an in-place update under no_grad give the new weights' answers; a write behind the version
    counter (`.data.mul_`) is seen after `clear_packs`."""
    if not hop_sum.vectorised():
        pytest.skip("the kernel was built without AVX-512")
    model = _model("matrix", hidden=hidden).requires_grad_(False)
    x = torch.randn(2, 12, 40)

    def stock() -> torch.Tensor:
        with hop_sum.use_stock_ops():
            return model(x)

    weight = model.rnn.weight_ih_l0
    for _ in range(5):
        before = model(x)
        for _ in range(2):  # the second swap's storage may take the address the first one freed
            weight.data = weight.data + 0.05 * torch.randn_like(weight)
        after = model(x)
        assert not after.equal(before)
        torch.testing.assert_close(after, stock(), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        model.encoder.w2.weight.mul_(1.3)
    torch.testing.assert_close(model(x), stock(), rtol=1e-5, atol=1e-6)
    model.encoder.w1.weight.data.mul_(0.5)  # behind the version counter
    hop_sum.clear_packs()
    torch.testing.assert_close(model(x), stock(), rtol=1e-5, atol=1e-6)
