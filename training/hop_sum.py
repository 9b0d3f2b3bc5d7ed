"""The fused hop sum of folded input-cell attention (`hop_sum.c`), compiled on first use.

`InputCellAttention.gate_inputs` ends in a prefix-weighted sum over hops,

    u_t = sum_j (sum_{s<=t} w_sj p_sj) / (sum_{s<=t} w_sj),

which stock torch ops compute through (B, T, r, G) tensors that forward and backward pass over
about twenty times (multiply, cumsum and its flip-cumsum-flip backward, the hop matmul); on a
CPU that traffic, not arithmetic, is most of ICA's cost at large batches. The C kernel keeps the
running sums in G x r accumulators instead: one pass over time forward, two backward.

`folded_gates` also takes the projection p_sj = W_ih^(j) x_s that feeds it,
a few sequences at a time, so each chunk's p (and backward its gradient) goes from the GEMM to
the kernel (and back) while it is still in cache. Its p is laid out (B, T, G, r), hops innermost,
so that the rows of the GEMM's weight are W_ih itself, reshaped; `hop_sum` takes that layout too.
`folded_ica` (what a float32 model calls) adds the attention's scores W2 tanh(W1 x) in front, one
autograd node whose elementwise steps run in C as well, and weighs the steps by an online softmax
(a running maximum per hop), so it stays in float32 for any score spread. Where the kernel's
AVX-512 path is on, that node (the matrix variant) is one C call, a sequence at a time, with GEMMs
of its own over weights packed once (`_packs`): forward always, backward when only the
input-gradient is asked (explanations); weight gradients take the chunked torch path.

Where it runs: eager CPU float32/float64 (training, the service's CPU modules, the benchmarks).
Scripted and traced graphs (TorchScript and ONNX exports) keep the stock ops, so an exported file
never depends on this library. Without a C compiler, or if the build fails, `available()` is False
and the stock ops run (one warning); `ICASERVE_FUSED_ICA=0` turns it off.

Built and cached by `icaserve.native`; called through ctypes, which releases the GIL.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import weakref
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.utils.weak import WeakIdKeyDictionary

from icaserve import native

SOURCE = Path(__file__).with_name("hop_sum.c")
ENV_SWITCH = "ICASERVE_FUSED_ICA"


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    functions = {}
    for suffix in ("f32", "f64"):
        functions[f"icaserve_hop_sum_forward_{suffix}"] = [ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64, i64]
        functions[f"icaserve_hop_sum_backward_{suffix}"] = [ptr, ptr, ptr, ptr, ptr, ptr, ctypes.c_int, ptr,
                                                            i64, i64, i64, i64, i64]
    functions["icaserve_hop_sum_vectorised"] = [ctypes.c_int]
    functions["icaserve_gemm_pack_f32"] = [ptr, i64, i64, i64, i64, ptr]
    functions["icaserve_gemm_f32"] = [ptr, i64, i64, ptr, i64, i64, ptr, i64]
    functions["icaserve_ica_forward_f32"] = [ptr] * 10 + [i64] * 6
    functions["icaserve_ica_backward_f32"] = [ptr] * 10 + [i64] * 6
    functions["icaserve_ica_projected_forward_f32"] = [ptr] * 9 + [i64] * 6
    functions["icaserve_ica_projected_backward_f32"] = [ptr] * 10 + [i64] * 6
    functions["icaserve_tanh_f32"] = [ptr, i64]
    functions["icaserve_tanh_backward_f32"] = [ptr, ptr, i64]
    return native.load(SOURCE, "ICA's hop sum (stock torch ops, slower on CPU)", ENV_SWITCH, functions)


_enabled = True  # `use_stock_ops()` clears it for a while (benchmarks, parity tests)


def available() -> bool:
    """Whether the fused kernel is built and switched on (builds it on the first call)."""
    return _enabled and _library() is not None


@contextlib.contextmanager
def use_stock_ops() -> Iterator[None]:
    """Within the block, ICA runs on stock torch ops as if the kernel were unavailable."""
    global _enabled
    before, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = before


def vectorised() -> bool:
    """Whether the kernel's AVX-512 path serves the float32 matrix variant (compiled in where the
    build machine has AVX-512; hop_sum.c)."""
    lib = _library()
    return bool(lib is not None and lib.icaserve_hop_sum_vectorised(-1))


@contextlib.contextmanager
def portable_loops() -> Iterator[None]:
    """Within the block, the kernel's portable loops run where its AVX-512 path would (tests check
    that both give the same answers)."""
    lib = _library()
    before = lib.icaserve_hop_sum_vectorised(-1) if lib is not None else 0
    if lib is not None:
        lib.icaserve_hop_sum_vectorised(0)
    try:
        yield
    finally:
        if lib is not None:
            lib.icaserve_hop_sum_vectorised(before)


def applies(v: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether `hop_sum(v, w)` or `folded_gates(v, ..., w, ...)` would run the fused kernel for
    these tensors: eager (neither scripting nor tracing), CPU, float32 or float64 (v is cast to w's
    dtype), no autocast (its GEMMs would hand the kernel bfloat16), and the kernel available."""
    floats = (torch.float32, torch.float64)
    return (not torch.jit.is_tracing() and v.device.type == "cpu" and w.device.type == "cpu"
            and v.dtype in floats and w.dtype in floats and not torch.is_autocast_enabled("cpu")
            and available())


def _suffix(dtype: torch.dtype) -> str:
    return "f32" if dtype == torch.float32 else "f64"


def _kernel(direction: str, dtype: torch.dtype):  # noqa: ANN202 - a ctypes function
    return getattr(_library(), f"icaserve_hop_sum_{direction}_{_suffix(dtype)}")


def _at(t: torch.Tensor, lo: int) -> int:
    """Address of sequence `lo` of a contiguous batch-first tensor (no slice objects: at batch 1
    their creation was a measurable part of the call)."""
    return t.data_ptr() + lo * t.stride(0) * t.element_size()


def _forward(p: torch.Tensor, w: torch.Tensor, u: torch.Tensor, inv_den: torch.Tensor,
             m: torch.Tensor | None, lo: int, hi: int) -> None:
    """The kernel's forward on sequences lo..hi-1 of p (B, T, G, PH), w (B, T, r). With `m` (the
    online mode, float32), w holds raw scores, replaced by their weights; m gets the running maxima."""
    _, t, g, ph = p.shape
    _check(_kernel("forward", p.dtype)(_at(p, lo), _at(w, lo), _at(u, lo), _at(inv_den, lo),
                                       None if m is None else _at(m, lo), hi - lo, t, w.shape[2], ph, g))


def _backward(p: torch.Tensor, w: torch.Tensor, inv_den: torch.Tensor, grad_u: torch.Tensor,
              grad_p: torch.Tensor, grad_w: torch.Tensor, m: torch.Tensor | None, lo: int, hi: int,
              times_w: bool) -> None:
    """The kernel's backward on sequences lo..hi-1; grad_p holds just those (from its start).
    With `times_w`, grad_w gets w * dL/dw (= dL/de for w = exp(e - shift)); `m` as forward's."""
    _, t, g, ph = p.shape
    _check(_kernel("backward", p.dtype)(_at(p, lo), _at(w, lo), _at(inv_den, lo), _at(grad_u, lo),
                                        grad_p.data_ptr(), _at(grad_w, lo), int(times_w),
                                        None if m is None else _at(m, lo), hi - lo, t, w.shape[2], ph, g))


def _check(status: int) -> None:
    """The kernel's status: 0 done, 1 out of memory, 2 the online mode asked of float64, 3 an AVX-512
    function called in a build without it."""
    if status == 1:
        raise MemoryError("hop_sum: out of memory")
    if status == 3:
        raise RuntimeError("hop_sum: built without AVX-512, so without its C GEMMs")
    if status:
        raise ValueError("hop_sum: the online mode is float32 only")


#: Bytes of projections per chunk of `FoldedGates`: the chunk's p is written by the GEMM and read
#: by the kernel (forward), and its gradient written by the kernel and read by the GEMM (backward),
#: while both stay in a core's L2 cache (1 MB here). Measured at the shipped shape, batch 32:
#: chunks of 4-8 sequences (0.6-1.3 MB) beat 2 and beat the whole batch at once (README "Speed").
CHUNK_BYTES = 1 << 20


def _gates_forward(x: torch.Tensor, rows: torch.Tensor, w: torch.Tensor, ph: int,
                   m: torch.Tensor | None = None):  # noqa: ANN202
    """u (B, T, G) = hop_sum(x @ rows.T viewed as (B, T, G, PH), w), chunk by chunk; returns u and
    what backward reads again (the projections p and 1 / the prefix sums of w). With `m`, the
    kernel's online mode (`_forward`)."""
    b, t, n = x.shape
    g = rows.shape[0] // ph
    p = x.new_empty(b, t, g, ph)
    u = x.new_empty(b, t, g)
    inv_den = torch.empty(w.shape, dtype=w.dtype)
    x_rows, p_rows, weights = x.view(b * t, n), p.view(b * t, g * ph), rows.t()
    chunk = _chunk(p)
    for lo in range(0, b, chunk):
        hi = min(b, lo + chunk)
        torch.mm(_steps(x_rows, lo, hi, t), weights, out=_steps(p_rows, lo, hi, t))
        _forward(p, w, u, inv_den, m, lo, hi)
    return u, p, inv_den


def _gates_backward(x: torch.Tensor, rows: torch.Tensor, w: torch.Tensor, p: torch.Tensor,
                    inv_den: torch.Tensor, grad_u: torch.Tensor, want_x: bool, want_rows: bool,
                    times_w: bool, m: torch.Tensor | None = None):  # noqa: ANN202
    """The gradients of x (or None), rows (or None) and w (times w with `times_w`), chunk by chunk:
    each chunk's dL/dp goes from the kernel to the GEMMs while it is in cache."""
    grad_u = grad_u.contiguous()
    b, t, g, ph = p.shape
    n = x.shape[2]
    grad_x = x.new_empty(b, t, n) if want_x else None
    grad_rows = torch.zeros_like(rows) if want_rows else None
    grad_w = torch.empty_like(w)
    chunk = _chunk(p)
    grad_p = p.new_empty(chunk * t, g * ph)  # one chunk's worth, reused: it stays in cache
    x_rows = x.view(b * t, n)
    grad_x_rows = grad_x.view(b * t, n) if want_x else None
    for lo in range(0, b, chunk):
        hi = min(b, lo + chunk)
        gp = _steps(grad_p, 0, hi - lo, t)
        _backward(p, w, inv_den, grad_u, gp, grad_w, m, lo, hi, times_w)
        if want_x:
            torch.mm(gp, rows, out=_steps(grad_x_rows, lo, hi, t))
        if want_rows:
            grad_rows.addmm_(gp.t(), _steps(x_rows, lo, hi, t))
    return grad_x, grad_rows, grad_w


class FoldedGates(torch.autograd.Function):
    """u (B, T, G) = hop_sum(x @ rows.T viewed as (B, T, G, PH), w), a few sequences at a time.

    rows (G*PH, N) are the input weights ordered (gate, hop). Taking the projection GEMM and the
    hop sum chunk by chunk keeps each chunk's projections, and backward their gradient, in cache
    between the two; unchunked, the (B, T, G, PH) tensors (5 MB at the shipped shape, batch 32)
    go through memory at each hand-over. x, rows and w share one dtype."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, rows: torch.Tensor, w: torch.Tensor, ph: int) -> torch.Tensor:  # noqa: ANN001
        u, p, inv_den = _gates_forward(x.contiguous(), rows, w.contiguous(), ph)
        ctx.save_for_backward(x, rows, w, p, inv_den)
        ctx.ph = ph
        return u

    @staticmethod
    def backward(ctx, grad_u: torch.Tensor):  # noqa: ANN001, ANN205 - autograd's signature
        x, rows, w, p, inv_den = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: differentiate the stock ops (second derivatives)
            return (*stock_gradients(ctx, lambda *a: _stock_gates(*a, ctx.ph), (x, rows, w), grad_u), None)
        grad_x, grad_rows, grad_w = _gates_backward(x.contiguous(), rows, w.contiguous(), p, inv_den, grad_u,
                                                    ctx.needs_input_grad[0], wanted(ctx, 1), times_w=False)
        return grad_x, grad_rows, (grad_w if ctx.needs_input_grad[2] else None), None


class FoldedICA(torch.autograd.Function):
    """ICA's gate inputs in float32 from x and the weights, as one node: the attention's scores
    e = W2 tanh(W1 x), then `FoldedGates`' chunked projection and hop sum with the kernel's online
    mode, which weighs each step by exp(e - the running maximum so far) (hop_sum.c): float32 for
    any score spread, where the stock ops need float64 past a spread of 60 (training/ica.py). One
    node also lets tanh and its backward run in place in C, the kernel hand back dL/de directly,
    and the score path's input-gradient be added into the projection's in place. The values are
    those of the stock ops (tests/test_hop_sum.py)."""

    @staticmethod
    def forward(ctx, x_in: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, rows: torch.Tensor,  # noqa: ANN001
                ph: int) -> torch.Tensor:
        x = x_in.contiguous()
        b, t, n = x.shape
        lib = _library()
        if any(t.dtype != torch.float32 for t in (x, w1, w2, rows)):  # never hand the C code other bytes
            raise TypeError(f"FoldedICA runs in float32 only, got {x.dtype} inputs, {w1.dtype}/{w2.dtype}/"
                            f"{rows.dtype} weights")
        _check_shapes(x, w1, w2, rows, lambda n, r: rows.dim() == 2 and ph >= 1 and rows.shape[0] >= ph
                      and rows.shape[0] % ph == 0 and rows.shape[1] == n, "FoldedICA")
        ctx.packs = _packs(w1, w2, rows) if _whole_in_c(w2, ph) else None
        if ctx.packs is not None:  # the whole node in one C call, a sequence at a time
            r, d_a = w2.shape
            g = rows.shape[0] // ph
            h, w, m, inv_den = x.new_empty(b, t, d_a), x.new_empty(b, t, r), x.new_empty(b, t, r), x.new_empty(b, t, r)
            p, u = x.new_empty(b, t, g, ph), x.new_empty(b, t, g)
            w1t, w2t, rowst = ctx.packs[:3]
            _check(lib.icaserve_ica_forward_f32(x.data_ptr(), w1t.data_ptr(), w2t.data_ptr(), rowst.data_ptr(),
                                                h.data_ptr(), w.data_ptr(), m.data_ptr(), inv_den.data_ptr(),
                                                p.data_ptr(), u.data_ptr(), b, t, n, d_a, r, g))
        else:
            h = torch.mm(x.view(b * t, n), w1.t())
            lib.icaserve_tanh_f32(h.data_ptr(), h.numel())
            w = torch.mm(h, w2.t()).view(b, t, w2.shape[0])  # the scores; the kernel turns them into weights
            m = torch.empty_like(w)
            u, p, inv_den = _gates_forward(x, rows, w, ph, m)
        ctx.save_for_backward(x_in, w1, w2, rows, h, w, p, inv_den, m)
        ctx.ph = ph
        return u

    @staticmethod
    def backward(ctx, grad_u: torch.Tensor):  # noqa: ANN001, ANN205 - autograd's signature
        x, w1, w2, rows, h, w, p, inv_den, m = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: differentiate the stock ops (second derivatives)
            return (*stock_gradients(ctx, lambda *a: _stock_ica(*a, ctx.ph), (x, w1, w2, rows), grad_u), None)
        x = x.contiguous()
        b, t, n = x.shape
        want_x = ctx.needs_input_grad[0]
        want_rows, want_w2, want_w1 = wanted(ctx, 3), wanted(ctx, 2), wanted(ctx, 1)
        if ctx.packs is not None and want_x and not (want_rows or want_w2 or want_w1):  # an explanation
            grad_u = grad_u.contiguous()
            grad_x = torch.empty_like(x)
            r, d_a = w2.shape
            w1p, w2p, rowsp = ctx.packs[3:]
            _check(_library().icaserve_ica_backward_f32(h.data_ptr(), w.data_ptr(), m.data_ptr(), inv_den.data_ptr(),
                                                        p.data_ptr(), grad_u.data_ptr(), w1p.data_ptr(), w2p.data_ptr(),
                                                        rowsp.data_ptr(), grad_x.data_ptr(), b, t, n, d_a, r,
                                                        rows.shape[0] // ctx.ph))
            return grad_x, None, None, None, None
        grad_x, grad_rows, grad_e = _gates_backward(x, rows, w, p, inv_den, grad_u, want_x, want_rows,
                                                    times_w=True, m=m)
        de = grad_e.view(b * t, grad_e.shape[2])
        grad_w1 = grad_w2 = None
        if want_w2:
            grad_w2 = torch.mm(de.t(), h.view(b * t, h.shape[-1]))
        da = torch.mm(de, w2)
        _library().icaserve_tanh_backward_f32(da.data_ptr(), h.data_ptr(), da.numel())
        if want_w1:
            grad_w1 = torch.mm(da.t(), x.view(b * t, n))
        if want_x:
            grad_x.view(b * t, n).addmm_(da, w1)
        return grad_x, grad_w1, grad_w2, grad_rows, None


class ProjectedICA(torch.autograd.Function):
    """ICA's gate inputs u = W_ih vec(M_t) (B, T, G) in the projected order (G >= N: the prefix means
    of x per hop, then one GEMM with W_ih), from float32 x and frozen weights, as one C call a
    sequence at a time (hop_sum.c `icaserve_ica_projected_forward_f32`): the same scores and online
    softmax as `FoldedICA`, the (B, T, r, N) means never formed, and backward the input-gradient
    only. Explanations and predictions of frozen models take it (callers check `projected_applies`);
    training keeps the stock ops, whose autograd gives the weight gradients."""

    @staticmethod
    def forward(ctx, x_in: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w_ih: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        x = x_in.contiguous()
        if any(t.dtype != torch.float32 for t in (x, w1, w2, w_ih)):  # never hand the C code other bytes
            raise TypeError(f"ProjectedICA runs in float32 only, got {x.dtype} inputs")
        _check_shapes(x, w1, w2, w_ih, lambda n, r: w_ih.dim() == 2 and w_ih.shape[0] >= 1
                      and w_ih.shape[1] == r * n, "ProjectedICA")
        b, t, n = x.shape
        r, d_a = w2.shape
        g = w_ih.shape[0]
        packs = _packs(w1, w2, w_ih)
        h, w, m, inv_den = x.new_empty(b, t, d_a), x.new_empty(b, t, r), x.new_empty(b, t, r), x.new_empty(b, t, r)
        u = x.new_empty(b, t, g)
        _check(_library().icaserve_ica_projected_forward_f32(
            x.data_ptr(), packs[0].data_ptr(), packs[1].data_ptr(), packs[2].data_ptr(), h.data_ptr(), w.data_ptr(),
            m.data_ptr(), inv_den.data_ptr(), u.data_ptr(), b, t, n, d_a, r, g))
        ctx.save_for_backward(x, w1, w2, w_ih, h, w, m, inv_den)
        ctx.packs = packs
        return u

    @staticmethod
    def backward(ctx, grad_u: torch.Tensor):  # noqa: ANN001, ANN205 - autograd's signature
        x, w1, w2, w_ih, h, w, m, inv_den = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: differentiate the stock ops (second derivatives)
            return tuple(stock_gradients(ctx, _stock_projected, (x, w1, w2, w_ih), grad_u))
        grad_u = grad_u.contiguous()
        grad_x = torch.empty_like(x)
        b, t, n = x.shape
        r, d_a = w2.shape
        _check(_library().icaserve_ica_projected_backward_f32(
            x.data_ptr(), h.data_ptr(), w.data_ptr(), m.data_ptr(), inv_den.data_ptr(), grad_u.data_ptr(),
            ctx.packs[3].data_ptr(), ctx.packs[4].data_ptr(), ctx.packs[5].data_ptr(), grad_x.data_ptr(),
            b, t, n, d_a, r, w_ih.shape[0]))
        return grad_x if ctx.needs_input_grad[0] else None, None, None, None


def _stock_projected(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w_ih: torch.Tensor) -> torch.Tensor:
    """`ProjectedICA` on stock ops, with their float64 sums past the float32-safe score spread."""
    from training.ica import FLOAT32_SAFE_SPREAD, prefix_means, score_spread_bound, stock_prefix_weights

    w = stock_prefix_weights(x, w1, w2, score_spread_bound(w2) > FLOAT32_SAFE_SPREAD)
    return torch.matmul(prefix_means(x, w).to(x.dtype).flatten(2), w_ih.t())


def projected_applies(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w_ih: torch.Tensor) -> bool:
    """Whether `projected_ica` runs for these tensors: `applies`, float32 throughout, the kernel's
    AVX-512 path on, the matrix variant's shapes (W_ih (G, r*N)), and no weight gradient possible
    (grad mode off, or every weight frozen: the service's explanation modules)."""
    r, n = w2.shape[0], x.shape[-1]
    return (applies(x, x) and all(t.dtype == torch.float32 for t in (x, w1, w2, w_ih))
            and w_ih.dim() == 2 and w_ih.shape[1] == r * n
            and not (torch.is_grad_enabled() and (w1.requires_grad or w2.requires_grad or w_ih.requires_grad))
            and vectorised())


def projected_ica(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w_ih: torch.Tensor) -> torch.Tensor:
    """The gate inputs u (B, T, G) of the matrix variant in the projected order (`ProjectedICA`;
    callers check `projected_applies`)."""
    return ProjectedICA.apply(x, w1, w2, w_ih)


def _check_shapes(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, inputs: torch.Tensor, fits, what: str) -> None:  # noqa: ANN001
    """x (B, T, N), W1 (d_a, N) and W2 (r, d_a) agree, and `fits(N, r)` says the input weights do, so
    the C GEMMs read only what the packed weights hold (a wrong feature width would read past them);
    a ValueError names the shapes, as a stock matmul would have refused them."""
    ok = x.dim() == 3 and w1.dim() == 2 and w2.dim() == 2
    if not (ok and w1.shape[1] == x.shape[2] and w2.shape[1] == w1.shape[0] and fits(x.shape[2], w2.shape[0])):
        raise ValueError(f"{what}: shapes do not agree: x {tuple(x.shape)}, W1 {tuple(w1.shape)}, "
                         f"W2 {tuple(w2.shape)}, input weights {tuple(inputs.shape)}")


def _whole_in_c(w2: torch.Tensor, ph: int) -> bool:
    """Whether `FoldedICA` runs as one C call a sequence at a time (hop_sum.c `icaserve_ica_forward_f32`):
    the matrix variant (one projection per hop) where the AVX-512 path is on. Its backward does too
    when only the input-gradient is asked (an explanation); weight gradients take the chunked path."""
    return ph == w2.shape[0] and vectorised()


#: Packed weights of `FoldedICA`'s C path, per W1 (by identity, weakly: they go with the model); an
#: entry holds while the weights are unchanged (`_packs`).
_PACKS = WeakIdKeyDictionary()


def pack(b: torch.Tensor) -> torch.Tensor:
    """The K x Nc matrix b (any strides, float32) packed for the C GEMMs (hop_sum.c `icaserve_gemm_pack_f32`;
    AVX-512 path only, `vectorised()`)."""
    if b.dtype != torch.float32 or b.dim() != 2 or b.device.type != "cpu":
        raise ValueError(f"pack: a float32 CPU matrix, got {b.dtype} {tuple(b.shape)} on {b.device}")
    k, nc = b.shape
    out = torch.empty(k * ((nc + 15) // 16 * 16), dtype=torch.float32)
    _check(_library().icaserve_gemm_pack_f32(b.data_ptr(), b.stride(0), b.stride(1), k, nc, out.data_ptr()))
    return out


def tiled_mm(a: torch.Tensor, packed: torch.Tensor, nc: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """a (M x K, float32, rows contiguous) times the K x nc matrix that `pack` packed, on the C path's
    register-tiled GEMM, into `out` (M x nc, contiguous) if given: what `FoldedICA` multiplies with,
    alone (benchmarks time it as the floor's GEMM; AVX-512 path only, `vectorised()`)."""
    m, k = a.shape
    if (a.dtype != torch.float32 or a.device.type != "cpu" or a.stride(1) != 1 or packed.dtype != torch.float32
            or packed.device.type != "cpu" or not packed.is_contiguous()
            or packed.numel() != k * ((nc + 15) // 16 * 16)):
        raise ValueError(f"tiled_mm: a float32 CPU matrix with contiguous rows and its packed K x {nc} partner")
    if out is None:
        out = a.new_empty(m, nc)
    elif (out.shape != (m, nc) or out.dtype != torch.float32 or out.device.type != "cpu"
          or not out.is_contiguous()):
        raise ValueError(f"tiled_mm: out must be a contiguous float32 CPU {m} x {nc} matrix")
    _check(_library().icaserve_gemm_f32(a.data_ptr(), a.stride(0), k, packed.data_ptr(), m, nc, out.data_ptr(), nc))
    return out


def clear_packs() -> None:
    """Forget every packed weight (`_packs`): needed only after writing weights behind autograd's
    version counter (through `.data` or numpy), which the cache, like autograd's own check of saved
    tensors, cannot see."""
    _PACKS.clear()


def _packs(w1: torch.Tensor, w2: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """W1^T, W2^T, rows^T (forward) and W1, W2, rows (backward), packed. Cached while each weight is
    the same tensor (rows: a view of the same one) with the same storage, shape, strides and version
    (an optimiser step, an in-place op or load_state_dict bumps it; the entry holds the storages, so
    no new weight can take their address); packing costs ~27 us at the paper's shape (hidden 5), 3%
    of its batch-1 forward and input-gradient. Inference tensors keep no version: packed on every
    call. Writes behind the version counter need `clear_packs`."""
    weights = (w1, w2, rows)
    bases = tuple(t._base if t._base is not None else t for t in weights)
    try:
        key = tuple((t.data_ptr(), t._version, tuple(t.shape), t.stride()) for t in weights)
    except RuntimeError:
        key = None
    hit = _PACKS.get(w1) if key is not None else None
    if hit is not None and hit[0] == key and all(ref() is base for ref, base in zip(hit[1], bases)):
        return hit[2]
    detached = tuple(t.detach() for t in weights)
    packs = tuple(pack(t.t()) for t in detached) + tuple(pack(t) for t in detached)
    if key is not None:
        _PACKS[w1] = (key, tuple(weakref.ref(base) for base in bases), packs, detached)
    return packs


def stock_gradients(ctx, stock, inputs: tuple, grad_out: torch.Tensor) -> list:  # noqa: ANN001
    """The gradients a hand-written backward would return, from the stock ops' graph rebuilt on the
    saved inputs and differentiated with create_graph: used when autograd asks for a graph (a
    second derivative), which the fused passes do not have. Slow, and only then."""
    with torch.enable_grad():
        # aliases, so that each gradient is this node's own: an input whose history leads to
        # another input (w = weights(x)) would otherwise add that path here and again upstream
        aliases = [t.view_as(t) if t.requires_grad else t for t in inputs]
        out = stock(*aliases)
    need = [i for i, t in enumerate(inputs) if ctx.needs_input_grad[i] and t.requires_grad]
    grads = torch.autograd.grad(out, [aliases[i] for i in need], grad_out, create_graph=True, allow_unused=True)
    result: list = [None] * len(inputs)
    for i, g in zip(need, grads):
        result[i] = g
    return result


def _stock_gates(x: torch.Tensor, rows: torch.Tensor, w: torch.Tensor, ph: int) -> torch.Tensor:
    """`FoldedGates` on stock ops."""
    from training.ica import prefix_weighted_sum  # ica imports this module

    b, t, _ = x.shape
    return prefix_weighted_sum(torch.matmul(x, rows.t()).view(b, t, rows.shape[0] // ph, ph), w)


def _stock_ica(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, rows: torch.Tensor, ph: int) -> torch.Tensor:
    """`FoldedICA` on stock ops, with their float64 sums past the float32-safe score spread."""
    from training.ica import FLOAT32_SAFE_SPREAD, score_spread_bound, stock_prefix_weights

    w = stock_prefix_weights(x, w1, w2, score_spread_bound(w2) > FLOAT32_SAFE_SPREAD)
    return _stock_gates(x.to(w.dtype), rows.to(w.dtype), w, ph).to(x.dtype)


def wanted(ctx, i: int) -> bool:  # noqa: ANN001
    """Whether this backward pass uses input i's gradient. `needs_input_grad` only says the input
    requires grad: an explanation (autograd.grad w.r.t. the inputs alone) of a model whose weights
    require grad would pay a (G*PH, N) weight-gradient GEMM as large as the projection itself. So
    ask the engine whether it will run the node the gradient goes to (the check torch's own
    checkpointing uses), falling back to `needs_input_grad` where it cannot say (a leaf under
    autograd.grad). Asked for the weights only: each question took ~17 us at batch 1."""
    if not ctx.needs_input_grad[i]:
        return False
    node = ctx.next_functions[i][0]
    if node is None:
        return False
    try:
        return bool(torch._C._will_engine_execute_node(node))
    except (AttributeError, RuntimeError):
        return True


def _chunk(p: torch.Tensor) -> int:
    """Sequences per chunk of `FoldedGates`: at least one, at most the batch."""
    per_sequence = max(1, p[0].numel() * p.element_size()) if p.shape[0] else 1
    return max(1, min(p.shape[0], CHUNK_BYTES // per_sequence))


def _steps(rows: torch.Tensor, lo: int, hi: int, t: int) -> torch.Tensor:
    """The rows of sequences lo..hi-1 of a (B*T, K) matrix: the matrix itself when that is all of
    it (a slice costs ~1 us, a measurable part of a batch-1 call)."""
    return rows if lo == 0 and hi * t == rows.shape[0] else rows[lo * t : hi * t]


def hop_sum(p: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The kernel on ready projections p (B, T, G, PH): `folded_gates` with identity weights, so
    p passes through the GEMM exactly (tests check the kernel through it; callers check `applies`)."""
    b, t, g, ph = p.shape
    return folded_gates(p.reshape(b, t, g * ph), torch.eye(g * ph, dtype=w.dtype), w, ph)


def folded_ica(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, rows: torch.Tensor, ph: int) -> torch.Tensor:
    """The gate inputs u (B, T, G) from float32 inputs x (B, T, N), the attention's W1 and W2 and the
    input weights ordered (gate, hop) `rows` (G*PH, N), all in one node (`FoldedICA`; callers check
    `applies(x, x)`)."""
    return FoldedICA.apply(x, w1, w2, rows, ph)


def folded_gates(x: torch.Tensor, rows: torch.Tensor, w: torch.Tensor, ph: int) -> torch.Tensor:
    """The gate inputs u (B, T, G) from the inputs x (B, T, N), the input weights ordered (gate, hop)
    `rows` (G*PH, N) and the prefix weights w (B, T, r): projection and hop sum fused chunk by chunk
    (callers check `applies(x, w)` first). x and rows are cast to w's dtype (float64 past the
    float32-safe score spread, training/ica.py)."""
    return FoldedGates.apply(x.to(w.dtype), rows.to(w.dtype), w, ph)
