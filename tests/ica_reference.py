"""Step-by-step reference implementation of a `RecurrentClassifier`: the slow test oracle.

This is the definition from the paper, written out literally, with nothing shared with the
parallel code path except the parameter tensors:

    for t = 1..T:
        X_t = x[:, :t]                                   (B, t, N)
        A_t = softmax over time of W2 tanh(W1 X_t^T)     (B, r, t)
        M_t = A_t X_t                                    (B, r, N)
        cell input = flatten(M_t) (matrix) or mean over hops of M_t (mean)
        h_t = cell(cell input, h_{t-1})                  explicit gate equations

Attention is recomputed over the whole prefix at every step (O(T^2), as in the authors' code),
the recurrence runs one step at a time in Python with the gate equations of nn.LSTM / nn.GRU /
nn.RNN applied to the fused module's own weights, layer by layer; the backward direction of a
bidirectional layer walks the sequence from t = T down to 1 and (for the first layer) consumes
M_T, ..., M_1 in that order, exactly what the fused module does with the parallel M. Pooling
(last step / self-attention) and the head are recomputed from their weights as well.

Dropout is ignored: the oracle describes the model in eval mode only.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ica_step_input", "reference_attention", "reference_forward"]


def reference_attention(encoder: nn.Module, x: torch.Tensor, t: int) -> torch.Tensor:
    """A_t, shape (B, r, t): softmax over the first t steps of W2 tanh(W1 X_t^T)."""
    xt = x[:, :t]  # (B, t, N)
    w1 = encoder.w1.weight  # (d_a, N)
    w2 = encoder.w2.weight  # (r, d_a)
    hid = torch.tanh(torch.matmul(w1, xt.transpose(1, 2)))  # (B, d_a, t)
    scores = torch.matmul(w2, hid)  # (B, r, t)
    return torch.softmax(scores, dim=-1)


def ica_step_input(encoder: nn.Module, x: torch.Tensor, t: int) -> torch.Tensor:
    """The cell input at step t (1-based): flatten(A_t X_t) or its mean over hops."""
    a = reference_attention(encoder, x, t)  # (B, r, t)
    m = torch.bmm(a, x[:, :t])  # (B, r, N)
    if encoder.variant == "matrix":
        return m.flatten(1)
    return m.mean(dim=1)


def _cell_step(kind: str, nonlinearity: str, inp, state, w_ih, w_hh, b_ih, b_hh):
    """One step of an LSTM / GRU / Elman RNN cell, gate order and equations as in torch.nn."""
    gi = inp @ w_ih.t()
    if b_ih is not None:
        gi = gi + b_ih
    if kind == "lstm":
        h, c = state
        gates = gi + h @ w_hh.t()
        if b_hh is not None:
            gates = gates + b_hh
        i, f, g, o = gates.chunk(4, dim=1)
        i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
        c = f * c + i * g
        h = o * torch.tanh(c)
        return h, (h, c)
    h = state
    gh = h @ w_hh.t()
    if b_hh is not None:
        gh = gh + b_hh
    if kind == "gru":
        i_r, i_z, i_n = gi.chunk(3, dim=1)
        h_r, h_z, h_n = gh.chunk(3, dim=1)
        r = torch.sigmoid(i_r + h_r)
        z = torch.sigmoid(i_z + h_z)
        n = torch.tanh(i_n + r * h_n)
        h = (1 - z) * n + z * h
        return h, h
    pre = gi + gh
    h = torch.tanh(pre) if nonlinearity == "tanh" else torch.relu(pre)
    return h, h


def _rnn_kind(rnn: nn.Module) -> str:
    if isinstance(rnn, nn.LSTM):
        return "lstm"
    if isinstance(rnn, nn.GRU):
        return "gru"
    if isinstance(rnn, nn.RNN):
        return "rnn"
    raise TypeError(f"unsupported recurrent module {type(rnn).__name__}")


def _run_direction(model: nn.Module, x: torch.Tensor, layer_in, layer: int, reverse: bool):
    """Hidden states of one direction of one layer, returned in time order: (B, T, H)."""
    rnn = model.rnn
    kind = _rnn_kind(rnn)
    if getattr(rnn, "proj_size", 0):
        raise NotImplementedError("LSTM projections are not part of the model family")
    suffix = f"_l{layer}" + ("_reverse" if reverse else "")
    w_ih = getattr(rnn, "weight_ih" + suffix)
    w_hh = getattr(rnn, "weight_hh" + suffix)
    b_ih = getattr(rnn, "bias_ih" + suffix) if rnn.bias else None
    b_hh = getattr(rnn, "bias_hh" + suffix) if rnn.bias else None
    nonlinearity = getattr(rnn, "nonlinearity", "tanh")
    bsz, steps = x.shape[0], x.shape[1]
    h0 = x.new_zeros(bsz, rnn.hidden_size)
    state = (h0, h0.clone()) if kind == "lstm" else h0
    order = range(steps - 1, -1, -1) if reverse else range(steps)
    outs: list = [None] * steps
    for s in order:
        # layer_in is a callable for the first layer (compute the step's input on demand), a
        # (B, T, D) tensor for the later ones.
        inp = layer_in(s) if callable(layer_in) else layer_in[:, s]
        h, state = _cell_step(kind, nonlinearity, inp, state, w_ih, w_hh, b_ih, b_hh)
        outs[s] = h
    return torch.stack(outs, dim=1)


def _pool(model: nn.Module, out: torch.Tensor) -> torch.Tensor:
    pool = model.pool
    hidden = model.rnn.hidden_size
    if hasattr(pool, "w1"):  # structured self-attention over hidden states
        w1, w2 = pool.w1.weight, pool.w2.weight
        steps = out.shape[1]
        a = torch.softmax(torch.matmul(w2, torch.tanh(torch.matmul(w1, out.transpose(1, 2)))), -1)
        hops = [torch.stack([a[:, j, s:s + 1] * out[:, s] for s in range(steps)]).sum(0)
                for j in range(a.shape[1])]
        return torch.cat(hops, dim=1)
    if model.rnn.bidirectional:
        return torch.cat([out[:, -1, :hidden], out[:, 0, hidden:]], dim=1)
    return out[:, -1]


def reference_forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Logits (B, C) of a `RecurrentClassifier` in eval mode, computed one step at a time."""
    if model.training:
        raise ValueError("the reference describes eval mode only: call model.eval() first")
    encoder = model.encoder
    if hasattr(encoder, "w1"):  # input-cell attention

        def first_input(s: int) -> torch.Tensor:
            return ica_step_input(encoder, x, s + 1)
    else:

        def first_input(s: int) -> torch.Tensor:
            return x[:, s]

    rnn = model.rnn
    layer_in = first_input
    out = None
    for layer in range(rnn.num_layers):
        dirs = [_run_direction(model, x, layer_in, layer, reverse=False)]
        if rnn.bidirectional:
            dirs.append(_run_direction(model, x, layer_in, layer, reverse=True))
        out = torch.cat(dirs, dim=2)
        layer_in = out
    pooled = _pool(model, out)
    return pooled @ model.head.weight.t() + model.head.bias
