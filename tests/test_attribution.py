"""attribution/: every method against captum on the same model and input, TSR against a slow
reference loop, batch-merge invariance, the is_grads_batched fallback, costs, parameter checks.

Models are the project's ICA-LSTM and plain LSTM (inference copies, float64), called through
torch.jit.script-ed modules and through a lambda composing normalisation with the scripted
model; captum always gets the eager model (with the same normalisation) as its reference.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from captum.attr import (
    InputXGradient,
    IntegratedGradients,
    NoiseTunnel,
    Occlusion,
    Saliency,
)

import attribution
from attribution import BASE_METHODS, METHODS, attribute, estimate_cost, tsr, tsr_cost
from attribution.core import _UNBATCHABLE, BACKWARD_COST, input_gradients
from attribution.smoothgrad import noise_draws
from training.models import ModelConfig, build_model, inference_copy

pytestmark = pytest.mark.filterwarnings("ignore:Input Tensor 0 did not already require gradients")

B, T, N, C = 4, 9, 6, 3
DT = torch.float64


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # tiny float64 GEMMs with 2 intra-op threads on a loaded 2-core box spend ~100x longer
    # waiting on each other than computing; one thread keeps this file fast
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _script(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.script(model)


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    out = {}
    for name, attention in (("ica", "ica"), ("lstm", "none")):
        eager = inference_copy(
            build_model(ModelConfig(n_features=N, n_classes=C, attention=attention))
        ).to(DT)
        out[name] = (eager, _script(eager))
    return out


@pytest.fixture(scope="module")
def x():
    g = torch.Generator().manual_seed(1)
    return torch.randn(B, T, N, generator=g, dtype=DT)


MU = torch.linspace(-0.2, 0.3, N, dtype=DT)
SD = torch.linspace(0.8, 1.5, N, dtype=DT)

# (model, how ours is called); captum always gets the eager model
CASES = [("ica", "script"), ("lstm", "script"), ("ica", "lambda")]


def _forwards(models, model, kind):
    eager, scripted = models[model]
    if kind == "script":
        return scripted, eager
    return (lambda z: scripted((z - MU) / SD)), (lambda z: eager((z - MU) / SD))


TARGET_MODES = {
    "same": torch.tensor([[1]] * B),  # one target per sample, all the same class
    "mixed": torch.tensor([[0], [2], [1], [2]]),  # one target per sample, different classes
    "mixed_k2": torch.tensor([[2, 0], [1, 1], [0, 2], [2, 1]]),  # K = 2, differing per sample
    "all": torch.arange(C).repeat(B, 1),  # all classes, K = C
}

IG_BASELINE = 0.3 * torch.randn(T, N, generator=torch.Generator().manual_seed(2), dtype=DT)
OCC_BASELINE = -0.5


def _captum_reference(method, ref_forward, x, targets, monkeypatch):
    """Captum's attributions (B, K, T, N), one captum call per target column."""
    cols = []
    for k in range(targets.shape[1]):
        t = targets[:, k]
        if method == "gradient":
            a = Saliency(ref_forward).attribute(x, target=t, abs=False)
        elif method == "input_x_gradient":
            a = InputXGradient(ref_forward).attribute(x, target=t)
        elif method == "integrated_gradients":
            a = IntegratedGradients(ref_forward).attribute(
                x, baselines=IG_BASELINE.expand_as(x).clone(), target=t, n_steps=16,
                method="gausslegendre",
            )
        elif method == "smoothgrad":
            # captum draws its noise from the global RNG; give it exactly our draws instead,
            # in captum's layout (row b * S + s is sample b with draw s)
            eps = noise_draws(7, T, N, noise=0.2, seed=5, dtype=x.dtype)

            def add_noise(inp, stdev, n):
                assert n == 7 and stdev == 0.2
                return inp.repeat_interleave(n, dim=0) + eps.repeat(inp.shape[0], 1, 1)

            monkeypatch.setattr(NoiseTunnel, "_add_noise_to_input", staticmethod(add_noise))
            a = NoiseTunnel(Saliency(ref_forward)).attribute(
                x, nt_type="smoothgrad", nt_samples=7, stdevs=0.2, target=t, abs=False
            )
        elif method == "occlusion":
            # T=9, N=6 with window (4, 4) / stride (4, 3): cut windows at both edges and
            # overlapping windows along features
            a = Occlusion(ref_forward).attribute(
                x, sliding_window_shapes=(4, 4), strides=(4, 3), baselines=OCC_BASELINE, target=t
            )
        cols.append(a.to(x.dtype))
    return torch.stack(cols, dim=1)


OUR_PARAMS = {
    "gradient": {},
    "input_x_gradient": {},
    "integrated_gradients": {"steps": 16, "baseline": IG_BASELINE, "internal_batch_size": 10},
    "smoothgrad": {"samples": 7, "noise": 0.2, "seed": 5, "internal_batch_size": 9},
    "occlusion": {"window": (4, 4), "stride": (4, 3), "baseline": OCC_BASELINE,
                  "internal_batch_size": 5},
}
# captum rounds IG's step sizes to float32 and returns occlusion in float32
TOL = {
    "integrated_gradients": dict(rtol=1e-6, atol=1e-8),
    "occlusion": dict(rtol=1e-6, atol=1e-7),
}


@pytest.mark.parametrize("mode", list(TARGET_MODES))
@pytest.mark.parametrize("case", CASES, ids=["-".join(c) for c in CASES])
@pytest.mark.parametrize("method", list(BASE_METHODS))
def test_matches_captum(models, x, method, case, mode, monkeypatch):
    ours_fwd, ref_fwd = _forwards(models, *case)
    targets = TARGET_MODES[mode]
    got = attribute(method, ours_fwd, x, targets, **OUR_PARAMS[method])
    assert got.shape == (B, targets.shape[1], T, N) and got.dtype == DT
    assert not got.requires_grad
    want = _captum_reference(method, ref_fwd, x, targets, monkeypatch)
    torch.testing.assert_close(got, want, **TOL.get(method, dict(rtol=1e-9, atol=1e-12)))


def test_defaults_match_captum(models, x):
    """IG with its defaults (50 Gauss-Legendre steps, zero baseline) and occlusion with its
    default window (5, 5) clipped to the input, stride = window."""
    scripted, eager = models["ica"][1], models["ica"][0]
    targets = TARGET_MODES["all"]
    for method, make in (
        ("integrated_gradients", lambda t: IntegratedGradients(eager).attribute(x, target=t)),
        ("occlusion", lambda t: Occlusion(eager).attribute(
            x, sliding_window_shapes=(5, 5), strides=(5, 5), target=t)),
    ):
        want = torch.stack([make(targets[:, k]).to(DT) for k in range(C)], dim=1)
        got = attribute(method, scripted, x, targets)
        torch.testing.assert_close(got, want, **TOL[method])


# ---------------------------------------------------------------------------------------------
# TSR against a straightforward loop


def _minmax_np(v):
    span = v.max() - v.min()
    return (v - v.min()) / (span if span > 0 else 1.0)


def _tsr_reference(base_fn, x, target, baseline, q=0.55, fd=0.1):
    """One sample (T, N), one target: the authors' loop, masking to ``baseline`` (T, N)."""
    t_len, n_len = x.shape
    ref = base_fn(x, target)
    d = np.zeros(t_len)
    for t in range(t_len):
        xm = x.clone()
        xm[t, :] = baseline[t, :]
        d[t] = np.abs(ref - base_fn(xm, target)).sum()
    d = _minmax_np(d)
    thresh = np.quantile(d, q)
    score = np.zeros((t_len, n_len))
    for t in range(t_len):
        if d[t] > thresh:
            f = np.zeros(n_len)
            for i in range(n_len):
                xm = x.clone()
                xm[t, i] = baseline[t, i]
                f[i] = np.abs(ref - base_fn(xm, target)).sum()
            f = _minmax_np(f)
        else:
            f = np.full(n_len, fd)
        score[t] = d[t] * f
    return _minmax_np(score)


@pytest.mark.parametrize("base", ["gradient", "integrated_gradients"])
def test_tsr_matches_slow_loop(models, x, base):
    eager, scripted = models["ica"]
    baseline = 0.1 * torch.randn(T, N, generator=torch.Generator().manual_seed(3), dtype=DT)
    xs, targets = x[:2], torch.tensor([[0, 1, 2], [2, 0, 1]])

    def captum_base(xi, target):
        if base == "gradient":
            a = Saliency(eager).attribute(xi[None], target=target, abs=False)
        else:
            a = IntegratedGradients(eager).attribute(
                xi[None], baselines=baseline[None], target=target, n_steps=6
            )
        return a[0].numpy()

    params = {"steps": 6} if base == "integrated_gradients" else {}
    got = tsr(base, scripted, xs, targets, baseline=baseline, chunk_size=7, **params)
    assert got.shape == (2, 3, T, N) and got.dtype == DT
    want = np.stack([
        np.stack([_tsr_reference(captum_base, xs[b], int(targets[b, k]), baseline)
                  for k in range(3)])
        for b in range(2)
    ])
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-7)


def test_tsr_chunking_and_smoothgrad_base(models, x):
    scripted = models["lstm"][1]
    targets = TARGET_MODES["mixed_k2"]
    one = tsr("smoothgrad", scripted, x, targets, chunk_size=1, samples=3)
    big = tsr("smoothgrad", scripted, x, targets, chunk_size=1000, samples=3)
    torch.testing.assert_close(one, big, rtol=1e-9, atol=1e-12)
    assert float(one.min()) == 0.0 and float(one.max()) == 1.0


# ---------------------------------------------------------------------------------------------
# batching properties


# (merged-call params, alone-call params): the merged call also uses small chunks, so that
# chunk boundaries fall inside samples
OCC_WINDOW = {"window": (2, 3), "stride": (1, 3)}
MERGE_PARAMS = {
    "gradient": ({"internal_batch_size": 3}, {}),
    "input_x_gradient": ({"internal_batch_size": 3}, {}),
    "integrated_gradients": ({"internal_batch_size": 3}, {}),
    "smoothgrad": ({"internal_batch_size": 3}, {}),
    "occlusion": ({"internal_batch_size": 7, **OCC_WINDOW}, OCC_WINDOW),
    "tsr": ({"chunk_size": 5}, {}),
}


@pytest.mark.parametrize("method", list(MERGE_PARAMS))
def test_merged_batch_equals_each_alone(models, x, method):
    """Each sample keeps its own targets (mixed, K = 2); merged == alone, to 1e-12."""
    scripted = models["ica"][1]
    targets = TARGET_MODES["mixed_k2"]

    def run(xx, tt, params):
        if method == "tsr":
            return tsr("smoothgrad", scripted, xx, tt, samples=2, **params)
        return attribute(method, scripted, xx, tt, **params)

    merged_params, alone_params = MERGE_PARAMS[method]
    merged = run(x, targets, merged_params)
    for b in range(B):
        alone = run(x[b : b + 1], targets[b : b + 1], alone_params)
        torch.testing.assert_close(merged[b : b + 1], alone, rtol=1e-9, atol=1e-12)


def test_loop_fallback_equals_batched_backward(models, x):
    for model in ("ica", "lstm"):
        scripted = models[model][1]
        targets = TARGET_MODES["all"]
        batched = input_gradients(scripted, x, targets, batched=True)
        loop = input_gradients(scripted, x, targets, batched=False)
        torch.testing.assert_close(batched, loop, rtol=0, atol=1e-15)


class _NoVmap(torch.autograd.Function):
    """Identity whose backward calls .item(): fine in autograd, impossible under vmap."""

    @staticmethod
    def forward(ctx, z):
        return z.clone()

    @staticmethod
    def backward(ctx, g):
        _ = g.abs().sum().item()
        return g


def test_unbatchable_forward_falls_back_to_loop(models, x):
    eager, scripted = models["lstm"]
    calls = []

    def forward(z):
        calls.append(z.shape[0])
        return scripted(_NoVmap.apply(z))

    targets = TARGET_MODES["mixed_k2"]
    with pytest.raises(RuntimeError):
        input_gradients(forward, x, targets, batched=True)
    calls.clear()
    got = attribute("gradient", forward, x, targets)
    assert len(calls) == 2  # the failed batched attempt, then the rebuilt graph for the loop
    assert forward in _UNBATCHABLE
    want = attribute("gradient", scripted, x, targets)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-15)
    calls.clear()
    again = attribute("gradient", forward, x, targets)
    assert len(calls) == 1  # remembered: straight to the loop
    torch.testing.assert_close(again, want, rtol=0, atol=1e-15)


# ---------------------------------------------------------------------------------------------
# edges, dtypes, determinism, costs, validation


def test_single_time_step(models):
    eager, scripted = models["ica"]
    x1 = torch.randn(3, 1, N, generator=torch.Generator().manual_seed(4), dtype=DT)
    targets = torch.tensor([[0, 2], [1, 1], [2, 0]])
    for method in METHODS:
        a = attribute(method, scripted, x1, targets)
        assert a.shape == (3, 2, 1, N) and torch.isfinite(a).all()
    want = torch.stack(
        [Saliency(eager).attribute(x1, target=targets[:, k], abs=False) for k in range(2)], 1
    )
    torch.testing.assert_close(attribute("gradient", scripted, x1, targets), want)
    want = torch.stack([
        Occlusion(eager).attribute(x1, sliding_window_shapes=(1, 5), strides=(1, 5),
                                   target=targets[:, k]).to(DT)
        for k in range(2)
    ], 1)
    got = attribute("occlusion", scripted, x1, targets)  # default window clipped to (1, 5)
    torch.testing.assert_close(got, want, **TOL["occlusion"])
    # a single step has no relative time relevance: min-max of a constant is 0 everywhere
    assert torch.equal(tsr("gradient", scripted, x1, targets), torch.zeros(3, 2, 1, N, dtype=DT))


def test_float32_no_grad_and_requires_grad_input(models, x):
    eager = models["lstm"][0]
    m32 = inference_copy(build_model(eager.config)).float()
    m32.load_state_dict({k: v.float() for k, v in eager.state_dict().items()})
    x32 = x.float().requires_grad_(True)
    with torch.no_grad():
        for method in METHODS:
            a = attribute(method, m32, x32, TARGET_MODES["mixed"])
            assert a.dtype == torch.float32 and not a.requires_grad
        a = tsr("gradient", m32, x32, TARGET_MODES["mixed"])
        assert a.dtype == torch.float32 and not a.requires_grad
    assert x32.grad is None
    assert all(p.grad is None for p in m32.parameters())


def test_smoothgrad_is_seeded_and_leaves_global_rng_alone(models, x):
    scripted = models["lstm"][1]
    targets = TARGET_MODES["mixed"]
    state = torch.get_rng_state()
    a = attribute("smoothgrad", scripted, x, targets, samples=4, seed=11)
    b = attribute("smoothgrad", scripted, x, targets, samples=4, seed=11)
    c = attribute("smoothgrad", scripted, x, targets, samples=4, seed=12)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    zero = attribute("smoothgrad", scripted, x, targets, samples=2, noise=0.0)
    torch.testing.assert_close(zero, attribute("gradient", scripted, x, targets))


def _cubic_forward(seen: list[torch.Tensor]):
    """logits (rows, 2) = (sum z^3 / 3, sum z): gradients z^2 and 1. Records every input it is
    fed, so a test can look at the noisy copies SmoothGrad makes without trusting noise_draws."""

    def forward(z: torch.Tensor) -> torch.Tensor:
        seen.append(z.detach().clone())
        return torch.stack([(z**3).sum(dim=(1, 2)) / 3, z.sum(dim=(1, 2))], dim=1)

    return forward


@pytest.mark.parametrize("noise", [0.15, 0.6, None])  # None: the documented default, 0.15
def test_smoothgrad_noise_has_the_requested_standard_deviation(noise):
    """The noise scale checked independently of `noise_draws` (which the captum comparison feeds
    to both sides, so a wrong scale there passes it): the perturbations the method adds have
    empirical std `noise`, and the SmoothGrad of a cubic has its closed form
    E[(x + eps)^2] = x^2 + sigma^2, so doubling sigma would show up fourfold."""
    sigma = 0.15 if noise is None else noise
    kwargs = {} if noise is None else {"noise": noise}
    samples, b, t, n = 60, 2, 10, 8  # 4800 draws per sample: the std is known to ~1%
    x = torch.randn(b, t, n, generator=torch.Generator().manual_seed(3), dtype=DT)
    seen: list[torch.Tensor] = []
    targets = torch.zeros(b, 1, dtype=torch.long)
    sal = attribute("smoothgrad", _cubic_forward(seen), x, targets, samples=samples, seed=4,
                    internal_batch_size=7, **kwargs)
    # rows are (draw s, sample j) stacked with j fastest, in chunks of 7
    rows = torch.cat(seen)
    assert rows.shape == (samples * b, t, n)
    eps = rows - x.repeat(samples, 1, 1)
    per_sample = eps.view(samples, b, t, n)
    torch.testing.assert_close(per_sample[:, 0], per_sample[:, 1])  # same draws for every sample
    draws = per_sample[:, 0]
    assert abs(draws.std().item() / sigma - 1) < 0.05, draws.std().item()
    assert abs(draws.mean().item()) < 0.05 * sigma
    # draws independent across time steps and features, not one value broadcast
    assert draws.std(dim=0).min().item() > 0.5 * sigma and draws.std(dim=(1, 2)).min().item() > 0.5 * sigma

    # closed form: the saliency is mean_s (x + eps_s)^2; minus x^2 it averages to sigma^2
    torch.testing.assert_close(sal[:, 0], ((x.unsqueeze(0) + draws.unsqueeze(1)) ** 2).mean(dim=0))
    excess = (sal[:, 0] - x**2).mean().item()
    assert abs(excess / sigma**2 - 1) < 0.1, (excess, sigma**2)
    # the linear logit's gradient is exactly 1 whatever the noise
    ones = attribute("smoothgrad", _cubic_forward([]), x, torch.ones(b, 1, dtype=torch.long),
                     samples=5, **kwargs)
    torch.testing.assert_close(ones, torch.ones_like(ones))


def test_costs_count_the_work(models, x):
    scripted = models["lstm"][1]
    rows = []

    def counting(z):
        rows.append(z.shape[0])
        return scripted(z)

    k = 2
    targets = TARGET_MODES["mixed_k2"]
    per = 1 + BACKWARD_COST * k
    for method, params, forwards in (
        ("gradient", {}, B),
        ("input_x_gradient", {}, B),
        ("integrated_gradients", {"steps": 5}, 5 * B),
        ("smoothgrad", {"samples": 3}, 3 * B),
    ):
        rows.clear()
        attribute(method, counting, x, targets, **params)
        assert sum(rows) == forwards
        if method in ("gradient", "input_x_gradient"):
            assert rows == [B]  # one forward (and one backward) for all samples and targets
        assert estimate_cost(method, B, T, N, k, **params) == forwards * per
    rows.clear()
    attribute("occlusion", counting, x, targets, window=(2, 3))
    n_win = 5 * 2  # window (2, 3) = stride: starts 0,2,4,6,8 in time (last cut), 0,3 in features
    assert sum(rows) == B * (1 + n_win) == estimate_cost("occlusion", B, T, N, k, window=(2, 3))
    assert estimate_cost("occlusion", 1, 100, 100, 5) == 1 + 400  # default window (5, 5)
    assert estimate_cost("integrated_gradients", 2, 100, 100, 1) == 2 * 50 * (1 + BACKWARD_COST)
    rows.clear()
    tsr("gradient", counting, x, targets)
    bound = tsr_cost("gradient", B, T, N, k)
    assert sum(rows) * per <= bound
    kept = T - 1 - math.floor(0.55 * (T - 1))  # 4 steps above the 0.55 quantile at most
    assert bound == B * per * (1 + T + min(T, k * kept) * N)


def _raises(match, fn, *args, **kwargs):
    with pytest.raises(ValueError, match=match):
        fn(*args, **kwargs)


def test_bad_parameters_raise_value_error_naming_them(models, x):
    f = models["lstm"][1]
    tg = TARGET_MODES["same"]
    _raises("method", attribute, "saliency", f, x, tg)
    _raises("stepz", attribute, "integrated_gradients", f, x, tg, stepz=3)
    _raises("steps", attribute, "integrated_gradients", f, x, tg, steps=0)
    _raises("steps", attribute, "integrated_gradients", f, x, tg, steps=2.5)
    ig = "integrated_gradients"
    _raises("steps", attribute, ig, f, x, tg, steps=1, integration="riemann_left")
    _raises("integration", attribute, "integrated_gradients", f, x, tg, integration="simpson")
    _raises("baseline", attribute, "integrated_gradients", f, x, tg, baseline=torch.zeros(T + 1, N))
    _raises("baseline", attribute, "integrated_gradients", f, x, tg, baseline="zeros")
    _raises("internal_batch_size", attribute, ig, f, x, tg, internal_batch_size=0)
    _raises("samples", attribute, "smoothgrad", f, x, tg, samples=0)
    _raises("noise", attribute, "smoothgrad", f, x, tg, noise=-0.1)
    _raises("noise", attribute, "smoothgrad", f, x, tg, noise=float("nan"))
    _raises("seed", attribute, "smoothgrad", f, x, tg, seed=-1)
    _raises("seed", attribute, "smoothgrad", f, x, tg, seed="a")
    _raises("window", attribute, "occlusion", f, x, tg, window=(0, 1))
    _raises("window", attribute, "occlusion", f, x, tg, window=(T + 1, 1))
    _raises("window", attribute, "occlusion", f, x, tg, window=3)
    _raises("stride", attribute, "occlusion", f, x, tg, window=(2, 2), stride=(3, 1))
    _raises("stride", attribute, "occlusion", f, x, tg, stride=(1, 0))
    _raises("threshold_quantile", tsr, "gradient", f, x, tg, threshold_quantile=1.5)
    _raises("feature_default", tsr, "gradient", f, x, tg, feature_default=float("inf"))
    _raises("chunk_size", tsr, "gradient", f, x, tg, chunk_size=0)
    _raises("method", tsr, "tsr", f, x, tg)
    _raises("steps", tsr, "integrated_gradients", f, x, tg, steps=-1)
    _raises("baseline", tsr, "occlusion", f, x, tg, baseline=torch.zeros(2, T, N))
    _raises("targets", attribute, "gradient", f, x, torch.tensor([1] * B))
    _raises("targets", attribute, "gradient", f, x, torch.tensor([[C]] * B))
    _raises("targets", attribute, "occlusion", f, x, torch.tensor([[C]] * B))
    _raises("targets", attribute, "gradient", f, x, torch.tensor([[0.0]] * B))
    _raises("x", attribute, "gradient", f, x[0], tg)
    # the cost estimates validate the same way, before any work
    _raises("steps", estimate_cost, "integrated_gradients", B, T, N, 1, steps=0)
    _raises("window", estimate_cost, "occlusion", B, T, N, 1, window=(T + 1, 1))
    _raises("samples", tsr_cost, "smoothgrad", B, T, N, 1, samples=0)
    _raises("batch", estimate_cost, "gradient", 0, T, N, 1)


def test_public_api():
    assert set(BASE_METHODS) == {
        "gradient", "input_x_gradient", "integrated_gradients", "smoothgrad", "occlusion"
    }
    assert set(METHODS) == set(BASE_METHODS) | {"tsr"}  # TSR is registered like the others
    assert callable(attribution.tsr) and attribution.Forward is not None


@pytest.mark.parametrize("ibs", [None, 2])
def test_gradient_and_logits_equals_forward_then_gradient(models, x, ibs):
    """Targets chosen from the logits of the same pass equal the two-pass answer."""
    _, scripted = models["ica"]
    seen_offsets = []

    def predicted_and_next(logits, offset):
        seen_offsets.append(offset)
        top = logits.argmax(1)
        return torch.stack([top, (top + 1) % C], dim=1)

    logits, targets, grads = attribution.gradient_and_logits(
        scripted, x, predicted_and_next, internal_batch_size=ibs
    )
    with torch.no_grad():
        expected_logits = scripted(x)
    top = expected_logits.argmax(1)
    expected_targets = torch.stack([top, (top + 1) % C], dim=1)
    torch.testing.assert_close(logits, expected_logits)
    assert torch.equal(targets, expected_targets)
    torch.testing.assert_close(grads, attribute("gradient", scripted, x, expected_targets))
    step = ibs or B
    assert seen_offsets == list(range(0, B, step))


def test_gradient_and_logits_rejects_bad_targets(models, x):
    _, scripted = models["ica"]
    with pytest.raises(ValueError, match="targets"):
        attribution.gradient_and_logits(scripted, x, lambda logits, offset: torch.full((len(logits), 1), C))
