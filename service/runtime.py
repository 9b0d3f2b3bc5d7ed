"""A loaded model version and the compute it offers: batched predictions and explanations.

Loading reads checksum-verified bytes from the store and builds everything from those same bytes.
On CUDA, cuDNN refuses RNN backward in eval mode; the exported TorchScript has every dropout at
p=0, so a second copy of it kept in train mode computes the same function and cuDNN allows its
backward. Each copy stays in one mode for its whole life: no mode flips and no global cuDNN
switch that could race other requests.

Deadlines: an `ExplainSpec` carries its request's deadline (`time.perf_counter()` based, as the
batcher's `Job.deadline`). `LoadedModel.explain` checks it between chunks of work, and the
attribution methods between their own chunks (their `should_stop`); once every row of the call
is past its deadline it raises `service.batching.Expired`, so nobody's thread computes an
answer nobody waits for, and the queue behind it moves on.
"""

from __future__ import annotations

import functools
import io
import logging
import math
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from attribution import Stopped, attribute, gradient_and_logits
from attribution.core import check_stop
from model_store import Manifest, ModelStore
from service.batching import Expired
from training.models import GATES

log = logging.getLogger("icaserve.runtime")

# Largest per-row intermediate a model call may hold at once, in elements (16 MB of float32). The
# ICA embedding is rows x T x r x N (rows x T x r x min(N, G) in the folded form, `step_width`);
# past glibc's mmap threshold (32 MB at most) every such buffer is mmapped and zeroed afresh per call. Measured on the shipped model (2-core EPYC, one thread):
# chunking merged batches to this budget made a 32-sequence gradient 1.75x faster per sequence
# and 8 merged 16-step integrated-gradients requests 2.3x faster.
CHUNK_ELEMENTS = 4_000_000


@dataclass
class ExplainSpec:
    """One sequence's explanation request, as the batcher sees it."""

    method: str
    params: dict[str, Any]
    targets: list[int] | None  # None: the predicted class
    all_targets: bool = False
    attention: bool = False
    # time.perf_counter() after which nobody waits for the answer (None: no deadline). Not part
    # of group_key: requests with different deadlines still share a call.
    deadline: float | None = None

    def n_targets(self, n_classes: int) -> int:
        """How many saliency matrices this sequence gets."""
        return n_classes if self.all_targets else len(self.targets or [0])

    def group_key(self, length: int) -> tuple:
        """Sequences with equal keys are explained in one call."""
        frozen = tuple(sorted((k, _freeze(v)) for k, v in self.params.items()))
        return (self.method, frozen, length)


def _freeze(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        return ("array", v.shape, v.tobytes())
    if isinstance(v, (list, tuple)):
        return tuple(_freeze(x) for x in v)
    return v


@dataclass
class Explanation:
    logits: np.ndarray  # (C,)
    targets: list[int]
    saliency: np.ndarray  # (K, T, N) raw signed attributions w.r.t. the raw input
    attention: np.ndarray | None = None  # (T, T)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but no CUDA device is available")
    return torch.device(name)


@dataclass
class LoadedModel:
    manifest: Manifest
    device: torch.device
    backend: str
    predict_module: torch.nn.Module  # TorchScript
    explain_module: torch.nn.Module  # TorchScript, or on CPU an eager copy with the fused kernel (`fused_explain_module`)
    onnx_session: Any = None
    mean: torch.Tensor = field(default=None)  # type: ignore[assignment]
    std: torch.Tensor = field(default=None)  # type: ignore[assignment]
    loaded_at: float = field(default_factory=time.time)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> int:
        return self.manifest.version

    @property
    def class_names(self) -> list[str]:
        return self.manifest.input.class_names

    @property
    def has_attention(self) -> bool:
        return self.manifest.architecture.get("attention") == "ica"

    # -- loading -----------------------------------------------------------------------------
    @classmethod
    def load(cls, store: ModelStore, name: str, version: int | str | None, device: torch.device,
             backend: str = "torch") -> "LoadedModel":
        manifest, ts_bytes = store.read_file(name, version, "torchscript")
        ts_bytes = refold(ts_bytes, manifest)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            predict = torch.jit.load(io.BytesIO(ts_bytes), map_location=device).eval()
            fused = fused_explain_module(predict, manifest) if device.type == "cpu" else None
            explain = fused if fused is not None else torch.jit.load(io.BytesIO(ts_bytes), map_location=device)
        explain.train(device.type == "cuda")  # see module docstring
        session = None
        if backend == "onnx":
            if "onnx" not in manifest.files:
                raise ValueError(f"{name} v{manifest.version} has no ONNX file; serve it with the torch backend")
            import onnxruntime as ort

            _, onnx_bytes = store.read_file(name, manifest.version, "onnx")
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = torch.get_num_threads()
            session = ort.InferenceSession(onnx_bytes, opts, providers=["CPUExecutionProvider"])
        norm = manifest.normalization
        model = cls(
            manifest=manifest, device=device, backend=backend, predict_module=predict, explain_module=explain,
            onnx_session=session,
            mean=torch.tensor(norm.mean, dtype=torch.float32, device=device),
            std=torch.tensor(norm.std, dtype=torch.float32, device=device),
        )
        model.warm_up()
        return model

    def warm_up(self) -> None:
        """Run forward and backward once, so the first request pays no compilation cost and a
        model that cannot run is refused before it serves."""
        length = self.manifest.input.train_length or min(16, self.manifest.input.max_length)
        x = np.zeros((2, length, self.manifest.input.n_features), dtype=np.float32)
        for _ in range(2):  # TorchScript's profiling executor optimises on the second run
            logits = self.predict([x[0], x[1]])
            if not np.isfinite(np.stack(logits)).all():
                raise ValueError("warm-up produced non-finite outputs")
            self.explain([x[0]], [ExplainSpec("gradient", {}, None)])

    # -- compute -----------------------------------------------------------------------------
    def _normalize(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.mean) / self.std

    def forward_raw(self, module: torch.nn.Module):
        return lambda z: module(self._normalize(z))

    @property
    def attention_hops(self) -> int:
        """r: the attention's hops (the T x T weights are computed per hop, then averaged)."""
        return int(self.manifest.architecture.get("r", 1))

    def attention_cost(self, length: int) -> int:
        """Forward-equivalents of one sequence's T x T attention weights (see `attention_cost`)."""
        return attention_cost(length, self.manifest.input.n_features)

    @functools.cached_property
    def step_width(self) -> int:
        """Values per time step of the model's largest intermediate: r x N for ICA's embedding, or
        r x min(N, G) in the folded form (its prefix sums run over the gate width G when G < N)."""
        arch = self.manifest.architecture
        n = self.manifest.input.n_features
        if arch.get("attention") != "ica":
            return n
        r = int(arch.get("r", 1))
        if is_folded(self.explain_module):
            gates = GATES.get(str(arch.get("cell")), 4) * int(arch.get("hidden", n))
            return r * min(n, gates)
        return r * n

    def rows_per_chunk(self, length: int) -> int:
        """Sequences (or scaled / noisy / occluded copies) per model call for this length."""
        return max(1, CHUNK_ELEMENTS // (length * self.step_width))

    def predict(self, sequences: list[np.ndarray]) -> list[np.ndarray]:
        """Logits per sequence; sequences of equal length share one forward."""
        out: list[np.ndarray | None] = [None] * len(sequences)
        for length, idx in _by_length(sequences).items():
            rows = self.rows_per_chunk(length)
            for start in range(0, len(idx), rows):
                chunk = idx[start : start + rows]
                x = np.stack([sequences[i] for i in chunk])
                if self.onnx_session is not None:
                    z = (x - self.mean.cpu().numpy()) / self.std.cpu().numpy()
                    logits = self.onnx_session.run(None, {"x": z.astype(np.float32)})[0]
                else:
                    with torch.inference_mode():
                        xt = torch.from_numpy(x).to(self.device)
                        logits = self.predict_module(self._normalize(xt)).float().cpu().numpy()
                for j, i in enumerate(chunk):
                    out[i] = logits[j]
        return out  # type: ignore[return-value]

    def explain(self, sequences: list[np.ndarray], specs: list[ExplainSpec]) -> list[Explanation]:
        """Explanations per sequence. Sequences with the same method, parameters and length are
        merged into one attribution call, each keeping its own targets.

        Raises `service.batching.Expired` once every row's deadline has passed (checked between
        chunks here and inside the attribution methods)."""
        deadlines = [s.deadline for s in specs]
        last = None if not deadlines or None in deadlines else max(deadlines)  # type: ignore[type-var]

        def should_stop() -> bool:
            """True once nobody waits for any row of this call."""
            return last is not None and time.perf_counter() > last

        try:
            return self._explain(sequences, specs, should_stop)
        except Stopped:
            raise Expired("explain: every request of this batch is past its deadline") from None

    def _explain(self, sequences: list[np.ndarray], specs: list[ExplainSpec],
                 should_stop: Callable[[], bool]) -> list[Explanation]:
        groups: dict[tuple, list[int]] = {}
        for i, (seq, spec) in enumerate(zip(sequences, specs)):
            groups.setdefault(spec.group_key(len(seq)), []).append(i)
        out: list[Explanation | None] = [None] * len(sequences)
        forward = self.forward_raw(self.explain_module)
        n_classes = len(self.class_names)
        for idx in groups.values():
            check_stop(should_stop)
            spec0 = specs[idx[0]]
            x = torch.from_numpy(np.stack([sequences[i] for i in idx])).to(self.device)
            rows = self.rows_per_chunk(x.shape[1])
            group_specs = [specs[i] for i in idx]
            k_max = max(s.n_targets(n_classes) for s in group_specs)

            def choose(logits: torch.Tensor, offset: int) -> torch.Tensor:
                """Each row's targets (its predicted class unless named), padded to k_max."""
                chosen = []
                for s, pred in zip(group_specs[offset:], logits.argmax(1).tolist()):
                    t = list(range(n_classes)) if s.all_targets else list(s.targets or [pred])
                    chosen.append(t + [t[0]] * (k_max - len(t)))
                return torch.tensor(chosen, dtype=torch.long, device=self.device)

            params = {k: torch.as_tensor(v, device=self.device) if isinstance(v, np.ndarray) else v
                      for k, v in spec0.params.items()}
            params["internal_batch_size"] = rows  # for TSR, handed on to its base method
            params["should_stop"] = should_stop  # every method checks it between its chunks
            if spec0.method == "gradient":  # the default request: one forward, not two
                logits, targets, sal = gradient_and_logits(forward, x, choose, **params)
                logits = logits.float()
            else:
                parts = []
                with torch.no_grad():
                    for c in x.split(rows):
                        check_stop(should_stop)
                        parts.append(forward(c).float())
                logits = torch.cat(parts)
                targets = choose(logits, 0)
                if spec0.method == "smoothgrad":
                    # `noise` is in standardised units (the API's contract): perturb z = (x - mean) / std
                    # and map the gradients back to raw units (d/dx = d/dz / std).
                    sal = attribute("smoothgrad", self.explain_module, self._normalize(x), targets,
                                    **params) / self.std
                else:
                    sal = attribute(spec0.method, forward, x, targets, **params)
            target_lists = [
                t[: s.n_targets(n_classes)] for s, t in zip(group_specs, targets.tolist())
            ]
            sal_np = sal.float().cpu().numpy()
            logits_np = logits.cpu().numpy()
            wanted = [j for j, i in enumerate(idx) if specs[i].attention] if self.has_attention else []
            attn = self._attention(x[wanted], should_stop) if wanted else None
            row_of = {j: p for p, j in enumerate(wanted)}  # row j of the group -> row of attn
            for j, i in enumerate(idx):
                k = len(target_lists[j])
                out[i] = Explanation(
                    logits=logits_np[j], targets=target_lists[j], saliency=sal_np[j, :k],
                    attention=attn[row_of[j]] if attn is not None and j in row_of else None,
                )
        return out  # type: ignore[return-value]

    def _attention(self, x: torch.Tensor, should_stop: Callable[[], bool]) -> np.ndarray:
        """(B, T, T) attention weights of the rows in x, computed a few rows at a time: one row
        holds r x T x T scores (20 x 1000 x 1000 floats = 80 MB for the shipped model at T = 1000),
        so a whole batch at once would hold gigabytes."""
        t = x.shape[1]
        rows = max(1, CHUNK_ELEMENTS // (self.attention_hops * t * t))
        parts = []
        with torch.no_grad():
            for c in x.split(rows):
                check_stop(should_stop)
                parts.append(self.explain_module.attention_weights(self._normalize(c)).float().cpu().numpy())
        return np.concatenate(parts)


def attention_cost(length: int, n_features: int) -> int:
    """Forward-equivalents of one sequence's T x T attention weights: r x T x T scores and their
    softmax, against a forward's r x T x N input-cell embedding, i.e. ceil(T / N) forwards."""
    return max(1, math.ceil(length / n_features))


def refold(ts_bytes: bytes, manifest: Manifest) -> bytes:
    """TorchScript of the folded ICA form (training/ica.py `gate_inputs`) for a version exported
    before that form existed: rebuilt from the manifest's architecture and the file's own weights
    (the stored parameterisation is the same), and used only if it answers the same as the file
    (logits and input-gradients on a fixed input). Anything else: the file's bytes unchanged."""
    try:
        from training.models import ModelConfig, build_model, can_fold

        config = ModelConfig.from_dict({**manifest.architecture, "dropout": 0.0})
        if not can_fold(config):
            return ts_bytes
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            stored = torch.jit.load(io.BytesIO(ts_bytes), map_location="cpu").eval()
            if "_folded_recurrence" in stored.code:
                return ts_bytes  # exported in the folded form already
            model = build_model(config).eval()
            model.load_state_dict(stored.state_dict())
            folded = torch.jit.script(model)
            _same_answers(stored, folded, manifest, config.n_features)
            buf = io.BytesIO()
            torch.jit.save(folded, buf)
    except Exception as exc:  # unknown architecture fields, a parity miss: serve the file as it is
        log.warning("serving %s v%s in its stored form (folded form not used: %s)", manifest.name,
                    manifest.version, exc)
        return ts_bytes
    log.info("serving %s v%s in the folded ICA form", manifest.name, manifest.version)
    return buf.getvalue()


def is_folded(module: torch.nn.Module) -> bool:
    """Whether a serving module computes ICA in the folded form (TorchScript: its code says so)."""
    if isinstance(module, torch.jit.ScriptModule):
        return "_folded_recurrence" in module.code
    return bool(getattr(module, "folded", False))


def _same_answers(reference: torch.nn.Module, candidate: torch.nn.Module, manifest: Manifest, n_features: int) -> None:
    """Logits and input-gradients of `candidate` equal `reference`'s (rtol/atol 1e-5) on a fixed input."""
    length = min(manifest.input.train_length or 16, manifest.input.max_length, 64)
    x = torch.randn(2, length, n_features, generator=torch.Generator().manual_seed(0))
    outs = []
    for m in (reference, candidate):
        xg = x.clone().requires_grad_(True)
        logits = m(xg)
        (grad,) = torch.autograd.grad(logits[:, 0].sum(), xg)
        outs.append((logits.detach(), grad))
    for a, b in zip(outs[0], outs[1]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def fused_explain_module(stored: torch.nn.Module, manifest: Manifest) -> torch.nn.Module | None:
    """An eager CPU copy of a folded ICA model for explanations, whose attention runs in the fused
    kernel (training/hop_sum.py; with AVX-512 and the weights frozen here, the whole attention node
    in one C call, G < N or not): a TorchScript graph can only run the stock ops, whose backward
    costs several passes over (B, T, r, G) or (B, T, r, N) tensors (BENCHMARKS.md: the fused form's
    forward + input-gradient). Built from the manifest's architecture and the TorchScript's (`stored`)
    weights, every dropout at p=0, in eval mode, and used only if it answers the same (logits and
    input-gradients on a fixed input). Predictions stay on the TorchScript: forward alone gains
    little, and the graph runs with the GIL released. None (TorchScript explains): the kernel is
    unavailable or off (`ICASERVE_FUSED_ICA=0`), the model does not fold, or a miss."""
    try:
        from training import hop_sum
        from training.models import ModelConfig, build_model, can_fold

        config = ModelConfig.from_dict({**manifest.architecture, "dropout": 0.0})
        if not can_fold(config) or not hop_sum.available():
            return None
        model = build_model(config).eval()
        wanted = model.state_dict()  # a scripted state_dict also lists non-persistent buffers (gate_eye)
        model.load_state_dict({k: v for k, v in stored.state_dict().items() if k in wanted})
        model.requires_grad_(False)  # explanations take input-gradients only
        _same_answers(stored, model, manifest, config.n_features)
    except Exception as exc:  # unknown architecture fields, a parity miss: the TorchScript explains
        log.warning("explaining %s v%s with TorchScript (fused ICA not used: %s)", manifest.name, manifest.version, exc)
        return None
    log.info("explaining %s v%s with the fused ICA hop sum", manifest.name, manifest.version)
    return model


def _by_length(sequences: list[np.ndarray]) -> dict[int, list[int]]:
    groups: dict[int, list[int]] = {}
    for i, s in enumerate(sequences):
        groups.setdefault(len(s), []).append(i)
    return groups
