"""A loaded model version and the compute it offers: batched predictions and explanations.

Loading reads checksum-verified bytes from the store and builds everything from those same bytes.
On CUDA, cuDNN refuses RNN backward in eval mode; the exported TorchScript has every dropout at
p=0, so a second copy of it kept in train mode computes the same function and cuDNN allows its
backward. Each copy stays in one mode for its whole life: no mode flips and no global cuDNN
switch that could race other requests.
"""

from __future__ import annotations

import io
import logging
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from attribution import attribute, gradient_and_logits, tsr
from model_store import Manifest, ModelStore

log = logging.getLogger("icaserve.runtime")

# Largest per-row intermediate a model call may hold at once, in elements (16 MB of float32). The
# ICA embedding is rows x T x r x N; past glibc's mmap threshold (32 MB at most) every such buffer
# is mmapped and zeroed afresh per call. Measured on the shipped model (2-core EPYC, one thread):
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
    predict_module: torch.jit.ScriptModule
    explain_module: torch.jit.ScriptModule
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
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            predict = torch.jit.load(io.BytesIO(ts_bytes), map_location=device).eval()
            explain = torch.jit.load(io.BytesIO(ts_bytes), map_location=device)
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

    def forward_raw(self, module: torch.jit.ScriptModule):
        return lambda z: module(self._normalize(z))

    def rows_per_chunk(self, length: int) -> int:
        """Sequences (or scaled / noisy / occluded copies) per model call for this length."""
        arch = self.manifest.architecture
        width = self.manifest.input.n_features * (int(arch.get("r", 1)) if arch.get("attention") == "ica" else 1)
        return max(1, CHUNK_ELEMENTS // (length * width))

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
        merged into one attribution call, each keeping its own targets."""
        groups: dict[tuple, list[int]] = {}
        for i, (seq, spec) in enumerate(zip(sequences, specs)):
            groups.setdefault(spec.group_key(len(seq)), []).append(i)
        out: list[Explanation | None] = [None] * len(sequences)
        forward = self.forward_raw(self.explain_module)
        n_classes = len(self.class_names)
        for idx in groups.values():
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
            if spec0.method == "gradient":  # the default request: one forward, not two
                logits, targets, sal = gradient_and_logits(forward, x, choose, internal_batch_size=rows)
                logits = logits.float()
            else:
                with torch.no_grad():
                    logits = torch.cat([forward(c).float() for c in x.split(rows)])
                targets = choose(logits, 0)
                if spec0.method == "tsr":
                    base = params.pop("base_method", "gradient")
                    sal = tsr(base, forward, x, targets, **params)
                elif spec0.method == "smoothgrad":
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
            attn = None
            if any(specs[i].attention for i in idx) and self.has_attention:
                with torch.no_grad():
                    attn = self.explain_module.attention_weights(self._normalize(x)).float().cpu().numpy()
            for j, i in enumerate(idx):
                k = len(target_lists[j])
                out[i] = Explanation(
                    logits=logits_np[j], targets=target_lists[j], saliency=sal_np[j, :k],
                    attention=attn[j] if attn is not None and specs[i].attention else None,
                )
        return out  # type: ignore[return-value]


def _by_length(sequences: list[np.ndarray]) -> dict[int, list[int]]:
    groups: dict[int, list[int]] = {}
    for i, s in enumerate(sequences):
        groups.setdefault(len(s), []).append(i)
    return groups
