"""Input-cell attention (ICA), computed for all time steps at once.

At step t the cell sees M_t = A_t X_t, where A_t = softmax over the prefix s <= t of the scores
e_s = W2 tanh(W1 x_s). The scores of step s do not depend on t, only the normalisation over the
prefix does, so

    M_t[j] = sum_{s<=t} exp(e_s[j]) x_s  /  sum_{s<=t} exp(e_s[j])

is a ratio of two prefix sums: O(T r N) work, fully parallel over time, and the recurrence that
follows can be a stock fused nn.LSTM / nn.GRU / nn.RNN.

Numerics: tanh bounds every score by the L1 norm of its W2 row, whatever the input's magnitude,
so after shifting by the per-hop maximum over time no weight exp(e_s - max) is smaller than
exp(-2 max_j |W2_j|_1). While that bound stays above float32's comfortable range (spread < 60)
the prefix sums run in the input's dtype; past it (large trained W2) they run in float64, which
keeps every denominator far from underflow even for T in the thousands. The switch depends on
the weights only, never on the data, so an exported graph takes the right branch for its weights.
Eager float32 models on a CPU need neither: their fused kernel (training/hop_sum.py `FoldedICA`)
weighs each step by exp(e_s - the running maximum of e so far), an online softmax, which keeps every
weight in (0, 1] and every denominator >= 1 for any spread.
"""

from __future__ import annotations

import torch
from torch import nn

from training import hop_sum

VARIANTS = ("matrix", "mean")
# Largest score spread accumulated in float32: exp(-60) ~ 1e-26, far above float32's smallest normal.
FLOAT32_SAFE_SPREAD = 60.0


#: Elements from which `_SigmoidTanh` beats torch.tanh on CPU, forward + backward (torch 2.13, one
#: thread, the shipped model's (B, 100, 50) activations): batch 1 34 vs 56 us, batch 4 76 vs 71,
#: batch 32 454 vs 183.
_SIGMOID_TANH_MIN = 16384


class _SigmoidTanh(torch.autograd.Function):
    """tanh(a) as 2 sigmoid(2a) - 1 (equal to ~2e-7 absolute in float32): torch's CPU tanh kernel
    is several times slower than its sigmoid. The backward is tanh's own, from the output. Eager
    CPU only; scripted and traced graphs (exports) keep tanh."""

    @staticmethod
    def forward(ctx, a: torch.Tensor) -> torch.Tensor:  # noqa: ANN001 - autograd's signature
        h = torch.sigmoid(a * 2.0).mul_(2.0).sub_(1.0)
        ctx.save_for_backward(h)
        return h

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        (h,) = ctx.saved_tensors
        return torch.ops.aten.tanh_backward(grad, h)


class _PrefixWeights(torch.autograd.Function):
    """w = exp(e - max_s e), e = W2 tanh(W1 x): `_prefix_weights` written out by hand for eager CPU
    (float64, the float64 fallback, and the forms that do not fold; float32 folded models take
    training/hop_sum.py `FoldedICA`, which does this in C inside one node with the hop sum).

    Autograd over the stock ops took ~1.6 ms at the shipped shape, batch 32, forward + input-gradient,
    a tenth of the model; most of it was not the two GEMMs but the ops around them (scale, sigmoid,
    shift, exp, their backward, each with an allocation). Here the elementwise steps run in place
    on the GEMMs' outputs, and the weight gradients are computed only when the backward pass will
    use them (an explanation does not). tanh as in `_SigmoidTanh` from its threshold up. Equal to
    the stock ops (tests/test_hop_sum.py)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, wide: bool) -> torch.Tensor:  # noqa: ANN001
        b, t, n = x.shape
        h = torch.mm(x.reshape(b * t, n), w1.t())
        if h.numel() >= _SIGMOID_TANH_MIN:
            h = torch.sigmoid_(h.mul_(2.0)).mul_(2.0).sub_(1.0)
        else:
            h = torch.tanh_(h)
        z = torch.mm(h, w2.t()).view(b, t, w2.shape[0])
        z = z.sub_(z.max(dim=1, keepdim=True)[0])
        w = torch.exp_(z.double()) if wide else torch.exp_(z)
        ctx.save_for_backward(x, w1, w2, h, w)
        ctx.wide = wide
        return w

    @staticmethod
    def backward(ctx, grad_w: torch.Tensor):  # noqa: ANN001, ANN205 - autograd's signature
        x, w1, w2, h, w = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: differentiate the stock ops (second derivatives)
            return (*hop_sum.stock_gradients(ctx, lambda *a: stock_prefix_weights(*a, ctx.wide), (x, w1, w2),
                                             grad_w), None)
        b, t, r = w.shape
        xs = x.reshape(b * t, x.shape[2])
        de = (grad_w * w).to(h.dtype).view(b * t, r)  # the shift carries no gradient
        grad_x = grad_w1 = grad_w2 = None
        if ctx.needs_input_grad[2] and hop_sum.wanted(ctx, 2):
            grad_w2 = torch.mm(de.t(), h)
        da = torch.ops.aten.tanh_backward(torch.mm(de, w2), h)
        if ctx.needs_input_grad[1] and hop_sum.wanted(ctx, 1):
            grad_w1 = torch.mm(da.t(), xs)
        if ctx.needs_input_grad[0]:
            grad_x = torch.mm(da, w1).view(b, t, w1.shape[1])
        return grad_x, grad_w1, grad_w2, None


def score_spread_bound(w2: torch.Tensor) -> float:
    """Upper bound of max_s e_s - min_s e_s for any input, given W2: 2 max_j |W2_j|_1 (|tanh| <= 1)."""
    return 2.0 * w2.detach().abs().sum(dim=1).max().item()


def stock_prefix_weights(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, wide: bool) -> torch.Tensor:
    """`_PrefixWeights` on stock autograd ops: what the hand-written and fused backward passes
    differentiate instead when asked for a graph (create_graph), so second derivatives are right."""
    e = torch.matmul(torch.tanh(torch.matmul(x, w1.t())), w2.t())
    z = e - e.detach().amax(dim=1, keepdim=True)
    return torch.exp(z.double() if wide else z)


def prefix_weighted_sum(p: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The hop sum in stock torch ops (what scripted and traced graphs run; the fused kernel,
    training/hop_sum.py, computes the same): u[t, k] = sum_j N[t, k, j] / D[t, j], with
    N = the prefix sums of w p, D = those of w; p (B, T, G, PH), PH in {1, r}, w (B, T, r).
    The division is a small matmul over hops, so no (B, T, G, r)-sized quotient or its backward
    is formed."""
    num = torch.cumsum(w.unsqueeze(-2) * p, dim=1)  # (B, T, G, r)
    inv_den = torch.reciprocal(torch.cumsum(w, dim=1)).unsqueeze(-1)  # (B, T, r, 1)
    return torch.matmul(num, inv_den).squeeze(-1)


def prefix_means(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """M_t for every t (B, T, r, N): each hop's prefix mean of x (B, T, N) weighted by w (B, T, r),
    in w's dtype, on stock ops (`InputCellAttention.embed`; the stock form of the projected C path,
    training/hop_sum.py `ProjectedICA`)."""
    xs = x.to(w.dtype)
    num = torch.cumsum(w.unsqueeze(-1) * xs.unsqueeze(2), dim=1)  # (B, T, r, N)
    den = torch.cumsum(w, dim=1).unsqueeze(-1)  # (B, T, r, 1)
    return num / den


class InputCellAttention(nn.Module):
    """Maps x (B, T, N) to the cell inputs: (B, T, r*N) for `matrix`, (B, T, N) for `mean`."""

    def __init__(self, n_features: int, r: int = 20, d_a: int = 50, variant: str = "matrix") -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"ICA variant must be one of {VARIANTS}, got {variant!r}")
        self.n_features = n_features
        self.r = r
        self.d_a = d_a
        self.variant = variant
        self.float32_safe_spread = FLOAT32_SAFE_SPREAD
        # The paper's equations have no biases: A_t = softmax(W2 tanh(W1 X_t^T)).
        self.w1 = nn.Linear(n_features, d_a, bias=False)
        self.w2 = nn.Linear(d_a, r, bias=False)

    @property
    def output_size(self) -> int:
        return self.r * self.n_features if self.variant == "matrix" else self.n_features

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Unnormalised attention scores e_s, shape (B, T, r)."""
        a = self.w1(x)
        if not torch.jit.is_scripting() and not torch.jit.is_tracing():
            if a.device.type == "cpu" and a.numel() >= _SIGMOID_TANH_MIN:
                return self.w2(_SigmoidTanh.apply(a))
        return self.w2(torch.tanh(a))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """M_t for every t, shape (B, T, r, N)."""
        return prefix_means(x, self._prefix_weights(x)).to(x.dtype)

    def _prefix_weights(self, x: torch.Tensor) -> torch.Tensor:
        """exp(e_s - max_s e_s), shape (B, T, r), in (0, 1], in the dtype the prefix sums run in:
        the input's, or float64 past the safe score spread (module docstring)."""
        wide = self._wide(x)
        if not torch.jit.is_scripting():  # eager CPU, fused path on: by hand (`_PrefixWeights`)
            if hop_sum.applies(x, x) and x.dtype == self.w1.weight.dtype:
                return _PrefixWeights.apply(x, self.w1.weight, self.w2.weight, wide)
        e = self.scores(x)
        # Softmax is shift-invariant, so the shift carries no gradient. (max over a middle axis:
        # `amax` took 2.6x as long on CPU for the same values; exports keep it.)
        if torch.jit.is_scripting() or torch.jit.is_tracing():
            z = e - e.detach().amax(dim=1, keepdim=True)
        else:
            z = e - e.detach().max(dim=1, keepdim=True)[0]
        if wide:
            z = z.double()
        return torch.exp(z)

    def _wide(self, x: torch.Tensor) -> bool:
        """Whether the prefix sums of float32 inputs run in float64 (module docstring)."""
        return x.dtype != torch.float64 and self.score_spread_bound() > self.float32_safe_spread

    def score_spread_bound(self) -> float:
        """Upper bound of max_s e_s - min_s e_s for any input (`score_spread_bound`)."""
        return score_spread_bound(self.w2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.embed(x)
        if self.variant == "matrix":
            return m.flatten(2)
        return m.mean(dim=2)

    def gate_inputs(self, x: torch.Tensor, w_ih: torch.Tensor) -> torch.Tensor:
        """W_ih times the cell input, for every t: shape (B, T, G), G = the gate width.

        The cell only ever uses W_ih vec(M_t) = sum_j sum_{s<=t} w_sj W_ih^(j) x_s / sum_{s<=t} w_sj,
        W_ih^(j) the block of the input weights that multiplies hop j (for `mean`, W_ih / r for
        every hop). Two orders compute it, and the cheaper one is taken from the shapes:
        - G < N (folded): project each input first (x_s -> W_ih^(j) x_s, one GEMM), so the prefix
          sums run over (B, T, r, G) instead of (B, T, r, N);
        - otherwise (projected): the prefix sums of `embed`, then one GEMM with W_ih.
        Either way the projection happens here rather than inside the fused RNN, whose backward
        would also compute the weight gradients that an explanation never uses.
        The hop sum weighs each hop's prefix sum by 1 / (its prefix weight). Eager on a CPU the
        projection and the hop sum run fused, a few sequences at a time (training/hop_sum.py), in
        float32 together with the attention's scores and weights as one autograd node
        (`FoldedICA`); scripted or traced (exports) they are stock ops: a small matmul over hops,
        so no (B, T, r, G)-sized division or its backward is ever formed.
        Same weights, shift and float64 fallback as `embed` (`_prefix_weights`).
        """
        g = w_ih.shape[0]
        if g >= self.n_features:
            if not torch.jit.is_scripting():  # eager CPU float32, frozen weights: one C call (hop_sum.py)
                if self.variant == "matrix" and hop_sum.projected_applies(x, self.w1.weight, self.w2.weight, w_ih):
                    return hop_sum.projected_ica(x, self.w1.weight, self.w2.weight, w_ih)
            return torch.matmul(self.forward(x), w_ih.t())
        # rows ordered (gate, hop), so x @ rows.T is p (B, T, G, r): for `matrix` a view of W_ih
        if self.variant == "matrix":
            rows, ph = w_ih.reshape(g * self.r, self.n_features), self.r
        else:
            rows, ph = w_ih / self.r, 1
        if not torch.jit.is_scripting():  # eager CPU float32: one fused node (training/hop_sum.py)
            if x.dtype == torch.float32 and hop_sum.applies(x, x) and rows.dtype == self.w1.weight.dtype == x.dtype:
                return hop_sum.folded_ica(x, self.w1.weight, self.w2.weight, rows, ph)
        w = self._prefix_weights(x)
        if not torch.jit.is_scripting():  # eager CPU, float64 sums: projection and hop sum fused
            if hop_sum.applies(x, w):
                return hop_sum.folded_gates(x, rows, w, ph).to(x.dtype)
        p = torch.matmul(x, rows.t()).reshape(x.shape[0], x.shape[1], g, ph).to(w.dtype)
        return prefix_weighted_sum(p, w).to(x.dtype)

    @torch.jit.export
    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """A_t for every t, averaged over hops: (B, T, T), row t a distribution over steps <= t.

        O(T^2) memory, so only computed when a caller asks to see the weights.
        """
        e = self.scores(x).transpose(1, 2)  # (B, r, T)
        t = x.shape[1]
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        logits = e.unsqueeze(2).expand(-1, -1, t, -1)  # (B, r, T_query, T_key)
        logits = logits.masked_fill(~causal, float("-inf"))
        return torch.softmax(logits, dim=-1).mean(dim=1)
