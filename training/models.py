"""The model family: LSTM, GRU and vanilla RNN classifiers, plain or with input-cell attention,
plus the paper's baselines (bidirectional LSTM, LSTM with self-attention over hidden states).

Every model maps x (B, T, N) to class logits (B, C) and is TorchScript-scriptable, which is how
it reaches the service. One config dataclass describes any member of the family; it is what the
manifest records and what `build_model` takes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from torch import nn

from training.ica import VARIANTS, InputCellAttention

CELLS = ("lstm", "gru", "rnn")
GATES = {"lstm": 4, "gru": 3, "rnn": 1}  # gate width G = GATES[cell] * hidden
ATTENTIONS = ("none", "ica", "self")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture and hyper-parameters; defaults are the authors' reference settings."""

    n_features: int
    n_classes: int = 2
    cell: str = "lstm"
    attention: str = "none"
    ica_variant: str = "matrix"
    hidden: int = 5
    layers: int = 1
    bidirectional: bool = False
    dropout: float = 0.1
    r: int = 20
    d_a: int = 50
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.cell not in CELLS:
            raise ValueError(f"cell must be one of {CELLS}, got {self.cell!r}")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {self.attention!r}")
        if self.ica_variant not in VARIANTS:
            raise ValueError(f"ica_variant must be one of {VARIANTS}, got {self.ica_variant!r}")
        for name in ("n_features", "n_classes", "hidden", "layers", "r", "d_a"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_classes < 2:
            raise ValueError("n_classes must be >= 2")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def label(self) -> str:
        """Short human name, e.g. 'ICA-LSTM (matrix)' or 'BiLSTM'."""
        base = ("Bi" if self.bidirectional else "") + self.cell.upper()
        if self.attention == "ica":
            return f"ICA-{base} ({self.ica_variant})"
        if self.attention == "self":
            return f"{base}+self-attention"
        return base

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def replace(self, **changes: Any) -> "ModelConfig":
        return ModelConfig.from_dict({**self.to_dict(), **changes})


class NoInputAttention(nn.Module):
    """Feeds x_t to the cell unchanged; has an empty `attention` so every model scripts alike."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    @torch.jit.export
    def attention(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros((x.shape[0], 0, 0))


class LastStep(nn.Module):
    """The last hidden state (for a bidirectional RNN: forward at T, backward at step 0)."""

    def __init__(self, hidden: int, bidirectional: bool) -> None:
        super().__init__()
        self.hidden = hidden
        self.bidirectional = bidirectional

    def forward(self, out: torch.Tensor) -> torch.Tensor:
        if self.bidirectional:
            return torch.cat([out[:, -1, : self.hidden], out[:, 0, self.hidden :]], dim=1)
        return out[:, -1]


class SelfAttentionPool(nn.Module):
    """Structured self-attention over hidden states (Lin et al. 2017), the paper's baseline."""

    def __init__(self, width: int, r: int, d_a: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(width, d_a, bias=False)
        self.w2 = nn.Linear(d_a, r, bias=False)

    def forward(self, out: torch.Tensor) -> torch.Tensor:
        a = torch.softmax(self.w2(torch.tanh(self.w1(out))), dim=1)  # (B, T, r)
        return torch.bmm(a.transpose(1, 2), out).flatten(1)  # (B, r * width)


class RecurrentClassifier(nn.Module):
    """x (B, T, N) -> [input dropout] -> [ICA] -> fused RNN -> pooling -> [dropout] -> logits."""

    __constants__ = ["folded", "cell"]  # fixed when scripted: the untaken form is not compiled

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        c = config
        self.config = c
        self.cell = c.cell
        self.input_dropout = nn.Dropout(c.dropout)
        if c.attention == "ica":
            self.encoder: nn.Module = InputCellAttention(c.n_features, c.r, c.d_a, c.ica_variant)
            rnn_in = self.encoder.output_size
        else:
            self.encoder = NoInputAttention()
            rnn_in = c.n_features
        rnn_cls = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[c.cell]
        self.rnn = rnn_cls(
            rnn_in,
            c.hidden,
            num_layers=c.layers,
            batch_first=True,
            bidirectional=c.bidirectional,
            dropout=c.dropout if c.layers > 1 else 0.0,
        )
        width = c.hidden * (2 if c.bidirectional else 1)
        if c.attention == "self":
            self.pool: nn.Module = SelfAttentionPool(width, c.r, c.d_a)
            width *= c.r
        else:
            self.pool = LastStep(c.hidden, c.bidirectional)
        self.output_dropout = nn.Dropout(c.dropout)
        self.head = nn.Linear(width, c.n_classes)
        # Identity input weights for the fused recurrence of the folded form; not in the state
        # dict, so checkpoints and stores keep the paper's parameterisation either way.
        self.register_buffer("gate_eye", torch.zeros(0, 0), persistent=False)
        self.folded = False
        self.set_folded(can_fold(c))

    def set_folded(self, on: bool) -> "RecurrentClassifier":
        """Compute ICA in the folded form (see `InputCellAttention.gate_inputs`) or the direct
        one; both give the same function of the same weights. Fixed when scripted."""
        if on and not can_fold(self.config):
            raise ValueError(f"the folded form does not apply to {self.config.label} with "
                             f"{self.config.layers} layer(s), hidden {self.config.hidden}, N = {self.config.n_features}")
        w = self.rnn.weight_hh_l0
        g = w.shape[0]
        self.gate_eye = torch.eye(g, dtype=w.dtype, device=w.device) if on else w.new_zeros(0, 0)
        self.folded = on
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_dropout(x)
        if self.folded:
            out = self._folded_recurrence(x)
        else:
            out, _ = self.rnn(self.encoder(x))
        return self.head(self.output_dropout(self.pool(out)))

    def _folded_recurrence(self, x: torch.Tensor) -> torch.Tensor:
        """The fused recurrence fed with ready-made gate inputs W_ih vec(M_t) (identity input
        weights, the module's own recurrent weights and biases): hidden states (B, T, H)."""
        rnn = self.rnn
        u = self.encoder.gate_inputs(x, rnn.weight_ih_l0)
        h0 = u.new_zeros(1, u.shape[0], rnn.weight_hh_l0.shape[1])
        params = [self.gate_eye, rnn.weight_hh_l0, rnn.bias_ih_l0, rnn.bias_hh_l0]
        if self.cell == "lstm":
            return torch.lstm(u, [h0, h0], params, True, 1, 0.0, self.training, False, True)[0]
        if self.cell == "gru":
            return torch.gru(u, h0, params, True, 1, 0.0, self.training, False, True)[0]
        return torch.rnn_tanh(u, h0, params, True, 1, 0.0, self.training, False, True)[0]

    @torch.jit.export
    def attention_weights(self, x: torch.Tensor) -> torch.Tensor:
        """Input-cell attention (B, T, T) averaged over hops; (B, 0, 0) for models without ICA."""
        return self.encoder.attention(x)


def can_fold(config: ModelConfig) -> bool:
    """Whether the folded ICA form applies: one unidirectional ICA layer, whose gate inputs
    `InputCellAttention.gate_inputs` computes (in the cheaper order for its shapes) and feeds to
    the fused recurrence with identity input weights."""
    return config.attention == "ica" and config.layers == 1 and not config.bidirectional


def build_model(config: ModelConfig) -> RecurrentClassifier:
    return RecurrentClassifier(config)


def inference_copy(model: RecurrentClassifier) -> RecurrentClassifier:
    """The same weights with every dropout at p=0.

    Such a model computes the same function in train and eval mode, which is what lets the
    service run cuDNN's RNN backward (train mode only) without turning dropout on.
    """
    clean = build_model(model.config.replace(dropout=0.0))
    clean.load_state_dict(model.state_dict())
    return clean.eval()
