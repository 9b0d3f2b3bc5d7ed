"""Service configuration: every knob from a flag of `icaserve serve` or an ICASERVE_* variable."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_STORE = Path(__file__).resolve().parent.parent / "model_store"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ICASERVE_", extra="ignore", protected_namespaces=())

    # Where and what
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    workers: int = Field(1, ge=1, le=64)
    store: Path = DEFAULT_STORE
    default_model: str | None = None  # None: the first model in the store
    device: Literal["auto", "cpu", "cuda"] = "auto"
    predict_backend: Literal["torch", "onnx"] = "torch"
    # Intra-op threads per process. Predict and explain run in two threads of their own, so one
    # each fills two cores; more makes OpenMP threads spin against each other on small RNN ops.
    # 0: torch's default (one per core).
    torch_threads: int = Field(1, ge=0)
    # Keep large tensors in the heap (icaserve/tuning.py). Off for the server: under the soak's
    # mixed load it held ~500 MiB more and did not return it, with no throughput gain.
    tune_malloc: bool = False
    poll_interval_s: float = Field(5.0, ge=0)  # how often to look for new versions; 0 turns polling off
    max_versions_loaded: int = Field(4, ge=1)  # per model, latest always kept

    # Dynamic batching
    batching: bool = True
    max_batch_size: int = Field(32, ge=1, le=4096)  # sequences per merged batch
    # 0: a batch is whatever queued up while the model was busy, with no added latency when idle
    # (the bench measured batching-on at 1 client 30% slower with a 2 ms wait); > 0 also waits
    # this long for a batch to fill, which pays off only when arrivals are dense.
    max_wait_ms: float = Field(0.0, ge=0, le=1000)
    predict_queue_size: int = Field(256, ge=1)  # requests waiting, per model version
    explain_queue_size: int = Field(64, ge=1)
    request_timeout_s: float = Field(30.0, gt=0)
    retry_after_s: int = Field(1, ge=1)

    # Input limits
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    max_sequences: int = Field(64, ge=1)
    max_ig_steps: int = Field(256, ge=1)
    max_smoothgrad_samples: int = Field(128, ge=1)
    # Cost cap for one explanation request, in sample-step evaluations (sequences x time steps x
    # forward-equivalents, e.g. 4 sequences x 100 steps x 50 IG steps = 20,000). Bounds memory too.
    max_explain_cost: int = Field(2_000_000, ge=1)

    # Security
    api_key: SecretStr | None = None  # bearer key for inference and model listing; None: open
    admin_key: SecretStr | None = None  # bearer key for /admin/*; None: admin API disabled
    cors_origins: list[str] = Field(default_factory=list)  # empty: CORS off

    # Logs
    log_json: bool = False
    log_level: str = "info"
