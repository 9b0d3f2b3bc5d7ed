"""Input-cell attention: the parallel model (prefix-sum ICA + fused nn.LSTM/GRU/RNN) against the
step-by-step definition in `ica_reference.py`, plus numerics, attention, TorchScript and dropout.

Tolerances: torch.testing.assert_close with rtol = atol = 1e-10 in float64 and 1e-5 in float32,
i.e. |parallel - reference| <= tol + tol * |reference| elementwise ("relative or absolute": the
absolute term covers entries near zero, the relative one large logits and gradients).
"""

from __future__ import annotations

import itertools
import random
import sys
from pathlib import Path

import pytest
import torch

_HERE = Path(__file__).resolve().parent
for _p in (str(_HERE.parent), str(_HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from ica_reference import ica_step_input, reference_attention, reference_forward  # noqa: E402

from training.models import ModelConfig, build_model, inference_copy  # noqa: E402

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def _model(dtype=torch.float64, seed=0, **cfg) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg.setdefault("attention", "ica")
    return build_model(ModelConfig(**cfg)).to(dtype).eval()


def _logits_and_grad(fn, x: torch.Tensor, weights: torch.Tensor):
    x = x.detach().clone().requires_grad_(True)
    logits = fn(x)
    (grad,) = torch.autograd.grad((logits * weights).sum(), x)
    return logits.detach(), grad


def _check_against_reference(model, x: torch.Tensor) -> None:
    tol = TOL[x.dtype]
    g = torch.Generator().manual_seed(1234)
    weights = torch.randn(x.shape[0], model.config.n_classes, generator=g).to(x.dtype)
    out, grad = _logits_and_grad(model, x, weights)
    ref_out, ref_grad = _logits_and_grad(lambda z: reference_forward(model, z), x, weights)
    assert out.shape == (x.shape[0], model.config.n_classes)
    torch.testing.assert_close(out, ref_out, rtol=tol, atol=tol)
    torch.testing.assert_close(grad, ref_grad, rtol=tol, atol=tol)


GRID = list(itertools.product(("lstm", "gru", "rnn"), ("matrix", "mean"), (1, 2), (False, True)))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("cell,variant,layers,bidirectional", GRID)
def test_parallel_matches_step_by_step(cell, variant, layers, bidirectional, dtype):
    seed = GRID.index((cell, variant, layers, bidirectional))
    seed += 100 if dtype == torch.float32 else 0
    rng = random.Random(seed)
    model = _model(
        dtype,
        seed=seed,
        n_features=rng.randint(1, 6),
        n_classes=rng.randint(2, 4),
        cell=cell,
        ica_variant=variant,
        hidden=rng.randint(1, 7),
        layers=layers,
        bidirectional=bidirectional,
        r=rng.randint(1, 5),
        d_a=rng.randint(1, 7),
    )
    n = model.config.n_features
    g = torch.Generator().manual_seed(seed)
    for steps in (1, rng.randint(2, 12)):  # T = 1 always, plus one longer sequence
        x = (torch.randn(rng.randint(1, 3), steps, n, generator=g) * 2).to(dtype)
        _check_against_reference(model, x)


try:  # random configurations and shapes on top of the fixed grid
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    given = None

if given is not None:

    @settings(max_examples=30, deadline=None, derandomize=True)
    @given(
        cell=st.sampled_from(("lstm", "gru", "rnn")),
        variant=st.sampled_from(("matrix", "mean")),
        layers=st.integers(1, 2),
        bidirectional=st.booleans(),
        batch=st.integers(1, 3),
        steps=st.integers(1, 16),
        n=st.integers(1, 6),
        r=st.integers(1, 6),
        d_a=st.integers(1, 8),
        hidden=st.integers(1, 8),
        scale=st.sampled_from((0.1, 1.0, 10.0)),
        seed=st.integers(0, 2**16),
    )
    def test_parallel_matches_step_by_step_hypothesis(
        cell, variant, layers, bidirectional, batch, steps, n, r, d_a, hidden, scale, seed
    ):
        model = _model(
            torch.float64, seed=seed, n_features=n, cell=cell, ica_variant=variant,
            hidden=hidden, layers=layers, bidirectional=bidirectional, r=r, d_a=d_a,
        )
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(batch, steps, n, generator=g, dtype=torch.float64) * scale
        _check_against_reference(model, x)


@pytest.mark.parametrize("attention", ["none", "self"])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_reference_also_matches_models_without_ica(cell, attention):
    """The oracle's cell equations and pooling are checked on their own, without ICA."""
    model = _model(torch.float64, seed=7, n_features=3, cell=cell, attention=attention,
                   hidden=4, layers=2, bidirectional=True, r=3, d_a=4)
    x = torch.randn(2, 6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    _check_against_reference(model, x)


# ---------------------------------------------------------------------------------------------
# numerics

@pytest.mark.parametrize("w2_scale", [1.0, 10.0, 100.0])
@pytest.mark.parametrize("variant", ["matrix", "mean"])
def test_long_sequence_large_inputs_stay_finite(variant, w2_scale):
    """T = 5000, |x| ~ 1e3, paper sizes (r = 20, d_a = 50), float32 model, bidirectional.

    Inputs of 1e3 saturate tanh, so the scores sit at +-||W2 row||_1 and their spread over time
    is set by W2 alone: ~4.5 nats at init, ~45 at W2 x10, ~450 at W2 x100. At x100 some prefix
    sums of exp(score - max) are ~1e-136: zero in float32 (the test shows the float32 version
    of the same computation turns non-finite), fine in float64. Outputs and input-gradients must
    be finite, and the embedding at a few steps must match a float64 step-by-step A_t X_t.
    """
    model = _model(torch.float32, seed=3, n_features=8, ica_variant=variant, hidden=5,
                   bidirectional=True)
    with torch.no_grad():
        model.encoder.w2.weight.mul_(w2_scale)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5000, 8, generator=g) * 1e3
    x[:, ::7] *= -1.0
    out, grad = _logits_and_grad(model, x, torch.ones(2, 2))
    assert torch.isfinite(out).all()
    assert torch.isfinite(grad).all()  # may be exactly 0: 1e3 inputs saturate the LSTM gates

    enc = model.encoder  # the gradient through the prefix sums alone must be finite and alive
    xe = x.detach().clone().requires_grad_(True)
    emb = enc(xe)
    (enc_grad,) = torch.autograd.grad((emb * torch.randn(emb.shape, generator=g)).sum(), xe)
    assert torch.isfinite(enc_grad).all()
    assert (enc_grad != 0).float().mean() > 0.5

    with torch.no_grad():
        m = enc.embed(x[:1])  # (1, T, r, N) float32
        enc64 = _model(torch.float64, seed=3, n_features=8, ica_variant=variant).encoder
        enc64.load_state_dict(enc.state_dict())
        x64 = x[:1].double()
        for t in (1, 2, 777, 5000):
            ref = torch.bmm(reference_attention(enc64, x64, t), x64[:, :t])[0]  # (r, N)
            torch.testing.assert_close(m[0, t - 1].double(), ref, rtol=1e-5, atol=1e-5 * 1e3)
        if w2_scale >= 100:  # the same prefix sums accumulated in float32 break down here
            e = enc.scores(x)
            w = torch.exp(e - e.amax(1, keepdim=True))
            num = torch.cumsum(w.unsqueeze(-1) * x.unsqueeze(2), 1)
            naive = num / torch.cumsum(w, 1).unsqueeze(-1)
            assert not torch.isfinite(naive).all()


def test_attention_rows_are_causal_distributions():
    model = _model(torch.float64, seed=5, n_features=4, r=6, d_a=7, ica_variant="mean")
    x = torch.randn(3, 11, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) * 5
    a = model.attention_weights(x)
    assert a.shape == (3, 11, 11)
    ones = torch.ones(3, 11, dtype=torch.float64)
    torch.testing.assert_close(a.sum(-1), ones, rtol=0, atol=1e-12)
    assert (a >= 0).all()
    assert (a.triu(diagonal=1) == 0).all()  # no weight on future steps
    lower = torch.ones(11, 11, dtype=torch.bool).tril()
    assert (a[:, lower] > 0).all()  # every past step gets some weight
    for t in (1, 6, 11):  # row t-1 is A_t averaged over hops
        ref = reference_attention(model.encoder, x, t).mean(1)
        torch.testing.assert_close(a[:, t - 1, :t], ref, rtol=1e-12, atol=1e-12)
    # For the mean variant the cell input is exactly attention @ x.
    torch.testing.assert_close(model.encoder(x), a @ x, rtol=1e-12, atol=1e-12)


def test_attention_is_empty_without_ica():
    model = _model(torch.float32, n_features=3, attention="none")
    assert model.attention_weights(torch.randn(2, 5, 3)).shape == (2, 0, 0)


# ---------------------------------------------------------------------------------------------
# TorchScript and dropout

@pytest.mark.parametrize(
    "cell,variant,layers,bidirectional",
    [("lstm", "matrix", 1, False), ("gru", "mean", 2, True), ("rnn", "matrix", 2, False)],
)
def test_scripted_equals_eager(cell, variant, layers, bidirectional):
    model = _model(torch.float32, seed=11, n_features=5, cell=cell, ica_variant=variant,
                   hidden=6, layers=layers, bidirectional=bidirectional, r=4, d_a=8)
    scripted = torch.jit.script(model)
    x = torch.randn(3, 9, 5, generator=torch.Generator().manual_seed(11))
    w = torch.randn(3, 2)
    out, grad = _logits_and_grad(model, x, w)
    s_out, s_grad = _logits_and_grad(scripted, x, w)
    torch.testing.assert_close(s_out, out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(s_grad, grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(scripted.attention_weights(x), model.attention_weights(x),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("layers", [1, 2])
def test_dropout_is_off_in_eval_and_in_inference_copy(layers):
    model = _model(torch.float32, seed=13, n_features=4, hidden=8, layers=layers,
                   bidirectional=True, dropout=0.5, r=3, d_a=5)
    x = torch.randn(4, 10, 4, generator=torch.Generator().manual_seed(13))
    with torch.no_grad():
        first, second = model(x), model(x)
        torch.testing.assert_close(first, second, rtol=0, atol=0)
        torch.manual_seed(0)
        model.train()
        noisy = model(x)
        model.eval()
        assert not torch.allclose(noisy, first)  # dropout is really there in train mode
        clean = inference_copy(model).train()
        assert clean.training
        torch.testing.assert_close(clean(x), first, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(clean(x), clean(x), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# the folded form: the gate inputs W_ih vec(M_t) computed outside the fused RNN, with prefix sums
# over the gate width G (G < N) or over N followed by the projection (G >= N)

FOLD_GRID = list(itertools.product(("lstm", "gru", "rnn"), ("matrix", "mean")))
# (N, hidden): G = 8, 6, 2 < N = 23 (prefix sums over G); G = 16, 12, 4 >= N = 4 (projected)
FOLD_SHAPES = {"over-gates": (23, 2), "projected": (4, 4)}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("order", list(FOLD_SHAPES))
@pytest.mark.parametrize("cell,variant", FOLD_GRID)
def test_folded_equals_direct_equals_step_by_step(cell, variant, order, dtype):
    """Outputs and input-gradients of the folded form (either order), the direct form and the
    literal definition agree (T = 1 included), and the folded model has the same state dict."""
    seed = FOLD_GRID.index((cell, variant)) + (100 if dtype == torch.float32 else 0)
    n, hidden = FOLD_SHAPES[order]
    model = _model(dtype, seed=seed, n_features=n, n_classes=3, cell=cell, ica_variant=variant,
                   hidden=hidden, r=4, d_a=6)
    assert model.folded  # on by default
    direct = _model(dtype, seed=seed, n_features=n, n_classes=3, cell=cell, ica_variant=variant,
                    hidden=hidden, r=4, d_a=6).set_folded(False)
    assert list(direct.state_dict()) == list(model.state_dict())
    direct.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(3, 3, generator=g).to(dtype)
    for steps in (1, 9):
        x = (torch.randn(3, steps, n, generator=g) * 2).to(dtype)
        _check_against_reference(model, x)
        out, grad = _logits_and_grad(model, x, w)
        d_out, d_grad = _logits_and_grad(direct, x, w)
        tol = TOL[dtype]
        torch.testing.assert_close(out, d_out, rtol=tol, atol=tol)
        torch.testing.assert_close(grad, d_grad, rtol=tol, atol=tol)


def test_folded_only_where_it_applies():
    assert _model(n_features=4, hidden=5).folded  # G = 20 >= N: the projected order
    assert not _model(n_features=100, hidden=5, bidirectional=True).folded
    assert not _model(n_features=100, hidden=5, layers=2).folded
    assert not _model(n_features=100, hidden=5, attention="none").folded
    with pytest.raises(ValueError, match="folded form does not apply"):
        _model(n_features=4, hidden=5, layers=2).set_folded(True)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_folded_scripted_and_old_state_dicts(cell):
    """TorchScript keeps the folded form; a state dict saved from the direct form (as every
    model exported before the folded form existed) loads into it and answers the same."""
    direct = _model(torch.float32, seed=21, n_features=30, cell=cell, hidden=3, r=5, d_a=7).set_folded(False)
    folded = _model(torch.float32, seed=99, n_features=30, cell=cell, hidden=3, r=5, d_a=7)
    folded.load_state_dict(direct.state_dict())
    scripted = torch.jit.script(folded)
    assert "_folded_recurrence" in scripted.code  # the folded branch is what was compiled
    x = torch.randn(2, 13, 30, generator=torch.Generator().manual_seed(21))
    w = torch.randn(2, 2)
    out, grad = _logits_and_grad(direct, x, w)
    for m in (folded, scripted):
        m_out, m_grad = _logits_and_grad(m, x, w)
        torch.testing.assert_close(m_out, out, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(m_grad, grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["matrix", "mean"])
def test_folded_long_sequence_large_weights_stay_finite(variant):
    """T = 5000, |x| ~ 1e3, W2 x100 (score spread ~450 nats): the folded prefix sums take the
    float64 path too; gate inputs equal W_ih times the float64 step-by-step cell input."""
    model = _model(torch.float32, seed=3, n_features=8, ica_variant=variant, hidden=1)  # G = 4 < 8
    assert model.folded
    with torch.no_grad():
        model.encoder.w2.weight.mul_(100.0)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5000, 8, generator=g) * 1e3
    x[:, ::7] *= -1.0
    out, grad = _logits_and_grad(model, x, torch.ones(2, 2))
    assert torch.isfinite(out).all() and torch.isfinite(grad).all()
    with torch.no_grad():
        u = model.encoder.gate_inputs(x[:1], model.rnn.weight_ih_l0)  # (1, T, G)
        assert torch.isfinite(u).all()
        enc64 = _model(torch.float64, seed=3, n_features=8, ica_variant=variant, hidden=1).encoder
        enc64.load_state_dict(model.encoder.state_dict())
        w_ih = model.rnn.weight_ih_l0.double()
        for t in (1, 2, 777, 5000):
            cell_in = ica_step_input(enc64, x[:1].double(), t)[0]
            torch.testing.assert_close(u[0, t - 1].double(), w_ih @ cell_in, rtol=1e-4, atol=1e-3)
