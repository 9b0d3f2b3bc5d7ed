"""The fused hop sum of folded input-cell attention (`hop_sum.c`), compiled on first use.

`InputCellAttention.gate_inputs` ends in a prefix-weighted sum over hops,

    u_t = sum_j (sum_{s<=t} w_sj p_sj) / (sum_{s<=t} w_sj),

which stock torch ops compute through (B, T, r, G) tensors that forward and backward pass over
about twenty times (multiply, cumsum and its flip-cumsum-flip backward, the hop matmul); on a
CPU that traffic, not arithmetic, is most of ICA's cost at large batches. The C kernel keeps the
running sums in r x G accumulators instead: one pass over time forward, two backward.

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
from collections.abc import Iterator
from pathlib import Path

import torch

from icaserve import native

SOURCE = Path(__file__).with_name("hop_sum.c")
ENV_SWITCH = "ICASERVE_FUSED_ICA"


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    lib = native.load(SOURCE, "ICA's hop sum (stock torch ops, slower on CPU)", ENV_SWITCH)
    if lib is None:
        return None
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    for suffix in ("f32", "f64"):
        fwd = getattr(lib, f"icaserve_hop_sum_forward_{suffix}")
        fwd.argtypes, fwd.restype = [ptr, ptr, ptr, ptr, i64, i64, i64, i64, i64], ctypes.c_int
        bwd = getattr(lib, f"icaserve_hop_sum_backward_{suffix}")
        bwd.argtypes, bwd.restype = [ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64, i64], ctypes.c_int
    return lib


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


def applies(p: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether `hop_sum(p, w)` would run the fused kernel for these tensors: eager (neither
    scripting nor tracing), CPU, float32 or float64, and the kernel available."""
    return (not torch.jit.is_tracing() and p.device.type == "cpu" and w.device.type == "cpu"
            and p.dtype in (torch.float32, torch.float64) and w.dtype == p.dtype and available())


def _suffix(dtype: torch.dtype) -> str:
    return "f32" if dtype == torch.float32 else "f64"


class HopSum(torch.autograd.Function):
    """u (B, T, G) from p (B, T, PH, G), PH in {1, r}, and w (B, T, r); see the module docstring."""

    @staticmethod
    def forward(ctx, p: torch.Tensor, w: torch.Tensor) -> torch.Tensor:  # noqa: ANN001 - autograd's signature
        p, w = p.contiguous(), w.contiguous()
        b, t, ph, g = p.shape
        r = w.shape[2]
        u = p.new_empty(b, t, g)
        inv_den = torch.empty(b, t, r, dtype=torch.float64)
        lib = _library()
        status = getattr(lib, f"icaserve_hop_sum_forward_{_suffix(p.dtype)}")(
            p.data_ptr(), w.data_ptr(), u.data_ptr(), inv_den.data_ptr(), b, t, r, ph, g)
        if status != 0:
            raise MemoryError("hop_sum: out of memory")
        ctx.save_for_backward(p, w, inv_den)
        return u

    @staticmethod
    def backward(ctx, grad_u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
        p, w, inv_den = ctx.saved_tensors
        grad_u = grad_u.contiguous()
        b, t, ph, g = p.shape
        r = w.shape[2]
        grad_p, grad_w = torch.empty_like(p), torch.empty_like(w)
        status = getattr(_library(), f"icaserve_hop_sum_backward_{_suffix(p.dtype)}")(
            p.data_ptr(), w.data_ptr(), inv_den.data_ptr(), grad_u.data_ptr(), grad_p.data_ptr(),
            grad_w.data_ptr(), b, t, r, ph, g)
        if status != 0:
            raise MemoryError("hop_sum: out of memory")
        return grad_p, grad_w


def hop_sum(p: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The fused kernel (callers check `applies` first)."""
    return HopSum.apply(p, w)


def hop_sum_reference(p: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The same function in stock torch ops (what scripted and traced graphs run)."""
    num = torch.cumsum(w.unsqueeze(-1) * p, dim=1)  # (B, T, r, G)
    inv_den = torch.reciprocal(torch.cumsum(w, dim=1)).unsqueeze(-2)  # (B, T, 1, r)
    return torch.matmul(inv_den, num).squeeze(-2)
